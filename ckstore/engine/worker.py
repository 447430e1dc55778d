"""The background-worker primitive: one thread running calls in order, and the failures nobody has seen.

Used by the write pipeline (its write and sync threads), by background saves
(``ckstore.checkpoint.background``) and by the DVC publisher
(``ckstore.integrations.dvc.worker``), so each keeps its own contract (what
is raised, when) on one implementation of the parts they share:

* :class:`SerialWorker`: submitted calls run one after another on one thread,
  each result or exception on its own ``Future``. Not a ThreadPoolExecutor:
  those refuse work once interpreter shutdown begins, which is exactly when
  an exit handler must let a background save finish.
* :class:`UnseenFailures`: failures kept until someone observes them, oldest
  first, each reported once.
* :func:`before_thread_shutdown`: the one place that runs a call before
  ``concurrent.futures`` closes its door at interpreter exit.

Fork: a child made with ``os.fork()`` gets copies of these objects but not
their threads, and a lock some parent thread held at the fork stays held
forever in the child. An ``os.register_at_fork`` handler gives every worker
and every failure record in the child a clean slate (no thread, empty queue,
no failure, fresh lock): the parent's work is the parent's to finish and
report, and the child's first submit starts a thread of its own.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class SerialWorker:
    """One thread running submitted calls in submission order.

    ``stop_when_idle=True``: the thread ends when the queue is empty and the
    next submit starts a new one (no thread outlives its work, so a
    non-daemon worker never holds the interpreter's exit). Otherwise the
    thread waits for work until :meth:`shutdown`.
    """

    def __init__(self, name: str, *, daemon: bool = True, stop_when_idle: bool = False) -> None:
        self.name = name
        self.daemon = daemon
        self.stop_when_idle = stop_when_idle
        self._fresh()
        _workers.add(self)

    def _fresh(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[tuple[Future, Callable[..., Any], tuple[Any, ...]] | None] = deque()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        with self._cond:
            self._queue.append((future, fn, args))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=self.daemon)
                self._thread.start()
            else:
                self._cond.notify()
        return future

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    if self.stop_when_idle:
                        self._thread = None
                        return
                    self._cond.wait()
                item = self._queue.popleft()
                if item is None:
                    self._thread = None
                    return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

    def join(self) -> None:
        """Wait until the queued work is done and the thread has stopped (``stop_when_idle`` workers only)."""
        while True:
            with self._cond:
                thread = self._thread
            if thread is None or thread is threading.current_thread():
                return
            thread.join()

    def shutdown(self) -> None:
        """Stop the thread once the queued work is done (joined, unless called from it)."""
        with self._cond:
            thread = self._thread
            if thread is None:
                return
            self._queue.append(None)
            self._cond.notify()
        if thread is not threading.current_thread():
            thread.join()


class UnseenFailures(Generic[T]):
    """Failed work nobody has observed yet, oldest first; each is reported once."""

    def __init__(self) -> None:
        self._fresh()
        _records.add(self)

    def _fresh(self) -> None:
        self._lock = threading.Lock()
        self._items: list[T] = []

    def add(self, item: T) -> None:
        with self._lock:
            self._items.append(item)

    def seen(self, item: T) -> None:
        """``item``'s failure was observed (raised to someone): never report it again."""
        with self._lock:
            if item in self._items:
                self._items.remove(item)

    def pop(self) -> T | None:
        """The oldest failure nobody has seen, now counted as seen; None when there is none."""
        with self._lock:
            return self._items.pop(0) if self._items else None

    def peek_all(self) -> list[T]:
        with self._lock:
            return list(self._items)


_workers: weakref.WeakSet[SerialWorker] = weakref.WeakSet()
_records: weakref.WeakSet[UnseenFailures[Any]] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The parent's threads are not in the child: a worker that believed its thread was
    # running would queue work nobody runs, and whoever waits for it (at exit too) would
    # hang. A parent thread holding one of these locks at the fork would hang the child too.
    for worker in list(_workers):
        worker._fresh()
    for record in list(_records):
        record._fresh()


os.register_at_fork(after_in_child=_after_fork_in_child)


def before_thread_shutdown(fn: Callable[[], None]) -> None:
    """Run ``fn`` at interpreter exit before ``concurrent.futures`` refuses new work.

    When the main thread ends, ``concurrent.futures`` refuses new work
    ("cannot schedule new futures after interpreter shutdown"), before
    ``atexit`` handlers run; work that needs an executor (DVC's push) must
    finish first. Threading's own exit callbacks run last-registered first, so
    one registered after ``concurrent.futures.thread`` is imported runs before
    its hook. The only hook at that point is private to ``threading``; where
    it is missing, ``fn`` runs as an ordinary ``atexit`` handler instead.
    """
    import concurrent.futures.thread  # noqa: F401  (registers its exit hook first, so ours runs before it)

    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        register(fn)
    else:  # pragma: no cover - every CPython from 3.9 has it
        import atexit

        atexit.register(fn)
