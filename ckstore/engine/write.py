"""The write pipeline: tensor files streamed to disk through reused aligned buffers, hashed as they are written.

What the pipeline knows is how bytes move (copy into a buffer, write and hash
in parallel, hand finished files to a sync thread); what makes a file durable
is the commit protocol's (``ckstore.checkpoint.commit.finish_files``), which
the caller passes in. Every file is created and written through
``ckstore.storage.durable``.
"""

from __future__ import annotations

import contextlib
import mmap
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import StateError
from ..format.chunks import DEFAULT_CHUNK_SIZE, ChunkedHash, ChunkStreamHasher, hash_chunk
from ..format.hashing import HashInfo
from ..format.safetensors import DTYPE_NAMES, build_header, tensor_bytes
from ..storage import durable as _durable
from .hashpool import HashPool
from .worker import SerialWorker

#: Finished files are fsynced in batches of this many: on ext4 every fsync of a
#: freshly written file commits the journal, which stalls the O_DIRECT writes of
#: the next file; one commit per batch (the later fsyncs find their inodes
#: committed) keeps the writes streaming. It also bounds the open descriptors.
_FSYNC_BATCH = 64
#: Copies at least this large go through numpy (GIL released), smaller ones through memoryview slices.
_NUMPY_COPY_MIN = 64 << 10


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


@dataclass(frozen=True)
class FileDigest:
    """Size and content hash of a tensor file, written or (``digest_files``) only computed."""

    size: int
    hash: HashInfo  # the root over ``chunks`` (manifest format 2)
    chunks: ChunkedHash


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


class WritePipeline:
    """Streams tensor files to disk through reused aligned buffers: copy, then write and hash in parallel, then fsync.

    The calling thread copies tensor bytes into one of ``depth`` page-aligned
    chunk buffers of ``chunk`` bytes (many small tensors land in one buffer, so
    10,000 tensors cost a few dozen writes, not 10,000). A writer thread writes
    each buffer with ``O_DIRECT`` where the filesystem allows it while hash
    threads (one per usable core, :mod:`.hashpool`) hash its chunks of
    ``chunk_size`` bytes (manifest format 2) in parallel; a sync thread fsyncs and closes finished
    files in batches (see :data:`_FSYNC_BATCH`), every one before this
    returns. A buffer is refilled only after both its write and its hash are
    finished.
    The buffers are allocated once and reused by every save, so a save adds
    at most ``depth * chunk`` bytes to the process's memory. Every system
    call runs outside the GIL, as does BLAKE3 on large buffers.
    """

    def __init__(self, *, chunk: int = 16 << 20, depth: int = 3, direct: bool = True, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        # Buffers start at file offsets that are multiples of ``chunk``: with ``chunk`` a multiple of
        # ``chunk_size``, no hash chunk straddles two buffers, so each is hashed from one view.
        if chunk % _durable.DIRECT_ALIGN or depth < 2 or chunk % chunk_size:
            raise ValueError("chunk must be a multiple of DIRECT_ALIGN and of chunk_size, and depth at least 2")
        self.chunk = chunk
        self.chunk_size = chunk_size
        self.depth = depth
        self.direct = direct
        self._slots: list[_Slot] = []
        self._write = SerialWorker("ckstore-write")
        self._hash = HashPool(name="ckstore-hash")
        self._sync = SerialWorker("ckstore-sync")

    def close(self) -> None:
        for worker in (self._write, self._hash, self._sync):
            worker.shutdown()
        for slot in self._slots:
            slot.view.release()
        self._slots.clear()

    def digest_files(self, jobs: Sequence[Sequence[tuple[str, torch.Tensor]]], *, algo: str, chunk_size: int | None = None) -> list[FileDigest]:
        """Size and hash of the files :meth:`write_files` would write for ``jobs`` with ``chunk_size``, without writing anything."""
        out = []
        for entries in jobs:
            hasher = ChunkStreamHasher(algo, chunk_size or self.chunk_size)
            for piece in _file_pieces(entries):
                hasher.update(piece if isinstance(piece, bytes) else tensor_bytes(piece))
            table = hasher.table()
            out.append(FileDigest(table.size, table.root, table))
        return out

    def write_files(
        self,
        jobs: Sequence[tuple[str, Sequence[tuple[str, torch.Tensor]]]],
        *,
        algo: str,
        finish: Callable[[list[tuple[Future | None, _durable.FileWriter]]], None],
        check: Callable[[], None] | None = None,
        chunk_size: int | None = None,
    ) -> list[FileDigest]:
        """Write each ``(path, entries)`` as a new safetensors file, then ``finish`` it; return sizes and hashes.

        ``chunk_size``: the hash chunks of these files (``format.chunks.chunk_size_for``; default the
        pipeline's), a power of two dividing the buffer size.

        ``finish`` gets batches of ``(last write, writer)`` on the sync thread
        (the commit protocol's fsync-and-close, ``commit.finish_files``);
        every batch is finished before this returns. ``check`` is called before each buffer is filled; whatever it raises
        stops the write (a background save abandoned at exit). On any failure
        every thread is drained before the error propagates (no buffer is
        touched after return); the caller removes the partial files.
        """
        chunk_size = chunk_size or self.chunk_size
        if self.chunk % chunk_size:
            raise ValueError(f"chunk_size {chunk_size} does not divide the {self.chunk}-byte buffers")
        if not self._slots:
            self._slots = [_Slot(self.chunk) for _ in range(self.depth)]
        free = list(self._slots)
        inflight: deque[tuple[_Slot, Future, list[Future]]] = deque()
        finished: list[tuple[_durable.FileWriter, _FileChunks]] = []
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
            for future in hashed:
                future.result()
            return slot

        try:
            for path, entries in jobs:
                writer = _durable.create(path, site="tensor_file", direct=self.direct)
                writers.append(writer)
                hasher = _FileChunks(algo)
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
                            last = self._submit(writer, hasher, slot, fill, inflight, chunk_size)
                            slot, fill = take(), 0
                if fill:
                    last = self._submit(writer, hasher, slot, fill, inflight, chunk_size)
                else:
                    free.append(slot)
                finished.append((writer, hasher))
                unsynced.append((last, writer))
                if len(unsynced) >= _FSYNC_BATCH:
                    batches.append(self._sync.submit(finish, unsynced))
                    unsynced = []
            if unsynced:
                batches.append(self._sync.submit(finish, unsynced))
                unsynced = []
            while inflight:
                _, wrote, hashed = inflight.popleft()
                wrote.result()
                for future in hashed:
                    future.result()
            for batch in batches:
                batch.result()
        except BaseException:
            # Drain every thread before the caller sees the error: no buffer or
            # file may still be in use once we return.
            for _, wrote, hashed in inflight:
                futures_wait([wrote, *hashed])
            futures_wait(batches)
            for writer in writers:
                with contextlib.suppress(OSError):
                    writer.close()
            raise
        out = []
        for writer, chunks in finished:
            table = chunks.table(writer.offset, chunk_size)
            out.append(FileDigest(writer.offset, table.root, table))
        return out

    def _submit(self, writer: _durable.FileWriter, chunks: _FileChunks, slot: _Slot, n: int, inflight: deque, size: int) -> Future:
        view = slot.view[:n]
        wrote = self._write.submit(_write_split, writer, view)
        hashed = [self._hash.submit(chunks.hash, chunks.next + i, view[pos : pos + size]) for i, pos in enumerate(range(0, n, size))]
        chunks.next += len(hashed)
        inflight.append((slot, wrote, hashed))
        return wrote


class _FileChunks:
    """The chunk digests of one file being written, filled in by the hash threads in any order."""

    __slots__ = ("algo", "digests", "next")

    def __init__(self, algo: str) -> None:
        self.algo = algo
        self.digests: dict[int, bytes] = {}
        self.next = 0  # index of the next chunk to schedule

    def hash(self, index: int, view: memoryview) -> None:
        self.digests[index] = hash_chunk(self.algo, view)

    def table(self, size: int, chunk_size: int) -> ChunkedHash:
        return ChunkedHash(self.algo, size, chunk_size, tuple(self.digests[i] for i in range(self.next)))


def _write_split(writer: _durable.FileWriter, view: memoryview) -> None:
    # A file's last chunk is rarely a multiple of the alignment: write the
    # aligned part directly and only the short tail through the page cache.
    aligned = len(view) - len(view) % _durable.DIRECT_ALIGN
    if writer.direct and 0 < aligned < len(view):
        writer.write(view[:aligned])
        writer.write(view[aligned:])
    else:
        writer.write(view)
