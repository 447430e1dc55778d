"""The data path of a save and a load: the write pipeline and its sync thread, read placement and batched reads."""
