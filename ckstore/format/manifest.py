"""``manifest.json``: what a checkpoint is.

A checkpoint directory holds tensor files and one manifest. The manifest lists
every file with its size and content hash, the checkpoint's step and metrics,
the non-tensor state as JSON, and a ``checksum`` over all of that, so a
flipped bit in the manifest itself is caught too. A committed checkpoint
directory is never modified again: tags, which move between checkpoints, live
in the store's ``tags.json`` (see ``_tags``), so a checkpoint tracked by DVC or
hard-linked by an incremental save stays byte-identical. It is canonical JSON: sorted
keys, no whitespace, no NaN or Infinity (non-finite floats in the state are
tagged strings, see ``_state``), UTF-8.

Example (abridged)::

    {"checksum": "blake3:9f...", "created": 1764100000.25, "files": {"model.fc.safetensors":
     {"hash": "blake3:1c...", "size": 4216}}, "format": "ckstore.checkpoint", "format_version": 1,
     "metrics": {"val_loss": 0.31}, "retention": {"metric": "val_loss", "mode": "min"},
     "state": {"model": {"$ck": "stateful", "class": "Linear", "state": {...}}}, "step": 120}

Format 2 (written since 2026-12) adds to every file entry a ``chunk_size``
and the list of its ``chunks``' hashes, and its ``hash`` is the root over
them (see ``format.chunks``)::

    {"chunk_size": 1048576, "chunks": ["5e...", "a0..."], "hash": "blake3:<root>", "size": 1500000}

Format 1 (one hash of the whole file's bytes, no chunk fields) is still read
and verified. Readers refuse a ``format_version`` they do not know instead of guessing.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import IntegrityError, InvalidArgumentError, ManifestError
from .canonical import canonical_json, refuse_constant, with_checksum
from .chunks import ChunkedHash, parse_chunks
from .hashing import HashInfo, hash_bytes
from .skeleton import check_skeleton, tensor_refs
from .text import has_unsafe_chars

FORMAT = "ckstore.checkpoint"
FORMAT_VERSION = 2
#: Every version this reader accepts; each has its own file entry fields.
READ_VERSIONS = (1, 2)
_ENTRY_KEYS = {1: {"hash", "size"}, 2: {"chunk_size", "chunks", "hash", "size"}}
MANIFEST_NAME = "manifest.json"
#: A manifest larger than this is refused before it is read. What ckstore writes is far smaller:
#: a model of 10,000 parameter tensors with Adam's state (30,000 tensors) has a 4.3 MB manifest,
#: so 64 MiB holds ~150,000 parameter tensors with their optimizer state (a DeepSeek-V3-sized
#: model with unfused experts has ~48,000), with room to spare. Parsed, a manifest costs 6 to 9
#: times its size (JSON of tiny containers up to ~25 times: see MAX_MANIFEST_NODES).
MAX_MANIFEST_BYTES = 64 << 20
#: At most this many JSON values (counted, before parsing, as the commas and opening brackets).
#: The 4.3 MB manifest above has ~300,000; a 64 MiB file of nothing but ``{},`` has 22 million,
#: which json.loads would turn into 1.5 GB of empty dicts. This bound caps that at ~300 MB and
#: also bounds the skeleton nodes the state decoder walks.
MAX_MANIFEST_NODES = 4_000_000

_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.~#-]{0,199}$")
_KEYS = {"checksum", "created", "files", "format", "format_version", "metrics", "retention", "state", "step"}


@dataclass(frozen=True)
class FileEntry:
    """One file: its size and hash (format 2: the root over ``chunks``, whose table is then given)."""

    size: int
    hash: HashInfo
    chunks: ChunkedHash | None = None

    @property
    def expected(self) -> HashInfo | ChunkedHash:
        """What a reader checks the file against: the chunk table where there is one, else the whole-file hash."""
        return self.chunks if self.chunks is not None else self.hash

    def _json(self) -> dict[str, Any]:
        if self.chunks is None:
            return {"hash": str(self.hash), "size": self.size}
        return {"chunk_size": self.chunks.chunk_size, "chunks": [d.hex() for d in self.chunks.digests], "hash": str(self.hash), "size": self.size}


@dataclass(frozen=True)
class Manifest:
    step: int
    created: float
    files: Mapping[str, FileEntry]
    state: Any = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    retention: Mapping[str, str] | None = None  # {"metric": ..., "mode": ...} the writer used
    format_version: int = FORMAT_VERSION

    @property
    def nbytes(self) -> int:
        return sum(entry.size for entry in self.files.values())

    def _body(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "files": {name: e._json() for name, e in self.files.items()},
            "format": FORMAT,
            "format_version": self.format_version,
            "metrics": dict(self.metrics),
            "retention": dict(self.retention) if self.retention is not None else None,
            "state": self.state,
            "step": self.step,
        }

    def to_json(self) -> bytes:
        # A format-2 manifest lists a chunk table for every file, a format-1 one for none: never a mix,
        # which the parser would refuse (an incremental save links only files hashed the same way).
        chunked = {e.chunks is not None for e in self.files.values()}
        if self.format_version not in READ_VERSIONS or chunked - {self.format_version == 2}:
            raise ManifestError(f"format_version {self.format_version} manifest with {'chunked' if True in chunked else 'unchunked'} file entries")
        body = self._body()
        return with_checksum(body)


def parse_manifest(data: bytes, *, path: str = MANIFEST_NAME) -> Manifest:
    """Parse and validate a manifest. ManifestError for anything malformed, IntegrityError for a checksum mismatch."""

    def bad(reason: str) -> ManifestError:
        return ManifestError(f"{path}: {reason}", path=path)

    if len(data) > MAX_MANIFEST_BYTES:
        raise bad(f"manifest is {len(data)} bytes, more than the {MAX_MANIFEST_BYTES} allowed")
    nodes = count_nodes(data)
    if nodes > MAX_MANIFEST_NODES:
        raise bad(f"manifest holds about {nodes} JSON values, more than the {MAX_MANIFEST_NODES} allowed (refused before parsing)")
    try:
        raw = json.loads(data.decode("utf-8"), parse_constant=refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"not valid JSON ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(raw, dict):
        raise bad("manifest is not a JSON object")
    if raw.get("format") != FORMAT:
        raise bad(f"not a ckstore manifest (format {str(raw.get('format'))[:60]!r})")
    version = raw.get("format_version")
    if type(version) is not int:
        raise bad("format_version missing or not an integer")
    if version not in READ_VERSIONS:
        raise bad(f"unsupported format_version {version}; this ckstore reads versions {', '.join(map(str, READ_VERSIONS))}")
    unknown = set(raw) - _KEYS
    if unknown:
        raise bad(f"unknown fields {sorted(unknown)[:5]}")
    missing = _KEYS - set(raw)
    if missing:
        raise bad(f"missing fields {sorted(missing)}")

    checksum = raw.pop("checksum")
    try:
        expected = HashInfo.parse(checksum)
    except ManifestError as exc:
        raise bad(f"checksum: {exc}") from None
    try:
        body = canonical_json(raw)
    except ValueError:  # a lone surrogate escaped in a string ("\ud800") has no UTF-8 form
        raise bad("manifest holds text that is not valid Unicode") from None
    actual = hash_bytes(body, expected.algo)
    if actual != expected:
        raise IntegrityError(f"{path}: manifest checksum mismatch (altered or corrupt manifest)", path=path, expected=str(expected), actual=str(actual))
    # The checksum covers the parsed values, not the bytes: "1e-05" and "1E-05",
    # or added whitespace, parse alike. Only the canonical bytes are accepted, so
    # every altered byte is caught, not only those that change a value.
    if canonical_json({**raw, "checksum": checksum}) != bytes(data):
        raise bad("manifest is not in canonical form (altered, or not written by ckstore)")

    step = raw["step"]
    if type(step) is not int or step < 0:
        raise bad("step must be a non-negative integer")
    created = raw["created"]
    if type(created) not in (int, float) or not _finite(created):
        raise bad("created must be a finite number")
    metrics = raw["metrics"]
    if not isinstance(metrics, dict):
        raise bad("metrics must be an object")
    for name, value in metrics.items():
        if type(value) not in (int, float) or not _finite(value):
            raise bad(f"metric {name[:60]!r} is not a finite number")
    retention = raw["retention"]
    if retention is not None and not (
        isinstance(retention, dict)
        and set(retention) == {"metric", "mode"}
        and isinstance(retention["metric"], str)
        and retention["mode"] in ("min", "max")
    ):
        raise bad("retention must be null or {'metric': str, 'mode': 'min'|'max'}")

    files_raw = raw["files"]
    if not isinstance(files_raw, dict):
        raise bad("files must be an object")
    files: dict[str, FileEntry] = {}
    for name, entry in files_raw.items():
        check_file_name(name, path)
        if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS[version]:
            raise bad(f"file {name!r}: a format {version} entry must have exactly {', '.join(map(repr, sorted(_ENTRY_KEYS[version])))}")
        size = entry["size"]
        if type(size) is not int or size < 0:
            raise bad(f"file {name!r}: size must be a non-negative integer")
        try:
            digest = HashInfo.parse(entry["hash"])
        except ManifestError as exc:
            raise bad(f"file {name!r}: {exc}") from None
        table = parse_chunks(entry, name=name, path=path, algo=digest.algo, size=size, root=digest) if version == 2 else None
        files[name] = FileEntry(size, digest, table)

    # The whole skeleton, once per parsed manifest: load() and verify() then agree on it.
    check_skeleton(raw["state"], path=path)
    for file, _ in tensor_refs(raw["state"]):
        if file not in files:
            raise bad(f"state refers to file {file[:80]!r}, which the manifest does not list")

    return Manifest(
        step=step,
        created=float(created),
        files=files,
        state=raw["state"],
        metrics=dict(metrics),
        retention=retention,
        format_version=version,
    )


def count_nodes(data: bytes) -> int:
    """An upper bound on the JSON values in ``data``, without parsing: every value but the last of a container is followed by a comma.

    Brackets and commas inside strings are counted too; that only makes the
    bound looser. Three C-level scans: ~1 ms per megabyte.
    """
    return data.count(b",") + data.count(b"{") + data.count(b"[") + 1


def _finite(value: int | float) -> bool:
    """math.isfinite, except that an int too large for a float counts as not finite (instead of OverflowError)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_file_name(name: object, path: str = MANIFEST_NAME) -> str:
    """A file named by a manifest must be a plain name inside its checkpoint directory."""
    if not isinstance(name, str) or not _FILE_NAME.fullmatch(name) or name == MANIFEST_NAME or ".." in name:
        raise ManifestError(f"{path}: unsafe or invalid file name {str(name)[:80]!r} (must be a plain name inside the checkpoint)", path=path)
    return name


def check_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise InvalidArgumentError(f"metrics must be a mapping of names to numbers, got {type(metrics).__name__}")
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"metric names must be non-empty strings, got {name!r}")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgumentError(f"metric name {name!r} is not valid UTF-8 text") from None
        if has_unsafe_chars(name):
            # Printed by `ckstore ls` and in commit messages: an escape sequence or newline there would act on a terminal.
            raise InvalidArgumentError(f"metric name {name!r} holds control or format characters")
        if hasattr(value, "item") and callable(value.item):  # 0-d tensors and NumPy scalars
            try:
                value = value.item()
            except (ValueError, RuntimeError):
                raise InvalidArgumentError(f"metric {name!r} is not a scalar") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgumentError(f"metric {name!r} must be a number, got {type(value).__name__}")
        if not _finite(value):
            raise InvalidArgumentError(f"metric {name!r} is {value}; NaN, infinite and out-of-range metrics cannot be ranked")
        out[name] = value
    return out
