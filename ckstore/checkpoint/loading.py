"""Loading checkpoints: the one fallback loop, reading a checkpoint's files into place, single-tensor reads.

:meth:`Loader.load_first` is the fallback loop shared by :meth:`Store.load`
(``step=None`` and ``"best"``) and :func:`ckstore.resume`. Every CkstoreError
of one checkpoint (a hash or size mismatch, a read error such as EIO, a
malformed manifest or state skeleton, an odd file where a manifest belongs)
skips it with a CorruptCheckpointWarning and tries the next; it is left on
disk untouched. A StateError is raised at once: the caller's objects do not
fit the checkpoint, and every older one would disagree alike. A checkpoint
deleted meanwhile (by a writer's retention) is skipped silently.
"""

from __future__ import annotations

import contextlib
import gc as garbage_collector  # Python's collector; not Store.gc (retention) nor the DVC collect_garbage
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ..engine.read import read_one_tensor, read_tensor_file
from ..errors import CheckpointNotFoundError, CkstoreError, IntegrityError, InvalidArgumentError, StateError
from ..format.manifest import Manifest
from ..state.decode import decode_state
from ..format.skeleton import tensor_refs
from ..state.targets import plan_load
from .catalog import Catalog, CheckpointInfo, CorruptCheckpointWarning

#: The manifest ``state`` key of a checkpoint saved through DCP (``ckstore.distributed.dcp``): its DCP metadata as JSON.
DCP_STATE_KEY = "dcp_metadata"


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No garbage collection while a save or load walks a large state.

    Both allocate a few objects per tensor (the skeleton, header entries,
    views), all alive until the call ends: a collection meanwhile only
    traverses them (a full one, the whole heap) and frees nothing. On 10,000
    tensors it took a third of a background save's stall and a third of a load.
    """
    collecting = garbage_collector.isenabled()
    garbage_collector.disable()
    try:
        yield
    finally:
        if collecting:
            garbage_collector.enable()


class Loader:
    """Reads the checkpoints of one store's :class:`Catalog` into a caller's state."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._hash_pools: list[ThreadPoolExecutor] = []
        self._key_index: tuple[str, Manifest, dict[str, str]] | None = None  # read_tensor: key -> file, of the last manifest read

    def close(self) -> None:
        for pool in self._hash_pools:
            pool.shutdown(wait=True)
        self._hash_pools = []

    def after_fork_in_child(self) -> None:
        self._hash_pools = []  # their threads stay in the parent; dropped, not closed (closing would wait for them)

    def _pool(self, index: int = 0) -> ThreadPoolExecutor:
        """One of two single-thread hash executors. A file's batches go to one executor,
        so they are hashed in order; successive files alternate, so two files can be
        hashed at once while a third is read."""
        while len(self._hash_pools) < 2:
            self._hash_pools.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckstore-hash"))
        return self._hash_pools[index % 2]

    def load_first(
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
        """Load the first of ``candidates`` that loads (the fallback loop, module docstring); None if there are none.

        If there were candidates but none loads, CheckpointNotFoundError names each step and its error.
        """
        failed: list[str] = []
        first: CkstoreError | None = None
        for info in candidates:
            try:
                return info, self.load_one(info, state, map_location, verify, strict, classes=classes)
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
        raise CheckpointNotFoundError(f"{self.catalog.root}: no checkpoint verifies ({'; '.join(failed)})") from first

    def load_one(
        self, info: CheckpointInfo, state: Any, map_location: Any, verify: bool, strict: bool = True, classes: Mapping[str, type] | None = None
    ) -> Any:
        with gc_paused():
            try:
                loaded = self._read_and_restore(info, state, map_location, verify, strict, classes)
                if verify:  # every file was hashed: retention need not read it again (``ckstore.checkpoint.pruning``)
                    self.catalog.mark_sound(info.step, info.created)
                return loaded
            except (CheckpointNotFoundError, StateError):
                raise  # gone, or the caller's objects do not fit: says nothing about the checkpoint
            except CkstoreError:
                self.catalog.corrupt[info.step] = info.created  # failed to load: retention gives it no slot and never deletes it
                raise

    def _read_and_restore(
        self, info: CheckpointInfo, state: Any, map_location: Any, verify: bool, strict: bool, classes: Mapping[str, type] | None
    ) -> Any:
        """Read every file of ``info`` (into ``state``'s own tensors where they fit) and decode the state."""
        directory = str(info.path)
        manifest = self.catalog.manifest(info.path.name)
        if state is not None and isinstance(manifest.state, dict) and DCP_STATE_KEY in manifest.state:
            # Its state is DCP's shards and metadata, which no template of the caller's matches: say how to load it.
            # (With no template, load() returns that raw view, verified: the chunks and the metadata text.)
            raise StateError(
                f"step {info.step} was saved through torch.distributed.checkpoint (by ranks of a process group); load it with "
                f"Store(path, process_group=pg).load(state) on every rank, or in one process with "
                f"dcp.load(state, storage_reader=ckstore.distributed.StoreReader(path, step={info.step}))",
                key="state",
            )
        if verify:
            self.catalog.refuse_unlisted(directory, manifest, info.step)
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
                        expected=entry.expected if verify else None,
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

    def tensor_keys(self, info: CheckpointInfo) -> list[str]:
        return sorted(key for _, key in tensor_refs(self.catalog.manifest(info.path.name).state))

    def read_tensor(self, info: CheckpointInfo, key: str, *, verify: bool) -> torch.Tensor:
        """One tensor of ``info`` without reading the rest; see :meth:`Store.read_tensor`."""
        manifest = self.catalog.manifest(info.path.name)
        cached = self._key_index
        if cached is None or cached[0] != info.path.name or cached[1] is not manifest:
            # One checkpoint's index only: an index per checkpoint read would keep every manifest alive past the cache's bound.
            cached = self._key_index = (info.path.name, manifest, {name: file for file, name in tensor_refs(manifest.state)})
        file = cached[2].get(key)
        if file is None:
            raise InvalidArgumentError(f"step {info.step} has no tensor {key!r}; see Store.tensor_keys()")
        entry = manifest.files[file]
        return read_one_tensor(os.path.join(str(info.path), file), key, size=entry.size, expected=entry.expected if verify else None)
