"""The checkpoint store and its commit protocol.

Layout of a store directory::

    <root>/
      checkpoints/step-00000120/   one directory per committed checkpoint
          manifest.json            written last; lists every file with size and hash
          model.fc.safetensors ... tensor files (plain safetensors)
      tags.json                    tag -> step, replaced atomically
      metrics.json                 metrics recorded after a save (ckstore.checkpoint.metrics_log)
      .staging/                    checkpoints being written (invisible to readers)
      .trash/                      checkpoints being deleted (invisible to readers)
      .quarantine/                 checkpoints a save moved aside (ckstore.checkpoint.quarantine)
      .ckstore.lock                the writer lock (+ .ckstore.lock.owner: pid, host)
      .ckstore.meta.lock           the metadata lock over tags.json, metrics.json (ckstore.storage.metadata_lock)

Commit protocol of :meth:`Store.save` (every step goes through ``_durable``):

1. Take the writer lock (first write only) and recover leftovers (below).
2. If step ``N`` is committed: move it into the quarantine if it fails
   verification or a rollback left it ahead of the run, else refuse
   (CheckpointExistsError). Create ``.staging/step-<N>.<random>/``.
3. Write each tensor file there, fsync it, close it. (Files stream through
   a few reused page-aligned buffers, written with ``O_DIRECT`` where the
   filesystem allows, hashed while they are written, and fsynced by a sync
   thread in batches while later files are written; every fsync is done
   before step 4.
   With ``incremental=True`` a file whose content hash equals the same file
   of the previous checkpoint this store wrote is hard-linked from it instead:
   its data was fsynced before that checkpoint committed.)
4. Write ``manifest.json`` there last, fsync it.
5. fsync the staging directory: its entries (the files) are now durable.
6. Rename the staging directory to ``checkpoints/step-<N>`` (refused if it
   exists). This single rename is the commit point: before it the checkpoint
   does not exist for any reader, after it the checkpoint is whole.
7. fsync ``checkpoints/`` (and ``.staging/``): the rename is now durable.
   **When save returns, the checkpoint survives a crash or power loss.**
8. Update ``tags.json`` if the save names tags (atomic replace + fsync).
9. Apply retention (``ckstore.checkpoint.retention``), holding the metadata lock: each
   checkpoint not kept is renamed into ``.trash/``, ``checkpoints/`` is
   fsynced, then the trash entry is removed. The checkpoint just committed is
   never deleted, and nothing is deleted before step 7. A failure in step 8
   or 9 raises CommittedWithErrorsError: the checkpoint is durable.

Recovery, run on the first write (never on open or on a read) and only while
holding the writer lock (so never under a live writer's feet): remove every entry of ``.staging/`` (saves that never reached
step 6), remove every entry of ``.trash/`` (deletions that were interrupted;
the checkpoint had already left ``checkpoints/``), remove temp files of
interrupted atomic replaces, and drop tags pointing at missing checkpoints.
Every removal is relative to an open directory and never follows a symlink
(``_durable.remove_tree``). Reads ignore leftovers. A crash at any moment therefore leaves each
checkpoint either absent or whole, and a kill mid-delete never leaves a half
checkpoint in ``checkpoints/``.

``save(..., blocking=False)`` copies the state into reused staging memory,
returns, and runs steps 2-9 in a background thread (``ckstore.checkpoint.background``); the
checkpoint is durable once :meth:`Store.wait` or the returned handle's
``result()`` returns. At most one save is in flight; a background failure is
raised (as AsyncSaveError) by the next save, ``wait`` or ``close``.

Steps are ordered numerically from the manifest, never by name or mtime;
"latest" is the last committed (the manifest's ``created``, strictly
increasing per store; see ``ckstore.checkpoint.retention``). Loading verifies each
file's size and hash as it is read; with no step given, a checkpoint that
fails verification is skipped with a warning and the last committed one that
verifies is loaded. Nothing is ever deleted because it failed to
verify.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import math
import os
import re
import secrets
import stat
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .storage import durable as _durable
from .checkpoint import quarantine as _quarantine
from .storage import safeio as _safeio
from .checkpoint.background import AsyncSave, BackgroundSaver, StagingArea
from .errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CkstoreError,
    CommittedWithErrorsError,
    IntegrityError,
    InvalidArgumentError,
    ManifestError,
    ReadOnlyStoreError,
    StateError,
    StorageError,
    UnsafeStoreError,
)
from .format.hashing import default_algorithm, new_hasher
from .storage.layout import CHECKPOINTS_DIR, STAGING_DIR, TRASH_DIR, check_layout, require_store
from .storage.base import Storage
from .storage.base import mount as mount_storage
from .storage.base import unmount as unmount_storage
from .storage.lock import WriterLock
from .format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, MAX_MANIFEST_NODES, FileEntry, Manifest, check_metrics, count_nodes, parse_manifest
from .checkpoint.manifest_cache import ManifestCache
from .storage.metadata_lock import metadata_lock
from .checkpoint.metrics_log import METRICS_NAME, Recorded, dump_metrics, read_metrics
from .checkpoint.quarantine import FAILED_VERIFICATION, LEFT_AHEAD, QuarantineEntry
from .checkpoint.retention import RetentionPolicy, commit_order, left_ahead, plan_deletions, rank_best
from .format.extra_types import class_table
from .state.decode import decode_state
from .state.encode import Encoded, encode_state, tensor_refs
from .state.targets import plan_load
from .format.tags import TAGS_NAME, TagEntry, check_tag_name, dump_tags
from .checkpoint.tagfile import read_tags
from .engine.tensorfile import WritePipeline, WrittenFile, check_tensor, prepare_tensor, read_one_tensor, read_tensor_file, verify_tensor_file

# ASCII digits only: "\d" also matches "١" (Arabic-Indic one), and int() reads "step-١" as step 1.
_STEP_DIR = re.compile(r"^step-([0-9]{1,30})$", re.ASCII)


def _check_path(path: Any) -> str:
    """The store path as text; InvalidArgumentError for bytes, a non-path or a NUL byte (os raises untyped errors)."""
    try:
        raw = os.fspath(path)
    except TypeError:
        raise InvalidArgumentError(f"store path must be a str or os.PathLike, got {type(path).__name__}") from None
    if not isinstance(raw, str):
        raise InvalidArgumentError(f"store path must be text, not {type(raw).__name__}")
    if "\0" in raw:
        raise InvalidArgumentError(f"store path holds a NUL byte: {raw!r}")
    return raw


def _check_lock_timeout(timeout: Any) -> None:
    # The same rule WriterLock.acquire applies (a negative timeout would make filelock wait forever).
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0):
        raise InvalidArgumentError(f"lock_timeout must be None (wait forever) or a number of seconds >= 0, got {timeout!r}")


#: The Python advice of best() with no metric known; the CLI replaces it with its own (it has no ``metric=``).
NO_METRIC_ADVICE = "open the store with metric=... to rank checkpoints"


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint failed verification and was skipped; it is left on disk untouched."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint, as listed by :meth:`Store.checkpoints`."""

    step: int
    metrics: Mapping[str, float]
    tags: tuple[str, ...]
    path: Path
    created: float
    nbytes: int
    files: Mapping[str, FileEntry] = field(repr=False, compare=False, default_factory=dict)


@dataclass(frozen=True)
class Problem:
    """One defect found by :meth:`Store.verify`."""

    step: int | None
    path: str
    message: str
    expected: Any = None
    actual: Any = None


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, int):
        raise InvalidArgumentError(f"step must be an integer, got {type(step).__name__}")
    if step < 0:
        raise InvalidArgumentError(f"step must be non-negative, got {step}")
    if step >= 1 << 63:  # step directories hold at most 30 digits; int64 is plenty and portable
        raise InvalidArgumentError(f"step must be below 2**63, got {step}")
    return int(step)


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
    ) -> None:
        self.path = Path(os.path.abspath(_check_path(path)))
        _check_lock_timeout(lock_timeout)  # now, not at the first write minutes into a run
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
        self._storage: Storage | None = None
        self._ckpt_dir = os.path.join(self._root, CHECKPOINTS_DIR)
        self._staging_dir = os.path.join(self._root, STAGING_DIR)
        self._trash_dir = os.path.join(self._root, TRASH_DIR)
        self._manifest_cache = ManifestCache()
        self._mutex = threading.RLock()
        self._hash_pools: list[ThreadPoolExecutor] = []
        self._pipeline: WritePipeline | None = None
        self._staging = StagingArea()
        self._saver = BackgroundSaver(wait_at_exit=wait_at_exit)
        self._save_gate = threading.Lock()  # one save call at a time, so at most one in flight
        # Incremental saves: per file of the last checkpoint this store wrote,
        # the tensors' identity and version counters, its entry and directory.
        self._previous: dict[str, tuple[tuple, FileEntry, str]] = {}
        self._key_index: tuple[str, Manifest, dict[str, str]] | None = None  # read_tensor: key -> file, of the last manifest read
        self._meta = metadata_lock(self._root)  # tags.json, metrics.json: see ckstore.storage.metadata_lock
        #: step -> manifest ``created`` of each checkpoint a load or verify through this object found corrupt
        #: (``created`` tells it from a later checkpoint of the same step); retention gives them no slot.
        self._corrupt: dict[int, float] = {}
        #: step -> ``created`` of each checkpoint this object committed or that verified in retention's check
        #: (``_slots_verified``): one that holds a retention slot is verified once per object, not per save.
        self._verified: dict[int, float] = {}
        #: Steps a publish of this process is reading right now (``ckstore.integrations.dvc.worker``): retention keeps
        #: them. In memory only, so a crash leaves no pin behind; replaced whole, never mutated.
        self._publish_reading: frozenset[int] = frozenset()
        self._closed = False
        _live_stores.add(self)
        # Opening only looks (lstat): "loading never writes". A writable open refuses now, rather than at
        # the first save, a store another user controls, so nothing of it is loaded and trained on first.
        if self.readonly:
            require_store(self._root)
            self._lock = None
        else:
            check_layout(self._root, write=True, trust_foreign=self.trust_foreign)
            self._lock = WriterLock(self._root)  # creates nothing until acquired
        if storage is not None:
            # Every operation under the root runs on this backend (ckstore.storage.base), from any thread.
            mount_storage(self._root, storage)
            self._storage = storage

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Wait for a background save and queued publishes, release the writer lock and the threads. Idempotent.

        Raises AsyncSaveError (after releasing everything) if the background
        save failed and no earlier call reported it; likewise DvcError for a
        publish of this store that failed unseen.
        """
        dvc = sys.modules.get("ckstore.integrations.dvc.publish")  # loaded only once something was published
        try:
            if dvc is not None and not self._closed:
                dvc.wait(self)
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
                for pool in self._hash_pools:
                    pool.shutdown(wait=True)
                self._hash_pools = []
                if self._pipeline is not None:
                    self._pipeline.close()
                    self._pipeline = None
                if self._lock is not None:
                    self._lock.release()
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
        self._pipeline = None
        self._hash_pools = []
        # The staging memory may hold the parent's save in flight: the child stages into its own.
        self._staging = StagingArea()
        # filelock forgets a held writer lock in a child itself, so a release there never unlocks the parent.

    def _create_layout(self) -> None:
        """Create the store's directories (first write only), each made durable in its parent."""
        try:
            if not os.path.isdir(self._root):
                _durable.make_dirs(os.path.dirname(self._root), site="store_parents")
                if _durable.make_dir(self._root, site="store_root", exist_ok=True):
                    _durable.sync_dir(os.path.dirname(self._root), site="store_parent_dir")
            created = False
            for sub in (self._ckpt_dir, self._staging_dir, self._trash_dir):
                created |= _durable.make_dir(sub, site="store_layout", exist_ok=True)
            if created:
                _durable.sync_dir(self._root, site="store_root_dir")
        except FileExistsError:
            raise InvalidArgumentError(f"{self._root}: exists and is not a store directory") from None
        except OSError as exc:
            raise StorageError(f"{self._root}: cannot create the store: {exc.strerror}", errno=exc.errno, path=self._root) from exc

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgumentError(f"{self!r} is closed")

    def _acquire(self) -> bool:
        """Check, create and lock the store for this store's lifetime (first write only) and recover.

        Returns True if this call took the lock (and so just recovered).
        """
        self._check_open()
        if self.readonly or self._lock is None:
            raise ReadOnlyStoreError(f"{self._root}: store is open readonly")
        if self._lock.held:
            return False
        # Checked again at the first write: the store may have been created or changed since the open.
        check_layout(self._root, write=True, trust_foreign=self.trust_foreign)
        self._create_layout()
        self._lock.acquire(timeout=self.lock_timeout)
        try:
            # Checked once more under the lock: the layout directories it just made or found are
            # the ones recovery is about to empty.
            check_layout(self._root, write=True, trust_foreign=self.trust_foreign)
            self._recover()
        except BaseException:
            self._lock.release()
            raise
        return True

    def recover(self) -> None:
        """Take the writer lock and remove what interrupted saves and deletes left behind.

        Every write does this first; call it to clean up a store without
        writing a checkpoint. Waits for a background save of this store
        (whose staging is not a leftover).
        """
        with self._save_gate:
            self._saver.wait()
            with self._mutex:
                if not self._acquire():
                    self._recover()

    # ------------------------------------------------------------ recovery

    def _recover(self) -> None:
        """Remove leftovers of interrupted saves and deletes. Caller holds the writer lock."""
        # The removals below are not fsynced on purpose: if a power cut undoes one, the leftover
        # is still invisible to readers and the next recovery removes it again.
        try:
            for sub, site in ((self._staging_dir, "recover_staging"), (self._trash_dir, "recover_trash")):
                # Listed through a descriptor opened without following links: a .staging/ swapped for a
                # symlink since the layout check is refused (ELOOP), not listed and emptied.
                fd = _durable.open_dir(sub)
                try:
                    names = os.listdir(fd)
                finally:
                    os.close(fd)
                for name in names:
                    _durable.remove_tree(os.path.join(sub, name), site=site)  # never follows a link
            # Under the metadata lock: a shell's tag write in progress has a temp file here, and a
            # tag it adds must not be lost to the pruning's read-modify-replace.
            with self._meta.held():
                for name in os.listdir(self._root):
                    if _durable.is_temp_name(name) and not os.path.isdir(os.path.join(self._root, name)):
                        # Only files: write_file_atomic never makes a directory; one with such a name is not ours.
                        _durable.unlink(os.path.join(self._root, name), site="recover_temp")
                try:
                    tags = self._read_tags()
                except (ManifestError, IntegrityError) as exc:
                    # Never block opening the store, and never delete what fails to verify: tag operations
                    # and retention refuse to act on an unreadable tags.json; everything else works.
                    warnings.warn(f"{exc}; tags are unavailable until the file is repaired", CorruptCheckpointWarning, stacklevel=3)
                else:
                    live = {tag: entry for tag, entry in tags.items() if self._exists(entry.step)}
                    if live != tags:
                        self._write_tags(live)
        except CkstoreError:
            raise
        except OSError as exc:
            raise StorageError(f"{self._root}: recovery failed: {exc.strerror or exc}", errno=exc.errno, path=self._root) from exc

    # ------------------------------------------------------------ listing

    def _step_dirs(self) -> list[tuple[int, str]]:
        try:
            names = os.listdir(self._ckpt_dir)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise CheckpointReadError(f"{self._ckpt_dir}: cannot list checkpoints: {exc.strerror or exc}", path=self._ckpt_dir, errno=exc.errno) from None
        out = []
        for name in names:
            match = _STEP_DIR.fullmatch(name)  # not match(): "$" also accepts "step-00000001\n"
            if match:
                out.append((int(match.group(1)), name))
        out.sort()
        return out

    def _exists(self, step: int) -> bool:
        # lexists, not isfile: a committed step whose manifest.json is a directory or a FIFO is malformed,
        # not gone; pruning its tag here would drop the tag that its quarantine note must record.
        return os.path.lexists(os.path.join(self._ckpt_dir, step_dir_name(step), MANIFEST_NAME))

    def _manifest(self, name: str, *, full: bool = True) -> Manifest:
        """Parse (or reuse the parse of) a checkpoint's manifest. Raises ManifestError/IntegrityError.

        The file is read through ``_safeio`` (no symlink, no FIFO, at most
        MAX_MANIFEST_BYTES) and the parse cached, bounded (``_manifest_cache``);
        ``full=False`` accepts a cached summary without the state skeleton,
        which is all a listing needs. A vanished manifest is
        CheckpointNotFoundError (deleted by a writer meanwhile); an OS error
        (EIO) is CheckpointReadError.
        """
        path = os.path.join(self._ckpt_dir, name, MANIFEST_NAME)
        if os.path.islink(os.path.join(self._ckpt_dir, name)):
            # A symlinked checkpoint directory would make every read leave the store.
            raise ManifestError(f"{os.path.join(self._ckpt_dir, name)}: checkpoint directory is a symlink; refusing to read outside the store", path=path)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{path}: checkpoint vanished or has no manifest") from None
        except OSError as exc:
            raise CheckpointReadError(f"{path}: cannot read manifest: {exc.strerror or exc}", path=path, errno=exc.errno) from None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._manifest_cache.get(name, key, full=full)
        if cached is not None:
            return cached
        try:
            data = _safeio.read_small(path, cap=MAX_MANIFEST_BYTES, what="manifest", error=lambda reason: ManifestError(f"{path}: {reason}", path=path))
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{path}: checkpoint vanished or has no manifest") from None
        manifest = parse_manifest(data, path=path)
        expected = int(_STEP_DIR.match(name).group(1))  # type: ignore[union-attr]
        if manifest.step != expected:
            raise ManifestError(f"{path}: manifest says step {manifest.step} but lives in {name}", path=path)
        self._manifest_cache.put(name, key, manifest, len(data), count_nodes(data))
        return manifest

    def _info(self, manifest: Manifest, tags_by_step: Mapping[int, list[str]], recorded: Mapping[int, Recorded] | None = None) -> CheckpointInfo:
        extra = (recorded or {}).get(manifest.step)
        metrics = dict(manifest.metrics)
        if extra is not None and extra.created == manifest.created:  # metrics recorded after the save (ckstore.checkpoint.metrics_log)
            metrics.update(extra.metrics)
        return CheckpointInfo(
            step=manifest.step,
            metrics=metrics,
            tags=tuple(sorted(tags_by_step.get(manifest.step, ()))),
            path=self.path / CHECKPOINTS_DIR / step_dir_name(manifest.step),
            created=manifest.created,
            nbytes=manifest.nbytes,
            files=dict(manifest.files),
        )

    def _listing(self, *, warn: bool = True) -> list[CheckpointInfo]:
        tags_by_step: dict[int, list[str]] = {}
        try:
            tags = self._read_tags()
        except (ManifestError, IntegrityError) as exc:
            if warn:
                warnings.warn(f"{exc}; listing checkpoints without tags", CorruptCheckpointWarning, stacklevel=3)
            tags = {}
        for tag, entry in tags.items():
            tags_by_step.setdefault(entry.step, []).append(tag)
        try:
            recorded = self._read_metrics_log()
        except (ManifestError, IntegrityError) as exc:
            if warn:
                warnings.warn(f"{exc}; listing checkpoints without their recorded metrics", CorruptCheckpointWarning, stacklevel=3)
            recorded = {}
        infos = []
        for _, name in self._step_dirs():
            try:
                manifest = self._manifest(name, full=False)
            except CheckpointNotFoundError:
                continue  # deleted between listdir and open
            except (ManifestError, IntegrityError) as exc:
                if warn:
                    warnings.warn(f"skipping {name}: {exc}", CorruptCheckpointWarning, stacklevel=3)
                continue
            infos.append(self._info(manifest, tags_by_step, recorded))
        return infos

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints with a readable manifest, ascending by step.

        A checkpoint whose manifest is unreadable is skipped with a
        :class:`CorruptCheckpointWarning` (and reported by :meth:`verify`).
        """
        self._check_open()
        return self._listing()

    def latest(self) -> CheckpointInfo | None:
        """The last committed checkpoint (see ``ckstore.checkpoint.retention``: commit order), or None for an empty store. Not verified here."""
        infos = self.checkpoints()
        return commit_order(infos)[-1] if infos else None  # type: ignore[return-value]

    def _best_metric(self, infos: Sequence[CheckpointInfo]) -> tuple[str, str] | None:
        if self.policy.metric is not None:
            return self.policy.metric, self.policy.mode
        for info in reversed(infos):  # the newest manifest records the policy its writer used
            try:
                retention = self._manifest(info.path.name, full=False).retention
            except CheckpointNotFoundError:
                continue  # deleted by a writer's retention since it was listed
            if retention is not None:
                return retention["metric"], retention["mode"]
        return None

    def best(self) -> CheckpointInfo | None:
        """The best checkpoint by the store's metric (or the one recorded by the last writer), or None.

        A checkpoint this Store has seen fail to load or verify is not a
        candidate (as it holds no retention slot); the next best is returned.
        """
        ranked = self._ranked_best()
        return ranked[0] if ranked else None

    def _ranked_best(self) -> list[CheckpointInfo]:
        """Checkpoints with the metric, best first, less those this Store saw fail; InvalidArgumentError if no metric is known."""
        infos = self.checkpoints()
        chosen = self._best_metric(infos)
        if chosen is None:
            if not infos:
                return []
            raise InvalidArgumentError(f"{self._root}: no metric configured; {NO_METRIC_ADVICE}")
        healthy = [info for info in infos if self._corrupt.get(info.step) != info.created]
        return rank_best(healthy, *chosen)  # type: ignore[return-value]

    def resolve(self, step: int | str) -> CheckpointInfo:
        """The checkpoint named by a step, ``"latest"``, ``"best"`` or a tag."""
        self._check_open()
        if isinstance(step, str):
            if step == "latest":
                info = self.latest()
            elif step == "best":
                info = self.best()
            else:
                check_tag_name(step)
                entry = self._read_tags().get(step)
                if entry is None:
                    raise CheckpointNotFoundError(f"{self._root}: no checkpoint is tagged {step!r}", step=step)
                return self._resolve_step(entry.step)
            if info is None:
                raise CheckpointNotFoundError(f"{self._root}: no {step} checkpoint (store is empty or no checkpoint has the metric)", step=step)
            return info
        return self._resolve_step(_check_step(step))

    def _resolve_step(self, step: int) -> CheckpointInfo:
        name = step_dir_name(step)
        if not os.path.isdir(os.path.join(self._ckpt_dir, name)):
            raise CheckpointNotFoundError(f"{self._root}: no checkpoint at step {step}", step=step)
        manifest = self._manifest(name, full=False)
        tags = {}
        with contextlib.suppress(ManifestError, IntegrityError):
            tags = self._read_tags()
        recorded: dict[int, Recorded] = {}
        with contextlib.suppress(ManifestError, IntegrityError):
            recorded = self._read_metrics_log()
        by_step: dict[int, list[str]] = {}
        for tag, entry in tags.items():
            by_step.setdefault(entry.step, []).append(tag)
        return self._info(manifest, by_step, recorded)

    # ------------------------------------------------------------ tags

    def _read_tags(self) -> dict[str, TagEntry]:
        return read_tags(os.path.join(self._root, TAGS_NAME))

    def _write_tags(self, tags: Mapping[str, TagEntry]) -> None:
        _durable.write_file_atomic(os.path.join(self._root, TAGS_NAME), dump_tags(tags), site="tags")

    def _read_metrics_log(self) -> dict[int, Recorded]:
        return read_metrics(os.path.join(self._root, METRICS_NAME))

    def record_metrics(self, step: int, metrics: Mapping[str, Any]) -> CheckpointInfo:
        """Add metrics to committed checkpoint ``step`` (e.g. validation at the end of the epoch); returns its info.

        The checkpoint itself is never modified: the metrics go to the store's
        ``metrics.json`` (see ``ckstore.checkpoint.metrics_log``) and count for ranking,
        ``best`` and ``keep_best`` from now on. A metric the checkpoint already
        has with another value is refused (InvalidArgumentError). Waits for a
        background save in flight first. Needs only the metadata lock, like
        :meth:`tag`: an evaluation process may record while training runs.
        """
        step = _check_step(step)
        metrics = check_metrics(metrics)
        if not metrics:
            raise InvalidArgumentError("record_metrics needs at least one metric")
        self._check_writable()
        if self._saver.in_flight is not None:
            with self._save_gate:
                self._saver.wait()
                self._saver.raise_unseen()
        with self._meta.held():
            info = self._resolve_step(step)
            clash = sorted(k for k, v in metrics.items() if k in info.metrics and info.metrics[k] != v)
            if clash:
                raise InvalidArgumentError(
                    f"step {step} already has {', '.join(f'{k}={info.metrics[k]!r}' for k in clash)}; recorded metrics never change"
                )
            recorded = self._read_metrics_log()  # unreadable: refuse rather than drop what others recorded
            previous = recorded.get(step)
            kept = dict(previous.metrics) if previous is not None and previous.created == info.created else {}
            recorded[step] = Recorded(info.created, {**kept, **metrics})
            live = {s: r for s, r in recorded.items() if s == step or self._exists(s)}
            path = os.path.join(self._root, METRICS_NAME)
            data = dump_metrics(live)
            self._guarded(lambda: _durable.write_file_atomic(path, data, site="metrics"), what=f"recording metrics of step {step}")
            return self._resolve_step(step)

    def _check_writable(self) -> None:
        self._check_open()
        if self.readonly:
            raise ReadOnlyStoreError(f"{self._root}: store is open readonly")
        # Writes that skip the writer lock (tags, recorded metrics) still never write a store another user
        # controls: the path may have been created by someone else since this object was opened.
        check_layout(self._root, write=True, trust_foreign=self.trust_foreign)

    def tag(self, step: int, name: str) -> CheckpointInfo:
        """Point tag ``name`` at ``step`` (moving it if it named another checkpoint). Tagged checkpoints are kept by retention.

        Needs only the short metadata lock, not the writer lock: a shell may
        tag (and publish) while a training process holds the store, and that
        process's retention honours the tag (see ``ckstore.storage.metadata_lock``).
        """
        check_tag_name(name)
        step = _check_step(step)
        self._check_writable()
        with self._meta.held():
            if not self._exists(step):
                raise CheckpointNotFoundError(f"{self._root}: no checkpoint at step {step}", step=step)
            self._resolve_step(step)  # a malformed one (manifest.json a directory) is refused before the tag is written
            tags = self._read_tags()
            tags[name] = TagEntry(step, time.time())
            self._guarded(lambda: self._write_tags(tags), what=f"tag {name!r}")
            return self._resolve_step(step)

    def untag(self, name: str) -> None:
        """Remove tag ``name``; CheckpointNotFoundError if no checkpoint carries it. Needs only the metadata lock, like :meth:`tag`."""
        check_tag_name(name)
        self._check_writable()
        with self._meta.held():
            tags = self._read_tags()
            if name not in tags:
                raise CheckpointNotFoundError(f"{self._root}: no checkpoint is tagged {name!r}", step=name)
            del tags[name]
            self._guarded(lambda: self._write_tags(tags), what=f"untag {name!r}")

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
        from .integrations.dvc import publish as _dvc

        return _dvc.publish(self, step, name=name, repo=repo, dest=dest, remote=remote, wait=wait, weights_only=weights_only)

    def _guarded(self, action, *, what: str) -> Any:
        try:
            return action()
        except CkstoreError:
            raise  # already typed (UnsafeStoreError is also an OSError)
        except OSError as exc:
            raise StorageError(f"{self._root}: {what} failed: {exc.strerror or exc}", errno=exc.errno, path=getattr(exc, "filename", None)) from exc

    # ------------------------------------------------------------ save

    def save(
        self,
        state: Any,
        *,
        step: int,
        metrics: Mapping[str, Any] | None = None,
        tags: Iterable[str] = (),
        blocking: bool = True,
    ) -> Any:
        """Write ``state`` as checkpoint ``step``; returns once it is durable.

        ``state`` is any nesting of dicts, lists and tuples holding tensors,
        NumPy arrays, Python scalars, strings, bytes and None, and objects with
        ``state_dict()``/``load_state_dict()`` (modules, optimizers, schedulers,
        grad scalers, stateful data loaders). Raises CheckpointExistsError if the
        step is committed, StateError naming the key of an unsupported value, and
        StorageError if the disk fails (the partial checkpoint is removed; earlier
        ones are intact). Retention runs after the new checkpoint is durable.

        With ``blocking=False`` the call returns an :class:`AsyncSave` handle as
        soon as the state is copied into reused staging memory (the caller may
        then modify its tensors); writing, fsync, commit, tags and retention
        run in a background thread. A call made while a background save is
        running first waits for it (the wait is reported as ``wait_s``); if
        that save failed, the call raises AsyncSaveError and saves nothing.
        """
        step = _check_step(step)
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
                self._make_room(step)
                if tag_names:
                    # A tags.json that cannot be read would fail the tagging after the commit: refuse
                    # now, while refusing leaves nothing behind (a retry then just works).
                    self._read_tags()
                with _gc_paused():
                    fingerprints: dict[int, tuple] = {}
                    encoded = encode_state(state, prepare=self._preparer(fingerprints, staged=not blocking))
                    file_prints = {}
                    if self.incremental:
                        file_prints = {
                            name: tuple((key, fingerprints.get(id(tensor))) for key, tensor in entries) for name, entries in encoded.files.items()
                        }
                    if not blocking:
                        copy_started = time.perf_counter()
                        # Drop every reference to the caller's tensors here, not when
                        # this frame ends: freeing a tensor releases the GIL, and
                        # with the writer thread running, each free would wait for
                        # it (10,000 frees took a second).
                        encoded.rebind(self._staging.stage(encoded.tensors(), encoded.specs, on_device=encoded.on_device))
                if blocking:
                    self.stats.update(wait_s=waited, copy_s=0.0)
                    info = self._persist(encoded, step, metrics, tag_names, file_prints)
                    self.stats["stall_s"] = time.perf_counter() - called
                    return info
                handle = AsyncSave(step, self._saver)
                handle.wait_s = waited
                handle.copy_s = time.perf_counter() - copy_started
                handle.stall_s = time.perf_counter() - called
                self.stats.update(wait_s=waited, copy_s=handle.copy_s, stall_s=handle.stall_s, staging_bytes=self._staging.capacity)

                def work() -> CheckpointInfo:
                    with self._mutex:
                        return self._persist(encoded, step, metrics, tag_names, file_prints)

                self._saver.start(handle, work)
                return handle

    def _make_room(self, step: int) -> None:
        """Move a committed ``step`` that failed verification, or that a rollback left ahead, into the quarantine.

        Raises CheckpointExistsError for a real duplicate (see ``ckstore.checkpoint.quarantine``).
        """
        name = step_dir_name(step)
        path = os.path.join(self._ckpt_dir, name)
        if not os.path.lexists(path):
            return
        problems = self._verify_dir(step, name)
        if problems:
            reason = FAILED_VERIFICATION
        elif left_ahead(self._listing(warn=False), step):
            reason = LEFT_AHEAD
        else:
            raise CheckpointExistsError(f"{self._root}: step {step} is already committed; steps are never overwritten", step=step)
        with self._meta.held():
            tags = self._read_tags()  # unreadable: refuse, a tag of this step would silently move to the new one
            mine = sorted(t for t, e in tags.items() if e.step == step)
            entry = self._guarded(
                lambda: _quarantine.move_aside(self._root, path, step, reason=reason, problems=[p.message for p in problems], tags=mine),
                what=f"moving step {step} into the quarantine",
            )
            self._manifest_cache.pop(name, None)
            self._corrupt.pop(step, None)
            if mine:
                self._guarded(lambda: self._write_tags({t: e for t, e in tags.items() if e.step != step}), what="untagging")
        dropped = f"; its tags {mine} were removed (recorded in {entry.path}.json)" if mine else ""
        warnings.warn(
            f"step {step} {reason}: moved into the quarantine at {entry.path} to save step {step} again{dropped}; "
            "nothing was deleted (empty it with `ckstore quarantine PATH --empty`)",
            CorruptCheckpointWarning,
            stacklevel=3,
        )

    def quarantine(self) -> list[QuarantineEntry]:
        """Checkpoints a save moved aside (failed verification, or left ahead by a rollback), oldest first. See ``ckstore.checkpoint.quarantine``."""
        self._check_open()
        return _quarantine.entries(self._root)

    def empty_quarantine(self) -> list[Path]:
        """Delete every quarantined checkpoint (crash-safely); returns their former paths. Takes the writer lock."""
        with self._mutex:
            self._acquire()
            return self._guarded(lambda: _quarantine.empty(self._root, self._trash_dir), what="emptying the quarantine")

    def wait(self) -> CheckpointInfo | None:
        """Block until the background save (if any) is durable and return its checkpoint.

        Raises AsyncSaveError, with the cause chained, if a background save
        failed and no earlier call reported it. Returns None when no
        background save was made.
        """
        self._saver.wait()
        self._saver.raise_unseen()
        handle = self._saver._current
        if handle is None or handle._future.exception() is not None:
            return None
        return handle._future.result()

    def _preparer(self, fingerprints: dict[int, tuple], *, staged: bool) -> Any:
        """The per-tensor check for encode_state; records each tensor's identity for incremental saves."""
        if not self.incremental:
            # A background save's staging copy does what prepare_tensor would
            # (contiguous, on the host), so its tensors are only validated.
            return None if staged else _prepare_for_sync_save
        check = check_tensor if staged else _prepare_for_sync_save

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

    def _persist(self, encoded: Encoded, step: int, metrics: dict[str, float], tag_names: list[str], file_prints: Mapping[str, tuple]) -> CheckpointInfo:
        started = time.perf_counter()
        self._stage_device_tensors(encoded)
        self._commit(encoded, step, metrics, file_prints)
        return self._after_commit(step, tag_names, started)

    def _after_commit(self, step: int, tag_names: list[str], started: float) -> CheckpointInfo:
        """Steps 8 and 9 (tags, retention) after ``step`` committed; CommittedWithErrorsError if either fails."""
        what = "tagging it"
        try:
            if tag_names:
                with self._meta.held():
                    current = self._read_tags()
                    now = time.time()
                    for name in tag_names:
                        current[name] = TagEntry(step, now)
                    self._guarded(lambda: self._write_tags(current), what="tagging the new checkpoint")
            what = "retention"
            self._apply_retention(protect=step)
        except (CkstoreError, OSError) as exc:
            raise CommittedWithErrorsError(
                f"{self._root}: step {step} is committed and durable, but {what} failed afterwards: {exc}; "
                f"do not save step {step} again",
                step=step,
                errno=getattr(exc, "errno", None),
                path=getattr(exc, "filename", None) or getattr(exc, "path", None),
            ) from exc
        self.stats["saves"] += 1
        self.stats["write_s"] = time.perf_counter() - started
        return self._resolve_step(step)

    def _stage_device_tensors(self, encoded: Encoded) -> None:
        """Copy a sync save's GPU tensors to host memory in one batch: pinned staging, async copies, one synchronize.

        A blocking ``.to("cpu")`` per tensor into pageable memory costs a
        round trip each (10,000 small tensors: seconds). Background saves
        arrive here already staged; this is a no-op for them.
        """
        order = [(name, i) for name, entries in encoded.files.items() for i, (_, tensor) in enumerate(entries) if tensor.device.type == "cuda"]
        if not order:
            return
        staged = self._staging.stage([encoded.files[name][i][1] for name, i in order])
        for (name, i), tensor in zip(order, staged):
            encoded.files[name][i] = (encoded.files[name][i][0], tensor)

    def _pool(self, index: int = 0) -> ThreadPoolExecutor:
        """One of two single-thread hash executors. A file's batches go to one executor,
        so they are hashed in order; successive files alternate, so two files can be
        hashed at once while a third is read."""
        while len(self._hash_pools) < 2:
            self._hash_pools.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckstore-hash"))
        return self._hash_pools[index % 2]

    def _writer(self) -> WritePipeline:
        if self._pipeline is None:
            self._pipeline = WritePipeline(direct=self.direct_io)
        return self._pipeline

    def _link_unchanged(self, encoded: Encoded, staging: str, file_prints: Mapping[str, tuple]) -> dict[str, FileEntry]:
        """Hard-link each file identical to the previous checkpoint's; return the linked entries.

        The version counters only pick the candidates (a file whose tensors
        were not modified in place since the last save); what proves a file
        identical is its content hash, computed from memory and compared with
        the previous manifest's. A failed link (the previous checkpoint was
        deleted meanwhile, a filesystem without hard links) falls back to a write.
        """
        if not self.incremental or not self._previous:
            return {}
        candidates = []
        for name in encoded.files:
            prints = file_prints.get(name)
            if prints and name in self._previous and all(fp is not None for _, fp in prints) and self._previous[name][0] == prints:
                candidates.append(name)
        if not candidates:
            return {}
        hashed = self._writer().hash_files([encoded.files[name] for name in candidates], algo=self.hash_algorithm)
        linked: dict[str, FileEntry] = {}
        for name, written in zip(candidates, hashed):
            _, entry, directory = self._previous[name]
            if written.size != entry.size or written.hash != entry.hash:
                continue
            try:
                _durable.link(os.path.join(self._ckpt_dir, directory, name), os.path.join(staging, name), site="incremental")
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.EMLINK, errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                continue
            linked[name] = entry
        return linked

    def _commit_time(self) -> float:
        """Now, but always after every committed checkpoint: commit order is ``created`` order even if the clock steps back."""
        newest = max((info.created for info in self._listing(warn=False)), default=0.0)
        now = time.time()
        return now if now > newest else max(newest + 1e-6, math.nextafter(newest, math.inf))

    def _commit(self, encoded: Encoded, step: int, metrics: dict[str, float], file_prints: Mapping[str, tuple] | None = None) -> None:
        final_name = step_dir_name(step)
        staging = os.path.join(self._staging_dir, f"{final_name}.{secrets.token_hex(4)}")
        committed = False
        file_prints = file_prints or {}
        try:
            _durable.make_dir(staging, site="staging")
            linked = self._link_unchanged(encoded, staging, file_prints)
            jobs = [(name, entries) for name, entries in encoded.files.items() if name not in linked]
            results = self._writer().write_files(
                [(os.path.join(staging, name), entries) for name, entries in jobs], algo=self.hash_algorithm, check=self._saver.check_abandoned
            )
            written: dict[str, WrittenFile] = dict(zip((name for name, _ in jobs), results))
            files: dict[str, FileEntry] = {}
            for name in encoded.files:  # manifest order follows the state, linked or written
                files[name] = linked[name] if name in linked else FileEntry(written[name].size, written[name].hash)
            self.stats.update(
                files_written=len(written),
                files_linked=len(linked),
                bytes_written=sum(w.size for w in written.values()),
                bytes_linked=sum(e.size for e in linked.values()),
            )
            self._saver.check_abandoned()  # an abandoned save never commits, however far its writes got
            renamed: list[bool] = []
            try:
                self._finalize(staging, step, files, encoded.skeleton, metrics, renamed=renamed)
            finally:
                committed = bool(renamed)
            if self.incremental:
                self._previous = {name: (file_prints.get(name, ()), entry, final_name) for name, entry in files.items()}
        except BaseException as exc:
            if not committed:
                with contextlib.suppress(OSError):
                    _durable.remove_tree(staging, site="abort")
            if isinstance(exc, OSError):
                state = "committed but its durability is unknown" if committed else "abandoned"
                raise StorageError(
                    f"{self._root}: saving step {step} failed ({exc.strerror or exc}); the save was {state}, "
                    "earlier checkpoints are intact",
                    errno=exc.errno,
                    path=getattr(exc, "filename", None),
                ) from exc
            raise

    def _finalize(
        self, staging: str, step: int, files: dict[str, FileEntry], skeleton: Any, metrics: dict[str, float], *, renamed: list[bool]
    ) -> Manifest:
        """Steps 4 to 7 for a staging directory whose listed files are all written and fsynced; returns the manifest.

        The one commit of every save: a single-process save and a multi-rank
        save (``ckstore.distributed``, whose ranks wrote the files) both end
        here. ``renamed`` gets True appended the moment the commit rename took
        effect: if this raises with ``renamed`` empty, nothing was committed and
        the caller removes ``staging``; otherwise the checkpoint is committed and
        only the durability of the rename is in doubt.
        """
        final_name = step_dir_name(step)
        retention = {"metric": self.policy.metric, "mode": self.policy.mode} if self.policy.metric else None
        manifest = Manifest(step=step, created=self._commit_time(), files=files, state=skeleton, metrics=metrics, retention=retention)
        data = manifest.to_json()
        # Readers refuse a manifest past these limits: committing one would make a checkpoint no load accepts.
        # (A multi-rank save's metadata grows with ranks x tensors; see docs/distributed.md.)
        if len(data) > MAX_MANIFEST_BYTES or count_nodes(data) > MAX_MANIFEST_NODES:
            raise StateError(
                f"step {step}: its manifest would be {len(data)} bytes with about {count_nodes(data)} JSON values, past the "
                f"{MAX_MANIFEST_BYTES} bytes / {MAX_MANIFEST_NODES} values a reader accepts; nothing was committed",
                key="manifest",
            )
        with _durable.create(os.path.join(staging, MANIFEST_NAME), site="manifest") as writer:
            writer.write(data)
            writer.sync()
        _durable.sync_dir(staging, site="staging_dir")
        _durable.rename(staging, os.path.join(self._ckpt_dir, final_name), site="commit")
        renamed.append(True)
        # The manifest we just wrote need not be read back and parsed again
        # (a 10,000-tensor skeleton costs tens of milliseconds to check).
        with contextlib.suppress(OSError):
            st = os.stat(os.path.join(self._ckpt_dir, final_name, MANIFEST_NAME))
            self._manifest_cache[final_name] = ((st.st_ino, st.st_mtime_ns, st.st_size), manifest)
        _durable.sync_dir(self._ckpt_dir, site="checkpoints_dir")
        _durable.sync_dir(self._staging_dir, site="staging_parent_dir")
        return manifest

    # ------------------------------------------------------------ retention and deletion

    def _apply_retention(self, policy: RetentionPolicy | None = None, *, protect: int | None = None, dry_run: bool = False) -> list[int]:
        """Delete what the policy does not keep; never ``protect`` (the checkpoint a save just committed).

        Holds the metadata lock from reading the tags through the deletions, so
        a tag added meanwhile by another process is honoured (``ckstore.storage.metadata_lock``).
        """
        policy = policy or self.policy
        if not policy.prunes:
            return []
        with self._meta.held():
            try:
                self._read_tags()
                if policy.keep_best is not None:
                    self._read_metrics_log()
            except (ManifestError, IntegrityError) as exc:
                # Which checkpoints are pinned (or best) is unknown: deleting now could drop a kept one.
                warnings.warn(f"retention skipped: {exc}", CorruptCheckpointWarning, stacklevel=3)
                return []
            infos = self._listing(warn=False)
            protected = ({protect} if protect is not None else set()) | self._publish_reading
            self._verified.update((info.step, info.created) for info in infos if info.step == protect)  # just written
            doomed = self._slots_verified(infos, policy, protected)
            if not dry_run:
                for step in doomed:
                    self._delete_dir(step)
        return doomed

    def _slots_verified(self, infos: list[CheckpointInfo], policy: RetentionPolicy, protected: set[int]) -> list[int]:
        """The deletions of ``policy``, once every checkpoint that holds a keep_last or keep_best slot has verified.

        A corrupt checkpoint holds no slot, but a fresh Store that saves
        without loading first knows of no corruption: bit rot in the newest
        step took a slot and retention deleted the older one, the only one
        that verified. So before deleting, each slot holder this object has
        not yet verified (or committed) is verified, once per object; one that
        fails is noted corrupt (never deleted, no slot) and the slots are
        ranked again. Checkpoints kept by keep_every or a tag push nothing out,
        so they are not read.
        """
        while True:
            corrupt = {info.step for info in infos if self._corrupt.get(info.step) == info.created}
            doomed = plan_deletions(infos, policy, protect=protected, corrupt=corrupt)
            if not doomed:
                return doomed
            sound = [info for info in infos if info.step not in corrupt]
            holders: list[CheckpointInfo] = commit_order(sound)[-policy.keep_last :] if policy.keep_last else []  # type: ignore[assignment]
            if policy.keep_best and policy.metric is not None:
                holders += rank_best(sound, policy.metric, policy.mode)[: policy.keep_best]  # type: ignore[arg-type]
            unchecked = {info.step: info for info in holders if info.step not in protected and self._verified.get(info.step) != info.created}
            if not unchecked:
                return doomed
            found = False
            for step, info in sorted(unchecked.items()):
                problems = self._verify_dir(step, info.path.name)
                if problems:
                    self._corrupt[step] = info.created
                    found = True
                    warnings.warn(
                        f"checkpoint step {step} failed verification ({problems[0].message}); retention gives it no slot and keeps it",
                        CorruptCheckpointWarning,
                        stacklevel=5,
                    )
                else:
                    self._verified[step] = info.created
            if not found:
                return doomed

    def _retain_after_publish(self) -> None:
        """Retention once a publish released its pins (``ckstore.integrations.dvc.worker``); only where this object is the writer."""
        with self._mutex:
            if not self._closed and self._lock is not None and self._lock.held:
                self._apply_retention()

    def _delete_dir(self, step: int) -> None:
        name = step_dir_name(step)
        trash = os.path.join(self._trash_dir, f"{name}.{secrets.token_hex(4)}")

        def run() -> None:
            # Leaving checkpoints/ is the deletion's commit point: one atomic rename.
            _durable.rename(os.path.join(self._ckpt_dir, name), trash, site="delete")
            _durable.sync_dir(self._ckpt_dir, site="delete_checkpoints_dir")
            _durable.sync_dir(self._trash_dir, site="delete_trash_dir")
            _durable.remove_tree(trash, site="delete_tree")

        self._guarded(run, what=f"deleting step {step}")
        self._manifest_cache.pop(name, None)

    def delete(self, step: int, *, force: bool = False) -> None:
        """Delete checkpoint ``step`` crash-safely. A tagged checkpoint needs ``force=True`` (its tags go too)."""
        step = _check_step(step)
        with self._mutex:
            self._acquire()
            path = os.path.join(self._ckpt_dir, step_dir_name(step))
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                raise CheckpointNotFoundError(f"{self._root}: no checkpoint at step {step}", step=step) from None
            if stat.S_ISLNK(mode):
                # Never delete through a link: renaming it into .trash/ and emptying that would empty its target.
                raise UnsafeStoreError(
                    f"{path}: is a symlink, not a checkpoint; refusing to delete through it (remove the link by hand)", path=path
                )
            if not stat.S_ISDIR(mode):
                raise InvalidArgumentError(f"{path}: is not a checkpoint directory; refusing to delete it")
            with self._meta.held():
                tags = self._read_tags()
                mine = sorted(t for t, e in tags.items() if e.step == step)
                if mine and not force:
                    raise InvalidArgumentError(f"step {step} is tagged {mine}; untag it or pass force=True")
                if mine:
                    self._guarded(lambda: self._write_tags({t: e for t, e in tags.items() if e.step != step}), what="untagging")
                self._delete_dir(step)

    def gc(self, *, policy: RetentionPolicy | None = None, dry_run: bool = False) -> list[int]:
        """Recover leftovers and apply retention now (the store's policy, or ``policy``). Returns deleted steps."""
        if policy is not None and not isinstance(policy, RetentionPolicy):
            raise InvalidArgumentError(f"policy must be a ckstore.RetentionPolicy or None, got {type(policy).__name__}")
        with self._mutex:
            self._acquire()
            return self._apply_retention(policy, dry_run=dry_run)

    # ------------------------------------------------------------ load and verify

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

        ``state`` must match the checkpoint (see ``_targets``): a key it has
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
        """
        self._check_open()
        table = class_table(classes)
        if step == "best":
            loaded = self._load_first(self._ranked_best(), state, map_location=map_location, verify=verify, strict=strict, stacklevel=3, classes=table)
            if loaded is None:
                raise CheckpointNotFoundError(f"{self._root}: no best checkpoint (store is empty or no checkpoint has the metric)", step=step)
            return loaded[1]
        if step is not None:
            return self._load_one(self.resolve(step), state, map_location, verify, strict, classes=table)
        loaded = self._load_newest(state, map_location=map_location, verify=verify, strict=strict, stacklevel=3, classes=table)
        if loaded is None:
            raise CheckpointNotFoundError(f"{self._root}: store has no checkpoints")
        return loaded[1]

    def _load_newest(
        self, state: Any, *, map_location: Any, verify: bool, strict: bool = True, stacklevel: int, classes: Mapping[str, type] | None = None
    ) -> tuple[CheckpointInfo, Any] | None:
        """Load the newest checkpoint that loads; return it and the restored state, or None if the store is empty.

        The one fallback loop, shared by :meth:`load` and :func:`ckstore.resume`.
        Every CkstoreError of one checkpoint (a hash or size mismatch, a read
        error such as EIO, a malformed manifest or state skeleton, an odd file
        where a manifest belongs) skips it with a CorruptCheckpointWarning and
        tries the next older one; it is left on disk untouched. A StateError
        is raised at once: the caller's objects do not fit the checkpoint, and
        every older one would disagree alike. A checkpoint deleted meanwhile
        (by a writer's retention) is skipped silently. If checkpoints exist
        but none loads, CheckpointNotFoundError names each step and its error.
        """
        infos = self.checkpoints()
        # The last committed first (see ckstore.checkpoint.retention).
        return self._load_first(
            reversed(commit_order(infos)), state, map_location=map_location, verify=verify, strict=strict, stacklevel=stacklevel + 1, classes=classes
        )

    def _load_first(
        self,
        candidates: Iterable[CheckpointInfo],
        state: Any,
        *,
        map_location: Any,
        verify: bool,
        strict: bool,
        stacklevel: int,
        classes: Mapping[str, type] | None = None,
    ) -> tuple[CheckpointInfo, Any] | None:
        """Load the first of ``candidates`` that loads (the fallback loop described in :meth:`_load_newest`); None if there are none."""
        failed: list[str] = []
        first: CkstoreError | None = None
        for info in candidates:
            try:
                return info, self._load_one(info, state, map_location, verify, strict, classes=classes)
            except CheckpointNotFoundError:
                continue  # deleted by retention while we looked
            except StateError:
                raise
            except CkstoreError as exc:
                warnings.warn(f"checkpoint step {info.step} failed to load and was skipped: {exc}", CorruptCheckpointWarning, stacklevel=stacklevel)
                failed.append(f"step {info.step}: {type(exc).__name__}: {str(exc)[:300]}")
                first = first or exc
        if not failed:
            return None
        raise CheckpointNotFoundError(f"{self._root}: no checkpoint verifies ({'; '.join(failed)})") from first

    def _load_one(self, info: CheckpointInfo, state: Any, map_location: Any, verify: bool, strict: bool = True, classes: Mapping[str, type] | None = None) -> Any:
        with _gc_paused():
            try:
                loaded = self._load_one_file_by_file(info, state, map_location, verify, strict, classes)
                if verify:  # every file was hashed: retention need not read it again (``_slots_verified``)
                    self._mark_sound(info.step, info.created)
                return loaded
            except (CheckpointNotFoundError, StateError):
                raise  # gone, or the caller's objects do not fit: says nothing about the checkpoint
            except CkstoreError:
                self._corrupt[info.step] = info.created  # failed to load: retention gives it no slot and never deletes it
                raise

    def _load_one_file_by_file(self, info: CheckpointInfo, state: Any, map_location: Any, verify: bool, strict: bool, classes: Mapping[str, type] | None = None) -> Any:
        directory = str(info.path)
        manifest = self._manifest(info.path.name)
        if verify:
            self._refuse_unlisted(directory, manifest, info.step)
        # ``state`` is matched against the checkpoint before any byte is read
        # (a strict load refuses a mismatch with nothing restored). Tensors of
        # ``state`` (module parameters and buffers, plain tensors) that the
        # checkpoint overwrites are read straight into their memory, unless
        # two of them share memory (``drop_overlapping``) or the load is not
        # strict (a target of another shape is then skipped, not refused).
        # Should verification then fail, those tensors hold partial data until
        # a checkpoint that verifies is loaded (load() with no step does that).
        plan = plan_load(manifest.state, state, direct=map_location is None and strict)
        if strict and plan.mismatch:
            raise plan.mismatch.error(f"step {info.step}")
        targets = plan.reads
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        checks: list[Any] = []  # each file's hash is checked after the next is read, all before any use
        try:
            for index, (name, entry) in enumerate(manifest.files.items()):
                path = os.path.join(directory, name)
                try:
                    tensors[name] = read_tensor_file(
                        path,
                        size=entry.size,
                        expected=entry.hash if verify else None,
                        targets=targets.get(name),
                        hash_pool=self._pool(index),
                        deferred=checks,
                    )
                except IntegrityError:
                    if not os.path.isdir(directory):
                        # Deleted (by a writer's retention) while being read: gone, not corrupt.
                        raise CheckpointNotFoundError(f"{directory}: checkpoint was deleted while being loaded", step=info.step) from None
                    raise
        finally:
            failure = None
            for check in checks:  # every one runs, so no hash task outlives this call
                try:
                    check()
                except IntegrityError as exc:
                    failure = failure or exc
            if any(t.is_cuda for file_targets in targets.values() for t in file_targets.values()):
                torch.cuda.synchronize()  # the host-to-device copies read_tensor_file started are complete
        if failure is not None:
            raise failure

        def source(file: str, key: str) -> torch.Tensor:
            try:
                return tensors[file][key]
            except KeyError:
                path = os.path.join(directory, file)
                raise IntegrityError(f"{path}: tensor {key!r} named by the manifest is missing", path=path, expected=key, actual="missing") from None

        result = decode_state(
            manifest.state, source, target=state, map_location=map_location,
            strict=strict, mismatch=plan.mismatch, module_states=plan.module_states, validated=True, classes=classes,
        )  # fmt: skip
        if plan.mismatch:
            plan.mismatch.warn(f"step {info.step}", stacklevel=4)
        return result

    def _refuse_unlisted(self, directory: str, manifest: Manifest, step: int) -> None:
        """A file in the checkpoint that its manifest does not list (planted, or a symlink out) fails the load, as it fails verify()."""
        extra = sorted(self._unlisted(directory, manifest))
        if extra:
            path = os.path.join(directory, extra[0])
            raise IntegrityError(f"{path}: file not listed in the manifest (step {step} holds {len(extra)} such)", path=path, expected=None, actual="unlisted file")

    def _unlisted(self, directory: str, manifest: Manifest) -> set[str]:
        try:
            present = os.listdir(directory)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{directory}: checkpoint was deleted while being loaded") from None
        except OSError as exc:
            raise CheckpointReadError(f"{directory}: cannot list the checkpoint: {exc.strerror or exc}", path=directory, errno=exc.errno) from None
        return set(present) - set(manifest.files) - {MANIFEST_NAME}

    def tensor_keys(self, step: int | str = "latest") -> list[str]:
        """The keys :meth:`read_tensor` accepts for a checkpoint: state paths joined by ``/`` (``model/fc.weight``)."""
        self._check_open()
        info = self.resolve(step)
        return sorted(key for _, key in tensor_refs(self._manifest(info.path.name).state))

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
        info = self.resolve(step)
        manifest = self._manifest(info.path.name)
        cached = self._key_index
        if cached is None or cached[0] != info.path.name or cached[1] is not manifest:
            # One checkpoint's index only: an index per checkpoint read would keep every manifest alive past the cache's bound.
            cached = self._key_index = (info.path.name, manifest, {name: file for file, name in tensor_refs(manifest.state)})
        file = cached[2].get(key)
        if file is None:
            raise InvalidArgumentError(f"step {info.step} has no tensor {key!r}; see Store.tensor_keys()")
        entry = manifest.files[file]
        return read_one_tensor(os.path.join(str(info.path), file), key, size=entry.size, expected=entry.hash if verify else None)

    def verify(self, step: int | str | None = None) -> list[Problem]:
        """Check every file of one checkpoint (or all when None) against its manifest; return each problem found.

        An empty list means everything verified. Nothing is modified or deleted.
        """
        self._check_open()
        problems: list[Problem] = []
        if step is None:
            try:
                targets = self._step_dirs()
            except CheckpointReadError as exc:
                problems.append(Problem(None, exc.path, str(exc), exc.expected, exc.actual))
                targets = []
        elif isinstance(step, int) and not isinstance(step, bool):
            # By number, without parsing the manifest: a corrupt manifest is a problem to report, not an error.
            number = _check_step(step)
            if not os.path.isdir(os.path.join(self._ckpt_dir, step_dir_name(number))):
                raise CheckpointNotFoundError(f"{self._root}: no checkpoint at step {number}", step=number)
            targets = [(number, step_dir_name(number))]
        else:
            info = self.resolve(step)
            targets = [(info.step, info.path.name)]
        for number, name in targets:
            found = self._verify_dir(number, name)
            self._note_verified(number, name, ok=not found)
            problems.extend(found)
        with contextlib.suppress(FileNotFoundError):
            try:
                self._read_tags()
            except (ManifestError, IntegrityError) as exc:
                problems.append(Problem(None, os.path.join(self._root, TAGS_NAME), str(exc)))
        with contextlib.suppress(FileNotFoundError):
            try:
                self._read_metrics_log()
            except (ManifestError, IntegrityError) as exc:
                problems.append(Problem(None, os.path.join(self._root, METRICS_NAME), str(exc)))
        return problems

    def _note_verified(self, step: int, name: str, *, ok: bool) -> None:
        """Record what verify() found, so retention neither re-hashes a sound checkpoint nor gives a corrupt one a slot."""
        with contextlib.suppress(CkstoreError):  # an unreadable manifest: not listed, so retention never sees it
            created = self._manifest(name).created
            if ok:
                self._mark_sound(step, created)
            else:
                self._corrupt[step] = created

    def _mark_sound(self, step: int, created: float) -> None:
        """Every file of ``step`` just hashed right: no re-hash by retention, and a transient read error is forgotten."""
        self._verified[step] = created
        if self._corrupt.get(step) == created:
            del self._corrupt[step]

    def _verify_dir(self, step: int, name: str) -> list[Problem]:
        directory = os.path.join(self._ckpt_dir, name)
        try:
            manifest = self._manifest(name)
        except CheckpointNotFoundError as exc:
            if not os.path.isdir(directory):
                return []  # deleted by a writer since it was listed
            return [Problem(step, os.path.join(directory, MANIFEST_NAME), str(exc), "manifest.json", "missing")]
        except IntegrityError as exc:
            return [Problem(step, exc.path, str(exc), exc.expected, exc.actual)]
        except ManifestError as exc:
            return [Problem(step, exc.path or directory, str(exc))]
        problems = []
        wanted: dict[str, set[str]] = {}
        for file, key in tensor_refs(manifest.state):
            wanted.setdefault(file, set()).add(key)
        for file, entry in manifest.files.items():
            path = os.path.join(directory, file)
            try:
                specs = verify_tensor_file(path, size=entry.size, expected=entry.hash)
            except IntegrityError as exc:
                problems.append(Problem(step, exc.path, str(exc), exc.expected, exc.actual))
                continue
            for key in sorted(wanted.get(file, set()) - specs.keys()):
                problems.append(Problem(step, path, f"{path}: tensor {key!r} named by the manifest is not in the file", key, "missing"))
        try:
            extra = self._unlisted(directory, manifest)
        except CkstoreError as exc:
            problems.append(Problem(step, directory, str(exc)))
            extra = set()
        for name_ in sorted(extra):
            problems.append(Problem(step, os.path.join(directory, name_), "file not listed in the manifest", None, "unlisted file"))
        if problems and not os.path.isdir(directory):
            return []  # deleted (by a writer's retention) while being checked: gone, not corrupt
        return problems


_live_stores: weakref.WeakSet[Store] = weakref.WeakSet()


def _reset_stores_in_child() -> None:
    for store in list(_live_stores):
        store._after_fork_in_child()


os.register_at_fork(after_in_child=_reset_stores_in_child)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No garbage collection while a save or load walks a large state.

    Both allocate a few objects per tensor (the skeleton, header entries,
    views), all alive until the call ends: a collection meanwhile only
    traverses them (a full one, the whole heap) and frees nothing. On 10,000
    tensors it took a third of a background save's stall and a third of a load.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _prepare_for_sync_save(tensor: torch.Tensor, key: str) -> torch.Tensor:
    """prepare_tensor, except that GPU tensors stay put: ``Store._stage_device_tensors`` copies them in one batch."""
    if tensor.device.type == "cuda":
        return check_tensor(tensor, key)
    return prepare_tensor(tensor, key)
