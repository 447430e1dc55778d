"""DCP's ``Metadata`` as canonical JSON, never pickle.

PyTorch's ``FileSystemWriter`` pickles ``Metadata`` into ``.metadata``; loading
such a file runs arbitrary code from whoever wrote it. ckstore writes the same
information as JSON inside the checkpoint's (checksummed) manifest, and reads
it back through fixed tables (dtype, layout and memory-format names), so a
crafted manifest can name only what these tables hold.

Shape of the document (``format_version`` 2)::

    {"format": "ckstore.dcp-metadata", "format_version": 2, "version": "1.0.0",
     "tensors": {"model.0.weight": {"dtype": "float32", "layout": "strided", "requires_grad": false,
                 "memory_format": "contiguous_format", "pin_memory": false, "size": [5, 6],
                 "chunks": [{"offsets": [0, 0], "sizes": [5, 6],
                             "storage": {"file": "rank-00000.safetensors", "offset": 296,
                                         "length": 120, "hash": "blake3:...", "dtype": "F32"}}]}},
     "bytes": {"extra.name": {"encoding": "ckstore-json", "storage": {...}}},
     "planner_data": <tagged JSON>, "storage_meta": {...} | null}

Each saved chunk carries its own ``storage`` (where its bytes are and their
hash), so a rank that reads only some chunks verifies only those bytes. A
bytes item (a non-tensor value) names its ``encoding``: ``ckstore-json``
(``ckstore.distributed.values``). Version 1 documents, written before
values were JSON, have no ``encoding``: their bytes items are DCP's pickles,
which ``StoreReader`` loads only under ``torch.load(weights_only=True)``.
``planner_data`` is free-form in DCP; ckstore stores JSON values plus tuples
(``{"$tuple": [...]}``) and non-string dict keys (``{"$dict": [[k, v], ...]}``),
which covers DCP's default planners, and refuses anything else when saving.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from ..errors import ManifestError, StateError
from ..format.hashing import HashInfo
from ..format.manifest import check_file_name
from ..format.skeleton import TORCH_DTYPES

FORMAT = "ckstore.dcp-metadata"
FORMAT_VERSION = 2
#: Versions this module reads: 1 (bytes items pickled by DCP), 2 (bytes items carry their encoding).
READABLE_VERSIONS = (1, 2)
#: The one encoding a version 2 bytes item may name (``ckstore.distributed.values.ENCODING``).
VALUE_ENCODING = "ckstore-json"

_LAYOUTS = {str(v).removeprefix("torch."): v for v in (torch.strided, torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)}
_MEMORY_FORMATS = {
    str(v).removeprefix("torch."): v for v in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d, torch.preserve_format)
}
_DTYPE_NAME = {dtype: name for name, dtype in TORCH_DTYPES.items()}
# safetensors dtype codes this module writes (the bytes' element type; see ckstore.format.safetensors)
_ST_CODE = re.compile(r"^[A-Z0-9_]{1,16}$")


@dataclass(frozen=True)
class ChunkStorage:
    """Where one saved chunk's bytes are: a file of the checkpoint, a byte range, and the range's hash."""

    file: str
    offset: int
    length: int
    hash: str
    dtype: str  # the safetensors code of the bytes' element type ("U8" for a bytes item)
    #: For a bytes item: how its bytes encode the value (``VALUE_ENCODING``); None for a tensor chunk and a version 1 bytes item.
    encoding: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "file": self.file, "hash": self.hash, "length": self.length, "offset": self.offset}


def metadata_to_json(metadata: Metadata) -> str:
    """Canonical JSON text of ``metadata``, whose ``storage_data`` maps each index to a :class:`ChunkStorage`."""
    storage = metadata.storage_data or {}
    tensors: dict[str, Any] = {}
    blobs: dict[str, Any] = {}
    for fqn, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, BytesStorageMetadata):
            chunk = _storage_of(storage, MetadataIndex(fqn))
            if chunk.encoding != VALUE_ENCODING:
                raise StateError(f"{fqn}: a non-tensor value was not written as {VALUE_ENCODING} (got {chunk.encoding!r})", key=fqn)
            blobs[fqn] = {"encoding": chunk.encoding, "storage": chunk.to_json()}
            continue
        props = entry.properties
        tensors[fqn] = {
            "chunks": [
                {
                    "offsets": list(chunk.offsets),
                    "sizes": list(chunk.sizes),
                    "storage": _storage_of(storage, MetadataIndex(fqn, chunk.offsets)).to_json(),
                }
                for chunk in entry.chunks
            ],
            "dtype": _DTYPE_NAME[props.dtype],
            "layout": str(props.layout).removeprefix("torch."),
            "memory_format": str(props.memory_format).removeprefix("torch."),
            "pin_memory": bool(props.pin_memory),
            "requires_grad": bool(props.requires_grad),
            "size": list(entry.size),
        }
    meta = metadata.storage_meta
    doc = {
        "bytes": blobs,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "planner_data": _tag(metadata.planner_data, "planner_data"),
        "storage_meta": None
        if meta is None
        else {
            "checkpoint_id": None if meta.checkpoint_id is None else str(meta.checkpoint_id),
            "load_id": meta.load_id,
            "modules": list(meta.modules),
            "save_id": meta.save_id,
        },
        "tensors": tensors,
        "version": metadata.version,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _storage_of(storage: dict, index: MetadataIndex) -> ChunkStorage:
    found = storage.get(index)
    if not isinstance(found, ChunkStorage):
        raise StateError(f"{index.fqn}: no bytes were written for chunk {list(index.offset or ())} (a rank's write result is missing)", key=index.fqn)
    return found


def _tag(value: Any, where: str) -> Any:
    """JSON for planner data: JSON values, tuples and dicts with non-string keys tagged; anything else refused."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise StateError(f"{where}: non-finite float {value} in DCP planner data", key=where)
        return value
    if isinstance(value, tuple):
        return {"$tuple": [_tag(v, where) for v in value]}
    if isinstance(value, list):
        return [_tag(v, where) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _tag(v, f"{where}.{k}") for k, v in value.items()}
        return {"$dict": [[_tag(k, where), _tag(v, where)] for k, v in value.items()]}
    raise StateError(
        f"{where}: DCP planner data holds a {type(value).__name__}, which ckstore does not serialise (it stores JSON, never pickle)", key=where
    )


def _untag(value: Any, where: str) -> Any:
    if isinstance(value, list):
        return [_untag(v, where) for v in value]
    if isinstance(value, dict):
        if set(value) == {"$tuple"} and isinstance(value["$tuple"], list):
            return tuple(_untag(v, where) for v in value["$tuple"])
        if set(value) == {"$dict"} and isinstance(value["$dict"], list):
            out = {}
            for pair in value["$dict"]:
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise ManifestError(f"{where}: malformed $dict entry", path=where)
                key = _untag(pair[0], where)
                try:
                    out[key] = _untag(pair[1], where)
                except TypeError:  # an unhashable key
                    raise ManifestError(f"{where}: unhashable $dict key", path=where) from None
            return out
        if any(k.startswith("$") for k in value):
            raise ManifestError(f"{where}: unknown tag in planner data {sorted(value)[:3]}", path=where)
        return {k: _untag(v, where) for k, v in value.items()}
    return value


def metadata_from_json(text: str, *, path: str = "manifest.json", files: dict[str, int] | None = None) -> Metadata:
    """Rebuild DCP ``Metadata`` from :func:`metadata_to_json` text; ManifestError for anything malformed.

    ``files`` (name -> size, from the manifest) bounds every chunk's byte range to a listed file.
    """

    def bad(reason: str) -> ManifestError:
        return ManifestError(f"{path}: DCP metadata: {reason}", path=path)

    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise bad(f"not JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad("not a ckstore DCP metadata document")
    version_read = doc.get("format_version")
    if type(version_read) is not int or version_read not in READABLE_VERSIONS:
        raise bad(f"unsupported format_version {version_read!r}; this ckstore reads {list(READABLE_VERSIONS)}")
    if set(doc) != {"bytes", "format", "format_version", "planner_data", "storage_meta", "tensors", "version"}:
        raise bad(f"unexpected fields {sorted(doc)[:8]}")

    def ints(value: Any, what: str) -> list[int]:
        if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
            raise bad(f"{what} must be a list of non-negative integers")
        return value

    def chunk_storage(raw: Any, what: str) -> ChunkStorage:
        if not isinstance(raw, dict) or set(raw) != {"dtype", "file", "hash", "length", "offset"}:
            raise bad(f"{what}: storage must have exactly dtype, file, hash, length, offset")
        check_file_name(raw["file"], path)
        if files is not None and raw["file"] not in files:
            raise bad(f"{what}: file {raw['file']!r} is not listed in the manifest")
        offset, length = raw["offset"], raw["length"]
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
            raise bad(f"{what}: offset and length must be non-negative integers")
        if files is not None and offset + length > files[raw["file"]]:
            raise bad(f"{what}: bytes {offset}..{offset + length} run past the end of {raw['file']} ({files[raw['file']]} bytes)")
        if not isinstance(raw["dtype"], str) or not _ST_CODE.fullmatch(raw["dtype"]):
            raise bad(f"{what}: malformed dtype code")
        try:
            HashInfo.parse(raw["hash"])
        except ManifestError as exc:
            raise bad(f"{what}: {exc}") from None
        return ChunkStorage(raw["file"], offset, length, raw["hash"], raw["dtype"])

    state: dict[str, Any] = {}
    storage: dict[MetadataIndex, ChunkStorage] = {}
    if not isinstance(doc["tensors"], dict) or not isinstance(doc["bytes"], dict):
        raise bad("tensors and bytes must be objects")
    for fqn, raw in doc["tensors"].items():
        keys = {"chunks", "dtype", "layout", "memory_format", "pin_memory", "requires_grad", "size"}
        if not isinstance(raw, dict) or set(raw) != keys:
            raise bad(f"tensor {fqn!r}: must have exactly {sorted(keys)}")
        try:
            props = TensorProperties(
                dtype=TORCH_DTYPES[raw["dtype"]],
                layout=_LAYOUTS[raw["layout"]],
                requires_grad=raw["requires_grad"] is True,
                memory_format=_MEMORY_FORMATS[raw["memory_format"]],
                pin_memory=raw["pin_memory"] is True,
            )
        except (KeyError, TypeError):
            raise bad(f"tensor {fqn!r}: unknown dtype, layout or memory format") from None
        size = ints(raw["size"], f"tensor {fqn!r} size")
        if not isinstance(raw["chunks"], list):
            raise bad(f"tensor {fqn!r}: chunks must be a list")
        chunks = []
        for i, chunk in enumerate(raw["chunks"]):
            what = f"tensor {fqn!r} chunk {i}"
            if not isinstance(chunk, dict) or set(chunk) != {"offsets", "sizes", "storage"}:
                raise bad(f"{what}: must have exactly offsets, sizes, storage")
            offsets, sizes = ints(chunk["offsets"], f"{what} offsets"), ints(chunk["sizes"], f"{what} sizes")
            if len(offsets) != len(size) or len(sizes) != len(size) or any(o + s > n for o, s, n in zip(offsets, sizes, size)):
                raise bad(f"{what}: does not lie inside the tensor's size {size}")
            cs = chunk_storage(chunk["storage"], what)
            if cs.length != math.prod(sizes) * props.dtype.itemsize:
                raise bad(f"{what}: {cs.length} bytes do not hold {sizes} of {raw['dtype']}")
            chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)))
            storage[MetadataIndex(fqn, offsets)] = cs
        state[fqn] = TensorStorageMetadata(properties=props, size=torch.Size(size), chunks=chunks)
    byte_fields = {"storage"} if version_read == 1 else {"encoding", "storage"}
    for fqn, raw in doc["bytes"].items():
        if fqn in state or not isinstance(raw, dict) or set(raw) != byte_fields:
            raise bad(f"bytes item {fqn!r}: must have exactly {sorted(byte_fields)} (and not also be a tensor)")
        if version_read > 1 and raw["encoding"] != VALUE_ENCODING:
            raise bad(f"bytes item {fqn!r}: unknown encoding {str(raw['encoding'])[:40]!r}")
        chunk = chunk_storage(raw["storage"], f"bytes item {fqn!r}")
        storage[MetadataIndex(fqn)] = dataclasses.replace(chunk, encoding=raw.get("encoding"))
        state[fqn] = BytesStorageMetadata()
    meta_raw = doc["storage_meta"]
    storage_meta = None
    if meta_raw is not None:
        if not isinstance(meta_raw, dict) or set(meta_raw) != {"checkpoint_id", "load_id", "modules", "save_id"}:
            raise bad("storage_meta is malformed")
        if not all(v is None or isinstance(v, str) for k, v in meta_raw.items() if k != "modules") or not (
            isinstance(meta_raw["modules"], list) and all(isinstance(m, str) for m in meta_raw["modules"])
        ):
            raise bad("storage_meta holds a non-string value")
        storage_meta = StorageMeta(
            checkpoint_id=meta_raw["checkpoint_id"], save_id=meta_raw["save_id"], load_id=meta_raw["load_id"], modules=list(meta_raw["modules"])
        )
    version = doc["version"]
    if version is not None and not isinstance(version, str):
        raise bad("version must be a string or null")
    return Metadata(
        state_dict_metadata=state,
        planner_data=_untag(doc["planner_data"], f"{path}: planner_data"),
        storage_data=storage,
        storage_meta=storage_meta,
        version=version,
    )
