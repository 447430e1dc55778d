"""Exceptions raised by ckstore.

Every error ckstore raises on purpose is a :class:`CkstoreError`. Where a
builtin exception says the same thing, the class also subclasses it, so
``except LookupError`` or ``except TimeoutError`` keep working::

    CkstoreError
    ├── IntegrityError            a file disagrees with its manifest (hash, size, missing, torn)
    │   └── CheckpointReadError (OSError)  reading a checkpoint file failed (EIO, ...); ``errno`` says why
    ├── ManifestError (ValueError)  a manifest is malformed or of an unsupported version
    ├── CheckpointNotFoundError (LookupError)
    ├── CheckpointExistsError (FileExistsError)
    ├── StoreLockedError (TimeoutError)  another process holds the writer lock
    ├── ReadOnlyStoreError        a write was asked of a readonly store
    ├── StateError (TypeError)    a state value cannot be saved, or does not fit on load
    ├── InvalidArgumentError (ValueError)  a bad step, metric, tag or option
    ├── StorageError (OSError)    the filesystem failed mid-write (ENOSPC, EIO); nothing committed is lost
    │   └── LockUnsupportedError  the filesystem has no working file locks (Lustre without -o flock, NFS without lockd)
    ├── AsyncSaveError            a background save failed; raised on the next call
    ├── DistributedError (RuntimeError)  a multi-rank save or load failed on another rank, or a rank was lost
    ├── CommittedWithErrorsError  a save committed (durable), then tagging or retention failed
    ├── DvcError                  publishing to or pulling from DVC failed (DVC, git or the remote; DVC missing)
    └── UnsafeStoreError (PermissionError)  the store is another user's, writable by others, or has a symlinked layout
"""

from __future__ import annotations

import os
from typing import Any


class CkstoreError(Exception):
    """Root of every error ckstore raises on purpose."""


class IntegrityError(CkstoreError):
    """A checkpoint file does not match its manifest.

    ``path`` names the file; ``expected`` and ``actual`` say what the manifest
    promised and what was found (a ``"<algo>:<hex>"`` hash, a size, or a short
    description such as ``"missing"``).
    """

    def __init__(self, message: str, *, path: str | os.PathLike[str], expected: Any = None, actual: Any = None) -> None:
        super().__init__(message)
        self.path = os.fspath(path)
        self.expected = expected
        self.actual = actual

    def __reduce__(self):  # keep the attributes across process boundaries
        return (_rebuild_integrity, (str(self), self.path, self.expected, self.actual))


def _rebuild_integrity(message: str, path: str, expected: Any, actual: Any) -> IntegrityError:
    return IntegrityError(message, path=path, expected=expected, actual=actual)


class CheckpointReadError(IntegrityError, OSError):
    """Reading a checkpoint's file failed at the OS level: EIO, a permission denied, a vanished directory.

    Like any IntegrityError the checkpoint is skipped by ``load()`` with no
    step (which falls back to an older one) and reported by ``verify()``.
    ``path`` names the file and ``errno`` the OS error (``errno.EIO``, ...).
    """

    def __init__(self, message: str, *, path: str | os.PathLike[str], errno: int | None = None) -> None:
        IntegrityError.__init__(self, message, path=path, expected="readable file", actual=os.strerror(errno) if errno else "unreadable")
        self.errno = errno
        self.filename = self.path
        self.strerror = message

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):
        return (_rebuild_read_error, (self.strerror, self.path, self.errno))


def _rebuild_read_error(message: str, path: str, errno: int | None) -> CheckpointReadError:
    return CheckpointReadError(message, path=path, errno=errno)


class ManifestError(CkstoreError, ValueError):
    """A manifest is malformed, lists unsafe paths, or has an unsupported format version."""

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = os.fspath(path) if path is not None else None


class CheckpointNotFoundError(CkstoreError, LookupError):
    """No committed checkpoint matches the step, alias or tag asked for."""

    def __init__(self, message: str, *, step: Any = None) -> None:
        super().__init__(message)
        self.step = step


class CheckpointExistsError(CkstoreError, FileExistsError):
    """A checkpoint for this step is already committed; steps are never overwritten."""

    def __init__(self, message: str, *, step: int) -> None:
        super().__init__(message)
        self.step = step

    def __reduce__(self):  # keep the attributes across process boundaries (a multi-rank save sends it to every rank)
        return (_rebuild_exists, (str(self), self.step))


def _rebuild_exists(message: str, step: int) -> CheckpointExistsError:
    return CheckpointExistsError(message, step=step)


class StoreLockedError(CkstoreError, TimeoutError):
    """Another writer holds the store's lock. ``pid`` and ``host`` name it when known."""

    def __init__(self, message: str, *, path: str, pid: int | None = None, host: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.pid = pid
        self.host = host

    def __reduce__(self):  # keep the attributes across process boundaries
        return (_rebuild_locked, (str(self), self.path, self.pid, self.host))


def _rebuild_locked(message: str, path: str, pid: int | None, host: str | None) -> StoreLockedError:
    return StoreLockedError(message, path=path, pid=pid, host=host)


class ReadOnlyStoreError(CkstoreError):
    """A write (save, tag, delete, gc) was asked of a store opened with ``readonly=True``."""


class StateError(CkstoreError, TypeError):
    """A state value cannot be stored, or a loaded value does not fit the object it is loaded into.

    ``key`` is the path of the offending value, e.g. ``state['optimizer']['state'][0]``.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class InvalidArgumentError(CkstoreError, ValueError):
    """An argument is out of range: a negative step, a NaN metric, a bad tag name, ..."""


class StorageError(CkstoreError, OSError):
    """The filesystem failed while writing (disk full, I/O error).

    The save or delete in progress was abandoned and its partial files removed;
    every checkpoint committed before it is intact. ``errno`` is the OS error
    number (``errno.ENOSPC``, ``errno.EIO``, ...).
    """

    def __init__(self, message: str, *, errno: int | None = None, path: str | None = None) -> None:
        CkstoreError.__init__(self, message)
        self.errno = errno
        self.filename = path
        self.strerror = message

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):  # keep the attributes across process boundaries
        return (_rebuild_storage, (self.strerror, self.errno, self.filename))


def _rebuild_storage(message: str, errno: int | None, path: str | None) -> StorageError:
    return StorageError(message, errno=errno, path=path)


class LockUnsupportedError(StorageError):
    """The store's filesystem refuses file locks (``flock`` fails with ENOSYS, ENOLCK or EOPNOTSUPP).

    Raised before anything is written. ckstore never falls back to a lock file: a lock file is not
    released when its holder dies, and on a shared mount two hosts could both believe they hold it.
    ``path`` is the lock file, ``errno`` what ``flock`` answered; the message says which mount option
    gives working locks (Lustre ``-o flock``, NFS with a running lock manager).
    """

    def __init__(self, message: str, *, errno: int | None = None, path: str) -> None:
        super().__init__(message, errno=errno, path=path)
        self.path = path

    def __reduce__(self):  # keep the attributes across process boundaries
        return (_rebuild_lock_unsupported, (self.strerror, self.errno, self.path))


def _rebuild_lock_unsupported(message: str, errno: int | None, path: str) -> LockUnsupportedError:
    return LockUnsupportedError(message, errno=errno, path=path)


class AsyncSaveError(CkstoreError):
    """A background save failed. Raised by the next ``save``, ``wait`` or ``close``; the cause is chained."""


class DistributedError(CkstoreError, RuntimeError):
    """A collective save or load of ``Store(..., process_group=...)`` failed as a whole.

    Raised on every surviving rank when another rank raised an error that is
    not ckstore's, or when a rank was lost: killed (gloo notices the closed
    connection within about a second) or silent past the process group's
    timeout (``ckstore.distributed.checkpoint_group(timeout=...)``). Nothing
    was committed unless the message says so; the cause is chained. ``rank``
    names the failed rank when known.
    """

    def __init__(self, message: str, *, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank

    def __reduce__(self):  # keep the attributes across process boundaries
        return (_rebuild_distributed, (str(self), self.rank))


def _rebuild_distributed(message: str, rank: int | None) -> DistributedError:
    return DistributedError(message, rank=rank)


class CommittedWithErrorsError(CkstoreError):
    """A save committed its checkpoint (durable, whole), then a later step failed: tagging it or retention.

    Not a failed save: do not save ``step`` again (that raises
    CheckpointExistsError). Background saves raise it as is, not wrapped in
    AsyncSaveError. ``errno`` is the OS error number when the disk failed.
    """

    def __init__(self, message: str, *, step: int, errno: int | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.errno = errno
        self.path = path

    def __reduce__(self):  # keep the attributes across process boundaries
        return (_rebuild_committed, (str(self), self.step, self.errno, self.path))


def _rebuild_committed(message: str, step: int, errno: int | None, path: str | None) -> CommittedWithErrorsError:
    return CommittedWithErrorsError(message, step=step, errno=errno, path=path)


class DvcError(CkstoreError):
    """A DVC or git operation of ``publish``/``pull`` failed, or DVC is not installed.

    A failure of a background publish is raised by its ``Publication.result()``
    and by the next ``publish`` on the same store; the cause is chained.
    """


class UnsafeStoreError(CkstoreError, PermissionError):
    """A store is not safe to act on: another user could make ckstore touch files outside it.

    Raised when a write is asked of a store whose root or layout directory
    (``checkpoints/``, ``.staging/``, ``.trash/``, ``.quarantine/``) is owned by another user or
    writable by group or others without the sticky bit (override with
    ``Store(..., trust_foreign=True)``), and, whatever the options, when one of
    those directories or the ``checkpoints/step-N`` to delete is a symlink.
    ``path`` names the offending entry.
    """

    def __init__(self, message: str, *, path: str | os.PathLike[str]) -> None:
        CkstoreError.__init__(self, message)
        self.errno = None
        self.filename = self.path = os.fspath(path)
        self.strerror = message

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):  # keep the attributes across process boundaries
        return (_rebuild_unsafe, (self.strerror, self.path))


def _rebuild_unsafe(message: str, path: str) -> UnsafeStoreError:
    return UnsafeStoreError(message, path=path)
