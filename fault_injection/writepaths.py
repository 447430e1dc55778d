"""More write paths for every tier: incremental links, a model-sized layout, background saves under
retention, tags racing with saves, a crash during recovery, and the continuation workloads (a run
that continues after a rollback, a fallback, a pull, a publish from the loop).

Each is a :class:`~fault_injection.workloads.Workload` registered in
:data:`fault_injection.workloads.WORKLOADS`; the retention oracle of
:mod:`fault_injection.invariants` judges what each may lose.

``incremental``
    ``Store(incremental=True)``: step 3 writes every file, step 4 links the
    frozen layers and writes the changed head, step 5 changes nothing but the
    step (every tensor file hard-linked: the save is links and a manifest).
``model_sized``
    77 groups, more than the 64 that trigger pooling (the small ones pooled
    into one file), groups over the small-group size that are split into
    shards over the file-size limit, and 3 fsync batches. The limits are lowered for the run
    (:func:`small_limits`) so that this costs kilobytes, not gigabytes.
``async_retention``
    Background saves under ``keep_last=1`` + ``keep_best=1`` while the best
    moves: each save's retention runs in the writer thread.
``tags_race``
    A background save carrying a tag is in flight while the main thread tags,
    untags and saves again under ``keep_last=1``.
``recover_crash``
    A store that needs every kind of recovery (a staging directory, a trash
    entry, a temp tags file, a tag naming a vanished step): recovery's own
    removals and its tags rewrite are the kill points and crash states.
``first_save_nested``
    The first save into a store whose parent directories do not exist yet.
``rollback_continue``, ``corrupt_continue``, ``pull_local``, ``publish_loop``
    The continuation workloads (see :data:`CONTINUATION`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from typing import Any

import torch

import ckstore

from .workloads import Ack, Workload, _prepare_steps, _save, expected_state, intent, same_state

# ---------------------------------------------------------------- incremental saves


def _frozen() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(77)
    return {f"block{i}": {"w": torch.randn(48, generator=gen), "b": torch.randn(8, generator=gen)} for i in range(3)}


#: The head's value at each step: step 5 changes nothing (every file is linked).
_HEAD = {1: 1, 2: 2, 3: 3, 4: 4, 5: 4}


def incremental_state(step: int, scale: int = 8) -> dict[str, Any]:
    return {"frozen": _frozen(), "head": {"w": torch.full((scale,), float(_HEAD.get(step, step)))}, "step": step}


def _prepare_incremental(root: str, scale: int) -> None:
    with ckstore.Store(root) as store:
        for step in (1, 2):
            store.save(incremental_state(step, scale), step=step)


def _run_incremental(root: str, ack: Ack, scale: int) -> None:
    state = incremental_state(3, scale)
    with ckstore.Store(root, incremental=True, keep_last=2) as store:
        for step in (3, 4, 5):
            state["step"] = step
            if step == 4:
                state["head"]["w"].fill_(4.0)  # in place: the head's version counter moves, the frozen ones do not
            intent(ack, step)
            store.save(state, step=step)
            ack("save", step)


# ---------------------------------------------------------------- a model-sized layout, scaled down


@contextlib.contextmanager
def small_limits(*, file_bytes: int = 1024, small_group: int = 512, fsync_batch: int = 4) -> Iterator[None]:
    """Lower the library's layout limits for a run, so a few KB exercise what takes GBs at the defaults:
    shards over the file-size limit, pooled small groups, several fsync batches."""
    from ckstore.state import encode as _state
    from ckstore.engine import write as _write

    saved = (_state.MAX_FILE_BYTES, _state.SMALL_GROUP_BYTES, _write._FSYNC_BATCH, _state._last_layout)
    _state.MAX_FILE_BYTES, _state.SMALL_GROUP_BYTES, _write._FSYNC_BATCH = file_bytes, small_group, fsync_batch
    _state._last_layout = None  # a layout cached under the default limits would not split
    try:
        yield
    finally:
        _state.MAX_FILE_BYTES, _state.SMALL_GROUP_BYTES, _write._FSYNC_BATCH, _ = saved
        _state._last_layout = None


def model_state(step: int, scale: int = 8) -> dict[str, Any]:
    """72 tiny layers (pooled into one file) + 5 embedding groups of 1.2 KB (each split into 2 shards):
    77 groups, 11 files, 3 fsync batches under :func:`small_limits`."""
    gen = torch.Generator().manual_seed(9000 + step)
    return {
        "model": {f"layer{i}": {"w": torch.randn(4, generator=gen)} for i in range(72)},
        "emb": {f"table{i}": {"a": torch.randn(150, generator=gen), "b": torch.randn(150, generator=gen)} for i in range(5)},
        "step": step,
    }


def _prepare_model(root: str, scale: int) -> None:
    with small_limits(), ckstore.Store(root) as store:
        store.save(model_state(1, scale), step=1)


def _run_model(root: str, ack: Ack, scale: int) -> None:
    with small_limits(), ckstore.Store(root, keep_last=1) as store:
        intent(ack, 2)
        store.save(model_state(2, scale), step=2)
        ack("save", 2)


# ---------------------------------------------------------------- background saves under retention

_LOSSES = {1: 0.9, 2: 0.5, 3: 0.7, 4: 0.2, 5: 0.6, 6: 0.1}


def _prepare_ranked_two(root: str, scale: int) -> None:
    with ckstore.Store(root) as store:
        for step in (1, 2):
            store.save(expected_state(step, scale), step=step, metrics={"loss": _LOSSES[step]})


def _run_async_retention(root: str, ack: Ack, scale: int) -> None:
    with ckstore.Store(root, keep_last=1, keep_best=1, metric="loss") as store:
        previous = None
        for step in (3, 4, 5, 6):
            intent(ack, step, {"loss": _LOSSES[step]})
            handle = store.save(expected_state(step, scale), step=step, metrics={"loss": _LOSSES[step]}, blocking=False)
            if previous is not None:
                ack("save", previous)  # this call waited for the previous background save to be durable
            previous = step
            handle.result()
        ack("save", previous)


# ---------------------------------------------------------------- tags racing with saves


def _run_tags_race(root: str, ack: Ack, scale: int) -> None:
    with ckstore.Store(root, keep_last=1) as store:
        intent(ack, 3, tags=["head"])
        handle = store.save(expected_state(3, scale), step=3, tags=["head"], blocking=False)
        # While step 3 commits in the background: the tag wins the race (and pins 2 against retention)
        # or loses it (retention already removed 2, and tag() says so). Both are fine; anything else is not.
        ack("tagging", ("keep", 2))
        try:
            store.tag(2, "keep")
        except ckstore.CheckpointNotFoundError:
            ack("tag_missed", 2)
            tagged = False
        else:
            ack("tag", ("keep", 2))
            tagged = True
        handle.result()
        ack("save", 3)
        _save(store, 4, scale, ack, tags=["head"])  # moves "head": 3 is no longer pinned, 2 still is
        if tagged:
            ack("begin", "untag keep")
            store.untag("keep")
            ack("untag", "keep")
        _save(store, 5, scale, ack)  # now 2 may go


# ---------------------------------------------------------------- a crash during recovery


def _prepare_recover(root: str, scale: int) -> None:
    from .workloads import _prepare_leftovers

    _prepare_leftovers(root, scale)
    with ckstore.Store(root) as store:  # a tag naming a step whose directory then vanished: recovery rewrites tags.json
        store.save(expected_state(7, scale), step=7)
        store.tag(7, "gone")
        store.tag(1, "first")
    shutil.rmtree(os.path.join(root, "checkpoints", "step-00000007"))
    os.makedirs(os.path.join(root, ".staging", "step-00000009.0badcafe", "sub"))


def _run_recover(root: str, ack: Ack, scale: int) -> None:
    with ckstore.Store(root) as store:  # recovery: its removals and the tags rewrite are in the window
        _save(store, 2, scale, ack)


def _check_recover(store: ckstore.Store, acks: list[tuple[str, Any]]) -> list[str]:
    tags = {t: i.step for i in store.checkpoints() for t in i.tags}
    out = []
    if tags.get("first") != 1:
        out.append(f"tag 'first' lost by recovery (now {tags.get('first')})")
    if "gone" in tags:
        out.append("tag 'gone' names a vanished step after recovery")
    return out


# ---------------------------------------------------------------- first save under missing parents


def _run_nested(root: str, ack: Ack, scale: int) -> None:
    with ckstore.Store(os.path.join(root, "runs", "exp1"), keep_last=2) as store:
        store.save(expected_state(1, scale), step=1)
        ack("nested_save", 1)  # a save of the inner store: not one the outer store's oracle counts


def _check_nested(store: ckstore.Store, acks: list[tuple[str, Any]]) -> list[str]:
    nested = os.path.join(str(store.path), "runs", "exp1")
    if ("nested_save", 1) not in acks:
        return []
    try:
        with ckstore.Store(nested, readonly=True) as inner:
            if 1 not in {i.step for i in inner.checkpoints()}:
                return ["acknowledged first save into a new nested store lost (its parent directories were not durable)"]
    except ckstore.CkstoreError as exc:
        return [f"acknowledged first save into a new nested store lost: {type(exc).__name__}: {str(exc)[:120]}"]
    return []


def _prepare_empty_store(root: str, scale: int) -> None:
    ckstore.Store(root).close()


# ---------------------------------------------------------------- continuation: roll back to a tag, keep saving


def _prepare_rollback(root: str, scale: int) -> None:
    with ckstore.Store(root) as store:
        store.save(expected_state(100, scale), step=100, tags=["release"])
        store.save(expected_state(300, scale), step=300)


def _run_rollback(root: str, ack: Ack, scale: int) -> None:
    with ckstore.Store(root, keep_last=1) as store:
        loaded = store.load(step="release")
        if loaded["step"] != 100:
            raise AssertionError(f"load(step='release') returned step {loaded['step']}")
        for step in (101, 102):
            _save(store, step, scale, ack)


# ---------------------------------------------------------------- continuation: resume past a corrupt newest


def _prepare_corrupt(root: str, scale: int) -> None:
    with ckstore.Store(root) as store:
        store.save(expected_state(10, scale), step=10)
        info = store.save(expected_state(20, scale), step=20)
    name = sorted(n for n in info.files if n.endswith(".safetensors"))[0]
    with open(os.path.join(info.path, name), "r+b") as fh:  # bit rot in the newest checkpoint's data
        fh.seek(-3, os.SEEK_END)
        byte = fh.read(1)
        fh.seek(-3, os.SEEK_END)
        fh.write(bytes([byte[0] ^ 0x40]))


def _run_corrupt(root: str, ack: Ack, scale: int) -> None:
    with ckstore.Store(root, keep_last=2) as store:
        loaded = store.load()  # falls back past the corrupt 20
        if loaded["step"] != 10:
            raise AssertionError(f"load() fell back to step {loaded['step']}, expected 10")
        for step in (20, 30):  # the run reaches the corrupt step again and saves through it
            _save(store, step, scale, ack)


# ---------------------------------------------------------------- continuation: pull into a store with local work


def _prepare_pull_local(root: str, scale: int) -> None:
    from ckstore.integrations.dvc import publish as _dvc

    from .dvcmodel import SCALE, _prepare_pull

    _prepare_pull(root, SCALE)
    clone = os.path.join(os.path.dirname(root), "clone")
    alias = os.path.join(clone, "models", "best")
    _dvc.pull(alias + ".dvc", repo=clone)
    with ckstore.Store(alias) as pulled:  # fine-tuning from the published model, saved in place
        pulled.save(expected_state(5, SCALE), step=5)


def _run_pull_local(root: str, ack: Ack, scale: int) -> None:
    from ckstore.integrations.dvc import publish as _dvc

    clone = os.path.join(os.path.dirname(root), "clone")
    try:
        _dvc.pull(os.path.join(clone, "models", "best.dvc"), repo=clone)
    except ckstore.CkstoreError as exc:
        ack("refused", type(exc).__name__)  # refusing to overwrite local work is allowed; deleting it is not
    else:
        ack("pulled", 2)


def _check_pull_local(store: ckstore.Store, acks: list[tuple[str, Any]]) -> list[str]:
    from .dvcmodel import SCALE

    alias = os.path.join(os.path.dirname(str(store.path)), "clone", "models", "best")
    try:
        with ckstore.Store(alias, readonly=True) as pulled:
            steps = {i.step for i in pulled.checkpoints()} - {p.step for p in pulled.verify()}
            if 5 not in steps:
                return [f"pull deleted the local checkpoint 5 of the pulled store (it holds {sorted(steps)})"]
            if not same_state(pulled.load(step=5), expected_state(5, SCALE)):
                return ["the local checkpoint 5 of the pulled store no longer loads to what was saved"]
    except ckstore.CkstoreError as exc:
        return [f"the pulled store does not open after the pull: {type(exc).__name__}: {str(exc)[:160]}"]
    return []


# ---------------------------------------------------------------- continuation: publish from the loop


def _prepare_publish_loop(root: str, scale: int) -> None:
    from .publish import init_dvc_repo, store_with_two_steps

    _, repo = store_with_two_steps(root, scale)
    init_dvc_repo(repo)


def _run_publish_loop(root: str, ack: Ack, scale: int) -> None:
    repo = os.path.join(os.path.dirname(root), "repo")
    with ckstore.Store(root, keep_last=1, keep_best=1, metric="loss") as store:
        for step, loss in ((3, 0.5), (4, 0.4), (5, 0.6), (6, 0.3)):
            _save(store, step, scale, ack, metrics={"loss": loss})
            store.publish("best", name="best", repo=repo)  # the README's loop: publish the best as it moves
            ack("publish", step)
    ack("closed", 6)  # close() waited for every queued publish without an error


CONTINUATION = ("rollback_continue", "corrupt_continue", "pull_local", "publish_loop", "first_save_nested")

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("incremental", _run_incremental, _prepare_incremental, {"keep_last": 2, "incremental": True}, content=incremental_state, scale=8),
        Workload("model_sized", _run_model, _prepare_model, {"keep_last": 1}, content=model_state, scale=8),
        Workload("async_retention", _run_async_retention, _prepare_ranked_two, {"keep_last": 1, "keep_best": 1, "metric": "loss"}, scale=16),
        Workload("tags_race", _run_tags_race, _prepare_steps(1, 2), {"keep_last": 1}, scale=16),
        Workload("recover_crash", _run_recover, _prepare_recover, check=_check_recover, scale=16),
        Workload("first_save_nested", _run_nested, _prepare_empty_store, check=_check_nested, scale=16),
        Workload("rollback_continue", _run_rollback, _prepare_rollback, {"keep_last": 1}, scale=16),
        Workload("corrupt_continue", _run_corrupt, _prepare_corrupt, {"keep_last": 2}, scale=16),
        Workload("pull_local", _run_pull_local, _prepare_pull_local, check=_check_pull_local, content=None, scale=8),
        Workload("publish_loop", _run_publish_loop, _prepare_publish_loop, {"keep_last": 1, "keep_best": 1, "metric": "loss"}, scale=8),
    )
}
