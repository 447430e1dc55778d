"""The safetensors format: dtype codes, building and validating headers, tensors over a verified buffer. No I/O.

Layout (https://github.com/huggingface/safetensors): an 8-byte little-endian
header length ``N``, ``N`` bytes of JSON (``{key: {"dtype", "shape",
"data_offsets": [begin, end]}}`` plus an optional ``__metadata__`` of strings),
padded with spaces to a multiple of 8, then the tensors' bytes back to back.
Every file ckstore writes opens with the plain ``safetensors`` library.

ckstore writes the format itself rather than calling ``safetensors.save_file``
so that tensor bytes stream from the tensors' own memory to the disk (no second
copy of the state), are hashed as they go, and pass through the durability
module (``ckstore.engine.write``). The validator here is at least as strict as
safetensors (size caps, contiguous non-overlapping offsets, known dtypes,
shapes that match their byte ranges) and reports every violation as a typed
error. It is a pair: :func:`_bulk_specs` checks whole columns at once and
:func:`_entry_specs` names the first defect; a property test proves they
accept the same headers.
"""

from __future__ import annotations

import json
import math
import operator
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from typing import Any, NamedTuple

import torch

from ..errors import IntegrityError

if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
    raise ImportError("ckstore's tensor files are little-endian; big-endian hosts are not supported")

#: safetensors dtype names for each torch dtype ckstore stores.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
for _name, _code in (
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("complex64", "C64"),
    ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
):
    if hasattr(torch, _name):
        DTYPE_NAMES[getattr(torch, _name)] = _code
DTYPES_BY_NAME: dict[str, torch.dtype] = {v: k for k, v in DTYPE_NAMES.items()}
#: Bytes per element of each dtype (a dict lookup: headers may list 10,000s of tensors).
ITEMSIZE: dict[torch.dtype, int] = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in DTYPE_NAMES}

#: safetensors refuses headers above this size; so do we.
MAX_HEADER_SIZE = 100_000_000


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor in row-major order, without a copy when it is already contiguous."""
    if tensor.numel() == 0:
        return memoryview(b"")
    flat = tensor.reshape(-1)
    if flat.stride(0) != 1:  # a single element with any stride counts as contiguous; view() needs stride 1
        flat = flat.clone(memory_format=torch.contiguous_format)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def build_header(entries: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus the JSON header, padded with spaces to a multiple of 8."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for key, tensor in entries:
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class TensorSpec(NamedTuple):
    """One header entry, validated. A named tuple: a header may list 10,000s of them."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # offset in the data section
    end: int


def header_error(path: str, reason: str) -> IntegrityError:
    """The one error every header defect raises, naming the file and the defect."""
    return IntegrityError(f"{path}: not a valid safetensors file: {reason}", path=path, expected="safetensors header", actual=reason)


def parse_header(data: bytes | bytearray | memoryview, file_size: int, path: str) -> tuple[dict[str, TensorSpec], int]:
    """Validate a safetensors header; return the tensors in the order of their data, and the offset where data starts.

    ``data`` holds at least the first ``8 + N`` bytes of the file. Every defect
    raises :class:`IntegrityError` naming ``path``. The entries are checked a
    column at a time (every dtype, every shape, every offset) by
    :func:`_bulk_specs`; a header those checks refuse is examined entry by
    entry by :func:`_entry_specs`, which names the defect. Both accept exactly
    the same headers.
    """

    def bad(reason: str) -> IntegrityError:
        return header_error(path, reason)

    if file_size < 8 or len(data) < 8:
        raise bad("shorter than the 8-byte header length")
    (size,) = struct.unpack_from("<Q", data, 0)
    if size > MAX_HEADER_SIZE:
        raise bad(f"header length {size} exceeds {MAX_HEADER_SIZE}")
    if 8 + size > file_size or 8 + size > len(data):
        raise bad(f"header length {size} runs past the end of the file ({file_size} bytes)")
    try:
        header = json.loads(bytes(data[8 : 8 + size]).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # ValueError also covers ints of more than 4300 digits
        raise bad(f"header is not JSON ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_size = file_size - 8 - size
    specs = _bulk_specs(header, data_size)
    if specs is None:
        specs = _entry_specs(header, data_size, bad)
    return specs, 8 + size


_ENTRY_FIELDS = operator.itemgetter("dtype", "shape", "data_offsets")


def _bulk_specs(header: dict[str, Any], data_size: int) -> dict[str, TensorSpec] | None:
    """The specs of a valid header in data order, or None if any check fails.

    The same checks as :func:`_entry_specs`, each run over a whole column with
    C-level builtins (``map``, ``set``, list comparisons) instead of a Python
    loop per entry, which made validation cost several times the JSON parse
    of a 10,000-tensor header.
    """
    if "__metadata__" in header:
        header = dict(header)
        metadata = header.pop("__metadata__")
        if type(metadata) is not dict or not set(map(type, metadata.values())) <= {str}:
            return None
    if not header:
        return {} if data_size == 0 else None
    entries = list(header.values())
    if set(map(type, entries)) != {dict} or set(map(len, entries)) != {3}:
        return None
    try:
        names, shapes, offsets = zip(*map(_ENTRY_FIELDS, entries))
    except KeyError:  # three fields, but not these three
        return None
    if set(map(type, names)) != {str} or set(map(type, shapes)) != {list} or set(map(type, offsets)) != {list}:
        return None
    dtypes = list(map(DTYPES_BY_NAME.get, names))
    if None in dtypes or set(map(len, offsets)) != {2}:
        return None
    dims = list(chain.from_iterable(shapes))
    bounds = list(chain.from_iterable(offsets))
    if not set(map(type, dims)) <= {int} or set(map(type, bounds)) != {int} or min(dims, default=0) < 0 or min(bounds) < 0:
        return None
    begins, ends = bounds[0::2], bounds[1::2]
    # Sizes are non-negative, so equal sizes also mean that no range ends before it begins.
    counts = list(map(math.prod, shapes))
    if list(map(operator.sub, ends, begins)) != list(map(operator.mul, counts, map(ITEMSIZE.__getitem__, dtypes))):
        return None
    # A tensor with data has every dimension and its element count bounded by the file; an empty
    # one ([0, 2**70]) does not, and torch cannot even build it: check those.
    if 0 in counts and not all(_fits_int64(shape) for shape, count in zip(shapes, counts) if count == 0):
        return None
    keys = list(header)
    if not _chained(begins, ends, data_size):
        # Not in data order (ckstore writes in data order; other writers may not).
        order = sorted(range(len(keys)), key=list(zip(begins, ends)).__getitem__)
        keys, dtypes, shapes, begins, ends = ([column[i] for i in order] for column in (keys, dtypes, shapes, begins, ends))
        if not _chained(begins, ends, data_size):
            return None
    return dict(zip(keys, map(TensorSpec, dtypes, map(tuple, shapes), begins, ends)))


#: Every dimension, and the element count with empty dimensions taken as 1 (what torch computes strides from), must fit in int64.
_INT64_MAX = (1 << 63) - 1


def _fits_int64(shape: list[int]) -> bool:
    product = 1
    for d in shape:  # stops at the first overflow: a crafted shape of huge dimensions costs no bignum product
        product *= d or 1
        if product > _INT64_MAX:
            return False
    return True


def _chained(begins: list[int], ends: list[int], data_size: int) -> bool:
    """Whether the byte ranges, in this order, tile the data section: no gap, no overlap, nothing left over."""
    return begins[0] == 0 and begins[1:] == ends[:-1] and ends[-1] == data_size


def _entry_specs(header: dict[str, Any], data_size: int, bad: Callable[[str], IntegrityError]) -> dict[str, TensorSpec]:
    """Check a header entry by entry and raise ``bad`` naming the first defect; the specs in data order if there is none."""
    specs: dict[str, TensorSpec] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in entry.items()):
                raise bad("__metadata__ must map strings to strings")
            continue
        specs[key] = _entry_spec(key, entry, bad)
    ordered = sorted(specs.items(), key=lambda item: (item[1].begin, item[1].end))
    position = 0
    for key, spec in ordered:
        if spec.begin != position:
            raise bad(f"tensor {key[:80]!r}: data starts at {spec.begin}, expected {position} (gap or overlap)")
        position = spec.end
    if position != data_size:
        raise bad(f"tensors cover {position} data bytes but the file holds {data_size}")
    return dict(ordered)


def _entry_spec(key: str, entry: Any, bad: Callable[[str], IntegrityError]) -> TensorSpec:
    """One tensor's entry, checked on its own (fields, dtype, shape, a byte range that holds them); ``bad`` names a defect."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"tensor {key[:80]!r}: entry must have exactly dtype, shape, data_offsets")
    dtype = DTYPES_BY_NAME.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise bad(f"tensor {key[:80]!r}: unknown dtype {str(entry['dtype'])[:20]!r}")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"tensor {key[:80]!r}: shape must be a list of non-negative integers")
    offsets = entry["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets):
        raise bad(f"tensor {key[:80]!r}: data_offsets must be two non-negative integers")
    if not _fits_int64(shape):
        raise bad(f"tensor {key[:80]!r}: shape {str(shape)[:80]} does not fit in 64-bit sizes")
    begin, end = offsets
    nbytes = math.prod(shape) * ITEMSIZE[dtype]
    if end < begin or end - begin != nbytes:
        raise bad(f"tensor {key[:80]!r}: byte range {begin}..{end} does not hold shape {shape} of {entry['dtype']}")
    return TensorSpec(dtype, tuple(shape), begin, end)


def one_spec(head: bytes, size: int, key: str, path: str) -> tuple[TensorSpec, int]:
    """Validate the header's JSON and one entry only (see ``engine.read.read_one_tensor``); return its spec and the data offset.

    ``head`` is the 8-byte length plus the JSON, whose length was checked
    against the file's ``size``. The entry gets the checks :func:`_entry_specs`
    gives every entry, plus one the tiling check would otherwise imply: its
    byte range lies inside the file.
    """

    def bad(reason: str) -> IntegrityError:
        return header_error(path, reason)

    (length,) = struct.unpack_from("<Q", head, 0)
    try:
        header = json.loads(head[8 : 8 + length].decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise bad(f"header is not JSON ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    entry = header.get(key) if key != "__metadata__" else None
    if entry is None:
        raise IntegrityError(f"{path}: no tensor {key!r} in this file", path=path, expected=key, actual="missing")
    spec = _entry_spec(key, entry, bad)
    if 8 + length + spec.end > size:
        raise bad(f"tensor {key[:80]!r}: byte range {spec.begin}..{spec.end} does not lie inside the file")
    return spec, 8 + length


def tensors_from_buffer(buffer: bytearray, path: str, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Build tensors that share ``buffer``'s memory from a verified file's bytes."""
    specs, start = parse_header(buffer, len(buffer), path)
    wanted = specs.keys() if keys is None else keys
    out: dict[str, torch.Tensor] = {}
    for key in wanted:
        spec = specs.get(key)
        if spec is None:
            raise IntegrityError(f"{path}: tensor {key!r} named by the manifest is not in the file", path=path, expected=key, actual="missing")
        out[key] = _tensor_at(buffer, start, spec)
    return out


def _tensor_at(buffer: bytearray, start: int, spec: TensorSpec) -> torch.Tensor:
    count = spec.end - spec.begin
    if count == 0:
        return torch.empty(spec.shape, dtype=spec.dtype)
    offset = start + spec.begin
    itemsize = torch.empty((), dtype=spec.dtype).element_size()
    if offset % itemsize:
        # Unaligned element data: copy into an aligned allocation of its own.
        raw = torch.frombuffer(buffer, dtype=torch.uint8, count=count, offset=offset).clone()
        return raw.view(spec.dtype).reshape(spec.shape)
    return torch.frombuffer(buffer, dtype=spec.dtype, count=count // itemsize, offset=offset).reshape(spec.shape)
