"""ckstore benchmarks: ``python -m benchmarks [--quick]`` (``make bench``). See ``benchmarks/__main__.py``."""
