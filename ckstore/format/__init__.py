"""Bytes <-> values with no I/O: the safetensors header, the manifest, tags, hashing, the state skeleton's schema."""
