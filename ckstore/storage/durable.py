"""The one module that touches the disk for writing.

Every open-for-write, write, fsync, rename, directory fsync, mkdir, unlink and
rmdir of store files goes through the functions here, so that:

* the ordering rules live in one place (a rename is not durable until the
  directory holding it is fsynced; a file's data is not durable until the file
  is fsynced; after a failed fsync the dirty pages may already be dropped, so
  the caller must abandon the write, never retry the fsync);
* the fault-injection harness (``fault_injection/``) can observe, record, fail
  or kill the process at each operation through :func:`set_hook`.

A hook is called twice per operation, ``hook(op, "before", path, info)`` and
``hook(op, "after", path, info)``. ``op`` is one of :data:`OPS`. ``info`` holds
the operation's details: ``site`` (a stable name of the call site, e.g.
``"file"`` or ``"checkpoints_dir"``), ``dst`` for renames, ``offset`` and
``data`` (a memoryview, valid only during the call) for writes. A hook may raise
``OSError`` to inject a disk error or kill the process; the error propagates as
if the system call had failed.

Fast writes: ``FileWriter(path, direct=True)`` bypasses the page cache with
``O_DIRECT`` while every write is aligned (address, length and file offset
multiples of :data:`DIRECT_ALIGN`); the first unaligned write (the tail of a
file) switches the descriptor back to buffered I/O, and a filesystem that
refuses ``O_DIRECT`` (tmpfs on older kernels, some FUSE mounts) silently gets
buffered writes. Either way ``sync`` is what makes the data durable. Unchanged
files of an incremental save are hard-linked with :func:`link` (op ``"link"``);
the new name is durable once its directory is fsynced.

Backends: these functions are the local POSIX implementation of the storage
protocol (``storage/base.py``). Each operation is dispatched to the backend
installed with ``storage.base.using`` when there is one (the crash model
installs ``storage/recording.py``'s, which records every operation), else it
runs as written here. ``storage/local.py`` is the backend that runs these
bodies; a composite operation (:func:`write_file_atomic`, :func:`make_dirs`,
:func:`remove_tree`) calls its steps by name, so each step is dispatched too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import secrets
import stat
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from . import base as _base

#: Operation names passed to hooks. Stable: the fault-injection harness keys on them.
OPS = ("create", "write", "fsync", "close", "rename", "fsync_dir", "mkdir", "unlink", "rmdir", "link")

#: Alignment O_DIRECT needs of buffer addresses, lengths and offsets (covers 512 and 4096-byte sectors).
DIRECT_ALIGN = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)

Hook = Callable[[str, str, str, dict[str, Any]], None]

_hook: Hook | None = None


def set_hook(hook: Hook | None) -> Hook | None:
    """Install ``hook`` for every durable operation; returns the previous one."""
    global _hook
    previous, _hook = _hook, hook
    return previous


@contextlib.contextmanager
def hooked(hook: Hook) -> Iterator[None]:
    previous = set_hook(hook)
    try:
        yield
    finally:
        set_hook(previous)


def _dispatched(posix: Callable[..., Any], path_arg: int = 0) -> Callable[..., Any]:
    """Run ``posix`` or, when a backend is mounted at the path or installed, the backend's method of the same name.

    ``path_arg``: the position of the path that picks the backend. ``.posix`` keeps the body for
    ``LocalStorage``, so the local backend runs it without dispatching back to itself.
    """
    name = posix.__name__.lstrip("_")

    @functools.wraps(posix)
    def operation(*args: Any, **kwargs: Any) -> Any:
        path = args[path_arg] if len(args) > path_arg else kwargs.get("path", kwargs.get("src"))
        backend = _base.installed(path)
        if backend is None:
            return posix(*args, **kwargs)
        return getattr(backend, name)(*args, **kwargs)

    operation.posix = posix  # type: ignore[attr-defined]
    return operation


def _emit(op: str, phase: str, path: str, info: dict[str, Any]) -> None:
    hook = _hook
    if hook is not None:
        hook(op, phase, path, info)


_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)


class FileWriter:
    """A new file written sequentially, then fsynced and closed.

    The file is created with ``O_EXCL | O_NOFOLLOW``: it never overwrites or
    follows anything already at ``path``. Once :meth:`sync` has failed the
    writer refuses further work: the kernel may have dropped the unsynced pages
    and a second fsync could report success over lost data (fsyncgate).
    """

    __slots__ = ("path", "site", "offset", "direct", "_fd", "_failed", "_fsync")

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        site: str = "file",
        mode: int = 0o644,
        direct: bool = False,
        fsync: Callable[[int], None] | None = None,
    ) -> None:
        # fsync: the system call (a backend may fail it, as a disk does: the crash model's fsyncgate runs).
        self._fsync = fsync
        self.path = os.fspath(path)
        self.site = site
        self.offset = 0
        self.direct = False
        self._failed = False
        info = {"site": site}
        _emit("create", "before", self.path, info)
        self._fd = os.open(self.path, _WRITE_FLAGS, mode)
        _emit("create", "after", self.path, info)
        if direct and _O_DIRECT:
            # O_DIRECT is switched on after the O_EXCL create rather than passed
            # to open(): where the filesystem refuses it, open() fails with EINVAL
            # *after* creating the file, which would leave a stray file behind.
            self.direct = self._set_direct(True)

    def _set_direct(self, on: bool) -> bool:
        try:
            flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            fcntl.fcntl(self._fd, fcntl.F_SETFL, (flags | _O_DIRECT) if on else (flags & ~_O_DIRECT))
        except OSError:
            return False  # refused (tmpfs, FUSE): plain buffered writes, same durability after fsync
        return on

    def _aligned(self, view: memoryview) -> bool:
        if self.offset % DIRECT_ALIGN or len(view) % DIRECT_ALIGN:
            return False
        return len(view) == 0 or np.frombuffer(view, dtype=np.uint8).ctypes.data % DIRECT_ALIGN == 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` (retrying short writes and EINTR) at the current offset."""
        self._check()
        view = memoryview(data).cast("B") if not isinstance(data, memoryview) or data.format != "B" else data
        total = len(view)
        info = {"site": self.site, "offset": self.offset, "data": view}
        _emit("write", "before", self.path, info)
        if self.direct and not self._aligned(view):
            # An unaligned write (normally the file's tail) cannot bypass the
            # page cache; the rest of the file goes through it.
            self._set_direct(False)
            self.direct = False
        done = 0
        try:
            while done < total:
                # os.write may write less than asked (signals, pipes, some FUSE
                # filesystems); a short count is not an error, keep going.
                try:
                    done += os.write(self._fd, view[done:])
                except OSError as exc:
                    if not (self.direct and exc.errno == errno.EINVAL):
                        raise
                    # The filesystem accepted the O_DIRECT flag but not this
                    # write (stricter alignment): nothing was written, go buffered.
                    self._set_direct(False)
                    self.direct = False
                    continue
                if self.direct and done % DIRECT_ALIGN:
                    self._set_direct(False)  # a short direct write left the offset unaligned
                    self.direct = False
        except BaseException:
            self._failed = True
            raise
        finally:
            self.offset += done
        _emit("write", "after", self.path, info)

    def sync(self) -> None:
        """fsync the file's data and metadata. A failure is final for this file."""
        self._check()
        info = {"site": self.site}
        _emit("fsync", "before", self.path, info)
        try:
            # os.fsync looked up at the call, not bound at import: a harness that replaces it for a
            # run (fault_injection.diskerrors) must reach this call, or its injected EIO never fires.
            (self._fsync or os.fsync)(self._fd)
        except BaseException:
            self._failed = True
            raise
        _emit("fsync", "after", self.path, info)

    def close(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        info = {"site": self.site}
        _emit("close", "before", self.path, info)
        os.close(fd)
        _emit("close", "after", self.path, info)

    def _check(self) -> None:
        if self._fd < 0:
            raise ValueError(f"{self.path}: writer is closed")
        if self._failed:
            raise OSError(f"{self.path}: an earlier write or fsync failed; the file must be abandoned")

    def __enter__(self) -> FileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@_dispatched
def create(path: str | os.PathLike[str], *, site: str = "file", mode: int = 0o644, direct: bool = False) -> FileWriter:
    """A new file at ``path`` (create-exclusive, no link followed), written through a :class:`FileWriter`."""
    return FileWriter(path, site=site, mode=mode, direct=direct)


@_dispatched
def sync_dir(path: str | os.PathLike[str], *, site: str, fsync: Callable[[int], None] | None = None) -> None:
    """fsync a directory, making the creations, renames and unlinks inside it durable."""
    path = os.fspath(path)
    info = {"site": site}
    _emit("fsync_dir", "before", path, info)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        (fsync or os.fsync)(fd)
    finally:
        os.close(fd)
    _emit("fsync_dir", "after", path, info)


@_dispatched
def make_dir(path: str | os.PathLike[str], *, site: str, exist_ok: bool = False) -> bool:
    """Create one directory; returns False if it existed and ``exist_ok``.

    The new entry is durable only once the parent is fsynced (:func:`sync_dir`).
    """
    path = os.fspath(path)
    info = {"site": site}
    _emit("mkdir", "before", path, info)
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        if exist_ok and stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        raise
    _emit("mkdir", "after", path, info)
    return True


@_dispatched
def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, site: str, replace: bool = False) -> None:
    """Rename ``src`` to ``dst`` in one atomic step.

    With ``replace=False`` an existing ``dst`` is an error (``FileExistsError``)
    rather than being silently swapped out. Callers hold the writer lock, so the
    check and the rename cannot race another ckstore writer. The rename is
    durable only once the directories holding ``src`` and ``dst`` are fsynced.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    info = {"site": site, "dst": dst}
    _emit("rename", "before", src, info)
    if not replace and os.path.lexists(dst):
        raise FileExistsError(f"{dst} already exists")
    os.replace(src, dst)
    _emit("rename", "after", src, info)


@_dispatched
def link(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, site: str) -> None:
    """Give the existing file ``src`` a second name ``dst`` (a hard link; ``dst`` must not exist).

    Both names share one inode: the data is written once and stays until the
    last name is unlinked, so deleting either checkpoint never harms the other.
    The new name is durable once the directory holding ``dst`` is fsynced.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    info = {"site": site, "dst": dst}
    _emit("link", "before", src, info)
    os.link(src, dst, follow_symlinks=False)
    _emit("link", "after", src, info)


@_dispatched
def unlink(path: str | os.PathLike[str], *, site: str) -> None:
    path = os.fspath(path)
    info = {"site": site}
    _emit("unlink", "before", path, info)
    os.unlink(path)
    _emit("unlink", "after", path, info)


@_dispatched
def remove_dir(path: str | os.PathLike[str], *, site: str) -> None:
    path = os.fspath(path)
    info = {"site": site}
    _emit("rmdir", "before", path, info)
    os.rmdir(path)
    _emit("rmdir", "after", path, info)


#: Flags that open a directory without following a symlink at the last component or blocking on a FIFO.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)

#: Deepest tree :func:`remove_tree` empties. ckstore's own trees are two levels deep; a deeper one
#: was planted, and emptying it level by level would hold one descriptor per level.
MAX_TREE_DEPTH = 64


def open_dir(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> int:
    """Open a directory for ``*at`` calls; a symlink (``ELOOP``) or non-directory (``ENOTDIR``) there is refused."""
    return os.open(path, _DIR_FLAGS, dir_fd=dir_fd)


@_dispatched
def make_dirs(path: str | os.PathLike[str], *, site: str) -> None:
    """Create ``path``'s missing ancestors and ``path`` itself, one by one, each made durable in its parent.

    Unlike ``os.makedirs``, each new directory's parent is fsynced right after
    the ``mkdir``, so a power cut cannot keep a child while losing its parent's
    entry; each ``mkdir`` (site ``site``) and fsync (``site + "_dir"``) is hooked.
    """
    path = os.path.abspath(os.fspath(path))
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for new in reversed(missing):
        if make_dir(new, site=site, exist_ok=True):
            sync_dir(os.path.dirname(new), site=site + "_dir")


@_dispatched
def remove_tree(path: str | os.PathLike[str], *, site: str) -> None:
    """Remove ``path`` and everything under it, never following a symlink; gone already is fine.

    Every step is relative to an open directory descriptor, and each level is
    opened with ``O_NOFOLLOW | O_DIRECTORY`` (as ``shutil.rmtree`` does with
    ``dir_fd``): a symlink, at the top or anywhere below, is unlinked and its
    target never touched, even if another user swaps a directory for a
    symlink while the tree is being removed (a path-based walk would then
    follow the link and delete outside the store). Each unlink and rmdir is
    reported to the hook under ``site``. ``path``'s parent must be a real
    directory (a symlink there is refused with ``ELOOP``/``ENOTDIR``).
    """
    path = os.fspath(path).rstrip(os.sep) or os.sep
    parent, name = os.path.split(path)
    try:
        parent_fd = open_dir(parent or ".")
    except FileNotFoundError:
        return
    try:
        _remove_at(parent_fd, name, path, site)
    finally:
        os.close(parent_fd)


def _remove_at(top_fd: int, name: str, path: str, site: str) -> None:
    # Depth-first without recursion: each frame is (fd, path, entries left, parent fd, name in parent).
    stack: list[tuple[int, str, list[tuple[str, bool]], int, str]] = []
    try:
        _enter_or_unlink(stack, top_fd, name, path, site, looks_like_dir=True)
        while stack:
            fd, dir_path, entries, parent_fd, dir_name = stack[-1]
            if entries:
                child, is_dir = entries.pop()
                _enter_or_unlink(stack, fd, child, os.path.join(dir_path, child), site, looks_like_dir=is_dir)
                continue
            stack.pop()
            os.close(fd)
            _rmdir_at(parent_fd, dir_name, dir_path, site)
    finally:
        for frame in reversed(stack):
            os.close(frame[0])


def _enter_or_unlink(stack: list, parent_fd: int, name: str, path: str, site: str, *, looks_like_dir: bool) -> None:
    """Push directory ``name`` of ``parent_fd`` on ``stack`` to be emptied, or unlink it if it is anything else."""
    if not looks_like_dir:
        try:
            _unlink_at(parent_fd, name, path, site)
            return
        except OSError as exc:
            # A directory after all (swapped in since it was listed): empty it first. Linux says
            # EISDIR; POSIX allows EPERM.
            if exc.errno not in (errno.EISDIR, errno.EPERM):
                raise
    try:
        fd = open_dir(name, dir_fd=parent_fd)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        _unlink_at(parent_fd, name, path, site)  # a symlink or a file (perhaps swapped in): remove the name only
        return
    if len(stack) >= MAX_TREE_DEPTH:
        os.close(fd)
        raise OSError(errno.ELOOP, f"directory tree deeper than {MAX_TREE_DEPTH} levels; not removing it", path)
    with contextlib.closing(os.scandir(fd)) as it:
        entries = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in it]
    stack.append((fd, path, entries, parent_fd, name))


@functools.partial(_dispatched, path_arg=2)
def _unlink_at(dir_fd: int, name: str, path: str, site: str) -> bool:
    """Remove ``name`` of ``dir_fd`` (``path`` names it for hooks); False if it was gone already."""
    info = {"site": site}
    _emit("unlink", "before", path, info)
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    _emit("unlink", "after", path, info)
    return True


@functools.partial(_dispatched, path_arg=2)
def _rmdir_at(dir_fd: int, name: str, path: str, site: str) -> bool:
    """Remove ``name`` of ``dir_fd`` (``path`` names it for hooks); False if it was gone already."""
    info = {"site": site}
    _emit("rmdir", "before", path, info)
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    _emit("rmdir", "after", path, info)
    return True


@_dispatched
def write_file_atomic(path: str | os.PathLike[str], data: bytes, *, site: str, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content, never a mix.

    Temp file in the same directory, write, fsync, close, rename over the
    target, fsync the directory. The temp name starts with ``.`` and contains
    ``.tmp-`` so recovery can recognise and remove a leftover. With
    ``durable=False`` both fsyncs are skipped: a power cut may then bring back
    the old content or leave an empty file, which suits informational files
    only (the lock owner's pid and host), never store state.
    """
    path = os.fspath(path)
    parent, name = os.path.split(path)
    tmp = os.path.join(parent, f".{name}.tmp-{secrets.token_hex(6)}")
    writer = create(tmp, site=site)
    try:
        writer.write(data)
        if durable:
            writer.sync()
    except BaseException:
        writer.close()
        with contextlib.suppress(OSError):
            unlink(tmp, site=site)
        raise
    writer.close()
    rename(tmp, path, site=site, replace=True)
    if durable:
        sync_dir(parent or ".", site=site + "_dir")


@contextlib.contextmanager
def scratch_dir(*, prefix: str) -> Iterator[str]:
    """A private temporary directory (mode 0700) for files another library must read from a path, removed
    with everything in it when the block ends. Never store state: nothing in it is fsynced."""
    path = tempfile.mkdtemp(prefix=prefix)
    try:
        yield path
    finally:
        remove_tree(path, site="scratch")


def is_temp_name(name: str) -> bool:
    """True for the names :func:`write_file_atomic` uses for its temp files."""
    return name.startswith(".") and ".tmp-" in name
