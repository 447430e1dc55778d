"""Background saves: copy the state into reused staging memory, persist it in a thread.

``Store.save(..., blocking=False)`` does three things before it returns:

1. waits for the previous background save, if one is still running (at most
   one save is in flight; the wait is recorded as ``AsyncSave.wait_s``), and
   raises :class:`AsyncSaveError` if that save failed and nobody saw it yet;
2. encodes the state and copies every tensor into a :class:`StagingArea`, one
   block of host memory allocated on first use and reused by every later save
   (pinned when tensors live on a GPU, so the device-to-host copy is a DMA);
3. starts a daemon thread that runs the ordinary commit protocol (write,
   fsync, rename, directory fsync, tags, retention) on the staged copy.

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
commits; the next writer's recovery removes whatever it left in staging.
Stopping it rather than leaving it to run is not optional: a daemon thread
still inside a torch call when the interpreter finalizes is torn down by a
forced unwind through C++ frames, and the process aborts (SIGABRT) instead
of exiting. A ``SIGKILL`` or power loss mid-save leaves the
same state as for a synchronous save: every checkpoint is absent or whole.
"""

from __future__ import annotations

import atexit
import ctypes
import sys
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from ._errors import AsyncSaveError

_ALIGN = 64  # every staged tensor starts on a cache line
_memmove = ctypes.memmove


class StagingArea:
    """Host memory the state is copied into, sized on first use and reused by every later save.

    It grows (one new allocation) only when a save's state is larger than any
    before; a training run whose state keeps its shape allocates it once.
    ``allocations`` counts the allocations made, for tests and metrics.

    The staged tensors (views of the block) are kept with the list of
    ``(dtype, shape)`` they were made for: a training run saves the same
    structure every time, and making thousands of views costs more than the
    copy of small tensors. Reusing them is safe because at most one save is
    in flight: the previous save's writer is done with them before the next
    ``stage`` starts.
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self.capacity = 0
        self.pinned = False
        self.allocations = 0
        self._layout: list[tuple[torch.dtype, torch.Size]] | None = None
        self._staged: list[torch.Tensor] = []
        self._regions: list[tuple[int, int]] = []  # (offset, nbytes) of each staged tensor

    def stage(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copy ``tensors`` into the area; returns contiguous CPU copies that alias it."""
        pin = any(t.is_cuda for t in tensors) and torch.cuda.is_available()
        layout = [(t.dtype, t.shape) for t in tensors]
        if layout != self._layout or (pin and not self.pinned):
            self._plan(tensors, layout, pin)
        base = self._buffer.data_ptr()
        with torch.no_grad():
            for tensor, staged, (offset, nbytes) in zip(tensors, self._staged, self._regions):
                if not nbytes:
                    pass
                elif type(tensor) is torch.Tensor and tensor.is_cpu and tensor.is_contiguous() and not tensor.is_conj() and not tensor.is_neg():
                    # One single-threaded memcpy outside the GIL (ctypes releases
                    # it), straight between the two addresses: torch's copy_
                    # fans out to OpenMP threads, which spin badly on a busy
                    # small machine, and a per-tensor view or NumPy array
                    # costs more than copying a small tensor. The region was
                    # sized for this dtype and shape, and a contiguous tensor's
                    # bytes are one dense run from data_ptr().
                    _memmove(base + offset, tensor.data_ptr(), nbytes)
                else:
                    staged.copy_(tensor, non_blocking=pin and tensor.is_cuda)
        if pin:
            torch.cuda.synchronize()  # the copies must be complete before the caller may touch its tensors
        return list(self._staged)

    def _plan(self, tensors: list[torch.Tensor], layout: list[tuple[torch.dtype, torch.Size]], pin: bool) -> None:
        """Lay the tensors out in the block (growing it if needed) and make their staged views."""
        sizes = [t.numel() * t.element_size() for t in tensors]
        total = sum(-(-n // _ALIGN) * _ALIGN for n in sizes)
        self._layout = None  # invalid until the views below are made
        if self._buffer is None or total > self.capacity or (pin and not self.pinned):
            self._staged, self._regions = [], []
            self._buffer = None  # drop the old block (and its views) before taking the new one
            self._buffer = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=pin)
            self.capacity = max(total, 1)
            self.pinned = pin
            self.allocations += 1
        staged, regions = [], []
        offset = 0
        for (dtype, shape), nbytes in zip(layout, sizes):
            if nbytes:
                staged.append(self._buffer[offset : offset + nbytes].view(dtype).view(shape))
            else:
                staged.append(torch.empty(shape, dtype=dtype))
            regions.append((offset, nbytes))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        self._staged, self._regions, self._layout = staged, regions, layout


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
            raise AsyncSaveError(f"background save of step {self.step} failed: {exc}") from exc

    def __repr__(self) -> str:
        state = "running" if not self.done() else ("failed" if self._future.exception() else "done")
        return f"AsyncSave(step={self.step}, {state}, stall_s={self.stall_s:.4f})"


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
        self._unseen: AsyncSave | None = None
        self._lock = threading.Lock()
        _savers.add(self)

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

    def check_abandoned(self) -> None:
        """Raise SaveAbandoned once the exit handler has asked the save in flight to stop."""
        if self.abandoning.is_set():
            raise SaveAbandoned("background save abandoned at interpreter exit (wait_at_exit=False)")

    def raise_unseen(self) -> None:
        """Raise AsyncSaveError for a failed save nobody has seen yet (once)."""
        with self._lock:
            failed, self._unseen = self._unseen, None
        if failed is not None:
            exc = failed._future.exception()
            raise AsyncSaveError(f"background save of step {failed.step} failed: {exc}") from exc

    def mark_seen(self, handle: AsyncSave) -> None:
        with self._lock:
            if self._unseen is handle:
                self._unseen = None

    def start(self, handle: AsyncSave, work: Callable[[], Any]) -> None:
        """Run ``work`` in a daemon thread; its result or exception lands on ``handle``."""
        started = time.perf_counter()

        def run() -> None:
            try:
                result = work()
            except BaseException as exc:
                handle.write_s = time.perf_counter() - started
                with self._lock:
                    self._unseen = handle
                handle._future.set_exception(exc)
            else:
                handle.write_s = time.perf_counter() - started
                handle._future.set_result(result)

        handle._future.set_running_or_notify_cancel()
        self._current = handle
        threading.Thread(target=run, name=f"ckstore-save-{handle.step}", daemon=True).start()


class _suppress_all:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


_savers: weakref.WeakSet[BackgroundSaver] = weakref.WeakSet()


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
        except AsyncSaveError as exc:
            print(f"ckstore: {exc} (found at interpreter exit; the checkpoint was not committed)", file=sys.stderr)
