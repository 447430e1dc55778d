"""Kill ranks of a multi-rank save at every durable-operation boundary; check the store after each.

    python -m fault_injection.distributed [--world 2] [--api dcp|store|store_async] [--json]

A parent process imports torch and ckstore once, then for each kill point
forks ``world`` ranks (fork keeps each run under a second; a fresh
interpreter per rank costs seconds). The ranks form a gloo group on
127.0.0.1 and save, once, a state in which each rank owns its own tensors
and all share a replicated one (``--api``): ``dcp.save`` through
``StoreWriter``; or ``Store(path, process_group=pg).save`` on a
``checkpoint_group`` (its agree step, error broadcast and coordinator
cleanup around the same StoreWriter), blocking or ``blocking=False`` then
``Store.wait()``. The
victim installs a ``ckstore.storage.durable`` hook that SIGKILLs it just
before its k-th durable operation (create, write, fsync, close, mkdir,
rename, directory fsync). Victims, for k = 1, 2, … until a run completes
without firing:

* ``rank1``: a non-coordinator rank (its shard file: create, write, fsync, close);
* ``coordinator``: rank 0, through its own shard and the whole commit
  (staging mkdir, manifest, directory fsyncs, the rename, retention);
* ``all``: rank 0's hook kills every rank at once.

Invariants after each run (the parent opens the store read-only):

1. the store lists no checkpoint or exactly step 1, never anything partial;
2. a listed step 1 verifies, and loads (N -> 1, in the parent) bitwise equal to what the ranks saved;
3. if any rank's save returned, step 1 is listed (an acknowledged save is never lost);
4. after recovery by a new writer, ``.staging/`` is empty;
5. every rank the kill spared returned or raised within ``SURVIVOR_BOUND_S`` of the kill, never hung; through
   ``Store(process_group=)``, a ckstore error (DistributedError, AsyncSaveError), not a raw gloo one.

``--crash-model`` instead runs the crash-state model of ``fault_injection/crashmodel.py``
(every on-disk state POSIX allows at every crash point, power cuts included)
on a save whose ranks are logical: DCP's save protocol driven for each rank in
one process (:func:`save_ranks_in_process`), in the order the gather enforces.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from typing import Any

import torch

torch.set_num_threads(1)  # before any fork: a forked child must not inherit a started OpenMP pool

import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402

import ckstore  # noqa: E402
from ckstore.distributed import StoreReader, StoreWriter, checkpoint_group  # noqa: E402
from ckstore.storage import durable  # noqa: E402
from fault_injection.invariants import COMPLETES  # noqa: E402
from fault_injection.killpoints import outcome_digest  # noqa: E402
from fault_injection.report import Row  # noqa: E402

VICTIMS = ("rank1", "coordinator", "all")
#: The save each run makes, by key: ``dcp.save`` through StoreWriter, and ``Store(path, process_group=pg).save``
#: (the same StoreWriter under the Store's agree step, error broadcast, coordinator cleanup), sync and in the background.
APIS = {"dcp": "dcp.save", "store": "Store.save", "store_async": "Store.save(blocking=False)"}
#: Seconds a run may take before the harness calls it hung (the ranks' group times out after 15).
HANG_S = 60
#: The timeout of the ``checkpoint_group`` a Store(process_group=) run saves on: a silent rank's bound.
GROUP_TIMEOUT_S = 10
#: Seconds from a rank's SIGKILL to a survivor's error past which the survivor counts as hanging: the group's
#: timeout (the documented bound for a rank that goes silent; gloo sees a killed one's closed socket far sooner).
SURVIVOR_BOUND_S = GROUP_TIMEOUT_S


def rank_state(rank: int) -> dict:
    gen = torch.Generator().manual_seed(rank)
    return {f"rank{rank}": {"w": torch.randn(64, 8, generator=gen), "b": torch.arange(8, dtype=torch.int64) + rank}, "shared": torch.linspace(0, 1, 33)}


def expected_state(world: int) -> dict:
    out: dict = {}
    for rank in range(world):
        out.update(rank_state(rank))
    return out


def _rank_main(rank: int, world: int, port: int, store: str, out: str, victim: str, k: int, pids_file: str, api: str = "dcp") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=15))
    group = checkpoint_group(timeout=GROUP_TIMEOUT_S) if api != "dcp" else None
    mine = (victim == "rank1" and rank == 1) or (victim in ("coordinator", "all") and rank == 0)
    if mine:
        seen = [0]

        def hook(op: str, phase: str, path: str, info: dict) -> None:
            if phase != "before":
                return
            seen[0] += 1
            if seen[0] == k:
                _record(out, "killed", {"rank": rank, "at": time.monotonic()})
                if victim == "all":
                    with open(pids_file) as f:
                        pids = [int(p) for p in f.read().split()]
                    for pid in pids:
                        if pid != os.getpid():
                            os.kill(pid, signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)

        durable.set_hook(hook)
    try:
        with ckstore.Store(store, keep_last=1, process_group=group) as s:
            if api == "dcp":
                dcp.save(rank_state(rank), storage_writer=StoreWriter(s, step=1))
            else:
                info = s.save(rank_state(rank), step=1, blocking=api == "store")
                if api == "store_async":
                    info = s.wait()
                if getattr(info, "step", None) != 1:
                    raise AssertionError(f"Store.save returned {info!r}, not step 1's CheckpointInfo")
    except BaseException as exc:
        # When a survivor raised, and what: run_one bounds the time since the kill and wants a ckstore error.
        text = str(exc)
        message = text if len(text) <= 500 else f"{text[:300]} ... {text[-200:]}"  # the tail says what was committed
        error = {"rank": rank, "at": time.monotonic(), "type": type(exc).__name__, "message": message}
        _record(out, f"error-{rank}", {**error, "ckstore": isinstance(exc, ckstore.CkstoreError)})
        raise
    durable.set_hook(None)
    with open(os.path.join(out, f"ack-{rank}"), "w") as f:
        f.write("saved")


def _record(out: str, name: str, value: dict) -> None:
    with open(os.path.join(out, name + ".tmp"), "w") as f:
        json.dump(value, f)
    os.rename(os.path.join(out, name + ".tmp"), os.path.join(out, name))  # whole or absent, if the writer is killed


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(root: str, world: int, victim: str, k: int, api: str = "dcp") -> dict:
    store, out = os.path.join(root, f"{victim}-{k}", "store"), os.path.join(root, f"{victim}-{k}", "out")
    os.makedirs(out)
    pids_file = os.path.join(out, "pids")
    port = _port()
    pids = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _rank_main(rank, world, port, store, out, victim, k, pids_file, api)
                code = 0
            except BaseException:
                code = 3
            finally:
                os._exit(code)
        pids.append(pid)
    with open(pids_file + ".tmp", "w") as f:
        f.write(" ".join(map(str, pids)))
    os.rename(pids_file + ".tmp", pids_file)
    deadline = time.monotonic() + HANG_S
    codes = {}
    hung = False
    while len(codes) < world:
        for pid in pids:
            if pid in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = status
        if time.monotonic() > deadline:
            hung = True
            for pid in pids:
                if pid not in codes:
                    os.kill(pid, signal.SIGKILL)
                    codes[pid] = os.waitpid(pid, 0)[1]
            break
        time.sleep(0.02)
    killed = any(os.WIFSIGNALED(codes[p]) for p in pids)
    acked = sorted(int(name[4:]) for name in os.listdir(out) if name.startswith("ack-"))
    # What the kill left on disk, before check() recovers the store (killpoints' digest: random names normalised).
    outcome = outcome_digest(store) if os.path.isdir(store) else "no store"
    violations = check(store, world, acked)
    if hung:
        # A survivor must fail within the group's timeout (15 s here), never wait on a dead rank indefinitely.
        violations.insert(0, f"a rank was still running {HANG_S} s after the start; the harness killed it")
    committed = os.path.isdir(os.path.join(store, "checkpoints", "step-00000001"))
    fired = killed and not hung
    survivors = [rank for rank, pid in enumerate(pids) if not os.WIFSIGNALED(codes[pid])]
    raised_s, errors = None, []
    if fired and survivors:
        raised_s, problems = check_survivors(out, survivors, acked, typed=api != "dcp")
        violations.extend(problems)
        errors = [_read(out, f"error-{rank}") for rank in survivors if os.path.exists(os.path.join(out, f"error-{rank}"))]
    return {
        "victim": victim, "api": api, "k": k, "fired": fired, "acked": acked, "committed": committed,
        "violations": violations, "outcome": outcome, "survivor_raised_s": raised_s,
        # A survivor's error that says "nothing was committed" while step 1 is in checkpoints/ (not an invariant: reported)
        "survivor_denies_commit": committed and any("nothing was committed" in e["message"] for e in errors),
        "survivor_errors": errors,
    }


def _read(out: str, name: str) -> dict:
    with open(os.path.join(out, name)) as f:
        return json.load(f)


def check_survivors(out: str, survivors: list[int], acked: list[int], *, typed: bool) -> tuple[float | None, list[str]]:
    """Every rank a kill spared returned (acked) or raised within SURVIVOR_BOUND_S of the kill; with ``typed``, a ckstore error.

    Returns the slowest survivor's seconds from the kill to its error (None if every survivor returned) and the problems.
    """
    problems: list[str] = []
    try:
        killed_at = _read(out, "killed")["at"]
    except FileNotFoundError:
        return None, ["a rank died by a signal, but no victim recorded its kill"]
    slowest = None
    for rank in survivors:
        if rank in acked:
            continue
        try:
            error = _read(out, f"error-{rank}")
        except FileNotFoundError:
            problems.append(f"rank {rank} survived the kill but neither returned nor raised")
            continue
        waited = error["at"] - killed_at
        slowest = waited if slowest is None else max(slowest, waited)
        if waited > SURVIVOR_BOUND_S:
            problems.append(f"rank {rank} raised {waited:.1f} s after the kill, past the {SURVIVOR_BOUND_S} s bound: {error['type']}")
        if typed and not error["ckstore"]:
            problems.append(f"rank {rank} raised {error['type']}, not a ckstore error: {error['message'][:160]}")
    return slowest, problems


def check(store: str, world: int, acked: list[int]) -> list[str]:
    problems = []
    if not os.path.isdir(os.path.join(store, "checkpoints")):
        # Killed while the first write created the layout: no store yet, so nothing committed.
        return ["acknowledged save lost: no store"] if acked else []
    entries = sorted(os.listdir(os.path.join(store, "checkpoints")))
    if entries not in ([], ["step-00000001"]):
        problems.append(f"checkpoints/ holds {entries}")
    with ckstore.Store(store, readonly=True) as s, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steps = [i.step for i in s.checkpoints()]
        if entries and steps != [1]:
            # Readers skip it, but a directory in checkpoints/ that is not a whole checkpoint is a partial commit.
            problems.append(f"checkpoints/ holds {entries}, which is not a whole checkpoint: {[str(w.message)[:160] for w in caught][:1]}")
        if steps not in ([], [1]):
            problems.append(f"unexpected checkpoints {steps}")
        if acked and steps != [1]:
            problems.append(f"ranks {acked} were told the save succeeded, but the store lists {steps}")
        if steps == [1]:
            bad = s.verify(1)
            if bad:
                problems.append(f"step 1 committed but fails verification: {[p.message for p in bad][:2]}")
            else:
                target = {key: torch.zeros_like(v) if isinstance(v, torch.Tensor) else {n: torch.zeros_like(t) for n, t in v.items()} for key, v in expected_state(world).items()}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    dcp.load(target, storage_reader=StoreReader(s, step=1))
                expected = expected_state(world)
                for key, value in expected.items():
                    got = target[key]
                    pairs = [(got, value)] if isinstance(value, torch.Tensor) else [(got[n], value[n]) for n in value]
                    if not all(torch.equal(a, b) for a, b in pairs):
                        problems.append(f"step 1 loads different values for {key}")
    with ckstore.Store(store) as s:
        s.recover()
    leftovers = os.listdir(os.path.join(store, ".staging"))
    if leftovers:
        problems.append(f"staging not empty after recovery: {leftovers}")
    return problems


def run(world: int = 2, victims: tuple[str, ...] = VICTIMS, max_k: int = 60, api: str = "dcp") -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="ckstore-dist-kill-") as root:
        for victim in victims:
            for k in range(1, max_k + 1):
                row = run_one(root, world, victim, k, api)
                rows.append(row)
                if not row["fired"]:
                    break  # the victim finished before its k-th operation: every boundary was covered
    return rows


def run_kill_row(workdir: str, *, world: int, victim: str, stride: int = 1, max_k: int = 200, api: str = "dcp") -> Row:
    """The kill points of one victim as a row of the harness's table (``python -m fault_injection run``, tier ``distributed``).

    Kills before the victim's operation k = 1, 1 + stride, 1 + 2 stride, ... until a run goes through unkilled;
    that run must save on every rank and commit step 1. Cycles count every run (the unkilled one included),
    crash states the distinct on-disk outcomes the kills left.
    """
    row = Row("distributed", f"kill {victim}: {world}-rank {APIS[api]}")
    start = time.monotonic()
    root = tempfile.mkdtemp(prefix=f"dist-kill-{api}-{victim}-{world}-", dir=workdir)
    outcomes: set[str] = set()
    fired = committed = 0
    raised: list[float] = []
    denied = 0
    last: dict | None = None
    try:
        for k in range(1, max_k + 1, stride):
            last = run_one(root, world, victim, k, api)
            shutil.rmtree(os.path.join(root, f"{victim}-{k}"), ignore_errors=True)
            row.cycles += 1
            for message in last["violations"]:
                row.violation(f"{victim} killed before its durable operation {k}: {message}")
            if not last["fired"]:
                break
            fired += 1
            committed += last["committed"]
            if last["survivor_raised_s"] is not None:
                raised.append(last["survivor_raised_s"])
            denied += last["survivor_denies_commit"]
            outcomes.add(last["outcome"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if last is not None and last["fired"]:
        row.violation(f"{COMPLETES}: {victim} was killed in every run up to operation {max_k}; no run went through")
    elif last is not None and not (last["committed"] and last["acked"] == list(range(world))):
        row.violation(f"{COMPLETES}: the unkilled save acknowledged ranks {last['acked']} of {world}, committed: {last['committed']}")
    row.states = len(outcomes)
    row.seconds = time.monotonic() - start
    span = f"{fired} kill points" if stride == 1 else f"{fired} kill points (every {_ordinal(stride)} operation)"
    row.note = f"{span}; {committed} left step 1 committed; {len(outcomes)} distinct outcomes; the unkilled run saved on all {world} ranks"
    if raised:
        row.note += f"; survivors raised {min(raised):.2f}-{max(raised):.2f} s after the kill ({len(raised)} runs)"
    if denied:
        row.note += f"; in {denied} a survivor's error said 'nothing was committed' though step 1 was"
    return row


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


# ---------------------------------------------------------------- the crash model on a 2-rank save


def save_ranks_in_process(root: str, step: int, states: list[dict], **store_kwargs: Any) -> None:
    """DCP's save protocol for ``len(states)`` logical ranks in this process, in the order a real save runs it.

    Plan on every rank, global plan on the coordinator (rank 0), every rank's
    ``write_data`` (its shard file written and fsynced), then the
    coordinator's ``finish``: the operations come in an order the gather
    makes real (every rank's fsyncs before the coordinator's commit), so the
    crash model (``fault_injection/crashmodel.py``) can replay them as one trace.
    """
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    stores = [ckstore.Store(root, **store_kwargs) for _ in states]
    try:
        writers = [StoreWriter(store, step=step) for store in stores]
        planners = [DefaultSavePlanner() for _ in states]
        local = []
        for rank, (state, writer, planner) in enumerate(zip(states, writers, planners)):
            planner.set_up_planner(state_dict=state, storage_meta=writer.storage_meta(), is_coordinator=rank == 0)
            writer.set_up_storage_writer(rank == 0, rank=rank)
            local.append(writer.prepare_local_plan(planner.create_local_plan()))
        plans, metadata = planners[0].create_global_plan(local)
        plans = writers[0].prepare_global_plan(plans)
        results = []
        for plan, writer, planner in zip(plans, writers, planners):
            future = writer.write_data(planner.finish_plan(plan), planner)
            future.wait()
            results.append(future.value())
        writers[0].finish(metadata, results)
    finally:
        for store in stores:
            store.close()


def crash_workload(world: int = 2) -> Any:
    """A ``fault_injection.workloads.Workload``: steps 1 and 2 saved by ``world`` logical ranks (keep_last=1)."""
    from fault_injection.workloads import Workload, intent

    def state_at(step: int) -> list[dict]:
        return [{key: (v + step if isinstance(v, torch.Tensor) else {n: t + step for n, t in v.items()}) for key, v in rank_state(r).items()} for r in range(world)]

    def run(root: str, ack: Any, scale: int) -> None:
        for step in (1, 2):
            intent(ack, step)
            save_ranks_in_process(root, step, state_at(step), keep_last=1)  # the coordinator's policy, as the checker's
            ack("save", step)

    def check(store: ckstore.Store, acks: list) -> list[str]:
        out = []
        for info in store.checkpoints():
            expected: dict = {}
            for part in state_at(info.step):
                expected.update(part)
            target = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else {n: torch.zeros_like(t) for n, t in v.items()} for k, v in expected.items()}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    dcp.load(target, storage_reader=StoreReader(store, step=info.step), no_dist=True)
            except BaseException as exc:  # CheckpointException is a BaseException
                out.append(f"step {info.step} is listed but does not load through StoreReader: {str(exc)[-200:]}")
                continue
            for key, value in expected.items():
                pairs = [(target[key], value)] if isinstance(value, torch.Tensor) else [(target[key][n], value[n]) for n in value]
                if not all(torch.equal(a, b) for a, b in pairs):
                    out.append(f"step {info.step} loads different values for {key}")
        return out

    return Workload(f"dcp_{world}_ranks", run, None, {"keep_last": 1}, check=check, content=None, probe=False)


def run_crash_model(workdir: str, *, world: int = 2, seed: int = 0, random_subsets: int = 8) -> Any:
    """The crash model's every crash point of the ``world``-rank workload; returns its report Row."""
    from fault_injection.crashmodel import run_workload

    return run_workload(crash_workload(world), workdir, random_subsets=random_subsets, seed=seed)


def run_model_row(workdir: str, *, world: int = 2, seed: int = 0, random_subsets: int = 8) -> Row:
    """:func:`run_crash_model` as a row of the harness's table (tier ``distributed``)."""
    row = run_crash_model(workdir, world=world, seed=seed, random_subsets=random_subsets)
    row.tier, row.workload = "distributed", f"crash model: {world}-rank dcp.save x2"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--victims", nargs="+", default=list(VICTIMS), choices=VICTIMS)
    saves = ", ".join(f"{key} ({name})" for key, name in APIS.items())
    parser.add_argument("--api", choices=sorted(APIS), default="dcp", help=f"the save each run makes: {saves}")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--crash-model", action="store_true", help="run the crash-state model on an in-process save of --world logical ranks instead")
    args = parser.parse_args()
    if args.crash_model:
        with tempfile.TemporaryDirectory(prefix="ckstore-dist-model-") as workdir:
            row = run_crash_model(workdir, world=args.world)
        print(json.dumps({"states": row.states, "violations": row.violations, "note": row.note, "examples": row.examples[:5]}) if args.json else f"{row.states} crash states, {row.violations} violations ({row.note})")
        sys.exit(1 if row.violations else 0)
    started = time.perf_counter()
    rows = run(args.world, tuple(args.victims), api=args.api)
    violations = [r for r in rows if r["violations"]]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for victim in args.victims:
            mine = [r for r in rows if r["victim"] == victim]
            fired = [r for r in mine if r["fired"]]
            print(
                f"{victim:12s} kill points {len(fired):3d}  committed {sum(1 for r in fired if r['committed']):3d}  "
                f"acknowledged {sum(1 for r in fired if r['acked']):3d}  violations {sum(1 for r in mine if r['violations'])}"
            )
        print(f"{len(rows)} runs, {len(violations)} with violations, {time.perf_counter() - started:.1f} s")
        for r in violations:
            print(" ", r)
    sys.exit(1 if violations else 0)


if __name__ == "__main__":
    main()
