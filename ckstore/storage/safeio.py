"""The one module that opens and reads store files: no links followed, never blocking, bounded, typed.

A store may come from someone else (a downloaded run, a shared ``/tmp``), so
every file ckstore reads (manifests, ``tags.json``, tensor files, the lock
owner file) is:

* opened ``O_NOFOLLOW``: a symlink planted in the store is refused, never
  followed out of it (``/etc/passwd``, ``/dev/zero``);
* opened ``O_NONBLOCK``: opening a FIFO planted where a file belongs would
  otherwise block forever (it has no effect on regular files);
* checked with ``fstat`` to be a regular file (not a directory, FIFO or
  device) before anything is read;
* read up to a cap (small files), or up to the size the manifest promises
  (tensor files: the caller checks that size before allocating anything).

Every read system call of a store file goes through :func:`pread_into`,
:func:`preadv` or :func:`read_small`, and every open through
:func:`open_regular`, so that the fault-injection harness (the ``readfaults``
tier) can fail or shorten each one through :func:`set_hook`, as ``_durable``
lets it fail each write. A hook is called ``hook(op, path, info)`` before the
operation (``op`` is ``"open"`` or ``"read"``); it may raise ``OSError``
(EIO), or, for a read, return a byte count to shorten that read to (a short
read; ``0`` is an early end of file). The hook costs one global lookup per
system call when unset.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..errors import CheckpointReadError, CkstoreError

#: Operation names passed to hooks. Stable: the fault-injection harness keys on them.
OPS = ("open", "read")

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)

Hook = Callable[[str, str, dict[str, Any]], "int | None"]
_hook: Hook | None = None


def set_hook(hook: Hook | None) -> Hook | None:
    """Install ``hook`` for every open and read of a store file; returns the previous one."""
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


class NotRegularFile(OSError):
    """Raised by :func:`open_regular` for a symlink, directory, FIFO or device; callers turn it into their typed error."""

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(errno.EINVAL, f"not a regular file ({kind})", path)
        self.kind = kind


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str) -> tuple[int, os.stat_result]:
    """Open an existing regular file for reading, never following a symlink or blocking; return (fd, fstat).

    Raises FileNotFoundError if nothing is there, :class:`NotRegularFile` for
    a symlink (``O_NOFOLLOW`` gives ELOOP) or anything but a regular file,
    and the OSError of the open otherwise (EACCES, EIO, ...).
    """
    hook = _hook
    if hook is not None:
        hook("open", path, {})
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFile(path, "a symlink") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(path, _kind(st.st_mode))
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def pread_into(fd: int, view: memoryview, offset: int, path: str) -> int:
    """One ``pread`` into ``view`` at ``offset``; returns the bytes read (fewer at end of file, 0 past it)."""
    hook = _hook
    if hook is not None:
        limit = hook("read", path, {"offset": offset, "size": len(view)})
        if limit is not None:
            view = view[: max(0, min(limit, len(view)))]
            if not len(view):
                return 0
    return os.preadv(fd, [view], offset)


def preadv(fd: int, buffers: Sequence[Any], offset: int, path: str, nbytes: int) -> int:
    """One ``preadv`` of ``buffers`` (``nbytes`` in all) at ``offset``; returns the bytes read."""
    hook = _hook
    if hook is not None:
        limit = hook("read", path, {"offset": offset, "size": nbytes})
        if limit is not None and limit < nbytes:
            if limit <= 0:
                return 0
            first = memoryview(buffers[0]).cast("B")
            return os.preadv(fd, [first[: min(limit, len(first))]], offset)
    return os.preadv(fd, buffers, offset)


def read_exact(fd: int, view: memoryview, offset: int, path: str) -> None:
    """Fill ``view`` from ``offset``, retrying short reads; IntegrityError if the file ends first."""
    from ..errors import IntegrityError

    done = 0
    while done < len(view):
        n = pread_into(fd, view[done:], offset + done, path)
        if n == 0:
            raise IntegrityError(f"{path}: file shrank while being read", path=path, expected=offset + len(view), actual=offset + done)
        done += n


def read_small(path: str, *, cap: int, what: str, error: Callable[[str], CkstoreError]) -> bytes:
    """The whole of a small regular file (a manifest, ``tags.json``, the lock owner), at most ``cap`` bytes.

    FileNotFoundError if nothing is at ``path`` (callers decide what absence
    means); ``error(reason)`` for a symlink, a non-regular file or a file
    larger than ``cap`` (checked on ``fstat`` before anything is read, and
    again while reading in case it grows); :class:`CheckpointReadError` for
    any other OS error (EIO, EACCES).
    """
    try:
        fd, st = open_regular(path)
    except FileNotFoundError:
        raise
    except NotRegularFile as exc:
        raise error(f"{what} is not a regular file ({exc.kind}); refusing to read it") from None
    except OSError as exc:
        raise CheckpointReadError(f"{path}: cannot open {what}: {exc.strerror or exc}", path=path, errno=exc.errno) from None
    try:
        if st.st_size > cap:
            raise error(f"{what} is {st.st_size} bytes, more than the {cap}-byte cap")
        buffer = bytearray(st.st_size + 1)  # one byte more: a file that grew past its fstat size is caught
        view = memoryview(buffer)
        done = 0
        while done < len(buffer):
            n = pread_into(fd, view[done:], done, path)
            if n == 0:
                break
            done += n
        if done > st.st_size:
            raise error(f"{what} grew while being read (is something writing it?)")
        del view
        del buffer[done:]
        return bytes(buffer)
    except CkstoreError:
        raise
    except OSError as exc:
        raise CheckpointReadError(f"{path}: cannot read {what}: {exc.strerror or exc}", path=path, errno=exc.errno) from None
    finally:
        os.close(fd)

