"""The local POSIX backend: a store is a directory, the commit is a rename, and every fsync is here.

The operations themselves are ``storage/durable.py``'s functions (hooked, with
stable site names, the ordering rules in their docstrings); this class is the
backend object that runs them. The layers above call ``storage.durable``'s
functions, which dispatch to the installed backend (``storage.base.using``),
this one when none is.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from . import durable as _durable
from . import safeio as _safeio
from .base import Path
from .lock import WriterLock


class LocalStorage:
    """The :class:`~ckstore.storage.base.Storage` of a local (or shared POSIX) file system.

    ``fsync`` is the system call used for every file and directory fsync (a
    backend that must fail one, as a failing disk does, passes its own).
    """

    def __init__(self, *, fsync: Callable[[int], None] | None = None) -> None:
        self.fsync = fsync

    # ---- writing
    def create(self, path: Path, *, site: str = "file", mode: int = 0o644, direct: bool = False) -> _durable.FileWriter:
        return _durable.FileWriter(path, site=site, mode=mode, direct=direct, fsync=self.fsync)

    def write_file_atomic(self, path: Path, data: bytes, *, site: str, durable: bool = True) -> None:
        _durable.write_file_atomic.posix(path, data, site=site, durable=durable)

    def make_dir(self, path: Path, *, site: str, exist_ok: bool = False) -> bool:
        return _durable.make_dir.posix(path, site=site, exist_ok=exist_ok)

    def make_dirs(self, path: Path, *, site: str) -> None:
        _durable.make_dirs.posix(path, site=site)

    def link(self, src: Path, dst: Path, *, site: str) -> None:
        _durable.link.posix(src, dst, site=site)

    def sync_dir(self, path: Path, *, site: str) -> None:
        _durable.sync_dir.posix(path, site=site, fsync=self.fsync)

    # ---- the commit
    def rename(self, src: Path, dst: Path, *, site: str, replace: bool = False) -> None:
        _durable.rename.posix(src, dst, site=site, replace=replace)

    def commit(self, staged: Path, final: Path, *, site: str, sync: Sequence[Path]) -> None:
        # A rename is atomic but not durable until the directories on both sides are fsynced.
        self.rename(staged, final, site=site)
        for directory in sync:
            self.sync_dir(directory, site=f"{site}_dir")

    # ---- removal
    def unlink(self, path: Path, *, site: str) -> None:
        _durable.unlink.posix(path, site=site)

    def remove_dir(self, path: Path, *, site: str) -> None:
        _durable.remove_dir.posix(path, site=site)

    def remove_tree(self, path: Path, *, site: str) -> None:
        _durable.remove_tree.posix(path, site=site)

    def unlink_at(self, dir_fd: int, name: str, path: str, site: str) -> bool:
        """One step of :meth:`remove_tree`: unlink ``name`` relative to an open directory."""
        return _durable._unlink_at.posix(dir_fd, name, path, site)

    def rmdir_at(self, dir_fd: int, name: str, path: str, site: str) -> bool:
        """One step of :meth:`remove_tree`: remove the emptied directory ``name`` relative to an open directory."""
        return _durable._rmdir_at.posix(dir_fd, name, path, site)

    # ---- reading
    def list(self, path: Path) -> list[str]:
        return sorted(os.listdir(path))

    def read_ranges(self, path: Path, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        fd, _ = _safeio.open_regular(os.fspath(path))
        try:
            out = []
            for offset, size in ranges:
                buf = bytearray(size)
                _safeio.read_exact(fd, memoryview(buf), offset, os.fspath(path))
                out.append(bytes(buf))
            return out
        finally:
            os.close(fd)

    # ---- exclusion
    @contextlib.contextmanager
    def lock(self, root: Path, *, timeout: float | None = 0) -> Iterator[Any]:
        lock = WriterLock(os.fspath(root))
        lock.acquire(timeout)
        try:
            yield lock
        finally:
            lock.release()
