"""``tags.json``: the store's named pointers to checkpoints.

Tags move (``best``-style names, releases, published names), while committed
checkpoint directories never change, so tags live in one store-level file that
is replaced atomically (temp file, fsync, rename, directory fsync). Moving a tag
from one checkpoint to another is therefore a single atomic step: after a crash
the tag points at the old or the new checkpoint, never at both or neither.
A tag pins its checkpoint against retention.

Canonical JSON with a checksum, like the manifests::

    {"checksum": "blake3:...", "format": "ckstore.tags", "format_version": 1,
     "tags": {"release": {"step": 1200, "time": 1764100100.0}}}
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import IntegrityError, InvalidArgumentError, ManifestError
from .canonical import canonical_json, refuse_constant, with_checksum
from .hashing import HashInfo, hash_bytes

TAGS_NAME = "tags.json"
FORMAT = "ckstore.tags"
FORMAT_VERSION = 1
#: A tag costs ~60 bytes: 4 MiB is ~70,000 tags. Parsed JSON costs up to ~25x its size.
MAX_TAGS_BYTES = 4 << 20

# "=" so that Lightning's file names (epoch=0-step=11.ckpt) are names as they are.
_TAG_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.@+:=-]{0,127}$")
RESERVED = frozenset({"latest", "best"})


@dataclass(frozen=True)
class TagEntry:
    step: int
    time: float


def check_tag_name(name: object) -> str:
    if not isinstance(name, str) or not _TAG_NAME.fullmatch(name) or name in RESERVED:  # fullmatch: "$" accepts "a\n"
        raise InvalidArgumentError(
            f"invalid tag {name!r}: a tag starts with a letter, holds letters, digits and _.@+:=- "
            "(at most 128 characters), and is not 'latest' or 'best'"
        )
    return name


def dump_tags(tags: Mapping[str, TagEntry]) -> bytes:
    body = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tags": {name: {"step": e.step, "time": float(e.time)} for name, e in sorted(tags.items())},
    }
    return with_checksum(body)


def parse_tags(data: bytes, *, path: str = TAGS_NAME) -> dict[str, TagEntry]:
    def bad(reason: str) -> ManifestError:
        return ManifestError(f"{path}: {reason}", path=path)

    if len(data) > MAX_TAGS_BYTES:
        raise bad("tags file is too large")
    try:
        raw = json.loads(data.decode("utf-8"), parse_constant=refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("not valid JSON") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise bad("not a ckstore tags file")
    if raw.get("format_version") != FORMAT_VERSION:
        raise bad(f"unsupported format_version {raw.get('format_version')!r}; this ckstore reads {FORMAT_VERSION}")
    if set(raw) != {"checksum", "format", "format_version", "tags"}:
        raise bad("unexpected or missing fields")
    try:
        expected = HashInfo.parse(raw.pop("checksum"))
    except ManifestError as exc:
        raise bad(str(exc)) from None
    try:
        canonical = canonical_json(raw)
    except ValueError:  # a number past the largest float (1e999) parses as inf, which canonical JSON cannot hold
        raise bad("holds a number out of range") from None
    actual = hash_bytes(canonical, expected.algo)
    if actual != expected:
        raise IntegrityError(f"{path}: checksum mismatch (altered or corrupt tags file)", path=path, expected=str(expected), actual=str(actual))
    if canonical_json({**raw, "checksum": str(expected)}) != bytes(data):
        # Same value, other bytes ("1E3" for "1000.0", whitespace): altered all the same.
        raise bad("tags file is not in canonical form (altered, or not written by ckstore)")
    tags = raw["tags"]
    if not isinstance(tags, dict):
        raise bad("tags must be an object")
    out: dict[str, TagEntry] = {}
    for name, entry in tags.items():
        try:
            check_tag_name(name)
        except InvalidArgumentError:
            raise bad(f"invalid tag name {name[:60]!r}") from None
        if not isinstance(entry, dict) or set(entry) != {"step", "time"}:
            raise bad(f"tag {name!r}: entry must have exactly 'step' and 'time'")
        step, when = entry["step"], entry["time"]
        if type(step) is not int or step < 0 or type(when) is not float or not math.isfinite(when):
            raise bad(f"tag {name!r}: step must be a non-negative integer and time a finite number")
        out[name] = TagEntry(step, float(when))
    return out
