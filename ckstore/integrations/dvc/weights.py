"""A published name's weights at a stable path, and weights-only publishing.

A checkpoint groups its tensors into files by where they sit in the state
(``model.encoder.safetensors``, ``optimizer.state.safetensors``) with keys that
carry the state path (``model/encoder.layer.0.weight``), inside a directory
named after the step. A consumer wants one file at one path for every version.
So when the published checkpoint's state has the weights entry (``"model"``,
the key the integrations and ``ckstore export`` use), the publish rewrites it:

* the tensors of ``state["model"]`` go into one ``model.safetensors`` in the
  checkpoint directory, keyed by their state-dict names (``encoder.layer.0.weight``)
  with ``{"format": "pt"}`` metadata, as ``save_pretrained`` writes; a tensor
  stored once for two names (tied weights) stays stored once, under the first name;
* the manifest's references point into it (everything else is unchanged), so
  the published directory is still a one-checkpoint store that loads into the
  same objects, and is verified like any other;
* ``<dest>/<name>/model.safetensors`` is a hard link to that file: the stable
  path (``dvc.api.open("models/best/model.safetensors", rev="best@v2.0.0")``).
  DVC stores content by md5, so both paths are one object in its cache and
  remote; ``ckstore pull`` links them again.

``weights_only=True`` (``--weights-only``) also drops every other top-level
entry that holds tensors (optimizer, scaler, RNG state) and their files;
entries without tensors (configuration, counters) stay. A state without a
``"model"`` entry is published as it is (no stable path), and refused with
``weights_only``.

The copy streams tensor bytes from the (just verified) checkpoint files, a
chunk at a time, hashing as it writes: memory stays small whatever the model's
size. What is lost: a frozen part of the model no longer has a byte-identical
file of its own across published versions, so DVC stores the weights file anew
for each version.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from typing import Any

from ...errors import InvalidArgumentError, ManifestError
from ...format.chunks import DEFAULT_CHUNK_SIZE, ChunkedHash, ChunkStreamHasher
from ...format.hashing import HashInfo, new_hasher
from ...format.manifest import MANIFEST_NAME, FileEntry, Manifest, parse_manifest
from ...format.skeleton import MARK
from ...storage import durable as _durable

WEIGHTS_KEY = "model"
WEIGHTS_FILE = "model.safetensors"
_CHUNK = 8 << 20


def top_level(state: Any) -> dict[str, Any] | None:
    """The top-level entries of a state skeleton by name, or None when it is not a dict with string keys."""
    if isinstance(state, dict) and state.get(MARK) == "dict" and isinstance(state.get("items"), list):
        pairs = state["items"]
        if all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in pairs):
            return {k: v for k, v in pairs}
        return None
    if isinstance(state, dict) and MARK not in state:
        return dict(state)
    return None


def _refs(node: Any) -> Iterator[dict[str, Any]]:
    """Every tensor reference under ``node``, in document order."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            if item.get(MARK) == "tensor":
                yield item
            else:
                stack.extend(reversed(list(item.values())))


def rewrite(tmp: str, step_dir: str, manifest: Manifest, *, weights_only: bool) -> Manifest | None:
    """Put ``state["model"]``'s tensors of the materialized checkpoint ``step_dir`` into one file (see the module docstring).

    ``tmp`` is the publish's temporary directory (the future ``<dest>/<name>``):
    the stable hard link goes there. Returns the new manifest, None when the
    state has no weights entry (and ``weights_only`` is off).
    """
    entries = top_level(manifest.state)
    weights = None if entries is None else entries.get(WEIGHTS_KEY)
    refs = list(_refs(weights)) if weights is not None else []
    if not refs:
        if weights_only:
            keys = sorted(entries) if entries is not None else "not a dict"
            raise InvalidArgumentError(
                f"weights_only: checkpoint {manifest.step} has no {WEIGHTS_KEY!r} entry holding tensors "
                f"(top-level keys: {keys}); save the model as state[{WEIGHTS_KEY!r}]"
            )
        return None
    state = json.loads(json.dumps(manifest.state))  # a copy to rewrite
    entries = top_level(state)
    assert entries is not None
    if weights_only:
        kept = [(k, v) for k, v in entries.items() if k == WEIGHTS_KEY or not any(True for _ in _refs(v))]
        if isinstance(state, dict) and state.get(MARK) == "dict":
            state["items"] = [[k, v] for k, v in kept]
        else:
            state = dict(kept)
        entries = dict(kept)
    # Unique (file, key) pairs in order: a tied weight is one pair referenced twice.
    sources: dict[tuple[str, str], str] = {}
    names: set[str] = set()
    for ref in _refs(entries[WEIGHTS_KEY]):
        pair = (ref["file"], ref["key"])
        if pair not in sources:
            key = ref["key"]
            name = (key[len(WEIGHTS_KEY) + 1 :] if key.startswith(WEIGHTS_KEY + "/") else key).replace("/", ".")
            if name in names or not name:
                raise ManifestError(f"checkpoint {manifest.step}: two tensors of {WEIGHTS_KEY!r} would be named {name!r} in {WEIGHTS_FILE}")
            names.add(name)
            sources[pair] = name
        ref["file"], ref["key"] = WEIGHTS_FILE, sources[pair]
    others = {ref["file"] for k, v in entries.items() if k != WEIGHTS_KEY for ref in _refs(v)}
    if WEIGHTS_FILE in others:
        raise ManifestError(f"checkpoint {manifest.step}: {WEIGHTS_FILE} also holds tensors outside {WEIGHTS_KEY!r}; cannot rewrite it")
    algo = manifest.files[next(iter(sources))[0]].hash.algo
    staged = os.path.join(tmp, WEIGHTS_FILE)
    # The rewritten manifest keeps the checkpoint's format: the files it keeps carry their entries as they are.
    chunked = manifest.format_version == 2
    size, digest, table = _write(staged, step_dir, sources, algo, chunked=chunked)
    files = {name: entry for name, entry in manifest.files.items() if name in others}
    files[WEIGHTS_FILE] = FileEntry(size=size, hash=HashInfo(algo, digest), chunks=table)
    new = Manifest(
        step=manifest.step,
        created=manifest.created,
        files=files,
        state=state,
        metrics=manifest.metrics,
        retention=manifest.retention,
        format_version=manifest.format_version,
    )
    data = new.to_json()
    parse_manifest(data)  # the rewritten skeleton passes the reader's checks, or nothing is published
    # Hard links to the source store's files: unlinked, never written (the store's copies stay as they are).
    for name in [*manifest.files, MANIFEST_NAME]:
        if name not in files:
            _durable.unlink(os.path.join(step_dir, name), site="publish_weights")
    link_or_copy(staged, os.path.join(step_dir, WEIGHTS_FILE), site="publish_weights")
    with _durable.create(os.path.join(step_dir, MANIFEST_NAME), site="publish_weights") as out:
        out.write(data)
        out.sync()
    return new


def _write(
    path: str, step_dir: str, sources: dict[tuple[str, str], str], algo: str, *, chunked: bool
) -> tuple[int, str, ChunkedHash | None]:
    """Write the safetensors file ``path`` from byte ranges of the checkpoint's files; its size, hex digest and (format 2) chunk table."""
    from ...format.safetensors import parse_header

    headers: dict[str, tuple[dict[str, Any], int, Any]] = {}
    for file, _ in sources:
        if file not in headers:
            headers[file] = _read_header(os.path.join(step_dir, file), parse_header)
    layout: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for (file, key), name in sources.items():
        raw, _, specs = headers[file]
        spec = specs[key] if key in specs else None
        if spec is None or key not in raw:
            raise ManifestError(f"{os.path.join(step_dir, file)}: has no tensor {key!r} the manifest names", path=os.path.join(step_dir, file))
        length = spec.end - spec.begin
        layout[name] = {"dtype": raw[key]["dtype"], "shape": raw[key]["shape"], "data_offsets": [offset, offset + length]}
        offset += length
    header = json.dumps(layout, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)  # safetensors pads its header to 8 bytes
    hasher: Any = ChunkStreamHasher(algo, DEFAULT_CHUNK_SIZE) if chunked else new_hasher(algo)
    with _durable.create(path, site="publish_weights") as out:
        for piece in (struct.pack("<Q", len(header)), header):
            out.write(piece)
            hasher.update(piece)
        for (file, key), _ in sources.items():
            _, start, specs = headers[file]
            spec = specs[key]
            with open(os.path.join(step_dir, file), "rb") as src:
                src.seek(start + spec.begin)
                left = spec.end - spec.begin
                while left:
                    chunk = src.read(min(_CHUNK, left))
                    if not chunk:
                        raise ManifestError(f"{os.path.join(step_dir, file)}: shorter than its header says", path=os.path.join(step_dir, file))
                    out.write(chunk)
                    hasher.update(chunk)
                    left -= len(chunk)
        out.sync()
        size = out.offset
    return size, hasher.hexdigest(), hasher.table() if chunked else None


def _read_header(path: str, parse_header: Any) -> tuple[dict[str, Any], int, Any]:
    """(raw header JSON, data start, validated specs) of a safetensors file."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        (length,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
        data = head + fh.read(min(length, 100 << 20))
    specs, start = parse_header(data, size, path)  # IntegrityError for anything malformed
    raw = json.loads(data[8:start])
    return raw, start, specs


def link_or_copy(src: str, dst: str, *, site: str) -> None:
    """Hard-link ``src`` to ``dst`` (one copy on disk); copy and fsync it where the filesystem has no hard links."""
    try:
        _durable.link(src, dst, site=site)
        return
    except OSError:
        pass  # EXDEV, EPERM: FAT, some FUSE and network filesystems
    with open(src, "rb") as source, _durable.create(dst, site=site) as out:
        while chunk := source.read(_CHUNK):
            out.write(chunk)
        out.sync()
