"""The ranks of a multi-rank test run (``test_distributed_ranks.py``, ``test_distributed_store.py``): one forked process per rank.

    python tests/distributed_worker.py SCENARIO WORLD PORT STORE OUT

forks WORLD ranks (torch is imported once, before the fork) and waits for them.

A real gloo process group on 127.0.0.1, a real FSDP2 model (``fully_shard``
on a CPU device mesh), real ``dcp.save``/``dcp.async_save``/``dcp.load``
through ckstore's storage pair. Results go to files under OUT for the test
to compare; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import ckstore
from ckstore.distributed import StoreReader, StoreWriter, checkpoint_group


#: "cuda" runs the ranks on NCCL, one GPU each (tests/test_cuda.py); "cpu" (default) on gloo.
DEVICE = os.environ.get("CKSTORE_TEST_DEVICE", "cpu")


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.ReLU(), torch.nn.Linear(12, 6))


def sharded(seed: int, world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    mesh = init_device_mesh(DEVICE, (world,))
    model = make_model(seed).to(DEVICE)
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def train_step(model, opt, step: int, rank: int) -> None:
    gen = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own batch, as in data parallelism
    model(torch.randn(5, 8, generator=gen)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()


def state_of(model, opt) -> dict:
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def full_state(model, opt) -> dict | None:
    """The unsharded state on rank 0 (None elsewhere): what every load must reproduce bitwise."""
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Cloned now: the optimizer's 'step' comes back by reference, and the next step would change it in place.
    return torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, {"model": msd, "optim": osd}) if dist.get_rank() == 0 else None


def scenario_save(rank: int, world: int, store_path: str, out: str) -> None:
    group = checkpoint_group(timeout=60)
    model, opt = sharded(seed=0, world=world)
    train_step(model, opt, 1, rank)
    with ckstore.Store(store_path, keep_last=10) as store:
        dcp.save(state_of(model, opt), storage_writer=StoreWriter(store, step=1, metrics={"loss": 1.0}, tags=["first"]), process_group=group)
        ref = full_state(model, opt)
        if ref is not None:
            torch.save(ref, os.path.join(out, "ref-1.pt"))
        # async_save: staged on this thread, written and committed in the background; training goes on.
        train_step(model, opt, 2, rank)
        future = dcp.async_save(state_of(model, opt), storage_writer=StoreWriter(store, step=2), process_group=group)
        ref = full_state(model, opt)  # taken while the background save runs: it must not see later changes
        train_step(model, opt, 3, rank)  # modifies parameters in place after async_save returned
        future.result()
        if ref is not None:
            torch.save(ref, os.path.join(out, "ref-2.pt"))
        # DDP-style replicated state: the same tensors on every rank; DCP's dedup writes each once.
        replicated = make_model(seed=7).state_dict()
        dcp.save({"ddp": replicated}, storage_writer=StoreWriter(store, step=3), process_group=group)
        if rank == 0:
            torch.save(replicated, os.path.join(out, "ref-3.pt"))
        # Per-rank values under one name (RNG state, data position): DCP would take them for replicated and keep one.
        from ckstore.distributed.training import per_rank

        torch.manual_seed(50 + rank)
        mine = {"rng": torch.get_rng_state(), "position": torch.tensor([1000 + rank])}
        dcp.save(per_rank(mine, group=group), storage_writer=StoreWriter(store, step=4), process_group=group)
        torch.manual_seed(0)
        back = per_rank({"rng": torch.empty_like(mine["rng"]), "position": torch.tensor([0])}, group=group)
        dcp.load(back, storage_reader=StoreReader(store, step=4), process_group=group)
        got = next(iter(back.values()))
        with open(os.path.join(out, f"per-rank-{rank}.json"), "w") as f:
            json.dump({"rng_equal": bool(torch.equal(got["rng"], mine["rng"])), "position": int(got["position"])}, f)


def scenario_load(rank: int, world: int, store_path: str, out: str) -> None:
    """Load steps 1 and 2 at this world size into a differently initialised sharded model; save it again as step 10."""
    group = checkpoint_group(timeout=60)
    model, opt = sharded(seed=123, world=world)
    train_step(model, opt, 99, rank)  # optimizer state exists, and differs from the checkpoint's
    with ckstore.Store(store_path, keep_last=10) as store:
        for step in (1, 2):
            state = state_of(model, opt)
            dcp.load(state, storage_reader=StoreReader(store, step=step), process_group=group)
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            got = full_state(model, opt)
            if got is not None:
                torch.save(got, os.path.join(out, f"loaded-{step}-at-{world}.pt"))
        dcp.save(state_of(model, opt), storage_writer=StoreWriter(store, step=10), process_group=group)


def scenario_kill(rank: int, world: int, store_path: str, out: str) -> None:
    """The last rank stops inside write_data, after its file is written and fsynced, until the test SIGKILLs it."""
    timeout = float(os.environ["CKSTORE_TEST_GROUP_TIMEOUT"])
    group = checkpoint_group(timeout=timeout)
    model, opt = sharded(seed=0, world=world)
    train_step(model, opt, 1, rank)
    writer = StoreWriter(ckstore.Store(store_path), step=5)
    if rank == world - 1:
        original = writer.write_data

        def write_then_wait(plan, planner):
            result = original(plan, planner)
            with open(os.path.join(out, "victim-ready"), "w") as f:
                f.write(str(os.getpid()))
            time.sleep(600)  # the test kills this process here
            return result

        writer.write_data = write_then_wait
    dist.barrier(group=group)
    started = time.monotonic()
    outcome = {"rank": rank}
    try:
        dcp.save(state_of(model, opt), storage_writer=writer, process_group=group)
        outcome["error"] = None
    except BaseException as exc:  # CheckpointException is a BaseException
        outcome["error"] = type(exc).__name__
        outcome["message"] = str(exc)[-2000:]
    outcome["seconds"] = time.monotonic() - started
    with open(os.path.join(out, f"outcome-{rank}.json"), "w") as f:
        json.dump(outcome, f)
    # The group is broken: exit without the collective teardown (it would wait for the dead rank).
    os._exit(0)


def scenario_preempt(rank: int, world: int, store_path: str, out: str) -> None:
    """Train, saving every 2 steps; a SIGTERM to any one rank makes every rank save the same step and stop."""
    from ckstore.distributed.training import Preemption

    group = checkpoint_group(timeout=60)
    model, opt = sharded(seed=0, world=world)
    costs = []
    with ckstore.Store(store_path) as store, Preemption(group=group) as preemption:
        for step in range(1, 400):
            train_step(model, opt, step, rank)
            if rank == world - 1 and step == 5:
                with open(os.path.join(out, "at-step-5"), "w") as f:
                    f.write(str(os.getpid()))
            started = time.perf_counter()
            stop = preemption.should_stop()
            costs.append(time.perf_counter() - started)
            if stop or step % 2 == 0:
                dcp.save(state_of(model, opt), storage_writer=StoreWriter(store, step=step), process_group=group)
            if stop:
                break
            time.sleep(0.05)
    with open(os.path.join(out, f"preempt-{rank}.json"), "w") as f:
        json.dump({"step": step, "signalled": preemption.requested, "flag_cost_s": sorted(costs)[len(costs) // 2]}, f)


def scenario_resume(rank: int, world: int, store_path: str, out: str) -> None:
    from ckstore.distributed.training import agree_on_step

    group = checkpoint_group(timeout=60)
    with ckstore.Store(store_path, readonly=True) as store:
        step = agree_on_step(store, group=group)
        model, opt = sharded(seed=5, world=world)
        state = state_of(model, opt)
        dcp.load(state, storage_reader=StoreReader(store, step=step), process_group=group)
    with open(os.path.join(out, f"resume-{rank}.json"), "w") as f:
        json.dump({"step": step}, f)


def scenario_train(rank: int, world: int, store_path: str, out: str) -> None:
    """Train to CKSTORE_TEST_STEPS; save at CKSTORE_TEST_SAVE_AT and die (SIGKILL) one step later, or resume first.

    Each rank draws its batches from its own global RNG stream, saved per rank with the model and optimizer.
    """
    from ckstore.distributed.training import agree_on_step, per_rank

    steps, save_at = int(os.environ["CKSTORE_TEST_STEPS"]), int(os.environ.get("CKSTORE_TEST_SAVE_AT", "0"))
    resume = os.environ.get("CKSTORE_TEST_RESUME") == "1"
    group = checkpoint_group(timeout=60)
    model, opt = sharded(seed=0, world=world)
    torch.manual_seed(10 + rank)
    start = 1
    with ckstore.Store(store_path) as store:
        if resume:
            step = agree_on_step(store, group=group)
            msd, osd = get_state_dict(model, opt)
            state = {"model": msd, "optim": osd, "local": per_rank({"rng": torch.get_rng_state(), "step": torch.tensor(0)}, group=group)}
            dcp.load(state, storage_reader=StoreReader(store, step=step), process_group=group)
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            local = next(iter(state["local"].values()))
            torch.set_rng_state(local["rng"])
            start = int(local["step"]) + 1
            assert start == step + 1
        for step in range(start, steps + 1):
            batch = torch.randn(5, 8)  # this rank's RNG stream
            model(batch).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
            if step == save_at:
                msd, osd = get_state_dict(model, opt)
                local = per_rank({"rng": torch.get_rng_state(), "step": torch.tensor(step)}, group=group)
                dcp.save({"model": msd, "optim": osd, "local": local}, storage_writer=StoreWriter(store, step=step), process_group=group)
            if save_at and step == save_at + 1 and not resume:
                os.kill(os.getpid(), signal.SIGKILL)  # a crash after the save: the next step's work is lost
    got = full_state(model, opt)
    if got is not None:
        torch.save(got, os.path.join(out, os.environ["CKSTORE_TEST_FINAL"]))


# ---------------------------------------------------------------- Store(path, process_group=...)  (test_distributed_store.py)


def _outcome(call) -> dict:
    try:
        return {"ok": repr(call())}
    except BaseException as exc:  # noqa: BLE001 - the test compares what every rank raised
        return {"error": type(exc).__name__, "message": str(exc)[-1500:]}


def _dump(out: str, name: str, value) -> None:
    with open(os.path.join(out, name), "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)


def _replicated_state(rank: int, group) -> dict:
    """DDP: the same model on every rank; each rank's RNG and data position (per_rank); plain values."""
    from ckstore.distributed.training import per_rank

    torch.manual_seed(50 + rank)
    mine = {"rng": torch.get_rng_state(), "position": torch.tensor([1000 + rank])}
    return {"ddp": make_model(seed=7).state_dict(), "local": per_rank(mine, group=group), "meta": {"epoch": 3, "name": "run-a", "lrs": [0.1, 0.01]}}


def scenario_store_save(rank: int, world: int, store_path: str, out: str) -> None:
    """One 2-rank run through Store(process_group=...): replicated + per-rank + plain values, errors, ownership, retention, async, FSDP2."""
    group = checkpoint_group(timeout=60)
    report: dict = {"rank": rank}
    with ckstore.Store(os.path.join(store_path, "ddp"), keep_last=2, process_group=group) as store:
        state = _replicated_state(rank, group)
        info = store.save(state, step=1, metrics={"loss": 0.5}, tags=["first"])
        report["info"] = {"step": info.step, "tags": list(info.tags), "metrics": info.metrics}
        if rank == 0:
            torch.save(state["ddp"], os.path.join(out, "ddp-ref.pt"))
        # Load into a template of zeros: every rank gets the replicated model, its own RNG and position, the values.
        template = _replicated_state(rank, group)
        torch.manual_seed(0)
        local = next(iter(template["local"].values()))
        local["rng"].zero_()
        local["position"].zero_()
        template["ddp"] = {k: torch.zeros_like(v) for k, v in template["ddp"].items()}
        template["meta"] = {"epoch": 0, "name": "", "lrs": []}
        assert store.load(template, step=1) is template
        mine = next(iter(state["local"].values()))
        report["load"] = {
            "ddp_equal": all(torch.equal(template["ddp"][k], v) for k, v in state["ddp"].items()),
            "rng_equal": bool(torch.equal(local["rng"], mine["rng"])),
            "position": int(local["position"]),
            "meta": template["meta"],
        }
        report["again"] = _outcome(lambda: store.save(state, step=1))  # committed: refused on every rank
        report["disagree"] = _outcome(lambda: store.save(state, step=10 + rank))
        report["no_state"] = _outcome(lambda: store.load(None, step=1))
        report["tag"] = _outcome(lambda: store.tag(1, f"by-rank-{rank}"))
        report["gc"] = _outcome(lambda: store.gc())
        for step in (2, 3, 4):
            store.save(state, step=step)
        dist.barrier(group=group)
        report["after_retention"] = [(i.step, sorted(i.tags)) for i in store.checkpoints()]
        # In the background: staged when save returns; the state may change at once.
        handle = store.save(state, step=5, blocking=False)
        for value in state["ddp"].values():
            value.fill_(99.0)
        waited = store.wait()
        report["async"] = {"handle": type(handle).__name__, "waited_step": waited.step, "result_step": handle.result().step}
        fresh = {"ddp": {k: torch.zeros_like(v) for k, v in state["ddp"].items()}}
        store.load(fresh)  # step=None: the newest that verifies on every rank (5)
        report["async"]["loaded_pre_change"] = all(torch.equal(fresh["ddp"][k], v) for k, v in make_model(seed=7).state_dict().items())
        report["latest"] = store.latest().step
    # FSDP2: each rank writes the shards it owns.
    model, opt = sharded(seed=0, world=world)
    train_step(model, opt, 1, rank)
    with ckstore.Store(os.path.join(store_path, "fsdp"), process_group=group) as store:
        store.save(state_of(model, opt), step=1)
        ref = full_state(model, opt)
        if ref is not None:
            torch.save(ref, os.path.join(out, "fsdp-ref.pt"))
    _dump(out, f"store-save-{rank}.json", report)


def scenario_store_load(rank: int, world: int, store_path: str, out: str) -> None:
    """At another world size: load the 2-rank FSDP2 checkpoint (resharding), then save it from these ranks as step 2."""
    group = checkpoint_group(timeout=60)
    model, opt = sharded(seed=123, world=world)
    train_step(model, opt, 99, rank)
    with ckstore.Store(os.path.join(store_path, "fsdp"), process_group=group) as store:
        state = state_of(model, opt)
        store.load(state, step=1)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        got = full_state(model, opt)
        if got is not None:
            torch.save(got, os.path.join(out, f"fsdp-loaded-at-{world}.pt"))
        store.save(state_of(model, opt), step=2)


def scenario_store_kill(rank: int, world: int, store_path: str, out: str) -> None:
    """Rank CKSTORE_TEST_VICTIM stops inside its write (its file written and fsynced) until the test SIGKILLs it."""
    from ckstore.distributed import dcp as ckdcp

    group = checkpoint_group(timeout=float(os.environ["CKSTORE_TEST_GROUP_TIMEOUT"]))
    if rank == int(os.environ["CKSTORE_TEST_VICTIM"]):
        original = ckdcp.StoreWriter.write_data

        def write_then_wait(self, plan, planner):
            result = original(self, plan, planner)
            with open(os.path.join(out, "victim-ready"), "w") as f:
                f.write(str(os.getpid()))
            time.sleep(600)  # the test kills this process here
            return result

        ckdcp.StoreWriter.write_data = write_then_wait  # this rank's process only (forked)
    store = ckstore.Store(store_path, process_group=group)
    dist.barrier(group=group)
    started = time.monotonic()
    outcome = {"rank": rank, **_outcome(lambda: store.save(_replicated_state(rank, group), step=5))}
    outcome["seconds"] = time.monotonic() - started
    _dump(out, f"outcome-{rank}.json", outcome)
    os._exit(0)  # the group is broken: no collective teardown (it would wait for the dead rank)


def scenario_store_resave(rank: int, world: int, store_path: str, out: str) -> None:
    """Fresh processes after a lost save: the coordinator's first write recovers the store, and the save commits."""
    group = checkpoint_group(timeout=60)
    with ckstore.Store(store_path, process_group=group) as store:
        info = store.save(_replicated_state(rank, group), step=5)
    _dump(out, f"resave-{rank}.json", {"step": info.step})


class _Trainable:
    """The model and optimizer as one DCP ``Stateful``: its state dict is taken at each save, not once."""

    def __init__(self, model, opt) -> None:
        self.model, self.opt = model, opt

    def state_dict(self) -> dict:
        return state_of(self.model, self.opt)

    def load_state_dict(self, state: dict) -> None:
        set_state_dict(self.model, self.opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


class _RankRNG:
    """This rank's global RNG stream under its own name (``per_rank``), as a ``Stateful``."""

    def __init__(self, group) -> None:
        self.group = group

    def state_dict(self) -> dict:
        from ckstore.distributed.training import per_rank

        return per_rank({"rng": torch.get_rng_state()}, group=self.group)

    def load_state_dict(self, state: dict) -> None:
        (mine,) = state.values()
        torch.set_rng_state(mine["rng"])


def scenario_store_loop(rank: int, world: int, store_path: str, out: str) -> None:
    """The single-process loop unchanged on a multi-rank store: ckstore.resume, then Checkpointer(every=4).

    Trains to CKSTORE_TEST_STEPS; with CKSTORE_TEST_TERM_AT the last rank sends itself a SIGTERM in that step.
    """
    steps, term_at = int(os.environ["CKSTORE_TEST_STEPS"]), int(os.environ.get("CKSTORE_TEST_TERM_AT", "0"))
    background = os.environ.get("CKSTORE_TEST_ASYNC") == "1"
    if background and rank == 0:
        # A slow write on one rank: the other rank's background save reaches its collectives (DCP's gather, the
        # commit's broadcast) while this rank's loop runs the next steps' collectives.
        from ckstore.distributed import dcp as ckdcp

        original = ckdcp.StoreWriter.write_data

        def slow_write(self, plan, planner):
            time.sleep(0.3)
            return original(self, plan, planner)

        ckdcp.StoreWriter.write_data = slow_write  # this rank's process only (forked)
    group = checkpoint_group(timeout=60)
    model, opt = sharded(seed=0, world=world)
    torch.manual_seed(10 + rank)
    state = {"app": _Trainable(model, opt), "rng": _RankRNG(group)}
    report: dict = {"rank": rank}
    with ckstore.Store(store_path, keep_last=3, process_group=group) as store:
        report["start"] = start = ckstore.resume(store, state)
        ckpt = ckstore.Checkpointer(store, state, every=4, blocking=not background)
        costs = report["agree_s"] = []  # Checkpointer.step() at the steps that do not save: the all-reduce alone
        try:
            for step in range(start + 1, steps + 1):
                model(torch.randn(5, 8).to(DEVICE)).pow(2).sum().backward()  # this rank's batch, from its own RNG stream
                opt.step()
                opt.zero_grad()
                if step == term_at and rank == world - 1:
                    os.kill(os.getpid(), signal.SIGTERM)  # a real signal to one rank only; its handler only sets a flag
                started = time.perf_counter()
                saved = ckpt.step(step)
                if saved is None:
                    costs.append(time.perf_counter() - started)
                time.sleep(0.05 if background else 0)  # steps that take a while, during the background save
                if step == 8:
                    ckpt.step(step, {"val_loss": 0.25})  # an evaluation of the saved step, reported on every rank
            ckpt.close()
        except SystemExit as exc:
            report.update(exit=exc.code, saved=ckpt.last_saved_step, signal=ckpt.pending_signal and ckpt.pending_signal.name)
            _dump(out, f"loop-{rank}.json", report)
            sys.stdout.flush()
            os._exit(0)
    got = full_state(model, opt)
    if got is not None:
        torch.save(got, os.path.join(out, os.environ["CKSTORE_TEST_FINAL"]))
    _dump(out, f"loop-{rank}.json", report)


SCENARIOS = {
    "store_loop": scenario_store_loop,
    "save": scenario_save,
    "load": scenario_load,
    "kill": scenario_kill,
    "preempt": scenario_preempt,
    "resume": scenario_resume,
    "train": scenario_train,
    "store_save": scenario_store_save,
    "store_load": scenario_store_load,
    "store_kill": scenario_store_kill,
    "store_resave": scenario_store_resave,
}


def run_rank(scenario: str, rank: int, world: int, port: str, store_path: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    if DEVICE == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        SCENARIOS[scenario](rank, world, store_path, out)
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    dist.destroy_process_group()


def launch(scenario: str, world: int, port: str, store_path: str, out: str) -> int:
    """Fork one process per rank from this interpreter (torch imported once), wait for all; 0 if every rank exited 0.

    Each rank's pid is in OUT/pid-<rank>, its exit status in OUT/status.json ("exit N" or "signal N").
    """
    torch.set_num_threads(1)  # before forking: a child must not inherit a started OpenMP pool
    pids = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            code = 0
            try:
                run_rank(scenario, rank, world, port, store_path, out)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        with open(os.path.join(out, f"pid-{rank}"), "w") as f:
            f.write(str(pid))
        pids.append(pid)
    status = {}
    for rank, pid in enumerate(pids):
        _, raw = os.waitpid(pid, 0)
        status[rank] = f"signal {os.WTERMSIG(raw)}" if os.WIFSIGNALED(raw) else f"exit {os.WEXITSTATUS(raw)}"
    with open(os.path.join(out, "status.json"), "w") as f:
        json.dump(status, f)
    return 0 if all(v == "exit 0" for v in status.values()) else 1


if __name__ == "__main__":
    scenario, world, port, store_path, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    sys.exit(launch(scenario, world, port, store_path, out))
