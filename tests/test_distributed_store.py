"""``Store(path, process_group=pg)`` on real gloo process groups (one forked OS process per rank, 127.0.0.1).

One 2-rank run (``store_save`` in ``distributed_worker.py``) saves a DDP-like replicated model, each rank's RNG and
data position, and plain values; checks the typed errors every rank gets, who owns the store, retention, a
background save, and saves an FSDP2-sharded model. A 4-rank run loads that checkpoint (2 -> 4) and saves its own;
this process loads both into a plain model (N -> 1). Two more runs lose a rank mid-save (SIGKILL) and restart.
"""

from __future__ import annotations

import json
import os
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch

import ckstore
from conftest import assert_same
from test_distributed_ranks import _launch, _plain_load, _run, _run_env, _wait_for, kill_victim_and_wait

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("store-ranks")
    store, out = root / "store", root / "out"
    out.mkdir()
    _run("store_save", 2, store, out)
    return store, out, [json.loads((out / f"store-save-{r}.json").read_text()) for r in (0, 1)]


def _metadata(store_path: Path, step: int) -> dict:
    manifest = json.loads((store_path / "checkpoints" / f"step-{step:08d}" / "manifest.json").read_bytes())
    return json.loads(manifest["state"]["dcp_metadata"])


@pytest.mark.guarantee("G20")
def test_every_rank_gets_the_committed_checkpoint_and_loads_its_own_values(saved):
    _, _, reports = saved
    for rank, report in enumerate(reports):
        assert report["info"] == {"step": 1, "tags": ["first"], "metrics": {"loss": 0.5}}
        assert report["load"] == {"ddp_equal": True, "rng_equal": True, "position": 1000 + rank, "meta": {"epoch": 3, "name": "run-a", "lrs": [0.1, 0.01]}}


@pytest.mark.guarantee("G16")
def test_replicated_tensors_are_stored_once_and_values_as_json(saved):
    store_path, out, _ = saved
    ddp = store_path / "ddp"
    meta = _metadata(ddp, 1)
    replicated = torch.load(out / "ddp-ref.pt", weights_only=True)
    for key, tensor in replicated.items():
        chunks = meta["tensors"][f"ddp.{key}"]["chunks"]
        assert len(chunks) == 1 and chunks[0]["storage"]["length"] == tensor.numel() * tensor.element_size()  # once, not per rank
    assert {k for k in meta["tensors"] if k.startswith("local.")} == {f"local.rank-0000{r}.{n}" for r in (0, 1) for n in ("rng", "position")}
    assert set(meta["bytes"]) == {"meta.epoch", "meta.name", "meta.lrs"}
    directory = ddp / "checkpoints" / "step-00000001"
    for item in meta["bytes"].values():
        assert item["encoding"] == "ckstore-json"
        storage = item["storage"]
        with open(directory / storage["file"], "rb") as f:
            f.seek(storage["offset"])
            data = f.read(storage["length"])
        assert data.startswith(b'{"format":"ckstore.dcp-value"')
        assert not any(bytes([0x80, n]) in data for n in range(2, 6))  # no pickle protocol header
        assert b"PK" not in data[:2]  # nor torch.save's zip container


@pytest.mark.guarantee("G7", "G20")
def test_errors_are_the_same_typed_error_on_every_rank(saved):
    _, _, reports = saved
    assert {r["again"]["error"] for r in reports} == {"CheckpointExistsError"}
    assert {r["disagree"]["error"] for r in reports} == {"InvalidArgumentError"}
    assert all("rank 0: 10, rank 1: 11" in r["disagree"]["message"] for r in reports)
    assert {r["no_state"]["error"] for r in reports} == {"InvalidArgumentError"}
    assert all("state is required" in r["no_state"]["message"] for r in reports)


@pytest.mark.guarantee("G12", "G20")
def test_only_the_coordinator_changes_the_store_and_retention_runs_once(saved):
    store_path, _, reports = saved
    assert "ok" in reports[0]["tag"] and "ok" in reports[0]["gc"]
    for method in ("tag", "gc"):
        assert reports[1][method]["error"] == "ReadOnlyStoreError"
        assert f"Store.{method}()" in reports[1][method]["message"] and "global rank 0" in reports[1][method]["message"]
    # keep_last=2 applied by the coordinator after each save; step 1 is tagged. Both ranks list the same.
    assert reports[0]["after_retention"] == reports[1]["after_retention"] == [[1, ["by-rank-0", "first"]], [3, []], [4, []]]
    with ckstore.Store(store_path / "ddp", readonly=True) as store:
        assert [i.step for i in store.checkpoints()] == [1, 4, 5]
        assert all(store.verify(i.step) == [] for i in store.checkpoints())
    assert os.listdir(store_path / "ddp" / ".staging") == []


@pytest.mark.guarantee("G15", "G20")
def test_a_background_save_on_two_ranks_holds_the_state_of_the_call(saved):
    _, _, reports = saved
    for report in reports:
        assert report["async"] == {"handle": "AsyncSave", "waited_step": 5, "result_step": 5, "loaded_pre_change": True}
        assert report["latest"] == 5


@pytest.mark.guarantee("G20")
def test_fsdp2_checkpoint_reshards_to_four_ranks_and_to_one_process_bitwise(saved):
    store_path, out, _ = saved
    fsdp = store_path / "fsdp"
    ref = torch.load(out / "fsdp-ref.pt", weights_only=True)
    assert sorted(p.name for p in (fsdp / "checkpoints" / "step-00000001").iterdir()) == ["manifest.json", "rank-00000.safetensors", "rank-00001.safetensors"]
    assert_same(_plain_load(fsdp, 1), ref)  # N -> 1 through StoreReader
    _run("store_load", 4, store_path, out)  # 2 -> 4, then a 4-rank save of what it loaded
    assert_same(torch.load(out / "fsdp-loaded-at-4.pt", weights_only=True), ref)
    names = sorted(p.name for p in (fsdp / "checkpoints" / "step-00000002").iterdir())
    assert names == ["manifest.json"] + [f"rank-0000{r}.safetensors" for r in range(4)]
    assert_same(_plain_load(fsdp, 2), ref)
    with warnings.catch_warnings(), ckstore.Store(fsdp, readonly=True) as store:
        warnings.simplefilter("ignore")
        with pytest.raises(ckstore.StateError, match="StoreReader"):
            store.load({"model": {}, "optim": {}}, step=2)  # no process group: refused, naming the ways to load it


GROUP_TIMEOUT_S = 8


@pytest.mark.guarantee("G2", "G13", "G20")
@pytest.mark.parametrize(
    ("victim", "sig"), [(1, signal.SIGKILL), (0, signal.SIGKILL), (1, signal.SIGSTOP)], ids=["rank-1-killed", "coordinator-killed", "rank-1-frozen"]
)
def test_a_rank_lost_mid_save_fails_the_survivor_in_bounded_time_and_a_fresh_save_recovers(tmp_path, victim, sig):
    """SIGKILL: gloo sees the closed connection at once. SIGSTOP (a hung rank whose sockets stay open): bounded by
    checkpoint_group's timeout."""
    store_path, out = tmp_path / "store", tmp_path / "out"
    out.mkdir()
    proc = _launch("store_kill", 2, store_path, out, env={"CKSTORE_TEST_GROUP_TIMEOUT": str(GROUP_TIMEOUT_S), "CKSTORE_TEST_VICTIM": str(victim)})
    survivor = 1 - victim
    waited = kill_victim_and_wait(proc, out, sig, [out / f"outcome-{survivor}.json"], limit=GROUP_TIMEOUT_S + 60)
    outcome = json.loads((out / f"outcome-{survivor}.json").read_text())
    assert outcome.get("error") == "DistributedError", outcome
    # Only the coordinator knows whether it renamed the checkpoint in; the other ranks say so.
    assert ("nothing was committed" if survivor == 0 else "only the coordinator (rank 0) knew") in outcome["message"]
    assert waited < GROUP_TIMEOUT_S + 15, f"the survivor took {waited:.1f}s after the kill"
    print(f"survivor (rank {survivor}) raised {waited:.2f}s after {signal.Signals(sig).name}")
    with ckstore.Store(store_path, readonly=True) as store:
        assert store.checkpoints() == []  # nothing partial committed
    # A surviving coordinator removed its staging at once; a killed one left it for the next writer's recovery.
    assert bool(os.listdir(store_path / ".staging")) == (victim == 0)
    _run("store_resave", 2, store_path, out)
    assert [json.loads((out / f"resave-{r}.json").read_text()) for r in (0, 1)] == [{"step": 5}, {"step": 5}]
    with ckstore.Store(store_path, readonly=True) as store:
        assert [i.step for i in store.checkpoints()] == [5] and store.verify(5) == []
    assert os.listdir(store_path / ".staging") == []


def check_the_loop_on_ranks(tmp_path: Path, world: int, device: str = "cpu", *, background: bool = False) -> None:
    """ckstore.resume + Checkpointer(every=4) on Store(process_group=): a SIGTERM to the last rank at step 6, then a resume.

    Every rank saves step 6 and exits 143 (checkpoints 4 and 6); the resumed run starts at 6 on every rank and ends
    bitwise equal to an uninterrupted run. Also run on NCCL by tests/test_cuda.py.
    """
    out = tmp_path / "out"
    out.mkdir()
    env = {"CKSTORE_TEST_STEPS": "9", "CKSTORE_TEST_DEVICE": device, "CKSTORE_TEST_ASYNC": "1" if background else "0"}
    _run_env("store_loop", world, tmp_path / "straight", out, {**env, "CKSTORE_TEST_FINAL": "straight.pt"})
    with ckstore.Store(tmp_path / "straight", readonly=True) as store:
        # Metrics passed again for the saved step 8: recorded once, by the coordinator (the others skip the mutator).
        assert store.resolve(8).metrics == {"val_loss": 0.25}
    costs = sorted(c for r in range(world) for c in json.loads((out / f"loop-{r}.json").read_text())["agree_s"])
    print(f"Checkpointer.step() without a save at {world} ranks: median {costs[len(costs) // 2] * 1e3:.2f} ms, max {costs[-1] * 1e3:.2f} ms")
    _run_env("store_loop", world, tmp_path / "store", out, {**env, "CKSTORE_TEST_TERM_AT": "6", "CKSTORE_TEST_FINAL": "never.pt"})
    stopped = [json.loads((out / f"loop-{r}.json").read_text()) for r in range(world)]
    assert [(s["exit"], s["saved"], s["signal"]) for s in stopped] == [(128 + signal.SIGTERM, 6, "SIGTERM")] * world, stopped
    with ckstore.Store(tmp_path / "store", readonly=True) as store:
        assert [c.step for c in store.checkpoints()] == [4, 6]  # every=4, and the signal's step
    _run_env("store_loop", world, tmp_path / "store", out, {**env, "CKSTORE_TEST_FINAL": "resumed.pt"})
    assert [json.loads((out / f"loop-{r}.json").read_text())["start"] for r in range(world)] == [6] * world
    assert_same(torch.load(out / "resumed.pt", weights_only=True), torch.load(out / "straight.pt", weights_only=True))


@pytest.mark.guarantee("G18", "G20")
def test_resume_and_checkpointer_on_two_ranks_save_the_same_step_on_a_sigterm_and_resume_bitwise(tmp_path):
    """The single-process loop on Store(process_group=): a SIGTERM to one rank, and every rank saves that step and exits 143.

    Before: the signalled rank alone saved (the other's next save gathered a different step), and
    ckstore.resume() read the DCP checkpoint through the single-process loader.
    """
    check_the_loop_on_ranks(tmp_path, 2)


@pytest.mark.guarantee("G15", "G20")
def test_checkpointer_background_saves_on_two_ranks_overlap_the_steps_and_resume_bitwise(tmp_path):
    """Checkpointer(blocking=False) at 2 ranks: the background save's collectives run while the steps agree.

    Before, the steps' all-reduce and the background save's collectives shared one gloo group from two
    threads, in an order that could differ between the ranks.
    """
    check_the_loop_on_ranks(tmp_path, 2, background=True)


def test_a_process_group_without_torch_distributed_is_a_typed_error(store_path):
    import torch.distributed as dist

    assert not dist.is_initialized()
    with pytest.raises(ckstore.InvalidArgumentError, match="init_process_group"):
        ckstore.Store(store_path, process_group=object())


def test_load_options_on_a_one_rank_group(store_path, run_python):
    """A group of one (in a subprocess, so this process never initialises torch.distributed): strict, classes, refusals."""
    code = """
        import enum, json, os, socket, sys, warnings
        warnings.simplefilter("ignore")
        import torch, torch.distributed as dist
        import ckstore
        from ckstore.distributed import checkpoint_group

        class Phase(enum.Enum):
            WARMUP = 1

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        out = {}
        def outcome(call):
            try:
                call()
                return "ok"
            except ckstore.CkstoreError as exc:
                return f"{type(exc).__name__}: {getattr(exc, 'key', None)}: {exc}"
        with ckstore.Store(sys.argv[1], process_group=checkpoint_group(timeout=30)) as store:
            store.save({"w": torch.ones(3), "phase": Phase.WARMUP}, step=1)
            more = {"w": torch.zeros(3), "extra": torch.zeros(2), "phase": None}
            out["strict"] = outcome(lambda: store.load(more, classes=[Phase]))
            out["relaxed"] = outcome(lambda: store.load(more, strict=False, classes=[Phase]))
            out["values"] = [more["w"].tolist(), more["extra"].tolist(), more["phase"] is Phase.WARMUP]
            out["no_classes"] = outcome(lambda: store.load({"w": torch.zeros(3), "phase": None}))
            out["map_location"] = outcome(lambda: store.load({"w": torch.zeros(3)}, map_location="cpu"))
            out["unverified"] = outcome(lambda: store.load({"w": torch.zeros(3)}, verify=False))
            out["missing_step"] = outcome(lambda: store.load({"w": torch.zeros(3)}, step=7))
            out["bad_tags"] = outcome(lambda: store.save({"w": torch.ones(3)}, step=2, tags=5))  # TypeError in the checks
        dist.destroy_process_group()
        print(json.dumps(out))
    """
    done = run_python(code, str(store_path), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["strict"].startswith("StateError: extra: extra: the checkpoint has no such key")
    assert out["relaxed"] == "ok" and out["values"] == [[1.0, 1.0, 1.0], [0.0, 0.0], True]
    assert out["no_classes"].startswith("StateError: phase: ") and "Phase" in out["no_classes"]
    assert out["map_location"].startswith("InvalidArgumentError") and out["unverified"].startswith("InvalidArgumentError")
    assert out["missing_step"].startswith("CheckpointNotFoundError")
    assert out["bad_tags"].startswith("InvalidArgumentError") and "TypeError" in out["bad_tags"]
