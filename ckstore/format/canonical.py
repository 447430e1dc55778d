"""Checksummed canonical JSON: the one encoding of ``manifest.json``, ``tags.json`` and ``metrics.json``.

Canonical means: keys sorted, no whitespace, UTF-8 text as is (not ``\\u``
escapes), no NaN or infinity. A file is valid only if it is byte for byte the
canonical form of what it parses to, so two files with the same content have
the same bytes and the checksum (over the canonical form without the
``checksum`` field) covers every byte. There was one copy of this per file
kind, and the copies had already drifted apart (one escaped non-ASCII text,
the others did not); a file written by one copy would have failed another's
canonical check.
"""

from __future__ import annotations

import json
from typing import Any

from .hashing import default_algorithm, hash_bytes


def canonical_json(obj: Any) -> bytes:
    """``obj`` as canonical JSON bytes; ValueError for NaN, infinity or text with no UTF-8 form (a lone surrogate)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def with_checksum(body: dict[str, Any]) -> bytes:
    """``body`` plus its ``checksum`` (of the canonical form without it), as canonical JSON."""
    return canonical_json({**body, "checksum": str(hash_bytes(canonical_json(body), default_algorithm()))})


def refuse_constant(name: str) -> Any:
    """``json.loads(parse_constant=...)``: NaN and Infinity are not JSON, and a checksummed file never holds them."""
    raise ValueError(f"non-standard JSON constant {name}")
