"""The coordinator's side of a multi-rank save: open the staging area, then commit what every rank wrote.

A multi-rank save is the single-process commit protocol (``ckstore.store``)
with step 3 spread over the ranks:

1. The coordinator (one rank) takes the store's writer lock, recovers
   leftovers, refuses a committed step (``Store._make_room``), and creates
   ``.staging/step-<N>.<random>/`` (:func:`open_staging`). Only the
   coordinator ever holds the lock, deletes, tags or applies retention.
2. Every rank writes its own files into that directory and fsyncs each one
   before it reports its results (``ckstore.distributed.dcp``). The store's
   path must name the same directory on every rank (a shared filesystem).
3. A collective carries every rank's file list, sizes and hashes to the
   coordinator. A rank that raised or died never reports, so the coordinator
   never reaches step 4 and the staging directory stays invisible to
   readers; the next write on the store removes it (recovery).
4. The coordinator checks each listed file's size, then runs steps 4-9 of
   the store's protocol (:func:`commit`, through ``Store._finalize`` and
   ``Store._after_commit``): manifest written and fsynced, staging directory
   fsynced, one rename into ``checkpoints/``, ``checkpoints/`` fsynced, then
   tags and retention.

How long survivors wait for a dead rank is the timeout of the process group
the collectives run on (:func:`checkpoint_group`). torch's default for gloo is
30 minutes; a dedicated group with a short timeout bounds it, and keeps the
save's collectives off the training group (a background save sharing the
training group can deadlock with training collectives).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import secrets
from collections.abc import Mapping
from typing import Any

from ..errors import IntegrityError, InvalidArgumentError, StorageError
from ..format.manifest import FileEntry
from ..storage import durable as _durable
from ..checkpoint.catalog import CheckpointInfo
from ..store import Store
from ..storage.layout import step_dir_name

#: Default seconds survivors wait for a silent rank in :func:`checkpoint_group` (documented in docs/distributed.md).
DEFAULT_TIMEOUT_S = 120.0


def checkpoint_group(timeout: float = DEFAULT_TIMEOUT_S, *, ranks: list[int] | None = None) -> Any:
    """A gloo process group for checkpoint collectives whose collectives fail after ``timeout`` seconds.

    Call it on every rank (it is a collective, like ``dist.new_group``) and
    pass it as ``process_group=`` to ``dcp.save``/``dcp.async_save``/``dcp.load``.
    If a rank dies mid-save, the survivors' pending collective raises within
    ``timeout`` seconds of when the dead rank should have reported (and gloo
    usually notices the closed connection sooner), instead of waiting for the
    training group's timeout. Gloo runs on CPU tensors, which is what DCP's
    planning collectives and ``async_save`` need.
    """
    import torch.distributed as dist

    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise InvalidArgumentError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not dist.is_initialized():
        raise InvalidArgumentError("checkpoint_group needs an initialised default process group (dist.init_process_group)")
    return dist.new_group(ranks=ranks, backend="gloo", timeout=datetime.timedelta(seconds=float(timeout)))


def open_staging(store: Store, step: int) -> str:
    """Step 1: lock and recover the store, refuse a committed ``step``, create its staging directory; return its name."""
    with store._mutex:
        store._acquire()
        store._make_room(step)
        name = f"{step_dir_name(step)}.{secrets.token_hex(4)}"
        try:
            _durable.make_dir(os.path.join(store._staging_dir, name), site="staging")
        except OSError as exc:
            raise StorageError(f"{store._root}: cannot create the staging directory for step {step}: {exc.strerror}", errno=exc.errno, path=store._root) from exc
        return name


def abort(store: Store, staging_name: str) -> None:
    """Remove a staging directory that will not be committed (best effort: recovery removes what is left)."""
    with contextlib.suppress(OSError):
        _durable.remove_tree(os.path.join(store._staging_dir, staging_name), site="abort")


def commit(
    store: Store,
    staging_name: str,
    *,
    step: int,
    files: Mapping[str, FileEntry],
    skeleton: Any,
    metrics: dict[str, float],
    tags: list[str],
) -> CheckpointInfo:
    """Step 4: check the ranks' files are there at the sizes they reported, then commit, tag and apply retention."""
    import time

    started = time.perf_counter()
    staging = os.path.join(store._staging_dir, staging_name)
    renamed: list[bool] = []
    with store._mutex:
        if store._lock is None or not store._lock.held:
            raise InvalidArgumentError(f"{store._root}: the coordinator does not hold the writer lock; the staging directory was not opened here")
        try:
            present = set(os.listdir(staging))
            for name, entry in files.items():
                path = os.path.join(staging, name)
                try:
                    size = os.lstat(path).st_size
                except FileNotFoundError:
                    # A rank reported a file the coordinator cannot see: the store path is not one shared directory.
                    raise IntegrityError(
                        f"{path}: a rank reported writing it, but the coordinator does not see it; "
                        "the store's path must name one directory shared by every rank",
                        path=path,
                        expected=entry.size,
                        actual="missing",
                    ) from None
                if size != entry.size:
                    raise IntegrityError(f"{path}: {size} bytes, the rank reported {entry.size}", path=path, expected=entry.size, actual=size)
            unlisted = sorted(present - set(files))
            if unlisted:
                raise IntegrityError(f"{staging}: files no rank reported: {unlisted[:5]}", path=staging, expected="only reported files", actual=unlisted[:5])
            store._finalize(staging, step, dict(files), skeleton, metrics, renamed=renamed)
        except BaseException as exc:
            if not renamed:
                abort(store, staging_name)
            if isinstance(exc, OSError) and not isinstance(exc, StorageError):
                state = "committed but its durability is unknown" if renamed else "abandoned"
                raise StorageError(
                    f"{store._root}: committing step {step} failed ({exc.strerror or exc}); the save was {state}, earlier checkpoints are intact",
                    errno=exc.errno,
                    path=getattr(exc, "filename", None),
                ) from exc
            raise
        return store._after_commit(step, tags, started)
