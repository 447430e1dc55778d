"""Tensor files in the safetensors format: streamed writes, strict verified reads.

Layout (https://github.com/huggingface/safetensors): an 8-byte little-endian
header length ``N``, ``N`` bytes of JSON (``{key: {"dtype", "shape",
"data_offsets": [begin, end]}}`` plus an optional ``__metadata__`` of strings),
padded with spaces to a multiple of 8, then the tensors' bytes back to back.
Every file ckstore writes opens with the plain ``safetensors`` library.

ckstore writes the format itself rather than calling ``safetensors.save_file``
so that tensor bytes stream from the tensors' own memory to the disk (no second
copy of the state), are hashed as they go, and pass through the durability
module. The reader validates the header at least as strictly as safetensors
does (size caps, contiguous non-overlapping offsets, known dtypes, shapes that
match their byte ranges) and reports every violation as a typed error.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from . import _durable
from ._errors import IntegrityError, StateError
from ._hashing import HashInfo, new_hasher

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

#: safetensors refuses headers above this size; so do we.
MAX_HEADER_SIZE = 100_000_000
#: Small tensors are gathered into buffers of this size before a write.
_COALESCE = 8 << 20
_READ_CHUNK = 16 << 20


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor in row-major order, without a copy when it is already contiguous."""
    if tensor.numel() == 0:
        return memoryview(b"")
    flat = tensor.reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def prepare_tensor(tensor: torch.Tensor, key: str) -> torch.Tensor:
    """A detached, dense, contiguous CPU tensor with the same values, or a StateError naming ``key``."""
    if tensor.layout != torch.strided:
        raise StateError(f"{key}: {tensor.layout} tensors are not supported; convert with .to_dense()", key=key)
    if tensor.is_quantized:
        raise StateError(f"{key}: quantized tensors are not supported", key=key)
    if tensor.dtype not in DTYPE_NAMES:
        raise StateError(f"{key}: dtype {tensor.dtype} has no safetensors encoding", key=key)
    tensor = tensor.detach()
    if tensor.is_conj():
        tensor = tensor.resolve_conj()
    if tensor.is_neg():
        tensor = tensor.resolve_neg()
    if tensor.device.type != "cpu":
        tensor = tensor.to("cpu")
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return tensor


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


@dataclass(frozen=True)
class WrittenFile:
    size: int
    hash: HashInfo


def write_tensor_file(
    path: str | os.PathLike[str],
    entries: Sequence[tuple[str, torch.Tensor]],
    *,
    algo: str,
    hash_pool: ThreadPoolExecutor | None = None,
) -> WrittenFile:
    """Write ``entries`` (prepared CPU tensors) to a new file, fsync it, and return its size and hash.

    Hashing runs in ``hash_pool`` (one worker, so chunks are hashed in order)
    while the next chunk is written; both release the GIL on large buffers.
    """
    hasher = new_hasher(algo)
    pending = []

    def feed(chunk: memoryview | bytes) -> None:
        if hash_pool is None:
            hasher.update(chunk)
        else:
            pending.append(hash_pool.submit(hasher.update, chunk))

    writer = _durable.FileWriter(path, site="tensor_file")
    try:
        head = build_header(entries)
        buffer = bytearray(head)
        for _, tensor in entries:
            data = tensor_bytes(tensor)
            if len(buffer) + len(data) <= _COALESCE:
                buffer += data
                continue
            if buffer:
                # Hand the full buffer to the hasher and start a new one: the
                # old buffer is never mutated again while it is being hashed.
                chunk = memoryview(buffer)
                writer.write(chunk)
                feed(chunk)
                buffer = bytearray()
            if len(data) >= _COALESCE:
                writer.write(data)
                feed(data)
            else:
                buffer += data
        if buffer:
            writer.write(buffer)
            feed(memoryview(buffer))
        for future in pending:
            future.result()
        writer.sync()
    finally:
        writer.close()
    return WrittenFile(writer.offset, HashInfo(algo, hasher.hexdigest()))


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # offset in the data section
    end: int


def parse_header(data: bytes | bytearray | memoryview, file_size: int, path: str) -> tuple[dict[str, TensorSpec], int]:
    """Validate a safetensors header; return the tensors and the offset where data starts.

    ``data`` holds at least the first ``8 + N`` bytes of the file. Every defect
    raises :class:`IntegrityError` naming ``path``.
    """

    def bad(reason: str) -> IntegrityError:
        return IntegrityError(f"{path}: not a valid safetensors file: {reason}", path=path, expected="safetensors header", actual=reason)

    if file_size < 8 or len(data) < 8:
        raise bad("shorter than the 8-byte header length")
    (size,) = struct.unpack_from("<Q", data, 0)
    if size > MAX_HEADER_SIZE:
        raise bad(f"header length {size} exceeds {MAX_HEADER_SIZE}")
    if 8 + size > file_size or 8 + size > len(data):
        raise bad(f"header length {size} runs past the end of the file ({file_size} bytes)")
    try:
        header = json.loads(bytes(data[8 : 8 + size]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise bad(f"header is not JSON ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_size = file_size - 8 - size
    specs: dict[str, TensorSpec] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in entry.items()):
                raise bad("__metadata__ must map strings to strings")
            continue
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
        begin, end = offsets
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end < begin or end - begin != nbytes:
            raise bad(f"tensor {key[:80]!r}: byte range {begin}..{end} does not hold shape {shape} of {entry['dtype']}")
        specs[key] = TensorSpec(dtype, tuple(shape), begin, end)
    position = 0
    for key, spec in sorted(specs.items(), key=lambda item: (item[1].begin, item[1].end)):
        if spec.begin != position:
            raise bad(f"tensor {key[:80]!r}: data starts at {spec.begin}, expected {position} (gap or overlap)")
        position = spec.end
    if position != data_size:
        raise bad(f"tensors cover {position} data bytes but the file holds {data_size}")
    return specs, 8 + size


def open_regular(path: str) -> int:
    """Open an existing regular file for reading without following a symlink."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        import stat as _stat

        if not _stat.S_ISREG(os.fstat(fd).st_mode):
            raise IntegrityError(f"{path}: not a regular file", path=path, expected="regular file", actual="other")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_verified(path: str, *, size: int, expected: HashInfo | None) -> bytearray:
    """Read a whole file, checking its size and (unless ``expected`` is None) its hash.

    The bytes returned are the bytes hashed: nothing can change between the
    check and the use.
    """
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        raise IntegrityError(f"{path}: file listed in the manifest is missing", path=path, expected=size, actual="missing") from None
    except OSError as exc:
        raise IntegrityError(f"{path}: cannot open ({exc.strerror})", path=path, expected="readable file", actual=exc.strerror) from None
    try:
        actual_size = os.fstat(fd).st_size
        if actual_size != size:
            raise IntegrityError(f"{path}: size {actual_size} bytes, manifest says {size} (torn or altered file)", path=path, expected=size, actual=actual_size)
        buffer = bytearray(size)
        view = memoryview(buffer)
        hasher = new_hasher(expected.algo) if expected is not None else None
        done = 0
        while done < size:
            n = os.readv(fd, [view[done : done + _READ_CHUNK]])
            if n == 0:
                raise IntegrityError(f"{path}: file shrank while being read", path=path, expected=size, actual=done)
            if hasher is not None:
                hasher.update(view[done : done + n])
            done += n
    finally:
        os.close(fd)
    if hasher is not None and expected is not None:
        actual = HashInfo(expected.algo, hasher.hexdigest())
        if actual != expected:
            raise IntegrityError(f"{path}: content hash mismatch (expected {expected}, got {actual})", path=path, expected=str(expected), actual=str(actual))
    return buffer


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
