"""Training-loop helpers built on Store: resume, Checkpointer, EarlyStopping, ResumableSampler, RNGState."""
