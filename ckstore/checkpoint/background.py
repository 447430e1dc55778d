"""Background saves: copy the state into reused host memory, persist it in a thread.

``Store.save(..., blocking=False)`` does three things before it returns:

1. waits for the previous background save, if one is still running (at most
   one save is in flight; the wait is recorded as ``AsyncSave.wait_s``), and
   raises :class:`AsyncSaveError` if that save failed and nobody saw it yet;
2. encodes the state and copies every tensor into a ``HostCopy`` (``ckstore.engine.host_copy``), one
   block of host memory allocated on first use and reused by every later save
   (pinned when tensors live on a GPU, so the device-to-host copy is a DMA);
3. hands the ordinary commit protocol (write,
   fsync, rename, directory fsync, tags, retention) on the host copy to the
   saver's daemon thread (a ``ckstore.engine.worker.SerialWorker``).

Because the copy is complete when ``save`` returns, the caller may modify its
tensors at once: the checkpoint holds the values at the moment of the call.

Failures are never silent. An exception in the background is kept and raised,
wrapped in :class:`AsyncSaveError` with the cause chained, by the next
``save``, by ``Store.wait()``, by ``Store.close()``, or by the handle's
``result()`` (whichever comes first; once raised it is not raised again).

Exit: an exit handler waits for the save in flight, so a process that returns
from ``main`` (or raises) never drops a checkpoint that ``save`` acknowledged;
a failure found then is printed to stderr. ``Store(..., wait_at_exit=False)``
opts out: the save is then abandoned at exit. It stops at its next chunk (the
exit waits only for the write or fsync already in progress) and never
commits; the next writer's recovery removes whatever it left in ``.staging/``.
Stopping it rather than leaving it to run is not optional: a daemon thread
still inside a torch call when the interpreter finalizes is torn down by a
forced unwind through C++ frames, and the process aborts (SIGABRT) instead
of exiting. A ``SIGKILL`` or power loss mid-save leaves the
same state as for a synchronous save: every checkpoint is absent or whole.

Fork: a child made with ``os.fork()`` while a save is in flight gets a copy of
the saver but not its thread, so the save would never finish there, and the
exit handler would wait for it forever. An ``os.register_at_fork`` handler
gives every saver in the child a clean slate (no save in flight, no failure
to report, fresh locks; ``ckstore.engine.worker`` does the same for its
thread and its failure record): the save belongs to the parent, which finishes and
reports it. The child may open stores and save on its own.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from ..engine.worker import SerialWorker, UnseenFailures
from ..errors import AsyncSaveError, CkstoreError, CommittedWithErrorsError


class AsyncSave:
    """Handle of a background save, returned by ``Store.save(..., blocking=False)``.

    ``stall_s`` is how long the ``save`` call blocked its caller: ``wait_s``
    waiting for the previous save, plus ``copy_s`` encoding and copying the
    state. ``write_s`` is the background time (None until done).
    """

    def __init__(self, step: int, saver: BackgroundSaver) -> None:
        self.step = step
        self.wait_s = 0.0
        self.copy_s = 0.0
        self.stall_s = 0.0
        self.write_s: float | None = None
        self._future: Future = Future()
        self._saver = saver

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the save; return its CheckpointInfo, or raise AsyncSaveError with the cause chained."""
        try:
            return self._future.result(timeout)
        except TimeoutError:
            raise
        except BaseException as exc:
            self._saver.mark_seen(self)
            raise _reported(self.step, exc) from exc

    def __repr__(self) -> str:
        state = "running" if not self.done() else ("failed" if self._future.exception() else "done")
        return f"AsyncSave(step={self.step}, {state}, stall_s={self.stall_s:.4f})"


def _reported(step: int, exc: BaseException | None) -> CkstoreError:
    """What a background save's failure is raised as: AsyncSaveError, unless the checkpoint did commit."""
    if isinstance(exc, CommittedWithErrorsError):
        # Not "failed": a retry would only get CheckpointExistsError.
        return CommittedWithErrorsError(str(exc), step=exc.step, errno=exc.errno, path=exc.path)
    return AsyncSaveError(f"background save of step {step} failed: {exc}")


class SaveAbandoned(AsyncSaveError):
    """Raised inside a background save that the exit handler stopped (``wait_at_exit=False``)."""


class BackgroundSaver:
    """At most one save running in a daemon thread; keeps its failure until someone sees it."""

    def __init__(self, *, wait_at_exit: bool = True) -> None:
        self.wait_at_exit = wait_at_exit
        #: Set by the exit handler when the save in flight is to be abandoned; the
        #: write path polls it (see :meth:`check_abandoned`).
        self.abandoning = threading.Event()
        self._current: AsyncSave | None = None
        #: At most one entry: a save starts only after raise_unseen() found none.
        self._unseen: UnseenFailures[AsyncSave] = UnseenFailures()
        # Stops when idle: no thread outlives its save. A daemon, so an abandoned save
        # (wait_at_exit=False) never holds the interpreter's exit.
        self._worker = SerialWorker("ckstore-save", daemon=True, stop_when_idle=True)
        _savers.add(self)

    def _after_fork_in_child(self) -> None:
        # The parent's save runs in a thread the child does not have: it is the parent's to
        # finish and report. Waiting on it here would hang the child (at exit, forever).
        # (Its worker and failure record reset themselves: ckstore.engine.worker.)
        self.abandoning = threading.Event()
        self._current = None

    @property
    def in_flight(self) -> AsyncSave | None:
        current = self._current
        return current if current is not None and not current.done() else None

    def wait(self) -> float:
        """Wait for the save in flight (if any); returns the seconds waited. Never raises the save's error."""
        current = self._current
        if current is None or current.done():
            return 0.0
        start = time.perf_counter()
        with _suppress_all():
            current._future.exception()
        return time.perf_counter() - start

    def last_result(self) -> Any:
        """What the last background save returned (its CheckpointInfo); None if it failed or none was made."""
        handle = self._current
        if handle is None or not handle.done() or handle._future.exception() is not None:
            return None
        return handle._future.result()

    def check_abandoned(self) -> None:
        """Raise SaveAbandoned once the exit handler has asked the save in flight to stop."""
        if self.abandoning.is_set():
            raise SaveAbandoned("background save abandoned at interpreter exit (wait_at_exit=False)")

    def raise_unseen(self) -> None:
        """Raise AsyncSaveError for a failed save nobody has seen yet (once)."""
        failed = self._unseen.pop()
        if failed is not None:
            exc = failed._future.exception()
            raise _reported(failed.step, exc) from exc

    def mark_seen(self, handle: AsyncSave) -> None:
        self._unseen.seen(handle)

    def start(self, handle: AsyncSave, work: Callable[[], Any]) -> None:
        """Run ``work`` on the saver's daemon thread; its result or exception lands on ``handle``."""
        started = time.perf_counter()

        def run() -> None:
            try:
                result = work()
            except BaseException as exc:
                handle.write_s = time.perf_counter() - started
                self._unseen.add(handle)
                handle._future.set_exception(exc)
            else:
                handle.write_s = time.perf_counter() - started
                handle._future.set_result(result)

        handle._future.set_running_or_notify_cancel()
        self._current = handle
        self._worker.submit(run)


class _suppress_all:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


_savers: weakref.WeakSet[BackgroundSaver] = weakref.WeakSet()


def _reset_savers_in_child() -> None:
    for saver in list(_savers):
        saver._after_fork_in_child()


os.register_at_fork(after_in_child=_reset_savers_in_child)

_forked: weakref.WeakSet[Any] = weakref.WeakSet()


def reset_after_fork(obj: Any) -> None:
    """Call ``obj._after_fork_in_child()`` in every child made by ``os.fork()`` while ``obj`` lives (a Store: fresh locks)."""
    _forked.add(obj)


def _reset_forked_in_child() -> None:
    for obj in list(_forked):
        obj._after_fork_in_child()


os.register_at_fork(after_in_child=_reset_forked_in_child)


@atexit.register
def _wait_at_exit() -> None:
    # Daemon threads keep running until the interpreter finalizes, which
    # happens after this handler: waiting here lets an acknowledged save finish.
    for saver in list(_savers):
        if saver._current is None:
            continue
        if not saver.wait_at_exit:
            # Abandon the save, but see it stop: the thread must be out of
            # torch before the interpreter finalizes (module docstring).
            saver.abandoning.set()
            saver.wait()
            continue
        saver.wait()
        try:
            saver.raise_unseen()
        except CommittedWithErrorsError as exc:
            print(f"ckstore: {exc} (found at interpreter exit)", file=sys.stderr)
        except AsyncSaveError as exc:
            print(f"ckstore: {exc} (found at interpreter exit; the checkpoint was not committed)", file=sys.stderr)
