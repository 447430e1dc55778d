"""SIGKILL a saving process at random moments, hundreds of times; the store must always open, verify and load.

A "zygote" subprocess imports torch and ckstore once, then forks one writer per
cycle (so a cycle costs a fork, not a 4-second interpreter start). Each writer
opens the store (recovering what the previous kill left), prints ``ready``,
and saves checkpoints of 1.5 MiB in a loop with retention, printing ``ack <step>``
(flushed) after each ``save`` returns. Writers alternate between blocking,
background (``blocking=False``, acknowledged after ``result()``) and incremental
(hard-linking) saves. The test SIGKILLs the writer after a
random delay, so kills land in recovery, mid-write, mid-fsync, at the commit
rename, in tag updates and mid-retention. After every kill it checks:

* a writable open succeeds and leaves no staging, trash or temp leftovers;
* ``latest()`` exists, verifies and loads with the right contents;
* every acknowledged checkpoint that retention must keep is present and verifies
  (and the pinned tag points at a present checkpoint);
* every checkpoint present verifies (no partial checkpoint ever becomes visible).
"""

from __future__ import annotations

import os
import random
import select
import shutil
import signal
import subprocess
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, subprocess_env

import ckstore

KILLS = int(os.environ.get("CKSTORE_KILLS", "200"))
KEEP_LAST = 3
KEEP_EVERY = 100
NUMEL = 128 * 1024  # 512 KiB per tensor, 3 tensors + a frozen one: about 1.6 MiB per checkpoint
#: Writers alternate: plain blocking saves, background saves (acknowledged when ``result()`` returns),
#: and incremental saves (unchanged files hard-linked from the previous checkpoint).
MODES = ("blocking", "async", "incremental")

ZYGOTE = r"""
import os, sys, signal
import torch, ckstore
torch.set_num_threads(1)
KEEP_LAST, KEEP_EVERY, NUMEL = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
path = sys.argv[1]

def say(text):
    os.write(1, (text + "\n").encode())  # one write(2): a line is never torn by the kill

FROZEN = torch.ones(NUMEL // 4)  # unchanged from save to save: hard-linked by incremental saves

def writer(mode):
    try:
        with ckstore.Store(path, keep_last=KEEP_LAST, keep_every=KEEP_EVERY, keep_best=1, metric="loss",
                           incremental=(mode == "incremental")) as store:
            latest = store.latest()
            step = latest.step + 1 if latest is not None else 0
            say("ready")
            while True:
                state = {
                    "model": {"w": torch.full((NUMEL,), float(step)), "b": torch.arange(NUMEL, dtype=torch.int32) + step},
                    "optimizer": {"state": {0: {"m": torch.full((NUMEL,), -float(step))}}, "lr": 0.1},
                    "frozen": FROZEN,
                    "step": step,
                }
                tags = ["milestone"] if step % 10 == 3 else ()
                metrics = {"loss": 1.0 / (1 + step % 13)}
                if mode == "async":  # acknowledged once the background save is durable
                    store.save(state, step=step, metrics=metrics, tags=tags, blocking=False).result()
                else:
                    store.save(state, step=step, metrics=metrics, tags=tags)
                say(f"ack {step}")
                step += 1
    except BaseException as exc:
        say(f"error {type(exc).__name__}: {exc}")
        raise

say("zygote")
for line in sys.stdin:
    command = line.split()
    if not command or command[0] != "fork":
        break
    pid = os.fork()
    if pid == 0:
        try:
            writer(command[1])
        finally:
            os._exit(3)
    say(f"pid {pid}")
    _, status = os.waitpid(pid, 0)
    say(f"reaped {status}")
"""


class _Lines:
    def __init__(self, stream):
        self.fd = stream.fileno()
        self.buffer = b""

    def next(self, timeout: float) -> str | None:
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise AssertionError("zygote process died")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


def _leftovers(root) -> list[str]:
    out = [f".staging/{n}" for n in os.listdir(root / ".staging")] + [f".trash/{n}" for n in os.listdir(root / ".trash")]
    return out + [n for n in os.listdir(root) if ".tmp-" in n]


def _check_contents(state, step):
    assert state["step"] == step
    assert torch.equal(state["frozen"], torch.ones(NUMEL // 4))
    assert torch.equal(state["model"]["w"], torch.full((NUMEL,), float(step)))
    assert torch.equal(state["model"]["b"], torch.arange(NUMEL, dtype=torch.int32) + step)
    assert torch.equal(state["optimizer"]["state"][0]["m"], torch.full((NUMEL,), -float(step)))


@pytest.fixture
def kill_root(tmp_path):
    """Where the killed writer's store lives: /dev/shm (tmpfs) when available, else ``tmp_path``.

    A SIGKILL leaves the page cache intact, so what this test can observe does
    not depend on fsync reaching a disk (power loss is the fault-injection
    harness's power-cut tier). On tmpfs each cycle is several times faster on a
    busy CI disk, so the same time budget buys more kills at more diverse points.
    Set ``CKSTORE_KILL_DIR`` to run on another filesystem.
    """
    base = os.environ.get("CKSTORE_KILL_DIR") or ("/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    if base is None:
        yield tmp_path / "store"
        return
    directory = tempfile.mkdtemp(prefix="ckstore-kill-", dir=base)
    try:
        yield Path(directory) / "store"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.guarantee("G2", "G9", "G13")
def test_sigkill_at_random_moments(kill_root):
    root = kill_root
    rng = random.Random(int(os.environ.get("CKSTORE_KILL_SEED", "20251125")))
    zygote = subprocess.Popen(
        [PYTHON, "-c", ZYGOTE, str(root), str(KEEP_LAST), str(KEEP_EVERY), str(NUMEL)],
        env=subprocess_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    lines = _Lines(zygote.stdout)
    acked: list[int] = []
    tagged: set[int] = set()
    verified: set[int] = set()
    stats = {"kills": 0, "staging_left": 0, "trash_left": 0, "temp_left": 0, "acks": 0}
    try:
        assert lines.next(300) == "zygote", zygote.stderr.read().decode() if zygote.poll() is not None else "no zygote"
        for cycle in range(KILLS):
            mode = MODES[cycle % len(MODES)]
            zygote.stdin.write(f"fork {mode}\n".encode())
            zygote.stdin.flush()
            pid, ready_seen = None, False
            while pid is None:  # the child's "ready" may overtake the zygote's "pid" line
                line = lines.next(60)
                assert line is not None, "zygote stopped answering"
                if line.startswith("error"):
                    pytest.fail(f"cycle {cycle}: writer failed: {line}")
                ready_seen |= line == "ready"
                if line.startswith("pid "):
                    pid = int(line.split()[1])
            # Mostly kill soon after "ready" (mid first save); sometimes before it (in recovery), sometimes late (mid-retention).
            when = rng.random()
            if when < 0.15:
                delay = rng.uniform(0, 0.02)
            else:
                if not ready_seen:
                    ready = lines.next(60)
                    if ready is not None and ready.startswith("error"):
                        pytest.fail(f"cycle {cycle}: writer failed: {ready}")
                    assert ready == "ready", ready
                delay = rng.uniform(0, 0.06) if when < 0.6 else rng.uniform(0.06, 0.3)
            if delay:
                select.select([], [], [], delay)
            os.kill(pid, signal.SIGKILL)
            stats["kills"] += 1
            while True:
                line = lines.next(60)
                assert line is not None, "zygote stopped answering"
                if line.startswith("ack "):
                    step = int(line.split()[1])
                    acked.append(step)
                    stats["acks"] += 1
                    if step % 10 == 3:
                        tagged.add(step)
                elif line.startswith("error"):
                    pytest.fail(f"cycle {cycle}: writer failed: {line}")
                elif line.startswith("reaped"):
                    status = int(line.split()[1])
                    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"writer exited by itself: {status}"
                    break
            if not root.exists():
                continue  # killed before the store directory was even created
            leftovers = _leftovers(root) if (root / ".staging").exists() and (root / ".trash").exists() else []
            stats["staging_left"] += any(x.startswith(".staging/") for x in leftovers)
            stats["trash_left"] += any(x.startswith(".trash/") for x in leftovers)
            stats["temp_left"] += any(".tmp-" in x for x in leftovers)
            _check_store(root, acked, tagged, cycle, verified)
    finally:
        if zygote.poll() is None:
            zygote.stdin.close()
            try:
                zygote.wait(timeout=30)
            except subprocess.TimeoutExpired:
                zygote.kill()
                zygote.wait()
        zygote.stdout.close()
        zygote.stderr.close()
    print(f"SIGKILL stats: {stats}, last step {max(acked, default=None)}")
    with ckstore.Store(root, readonly=True) as store:
        assert store.verify() == []
    assert stats["kills"] >= KILLS
    assert len(acked) > KILLS // 4, f"too few saves acknowledged to be meaningful: {stats}"
    assert stats["staging_left"] > 0, f"no kill ever landed mid-save: {stats}"


def _check_store(root, acked, tagged, cycle, verified):
    where = f"after kill #{cycle}"
    with ckstore.Store(root) as store:
        store.recover()  # what the next write would do first
        assert _leftovers(root) == [], f"{where}: leftovers {_leftovers(root)}"
        infos = store.checkpoints()
        present = {i.step for i in infos}
        if acked:
            latest = store.latest()
            assert latest is not None, where
            assert latest.step >= acked[-1], f"{where}: latest {latest.step} older than the last acknowledged {acked[-1]}"
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # load() falling back to an older checkpoint would warn
                _check_contents(store.load(), latest.step)  # verifies every file's hash as it reads
            verified.add(latest.step)
        # Acknowledged checkpoints that retention must keep are all there.
        # keep_last may only drop an acknowledged step once KEEP_LAST newer ones exist (and newer ones are
        # only ever dropped in favour of yet newer ones), and multiples of KEEP_EVERY are never dropped.
        must_keep = {s for s in acked if sum(p > s for p in present) < KEEP_LAST or s % KEEP_EVERY == 0}
        if tagged:
            # The tag moves to each newer milestone (possibly one committed but not acknowledged yet); it pins it.
            holder = store.resolve("milestone").step
            assert holder >= max(tagged) and holder % 10 == 3 and holder in present, f"{where}: milestone tag at {holder}"
        missing = sorted(must_keep - present)
        assert not missing, f"{where}: acknowledged checkpoints lost: {missing}; present {sorted(present)} acked {acked} tags {[(i.step, i.tags) for i in infos]} metrics {[(i.step, dict(i.metrics)) for i in infos]}"
        # Whatever is present is whole: every file verifies. A committed checkpoint is immutable, so one
        # verified after an earlier kill needs no second look (the final check verifies everything again).
        for step in sorted(present - verified):
            problems = store.verify(step)
            assert problems == [], f"{where}: {problems}"
            verified.add(step)
