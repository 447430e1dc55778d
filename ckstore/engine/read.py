"""Reading tensor files: verified whole-file reads placed into the caller's tensors, streamed verification, single-tensor reads.

Every open goes through ``ckstore.storage.safeio`` (no symlink, no FIFO);
every read is checked against the manifest's size and, unless the caller
asks otherwise, its hash: the bytes hashed are the bytes returned.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointReadError, CkstoreError, IntegrityError
from ..format.chunks import ChunkedHash
from ..format.hashing import Hasher, HashInfo, new_hasher
from ..format.safetensors import DTYPE_NAMES, MAX_HEADER_SIZE, TensorSpec, one_spec, parse_header, tensor_bytes
from ..storage import safeio as _safeio
from .chunkverify import ChunkReader, read_range, verify_file
from .write import flat_bytes

_READ_CHUNK = 16 << 20


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


def verify_tensor_file(path: str, *, size: int, expected: HashInfo | ChunkedHash) -> dict[str, TensorSpec]:
    """Check a tensor file's size, header and hash in bounded memory; return its specs.

    What a load checks, without keeping the data: the header is read and
    validated (as a load does), then the whole file is hashed through one
    fixed buffer of :data:`_VERIFY_CHUNK` bytes.
    """
    fd, actual = _open_checked(path, size)
    try:
        with _typed_reads(path):
            _, specs, _ = _read_header(fd, actual, path)
            if isinstance(expected, ChunkedHash):
                verify_file(fd, expected, path)  # every chunk, in parallel
                return specs
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


# ---------------------------------------------------------------- fast reads

#: preadv takes at most IOV_MAX (1024 on Linux) buffers per call.
_MAX_IOV = 512


_pread_exact = _safeio.read_exact


def _read_views(fd: int, views: list[memoryview], offset: int, path: str) -> None:
    """Fill ``views``, consecutive in the file from ``offset``, with few ``preadv`` calls; typed errors as for every read here."""
    with _typed_reads(path):
        for first in range(0, len(views), _MAX_IOV):
            batch = views[first : first + _MAX_IOV]
            total = sum(len(v) for v in batch)
            n = _safeio.preadv(fd, batch, offset, path, total)
            if n != total:  # short read: finish view by view (the file ends first: IntegrityError)
                skip = n
                for view in batch:
                    if skip >= len(view):
                        skip -= len(view)
                        continue
                    _pread_exact(fd, view[skip:], offset + n, path)
                    n += len(view) - skip
                    skip = 0
            offset += total

#: A file this large whose disk blocks cover less than half of it is hashed before any memory is allocated for it.
_SPARSE_MIN = 64 << 20


def _open_checked(path: str, size: int | None, expected: HashInfo | ChunkedHash | None = None) -> tuple[int, int]:
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
            if isinstance(expected, ChunkedHash):
                with _typed_reads(path):
                    verify_file(fd, expected, path)
            else:
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
        _read_views(fd, [memoryview(buffer).cast("B") for buffer in batch], self.offset, self.path)
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
    expected: HashInfo | ChunkedHash | None,
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
    reader: _BatchReader | ChunkReader | None = None
    hasher: Hasher | None = None
    try:
        with _typed_reads(path):
            head, specs, start = _read_header(fd, actual, path)
            place = _Placement(specs, targets or {})
            if isinstance(expected, ChunkedHash):
                # Format 2, verified: the hash threads read and check the chunks (ChunkReader); the file
                # descriptor is theirs until they finish, closed by the check below.
                reader = ChunkReader(fd, expected, path, head, _read_views)
            else:
                hasher = new_hasher(expected.algo) if expected is not None else None  # format 1: one stream per file
                if hasher is not None:
                    hasher.update(head)
                reader = _BatchReader(fd, start, path, hasher, hash_pool)
            out = _read_placed(specs, place, reader, path)
        if deferred is None:
            for future in reader.pending:
                future.result()
    except BaseException:
        if reader is not None:
            futures_wait(reader.pending)
        os.close(fd)
        raise
    if isinstance(reader, ChunkReader):
        chunks = reader

        def check_chunks() -> None:
            try:
                chunks.check()
            finally:
                chunks.wait()
                os.close(fd)

        if deferred is None:
            check_chunks()
        else:
            deferred.append(check_chunks)
        return out
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
    if staged and isinstance(reader, ChunkReader):
        reader.check()  # the pinned regions are filled (and verified) before the device copies start
    with torch.no_grad():
        for target, host in staged:
            target.copy_(host, non_blocking=True)
    return out


def read_one_tensor(path: str, key: str, *, size: int | None, expected: HashInfo | ChunkedHash | None = None) -> torch.Tensor:
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
            if isinstance(expected, ChunkedHash):
                return _read_one_chunked(fd, actual, key, path, expected)
            if expected is None:
                head = _read_header_bytes(fd, actual, path)
                spec, start = one_spec(head, actual, key, path)
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


def _read_one_chunked(fd: int, size: int, key: str, path: str, table: ChunkedHash) -> torch.Tensor:
    """``read_one_tensor`` of a format-2 file: only the chunks of the header and of the tensor are read and hashed.

    The header is parsed from verified bytes only (its chunks checked first),
    and validated in full, so a tampered header cannot point the read
    elsewhere; the tensor's bytes come from verified chunks too.
    """
    head = bytearray(8)
    if size < 8:
        parse_header(b"", size, path)  # raises the standard "too short" error
    _pread_exact(fd, memoryview(head), 0, path)
    (length,) = struct.unpack("<Q", head)
    if length > MAX_HEADER_SIZE or 8 + length > size:
        parse_header(head, size, path)  # raises the standard error for a bad length
    verified, base = read_range(fd, table, 0, 8 + length, path, read_exact=_pread_exact)
    specs, start = parse_header(memoryview(verified), size, path)
    spec = specs.get(key)
    if spec is None:
        raise IntegrityError(f"{path}: no tensor {key!r} in this file", path=path, expected=key, actual="missing")
    tensor = _allocate(spec.shape, spec.dtype, path)
    begin, end = start + spec.begin, start + spec.end
    if end > begin:
        if end > base + len(verified):  # not all in the header's chunks: read the tensor's own
            verified, base = read_range(fd, table, begin, end, path, read_exact=_pread_exact)
        tensor_bytes(tensor)[:] = memoryview(verified)[begin - base : end - base]
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
