"""A ``torch.distributed.checkpoint`` storage pair that saves into, and loads from, a ckstore :class:`~ckstore.Store`.

>>> store = ckstore.Store("runs/exp1", keep_last=3)          # on every rank, same shared path
>>> group = ckstore.distributed.checkpoint_group(timeout=120)  # optional: bounds the wait for a dead rank
>>> dcp.save(state, storage_writer=StoreWriter(store, step=100), process_group=group)
>>> dcp.load(state, storage_reader=StoreReader(store, step=100), process_group=group)

What DCP users get over ``FileSystemWriter`` (see ``ckstore.distributed.coordinator``
for the protocol):

* each rank writes one safetensors file, ``rank-<r>.safetensors``, into the
  store's staging area and fsyncs it; each saved chunk's byte range is hashed
  as it is written, and the hash rides back in ``WriteResult.storage_data``;
* ``finish`` (the coordinator) writes one manifest, holding DCP's
  ``Metadata`` as JSON (never pickle, ``ckstore.distributed.metadata_json``),
  and commits it with the store's one commit protocol into
  ``checkpoints/step-<N>``, which is never overwritten: saving a committed
  step again is refused (``CheckpointExistsError``);
* the checkpoint is an ordinary one of the store: ``checkpoints()``,
  ``verify()``, tags, metrics and retention (applied by the coordinator) see it;
* ``StoreReader`` reads only the chunks the load plan asks for and verifies
  each chunk's hash before its bytes are used, so resharding (N to M ranks,
  N to 1 process) reads and verifies only what each rank needs;
* non-tensor values are stored as ckstore JSON, never DCP's pickle, and
  decoded on load without unpickling (``ckstore.distributed.values``).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Iterable, Mapping
from torch.futures import Future
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult

from ..checkpoint.commit import write_tensor_file
from ..checkpoint.loading import DCP_STATE_KEY
from ..engine.write import prepare_tensor
from ..format.safetensors import DTYPE_NAMES, DTYPES_BY_NAME, build_header, tensor_bytes
from ..errors import CheckpointNotFoundError, IntegrityError, InvalidArgumentError, ManifestError, StateError, StorageError
from ..format.chunks import DEFAULT_CHUNK_SIZE, check_chunk_size, chunk_size_for
from ..format.hashing import HashInfo, hash_bytes
from ..format.manifest import FileEntry, check_metrics
from ..format.tags import check_tag_name
from ..storage import safeio as _safeio
from ..storage.layout import CHECKPOINTS_DIR
from ..checkpoint.catalog import check_step as _check_step
from ..store import Store
from ..storage.layout import step_dir_name
from . import coordinator
from .metadata_json import VALUE_ENCODING, ChunkStorage, metadata_from_json, metadata_to_json
from .values import deliver_value, value_bytes

#: The manifest's ``state`` key holding the metadata JSON text (``Store.load`` refuses such a checkpoint by it).
METADATA_KEY = DCP_STATE_KEY


def _as_store(store: Any, *, readonly: bool) -> tuple[Store, bool]:
    if isinstance(store, Store):
        return store, False
    if isinstance(store, (str, os.PathLike)):
        return Store(store, readonly=readonly), True
    raise InvalidArgumentError(f"store must be a ckstore.Store or a path, got {type(store).__name__}")


class _OnStore:
    """What the writer and the reader share: the store they act on, and DCP's ``checkpoint_id`` naming it."""

    store: Store
    _owned: bool

    # DCP reads this for its logs.
    @property
    def checkpoint_id(self) -> str:
        return str(self.store.path)

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        """DCP passes ``checkpoint_id`` here; for ckstore it can only name the store itself."""
        if checkpoint_id is None:
            return
        if os.path.abspath(os.fspath(checkpoint_id)) != str(self.store.path):
            raise InvalidArgumentError(
                f"checkpoint_id {os.fspath(checkpoint_id)!r} is not this writer's store {str(self.store.path)!r}; "
                "the checkpoint is named by the store and the step, so pass checkpoint_id=None or the store's path"
            )

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        try:
            return os.path.isdir(os.path.join(os.fspath(checkpoint_id), CHECKPOINTS_DIR))
        except TypeError:
            return False

    def _close_owned(self) -> None:
        """Close the Store this object opened from a path (releasing its writer lock); a caller's Store stays open."""
        if self._owned:
            self.store.close()


def _item_bytes(item: Any) -> int:
    """The bytes a tensor write item will take (a non-tensor value's are small and not counted)."""
    data = getattr(item, "tensor_data", None)
    if data is None:
        return 0
    return math.prod(data.chunk.sizes) * torch.empty((), dtype=data.properties.dtype).element_size()


class StoreWriter(_OnStore, StorageWriter):
    """DCP ``StorageWriter`` committing one checkpoint ``step`` of ``store`` (a Store or a path; one writer per save).

    Create it on every rank with the same ``step``; the coordinator's
    ``store`` decides retention (its ``keep_*`` options), and records
    ``metrics`` and ``tags``. ``use_collectives=False`` is refused: without
    the gather there is no point at which every rank's files are known to be
    durable, so nothing could be committed.

    Given a path, the writer opens its own Store and closes it (releasing the
    writer lock) once the save commits or fails in a step it sees; a failure
    on another rank never reaches it, so the lock then lasts until the writer
    is garbage. Pass a Store you close, or use ``Store(process_group=...)``.
    """

    def __init__(self, store: Store | str | os.PathLike, *, step: int, metrics: Mapping[str, Any] | None = None, tags: Iterable[str] = ()) -> None:
        super().__init__()
        self.step = _check_step(step)
        self.metrics = check_metrics(metrics)
        if isinstance(tags, str):
            tags = (tags,)
        self.tags = sorted({check_tag_name(t) for t in tags})
        self.store, self._owned = _as_store(store, readonly=False)
        self.is_coordinator = False
        self.rank = 0
        self._staging: str | None = None
        #: After a coordinator's ``finish``: the committed checkpoint.
        self.committed = None

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self.store.path), save_id=f"step-{self.step}")

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, rank: int = 0, use_collectives: bool = True, **kwargs: Any) -> None:
        if not use_collectives:
            raise InvalidArgumentError("use_collectives=False: a ckstore checkpoint commits once every rank's files are durable, which needs the collectives")
        self.is_coordinator = bool(is_coordinator)
        self.rank = int(rank)
        self._staging = None

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        # Every rank states its step: a rank that disagrees fails the save before anything is written.
        return dataclasses.replace(plan, storage_data={"step": self.step})

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        steps = sorted({(p.storage_data or {}).get("step") for p in plans}, key=str)
        if steps != [self.step]:
            raise InvalidArgumentError(f"the ranks are saving different steps {steps}; every rank must pass the same step")
        try:
            self._staging = coordinator.open_staging(self.store, self.step)
        except BaseException:
            self._close_owned()  # refused (a committed step, a locked store): release what this writer opened
            raise
        # One chunk size for every rank's file, from the whole save's bytes, so the chunk tables fit the manifest.
        chunk_size = chunk_size_for(sum(_item_bytes(item) for p in plans for item in p.items))
        return [
            dataclasses.replace(p, storage_data={"staging": self._staging, "file": f"rank-{i:05d}.safetensors", "step": self.step, "chunk_size": chunk_size})
            for i, p in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        try:
            return self._write_data(plan, planner)
        except BaseException:
            # DCP calls finish only after every rank wrote: a failure here (or on another rank) never reaches it.
            # The coordinator releases the lock it took; a failure on another rank is only released when this
            # writer is garbage (pass a Store you close, or use Store(process_group=...), to release it at once).
            self._close_owned()
            raise

    def _write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        info = plan.storage_data
        if not isinstance(info, dict) or info.get("step") != self.step:
            raise InvalidArgumentError(f"this rank saves step {self.step}, the coordinator's plan says {info!r}")
        entries: list[tuple[str, torch.Tensor]] = []
        for i, item in enumerate(plan.items):
            if item.type == WriteItemType.BYTE_IO:
                # The value as ckstore JSON, never the planner's pickle (resolve_data would torch.save it).
                tensor = torch.frombuffer(bytearray(value_bytes(planner, item)), dtype=torch.uint8)
            else:
                tensor = prepare_tensor(planner.resolve_data(item), item.index.fqn)
            entries.append((str(i), tensor))
        future: Future[list[WriteResult]] = Future()
        if not entries:  # DCP's dedup may leave a rank nothing to write (replicated state)
            future.set_result([])
            return future
        algo = self.store.hash_algorithm
        name = info["file"]
        path = os.path.join(self.store._staging_dir, info["staging"], name)
        start = len(build_header(entries))
        results = []
        for item, (_, tensor) in zip(plan.items, entries):
            view = tensor_bytes(tensor)
            encoding = VALUE_ENCODING if item.type == WriteItemType.BYTE_IO else None
            storage = ChunkStorage(name, start, len(view), str(hash_bytes(view, algo)), DTYPE_NAMES[tensor.dtype], encoding)
            results.append(WriteResult(index=item.index, size_in_bytes=len(view), storage_data=storage))
            start += len(view)
        try:
            written = write_tensor_file(path, entries, algo=algo, chunk_size=check_chunk_size(info.get("chunk_size", DEFAULT_CHUNK_SIZE), path))
        except FileNotFoundError as exc:
            raise StorageError(
                f"{path}: the coordinator's staging directory is not here; the store's path must name one directory shared by every rank",
                errno=exc.errno,
                path=path,
            ) from exc
        # The whole file's size and hash travel with the first result, for the manifest's file list.
        results[0] = dataclasses.replace(results[0], storage_data=(results[0].storage_data, FileEntry(written.size, written.hash, written.chunks)))
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        if self._staging is None:
            raise InvalidArgumentError("finish() on a writer that did not plan this save (not the coordinator?)")
        files: dict[str, FileEntry] = {}
        storage: dict[MetadataIndex, ChunkStorage] = {}
        items = []
        try:
            for rank_results in results:
                for result in rank_results:
                    chunk = result.storage_data
                    if isinstance(chunk, tuple):
                        chunk, entry = chunk
                        files[chunk.file] = entry
                    storage[result.index] = chunk
                    # A tensor reference per chunk: the ordinary Store.load and verify read the shards too.
                    items.append({"fqn": result.index.fqn, "offsets": list(result.index.offset or ()), "tensor": {"$ck": "tensor", "file": chunk.file, "key": None}})
            # keys: the item's position in its file (the order write_data wrote them)
            positions: dict[str, int] = {}
            for item in items:
                file = item["tensor"]["file"]
                item["tensor"]["key"] = str(positions.get(file, 0))
                positions[file] = positions.get(file, 0) + 1
            metadata.storage_data = storage
            text = metadata_to_json(metadata)
        except BaseException:
            coordinator.abort(self.store, self._staging)
            self._close_owned()
            raise
        skeleton = {METADATA_KEY: text, "items": items}
        staging, self._staging = self._staging, None
        try:
            self.committed = coordinator.commit(self.store, staging, step=self.step, files=files, skeleton=skeleton, metrics=self.metrics, tags=self.tags)
        finally:
            self._close_owned()


class StoreReader(_OnStore, StorageReader):
    """DCP ``StorageReader`` for checkpoint ``step`` of ``store`` (a Store or a path; default: the latest committed).

    Every rank must read the same checkpoint: the coordinator refuses a load
    whose ranks resolved different steps (pass ``step=`` to pin it).
    """

    def __init__(self, store: Store | str | os.PathLike, *, step: int | str | None = None) -> None:
        super().__init__()
        self.store, self._owned = _as_store(store, readonly=True)
        if step is not None and not isinstance(step, str):
            step = _check_step(step)
        self.step = step
        self._dir: str | None = None
        self._files: dict[str, FileEntry] = {}
        self._storage: dict[MetadataIndex, ChunkStorage] = {}
        self._shapes: dict[MetadataIndex, tuple[int, ...]] = {}
        self._resolved: int | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self.step is None:
            info = self.store.latest()
            if info is None:
                raise CheckpointNotFoundError(f"{self.store.path}: no committed checkpoint to load")
        else:
            info = self.store.resolve(self.step)
        name = step_dir_name(info.step)
        manifest = self.store._manifest(name)
        text = manifest.state.get(METADATA_KEY) if isinstance(manifest.state, dict) else None
        if not isinstance(text, str):
            raise ManifestError(f"{self.store.path}: step {info.step} was not saved through torch.distributed.checkpoint (no {METADATA_KEY})", path=name)
        metadata = metadata_from_json(text, path=os.path.join(name, "manifest.json"), files={n: e.size for n, e in manifest.files.items()})
        self._dir = os.path.join(self.store._ckpt_dir, name)
        self._files = dict(manifest.files)
        self._storage = dict(metadata.storage_data)
        self._shapes = {
            MetadataIndex(fqn, chunk.offsets): tuple(chunk.sizes)
            for fqn, entry in metadata.state_dict_metadata.items()
            for chunk in getattr(entry, "chunks", ())
        }
        self._resolved = info.step
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if self._dir is None:
            self.read_metadata()

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return dataclasses.replace(plan, storage_data={"step": self._resolved})

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        steps = sorted({(p.storage_data or {}).get("step") for p in plans}, key=str)
        if len(steps) != 1:
            raise InvalidArgumentError(f"the ranks resolved different checkpoints (steps {steps}); pass step= so every rank loads the same one")
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_file: dict[str, list] = {}
        for req in plan.items:
            chunk = self._storage.get(req.storage_index)
            if chunk is None:
                raise IntegrityError(f"{self._dir}: the metadata lists no bytes for {req.storage_index.fqn}", path=self._dir, expected="chunk", actual="missing")
            by_file.setdefault(chunk.file, []).append((chunk, req))
        for file, reqs in by_file.items():
            path = os.path.join(self._dir, file)
            try:
                fd, st = _safeio.open_regular(path)
            except OSError as exc:
                raise IntegrityError(f"{path}: cannot open a file of the checkpoint ({exc})", path=path, expected="file", actual="missing") from None
            try:
                if st.st_size != self._files[file].size:
                    raise IntegrityError(f"{path}: {st.st_size} bytes, the manifest says {self._files[file].size}", path=path, expected=self._files[file].size, actual=st.st_size)
                for chunk, req in sorted(reqs, key=lambda pair: pair[0].offset):
                    self._read_one(fd, path, chunk, req, planner)
            finally:
                os.close(fd)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _read_one(self, fd: int, path: str, chunk: ChunkStorage, req: Any, planner: LoadPlanner) -> None:
        buffer = bytearray(chunk.length)
        _safeio.read_exact(fd, memoryview(buffer), chunk.offset, path)
        expected = HashInfo.parse(chunk.hash)
        actual = hash_bytes(buffer, expected.algo)
        if actual != expected:
            raise IntegrityError(
                f"{path}: bytes {chunk.offset}..{chunk.offset + chunk.length} ({req.storage_index.fqn}) do not match their hash",
                path=path,
                expected=str(expected),
                actual=str(actual),
            )
        if req.type == LoadItemType.BYTE_IO:
            if chunk.encoding is not None:  # ckstore JSON (ckstore.distributed.values): decoded here, nothing unpickled
                deliver_value(planner, req, buffer)
                return
            # A version 1 checkpoint: DCP's pickle, which its planner unpickles with weights_only=False;
            # refuse first what needs arbitrary globals.
            try:
                torch.load(io.BytesIO(buffer), weights_only=True)
            except Exception as exc:
                raise StateError(
                    f"{req.storage_index.fqn}: this value does not load with torch.load(weights_only=True) ({type(exc).__name__}); "
                    "ckstore does not unpickle arbitrary objects",
                    key=req.storage_index.fqn,
                ) from None
            planner.load_bytes(req, io.BytesIO(buffer))
            return
        dtype = DTYPES_BY_NAME.get(chunk.dtype)
        entry = self._shapes.get(req.storage_index)
        if dtype is None or entry is None or math.prod(entry) * dtype.itemsize != chunk.length:
            raise IntegrityError(f"{path}: chunk {req.storage_index.fqn} has a dtype or shape that does not fit its bytes", path=path, expected=chunk.length, actual=chunk.dtype)
        tensor = torch.frombuffer(buffer, dtype=dtype).reshape(entry) if chunk.length else torch.empty(entry, dtype=dtype)
        for dim, (start, length) in enumerate(zip(req.storage_offsets, req.lengths)):
            tensor = tensor.narrow(dim, start, length)
        target = planner.resolve_tensor(req).detach()
        if target.size() != tensor.size():
            raise StateError(f"{req.dest_index.fqn}: the load plan wants {tuple(target.size())}, the checkpoint chunk gives {tuple(tensor.size())}", key=req.dest_index.fqn)
        target.copy_(tensor)
        planner.commit_tensor(req, target)
