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

import contextlib
import errno
import json
import math
import mmap
import operator
import os
import queue
import struct
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from itertools import chain
from typing import Any, NamedTuple

import numpy as np
import torch

from ..storage import durable as _durable
from ..storage import safeio as _safeio
from ..errors import CheckpointReadError, CkstoreError, IntegrityError, StateError
from ..format.hashing import Hasher, HashInfo, new_hasher

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
_READ_CHUNK = 16 << 20
#: Finished files are fsynced in batches of this many: on ext4 every fsync of a
#: freshly written file commits the journal, which stalls the O_DIRECT writes of
#: the next file; one commit per batch (the later fsyncs find their inodes
#: committed) keeps the writes streaming. It also bounds the open descriptors.
_FSYNC_BATCH = 64
#: Copies at least this large go through numpy (GIL released), smaller ones through memoryview slices.
_NUMPY_COPY_MIN = 64 << 10


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor in row-major order, without a copy when it is already contiguous."""
    if tensor.numel() == 0:
        return memoryview(b"")
    flat = tensor.reshape(-1)
    if flat.stride(0) != 1:  # a single element with any stride counts as contiguous; view() needs stride 1
        flat = flat.clone(memory_format=torch.contiguous_format)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as a 1-d uint8 tensor (a view, no copy)."""
    flat = tensor.reshape(-1)
    if flat.stride(0) != 1:
        # A contiguous tensor with size-1 dimensions may carry any stride for
        # them (shape [1], stride [2]); its memory is still one dense run.
        flat = flat.as_strided((flat.numel(),), (1,))
    return flat.view(torch.uint8)


def check_tensor(tensor: torch.Tensor, key: str) -> torch.Tensor:
    """Validate a tensor for storage without copying it; return it detached.

    Used as is when a staging copy follows (async saves), which materialises
    non-contiguous, conjugate and negative views as ``prepare_tensor`` does.
    """
    if tensor.layout != torch.strided:
        raise StateError(f"{key}: {tensor.layout} tensors are not supported; convert with .to_dense()", key=key)
    if tensor.is_quantized:
        raise StateError(f"{key}: quantized tensors are not supported", key=key)
    if tensor.dtype not in DTYPE_NAMES:
        raise StateError(f"{key}: dtype {tensor.dtype} has no safetensors encoding", key=key)
    if tensor.is_meta:
        raise StateError(f"{key}: a meta tensor has a shape but no data to store", key=key)
    return tensor.detach()


def prepare_tensor(tensor: torch.Tensor, key: str) -> torch.Tensor:
    """A detached, dense, contiguous CPU tensor with the same values, or a StateError naming ``key``."""
    tensor = check_tensor(tensor, key)
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


class _Slot:
    """One page-aligned chunk buffer (an anonymous mmap), as bytes and as a NumPy array."""

    __slots__ = ("mm", "view", "array")

    def __init__(self, size: int) -> None:
        self.mm = mmap.mmap(-1, size)
        self.view = memoryview(self.mm)
        self.array = np.frombuffer(self.mm, dtype=np.uint8)


def _file_pieces(entries: Sequence[tuple[str, torch.Tensor]]) -> Iterator[bytes | torch.Tensor]:
    yield build_header(entries)
    for _, tensor in entries:
        if tensor.numel():
            yield tensor


class _Worker:
    """One daemon thread running submitted calls in order.

    Not a ThreadPoolExecutor: those refuse work once interpreter shutdown
    begins, which is exactly when the exit handler must let a background
    save finish.
    """

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._queue.put((future, fn, args))
        return future

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

    def shutdown(self) -> None:
        self._queue.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join()


class WritePipeline:
    """Streams tensor files to disk through reused aligned buffers: copy, then write and hash in parallel, then fsync.

    The calling thread copies tensor bytes into one of ``depth`` page-aligned
    chunk buffers of ``chunk`` bytes (many small tensors land in one buffer, so
    10,000 tensors cost a few dozen writes, not 10,000). A writer thread writes
    each buffer with ``O_DIRECT`` where the filesystem allows it while a hash
    thread hashes the same buffer; a sync thread fsyncs and closes finished
    files in batches (see :data:`_FSYNC_BATCH`), every one before this
    returns. A buffer is refilled only after both its write and its hash are
    finished.
    The buffers are allocated once and reused by every save, so a save adds
    at most ``depth * chunk`` bytes to the process's memory. Every system
    call runs outside the GIL, as does BLAKE3 on large buffers.
    """

    def __init__(self, *, chunk: int = 16 << 20, depth: int = 3, direct: bool = True) -> None:
        if chunk % _durable.DIRECT_ALIGN or depth < 2:
            raise ValueError("chunk must be a multiple of DIRECT_ALIGN and depth at least 2")
        self.chunk = chunk
        self.depth = depth
        self.direct = direct
        self._slots: list[_Slot] = []
        self._write = _Worker("ckstore-write")
        self._hash = _Worker("ckstore-hash")
        self._sync = _Worker("ckstore-sync")

    def close(self) -> None:
        for worker in (self._write, self._hash, self._sync):
            worker.shutdown()
        for slot in self._slots:
            slot.view.release()
        self._slots.clear()

    def hash_files(self, jobs: Sequence[Sequence[tuple[str, torch.Tensor]]], *, algo: str) -> list[WrittenFile]:
        """Size and hash of the files :meth:`write_files` would write for ``jobs``, without writing anything."""
        out = []
        for entries in jobs:
            hasher = new_hasher(algo)
            size = 0
            for piece in _file_pieces(entries):
                data = piece if isinstance(piece, bytes) else tensor_bytes(piece)
                hasher.update(data)
                size += len(data)
            out.append(WrittenFile(size, HashInfo(algo, hasher.hexdigest())))
        return out

    def write_files(
        self, jobs: Sequence[tuple[str, Sequence[tuple[str, torch.Tensor]]]], *, algo: str, check: Callable[[], None] | None = None
    ) -> list[WrittenFile]:
        """Write each ``(path, entries)`` as a new safetensors file, fsync and close it; return sizes and hashes.

        ``check`` is called before each buffer is filled; whatever it raises
        stops the write (a background save abandoned at exit). On any failure
        every thread is drained before the error propagates (no buffer is
        touched after return); the caller removes the partial files.
        """
        if not self._slots:
            self._slots = [_Slot(self.chunk) for _ in range(self.depth)]
        free = list(self._slots)
        inflight: deque[tuple[_Slot, Future, Future]] = deque()
        finished: list[tuple[_durable.FileWriter, Hasher]] = []
        unsynced: list[tuple[Future | None, _durable.FileWriter]] = []
        batches: list[Future] = []
        writers: list[_durable.FileWriter] = []

        def take() -> _Slot:
            if check is not None:
                check()
            if free:
                return free.pop()
            slot, wrote, hashed = inflight.popleft()
            wrote.result()
            hashed.result()
            return slot

        try:
            for path, entries in jobs:
                writer = _durable.create(path, site="tensor_file", direct=self.direct)
                writers.append(writer)
                hasher = new_hasher(algo)
                slot, fill, last = take(), 0, None
                for piece in _file_pieces(entries):
                    # A single-threaded memcpy (torch's copy_ would fan out to
                    # OpenMP threads that spin against the write and hash
                    # threads); numpy's releases the GIL on large copies, so
                    # the writer thread is never kept waiting for it.
                    source = np.frombuffer(piece, dtype=np.uint8) if isinstance(piece, bytes) else flat_bytes(piece).numpy()
                    total = len(source)
                    pos = 0
                    while pos < total:
                        n = min(total - pos, self.chunk - fill)
                        if n >= _NUMPY_COPY_MIN:
                            np.copyto(slot.array[fill : fill + n], source[pos : pos + n])
                        else:
                            slot.view[fill : fill + n] = memoryview(source[pos : pos + n])
                        fill += n
                        pos += n
                        if fill == self.chunk:
                            last = self._submit(writer, hasher, slot, fill, inflight)
                            slot, fill = take(), 0
                if fill:
                    last = self._submit(writer, hasher, slot, fill, inflight)
                else:
                    free.append(slot)
                finished.append((writer, hasher))
                unsynced.append((last, writer))
                if len(unsynced) >= _FSYNC_BATCH:
                    batches.append(self._sync.submit(_finish_files, unsynced))
                    unsynced = []
            if unsynced:
                batches.append(self._sync.submit(_finish_files, unsynced))
                unsynced = []
            while inflight:
                _, wrote, hashed = inflight.popleft()
                wrote.result()
                hashed.result()
            for batch in batches:
                batch.result()
        except BaseException:
            # Drain every thread before the caller sees the error: no buffer or
            # file may still be in use once we return.
            for _, wrote, hashed in inflight:
                futures_wait([wrote, hashed])
            futures_wait(batches)
            for writer in writers:
                with contextlib.suppress(OSError):
                    writer.close()
            raise
        return [WrittenFile(writer.offset, HashInfo(algo, hasher.hexdigest())) for writer, hasher in finished]

    def _submit(self, writer: _durable.FileWriter, hasher: Hasher, slot: _Slot, n: int, inflight: deque) -> Future:
        view = slot.view[:n]
        wrote = self._write.submit(_write_split, writer, view)
        hashed = self._hash.submit(hasher.update, view)
        inflight.append((slot, wrote, hashed))
        return wrote


def _write_split(writer: _durable.FileWriter, view: memoryview) -> None:
    # A file's last chunk is rarely a multiple of the alignment: write the
    # aligned part directly and only the short tail through the page cache.
    aligned = len(view) - len(view) % _durable.DIRECT_ALIGN
    if writer.direct and 0 < aligned < len(view):
        writer.write(view[:aligned])
        writer.write(view[aligned:])
    else:
        writer.write(view)


def _finish_files(batch: list[tuple[Future | None, _durable.FileWriter]]) -> None:
    """fsync and close each file once its last write is done; every file is closed, the first error raised."""
    error: BaseException | None = None
    for last_write, writer in batch:
        try:
            if last_write is not None:
                # The writes of one file run in order: the last done means all
                # done. Wait even after an error: a file is never closed under
                # a write still in flight.
                futures_wait([last_write])
                last_write.result()
            if error is None:
                writer.sync()
        except BaseException as exc:
            error = error or exc
        finally:
            writer.close()
    if error is not None:
        raise error


def write_tensor_file(
    path: str | os.PathLike[str],
    entries: Sequence[tuple[str, torch.Tensor]],
    *,
    algo: str,
    pipeline: WritePipeline | None = None,
) -> WrittenFile:
    """Write ``entries`` (prepared CPU tensors) to a new file, fsync it, and return its size and hash."""
    if pipeline is not None:
        return pipeline.write_files([(os.fspath(path), entries)], algo=algo)[0]
    own = WritePipeline(chunk=4 << 20, depth=2)
    try:
        return own.write_files([(os.fspath(path), entries)], algo=algo)[0]
    finally:
        own.close()


class TensorSpec(NamedTuple):
    """One header entry, validated. A named tuple: a header may list 10,000s of them."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # offset in the data section
    end: int


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
        specs[key] = TensorSpec(dtype, tuple(shape), begin, end)
    ordered = sorted(specs.items(), key=lambda item: (item[1].begin, item[1].end))
    position = 0
    for key, spec in ordered:
        if spec.begin != position:
            raise bad(f"tensor {key[:80]!r}: data starts at {spec.begin}, expected {position} (gap or overlap)")
        position = spec.end
    if position != data_size:
        raise bad(f"tensors cover {position} data bytes but the file holds {data_size}")
    return dict(ordered)


@contextlib.contextmanager
def _typed_reads(path: str) -> Iterator[None]:
    """Turn any OSError while reading ``path`` (EIO, EACCES, ...) into CheckpointReadError naming it,
    and a failed allocation of a tensor's memory into one with ENOMEM: loads fall back past both."""
    try:
        yield
    except CkstoreError:
        raise
    except OSError as exc:
        raise CheckpointReadError(f"{path}: read failed: {exc.strerror or exc}", path=path, errno=exc.errno) from None
    except MemoryError:
        raise CheckpointReadError(f"{path}: not enough memory to read this file", path=path, errno=errno.ENOMEM) from None


def _allocate(shape: tuple[int, ...] | int, dtype: torch.dtype, path: str, **kwargs: Any) -> torch.Tensor:
    try:
        return torch.empty(shape, dtype=dtype, **kwargs)
    except (RuntimeError, MemoryError) as exc:  # torch reports a failed allocation as RuntimeError
        raise CheckpointReadError(f"{path}: cannot allocate memory for {shape} {dtype}: {str(exc)[:120]}", path=path, errno=errno.ENOMEM) from None


def read_verified(path: str, *, size: int, expected: HashInfo | None) -> bytearray:
    """Read a whole file, checking its size and (unless ``expected`` is None) its hash.

    The bytes returned are the bytes hashed: nothing can change between the
    check and the use.
    """
    fd, _ = _open_checked(path, size)
    try:
        with _typed_reads(path):
            buffer = bytearray(size)
            view = memoryview(buffer)
            hasher = new_hasher(expected.algo) if expected is not None else None
            done = 0
            while done < size:
                n = _safeio.pread_into(fd, view[done : done + _READ_CHUNK], done, path)
                if n == 0:
                    raise IntegrityError(f"{path}: file shrank while being read", path=path, expected=size, actual=done)
                if hasher is not None:
                    hasher.update(view[done : done + n])
                done += n
    finally:
        os.close(fd)
    _check_hash(path, hasher, expected)
    return buffer


#: Verification hashes a file through one buffer of this size, whatever the file's size.
_VERIFY_CHUNK = 4 << 20


def verify_tensor_file(path: str, *, size: int, expected: HashInfo) -> dict[str, TensorSpec]:
    """Check a tensor file's size, header and hash in bounded memory; return its specs.

    What a load checks, without keeping the data: the header is read and
    validated (as a load does), then the whole file is hashed through one
    fixed buffer of :data:`_VERIFY_CHUNK` bytes.
    """
    fd, actual = _open_checked(path, size)
    try:
        with _typed_reads(path):
            _, specs, _ = _read_header(fd, actual, path)
            hasher = new_hasher(expected.algo)
            _hash_stream(fd, actual, path, hasher)
    finally:
        os.close(fd)
    _check_hash(path, hasher, expected)
    return specs


def _hash_stream(fd: int, size: int, path: str, hasher: Hasher) -> None:
    buffer = bytearray(min(_VERIFY_CHUNK, max(size, 1)))
    view = memoryview(buffer)
    offset = 0
    while offset < size:
        n = min(len(buffer), size - offset)
        _safeio.read_exact(fd, view[:n], offset, path)
        hasher.update(view[:n])
        offset += n


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


# ---------------------------------------------------------------- fast reads

#: preadv takes at most IOV_MAX (1024 on Linux) buffers per call.
_MAX_IOV = 512


_pread_exact = _safeio.read_exact

#: A file this large whose disk blocks cover less than half of it is hashed before any memory is allocated for it.
_SPARSE_MIN = 64 << 20


def _open_checked(path: str, size: int | None, expected: HashInfo | None = None) -> tuple[int, int]:
    """Open a checkpoint file for reading (``_safeio``: no symlink, no FIFO) and check its size against the manifest.

    With ``expected``, a large sparse file (its declared size mostly holes: a
    28 KB file claiming 8 GiB) is hashed first, through a fixed buffer, so a
    lying one is refused before its declared size is allocated.
    """
    try:
        fd, st = _safeio.open_regular(path)
    except FileNotFoundError:
        raise IntegrityError(f"{path}: file listed in the manifest is missing", path=path, expected=size, actual="missing") from None
    except _safeio.NotRegularFile as exc:
        raise IntegrityError(f"{path}: {exc.strerror}; refusing to read it", path=path, expected="regular file", actual=exc.kind) from None
    except OSError as exc:
        raise CheckpointReadError(f"{path}: cannot open: {exc.strerror or exc}", path=path, errno=exc.errno) from None
    try:
        actual = st.st_size
        if size is not None and actual != size:
            raise IntegrityError(f"{path}: size {actual} bytes, manifest says {size} (torn or altered file)", path=path, expected=size, actual=actual)
        if expected is not None and actual >= _SPARSE_MIN and st.st_blocks * 512 < actual // 2:
            hasher = new_hasher(expected.algo)
            with _typed_reads(path):
                _hash_stream(fd, actual, path, hasher)
            _check_hash(path, hasher, expected)
    except BaseException:
        os.close(fd)
        raise
    return fd, actual


def _read_header(fd: int, size: int, path: str) -> tuple[bytes, dict[str, TensorSpec], int]:
    """The raw header bytes (8-byte length + JSON), the validated specs and the data offset."""
    head = bytearray(8)
    if size < 8:
        parse_header(b"", size, path)  # raises the standard "too short" error
    _pread_exact(fd, memoryview(head), 0, path)
    (length,) = struct.unpack("<Q", head)
    if length <= MAX_HEADER_SIZE and 8 + length <= size:
        head += bytes(length)
        _pread_exact(fd, memoryview(head)[8:], 8, path)
    specs, start = parse_header(head, size, path)
    return bytes(head), specs, start


def _check_hash(path: str, hasher: Hasher | None, expected: HashInfo | None) -> None:
    if hasher is None or expected is None:
        return
    actual = HashInfo(expected.algo, hasher.hexdigest())
    if actual != expected:
        raise IntegrityError(f"{path}: content hash mismatch (expected {expected}, got {actual})", path=path, expected=str(expected), actual=str(actual))


def _update_all(hasher: Hasher, buffers: list[Any]) -> None:
    """Hash C-contiguous buffers in order; typed ones (NumPy arrays of float32 and so on) as their bytes."""
    for buffer in buffers:
        hasher.update(memoryview(buffer).cast("B"))


def fits(target: torch.Tensor, spec: TensorSpec, device_type: str = "cpu") -> bool:
    """Whether the file's bytes for ``spec`` can be read straight into ``target``'s memory.

    With ``device_type="cuda"``: whether they can be copied into ``target`` on
    a CUDA device from pinned host memory in one copy. The cheapest tests come
    first: this runs once per tensor of a load.
    """
    return (
        target.dtype == spec.dtype
        and target.shape == spec.shape
        and (target.is_cpu if device_type == "cpu" else target.device.type == device_type)
        and target.layout == torch.strided
        and target.is_contiguous()
        and not target.is_conj()
        and not target.is_neg()
    )


def _numpy_dtypes() -> frozenset[torch.dtype]:
    ok = set()
    for dtype in DTYPE_NAMES:
        with contextlib.suppress(TypeError, RuntimeError):
            torch.empty(1, dtype=dtype).numpy()
            ok.add(dtype)
    return frozenset(ok)


#: dtypes whose tensors ``.numpy()`` exports directly (not bfloat16 and the float8s).
_NUMPY_DTYPES = _numpy_dtypes()


def _writable(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's memory as a buffer ``preadv`` can fill: one call for most dtypes, not three."""
    return tensor.numpy() if tensor.dtype in _NUMPY_DTYPES else flat_bytes(tensor).numpy()


def _padded(count: int) -> int:
    """``count`` rounded up to 64 bytes: each tensor in a shared buffer starts cache-line aligned."""
    return -(-count // 64) * 64


class _Placement:
    """Where each tensor of a file is read to: a target's own memory, pinned memory on its way to a device, or a new tensor.

    A tensor with no target gets memory of its own (read straight into it, no
    copy), not a slice of one buffer for the whole file: a slice would keep
    the whole buffer alive as long as any tensor of the file is (a 4-element
    tensor pinned the 16 MiB of its file).
    """

    def __init__(self, specs: Mapping[str, TensorSpec], targets: Mapping[str, torch.Tensor]) -> None:
        self.direct: dict[str, torch.Tensor] = {}
        self.on_device: dict[str, torch.Tensor] = {}
        self.pinned_bytes = 0
        get = targets.get
        for key, spec in specs.items():
            target = get(key)
            if target is None or spec.end == spec.begin:
                continue
            if fits(target, spec):
                self.direct[key] = target
            elif fits(target, spec, "cuda"):
                self.on_device[key] = target
                self.pinned_bytes += _padded(spec.end - spec.begin)


class _BatchReader:
    """Reads a file's data section into a sequence of buffers with few ``preadv`` calls, hashing what it read.

    Buffers are filled in file order; a batch is read once it holds
    :data:`_READ_CHUNK` bytes or :data:`_MAX_IOV` buffers. Each batch is hashed
    in ``hash_pool`` (its futures in ``pending``) while the next is read.
    """

    def __init__(self, fd: int, offset: int, path: str, hasher: Hasher | None, hash_pool: ThreadPoolExecutor | None) -> None:
        self.fd, self.offset, self.path = fd, offset, path
        self.hasher, self.hash_pool = hasher, hash_pool
        self.pending: list[Future] = []
        self.batch: list[Any] = []
        self.nbytes = 0

    def add(self, buffer: Any, count: int) -> None:
        """Queue ``buffer`` (``count`` bytes, C-contiguous) for the next bytes of the file."""
        if self.nbytes + count > _READ_CHUNK:
            self.flush()
        if count <= _READ_CHUNK:
            self.batch.append(buffer)
            self.nbytes += count
            if len(self.batch) >= _MAX_IOV:
                self.flush()
            return
        view = memoryview(buffer).cast("B")
        for pos in range(0, count, _READ_CHUNK):
            self.batch.append(view[pos : pos + _READ_CHUNK])
            self.nbytes += min(_READ_CHUNK, count - pos)
            self.flush()

    def flush(self) -> None:
        batch, fd = self.batch, self.fd
        if not batch:
            return
        n = _safeio.preadv(fd, batch, self.offset, self.path, self.nbytes)
        if n != self.nbytes:  # short read: finish buffer by buffer
            skip = n
            for buffer in batch:
                view = memoryview(buffer).cast("B")
                if skip >= len(view):
                    skip -= len(view)
                    continue
                _pread_exact(fd, view[skip:], self.offset + n, self.path)
                n += len(view) - skip
                skip = 0
        if self.hasher is not None:
            if self.hash_pool is None:
                _update_all(self.hasher, batch)
            else:
                self.pending.append(self.hash_pool.submit(_update_all, self.hasher, batch))
        self.offset += self.nbytes
        self.batch, self.nbytes = [], 0


def read_tensor_file(
    path: str,
    *,
    size: int | None,
    expected: HashInfo | None,
    targets: Mapping[str, torch.Tensor] | None = None,
    hash_pool: ThreadPoolExecutor | None = None,
    deferred: list[Callable[[], None]] | None = None,
) -> dict[str, torch.Tensor]:
    """Read a whole tensor file, checking its size and (unless ``expected`` is None) its hash.

    A tensor whose key is in ``targets`` (and whose dtype and shape match, see
    :func:`fits`) is read straight into that tensor's memory and returned as
    that same object, so loading into a model needs no second copy and no
    fresh allocation; targets must not require grad (pass them detached). The
    others are read into one new buffer. A target on a CUDA device is read into pinned host
    memory and copied to the device asynchronously (``non_blocking``) once
    the file is read, so the copy overlaps reading the next file; the caller
    synchronizes the device before it returns. Reads are batched (``preadv`` of up to
    :data:`_MAX_IOV` buffers or 16 MiB), and each batch is hashed in
    ``hash_pool`` while the next one is read. The bytes hashed are the bytes
    returned. If the hash does not match, IntegrityError is raised *after* the
    targets were written: their content is then undefined and must be
    reloaded from a checkpoint that verifies.

    With ``deferred`` (a list) the hash is not awaited here: a check that
    waits and raises IntegrityError is appended instead, so hashing this file
    overlaps reading the next one. The caller must run every check before it
    uses any tensor returned.
    """
    fd, actual = _open_checked(path, size, expected)
    reader = None
    try:
        with _typed_reads(path):
            head, specs, start = _read_header(fd, actual, path)
            hasher = new_hasher(expected.algo) if expected is not None else None
            if hasher is not None:
                hasher.update(head)
            place = _Placement(specs, targets or {})
            reader = _BatchReader(fd, start, path, hasher, hash_pool)
            out = _read_placed(specs, place, reader, path)
        if deferred is None:
            for future in reader.pending:
                future.result()
    except BaseException:
        if reader is not None:
            futures_wait(reader.pending)
        raise
    finally:
        os.close(fd)
    if deferred is None:
        _check_hash(path, hasher, expected)
    else:
        pending = reader.pending

        def check() -> None:
            for future in pending:
                future.result()
            _check_hash(path, hasher, expected)

        deferred.append(check)
    return out


def _read_placed(specs: Mapping[str, TensorSpec], place: _Placement, reader: _BatchReader, path: str) -> dict[str, torch.Tensor]:
    """Read every tensor of a file where ``place`` says; start the copies of device targets; return the tensors by key."""
    # torch's caching host allocator reuses pinned blocks once the copies
    # that read them have finished, so repeated loads allocate no more.
    pinned = _allocate(place.pinned_bytes, torch.uint8, path, pin_memory=True) if place.pinned_bytes else None
    staged: list[tuple[torch.Tensor, torch.Tensor]] = []
    out: dict[str, torch.Tensor] = {}
    direct, on_device = place.direct, place.on_device
    pinned_used = 0
    for key, (dtype, shape, begin, end) in specs.items():
        count = end - begin
        target = direct.get(key)
        if target is not None:
            out[key] = target
            if count:
                reader.add(_writable(target), count)
        elif count == 0:
            out[key] = torch.empty(shape, dtype=dtype)
        elif key in on_device:
            region = pinned[pinned_used : pinned_used + count]  # type: ignore[index]
            pinned_used += _padded(count)
            staged.append((on_device[key], region.view(dtype).reshape(shape)))
            out[key] = on_device[key]
            reader.add(region.numpy(), count)
        else:
            tensor = out[key] = _allocate(shape, dtype, path)
            reader.add(_writable(tensor), count)
    reader.flush()
    with torch.no_grad():
        for target, host in staged:
            target.copy_(host, non_blocking=True)
    return out


def read_one_tensor(path: str, key: str, *, size: int | None, expected: HashInfo | None = None) -> torch.Tensor:
    """Read one tensor without reading the others: parse the header, then ``pread`` its byte range.

    Without ``expected``, checked are: the file's size against the manifest,
    that the header is a JSON object within the file, and the tensor's own
    entry (dtype, shape, a byte range that holds them and lies inside the
    file); the other entries are not examined, so a 10,000-tensor header
    costs one JSON parse. The bytes themselves are covered only by the
    file's hash: with ``expected`` given, the whole file is hashed (streamed
    through a small buffer, the tensor's bytes copied from that same stream),
    and the header is validated in full, as for a full read.
    """
    fd, actual = _open_checked(path, size, expected)
    try:
        with _typed_reads(path):
            if expected is None:
                head = _read_header_bytes(fd, actual, path)
                spec, start = _one_spec(head, actual, key, path)
            else:
                head, specs, start = _read_header(fd, actual, path)
                spec = specs.get(key)
                if spec is None:
                    raise IntegrityError(f"{path}: no tensor {key!r} in this file", path=path, expected=key, actual="missing")
            tensor = _allocate(spec.shape, spec.dtype, path)
            target = tensor_bytes(tensor)
            begin, end = start + spec.begin, start + spec.end
            if expected is None:
                if end > begin:
                    _pread_exact(fd, target, begin, path)
                return tensor
            hasher = new_hasher(expected.algo)
            buffer = bytearray(min(_READ_CHUNK, max(actual, 1)))
            view = memoryview(buffer)
            offset = 0
            while offset < actual:
                n = min(len(buffer), actual - offset)
                _pread_exact(fd, view[:n], offset, path)
                hasher.update(view[:n])
                lo, hi = max(begin, offset), min(end, offset + n)
                if lo < hi:  # the tensor's bytes are taken from the stream that was hashed
                    target[lo - begin : hi - begin] = view[lo - offset : hi - offset]
                offset += n
        _check_hash(path, hasher, expected)
    finally:
        os.close(fd)
    return tensor


def _read_header_bytes(fd: int, size: int, path: str) -> bytes:
    head = bytearray(8)
    if size < 8:
        parse_header(b"", size, path)  # raises the standard "too short" error
    _pread_exact(fd, memoryview(head), 0, path)
    (length,) = struct.unpack("<Q", head)
    if length > MAX_HEADER_SIZE or 8 + length > size:
        parse_header(head, size, path)  # raises the standard error for a bad length
    head += bytes(length)
    _pread_exact(fd, memoryview(head)[8:], 8, path)
    return bytes(head)


def _one_spec(head: bytes, size: int, key: str, path: str) -> tuple[TensorSpec, int]:
    """Validate one entry of a header (see read_one_tensor); return its spec and the data offset."""

    def bad(reason: str) -> IntegrityError:
        return IntegrityError(f"{path}: not a valid safetensors file: {reason}", path=path, expected="safetensors header", actual=reason)

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
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"tensor {key[:80]!r}: entry must have exactly dtype, shape, data_offsets")
    dtype = DTYPES_BY_NAME.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise bad(f"tensor {key[:80]!r}: unknown dtype {str(entry['dtype'])[:20]!r}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"tensor {key[:80]!r}: shape must be a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets):
        raise bad(f"tensor {key[:80]!r}: data_offsets must be two non-negative integers")
    if not _fits_int64(shape):
        raise bad(f"tensor {key[:80]!r}: shape {str(shape)[:80]} does not fit in 64-bit sizes")
    begin, end = offsets
    if end < begin or end - begin != math.prod(shape) * ITEMSIZE[dtype] or 8 + length + end > size:
        raise bad(f"tensor {key[:80]!r}: byte range {begin}..{end} does not hold shape {shape} of {entry['dtype']} inside the file")
    return TensorSpec(dtype, tuple(shape), begin, end), 8 + length
