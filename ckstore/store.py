"""The checkpoint store: validates arguments and wires the parts below together.

- ``ckstore.checkpoint.commit``: the on-disk layout, the commit protocol (its
  docstring is the reference), recovery and deletion;
- ``ckstore.checkpoint.catalog``: listing, resolving, reading manifests and
  tags, verification;
- ``ckstore.checkpoint.pruning``: retention applied (the pure policy is in
  ``ckstore.checkpoint.retention``);
- ``ckstore.checkpoint.loading``: the fallback loop and reads into place;
- ``ckstore.checkpoint.access``: the checks at open, the writer lock, recovery under it;
- ``ckstore.checkpoint.background``: at most one background save;
- ``ckstore.engine.host_copy``: the host memory a background save is copied into;
- ``ckstore.state``: the state codec.

A save is: encode -> (copy to host) -> commit -> tags -> retention. A load is:
resolve -> read -> decode. Loading verifies each file's size and hash as it is
read; with no step given, a checkpoint that fails verification is skipped
with a warning and the last committed one that verifies is loaded. Nothing
is ever deleted because it failed to verify.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoint import quarantine as _quarantine
from .checkpoint.access import WriterAccess, check_lock_timeout, check_store_path
from .checkpoint.annotations import Annotations
from .checkpoint.background import AsyncSave, BackgroundSaver, reset_after_fork
from .checkpoint.catalog import Catalog, CheckpointInfo, CorruptCheckpointWarning, Problem, check_step
from .checkpoint.commit import Committer, SaveRequest, encode_request, guarded
from .checkpoint.loading import Loader, gc_paused
from .checkpoint.pruning import apply_retention
from .checkpoint.quarantine import QuarantineEntry
from .checkpoint.retention import RetentionPolicy, commit_order
from .engine.host_copy import HostCopy, copy_device_tensors
from .checkpoint.plugins import find_collective, find_publisher
from .errors import CheckpointNotFoundError, InvalidArgumentError, ManifestError
from .format.extra_types import class_table
from .format.hashing import default_algorithm, new_hasher
from .format.manifest import check_metrics
from .format.tags import check_tag_name
from .storage.base import Storage
from .storage.base import mount as mount_storage
from .storage.base import unmount as unmount_storage
from .storage.metadata_lock import metadata_lock

__all__ = ["CheckpointInfo", "CorruptCheckpointWarning", "Problem", "Store"]


class Store:
    """A directory of durable, verified checkpoints with retention.

    ``Store(path)`` opens a store, or names a new one, without writing: the
    directories, the writer lock and recovery of what an interrupted save or
    delete left behind all wait for the first write (``save``, ``tag``,
    ``untag``, ``delete``, ``gc``, ``recover``), so a store opened only to load
    is never modified. Use it as a context manager, or call :meth:`close`.

    A write refuses (:class:`UnsafeStoreError`) a store whose root,
    ``checkpoints/``, ``.staging/``, ``.trash/`` or ``.quarantine/`` is owned by another user or
    writable by group or others without the sticky bit, since that user could
    swap entries under ckstore; a plain (not readonly) open already refuses an
    existing such store. ``trust_foreign=True`` turns that check off (a
    group-shared directory of trusted users). A symlinked layout directory is
    refused always, readonly too. See docs/security.md.

    ``process_group`` (a ``torch.distributed`` group, every rank opening the
    same shared path): ``save`` and ``load`` become collectives of the group's
    ranks, and only its rank 0 (the coordinator) changes the store; see
    ``ckstore.distributed.ranks`` and docs/distributed.md.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        metric: str | None = None,
        mode: str = "min",
        keep_every: int | None = None,
        readonly: bool = False,
        lock_timeout: float | None = 0,
        hash_algorithm: str | None = None,
        incremental: bool = False,
        direct_io: bool = True,
        wait_at_exit: bool = True,
        trust_foreign: bool = False,
        storage: Storage | None = None,
        process_group: Any = None,
    ) -> None:
        self.path = Path(os.path.abspath(check_store_path(path)))
        check_lock_timeout(lock_timeout)  # now, not at the first write minutes into a run
        self.incremental = bool(incremental)
        self.direct_io = bool(direct_io)
        #: Metrics of the last save: seconds stalled, waited, copied, written; files and bytes written and linked.
        self.stats: dict[str, Any] = {"saves": 0}
        self.policy = RetentionPolicy(keep_last=keep_last, keep_best=keep_best, metric=metric, mode=mode, keep_every=keep_every)
        self.readonly = bool(readonly)
        self.trust_foreign = bool(trust_foreign)
        self.lock_timeout = lock_timeout
        self.hash_algorithm = hash_algorithm or default_algorithm()
        try:
            new_hasher(self.hash_algorithm)  # refuse an unknown algorithm now, not mid-save
        except ManifestError as exc:  # the caller's option, not a malformed manifest (load() would skip good checkpoints)
            raise InvalidArgumentError(f"hash_algorithm={hash_algorithm!r}: {exc}") from None
        self._root = str(self.path)
        self._catalog = Catalog(self._root)
        self._committer = Committer(
            self._root, self._catalog, hash_algorithm=self.hash_algorithm, incremental=self.incremental, direct_io=self.direct_io, stats=self.stats
        )
        self._loader = Loader(self._catalog)
        # The paths the multi-rank coordinator (``ckstore.distributed``) stages into and reads.
        self._ckpt_dir, self._staging_dir = self._committer.ckpt_dir, self._committer.staging_dir
        self._meta = metadata_lock(self._root)  # tags.json, metrics.json: see ckstore.storage.metadata_lock
        self._annotations = Annotations(self._catalog, self._committer, self._meta)
        self._mutex = threading.RLock()
        self._host_copy = HostCopy()
        self._saver = BackgroundSaver(wait_at_exit=wait_at_exit)
        self._save_gate = threading.Lock()  # one save call at a time, so at most one in flight
        #: Steps a publish of this process is reading right now (``ckstore.integrations.dvc.worker``): retention keeps
        #: them. In memory only, so a crash leaves no pin behind; replaced whole, never mutated.
        self._publish_reading: frozenset[int] = frozenset()
        #: Called by close() before it releases anything (a queued publish finishing, say); see :meth:`add_close_hook`.
        self._close_hooks: list[Callable[[Store], None]] = []
        self._closed = False
        reset_after_fork(self)  # calls _after_fork_in_child in a forked child
        # Opening only looks (lstat): "loading never writes" (ckstore.checkpoint.access).
        self._access = WriterAccess(self._root, readonly=self.readonly, trust_foreign=self.trust_foreign, lock_timeout=lock_timeout)
        self._lock = self._access.lock  # the multi-rank coordinator (ckstore.distributed) checks it is held
        #: With ``process_group``: the collective save and load every rank of the group runs (``ckstore.distributed.ranks``).
        self._ranks: Any = None if process_group is None else find_collective("torch")(self, process_group)
        self._storage: Storage | None = None
        if storage is not None:
            # Every operation under the root runs on this backend (ckstore.storage.base), from any thread.
            mount_storage(self._root, storage)
            self._storage = storage

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_close_hook(self, hook: Callable[[Store], None]) -> None:
        """Run ``hook(store)`` first thing in :meth:`close` (once); what it raises is raised by close, after the release."""
        if hook not in self._close_hooks:
            self._close_hooks.append(hook)

    def close(self) -> None:
        """Wait for a background save and queued publishes, release the writer lock and the threads. Idempotent.

        Raises AsyncSaveError (after releasing everything) if the background
        save failed and no earlier call reported it; likewise DvcError for a
        publish of this store that failed unseen.
        """
        hooks, self._close_hooks = self._close_hooks, []
        try:
            if not self._closed:
                for hook in hooks:
                    hook(self)
        finally:
            self._close()

    def _close(self) -> None:
        with self._save_gate:
            self._saver.wait()
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            try:
                self._saver.raise_unseen()
            finally:
                self._loader.close()
                self._committer.close()
                self._access.release()
                if self._storage is not None:
                    unmount_storage(self._root, self._storage)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}{', readonly=True' if self.readonly else ''})"

    def _after_fork_in_child(self) -> None:
        """Fresh locks and worker threads in a forked child (the parent's threads are not there; see ckstore.checkpoint.background)."""
        # A parent thread may have held these at fork: in the child nobody ever releases them.
        self._mutex = threading.RLock()
        self._save_gate = threading.Lock()
        # Their threads stay in the parent; dropped, not closed (closing would wait for them).
        self._committer.pipeline = None
        self._loader.after_fork_in_child()
        # The host copy may hold the parent's save in flight: the child copies into its own.
        self._host_copy = HostCopy()
        # filelock forgets a held writer lock in a child itself, so a release there never unlocks the parent.

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgumentError(f"{self!r} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        self._access.check_writable()

    def _owner_only(self, method: str) -> None:
        """With a process group, only the coordinator changes the store (ReadOnlyStoreError elsewhere)."""
        if self._ranks is not None:
            self._ranks.check_owner(method)

    def _acquire(self) -> bool:
        """Check, create and lock the store for its lifetime (first write only) and recover; True if this call took the lock."""
        self._check_open()
        return self._access.acquire(create_layout=self._committer.create_layout, recover=self._recover)

    def recover(self) -> None:
        """Take the writer lock and remove what interrupted saves and deletes left behind.

        Every write does this first; call it to clean up a store without
        writing a checkpoint. Waits for a background save of this store
        (whose staging is not a leftover).
        """
        self._owner_only("recover")
        with self._save_gate:
            self._saver.wait()
            with self._mutex:
                if not self._acquire():
                    self._recover()

    def _recover(self) -> None:
        self._committer.recover(self._meta)

    # ------------------------------------------------------------ listing (ckstore.checkpoint.catalog)

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints with a readable manifest, ascending by step.

        A checkpoint whose manifest is unreadable is skipped with a
        :class:`CorruptCheckpointWarning` (and reported by :meth:`verify`).
        """
        self._check_open()
        return self._catalog.listing()

    def latest(self) -> CheckpointInfo | None:
        """The last committed checkpoint (see ``ckstore.checkpoint.retention``: commit order), or None for an empty store. Not verified here."""
        infos = self.checkpoints()
        return commit_order(infos)[-1] if infos else None  # type: ignore[return-value]

    def best(self) -> CheckpointInfo | None:
        """The best checkpoint by the store's metric (or the one recorded by the last writer), or None.

        A checkpoint this Store has seen fail to load or verify is not a
        candidate (as it holds no retention slot); the next best is returned.
        """
        ranked = self._catalog.ranked_best(self.policy)
        return ranked[0] if ranked else None

    def resolve(self, step: int | str) -> CheckpointInfo:
        """The checkpoint named by a step, ``"latest"``, ``"best"`` or a tag."""
        self._check_open()
        return self._catalog.resolve(step, self.policy)

    # ------------------------------------------------------------ tags and recorded metrics

    def record_metrics(self, step: int, metrics: Mapping[str, Any]) -> CheckpointInfo:
        """Add metrics to committed checkpoint ``step`` (e.g. validation at the end of the epoch); returns its info.

        The checkpoint itself is never modified: the metrics go to the store's
        ``metrics.json`` (see ``ckstore.checkpoint.metrics_log``) and count for ranking,
        ``best`` and ``keep_best`` from now on. A metric the checkpoint already
        has with another value is refused (InvalidArgumentError). Waits for a
        background save in flight first. Needs only the metadata lock, like
        :meth:`tag`: an evaluation process may record while training runs.
        """
        self._owner_only("record_metrics")
        step = check_step(step)
        metrics = check_metrics(metrics)
        if not metrics:
            raise InvalidArgumentError("record_metrics needs at least one metric")
        self._check_writable()
        if self._saver.in_flight is not None:
            with self._save_gate:
                self._saver.wait()
                self._saver.raise_unseen()
        return self._annotations.record_metrics(step, metrics)

    def tag(self, step: int, name: str) -> CheckpointInfo:
        """Point tag ``name`` at ``step`` (moving it if it named another checkpoint). Tagged checkpoints are kept by retention.

        Needs only the short metadata lock, not the writer lock: a shell may
        tag (and publish) while a training process holds the store, and that
        process's retention honours the tag (see ``ckstore.checkpoint.annotations``).
        """
        self._owner_only("tag")
        check_tag_name(name)
        step = check_step(step)
        self._check_writable()
        return self._annotations.tag(step, name)

    def untag(self, name: str) -> None:
        """Remove tag ``name``; CheckpointNotFoundError if no checkpoint carries it. Needs only the metadata lock, like :meth:`tag`."""
        self._owner_only("untag")
        check_tag_name(name)
        self._check_writable()
        self._annotations.untag(name)

    def publish(
        self,
        step: int | str,
        *,
        name: str,
        repo: str | os.PathLike[str] | None = None,
        dest: str = "models",
        remote: str | None = None,
        wait: bool = False,
        weights_only: bool = False,
    ) -> Any:
        """Publish a committed checkpoint to DVC as ``<repo>/<dest>/<name>.dvc``, in the background.

        Pins the checkpoint (tag ``published.<name>``) now, then a worker thread
        verifies it, ``dvc add``s and ``dvc push``es it and commits and tags the
        ``.dvc`` file in git. Returns a ``Publication``; its ``result()`` waits and
        raises a failure (also raised by the next ``publish``). ``wait=True``
        waits for this and every earlier publish. ``weights_only=True`` publishes
        ``state["model"]`` without optimizer state; every publish of a state with
        a ``"model"`` entry puts its weights at ``<dest>/<name>/model.safetensors``.
        See ``ckstore.integrations.dvc.publish`` and ``ckstore.integrations.dvc.weights``.
        """
        self._owner_only("publish")
        publisher = find_publisher("dvc")
        return publisher(self, step, name=name, repo=repo, dest=dest, remote=remote, wait=wait, weights_only=weights_only)

    # ------------------------------------------------------------ save

    def save(self, state: Any, *, step: int, metrics: Mapping[str, Any] | None = None, tags: Iterable[str] = (), blocking: bool = True) -> Any:
        """Write ``state`` as checkpoint ``step``; returns once it is durable (``ckstore.checkpoint.commit``).

        ``state`` is any nesting of dicts, lists and tuples holding tensors,
        NumPy arrays, Python scalars, strings, bytes and None, and objects with
        ``state_dict()``/``load_state_dict()`` (modules, optimizers, schedulers,
        grad scalers, stateful data loaders). Raises CheckpointExistsError if the
        step is committed, StateError naming the key of an unsupported value, and
        StorageError if the disk fails (the partial checkpoint is removed; earlier
        ones are intact). Retention runs after the new checkpoint is durable.

        With ``blocking=False`` the call returns an :class:`AsyncSave` handle as
        soon as the state is copied into reused host memory (the caller may
        then modify its tensors); writing, fsync, commit, tags and retention
        run in a background thread. A call made while a background save is
        running first waits for it (the wait is reported as ``wait_s``); if
        that save failed, the call raises AsyncSaveError and saves nothing.

        With ``process_group``: a collective, see ``ckstore.distributed.ranks``.
        """
        if self._ranks is not None:
            return self._ranks.save(state, step=step, metrics=metrics, tags=tags, blocking=blocking)
        step = check_step(step)
        metrics = check_metrics(metrics)
        if isinstance(tags, str):
            tags = (tags,)
        tag_names = sorted({check_tag_name(t) for t in tags})
        called = time.perf_counter()
        with self._save_gate:
            waited = self._saver.wait()
            self._saver.raise_unseen()
            with self._mutex:
                self._acquire()
                _quarantine.make_room(self._annotations, step)
                if tag_names:
                    # A tags.json that cannot be read would fail the tagging after the commit: refuse
                    # now, while refusing leaves nothing behind (a retry then just works).
                    self._catalog.read_tags()
                with gc_paused():
                    request = encode_request(state, step, metrics, tag_names, incremental=self.incremental, host=None if blocking else self._host_copy)
                if blocking:
                    self.stats.update(wait_s=waited, copy_s=0.0)
                    info = self._persist(request)
                    self.stats["stall_s"] = time.perf_counter() - called
                    return info
                handle = AsyncSave(step, self._saver)
                handle.wait_s = waited
                handle.copy_s = time.perf_counter() - request.copy_started
                handle.stall_s = time.perf_counter() - called
                self.stats.update(wait_s=waited, copy_s=handle.copy_s, stall_s=handle.stall_s, staging_bytes=self._host_copy.capacity)

                def work() -> CheckpointInfo:
                    with self._mutex:
                        return self._persist(request)

                self._saver.start(handle, work)
                return handle

    def _persist(self, request: SaveRequest) -> CheckpointInfo:
        """Steps 2-9 of the commit protocol for one save (``ckstore.checkpoint.commit``)."""
        started = time.perf_counter()
        copy_device_tensors(request.encoded.files, self._host_copy)
        self._committer.commit(request, retention=self._retention_note(), check=self._saver.check_abandoned)
        return self._after_commit(request.step, request.tags, started)

    def _retention_note(self) -> dict[str, str] | None:
        """The policy a manifest records, so a reader without ``metric=`` ranks like this writer."""
        return {"metric": self.policy.metric, "mode": self.policy.mode} if self.policy.metric else None

    def _after_commit(self, step: int, tag_names: list[str], started: float) -> CheckpointInfo:
        """Steps 8 and 9 (tags, retention) after ``step`` committed; CommittedWithErrorsError if either fails."""
        self._committer.after_commit(
            step,
            tag=(lambda: self._annotations.tag_new(step, tag_names)) if tag_names else None,
            prune=lambda: self._apply_retention(protect=step),
        )
        self.stats["saves"] += 1
        self.stats["write_s"] = time.perf_counter() - started
        return self._catalog.resolve_step(step)

    # The multi-rank coordinator (``ckstore.distributed``) commits through these: the same steps, its ranks wrote the files.

    def _make_room(self, step: int) -> None:
        _quarantine.make_room(self._annotations, step)

    def _finalize(self, staging: str, step: int, files: dict[str, Any], skeleton: Any, metrics: dict[str, float], *, renamed: list[bool]) -> Any:
        return self._committer.finalize(staging, step, files, skeleton, metrics, retention=self._retention_note(), renamed=renamed)

    def _manifest(self, name: str) -> Any:
        return self._catalog.manifest(name)

    def quarantine(self) -> list[QuarantineEntry]:
        """Checkpoints a save moved aside (failed verification, or left ahead by a rollback), oldest first. See ``ckstore.checkpoint.quarantine``."""
        self._check_open()
        return _quarantine.entries(self._root)

    def empty_quarantine(self) -> list[Path]:
        """Delete every quarantined checkpoint (crash-safely); returns their former paths. Takes the writer lock."""
        self._owner_only("empty_quarantine")
        with self._mutex:
            self._acquire()
            return guarded(self._root, lambda: _quarantine.empty(self._root, self._committer.trash_dir), what="emptying the quarantine")

    def wait(self) -> CheckpointInfo | None:
        """Block until the background save (if any) is durable and return its checkpoint.

        Raises AsyncSaveError, with the cause chained, if a background save
        failed and no earlier call reported it. Returns None when no
        background save was made.
        """
        self._saver.wait()
        self._saver.raise_unseen()
        return self._saver.last_result()

    # ------------------------------------------------------------ retention and deletion

    def _apply_retention(self, policy: RetentionPolicy | None = None, *, protect: int | None = None, dry_run: bool = False) -> list[int]:
        """The one application of retention (``ckstore.checkpoint.pruning``), for saves, gc and its dry run alike."""
        return apply_retention(
            self._catalog, self._meta, policy or self.policy, delete=self._delete_dir, protect=protect, pinned=self._publish_reading, dry_run=dry_run
        )

    def _retain_after_publish(self) -> None:
        """Retention once a publish released its pins (``ckstore.integrations.dvc.worker``); only where this object is the writer."""
        with self._mutex:
            if not self._closed and self._lock is not None and self._lock.held:
                self._apply_retention()

    def _delete_dir(self, step: int) -> None:
        guarded(self._root, lambda: self._committer.delete(step), what=f"deleting step {step}")
        self._catalog.forget(step)

    def delete(self, step: int, *, force: bool = False) -> None:
        """Delete checkpoint ``step`` crash-safely. A tagged checkpoint needs ``force=True`` (its tags go too)."""
        self._owner_only("delete")
        step = check_step(step)
        with self._mutex:
            self._acquire()
            self._committer.check_deletable(step)
            with self._meta.held():
                tags = self._catalog.read_tags()
                mine = sorted(t for t, e in tags.items() if e.step == step)
                if mine and not force:
                    raise InvalidArgumentError(f"step {step} is tagged {mine}; untag it or pass force=True")
                self._annotations.untag_step(step, tags)
                self._delete_dir(step)

    def gc(self, *, policy: RetentionPolicy | None = None, dry_run: bool = False) -> list[int]:
        """Recover leftovers and apply retention now (the store's policy, or ``policy``). Returns deleted steps.

        ``dry_run=True`` returns what the real run would delete, decided by the same code, and deletes nothing.
        """
        self._owner_only("gc")
        if policy is not None and not isinstance(policy, RetentionPolicy):
            raise InvalidArgumentError(f"policy must be a ckstore.RetentionPolicy or None, got {type(policy).__name__}")
        with self._mutex:
            self._acquire()
            return self._apply_retention(policy, dry_run=dry_run)

    # ------------------------------------------------------------ load and verify (ckstore.checkpoint.loading)

    def load(
        self,
        state: Any = None,
        *,
        step: int | str | None = None,
        map_location: Any = None,
        verify: bool = True,
        strict: bool = True,
        classes: Iterable[type] = (),
    ) -> Any:
        """Load a checkpoint; restore what ``state`` holds in place; return the restored nested state.

        ``step`` is a step number, ``"latest"``, ``"best"`` or a tag; ``None``
        loads the newest checkpoint that verifies, skipping (with a warning)
        any newer one that does not. Asked for a specific checkpoint that is
        corrupt, raises IntegrityError naming the file. ``map_location`` moves
        tensors (a device, a mapping from saved device to device, or a
        callable). Every file's size and hash are checked unless ``verify=False``.

        ``state`` must match the checkpoint (see ``ckstore.state.targets``): a key it has
        that the checkpoint lacks, a key of a module or state dict that only
        the checkpoint has, or a value of another kind raises StateError
        naming every such key path, before anything is restored. Plain values
        (numbers, strings, lists and dicts of them) are put into ``state``.
        ``strict=False`` restores what matches and warns
        (:class:`StateMismatchWarning`) naming the rest.

        ``step="best"`` falls back like ``step=None``, down the ranking: a best
        checkpoint that fails to load is skipped with a warning and the next
        best is loaded; if none loads, CheckpointNotFoundError names each.

        ``classes``: Enum and dataclass types that saved Enum members and
        dataclass instances may be re-created as (matched by the stored
        ``module:qualname``; a checkpoint's class names are never imported).
        A saved one whose class is not given raises StateError naming the key.

        With ``process_group``: a collective into ``state`` (required), see ``ckstore.distributed.ranks``.
        """
        if self._ranks is not None:
            return self._ranks.load(state, step=step, map_location=map_location, verify=verify, strict=strict, classes=classes)
        self._check_open()
        table = class_table(classes)
        if step == "best":
            ranked = self._catalog.ranked_best(self.policy)
            loaded = self._loader.load_first(ranked, state, map_location=map_location, verify=verify, strict=strict, stacklevel=3, classes=table)
            if loaded is None:
                raise CheckpointNotFoundError(f"{self._root}: no best checkpoint (store is empty or no checkpoint has the metric)", step=step)
            return loaded[1]
        if step is not None:
            return self._loader.load_one(self.resolve(step), state, map_location, verify, strict, classes=table)
        loaded = self._load_newest(state, map_location=map_location, verify=verify, strict=strict, stacklevel=3, classes=table)
        if loaded is None:
            raise CheckpointNotFoundError(f"{self._root}: store has no checkpoints")
        return loaded[1]

    def _load_newest(
        self, state: Any, *, map_location: Any, verify: bool, strict: bool = True, stacklevel: int, classes: Mapping[str, type] | None = None
    ) -> tuple[CheckpointInfo, Any] | None:
        """Load the newest checkpoint that loads (the fallback loop of ``ckstore.checkpoint.loading``); None for an empty store.

        Shared by :meth:`load` and :func:`ckstore.resume`.
        """
        if self._ranks is not None:  # a collective: the newest that verifies on every rank
            return self._ranks.load_newest(state, map_location=map_location, verify=verify, strict=strict, classes=(classes or {}).values())
        infos = self.checkpoints()
        # The last committed first (see ckstore.checkpoint.retention).
        return self._loader.load_first(
            reversed(commit_order(infos)), state, map_location=map_location, verify=verify, strict=strict, stacklevel=stacklevel + 1, classes=classes
        )

    def tensor_keys(self, step: int | str = "latest") -> list[str]:
        """The keys :meth:`read_tensor` accepts for a checkpoint: state paths joined by ``/`` (``model/fc.weight``)."""
        self._check_open()
        return self._loader.tensor_keys(self.resolve(step))

    def read_tensor(self, key: str, *, step: int | str = "latest", verify: bool = False) -> torch.Tensor:
        """Read one tensor of a checkpoint without reading the rest (a header parse and one ``pread``).

        ``key`` is the tensor's path in the saved state joined by ``/``, e.g.
        ``"model/fc.weight"`` or ``"optimizer/state/0/exp_avg"`` (see
        :meth:`tensor_keys`). Always checked: the file's size against the
        manifest and the tensor's own header entry (dtype, shape, a byte
        range inside the file). The tensor's bytes are covered only by the
        file's hash, so they are verified only with ``verify=True``, which
        hashes the whole file (a full read, in bounded memory) and checks the
        whole header.
        """
        self._check_open()
        if not isinstance(key, str):
            raise InvalidArgumentError(f"key must be a string, got {type(key).__name__}")
        return self._loader.read_tensor(self.resolve(step), key, verify=verify)

    def verify(self, step: int | str | None = None) -> list[Problem]:
        """Check every file of one checkpoint (or all when None) against its manifest; return each problem found.

        An empty list means everything verified. Nothing is modified or deleted.
        """
        self._check_open()
        return self._catalog.verify(step, self.policy)
