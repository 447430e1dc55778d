"""``metrics.json``: metrics recorded for a checkpoint after it was committed.

A training loop saves step 22 during the epoch and knows its validation loss
only at the end of the epoch. A committed checkpoint is never modified (DVC
tracks it, incremental saves hard-link its files), so
:meth:`Store.record_metrics` writes such metrics into this store-level
sidecar, replaced atomically like ``tags.json`` under the metadata lock (see
``ckstore.storage.metadata_lock``); any process may record them, an evaluation script
beside the training run included.

A checkpoint's metrics (``CheckpointInfo.metrics``, ranking, ``best``,
``keep_best``) are its manifest's metrics plus the recorded ones. Recording a
metric the checkpoint already has with another value is refused: a metric is
a fact about a checkpoint, not a running value. Each entry carries the
manifest's ``created`` of the checkpoint it is about, so an entry never
attaches to a later checkpoint of the same step (one saved after the first
was quarantined); such stale entries, and those of deleted steps, are dropped
at the next write.

Canonical JSON with a checksum, like the manifests and tags::

    {"checksum": "blake3:...", "format": "ckstore.metrics", "format_version": 1,
     "metrics": {"22": {"created": 1764100100.5, "metrics": {"val_loss": 0.31}}}}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from ..storage import safeio as _safeio
from ..errors import IntegrityError, InvalidArgumentError, ManifestError
from ..format.canonical import canonical_json, refuse_constant, with_checksum
from ..format.hashing import HashInfo, hash_bytes
from ..format.manifest import check_metrics

METRICS_NAME = "metrics.json"
FORMAT = "ckstore.metrics"
FORMAT_VERSION = 1
MAX_METRICS_BYTES = 64 << 20


@dataclass(frozen=True)
class Recorded:
    """Metrics recorded for the checkpoint of one step whose manifest says ``created``."""

    created: float
    metrics: Mapping[str, float]


def dump_metrics(recorded: Mapping[int, Recorded]) -> bytes:
    body = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "metrics": {str(step): {"created": float(r.created), "metrics": dict(r.metrics)} for step, r in sorted(recorded.items())},
    }
    return with_checksum(body)


def parse_metrics(data: bytes, *, path: str = METRICS_NAME) -> dict[int, Recorded]:
    """Parse and check ``metrics.json``; ManifestError if malformed, IntegrityError if its checksum fails."""

    def bad(reason: str) -> ManifestError:
        return ManifestError(f"{path}: {reason}", path=path)

    if len(data) > MAX_METRICS_BYTES:
        raise bad("metrics file is too large")
    try:
        raw = json.loads(data.decode("utf-8"), parse_constant=refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("not valid JSON") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise bad("not a ckstore metrics file")
    if raw.get("format_version") != FORMAT_VERSION:
        raise bad(f"unsupported format_version {raw.get('format_version')!r}; this ckstore reads {FORMAT_VERSION}")
    if set(raw) != {"checksum", "format", "format_version", "metrics"}:
        raise bad("unexpected or missing fields")
    try:
        expected = HashInfo.parse(raw.pop("checksum"))
    except (ManifestError, TypeError, AttributeError):
        raise bad("malformed checksum") from None
    actual = hash_bytes(canonical_json(raw), expected.algo)
    if actual != expected:
        raise IntegrityError(
            f"{path}: checksum mismatch (altered or corrupt metrics file)", path=path, expected=str(expected), actual=str(actual)
        )
    if canonical_json({**raw, "checksum": str(expected)}) != bytes(data):
        raise bad("metrics file is not in canonical form (altered, or not written by ckstore)")
    entries = raw["metrics"]
    if not isinstance(entries, dict):
        raise bad("metrics must be an object")
    out: dict[int, Recorded] = {}
    for key, entry in entries.items():
        if not (key.isascii() and key.isdigit()) or str(int(key)) != key or int(key) >= 1 << 63:
            raise bad(f"invalid step {key[:40]!r}")
        if not isinstance(entry, dict) or set(entry) != {"created", "metrics"} or type(entry["created"]) is not float:
            raise bad(f"step {key}: entry must have exactly a float 'created' and 'metrics'")
        try:
            metrics = check_metrics(entry["metrics"])
        except InvalidArgumentError as exc:
            raise bad(f"step {key}: {exc}") from None
        out[int(key)] = Recorded(entry["created"], metrics)
    return out


def read_metrics(path: str) -> dict[int, Recorded]:
    """Read and parse ``metrics.json`` at ``path``; ``{}`` when there is none.

    Read through ``_safeio`` (no link followed, no FIFO blocking the store,
    capped, seen by the readfaults hook): anything but a regular file is a
    ManifestError, like a malformed one; an OS error (EIO) is
    CheckpointReadError.
    """
    try:
        data = _safeio.read_small(
            path, cap=MAX_METRICS_BYTES, what="the metrics file", error=lambda reason: ManifestError(f"{path}: {reason}", path=path)
        )
    except FileNotFoundError:
        return {}
    return parse_metrics(data, path=path)
