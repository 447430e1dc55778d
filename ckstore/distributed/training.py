"""Training helpers at N ranks: a preemption flag all ranks agree on, and a resume step all ranks agree on.

* :class:`Preemption` catches SIGTERM (or other signals) on any rank and only
  records it. :meth:`Preemption.should_stop`, called by every rank at each step
  boundary, carries the flag through one tiny all-reduce (MAX of one integer),
  so every rank sees the same answer at the same step: they all save that
  step and exit, instead of the signalled rank leaving mid-collective.
* :func:`agree_on_step` picks the checkpoint to resume from: the newest
  committed one that verifies on every rank. The files are split over the
  ranks (file ``i`` is verified by rank ``i % world``), so each byte is hashed
  once in all, and one ``all_gather_object`` of step lists decides.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterable
from typing import Any

import torch

from ..engine.read import verify_tensor_file
from ..errors import CkstoreError, InvalidArgumentError
from ..store import Store
from ..storage.layout import step_dir_name


class Preemption:
    """Record preemption signals; agree at step boundaries through a collective. Use as a context manager.

    ``group`` is the process group for the all-reduce (gloo: a CPU tensor).
    Handlers are installed from the main thread only (Python's rule) and the
    previous handlers are restored on exit.
    """

    def __init__(self, *, signals: Iterable[int] = (signal.SIGTERM,), group: Any = None) -> None:
        self.signals = tuple(signals)
        self.group = group
        self.requested = False  # this rank received a signal
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is not threading.main_thread():
            raise InvalidArgumentError("Preemption must be entered on the main thread (signal handlers are installed there)")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only a flag: the handler runs between bytecodes, possibly inside a collective; acting here would desynchronise ranks.
        self.requested = True

    def should_stop(self) -> bool:
        """True on every rank if any rank was signalled. A collective: every rank calls it at the same step boundary."""
        import torch.distributed as dist

        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())


def verified_steps(store: Store, *, rank: int, world: int) -> list[int]:
    """Committed steps, newest first, whose manifest parses and whose files assigned to this rank (``i % world == rank``) verify."""
    if not (0 <= rank < world):
        raise InvalidArgumentError(f"rank {rank} is not in 0..{world - 1}")
    good = []
    for info in reversed(store.checkpoints()):  # commit order, newest first
        name = step_dir_name(info.step)
        try:
            manifest = store._manifest(name)
            for i, (file, entry) in enumerate(sorted(manifest.files.items())):
                if i % world == rank:
                    verify_tensor_file(os.path.join(store._ckpt_dir, name, file), size=entry.size, expected=entry.expected)
        except CkstoreError:
            continue
        good.append(info.step)
    return good


def agree_on_step(store: Store, *, group: Any = None) -> int | None:
    """The newest committed step that verifies on every rank (None if there is none). A collective."""
    import torch.distributed as dist

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    mine = verified_steps(store, rank=rank, world=world)
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    common = set(everyone[0]).intersection(*map(set, everyone[1:]))
    # Newest in commit order as rank 0 listed it (every rank lists the same committed checkpoints).
    return next((step for step in everyone[0] if step in common), None)


def per_rank(state: Any, *, group: Any = None) -> dict[str, Any]:
    """``{"rank-<r>": state}`` for this rank: values that differ per rank (RNG state, data position) under their own name.

    DCP takes a plain (non-DTensor) tensor saved under the same name on every
    rank for a replicated one and writes it once, from one rank: without
    this, every rank but one would resume with another rank's RNG stream.
    Load with the same wrapper on each rank (same world size): each rank
    reads back its own entry.
    """
    import torch.distributed as dist

    rank = dist.get_rank(group) if dist.is_initialized() else 0
    return {f"rank-{rank:05d}": state}
