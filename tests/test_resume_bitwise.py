"""A run killed and resumed many times is bit-for-bit the uninterrupted run.

The trainer below runs in real child processes (``python this_file.py child
...``): CPU, ``torch.use_deterministic_algorithms(True)``, dropout, a shuffled
loader (``ckstore.ResumableSampler``), Adam, a StepLR scheduler, on
scikit-learn's breast-cancer data. The parent kills it with real signals:

* SIGKILL at random moments (random step counts plus random sub-step delays),
  once right after the child announces it is inside a save;
* SIGTERM at random moments: the child must finish the step, save it and exit
  with status 143;
* SIGKILL with a loader of 2 worker processes;
* SIGKILL with torchdata's ``StatefulDataLoader(shuffle=True, generator=g)``
  in the state instead of the sampler, with 0 and with 2 workers (torchdata
  alone replays the shuffle but not the worker-seed draw: with 0 workers
  every epoch after a mid-epoch resume was shuffled differently).

Every attempt appends ``step loss.hex()`` lines to a log; every logged loss
(including steps re-run after a kill) and the final parameters, optimizer,
scheduler, RNG and per-step loss tensor must equal the uninterrupted run's,
byte for byte.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve()
STEPS = 150
EVERY = 5
BATCH = 32
BATCHES_PER_EPOCH = 18  # 569 samples / 32, last batch partial


# ---------------------------------------------------------------- the child trainer


def _say(line: str) -> None:
    """One line in one write(2): print() writes the text and its newline separately."""
    os.write(1, (line + "\n").encode())


def child_main(argv: list[str]) -> None:
    import argparse

    import numpy as np
    import torch
    from sklearn.datasets import load_breast_cancer
    from torch.utils.data import DataLoader, TensorDataset

    import ckstore
    from ckstore.storage import durable as _durable

    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--announce-saves", action="store_true")
    parser.add_argument("--step-sleep", type=float, default=0.004)
    parser.add_argument("--async-saves", action="store_true")
    parser.add_argument("--loader", choices=["tracked", "stateful"], default="tracked")
    parser.add_argument("--die-mid-line", action="store_true")
    args = parser.parse_args(argv)
    if args.die_mid_line:
        # A SIGKILL between a line and its newline: what the parent's kills can hit.
        os.write(1, b"STEP 1")
        os.kill(os.getpid(), signal.SIGKILL)

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    features, labels = load_breast_cancer(return_X_y=True)
    features = (features - features.mean(0)) / features.std(0)
    dataset = TensorDataset(torch.tensor(features, dtype=torch.float32), torch.tensor(labels, dtype=torch.int64))

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=40, gamma=0.5)
    if args.loader == "stateful":
        import warnings

        from torchdata.stateful_dataloader import StatefulDataLoader

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchdata 0.11 warns about a deprecated torch.set_vital call
            loader = StatefulDataLoader(dataset, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(7), num_workers=args.workers)
        data: Any = loader

        def batches() -> Any:
            return loader
    else:
        sampler = ckstore.ResumableSampler(len(dataset), seed=7, shuffle=True)
        loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=args.workers)
        data = sampler

        def batches() -> Any:
            return sampler.track(loader)

    losses = torch.zeros(STEPS, dtype=torch.float32)
    state = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "data": data,
        "rng": ckstore.RNGState(),
        "losses": losses,
    }

    if args.announce_saves:
        announced = set()

        def hook(op: str, phase: str, path: str, info: dict[str, Any]) -> None:
            # The first file created in a staging directory: the save is under way.
            if op == "create" and phase == "after" and "/.staging/" in path:
                staging = path.split("/.staging/", 1)[1].split("/", 1)[0]
                if staging not in announced:
                    announced.add(staging)
                    _say("SAVING")
                    time.sleep(0.3)  # hold the save open so the parent's SIGKILL lands inside it

        _durable.set_hook(hook)

    log = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    # No lock_timeout: a restart right after a SIGKILL must get the writer lock
    # at once, even while the dead run's forked loader workers linger.
    with ckstore.Store(args.store, keep_last=2) as store:
        step = ckstore.resume(store, state)
        _say(f"START {step}")
        with ckstore.Checkpointer(store, state, every=EVERY, at_exit=True, blocking=not args.async_saves) as ckpt:
            while step < STEPS:
                for x, y in batches():
                    model.train()
                    optimizer.zero_grad()
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    losses[step] = loss.detach()
                    step += 1
                    os.write(log, f"{step} {float(loss.item()).hex()}\n".encode())
                    _say(f"STEP {step}")
                    time.sleep(args.step_sleep)
                    ckpt.step(step)
                    if step >= STEPS:
                        break
    os.close(log)
    _say("DONE")


# ---------------------------------------------------------------- the zygote

# Importing torch, scikit-learn and (through use_deterministic_algorithms)
# torch's compiler stack takes 10-20 s per interpreter on a loaded 2-core
# machine. A "zygote" process imports everything once and forks one real
# process per training attempt; the parent kills that process by pid and the
# zygote reports how it ended. Each attempt still starts from nothing but the
# store on disk.


def zygote_main() -> None:
    import json

    import numpy  # noqa: F401
    import sklearn.datasets  # noqa: F401
    import torch
    import torch.utils.data  # noqa: F401

    import ckstore  # noqa: F401

    torch.set_num_threads(1)  # no OpenMP pool before fork
    torch.use_deterministic_algorithms(True)
    _say("READY")
    pid = None
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "run":
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    child_main(command["argv"])
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            _say(f"PID {pid}")
        elif command["cmd"] == "wait":
            _, status = os.waitpid(pid, 0)
            _say(f"EXIT {os.waitstatus_to_exitcode(status)}")


class Zygote:
    def __init__(self, stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), "zygote"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env
        )
        assert self.read_until(lambda line: line == "READY") is not None, self.stderr()
        self.pid: int | None = None

    def stderr(self) -> str:
        return self.stderr_path.read_text()[-3000:]

    def _send(self, **command: Any) -> None:
        import json

        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def read_until(self, predicate, *, stop_at_done: bool = True) -> str | None:
        """Read output lines until ``predicate(line)``; None at EOF or (``stop_at_done``) when the trainer finished."""
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                return None
            line = line.strip()
            if predicate(line):
                return line
            if stop_at_done and line == "DONE":
                return None

    def start(self, store: Path, log: Path, *extra: str) -> None:
        self._send(cmd="run", argv=["--store", str(store), "--log", str(log), *extra])
        line = self.read_until(lambda line: line.startswith("PID "))
        assert line is not None, self.stderr()
        self.pid = int(line.split()[1])

    def kill(self, sig: int) -> None:
        assert self.pid is not None
        os.kill(self.pid, sig)

    def wait(self) -> int:
        """The trainer's exit status (negative: killed by that signal)."""
        self._send(cmd="wait")
        # "in", not startswith: the killed trainer's last line may lack its newline.
        line = self.read_until(lambda line: "EXIT " in line, stop_at_done=False)
        assert line is not None, self.stderr()
        self.pid = None
        return int(line.rsplit("EXIT ", 1)[1])

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self._stderr.close()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote") / "stderr")
    yield z
    z.close()


def _run_to_end(zygote: Zygote, store: Path, log: Path, *extra: str) -> None:
    zygote.start(store, log, *extra)
    status = zygote.wait()
    assert status == 0, f"trainer failed with {status}:\n{zygote.stderr()}"


def _last_logged_step(log: Path) -> int:
    steps = [s for s, _ in _logged(log)]
    return steps[-1] if steps else 0


def _logged(log: Path) -> list[tuple[int, str]]:
    out = []
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].startswith(("0x", "-0x")):
            out.append((int(parts[0]), parts[1]))
    return out


def _final_state(store_path: Path) -> Any:
    import ckstore

    with ckstore.Store(store_path, readonly=True) as store:
        latest = store.checkpoints()[-1]
        assert latest.step == STEPS
        return store.load(step=STEPS)


@pytest.fixture(scope="module")
def reference(zygote, tmp_path_factory) -> dict[str, Any]:
    """The uninterrupted run (no workers): its final state and its loss per step."""
    root = tmp_path_factory.mktemp("reference")
    _run_to_end(zygote, root / "store", root / "log")
    logged = _logged(root / "log")
    assert [s for s, _ in logged] == list(range(1, STEPS + 1))
    return {"state": _final_state(root / "store"), "losses": dict(logged)}


@pytest.fixture(scope="module")
def stateful_reference(zygote, tmp_path_factory) -> Any:
    """The uninterrupted run with a StatefulDataLoader(shuffle=True, generator=g), by number of workers.

    Per worker count: torchdata's multi-process iterator shuffles its first
    epoch twice (once more in ``_reset``), so its order differs from 0 workers.
    """
    made: dict[int, dict[str, Any]] = {}

    def get(workers: int) -> dict[str, Any]:
        if workers not in made:
            root = tmp_path_factory.mktemp(f"stateful-reference-{workers}")
            _run_to_end(zygote, root / "store", root / "log", "--loader", "stateful", "--workers", str(workers))
            logged = _logged(root / "log")
            assert [s for s, _ in logged] == list(range(1, STEPS + 1))
            made[workers] = {"state": _final_state(root / "store"), "losses": dict(logged)}
        return made[workers]

    return get


def _check_against(reference: dict[str, Any], store: Path, log: Path) -> None:
    logged = _logged(log)
    assert {s for s, _ in logged} == set(range(1, STEPS + 1))
    mismatched = [(s, v, reference["losses"][s]) for s, v in logged if reference["losses"][s] != v]
    assert not mismatched, f"re-run steps diverged from the uninterrupted run: {mismatched[:5]}"
    from conftest import assert_same  # bitwise: dtype, shape and bytes of every tensor

    final = _final_state(store)
    assert_same(final, reference["state"])
    # The loss sequence inside the state, too (it was restored across every kill).
    ref_losses = [float.fromhex(reference["losses"][s]) for s in range(1, STEPS + 1)]
    assert final["losses"].tolist() == pytest.approx(ref_losses, abs=0)


def _kill_randomly(
    zygote: Zygote,
    store: Path,
    log: Path,
    rng: random.Random,
    kills: int,
    *,
    sig: int,
    workers: int = 0,
    mid_save: int | None = None,
    async_saves: bool = False,
    loader: str = "tracked",
) -> list[dict]:
    """Start the trainer, kill it ``kills`` times (restarting it each time), then let it finish."""
    extra = ["--workers", str(workers), "--loader", loader, *(["--async-saves"] if async_saves else [])]
    attempts = []
    for attempt in range(kills):
        announce = attempt == mid_save
        zygote.start(store, log, *extra, *(["--announce-saves"] if announce else []))
        start = zygote.read_until(lambda line: line.startswith("START"))
        assert start is not None, zygote.stderr()
        start_step = int(start.split()[1])
        assert start_step < STEPS - 5, "the run finished before it could be killed; too few steps"
        if announce:
            assert zygote.read_until(lambda line: line == "SAVING") is not None, zygote.stderr()
        else:
            target = min(start_step + rng.randint(2, 25), STEPS - 3)
            assert zygote.read_until(lambda line, t=target: line.startswith("STEP") and int(line.split()[1]) >= t) is not None
            time.sleep(rng.uniform(0, 0.006))
        zygote.kill(sig)
        status = zygote.wait()
        record = {
            "start": start_step,
            "status": status,
            "last_logged": _last_logged_step(log),
            # The store's directories appear at its first save: a kill before it leaves none.
            "staging": sorted(os.listdir(store / ".staging")) if (store / ".staging").exists() else [],
        }
        attempts.append(record)
        if sig == signal.SIGKILL:
            assert status == -signal.SIGKILL, zygote.stderr()
        if announce:
            assert record["staging"], "the kill was meant to land inside a save, but no save was in progress"
    _run_to_end(zygote, store, log, *extra)
    return attempts


@pytest.mark.guarantee("G18")
def test_sigkill_at_random_moments_is_bitwise_identical(zygote, reference, tmp_path):
    rng = random.Random(1234)
    attempts = _kill_randomly(zygote, tmp_path / "store", tmp_path / "log", rng, kills=6, sig=signal.SIGKILL, mid_save=2)
    assert len(attempts) >= 5
    assert any(a["last_logged"] % BATCHES_PER_EPOCH for a in attempts), "no kill landed mid-epoch"
    # Each restart made progress: it resumed from a checkpoint of the previous attempt.
    assert [a["start"] for a in attempts] == sorted(a["start"] for a in attempts)
    assert attempts[-1]["start"] > 0
    _check_against(reference, tmp_path / "store", tmp_path / "log")


@pytest.mark.timeout(120)
def test_a_kill_between_a_line_and_its_newline_does_not_hang_the_driver(zygote, tmp_path):
    """The trainer's last line may be torn ("STEP 12" with no newline): the zygote's EXIT still ends the wait.

    print() writes a line and its newline in two calls, so a SIGKILL between
    them glued the zygote's "EXIT -9" onto "STEP 12"; the driver waited for a
    line starting with "EXIT " until pytest's timeout (600 s in CI).
    """
    zygote.start(tmp_path / "store", tmp_path / "log", "--die-mid-line")
    assert zygote.wait() == -signal.SIGKILL


@pytest.mark.guarantee("G18")
def test_sigterm_saves_the_finished_step_and_exits_143(zygote, reference, tmp_path):
    import ckstore

    rng = random.Random(99)
    store, log = tmp_path / "store", tmp_path / "log"
    attempts = _kill_randomly(zygote, store, log, rng, kills=3, sig=signal.SIGTERM)
    for attempt in attempts:
        assert attempt["status"] == 143, attempt
    # No work lost: each SIGTERM'd attempt saved the very step it had finished,
    # so the next attempt started exactly there.
    starts = [a["start"] for a in attempts[1:]]
    assert starts == [a["last_logged"] for a in attempts[:-1]]
    with ckstore.Store(store, readonly=True) as s:
        assert s.checkpoints()[-1].step == STEPS
    _check_against(reference, store, log)


@pytest.mark.guarantee("G18")
def test_sigkill_with_two_loader_workers_is_bitwise_identical(zygote, reference, tmp_path):
    rng = random.Random(7)
    attempts = _kill_randomly(zygote, tmp_path / "store", tmp_path / "log", rng, kills=5, sig=signal.SIGKILL, workers=2)
    assert len(attempts) == 5
    _check_against(reference, tmp_path / "store", tmp_path / "log")


@pytest.mark.guarantee("G18")
def test_sigkill_with_background_saves_is_bitwise_identical(zygote, reference, tmp_path):
    """Checkpointer(blocking=False): saves run in a background thread while training goes on; kills land anywhere."""
    rng = random.Random(31)
    attempts = _kill_randomly(zygote, tmp_path / "store", tmp_path / "log", rng, kills=5, sig=signal.SIGKILL, mid_save=1, async_saves=True)
    assert len(attempts) == 5
    _check_against(reference, tmp_path / "store", tmp_path / "log")


@pytest.mark.guarantee("G18")
@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_with_a_shuffling_stateful_dataloader_is_bitwise_identical(zygote, stateful_reference, tmp_path, workers):
    """StatefulDataLoader(shuffle=True, generator=g) in the state, killed mid-epoch: every later epoch reads the same order."""
    rng = random.Random(11 + workers)
    attempts = _kill_randomly(zygote, tmp_path / "store", tmp_path / "log", rng, kills=4, sig=signal.SIGKILL, workers=workers, loader="stateful")
    assert any(a["last_logged"] % BATCHES_PER_EPOCH for a in attempts), "no kill landed mid-epoch"
    assert attempts[0]["last_logged"] < STEPS - 2 * BATCHES_PER_EPOCH, "epochs after the first resume were compared"
    _check_against(stateful_reference(workers), tmp_path / "store", tmp_path / "log")


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        child_main(sys.argv[2:])
    elif sys.argv[1:2] == ["zygote"]:
        zygote_main()
    else:
        raise SystemExit(f"usage: {sys.argv[0]} child --store DIR --log FILE [--workers N] | zygote")
