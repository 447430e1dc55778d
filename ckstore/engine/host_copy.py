"""Host copies of a state: the memory a background save (and a sync save's GPU tensors) is copied into.

Not the ``.staging/`` directory (``ckstore.checkpoint.commit``): this is RAM.
A :class:`HostCopy` is one block of host memory allocated on first use and
reused by every later save (pinned when tensors live on a GPU, so the
device-to-host copy is a DMA). Because the copy is complete when
``save(..., blocking=False)`` returns, the caller may modify its tensors at
once: the checkpoint holds the values at the moment of the call.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import torch

from .write import check_tensor, prepare_tensor

_ALIGN = 64  # every copied tensor starts on a cache line
#: A state smaller than this is copied by the calling thread alone: starting a thread costs more than it saves.
_PARALLEL_BYTES = 16 << 20
#: At most this many threads copy one state (memory bandwidth, not cores, is the limit beyond it).
_MAX_COPY_THREADS = 4


def copy_threads() -> int:
    """How many threads a large host copy uses: the CPUs this process may run on, at most four."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(_MAX_COPY_THREADS, cpus))


class HostCopy:
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

    The copy is one ``torch._foreach_copy_`` per thread over a slice of the
    tensors, balanced by bytes: a single call per slice walks the list in C++
    with the GIL released, so the threads run in parallel (a Python loop of
    per-tensor copies would hand the GIL back and forth thousands of times)
    and the per-tensor cost is torch's dispatch, not the interpreter's.
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self.capacity = 0
        self.pinned = False
        self.allocations = 0
        self._layout: list[tuple[torch.dtype, torch.Size]] | None = None
        self._staged: list[torch.Tensor] = []
        self._slices: list[tuple[int, int]] = []  # [start, end) of the tensors each copying thread takes

    def copy(
        self, tensors: list[torch.Tensor], specs: list[tuple[torch.dtype, torch.Size]] | None = None, *, on_device: bool = True
    ) -> list[torch.Tensor]:
        """Copy ``tensors`` into the block; returns contiguous CPU copies that alias it.

        ``specs`` is each tensor's ``(dtype, shape)`` when the caller has it
        (``Encoded.specs``); the same list object as the previous save's tells
        the area, without a comparison, that its views still fit. A caller that
        knows every tensor is on the host says ``on_device=False``.
        """
        pin = on_device and torch.cuda.is_available() and any(t.is_cuda for t in tensors)
        if specs is None:
            specs = [(t.dtype, t.shape) for t in tensors]
        if not (specs is self._layout or specs == self._layout) or (pin and not self.pinned):
            self._plan(specs, pin)
        staged = self._staged
        with torch.no_grad():
            if pin:
                # Device tensors: asynchronous DMA into the pinned block, on the
                # caller's stream; host tensors: one batch copy.
                host_src, host_dst = [], []
                for tensor, view in zip(tensors, staged):
                    if tensor.is_cuda:
                        view.copy_(tensor, non_blocking=True)
                    else:
                        host_src.append(tensor)
                        host_dst.append(view)
                if host_src:
                    torch._foreach_copy_(host_dst, host_src)
                torch.cuda.synchronize()  # the copies must be complete before the caller may touch its tensors
            else:
                _parallel_copy(staged, tensors, self._slices)
        return list(staged)

    def _plan(self, specs: list[tuple[torch.dtype, torch.Size]], pin: bool) -> None:
        """Lay the tensors out in the block (growing it if needed), make their staged views and split the copy."""
        sizes = [shape.numel() * dtype.itemsize for dtype, shape in specs]
        total = sum(-(-n // _ALIGN) * _ALIGN for n in sizes)
        self._layout = None  # invalid until the views below are made
        if self._buffer is None or total > self.capacity or (pin and not self.pinned):
            self._staged = []
            self._buffer = None  # drop the old block (and its views) before taking the new one
            self._buffer = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=pin)
            self.capacity = max(total, 1)
            self.pinned = pin
            self.allocations += 1
        staged = []
        offset = 0
        for (dtype, shape), nbytes in zip(specs, sizes):
            if nbytes:
                staged.append(self._buffer[offset : offset + nbytes].view(dtype).view(shape))
            else:
                staged.append(torch.empty(shape, dtype=dtype))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        self._staged, self._slices, self._layout = staged, _split(sizes, copy_threads() if total >= _PARALLEL_BYTES else 1), specs


def _split(sizes: list[int], parts: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of ``sizes`` in order, at most ``parts`` of them, of about equal bytes."""
    total = sum(sizes)
    bounds, start, done = [], 0, 0
    for index, nbytes in enumerate(sizes):
        done += nbytes
        if len(bounds) < parts - 1 and done * parts >= total * (len(bounds) + 1):
            bounds.append((start, index + 1))
            start = index + 1
    bounds.append((start, len(sizes)))
    return [b for b in bounds if b[0] < b[1]] or [(0, 0)]


def _parallel_copy(dst: list[torch.Tensor], src: list[torch.Tensor], slices: list[tuple[int, int]]) -> None:
    """``dst[i].copy_(src[i])`` for all i: each slice in its own thread, the first in the caller's."""
    errors: list[BaseException] = []

    def copy(start: int, end: int) -> None:
        if start == end:
            return  # torch refuses an empty list
        try:
            with torch.no_grad():
                torch._foreach_copy_(dst[start:end], src[start:end])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller below
            errors.append(exc)

    threads = [threading.Thread(target=copy, args=bounds, name="ckstore-stage", daemon=True) for bounds in slices[1:]]
    for thread in threads:
        thread.start()
    copy(*slices[0])
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def preparer(fingerprints: dict[int, tuple] | None, *, host_copied: bool) -> Callable[[torch.Tensor, str], torch.Tensor] | None:
    """The per-tensor check for ``encode_state``; with ``fingerprints`` (incremental saves) it records each tensor's identity.

    ``host_copied``: the tensors go through a :class:`HostCopy` next, which
    does what ``prepare_tensor`` would (contiguous, on the host), so they are
    only validated.
    """
    if fingerprints is None:
        return None if host_copied else prepare_for_sync_save
    check = check_tensor if host_copied else prepare_for_sync_save

    def prepare(tensor: torch.Tensor, key: str) -> torch.Tensor:
        prepared = check(tensor, key)
        # detach() shares the version counter, so an in-place update of the
        # original (optimizer step, copy_, fill_) changes ``_version``.
        storage = tensor.untyped_storage().data_ptr() if tensor.numel() else 0
        fingerprints[id(prepared)] = (
            str(tensor.device), storage, tensor.storage_offset(), tensor._version, tensor.dtype, tuple(tensor.shape), tuple(tensor.stride())
        )
        return prepared

    return prepare


def prepare_for_sync_save(tensor: torch.Tensor, key: str) -> torch.Tensor:
    """prepare_tensor, except that GPU tensors stay put: :func:`copy_device_tensors` copies them in one batch."""
    if tensor.device.type == "cuda":
        return check_tensor(tensor, key)
    return prepare_tensor(tensor, key)


def copy_device_tensors(files: dict[str, list[tuple[str, torch.Tensor]]], host: HostCopy) -> None:
    """Copy a sync save's GPU tensors to host memory in one batch: pinned memory, async copies, one synchronize.

    A blocking ``.to("cpu")`` per tensor into pageable memory costs a
    round trip each (10,000 small tensors: seconds). Background saves
    arrive here already copied; this is a no-op for them.
    """
    order = [(name, i) for name, entries in files.items() for i, (_, tensor) in enumerate(entries) if tensor.device.type == "cuda"]
    if not order:
        return
    copies = host.copy([files[name][i][1] for name, i in order])
    for (name, i), tensor in zip(order, copies):
        files[name][i] = (files[name][i][0], tensor)
