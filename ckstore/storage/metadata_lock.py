"""The metadata lock: a short-lived lock over the store's metadata files.

``tags.json`` (tags and pins) and ``metrics.json`` (metrics recorded after a
save) are store-level files that a shell may change while a training process
holds the writer lock: ``ckstore tag``, ``ckstore publish`` (its
``published.<name>`` pin) and an evaluation script's ``record_metrics`` must
not wait for a week-long run to end. So they are not guarded by the writer
lock but by this one, which any process may take for the few milliseconds of
a read-modify-replace.

The writer takes it too, wherever it reads metadata to act on it:
retention holds it from reading the tags through renaming every doomed
checkpoint into ``.trash/``, and the quarantine and recovery's tag pruning
hold it while they drop tags. A tag added concurrently is therefore either
seen by retention (its checkpoint is kept) or added after the deletion (and
refused, since its checkpoint no longer exists): never lost in between.

It is an ``flock`` on ``.ckstore.meta.lock``, opened with ``O_NOFOLLOW`` (a
symlink planted there is refused, never followed) for each use and closed
after, so the kernel releases it when a holder dies. Within a process every Store object on one root
shares one :class:`MetadataLock`, reentrant per thread (a flock is per open
file: a second descriptor of the same process would wait on the first).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
from collections.abc import Iterator

from ..errors import StorageError, StoreLockedError
from .lock import UNSUPPORTED_LOCK_ERRNOS, unsupported_lock_error

META_LOCK_NAME = ".ckstore.meta.lock"
#: How long a metadata change waits for the lock before giving up (holders keep it for milliseconds).
DEFAULT_TIMEOUT = 60.0
_POLL = 0.005

_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def metadata_lock(root: str) -> MetadataLock:
    """The one :class:`MetadataLock` of this process for the store at ``root`` (shared by its Store objects)."""
    path = os.path.join(root, META_LOCK_NAME)
    with _registry_lock:
        lock = _locks.get(path)
        if lock is None:
            lock = _locks[path] = MetadataLock(root)
        return lock


class MetadataLock:
    """Reentrant (per thread) exclusive lock over one store's metadata files; get it with :func:`metadata_lock`."""

    def __init__(self, root: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.root = root
        self.path = os.path.join(root, META_LOCK_NAME)
        self.timeout = timeout
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd = -1

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        deadline = time.monotonic() + self.timeout
        if not self._thread_lock.acquire(timeout=self.timeout):
            raise self._timeout_error()
        try:
            if self._depth == 0:
                self._fd = self._take(deadline)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fd, self._fd = self._fd, -1
                    try:
                        fcntl.flock(fd, fcntl.LOCK_UN)
                    finally:
                        os.close(fd)
        finally:
            self._thread_lock.release()

    def _take(self, deadline: float) -> int:
        try:
            # The lock file is empty and only ever locked: its creation need not be durable
            # (a power cut that loses it loses no lock: the kernel dropped every lock anyway).
            fd = os.open(self.path, _FLAGS, 0o644)
        except OSError as exc:
            message = f"{self.path}: cannot open the metadata lock: {exc.strerror or exc}"
            raise StorageError(message, errno=exc.errno, path=self.path) from exc
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EINTR):
                    os.close(fd)
                    if exc.errno in UNSUPPORTED_LOCK_ERRNOS:
                        raise unsupported_lock_error(self.path, exc, "metadata lock") from exc
                    message = f"{self.path}: cannot take the metadata lock: {exc.strerror or exc}"
                    raise StorageError(message, errno=exc.errno, path=self.path) from exc
            if time.monotonic() >= deadline:
                os.close(fd)
                raise self._timeout_error()
            time.sleep(_POLL)

    def _timeout_error(self) -> StoreLockedError:
        return StoreLockedError(
            f"{self.root}: the store's metadata lock ({META_LOCK_NAME}) stayed held for over {self.timeout:g} s; "
            "another process is changing tags or metrics, or is stuck doing so",
            path=self.root,
        )

    def _after_fork_in_child(self) -> None:
        # The child inherits a copy of the descriptor while a thread of the parent held
        # the lock: closing the copy leaves the parent's lock alone (flock(LOCK_UN) on it
        # would release the parent's lock too, as both refer to one open file).
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = -1
        self._depth = 0
        self._thread_lock = threading.RLock()


_locks: dict[str, MetadataLock] = {}
_registry_lock = threading.Lock()


def _reset_in_child() -> None:
    global _registry_lock
    # Locks a parent thread held at fork are held forever in the child: start afresh.
    _registry_lock = threading.Lock()
    for lock in _locks.values():
        lock._after_fork_in_child()


os.register_at_fork(after_in_child=_reset_in_child)
