"""Multi-rank saves and loads on real gloo process groups (one OS process per rank, 127.0.0.1).

One 2-rank run saves an FSDP2-sharded model and Adam state (``dcp.save``),
then again with ``dcp.async_save``, then a DDP-style replicated state; a
4-rank run loads both sharded checkpoints (2 -> 4 resharding) and saves its
own; this process loads the 2-rank and the 4-rank checkpoints into a plain
model (N -> 1). Every load is compared bitwise with the full state the saving
ranks had. A 3-rank run has one rank SIGKILLed mid-save.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import ckstore
from ckstore.distributed import StoreReader
from conftest import PYTHON, REPO_ROOT, assert_same, subprocess_env

WORKER = str(REPO_ROOT / "tests" / "distributed_worker.py")


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(scenario: str, world: int, store: Path, out: Path, env: dict | None = None) -> subprocess.Popen:
    """One launcher process that forks ``world`` ranks; their pids appear in OUT/pid-<rank>."""
    environ = {**subprocess_env(), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([PYTHON, WORKER, scenario, str(world), _port(), str(store), str(out)], env=environ, stderr=subprocess.PIPE, text=True)


def _status(out: Path) -> dict[str, str]:
    return json.loads((out / "status.json").read_text())


def _run(scenario: str, world: int, store: Path, out: Path, timeout: float = 240) -> None:
    _run_env(scenario, world, store, out, None, timeout)


def _run_env(scenario: str, world: int, store: Path, out: Path, env: dict | None, timeout: float = 240) -> None:
    proc = _launch(scenario, world, store, out, env)
    try:
        err = proc.communicate(timeout=timeout)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            for rank in range(world):
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int((out / f"pid-{rank}").read_text()), signal.SIGKILL)
    assert proc.returncode == 0, f"{scenario}: ranks {_status(out) if (out / 'status.json').exists() else '?'}:\n{err[-4000:]}"


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)


def kill_victim_and_wait(proc: subprocess.Popen, out: Path, sig: int, outcomes: list[Path], *, limit: float, settle: float = 0.0) -> float:
    """Send ``sig`` to the rank that wrote its pid to ``victim-ready``; wait for every survivor's outcome file.

    Returns the seconds from the signal to the last outcome. The victim is always SIGKILLed in the end (a frozen
    one is only stopped) and the launcher reaped.
    """
    victim = None
    try:
        _wait_for(out / "victim-ready", proc)
        time.sleep(settle)
        victim = int((out / "victim-ready").read_text())
        os.kill(victim, sig)
        killed = time.monotonic()
        while not all(path.exists() for path in outcomes):
            assert time.monotonic() < killed + limit, "the survivors never finished"
            time.sleep(0.05)
        return time.monotonic() - killed
    finally:
        if victim is not None:
            with contextlib.suppress(OSError):
                os.kill(victim, signal.SIGKILL)  # a frozen victim is only stopped
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=60)
        if proc.poll() is None:
            proc.kill()


def _plain_load(store_path: Path, step: int) -> dict:
    """N -> 1: a plain (unsharded) model and optimizer in this process, loaded through DCP's planner."""
    torch.manual_seed(321)
    model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.ReLU(), torch.nn.Linear(12, 6))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        with ckstore.Store(store_path, readonly=True) as store:
            dcp.load(state, storage_reader=StoreReader(store, step=step))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    store, out = root / "store", root / "out"
    out.mkdir()
    _run("save", 2, store, out)
    return store, out


def test_two_ranks_commit_sharded_async_and_replicated_checkpoints(saved):
    store_path, out = saved
    with ckstore.Store(store_path, readonly=True) as store:
        infos = {i.step: i for i in store.checkpoints()}
        assert sorted(infos) == [1, 2, 3, 4]
        assert infos[1].metrics == {"loss": 1.0} and tuple(infos[1].tags) == ("first",)
        for step in infos:
            assert store.verify(step) == []
    assert not os.listdir(store_path / ".staging")
    sharded = sorted(p.name for p in (store_path / "checkpoints" / "step-00000001").iterdir())
    assert sharded == ["manifest.json", "rank-00000.safetensors", "rank-00001.safetensors"]  # each rank wrote its shards
    # Replicated (DDP) state is written once, not once per rank.
    replicated = torch.load(out / "ref-3.pt", weights_only=True)
    payload = sum(t.numel() * t.element_size() for t in replicated.values())
    manifest = json.loads((store_path / "checkpoints" / "step-00000003" / "manifest.json").read_bytes())
    chunk_bytes = sum(c["storage"]["length"] for t in json.loads(manifest["state"]["dcp_metadata"])["tensors"].values() for c in t["chunks"])
    assert chunk_bytes == payload
    with ckstore.Store(store_path, readonly=True) as store:
        target = {"ddp": {k: torch.zeros_like(v) for k, v in replicated.items()}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(target, storage_reader=StoreReader(store, step=3))
    assert_same(target["ddp"], replicated)


def test_per_rank_values_come_back_to_their_own_rank(saved):
    _, out = saved
    got = [json.loads((out / f"per-rank-{r}.json").read_text()) for r in (0, 1)]
    assert got == [{"rng_equal": True, "position": 1000}, {"rng_equal": True, "position": 1001}]


def test_two_rank_checkpoints_load_into_one_process_bitwise(saved):
    store_path, out = saved
    for step in (1, 2):  # step 2 was written by async_save while training went on
        assert_same(_plain_load(store_path, step), torch.load(out / f"ref-{step}.pt", weights_only=True))


def test_four_ranks_reshard_the_two_rank_checkpoints_and_save_their_own(saved):
    store_path, out = saved
    _run("load", 4, store_path, out)
    for step in (1, 2):
        assert_same(torch.load(out / f"loaded-{step}-at-4.pt", weights_only=True), torch.load(out / f"ref-{step}.pt", weights_only=True))
    # The 4-rank save of what was loaded (step 2's state): 4 shard files, and 4 -> 1 gives step 2's state back.
    names = sorted(p.name for p in (store_path / "checkpoints" / "step-00000010").iterdir())
    assert names == ["manifest.json"] + [f"rank-0000{r}.safetensors" for r in range(4)]
    assert_same(_plain_load(store_path, 10), torch.load(out / "ref-2.pt", weights_only=True))


GROUP_TIMEOUT_S = 8


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_a_rank_lost_mid_save_commits_nothing_and_survivors_fail_within_the_group_timeout(tmp_path, sig):
    """SIGKILL: gloo sees the closed connection (well under a second). SIGSTOP: a rank that hangs
    (or a node whose connections never close) is bounded by checkpoint_group's timeout."""
    store_path, out = tmp_path / "store", tmp_path / "out"
    out.mkdir()
    proc = _launch("kill", 3, store_path, out, env={"CKSTORE_TEST_GROUP_TIMEOUT": str(GROUP_TIMEOUT_S)})
    waited = kill_victim_and_wait(proc, out, sig, [out / f"outcome-{r}.json" for r in (0, 1)], limit=GROUP_TIMEOUT_S + 60, settle=0.2)
    outcomes = [json.loads((out / f"outcome-{r}.json").read_text()) for r in (0, 1)]
    for outcome in outcomes:
        assert outcome["error"] is not None, outcome  # the survivors' save failed, it did not claim success
    assert waited < GROUP_TIMEOUT_S + 15, f"survivors took {waited:.1f}s after the kill"
    print(f"survivors failed {waited:.1f}s after the kill:", [(o["error"], round(o["seconds"], 1)) for o in outcomes])
    with ckstore.Store(store_path, readonly=True) as store:
        assert store.checkpoints() == []  # no committed partial checkpoint
    assert os.listdir(store_path / ".staging")  # the uncommitted shards sit in staging, invisible...
    with ckstore.Store(store_path) as store:
        store.recover()  # ...until the next writer recovers the store
    assert os.listdir(store_path / ".staging") == []


def test_sigterm_to_one_rank_saves_the_same_step_on_all_and_resume_agrees_on_one_that_verifies(tmp_path):
    store_path, out = tmp_path / "store", tmp_path / "out"
    out.mkdir()
    proc = _launch("preempt", 2, store_path, out)
    try:
        _wait_for(out / "at-step-5", proc)
        os.kill(int((out / "at-step-5").read_text()), signal.SIGTERM)  # one rank only, as a scheduler preempting one node would
        err = proc.communicate(timeout=180)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (_status(out), err[-3000:])
    done = [json.loads((out / f"preempt-{r}.json").read_text()) for r in (0, 1)]
    assert done[0]["step"] == done[1]["step"] >= 5, done
    assert (done[0]["signalled"], done[1]["signalled"]) == (False, True)
    print("median should_stop() all-reduce at 2 ranks (s):", [d["flag_cost_s"] for d in done])
    stopped = done[0]["step"]
    with ckstore.Store(store_path, readonly=True) as store:
        steps = [i.step for i in store.checkpoints()]
    assert steps[-1] == stopped and (stopped - 1 in steps or stopped - 2 in steps)
    # The newest checkpoint's second shard is damaged: rank 1 (which verifies it) refuses it, rank 0 would not.
    from conftest import flip_byte

    flip_byte(store_path / "checkpoints" / f"step-{stopped:08d}" / "rank-00001.safetensors", -2)
    _run("resume", 2, store_path, out)
    agreed = [json.loads((out / f"resume-{r}.json").read_text())["step"] for r in (0, 1)]
    assert agreed == [steps[-2], steps[-2]]


def test_a_two_rank_run_killed_after_a_save_resumes_bitwise_equal_to_an_uninterrupted_one(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _run_env("train", 2, tmp_path / "straight", out, {"CKSTORE_TEST_STEPS": "6", "CKSTORE_TEST_FINAL": "straight.pt"})
    proc = _launch("train", 2, tmp_path / "store", out, env={"CKSTORE_TEST_STEPS": "6", "CKSTORE_TEST_SAVE_AT": "3", "CKSTORE_TEST_FINAL": "never.pt"})
    proc.communicate(timeout=240)
    assert _status(out) == {"0": f"signal {int(signal.SIGKILL)}", "1": f"signal {int(signal.SIGKILL)}"}  # both died a step after the save
    _run_env("train", 2, tmp_path / "store", out, {"CKSTORE_TEST_STEPS": "6", "CKSTORE_TEST_SAVE_AT": "3", "CKSTORE_TEST_RESUME": "1", "CKSTORE_TEST_FINAL": "resumed.pt"})
    assert_same(torch.load(out / "resumed.pt", weights_only=True), torch.load(out / "straight.pt", weights_only=True))
