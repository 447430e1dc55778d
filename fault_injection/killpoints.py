"""Tier 1: SIGKILL at every operation boundary, and at random moments inside large writes.

For each workload a dry run counts the hook events (two per operation:
before and after). Then for every event ``n`` a forked child runs the
workload on a fresh copy of the prepared store and kills itself with SIGKILL
at event ``n``, so every boundary between operations is a crash point. The
parent checks the invariants on the real directory the child left.

A kill never loses what already reached the page cache, so this tier cannot
see a missing fsync (the model and power-cut tiers can); it sees ordering
bugs inside the process, partial cleanups and recovery bugs.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import time
from typing import Any

import ckstore

from . import _child
from .invariants import COMPLETES, check_store, write_base
from .report import Row
from .workloads import WORKLOADS, Workload, expected_state


def prepare_template(workload: Workload, workdir: str) -> tuple[str, list[int]]:
    """Build the workload's starting store once; return its parent directory and steps."""
    template = os.path.join(workdir, f"template-{workload.name}-{workload.scale}")
    shutil.rmtree(template, ignore_errors=True)
    os.makedirs(template)
    root = os.path.join(template, "store")
    if workload.prepare is not None:
        workload.prepare(root, workload.scale)
    # base.json beside the store: the oracle's record of what exists before the window (steps, metrics, tags)
    return template, write_base(root)


def fresh_copy(template: str, workdir: str, name: str) -> str:
    """A copy of the template directory; returns the store root inside it."""
    target = os.path.join(workdir, name)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(template, target, symlinks=True)
    return os.path.join(target, "store")


def _describe_events(workload: Workload, template: str, workdir: str) -> list[str]:
    # The hook runs in the child; the descriptions come back through a file.
    log = os.path.join(workdir, f"events-{workload.name}.txt")
    root = fresh_copy(template, workdir, "dry-run")

    def hook(op: str, phase: str, path: str, info: dict[str, Any]) -> None:
        with open(log, "a") as fh:
            fh.write(f"{phase} {op} [{info.get('site')}]\n")

    if os.path.exists(log):
        os.unlink(log)
    result = _child.fork_workload(workload, root, hook=hook)
    if not result.ok:
        raise RuntimeError(f"{workload.name}: dry run failed: {result.error or result.status}")
    with open(log) as fh:
        events = fh.read().splitlines()
    if len(events) != result.events:
        raise RuntimeError(f"{workload.name}: dry run counted {result.events} events but logged {len(events)}")
    return events


def outcome_digest(root: str) -> str:
    """A digest of what a cycle left on disk, blind to what differs between identical runs.

    Random name suffixes (staging, trash and temp names) are normalised, and
    the lock-owner file (pid, host, time) is skipped, so two cycles that left
    the same store get the same digest: the "distinct outcomes" count.
    """
    h = hashlib.blake2b(digest_size=16)
    for dirpath, dirnames, names in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        h.update(_RANDOM.sub("*", rel).encode() + b"\0D")
        for name in sorted(_RANDOM.sub("*", n) + "\0" + n for n in names):
            shown, real = name.split("\0")
            h.update(shown.encode() + b"\0F")
            if real.startswith(".ckstore.lock"):
                continue
            path = os.path.join(dirpath, real)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as fh:
                    data = fh.read()
                if real.endswith(".json") or ".json.tmp-" in real:
                    data = _TIMES.sub(b"#", data)  # creation and tag times differ from run to run
                h.update(hashlib.blake2b(data, digest_size=16).digest())
    return h.hexdigest()


_TIMES = re.compile(rb"\d{9,}\.\d+")
_RANDOM = re.compile(r"(\.[0-9a-f]{8}$|tmp-[0-9a-f]{12}|\.[0-9a-f]{8}(?=/))")


def run_boundaries(workload: Workload, workdir: str, *, stride: int = 1, stop_on_violation: bool = False) -> Row:
    """Kill ``workload`` at every ``stride``-th event boundary (stride 1: all of them).

    The dry run only counts the events; each kill's label comes from the killed
    run's own trace (the child reports the event it dies at), since threads may
    interleave differently from one run to the next.
    """
    row = Row("1 kill points", workload.name)
    start = time.monotonic()
    template, base_steps = prepare_template(workload, workdir)
    try:
        events = _describe_events(workload, template, workdir)
    except RuntimeError as exc:
        row.violation(f"{COMPLETES}: {exc}")
        row.seconds = time.monotonic() - start
        row.note = "the run fails without a fault"
        return row
    covered = short = 0
    outcomes: set[str] = set()
    relabelled = 0
    for n in range(1, len(events) + 2):  # len+1: the run that finishes un-killed
        if stop_on_violation and row.violations:
            break
        if stride > 1 and n % stride and n <= len(events):
            continue
        root = fresh_copy(template, workdir, "cycle")
        # n == len+1 is the run that must finish: never killed (kill_at=0). A racing workload may take
        # more operations than its dry run, and a kill at "len+1" then failed it ("failed without a kill: 9").
        result = _child.fork_workload(workload, root, kill_at=n if n <= len(events) else 0)
        row.cycles += 1
        where = result.killed_at or (events[n - 1] if n <= len(events) else "after the last operation")
        if result.killed_at and n <= len(events) and result.killed_at != events[n - 1]:
            relabelled += 1
        if n <= len(events) and not result.killed and not result.ok:
            row.violation(f"{COMPLETES}: the run failed before kill point {n} ({where}): {result.error or result.status}")
            continue
        if n <= len(events) and result.ok:
            short += 1  # a racing workload took fewer operations this time: it finished before event n
        if n > len(events) and not result.ok:
            row.violation(f"{COMPLETES}: workload failed without a kill: {result.error or result.status}")
            continue
        covered += 1
        outcomes.add(outcome_digest(root))
        for message in check_store(root, workload, result.acks, base_steps, quiescent=result.ok):
            row.violation(f"kill at event {n} ({where}): {message}")
    row.seconds = time.monotonic() - start
    row.states = len(outcomes)
    span = f"{covered}/{len(events) + 1} boundaries" if stride == 1 else f"every {stride}th of {len(events) + 1} boundaries"
    row.note = (
        f"{span}; {len(outcomes)} distinct outcomes; labels from the killed run ({relabelled} differ from the dry run)"
        + (f"; {short} runs finished before their kill point (a race took fewer operations)" if short else "")
    )
    return row


def run_random_large(workdir: str, *, cycles: int, scale: int, seed: int) -> Row:
    """Kill a save of a large state at random moments (inside multi-megabyte writes)."""
    base = WORKLOADS["next_save"]
    workload = Workload("large_write", base.run, base.prepare, scale=scale)
    row = Row("1 kill points", f"large_write ({expected_state_mb(scale):.0f} MB/save)")
    start = time.monotonic()
    rng = random.Random(seed)
    template, base_steps = prepare_template(workload, workdir)
    t0 = time.monotonic()
    dry = _child.fork_workload(workload, fresh_copy(template, workdir, "cycle"))
    span = time.monotonic() - t0
    if not dry.ok:
        raise RuntimeError(f"large_write dry run failed: {dry.error}")
    inside = 0
    for _ in range(cycles):
        root = fresh_copy(template, workdir, "cycle")
        delay = rng.uniform(0.0, span)

        def wait(pid: int, delay: float = delay) -> None:
            time.sleep(delay)
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        result = _child.fork_workload(workload, root, wait=wait)
        row.cycles += 1
        if result.killed and len(result.acks) < 2:
            inside += 1
        if not (result.killed or result.ok):
            row.violation(f"workload failed: {result.error or result.status}")
            continue
        for message in check_store(root, workload, result.acks, base_steps):
            row.violation(f"random kill at {delay * 1000:.0f} ms: {message}")
    row.seconds = time.monotonic() - start
    row.note = f"{inside} kills before the last save returned"
    return row


def expected_state_mb(scale: int) -> float:
    state = expected_state(0, scale)
    total = sum(t.numel() * t.element_size() for t in state["model"].values()) + state["optimizer"]["state"]["momentum"].numel() * 4
    return total / 1e6


def run_tier(workdir: str, *, workloads: list[str], stride: int, random_cycles: int, random_scale: int, seed: int) -> list[Row]:
    rows = [run_boundaries(WORKLOADS[name], workdir, stride=stride) for name in workloads]
    if random_cycles:
        rows.append(run_random_large(workdir, cycles=random_cycles, scale=random_scale, seed=seed))
    return rows
