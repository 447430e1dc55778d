"""The single-writer lock of a store.

One process at a time may write a store. The lock is an OS file lock
(``filelock``, which opens the lock file with ``O_NOFOLLOW`` since 3.20.1), so
it is released by the kernel when the holder dies: a SIGKILLed trainer never
leaves a stale lock behind. Next to it the holder writes who it is (pid, host,
time) so a second writer's :class:`StoreLockedError` can name the holder.
Readers take no lock.

On a filesystem whose ``flock`` fails (Lustre mounted without ``-o flock``:
ENOSYS; NFSv3 with no reachable lock manager: ENOLCK) the lock is refused
with :class:`LockUnsupportedError`. filelock would otherwise fall back to a
"soft" lock file with a warning: a file that a SIGKILLed writer leaves behind
(the next run then waits forever) and that two hosts racing on a shared mount
can both believe they created. docs/distributed.md ("Shared filesystems")
says which mount options give working locks.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import warnings

import filelock

from . import durable as _durable
from . import mounts as _mounts
from . import safeio as _safeio
from ..errors import CkstoreError, InvalidArgumentError, LockUnsupportedError, StorageError, StoreLockedError
from ..format.text import escape

LOCK_NAME = ".ckstore.lock"
OWNER_NAME = ".ckstore.lock.owner"
#: What flock answers on a filesystem without working locks (anything else is a busy lock or a disk error).
UNSUPPORTED_LOCK_ERRNOS = frozenset(
    code for code in (errno.ENOSYS, errno.ENOLCK, getattr(errno, "EOPNOTSUPP", None), getattr(errno, "ENOTSUP", None)) if code is not None
)


def unsupported_lock_error(path: str, exc: OSError, what: str) -> LockUnsupportedError:
    """The error for a ``flock`` on ``path`` that failed with one of :data:`UNSUPPORTED_LOCK_ERRNOS`."""
    return LockUnsupportedError(
        f"{path}: cannot take the {what}: the filesystem does not support flock ({exc.strerror or exc}). "
        "ckstore needs working file locks to keep one writer per store: on Lustre mount with -o flock "
        "(or -o localflock if every writer runs on one node); on NFS run the lock manager (NFSv3 lockd/rpc.statd) "
        "or use NFSv4; or put the store on a local filesystem",
        errno=exc.errno,
        path=path,
    )


#: What the holder writes is ~80 bytes; anything much larger was not written by ckstore.
_MAX_OWNER_BYTES = 4096


class WriterLock:
    def __init__(self, root: str) -> None:
        self.root = root
        self.path = os.path.join(root, LOCK_NAME)
        # fallback_to_soft=False: see the module docstring (a soft lock outlives a dead holder).
        self._lock = filelock.FileLock(self.path, thread_local=False, fallback_to_soft=False)

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def acquire(self, timeout: float = 0) -> None:
        """Take the lock, waiting up to ``timeout`` seconds (``None`` waits forever)."""
        if self.held:
            return
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0):
            # filelock reads a negative timeout as "wait forever": refuse rather than hang.
            raise InvalidArgumentError(f"lock_timeout must be None (wait forever) or a number of seconds >= 0, got {timeout!r}")
        try:
            self._lock.acquire(timeout=-1 if timeout is None else timeout)
        except OSError as exc:  # not a busy lock: the lock file cannot be created or opened (EACCES, EROFS, ENOSPC)
            if isinstance(exc, filelock.Timeout):
                raise self._locked_error() from None
            if exc.errno in UNSUPPORTED_LOCK_ERRNOS:
                raise unsupported_lock_error(self.path, exc, "writer lock") from exc
            raise StorageError(f"{self.path}: cannot take the writer lock: {exc.strerror or exc}", errno=exc.errno, path=self.path) from exc
        reason = _mounts.host_local_locks(self.path)
        if reason is not None:
            # flock succeeded, but on this mount it binds this host only (docs/distributed.md).
            warnings.warn(
                f"{self.root}: {reason}: its file locks exclude processes of this host only, so writers on other hosts "
                "are not kept out of this store; write it from one host, or mount with cluster-wide locks "
                "(NFS: lock manager and no local_lock; Lustre: -o flock)",
                _mounts.HostLocalLockWarning,
                stacklevel=4,
            )
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        try:
            # Informational only (who holds the lock): the OS lock itself is what excludes other
            # writers, so this file needs no fsync; a power cut releases the lock anyway.
            _durable.write_file_atomic(os.path.join(self.root, OWNER_NAME), json.dumps(owner).encode(), site="lock_owner", durable=False)
        except BaseException as exc:
            self._lock.release()
            if isinstance(exc, OSError):
                # Disk full while recording who holds the lock: nothing of the store was touched.
                raise StorageError(f"{self.root}: cannot record the lock holder: {exc.strerror or exc}", errno=exc.errno, path=self.root) from exc
            raise

    def _locked_error(self) -> StoreLockedError:
        pid, host = self.holder()
        who = f"pid {pid} on {host}" if pid is not None else "another process"
        return StoreLockedError(
            f"{self.root}: the store is being written by {who}; one writer per store "
            "(open with readonly=True to read, or pass lock_timeout= to wait)",
            path=self.root,
            pid=pid,
            host=host,
        )

    def try_acquire(self) -> bool:
        try:
            self.acquire(timeout=0)
        except StoreLockedError:
            return False
        return True

    def release(self) -> None:
        if self.held:
            self._lock.release(force=True)

    def holder(self) -> tuple[int | None, str | None]:
        """The pid and host recorded by the current holder, if readable.

        The file is read like every store file (``_safeio``: no symlink, no
        FIFO, at most 4 KiB), so a planted FIFO or a link to ``/dev/zero``
        cannot hang or exhaust the process reporting a busy lock. The host
        goes into error messages: control characters (terminal escape
        sequences, newlines) are escaped.
        """
        path = os.path.join(self.root, OWNER_NAME)
        try:
            data = _safeio.read_small(path, cap=_MAX_OWNER_BYTES, what="lock owner file", error=lambda reason: InvalidArgumentError(reason))
            owner = json.loads(data.decode("utf-8"))
            pid, host = owner["pid"], owner["host"]
            if type(pid) is not int or not isinstance(host, str):
                return None, None
            return pid, escape(host[:255])  # the one escaper (ckstore.format.text)
        except (CkstoreError, OSError, ValueError, KeyError, TypeError, RecursionError):
            return None, None
