"""The commit protocol of a checkpoint, written once, and the recovery and deletion that go with it.

Layout of a store directory (names in ``ckstore.storage.layout``)::

    <root>/
      checkpoints/step-00000120/   one directory per committed checkpoint
          manifest.json            written last; lists every file with size and hash
          model.fc.safetensors ... tensor files (plain safetensors)
      tags.json                    tag -> step, replaced atomically
      metrics.json                 metrics recorded after a save (ckstore.format.metrics_log)
      .staging/                    checkpoints being written (invisible to readers)
      .trash/                      checkpoints being deleted (invisible to readers)
      .quarantine/                 checkpoints a save moved aside (ckstore.checkpoint.quarantine)
      .ckstore.lock                the writer lock (+ .ckstore.lock.owner: pid, host)
      .ckstore.meta.lock           the metadata lock over tags.json, metrics.json (ckstore.storage.metadata_lock)

Commit protocol of :meth:`Store.save` (every step goes through ``ckstore.storage.durable``):

1. Take the writer lock (first write only) and recover leftovers (below).
2. If step ``N`` is committed: move it into the quarantine if it fails
   verification or a rollback left it ahead of the run, else refuse
   (CheckpointExistsError). Create ``.staging/step-<N>.<random>/``.
3. Write each tensor file there, fsync it, close it (:func:`finish_files`).
   (Files stream through a few reused page-aligned buffers, written with
   ``O_DIRECT`` where the filesystem allows, hashed while they are written,
   and handed to :func:`finish_files` in batches on the write pipeline's sync
   thread while later files are written; every fsync is done before step 4.
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
9. Apply retention (``ckstore.checkpoint.pruning``), holding the metadata lock: each
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
(``durable.remove_tree``). Reads ignore leftovers. A crash at any moment therefore leaves each
checkpoint either absent or whole, and a kill mid-delete never leaves a half
checkpoint in ``checkpoints/``.

``save(..., blocking=False)`` copies the state into reused host memory
(``ckstore.engine.host_copy``), returns, and runs steps 2-9 in a background
thread (``ckstore.checkpoint.background``); the checkpoint is durable once
:meth:`Store.wait` or the returned handle's ``result()`` returns. At most one
save is in flight; a background failure is raised (as AsyncSaveError) by the
next save, ``wait`` or ``close``.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import secrets
import stat
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine.write import FileDigest, WritePipeline
from ..errors import CheckpointNotFoundError, CkstoreError, CommittedWithErrorsError, IntegrityError, InvalidArgumentError, ManifestError, StateError, StorageError, UnsafeStoreError
from ..format.chunks import DEFAULT_CHUNK_SIZE, chunk_size_for
from ..format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, MAX_MANIFEST_NODES, FileEntry, Manifest, count_nodes
from ..format.tags import TAGS_NAME, TagEntry, dump_tags
from ..engine.host_copy import HostCopy, preparer
from ..state.encode import Encoded, encode_state
from ..storage import durable as _durable
from ..storage.layout import CHECKPOINTS_DIR, STAGING_DIR, TRASH_DIR, step_dir_name
from .catalog import Catalog, CorruptStoreFileWarning
from .metrics_log import METRICS_NAME, Recorded, dump_metrics


def guarded(root: str, action: Callable[[], Any], *, what: str) -> Any:
    """Run ``action``; an untyped OSError becomes StorageError naming ``what`` and the store."""
    try:
        return action()
    except CkstoreError:
        raise  # already typed (UnsafeStoreError is also an OSError)
    except OSError as exc:
        raise StorageError(f"{root}: {what} failed: {exc.strerror or exc}", errno=exc.errno, path=getattr(exc, "filename", None)) from exc


def finish_files(batch: list[tuple[Future | None, _durable.FileWriter]]) -> None:
    """Step 3's fsync: fsync and close each file once its last write is done; every file is closed, the first error raised.

    Runs on the write pipeline's sync thread (``WritePipeline.write_files(finish=...)``), a batch at a time.
    """
    error: BaseException | None = None
    for last_write, tensor_file in batch:
        try:
            if last_write is not None:
                # The writes of one file run in order: the last done means all
                # done. Wait even after an error: a file is never closed under
                # a write still in flight.
                futures_wait([last_write])
                last_write.result()
            if error is None:
                # Step 3: the file's bytes are durable before a manifest names them.
                tensor_file.sync()
        except BaseException as exc:
            error = error or exc
        finally:
            tensor_file.close()
    if error is not None:
        raise error


def write_tensor_file(path: str, entries: Sequence[tuple[str, torch.Tensor]], *, algo: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> FileDigest:
    """Step 3 for one file outside a save (a rank's shard of a multi-rank save): write it, fsync it, close it."""
    own = WritePipeline(chunk=max(4 << 20, chunk_size), depth=2)
    try:
        return own.write_files([(os.fspath(path), entries)], algo=algo, finish=finish_files, chunk_size=chunk_size)[0]
    finally:
        own.close()


@dataclass
class SaveRequest:
    """What one save commits: the encoded state, its step, metrics and tags, and the files' incremental fingerprints."""

    encoded: Encoded
    step: int
    metrics: dict[str, float]
    tags: list[str] = field(default_factory=list)
    file_prints: Mapping[str, tuple] = field(default_factory=dict)
    copy_started: float = 0.0  # when the host copy began (a background save's copy_s)


def encode_request(state: Any, step: int, metrics: dict[str, float], tags: list[str], *, incremental: bool, host: HostCopy | None) -> SaveRequest:
    """Encode ``state`` for a save; with ``host`` (a background save) its tensors are copied there before this returns."""
    fingerprints: dict[int, tuple] = {}
    encoded = encode_state(state, prepare=preparer(fingerprints if incremental else None, host_copied=host is not None))
    file_prints = {}
    if incremental:
        file_prints = {name: tuple((key, fingerprints.get(id(tensor))) for key, tensor in entries) for name, entries in encoded.files.items()}
    copy_started = time.perf_counter()
    if host is not None:
        # Drop every reference to the caller's tensors here, not when
        # this frame ends: freeing a tensor releases the GIL, and
        # with the writer thread running, each free would wait for
        # it (10,000 frees took a second).
        encoded.rebind(host.copy(encoded.tensors(), encoded.specs, on_device=encoded.on_device))
    return SaveRequest(encoded, step, metrics, tags, file_prints, copy_started)


class Committer:
    """The write side of one store: its layout, recovery, the commit protocol above, and crash-safe deletion."""

    def __init__(self, root: str, catalog: Catalog, *, hash_algorithm: str, incremental: bool, direct_io: bool, stats: dict[str, Any]) -> None:
        self.root = root
        self.stats = stats  # the Store's: files and bytes written and linked by the last save
        self.catalog = catalog
        self.ckpt_dir = os.path.join(root, CHECKPOINTS_DIR)
        self.staging_dir = os.path.join(root, STAGING_DIR)
        self.trash_dir = os.path.join(root, TRASH_DIR)
        self.hash_algorithm = hash_algorithm
        self.incremental = incremental
        self.direct_io = direct_io
        self.pipeline: WritePipeline | None = None
        # Incremental saves: per file of the last checkpoint this store wrote,
        # the tensors' identity and version counters, its entry and directory.
        self.previous: dict[str, tuple[tuple, FileEntry, str]] = {}

    def writer(self) -> WritePipeline:
        if self.pipeline is None:
            self.pipeline = WritePipeline(direct=self.direct_io)
        return self.pipeline

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()
            self.pipeline = None

    # ------------------------------------------------------------ layout and recovery

    def create_layout(self) -> None:
        """Create the store's directories (first write only), each made durable in its parent."""
        try:
            if not os.path.isdir(self.root):
                _durable.make_dirs(os.path.dirname(self.root), site="store_parents")
                if _durable.make_dir(self.root, site="store_root", exist_ok=True):
                    _durable.sync_dir(os.path.dirname(self.root), site="store_parent_dir")
            created = False
            for sub in (self.ckpt_dir, self.staging_dir, self.trash_dir):
                created |= _durable.make_dir(sub, site="store_layout", exist_ok=True)
            if created:
                _durable.sync_dir(self.root, site="store_root_dir")
        except FileExistsError:
            raise InvalidArgumentError(f"{self.root}: exists and is not a store directory") from None
        except OSError as exc:
            raise StorageError(f"{self.root}: cannot create the store: {exc.strerror}", errno=exc.errno, path=self.root) from exc

    def recover(self, meta: Any) -> None:
        """Remove leftovers of interrupted saves and deletes (module docstring). Caller holds the writer lock."""
        # The removals below are not fsynced on purpose: if a power cut undoes one, the leftover
        # is still invisible to readers and the next recovery removes it again.
        try:
            for sub, site in ((self.staging_dir, "recover_staging"), (self.trash_dir, "recover_trash")):
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
            with meta.held():
                for name in os.listdir(self.root):
                    if _durable.is_temp_name(name) and not os.path.isdir(os.path.join(self.root, name)):
                        # Only files: write_file_atomic never makes a directory; one with such a name is not ours.
                        _durable.unlink(os.path.join(self.root, name), site="recover_temp")
                try:
                    tags = self.catalog.read_tags()
                except (ManifestError, IntegrityError) as exc:
                    # Never block opening the store, and never delete what fails to verify: tag operations
                    # and retention refuse to act on an unreadable tags.json; everything else works.
                    warnings.warn(f"{exc}; tags are unavailable until the file is repaired", CorruptStoreFileWarning, stacklevel=4)
                else:
                    live = {tag: entry for tag, entry in tags.items() if self.catalog.exists(entry.step)}
                    if live != tags:
                        self.write_tags(live)
        except CkstoreError:
            raise
        except OSError as exc:
            raise StorageError(f"{self.root}: recovery failed: {exc.strerror or exc}", errno=exc.errno, path=self.root) from exc

    def write_tags(self, tags: Mapping[str, TagEntry]) -> None:
        _durable.write_file_atomic(os.path.join(self.root, TAGS_NAME), dump_tags(tags), site="tags")

    def write_metrics(self, recorded: Mapping[int, Recorded]) -> None:
        _durable.write_file_atomic(os.path.join(self.root, METRICS_NAME), dump_metrics(recorded), site="metrics")

    # ------------------------------------------------------------ the commit

    def commit(self, request: SaveRequest, *, retention: dict[str, str] | None, check: Callable[[], None]) -> None:
        """Steps 2 (staging directory) to 7 of the protocol for ``request``.

        ``check`` is polled while files are written and once more right before
        the manifest: whatever it raises (a background save abandoned at exit)
        stops the save before the commit point, however far its writes got.
        """
        encoded, step = request.encoded, request.step
        final_name = step_dir_name(step)
        staging = os.path.join(self.staging_dir, f"{final_name}.{secrets.token_hex(4)}")
        committed = False
        file_prints = request.file_prints or {}
        try:
            _durable.make_dir(staging, site="staging")
            linked = self._link_unchanged(encoded, staging, file_prints)
            jobs = [(name, entries) for name, entries in encoded.files.items() if name not in linked]
            # The chunk size follows the whole save's bytes, so its chunk tables fit a manifest (format.chunks).
            chunk_size = chunk_size_for(sum(t.numel() * t.element_size() for entries in encoded.files.values() for _, t in entries))
            results = self.writer().write_files(
                [(os.path.join(staging, name), entries) for name, entries in jobs],
                algo=self.hash_algorithm,
                finish=finish_files,
                check=check,
                chunk_size=chunk_size,
            )
            written: dict[str, FileDigest] = dict(zip((name for name, _ in jobs), results))
            files: dict[str, FileEntry] = {}
            for name in encoded.files:  # manifest order follows the state, linked or written
                files[name] = linked[name] if name in linked else FileEntry(written[name].size, written[name].hash, written[name].chunks)
            self.stats.update(
                files_written=len(written),
                files_linked=len(linked),
                bytes_written=sum(w.size for w in written.values()),
                bytes_linked=sum(e.size for e in linked.values()),
            )
            check()  # an abandoned save never commits, however far its writes got
            renamed: list[bool] = []
            try:
                self.finalize(staging, step, files, encoded.skeleton, request.metrics, retention=retention, renamed=renamed)
            finally:
                committed = bool(renamed)
            if self.incremental:
                self.previous = {name: (file_prints.get(name, ()), entry, final_name) for name, entry in files.items()}
        except BaseException as exc:
            if not committed:
                with contextlib.suppress(OSError):
                    _durable.remove_tree(staging, site="abort")
            if isinstance(exc, OSError):
                state = "committed but its durability is unknown" if committed else "abandoned"
                raise StorageError(
                    f"{self.root}: saving step {step} failed ({exc.strerror or exc}); the save was {state}, "
                    "earlier checkpoints are intact",
                    errno=exc.errno,
                    path=getattr(exc, "filename", None),
                ) from exc
            raise

    def finalize(
        self,
        staging: str,
        step: int,
        files: dict[str, FileEntry],
        skeleton: Any,
        metrics: dict[str, float],
        *,
        retention: dict[str, str] | None,
        renamed: list[bool],
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
        _durable.rename(staging, os.path.join(self.ckpt_dir, final_name), site="commit")
        renamed.append(True)
        self.catalog.remember(final_name, manifest)
        _durable.sync_dir(self.ckpt_dir, site="checkpoints_dir")
        _durable.sync_dir(self.staging_dir, site="staging_parent_dir")
        return manifest

    def _link_unchanged(self, encoded: Encoded, staging: str, file_prints: Mapping[str, tuple]) -> dict[str, FileEntry]:
        """Hard-link each file identical to the previous checkpoint's; return the linked entries.

        The version counters only pick the candidates (a file whose tensors
        were not modified in place since the last save); what proves a file
        identical is its content hash, computed from memory and compared with
        the previous manifest's. A failed link (the previous checkpoint was
        deleted meanwhile, a filesystem without hard links) falls back to a write.
        """
        if not self.incremental or not self.previous:
            return {}
        candidates = []
        for name in encoded.files:
            prints = file_prints.get(name)
            if prints and name in self.previous and all(fp is not None for _, fp in prints) and self.previous[name][0] == prints:
                candidates.append(name)
        if not candidates:
            return {}
        linked: dict[str, FileEntry] = {}
        for name in candidates:
            _, entry, directory = self.previous[name]
            # Hashed with the chunk size the previous file was written with: the root binds it.
            chunk_size = entry.chunks.chunk_size if entry.chunks is not None else None
            digest = self.writer().digest_files([encoded.files[name]], algo=self.hash_algorithm, chunk_size=chunk_size)[0]
            if digest.size != entry.size or digest.hash != entry.hash:
                continue
            try:
                _durable.link(os.path.join(self.ckpt_dir, directory, name), os.path.join(staging, name), site="incremental")
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.EMLINK, errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                continue
            linked[name] = entry
        return linked

    def _commit_time(self) -> float:
        """Now, but always after every committed checkpoint: commit order is ``created`` order even if the clock steps back."""
        newest = max((info.created for info in self.catalog.listing(warn=False)), default=0.0)
        now = time.time()
        return now if now > newest else max(newest + 1e-6, math.nextafter(newest, math.inf))

    def after_commit(self, step: int, *, tag: Callable[[], None] | None, prune: Callable[[], Any]) -> None:
        """Steps 8 and 9: ``tag`` then ``prune``; a failure of either is CommittedWithErrorsError (the checkpoint is durable)."""
        what = "tagging it"
        try:
            if tag is not None:
                tag()
            what = "retention"
            prune()
        except (CkstoreError, OSError) as exc:
            raise CommittedWithErrorsError(
                f"{self.root}: step {step} is committed and durable, but {what} failed afterwards: {exc}; "
                f"do not save step {step} again",
                step=step,
                errno=getattr(exc, "errno", None),
                path=getattr(exc, "filename", None) or getattr(exc, "path", None),
            ) from exc

    # ------------------------------------------------------------ deletion

    def check_deletable(self, step: int) -> None:
        """Refuse to delete what is not a committed checkpoint directory (a link, a file, nothing)."""
        path = os.path.join(self.ckpt_dir, step_dir_name(step))
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{self.root}: no checkpoint at step {step}", step=step) from None
        if stat.S_ISLNK(mode):
            # Never delete through a link: renaming it into .trash/ and emptying that would empty its target.
            raise UnsafeStoreError(f"{path}: is a symlink, not a checkpoint; refusing to delete through it (remove the link by hand)", path=path)
        if not stat.S_ISDIR(mode):
            raise InvalidArgumentError(f"{path}: is not a checkpoint directory; refusing to delete it")

    def delete(self, step: int) -> None:
        """Delete committed ``step``: its commit point is one atomic rename out of ``checkpoints/`` into ``.trash/``."""
        name = step_dir_name(step)
        trash = os.path.join(self.trash_dir, f"{name}.{secrets.token_hex(4)}")
        _durable.rename(os.path.join(self.ckpt_dir, name), trash, site="delete")
        _durable.sync_dir(self.ckpt_dir, site="delete_checkpoints_dir")
        _durable.sync_dir(self.trash_dir, site="delete_trash_dir")
        _durable.remove_tree(trash, site="delete_tree")
