"""The checksummed canonical JSON that manifest.json and tags.json share: every change of one byte is refused.

One test for both documents, since they are one format (canonical JSON carrying a checksum of itself): a checksum
that covered less than the document, a canonical form that let two spellings through, or a parse that fails with
something other than ckstore's typed errors shows up here for either.
"""

from __future__ import annotations

import pytest
from test_manifest import _signed, _valid_raw

import ckstore
from ckstore.format.chunks import ChunkedHash, chunk_count
from ckstore.format.hashing import hash_bytes
from ckstore.format.manifest import FileEntry, Manifest, parse_manifest
from ckstore.format.tags import TagEntry, dump_tags, parse_tags


def _chunked(size: int, chunk_size: int, seed: int) -> FileEntry:
    table = ChunkedHash("sha256", size, chunk_size, tuple(hash_bytes(bytes([seed, i]), "sha256").hexdigest[:64].encode()[:32] for i in range(chunk_count(size, chunk_size))))
    return FileEntry(size, table.root, table)


def _manifest_sha256() -> bytes:
    """A second manifest, format 2: SHA-256 chunk tables (one, two and three chunks of two chunk sizes), nested state with a tuple and bytes, no metrics."""
    return Manifest(
        step=2**40,
        created=0.5,
        files={f"opt.state.{i}.safetensors": _chunked(1 + i * (1 << 20), 1 << (20 + i % 2), i) for i in range(3)},
        state={"opt": {"$ck": "tuple", "items": [1, -2.5, None, True, "ünï"]}, "raw": {"$ck": "bytes", "base64": "AAE="}},
        metrics={},
        retention=None,
    ).to_json()


#: (parser, document): each document is changed at every byte to every other value.
DOCUMENTS = {
    "manifest": (parse_manifest, _signed(_valid_raw())),
    "manifest-sha256": (parse_manifest, _manifest_sha256()),
    # A time written with an exponent (1e-05) is one byte away from a number too large for a float (1e905).
    "tags": (parse_tags, dump_tags({"release": TagEntry(1200, 1764100100.5), "v1.0": TagEntry(3, 1e-05)})),
    "tags-many": (parse_tags, dump_tags({f"t{i}@v{i}": TagEntry(i, 1764100000.0 + i / 8) for i in range(12)})),
}


@pytest.mark.guarantee("G3")
@pytest.mark.parametrize("kind", sorted(DOCUMENTS))
def test_every_single_byte_change_is_refused(kind):
    """Every byte replaced by every other value (every bit flip among them) is refused with ManifestError or
    IntegrityError; any other exception escapes and fails the test."""
    parse, document = DOCUMENTS[kind]
    parse(document)  # the untouched document is fine
    accepted = []
    for position in range(len(document)):
        for value in range(256):
            if value == document[position]:
                continue
            mutated = bytearray(document)
            mutated[position] = value
            try:
                parse(bytes(mutated))
            except (ckstore.ManifestError, ckstore.IntegrityError):
                continue
            accepted.append((position, value, bytes(mutated[max(0, position - 10) : position + 10])))
    assert accepted == []
