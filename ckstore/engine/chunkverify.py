"""Checking file bytes against a chunk table (manifest format 2): as a load reads them, a byte range, a whole file.

Every chunk is hashed on its own in a :class:`~ckstore.engine.hashpool.HashPool`,
so a load verifies on every core while it reads, and a ranged read hashes
only the chunks it touches. Each mismatch is an IntegrityError naming the
file and the chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait

from ..errors import IntegrityError
from ..format.chunks import ChunkedHash, hash_chunk
from ..storage import safeio as _safeio
from .hashpool import HashPool, shared_pool


def _check_chunk(table: ChunkedHash, index: int, path: str, segments: list[memoryview]) -> None:
    table.check(index, hash_chunk(table.algo, *segments), path)


def _wait_all(pending: list[Future]) -> None:
    """Wait for every task, then raise the error of the lowest chunk that failed (tasks finish in any order)."""
    futures_wait(pending)
    for future in pending:
        error = future.exception()
        if error is not None:
            raise error


def read_range(
    fd: int, table: ChunkedHash, begin: int, end: int, path: str, *, read_exact: Callable[[int, memoryview, int, str], object] | None = None
) -> tuple[bytearray, int]:
    """Read and verify the chunks holding bytes ``begin`` to ``end``; return them and the offset of their first byte.

    Only those chunks are read and hashed (in parallel): a 256 KiB tensor of a
    1 GiB file costs one or two 1 MiB chunks, not the file.
    """
    chunks = table.span(begin, min(end, table.size))
    if not chunks:
        return bytearray(), begin
    first, _ = table.bounds(chunks[0])
    _, last = table.bounds(chunks[-1])
    buffer = bytearray(last - first)
    view = memoryview(buffer)
    (read_exact or _safeio.read_exact)(fd, view, first, path)
    if len(buffer) <= _INLINE_BYTES:
        # One or two chunks: hashed here. Handing them to pool threads costs thread wake-ups that,
        # on a busy 2-core host, took longer than the hashing (a 256 KiB read went from ~1.5 to ~4 ms).
        for index in chunks:
            lo, hi = table.bounds(index)
            _check_chunk(table, index, path, [view[lo - first : hi - first]])
        return buffer, first
    pool = shared_pool()
    pending = []
    for index in chunks:
        lo, hi = table.bounds(index)
        pending.append(pool.submit(_check_chunk, table, index, path, [view[lo - first : hi - first]]))
    _wait_all(pending)
    return buffer, first


class ChunkReader:
    """Reads a format-2 file's chunks into the caller's memory and verifies each, in the hash threads.

    The caller states where each byte of the file goes (:meth:`add`, in file
    order from the data offset; the header's bytes, already read, are given
    at the start) and :meth:`dispatch` hands runs of chunks to the pool: each
    task reads a chunk with one ``preadv`` into its destinations and hashes
    it at once, while it is still in the core's cache. Reading in the calling
    thread and hashing in the pool used one core to read and made the other
    hash every byte again from memory: a warm verified load took 2.5x a raw
    read on the 2-core VM.

    Every task must finish before the destinations are used or the file
    descriptor closed: :meth:`wait` waits for all, :meth:`check` then raises
    the lowest chunk's error (an IntegrityError naming the file and chunk, or
    what the read raised).
    """

    #: Chunks per task: 32 MiB of 1 MiB chunks, so two hash threads share a file's runs evenly.
    RUN = 32

    def __init__(self, fd: int, table: ChunkedHash, path: str, head: bytes, read_exact: Callable[..., object], pool: HashPool | None = None) -> None:
        self.fd, self.table, self.path = fd, table, path
        self.read_exact = read_exact
        self.pool = pool or shared_pool()
        self.pending: list[Future] = []
        # (file offset, destination, whether it must be read): the header was read already.
        self.pieces: list[tuple[int, memoryview, bool]] = [(0, memoryview(head), False)]
        self.offset = len(head)
        self._dispatched = False

    def add(self, buffer: object, count: int) -> None:
        """The next ``count`` bytes of the file go into ``buffer`` (C-contiguous)."""
        view = memoryview(buffer).cast("B")  # type: ignore[arg-type]
        if len(view) != count:
            view = view[:count]
        self.pieces.append((self.offset, view, True))
        self.offset += count

    def flush(self) -> None:
        """Every piece is added: hand every chunk to the pool, in runs (see :meth:`dispatch`). Once only."""
        if not self._dispatched:
            self._dispatched = True
            self.dispatch()

    def dispatch(self) -> None:
        """Hand every chunk to the pool, in runs; IntegrityError first if the pieces do not cover the file exactly."""
        table = self.table
        if self.offset != table.size:
            raise IntegrityError(
                f"{self.path}: the tensors cover {self.offset} bytes, the chunk table {table.size}",
                path=self.path,
                expected=table.size,
                actual=self.offset,
            )
        run: list[tuple[int, list[tuple[int, memoryview, bool]]]] = []
        pieces, k, used = self.pieces, 0, 0  # pieces[k] is consumed up to ``used`` bytes
        for index in range(len(table.digests)):
            lo, hi = table.bounds(index)
            segments = []
            pos = lo
            while pos < hi:
                offset, view, fresh = pieces[k]
                n = min(len(view) - used, hi - pos)
                segments.append((pos, view[used : used + n], fresh))
                pos += n
                used += n
                if used == len(view):
                    k, used = k + 1, 0
            run.append((index, segments))
            if len(run) == self.RUN:
                self.pending.append(self.pool.submit(self._read_run, run))
                run = []
        if run:
            self.pending.append(self.pool.submit(self._read_run, run))

    def _read_run(self, run: list[tuple[int, list[tuple[int, memoryview, bool]]]]) -> None:
        table = self.table
        for index, segments in run:
            fresh = [(offset, view) for offset, view, must in segments if must and len(view)]
            if fresh:
                # A chunk's unread bytes are contiguous in the file (the data section has no holes).
                self.read_exact(self.fd, [view for _, view in fresh], fresh[0][0], self.path)
            table.check(index, hash_chunk(table.algo, *(view for _, view, _ in segments)), self.path)

    def wait(self) -> None:
        """Wait for every task (raising nothing): no task reads the file or touches memory after this."""
        futures_wait(self.pending)

    def check(self) -> None:
        """Wait for every task, then raise the first failed run's error."""
        _wait_all(self.pending)


#: A ranged read of at most this many bytes of chunks hashes them in the calling thread.
_INLINE_BYTES = 2 << 20


#: A whole-file check reads this many bytes at a time, in two buffers: one is hashed while the other is read.
#: 8 MiB keeps verify()'s memory at 16 MiB whatever the file's size (docs/security.md promises it is bounded;
#: two 16 MiB buffers went past the 32 MiB the audit test allows) while 16 chunks in flight keep every core busy.
_VERIFY_BLOCK = 8 << 20


def verify_file(fd: int, table: ChunkedHash, path: str) -> None:
    """Hash every chunk of an open file against ``table`` in bounded memory (two buffers), reads overlapped with hashing."""
    block = max(table.chunk_size, _VERIFY_BLOCK - _VERIFY_BLOCK % table.chunk_size)
    buffers = [memoryview(bytearray(min(block, max(table.size, 1)))) for _ in range(2)]
    inflight: list[list[Future]] = [[], []]
    pool = shared_pool()
    offset, turn = 0, 0
    try:
        while offset < table.size:
            _wait_all(inflight[turn])  # this buffer's hashes are done before it is refilled
            n = min(block, table.size - offset)
            view = buffers[turn][:n]
            _safeio.read_exact(fd, view, offset, path)
            first = offset // table.chunk_size
            inflight[turn] = [
                pool.submit(_check_chunk, table, first + i, path, [view[pos : pos + table.chunk_size]])
                for i, pos in enumerate(range(0, n, table.chunk_size))
            ]
            offset += n
            turn ^= 1
        for pending in inflight:
            _wait_all(pending)
    finally:
        for pending in inflight:
            futures_wait(pending)
