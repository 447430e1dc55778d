"""The storage protocol: what the layers above need from the place checkpoints are kept.

A backend is one module in ``storage/`` with one class that has these
methods. ``local.py`` is the POSIX backend (a directory on a local or shared
file system) and holds every fsync; ``recording.py`` is the local backend
with every operation recorded, which the crash model (``fault_injection``)
replays to enumerate the states a crash may leave.

Every operation that changes the disk names its call site (``site=``, a
stable string such as ``"tensor_file"`` or ``"checkpoints_dir"``): the
fault-injection tiers key on them.

The commit is the one operation whose meaning a backend must keep: after
``commit(staged, final)`` returns, ``final`` is complete and durable, and a
crash before it returns leaves either nothing at ``final`` or all of it.
Locally that is a rename followed by an fsync of both directories; an object
store would write the manifest last with a conditional put.

Which backend runs an operation is decided by its path, from any thread (a
store's background saves and publish workers included): a backend mounted at a
directory (:func:`mount`, what ``Store(path, storage=...)`` does) runs the
operations under it; else the backend :func:`using` installed for the whole
process (the crash model records a whole workload that way); else the local
code runs as written.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from ..errors import InvalidArgumentError

Path = str | os.PathLike[str]


class Writer(Protocol):
    """A new file, written in order, then made durable (``sync``) and closed.

    After a failed ``write`` or ``sync`` the writer refuses all further work:
    the data already written may be lost, and a second fsync could report
    success over it (fsyncgate).
    """

    path: str
    site: str
    offset: int

    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    def sync(self) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> Writer: ...
    def __exit__(self, *exc: object) -> None: ...


class Storage(Protocol):
    """The operations the checkpoint layer needs: create-exclusive writers in a staging area, ranged
    reads, listing, the commit, deletion, the writer lock; plus the directory steps the local commit
    protocol is made of."""

    # ---- writing into a staging area
    def create(self, path: Path, *, site: str = "file", mode: int = 0o644, direct: bool = False) -> Writer:
        """A new file; an existing file or link at ``path`` is an error (``FileExistsError``)."""

    def write_file_atomic(self, path: Path, data: bytes, *, site: str, durable: bool = True) -> None:
        """Replace ``path`` with ``data``: a crash leaves the old or the new content, never a mix."""

    def make_dir(self, path: Path, *, site: str, exist_ok: bool = False) -> bool: ...
    def make_dirs(self, path: Path, *, site: str) -> None: ...
    def link(self, src: Path, dst: Path, *, site: str) -> None:
        """A second name for an unchanged file (incremental saves); ``dst`` must not exist."""

    def sync_dir(self, path: Path, *, site: str) -> None:
        """Make the creations, renames and removals inside ``path`` durable."""

    # ---- the commit
    def rename(self, src: Path, dst: Path, *, site: str, replace: bool = False) -> None: ...
    def commit(self, staged: Path, final: Path, *, site: str, sync: Sequence[Path]) -> None:
        """Publish ``staged`` as ``final`` atomically, then make it durable (``sync``: the directories to fsync)."""

    # ---- removal
    def unlink(self, path: Path, *, site: str) -> None: ...
    def remove_dir(self, path: Path, *, site: str) -> None: ...
    def remove_tree(self, path: Path, *, site: str) -> None:
        """Delete ``path`` and everything under it, never following a link; gone already is fine."""

    # ---- reading
    def list(self, path: Path) -> list[str]:
        """The names in directory ``path``, sorted."""

    def read_ranges(self, path: Path, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes at each ``(offset, size)`` of file ``path``, in one open (vector reads)."""

    # ---- exclusion
    def lock(self, root: Path, *, timeout: float | None = 0) -> contextlib.AbstractContextManager[Any]:
        """Hold the store's writer lock for the ``with`` block (``StoreLockedError`` after ``timeout``)."""


_installed: Storage | None = None
#: Absolute directory -> (backend, how many mounts of it are live).
_mounted: dict[str, tuple[Storage, int]] = {}
_mount_lock = threading.Lock()


def installed(path: Path | None = None) -> Storage | None:
    """The backend for an operation on ``path``: the one mounted at it or at a directory above it, else
    the one :func:`using` installed, else None (the local backend's code runs as written)."""
    mounted = _mounted
    if mounted and path is not None:
        where = os.path.abspath(os.fspath(path))
        while True:
            entry = mounted.get(where)
            if entry is not None:
                return entry[0]
            parent = os.path.dirname(where)
            if parent == where:
                break
            where = parent
    return _installed


def mount(root: Path, backend: Storage) -> None:
    """Run every operation under directory ``root`` on ``backend`` until :func:`unmount`.

    Mounting the same backend again counts; a different backend at the same root is refused, since
    two stores on one directory writing through different backends would split its operations.
    """
    global _mounted
    root = os.path.abspath(os.fspath(root))
    with _mount_lock:
        current = _mounted.get(root)
        if current is not None and current[0] is not backend:
            raise InvalidArgumentError(f"{root}: already open with another storage backend ({current[0]!r})")
        # Replaced whole, never mutated: installed() reads it without the lock.
        _mounted = {**_mounted, root: (backend, 1 if current is None else current[1] + 1)}


def unmount(root: Path, backend: Storage) -> None:
    global _mounted
    root = os.path.abspath(os.fspath(root))
    with _mount_lock:
        current = _mounted.get(root)
        if current is None or current[0] is not backend:
            return
        rest = {k: v for k, v in _mounted.items() if k != root}
        _mounted = rest if current[1] == 1 else {**rest, root: (backend, current[1] - 1)}


@contextlib.contextmanager
def using(backend: Storage) -> Iterator[Storage]:
    """Send every storage operation of this process to ``backend`` until the block ends."""
    global _installed
    previous, _installed = _installed, backend
    try:
        yield backend
    finally:
        _installed = previous
