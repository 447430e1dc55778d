"""The write paths the harness crashes, as pluggable workloads.

A :class:`Workload` has two halves:

* ``prepare(root)`` builds the store as it stands before the crash window
  (earlier checkpoints, tags). It runs once, unhooked, and its result is copied
  for every cycle.
* ``run(root, ack)`` is the crash window: the operations the tiers kill,
  record, fail or power-cut. It calls ``ack(kind, value)`` after each call that
  returned (a save, a tag): an *acknowledged* operation, which must survive any
  crash that happens after it.

What a workload promises is stated as data, so one invariant checker
(:mod:`fault_injection.invariants`) serves every tier: the store options (the
retention policy the oracle applies), the acknowledgements it sends (an
``intent`` mark with each save's step, metrics and tags before the call, then
``save``/``tag``/``untag``/``deleting``/``delete`` once a call returned), the
content of every step (a pure function of the step number), and an optional
extra check. No step is exempt from the loss check: a step may vanish only
where the retention rule allows it. A later write path (DVC publish,
async saves) is one more entry in :data:`WORKLOADS`.
"""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import ckstore

Ack = Callable[[str, Any], None]


def expected_state(step: int, scale: int = 64) -> dict[str, Any]:
    """The state saved at ``step``: a pure function of the step, so any checkpoint's content can be checked."""
    gen = torch.Generator().manual_seed(1000 + step)
    return {
        "model": {
            "enc.weight": torch.randn(scale, 4, generator=gen),
            "enc.bias": torch.randn(scale, generator=gen),
            "dec.weight": torch.randn(4, scale, generator=gen),
        },
        "optimizer": {"state": {"momentum": torch.randn(scale, generator=gen)}, "lr": 0.1 / (1 + step)},
        "step": step,
        "note": f"checkpoint {step}",
    }


def same_state(a: Any, b: Any) -> bool:
    """Exact equality of nested states (tensors compared bit for bit, dtype and shape included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(torch.equal(a.view(torch.uint8) if a.numel() else a, b.view(torch.uint8) if b.numel() else b))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@dataclass
class Workload:
    name: str
    run: Callable[[str, Ack, int], None]
    prepare: Callable[[str, int], None] | None = None
    #: Store options used when the checker (recovery) opens the store.
    store_kwargs: dict[str, Any] = field(default_factory=dict)
    #: Extra invariant: (open store, acknowledged events) -> violation messages.
    check: Callable[[ckstore.Store, list[tuple[str, Any]]], list[str]] | None = None
    #: Tensor scale (elements per tensor row) of the saved states.
    scale: int = 64
    #: Content of the state saved at a step (None: the step's content is not checked here).
    content: Callable[[int, int], Any] | None = expected_state
    #: End the check with the writable open + save of ``writable-save-keeps-committed`` (off where the
    #: workload's own check already continues the run with saves the oracle did not record).
    probe: bool = True


def intent(ack: Ack, step: int, metrics: dict[str, float] | None = None, tags: Any = ()) -> None:
    """Mark a save about to start: its step, metrics and tags feed the retention oracle."""
    ack("intent", [step, dict(metrics or {}), sorted(tags)])


def _save(store: ckstore.Store, step: int, scale: int, ack: Ack, **kwargs: Any) -> None:
    intent(ack, step, kwargs.get("metrics"), kwargs.get("tags", ()))
    store.save(expected_state(step, scale), step=step, **kwargs)
    ack("save", step)


def _prepare_steps(*steps: int, tags: dict[str, int] | None = None) -> Callable[[str, int], None]:
    def prepare(root: str, scale: int) -> None:
        with ckstore.Store(root) as store:
            for step in steps:
                store.save(expected_state(step, scale), step=step)
            for name, step in (tags or {}).items():
                store.tag(step, name)

    return prepare


# ---------------------------------------------------------------- first save


def _run_first(root: str, ack: Ack, scale: int) -> None:
    with ckstore.Store(root, keep_last=2) as store:  # creates the store: root, layout, lock owner
        _save(store, 1, scale, ack)


# ---------------------------------------------------------------- next save


def _run_next(root: str, ack: Ack, scale: int) -> None:
    with ckstore.Store(root) as store:
        _save(store, 3, scale, ack)
        _save(store, 4, scale, ack)


# ---------------------------------------------------------------- retention


def _run_retention(root: str, ack: Ack, scale: int) -> None:
    with ckstore.Store(root, keep_last=2) as store:
        _save(store, 4, scale, ack)  # deletes 1 and 2 after 4 is durable
        ack("deleting", 3)
        store.delete(3)
        ack("delete", 3)


# ---------------------------------------------------------------- a save of many tensor files


def many_files_state(step: int, scale: int = 64) -> dict[str, Any]:
    """A state whose tensors fall into 16 groups, hence 16 tensor files (one per layer)."""
    gen = torch.Generator().manual_seed(5000 + step)
    return {"model": {f"layer{i}.weight": torch.randn(scale, generator=gen) for i in range(16)}, "step": step}


def _run_many(root: str, ack: Ack, scale: int) -> None:
    with ckstore.Store(root, keep_last=1) as store:
        intent(ack, 3)
        store.save(many_files_state(3, scale), step=3)
        ack("save", 3)


def _prepare_many(root: str, scale: int) -> None:
    with ckstore.Store(root) as store:
        store.save(many_files_state(2, scale), step=2)


# ---------------------------------------------------------------- explicit delete and gc


def _prepare_ranked(root: str, scale: int) -> None:
    with ckstore.Store(root) as store:
        for step, loss in ((1, 0.9), (2, 0.3), (3, 0.5), (4, 0.2), (5, 0.8)):
            store.save(expected_state(step, scale), step=step, metrics={"loss": loss})
        store.tag(3, "keep")


def _run_gc(root: str, ack: Any, scale: int) -> None:
    with ckstore.Store(root, keep_best=1, metric="loss") as store:
        store.gc()  # keeps 4 (best), 5 (newest), 3 (tagged); deletes 1 and 2
        ack("delete", 1)
        ack("delete", 2)
        ack("deleting", 3)
        store.delete(3, force=True)  # tagged: its tag goes first, then the directory
        ack("delete", 3)


# ---------------------------------------------------------------- tag update


def _run_tags(root: str, ack: Ack, scale: int) -> None:
    with ckstore.Store(root) as store:
        ack("tagging", ("top", 2))
        store.tag(2, "top")
        ack("tag", ("top", 2))
        _save(store, 3, scale, ack, tags=["release"])
        ack("tag", ("release", 3))
        ack("begin", "untag old")
        store.untag("old")
        ack("untag", "old")


def _check_tags(store: ckstore.Store, acks: list[tuple[str, Any]]) -> list[str]:
    tags = {info.step: info.tags for info in store.checkpoints()}
    where = {t: s for s, names in tags.items() for t in names}
    done = [a for a in acks if a[0] in ("tag", "untag")]
    out = []
    # Before its ack a tag update may or may not have happened; after it, it must have.
    best_moved = any(a == ("tag", ("top", 2)) for a in done)
    if where.get("top") not in ((2,) if best_moved else (1, 2)):
        out.append(f"tag 'top' points at {where.get('top')}, expected {'2' if best_moved else '1 or 2'}")
    if any(a == ("tag", ("release", 3)) for a in done) and where.get("release") != 3:
        out.append(f"acknowledged tag 'release' -> 3 lost (now {where.get('release')})")
    if "release" in where and where["release"] != 3:
        out.append(f"tag 'release' points at {where['release']}")
    untagged = ("untag", "old") in done
    if untagged and "old" in where:
        out.append("acknowledged untag of 'old' lost")
    if ("begin", "untag old") not in acks and where.get("old") != 1:
        out.append(f"tag 'old' lost before its untag began (now {where.get('old')})")
    return out


# ---------------------------------------------------------------- recovery of leftovers


def _prepare_leftovers(root: str, scale: int) -> None:
    """A store with step 1 and what interrupted operations leave: a staging dir, a trash entry, a temp tags file."""
    _prepare_steps(1)(root, scale)
    for sub, name in ((".staging", "step-00000002.0badf00d"), (".trash", "step-00000000.deadbeef")):
        os.makedirs(os.path.join(root, sub, name))
        with open(os.path.join(root, sub, name, "model.enc.safetensors"), "wb") as fh:
            fh.write(b"\0" * 100)
    with open(os.path.join(root, ".tags.json.tmp-0123456789ab"), "wb") as fh:
        fh.write(b'{"format": "ckst')


def _run_leftovers(root: str, ack: Ack, scale: int) -> None:
    with ckstore.Store(root) as store:  # recovery runs here, under the writer lock
        _save(store, 2, scale, ack)


# ---------------------------------------------------------------- async saves


def _run_async(root: str, ack: Ack, scale: int) -> None:
    """Background saves: a crash while the writer thread commits must leave each checkpoint absent or whole.

    The caller overwrites its tensors as soon as ``save`` returns: the
    checkpoint must still hold the values of the moment of the call.
    """
    with ckstore.Store(root, keep_last=2) as store:
        state = expected_state(3, scale)
        intent(ack, 3)
        store.save(state, step=3, blocking=False)
        state["model"]["enc.weight"].zero_()  # allowed at once: the state was copied before save returned
        intent(ack, 4)
        handle = store.save(expected_state(4, scale), step=4, blocking=False)
        ack("save", 3)  # the second save waited for the first one to be durable
        handle.result()
        ack("save", 4)
        intent(ack, 5, tags=["async"])
        store.save(expected_state(5, scale), step=5, blocking=False, tags=["async"])
        store.wait()
        ack("save", 5)


# ---------------------------------------------------------------- second writer


def _run_second_writer(root: str, ack: Ack, scale: int, *, holder_in_process: bool = False) -> None:
    """A save that finds another writer holding the lock, then saves after it lets go.

    The holder is a real second process (it writes step 2 and keeps the lock
    until told to go); the model tier asks for an in-process holder instead
    (a second Store, whose flock on its own descriptor conflicts just the
    same) so that the holder's writes are recorded too.
    """
    if holder_in_process:
        holder = ckstore.Store(root)
        _save(holder, 2, scale, ack)
        _second_writer_body(root, ack, scale, holder.close)
        return
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder: a separate process with no kill hook of its own
        code = 1
        try:
            from ckstore.storage import durable as _durable

            _durable.set_hook(None)
            os.close(go_w)
            os.close(ready_r)
            with ckstore.Store(root) as store:
                _save(store, 2, scale, lambda kind, value: None)
                os.write(ready_w, b"1")
                os.read(go_r, 1)
            code = 0
        finally:
            os._exit(code)
    os.close(go_r)
    os.close(ready_w)
    try:
        if os.read(ready_r, 1) != b"1":
            raise RuntimeError("lock holder died before taking the lock")
        ack("save", 2)  # the holder's save returned

        def release() -> None:
            os.write(go_w, b"1")
            _, status = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                raise RuntimeError(f"lock holder failed ({status})")

        _second_writer_body(root, ack, scale, release)
    finally:
        os.close(ready_r)
        os.close(go_w)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _second_writer_body(root: str, ack: Ack, scale: int, release: Callable[[], None]) -> None:
    with ckstore.Store(root, lock_timeout=0) as store:
        try:
            store.save(expected_state(3, scale), step=3)
        except ckstore.StoreLockedError:
            ack("locked", 3)
        else:
            raise AssertionError("a second writer saved while the first held the lock")
        release()
        store.lock_timeout = None
        _save(store, 3, scale, ack)


# ---------------------------------------------------------------- resumed training


TRAIN_STEPS = 12
TRAIN_EVERY = 3


def train_objects(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)
    gen = torch.Generator().manual_seed(seed + 1)
    return {"model": model, "optimizer": opt, "scheduler": sched, "gen": gen}


def train_step(objs: dict[str, Any]) -> None:
    x = torch.randn(16, 6, generator=objs["gen"])
    y = x.sum(dim=1, keepdim=True).sin()
    loss = torch.nn.functional.mse_loss(objs["model"](x), y)
    objs["optimizer"].zero_grad()
    loss.backward()
    objs["optimizer"].step()
    objs["scheduler"].step()


def _train_state(objs: dict[str, Any], step: int) -> dict[str, Any]:
    return {"model": objs["model"], "optimizer": objs["optimizer"], "scheduler": objs["scheduler"], "rng": objs["gen"].get_state(), "step": step}


def train(root: str, ack: Ack | None = None, *, resume: bool = False) -> dict[str, torch.Tensor]:
    """Train TRAIN_STEPS steps, saving every TRAIN_EVERY; with ``resume`` start from the store's newest checkpoint."""
    objs = train_objects()
    start = 0
    with ckstore.Store(root, keep_last=2) as store:
        if resume and store.checkpoints():
            state = _train_state(objs, 0)
            loaded = store.load(state)
            objs["gen"].set_state(loaded["rng"])
            start = loaded["step"]
        for step in range(start + 1, TRAIN_STEPS + 1):
            train_step(objs)
            if step % TRAIN_EVERY == 0:
                if ack is not None:
                    intent(ack, step, {"step": step})
                store.save(_train_state(objs, step), step=step, metrics={"step": step})
                if ack is not None:
                    ack("save", step)
    return {k: v.detach().clone() for k, v in objs["model"].state_dict().items()}


def _run_train(root: str, ack: Ack, scale: int) -> None:
    train(root, ack)


_REFERENCE: dict[str, torch.Tensor] | None = None


def reference_weights() -> dict[str, torch.Tensor]:
    """Final weights of an uninterrupted training run (computed once per process)."""
    global _REFERENCE
    if _REFERENCE is None:
        with tempfile.TemporaryDirectory(prefix="ckstore-fi-ref-") as tmp:
            _REFERENCE = train(os.path.join(tmp, "store"))
    return _REFERENCE


def _check_train(store: ckstore.Store, acks: list[tuple[str, Any]]) -> list[str]:
    # Resume from whatever the crash left and finish the run: it must end bit-identical to the uninterrupted one.
    root = str(store.path)
    store.close()
    final = train(root, resume=True)
    reference = reference_weights()
    if not same_state(final, reference):
        return ["resumed training run diverged from the uninterrupted run"]
    return []


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("first_save", _run_first, None, {"keep_last": 2}),
        Workload("next_save", _run_next, _prepare_steps(1, 2)),
        Workload("retention", _run_retention, _prepare_steps(1, 2, 3), {"keep_last": 2}),
        Workload("tag_update", _run_tags, _prepare_steps(1, 2, tags={"top": 1, "old": 1}), check=_check_tags),
        Workload("second_writer", _run_second_writer, _prepare_steps(1)),
        Workload("recover_leftovers", _run_leftovers, _prepare_leftovers),
        Workload("async_save", _run_async, _prepare_steps(1, 2), {"keep_last": 2}),
        Workload("many_files", _run_many, _prepare_many, {"keep_last": 1}, content=many_files_state),
        Workload("gc_delete", _run_gc, _prepare_ranked, {"keep_best": 1, "metric": "loss"}),
        # next_save with 8 MB tensors: the large-write path (direct writes, several chunks per file)
        Workload("next_save_large", _run_next, _prepare_steps(1, 2), scale=1 << 19),
        Workload(
            "train_resume",
            _run_train,
            None,
            {"keep_last": 2},
            check=_check_train,
            content=None,
            probe=False,  # the check resumes training from the crash state: that is its writable open + saves
        ),
    )
}


def run_in_process_variant(workload: Workload) -> Callable[[str, Ack, int], None]:
    """The run function to use when every write must happen in this process (the model tier records one process)."""
    if workload.name == "second_writer":
        return lambda root, ack, scale: _run_second_writer(root, ack, scale, holder_in_process=True)
    return workload.run


def _register_later_write_paths() -> None:
    from .publish import PUBLISH  # the DVC publish path (imports this module, hence the late import)

    WORKLOADS[PUBLISH.name] = PUBLISH
    from .dvcmodel import PUBLISH_SWAP, PULL_INSTALL  # ckstore's own steps of publish and pull, for the crash model

    WORKLOADS[PUBLISH_SWAP.name] = PUBLISH_SWAP
    WORKLOADS[PULL_INSTALL.name] = PULL_INSTALL
    from .writepaths import WORKLOADS as MORE  # incremental, model-sized, continuation, ...

    WORKLOADS.update(MORE)


_register_later_write_paths()
