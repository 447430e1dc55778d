"""``Store(path, process_group=pg)``: one store that the ranks of a group save into and load from together.

Every rank opens the same shared path with the same group, and calls
``save`` and ``load`` at the same point with its own state: they are
collectives of the group, run by DCP (``torch.distributed.checkpoint``) with
ckstore's storage pair (``ckstore.distributed.dcp``), so DTensor and FSDP2
shards are written by the ranks that own them, tensors that are the same on
every rank (DDP) are written once, and a load reshards (N ranks to M).
Values that differ per rank under one name go through
:func:`ckstore.distributed.training.per_rank`; without it DCP takes them
for replicated and keeps one.

A save (:meth:`Ranks.save`):

1. **Agree.** One ``all_gather_object`` carries each rank's step and the
   error its own checks raised (a bad step, metric or tag, a closed or
   readonly store, a background save's failure nobody saw). An error is
   raised on every rank (the lowest rank's, the same type everywhere), and
   so is ranks passing different steps (InvalidArgumentError). Nothing has
   been written.
2. **Write and commit.** ``dcp.save`` (``dcp.async_save`` for
   ``blocking=False``) on the group, with :class:`StoreWriter` and
   :class:`ValueSavePlanner` (non-tensor values as JSON, never pickle): the
   protocol of ``ckstore.distributed.coordinator``. Only the coordinator
   (group rank 0) takes the writer lock, recovers, refuses a committed step,
   commits, tags and applies retention, with its own Store's options; the
   metrics and tags recorded are the coordinator's.
3. **Result.** The coordinator broadcasts the committed ``CheckpointInfo``;
   every rank returns it. A failure on any rank is raised on every rank: a
   ckstore error as it is (CheckpointExistsError for a committed step,
   StateError naming a key; the lowest rank's first), anything else as
   :class:`DistributedError` naming the rank, the cause chained. With
   ``blocking=False`` steps 2-3 finish in the Store's background saver: the
   handle, ``store.wait()``, the next ``save`` and ``close()`` report a
   failure as AsyncSaveError, as for a single process.

A load (:meth:`Ranks.load`) agrees the same way on the checkpoint (with
``step=None``, :func:`~ckstore.distributed.training.agree_on_step`: the
newest that verifies on every rank), then runs ``dcp.load`` into ``state``
(required: DCP plans each rank's reads from the shapes and placements of the
tensors it is given) with :class:`StoreReader`, which checks the hash of
every chunk a rank reads.

Ownership: on the other ranks the methods that change the store (``tag``,
``untag``, ``delete``, ``gc``, ``record_metrics``, ``publish``,
``recover``, ``empty_quarantine``) raise ReadOnlyStoreError naming the
method and the coordinator; readers (``checkpoints``, ``latest``,
``verify``) work on every rank and see only committed checkpoints.

A rank lost mid-save: the survivors' pending collective fails and they raise
DistributedError, about a second after a kill (gloo sees the closed
connection) and at most the group's timeout after a rank goes silent
(``checkpoint_group(timeout=...)``; 120 s by default). Nothing partial is
committed (the commit follows the gather of every rank's results); a
surviving coordinator removes the staging directory at once, otherwise the
next writer's recovery does.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException

from ..checkpoint.background import AsyncSave
from ..checkpoint.catalog import CheckpointInfo, check_step
from ..errors import CheckpointNotFoundError, CkstoreError, DistributedError, InvalidArgumentError, ReadOnlyStoreError
from ..format.extra_types import class_table
from ..format.manifest import check_metrics
from ..format.tags import check_tag_name
from ..store import Store
from . import coordinator
from .dcp import StoreReader, StoreWriter
from .training import agree_on_step
from .values import ValueLoadPlanner, ValueSavePlanner


def attach(store: Store, process_group: Any) -> Ranks:
    """What ``Store(path, process_group=pg)`` delegates to (found through the ``ckstore.collectives`` entry point)."""
    return Ranks(store, process_group)


class Ranks:
    """The collective save and load of one Store on one process group (see the module docstring)."""

    def __init__(self, store: Store, group: Any) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise InvalidArgumentError("process_group= needs torch.distributed initialised first (dist.init_process_group)")
        if not isinstance(group, dist.ProcessGroup):
            raise InvalidArgumentError(
                f"process_group must be a torch.distributed ProcessGroup (ckstore.distributed.checkpoint_group()), got {type(group).__name__}"
            )
        rank = dist.get_rank(group)
        if rank < 0:
            raise InvalidArgumentError(f"this process (global rank {dist.get_rank()}) is not a member of process_group")
        self.store = store
        self.group = group
        self.rank = rank  # in the group
        self.world = dist.get_world_size(group)
        #: The coordinator's global rank (group rank 0), the one that changes the store.
        self.coordinator = dist.get_global_rank(group, 0)
        self._steps: Any = None  # the step-boundary group (_step_group)

    def __repr__(self) -> str:
        return f"Ranks(rank {self.rank} of {self.world}, coordinator {self.coordinator})"

    def check_owner(self, method: str) -> None:
        """ReadOnlyStoreError unless this rank is the coordinator: only it changes the store."""
        if self.rank != 0:
            raise ReadOnlyStoreError(
                f"{self.store.path}: Store.{method}() on rank {self.rank} of the process group; only the coordinator "
                f"(group rank 0, global rank {self.coordinator}) changes the store, so call it there"
            )

    # ------------------------------------------------------------ save

    def save(self, state: Any, *, step: int, metrics: Mapping[str, Any] | None, tags: Iterable[str], blocking: bool) -> Any:
        """Save ``state`` (this rank's) as checkpoint ``step``, a collective; returns the CheckpointInfo (or an AsyncSave)."""
        store = self.store
        called = time.perf_counter()

        def check() -> tuple[int, dict[str, float], list[str]]:
            store._saver.raise_unseen()  # a background save failed unseen: reported on every rank
            names = (tags,) if isinstance(tags, str) else tags
            checked = (check_step(step), check_metrics(metrics), sorted({check_tag_name(t) for t in names}))
            store._check_writable()
            return checked

        with store._save_gate:
            waited = store._saver.wait()
            agreed = self._agree("save", check)
            steps = [a[0] for a in agreed]
            if len(set(steps)) != 1:
                raise InvalidArgumentError(f"the ranks are saving different steps ({_by_rank(steps)}); every rank must pass the same step")
            step_, metrics_, tags_ = agreed[self.rank]
            writer = StoreWriter(store, step=step_, metrics=metrics_, tags=tags_)
            if blocking:
                with self._failures("save", writer):
                    dcp.save(state, storage_writer=writer, planner=ValueSavePlanner(), process_group=self.group)
                    info = self._broadcast_info(writer)
                store.stats.update(wait_s=waited, copy_s=0.0, stall_s=time.perf_counter() - called)
                return info
            with self._failures("save", writer):
                # Returns once the state is staged (copied to host memory): the caller may change its tensors.
                future = dcp.async_save(state, storage_writer=writer, planner=ValueSavePlanner(), process_group=self.group)
            handle = AsyncSave(step_, store._saver)
            handle.wait_s = waited
            handle.stall_s = time.perf_counter() - called
            store.stats.update(wait_s=waited, stall_s=handle.stall_s)

            def work() -> CheckpointInfo:
                with self._failures("background save", writer):
                    future.result()
                    return self._broadcast_info(writer)

            store._saver.start(handle, work)
            return handle

    def _broadcast_info(self, writer: StoreWriter) -> CheckpointInfo:
        """The coordinator's committed CheckpointInfo, on every rank (one broadcast)."""
        box = [writer.committed if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=self.coordinator, group=self.group)
        return box[0]

    # ------------------------------------------------------------ load

    def load(self, state: Any, *, step: int | str | None, map_location: Any, verify: bool, strict: bool, classes: Iterable[type]) -> Any:
        """Load a checkpoint into ``state`` (this rank's shards), a collective; returns ``state``."""
        chosen = self._load(state, step=step, map_location=map_location, verify=verify, strict=strict, classes=classes)
        if chosen is None:
            raise CheckpointNotFoundError(f"{self.store.path}: no committed checkpoint verifies on every rank")
        return state

    def load_newest(self, state: Any, *, map_location: Any, verify: bool, strict: bool, classes: Iterable[type]) -> tuple[CheckpointInfo, Any] | None:
        """What ``ckstore.resume`` loads: the newest checkpoint that verifies on every rank; None for an empty store.

        A store with checkpoints of which none verifies on every rank is a
        CheckpointNotFoundError, as for one process: never a silent start over.
        """
        chosen = self._load(state, step=None, map_location=map_location, verify=verify, strict=strict, classes=classes)
        if chosen is not None:
            return self.store.resolve(chosen), state
        if self.store.checkpoints():
            raise CheckpointNotFoundError(f"{self.store.path}: no committed checkpoint verifies on every rank")
        return None

    def _load(self, state: Any, *, step: int | str | None, map_location: Any, verify: bool, strict: bool, classes: Iterable[type]) -> int | None:
        """The collective load; the step loaded, or None when ``step=None`` and no checkpoint verifies on every rank."""
        store = self.store

        def check() -> int | None:
            store._check_open()
            if state is None:
                raise InvalidArgumentError(
                    "state is required when the store has a process_group: each rank passes the state dict it loads into "
                    "(its own shards, e.g. from get_state_dict(model, optimizer)), from whose tensors DCP plans what it reads"
                )
            if map_location is not None:
                raise InvalidArgumentError("map_location: a multi-rank load reads into the tensors of state, on their devices; move them first")
            if verify is not True:
                raise InvalidArgumentError("verify=False: a multi-rank load checks the hash of every chunk it reads, always")
            class_table(classes)
            return None if step is None else store.resolve(step).step

        with store._save_gate:
            store._saver.wait()  # its collectives must not interleave with this load's
            resolved = self._agree("load", check)
            if step is None:
                chosen = self._collective("load", lambda: agree_on_step(store, group=self.group))
                if chosen is None:
                    return None
            elif len(set(resolved)) != 1:
                raise InvalidArgumentError(f"step={step!r} names different checkpoints on the ranks ({_by_rank(resolved)}); pass a step number")
            else:
                chosen = resolved[0]
            planner = ValueLoadPlanner(classes=classes, allow_partial_load=not strict)
            with self._failures("load"):
                dcp.load(state, storage_reader=StoreReader(store, step=chosen), planner=planner, process_group=self.group)
        return chosen

    # ------------------------------------------------------------ the training loop's step-boundary agreement

    def agree_max(self, values: list[int]) -> list[int]:
        """The largest of each value over the ranks: one all-reduce (MAX) of a few integers, a collective.

        ``Checkpointer.step`` calls it at every step boundary with (the signal
        received, 0 if none; whether a save is due), so every rank saves the
        same steps and stops at the same one after a signal to any rank.
        """
        flags = torch.tensor(values, dtype=torch.int64)
        self._collective("step", lambda: dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._step_group()))
        return [int(v) for v in flags.tolist()]

    def _step_group(self) -> Any:
        """A gloo group of the same ranks for the step-boundary all-reduce, made at its first use (by every rank there).

        Not ``self.group``: a background save runs its collectives (DCP's
        gather, the commit's broadcast) on that group from the saver's
        thread, while the loop's steps go on. Two threads issuing collectives
        on one group pair them by issue order, which differs between ranks:
        with one rank's write slower, the ranks' step all-reduce met the
        other's gather and both hung until the group's timeout.
        """
        if self._steps is None:
            try:
                timeout = self.group._get_backend(torch.device("cpu")).options._timeout
            except (AttributeError, RuntimeError):  # not gloo: the checkpoint group's default
                timeout = datetime.timedelta(seconds=coordinator.DEFAULT_TIMEOUT_S)
            ranks = [dist.get_global_rank(self.group, r) for r in range(self.world)]
            self._steps = dist.new_group(ranks=ranks, backend="gloo", timeout=timeout, use_local_synchronization=True)
        return self._steps

    # ------------------------------------------------------------ collectives and their failures

    def _agree(self, what: str, check: Callable[[], Any]) -> list[Any]:
        """Every rank's ``check()`` result; the first rank's error raised on every rank if any rank's check raised."""
        payload, problem = None, None
        try:
            payload = check()
        except CkstoreError as exc:
            problem = exc
        except Exception as exc:  # noqa: BLE001 - raised alone, it would leave the other ranks waiting in the gather
            problem = InvalidArgumentError(f"{what}: {type(exc).__name__}: {str(exc)[:500]}")
        everyone: list[Any] = [None] * self.world
        self._collective(what, lambda: dist.all_gather_object(everyone, (payload, problem), group=self.group))
        for rank, (_, error) in enumerate(everyone):
            if error is not None:
                if rank != self.rank:
                    error.add_note(f"(raised on rank {rank} of the process group; every rank raises it)")
                raise error
        return [result for result, _ in everyone]

    def _collective(self, what: str, call: Callable[[], Any]) -> Any:
        with self._failures(what):
            return call()

    @contextlib.contextmanager
    def _failures(self, what: str, writer: StoreWriter | None = None) -> Iterator[None]:
        """Raise what failed on any rank as the same typed error on every rank (module docstring, step 3)."""
        try:
            yield
        except CheckpointException as exc:  # DCP's report of every rank's failure, the same on every rank
            self._abort(writer)
            raise _chosen(exc.failures, self.rank, what) from exc
        except CkstoreError:
            self._abort(writer)
            raise
        except Exception as exc:  # torch.distributed: a lost rank, a timeout (RuntimeError, DistBackendError)
            self._abort(writer)
            raise DistributedError(
                f"{self.store.path}: {what} on rank {self.rank}: a collective of the process group failed (a rank was lost, or "
                f"silent past the group's timeout): {type(exc).__name__}: {str(exc)[:500]}" + self._outcome(writer)
            ) from exc

    def _outcome(self, writer: StoreWriter | None) -> str:
        """What this rank can say about the failed save's commit: only the coordinator knows whether it renamed."""
        if writer is None:
            return ""
        if self.rank == 0:
            return f"; step {writer.step} was committed before it failed" if writer.committed is not None else "; nothing was committed"
        # The coordinator may have renamed the checkpoint in and died before telling the others.
        return f"; whether step {writer.step} was committed only the coordinator (rank 0) knew: see store.checkpoints()"

    def _abort(self, writer: StoreWriter | None) -> None:
        """On the coordinator: remove a staging directory that will not be committed (else the next recovery does)."""
        staging = None if writer is None else writer._staging
        if staging is not None and self.rank == 0:
            writer._staging = None
            coordinator.abort(self.store, staging)


def _chosen(failures: Mapping[int, Any], me: int, what: str) -> BaseException:
    """The error every rank raises for DCP's ``failures`` (rank -> (exception, traceback)): ckstore's first."""
    ranked = sorted(failures.items())
    for rank, wrapped in ranked:
        error = wrapped[0]
        if isinstance(error, CkstoreError):
            if rank != me:
                error.add_note(f"(raised on rank {rank} of the process group; every rank raises it)")
            return error
    rank, wrapped = ranked[0]
    error = wrapped[0]
    return DistributedError(f"{what} failed on rank {rank} of the process group: {type(error).__name__}: {str(error)[:500]}", rank=rank)


def _by_rank(values: list[Any]) -> str:
    return ", ".join(f"rank {rank}: {value!r}" for rank, value in enumerate(values))
