"""The state codec: encode a training state into a skeleton and tensors, decode it back into the objects a load restores."""
