"""Reading a store's ``tags.json``: ``format/tags.py`` parses and prints the bytes and does no I/O,
so the format layer never reaches down into ``storage`` (its writes go through ``storage.durable``)."""

from __future__ import annotations

from ..errors import ManifestError
from ..format.tags import MAX_TAGS_BYTES, TagEntry, parse_tags
from ..storage import safeio as _safeio


def read_tags(path: str) -> dict[str, TagEntry]:
    """Read and parse ``tags.json``; ``{}`` if there is none.

    Read like every store file (``storage.safeio``): a symlink is refused, never
    followed out of the store; a FIFO cannot hang the reader; a directory or
    device is refused; at most :data:`MAX_TAGS_BYTES` are read. ManifestError
    for a file that is not a tags file, CheckpointReadError for an OS error.
    """
    try:
        data = _safeio.read_small(
            path, cap=MAX_TAGS_BYTES, what="tags file", error=lambda reason: ManifestError(f"{path}: {reason}", path=path)
        )
    except FileNotFoundError:
        return {}
    return parse_tags(data, path=path)
