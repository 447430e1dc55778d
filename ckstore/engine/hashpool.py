"""Threads that hash chunks in parallel, one per core the process may use.

BLAKE3 (and hashlib's SHA-256) release the GIL while they hash a large
buffer, so plain Python threads hash chunks on every core. Not BLAKE3's own
``max_threads``: that runs a Rayon pool, whose threads do not survive
``fork()`` (a child that hashes would hang). Not a ThreadPoolExecutor: it
refuses work once interpreter shutdown begins, which is when the exit
handler lets a background save finish.

Fork-safe: threads do not survive ``fork()``, so a pool used in a child
(found by its pid) starts threads of its own; the parent's queue, which may
hold tasks the child never owned, is abandoned.
"""

from __future__ import annotations

import os
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, as set by taskset or a container), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class HashPool:
    """``threads`` daemon threads running submitted calls from one queue (default: one per usable core)."""

    def __init__(self, threads: int | None = None, *, name: str = "ckstore-hash") -> None:
        self._want = threads
        self._name = name
        self._lock = threading.Lock()
        self._pid = -1
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        _pools.add(self)

    @property
    def size(self) -> int:
        return self._want or usable_cores()

    def _start(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            self._queue = queue.SimpleQueue()
            self._threads = [
                threading.Thread(target=self._run, args=(self._queue,), name=f"{self._name}-{i}", daemon=True) for i in range(self.size)
            ]
            for thread in self._threads:
                thread.start()
            self._pid = os.getpid()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self._pid != os.getpid():
            self._start()
        future: Future = Future()
        self._queue.put((future, fn, args))
        return future

    @staticmethod
    def _run(tasks: queue.SimpleQueue) -> None:
        while True:
            item = tasks.get()
            if item is None:
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

    def shutdown(self) -> None:
        """Stop the threads once the queued work is done (joined, unless called from one of them)."""
        if self._pid != os.getpid():
            return
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()
        self._threads, self._pid = [], -1


_pools: weakref.WeakSet[HashPool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A lock held by another parent thread at fork() stays held forever in the child: replace it.
    for pool in list(_pools):
        pool._lock = threading.Lock()
        pool._pid = -1
        pool._threads = []


os.register_at_fork(after_in_child=_after_fork_in_child)

_shared: HashPool | None = None
_shared_lock = threading.Lock()


def shared_pool() -> HashPool:
    """The process's pool for verifying reads (saves use their pipeline's own)."""
    global _shared
    if _shared is None:
        with _shared_lock:
            if _shared is None:
                _shared = HashPool(name="ckstore-verify")
    return _shared
