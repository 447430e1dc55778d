"""The ckstore demo (``make demo``): crash, resume, same run bit for bit; early stopping restores the best.

1. Train a small classifier on scikit-learn's breast-cancer data in a child
   process, checkpointing into ``.demo/store`` (keep_last=2, keep_best=2 by
   validation loss). SIGKILL it mid-epoch, restart it (it resumes), SIGTERM it
   (it finishes the step, saves, exits 143), restart it again to the end.
2. Print what the store kept, like ``ckstore ls``.
3. Train the same thing uninterrupted into ``.demo/uninterrupted`` and compare
   parameters, optimizer state and per-step losses: "bitwise identical: yes".
4. Early stopping: stop after 3 evaluations without improvement and restore
   the best checkpoint.

Each step is a small function in :data:`STEPS`; ``main()`` runs them in order.
Everything lives under ``.demo/`` (git-ignored), wiped at the start.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer
from torch.utils.data import DataLoader, TensorDataset

import ckstore
from ckstore import cli

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO / ".demo"
BATCH_SIZE = 25
BATCHES_PER_EPOCH = 19  # 455 training samples in batches of 25, the last one partial
TOTAL_STEPS = 180
EVAL_EVERY = 18  # once per epoch
SAVE_EVERY = 10


@dataclass
class Demo:
    """What the steps share."""

    root: Path = DEMO_DIR
    store_path: Path = DEMO_DIR / "store"
    uninterrupted_path: Path = DEMO_DIR / "uninterrupted"
    early_stopping_path: Path = DEMO_DIR / "early-stopping"
    results: dict[str, Any] = field(default_factory=dict)
    ok: bool = True


# ---------------------------------------------------------------- the training job


def load_data() -> tuple[TensorDataset, tuple[torch.Tensor, torch.Tensor]]:
    """Breast-cancer data (569 x 30), standardised; a fixed 80/20 split."""
    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    order = np.random.default_rng(0).permutation(len(x))
    train, val = order[:455], order[455:]
    xt = torch.tensor(x, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.int64)
    return TensorDataset(xt[train], yt[train]), (xt[val], yt[val])


def build(width: int = 32, lr: float = 3e-3, dropout: float = 0.3):
    # Seed every generator the job may touch: Python's random module, for one,
    # is reseeded in each forked child (os.register_at_fork), so an unseeded job
    # is not the same job twice.
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, width), torch.nn.ReLU(), torch.nn.Dropout(dropout), torch.nn.Linear(width, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=60, gamma=0.5)
    return model, optimizer, scheduler


def validation_loss(model: torch.nn.Module, val: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(val[0]), val[1]).item()
    model.train()
    return loss


def train(store_path: Path, progress: Any = None, step_sleep: float = 0.0) -> None:
    """The training job: resumes from ``store_path`` if it holds checkpoints. Runs in a child process."""
    torch.set_num_threads(1)
    dataset, val = load_data()
    model, optimizer, scheduler = build()
    sampler = ckstore.ResumableSampler(len(dataset), seed=1, shuffle=True)
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, sampler=sampler)
    losses = torch.zeros(TOTAL_STEPS)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "data": sampler, "rng": ckstore.RNGState(), "losses": losses}
    with ckstore.Store(store_path, keep_last=2, keep_best=2, metric="val_loss") as store:
        step = ckstore.resume(store, state)
        if progress is not None:
            progress.value = step
        with ckstore.Checkpointer(store, state, every=SAVE_EVERY, at_exit=True) as ckpt:
            while step < TOTAL_STEPS:
                for x, y in sampler.track(loader):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    losses[step] = loss.detach()
                    step += 1
                    metrics = {"loss": loss.item()}
                    if step % EVAL_EVERY == 0:
                        metrics["val_loss"] = validation_loss(model, val)  # a ranked metric: this step is saved
                    if progress is not None:
                        progress.value = step
                    time.sleep(step_sleep)
                    ckpt.step(step, metrics=metrics)
                    if step >= TOTAL_STEPS:
                        break


def run_child(store_path: Path, *, kill_at: int | None = None, sig: int = signal.SIGKILL) -> tuple[int, int]:
    """Run :func:`train` in a real child process; send ``sig`` once it has done ``kill_at`` steps.

    Returns (exit status, steps it had reached). The child is forked so it
    need not import torch again; it is a separate process all the same.
    """
    sys.stdout.flush()
    context = multiprocessing.get_context("fork")
    progress = context.Value("q", -1)
    child = context.Process(target=train, args=(store_path, progress, 0.01 if kill_at else 0.0))
    child.start()
    if kill_at is not None:
        while child.is_alive() and progress.value < kill_at:
            time.sleep(0.002)
        os.kill(child.pid, sig)
    child.join()
    return child.exitcode, progress.value


# ---------------------------------------------------------------- the steps


def step_fresh_start(demo: Demo) -> None:
    if demo.root.exists():
        shutil.rmtree(demo.root)
    demo.root.mkdir(parents=True)
    print(f"== ckstore demo: everything goes under {demo.root} (wiped)")
    print(f"   data: scikit-learn breast cancer, {TOTAL_STEPS} steps of Adam + StepLR + dropout, shuffled mid-epoch resumable loader\n")


def step_interrupted_run(demo: Demo) -> None:
    print("== 1. a run that is killed and resumed")
    status, reached = run_child(demo.store_path, kill_at=47, sig=signal.SIGKILL)
    with ckstore.Store(demo.store_path, readonly=True) as store:
        saved = store.checkpoints()[-1].step
    where = f"epoch {reached // BATCHES_PER_EPOCH + 1}, batch {reached % BATCHES_PER_EPOCH} of {BATCHES_PER_EPOCH}"
    print(f"   SIGKILL at step {reached} ({where}): exit {status}; newest checkpoint: step {saved}")
    status, reached = run_child(demo.store_path, kill_at=123, sig=signal.SIGTERM)
    with ckstore.Store(demo.store_path, readonly=True) as store:
        saved = store.checkpoints()[-1].step
    print(f"   resumed; SIGTERM at step {reached}: the step finished, was saved (step {saved}), exit {status} (128 + SIGTERM)")
    if status != 143 or saved != reached:
        print("   !! expected exit 143 and the finished step saved")
        demo.ok = False
    status, reached = run_child(demo.store_path)
    print(f"   resumed again and ran to step {reached}: exit {status}")
    demo.ok &= status == 0 and reached == TOTAL_STEPS
    print("\n   what the store kept (ckstore ls):")
    sys.stdout.flush()
    cli.main(["ls", str(demo.store_path)])
    print()


def step_uninterrupted_run(demo: Demo) -> None:
    print("== 2. the same training, uninterrupted")
    status, reached = run_child(demo.uninterrupted_path)
    print(f"   ran to step {reached}: exit {status}")
    demo.ok &= status == 0


def step_compare(demo: Demo) -> None:
    with ckstore.Store(demo.store_path, readonly=True) as a, ckstore.Store(demo.uninterrupted_path, readonly=True) as b:
        left, right = a.load(step=TOTAL_STEPS), b.load(step=TOTAL_STEPS)
    differences = [path for path in compare(left, right)]
    parts = ", ".join(f"{k} ({count_tensors(left[k])} tensors)" for k in ("model", "optimizer", "losses"))
    print(f"   compared {parts}, scheduler, sampler and RNG state of step {TOTAL_STEPS}")
    if differences:
        print(f"   bitwise identical: no ({len(differences)} differences, first: {differences[:3]})")
        demo.ok = False
    else:
        print("   bitwise identical: yes")
    demo.results["compare"] = not differences
    print()


def step_early_stopping(demo: Demo) -> None:
    print("== 3. early stopping (patience 3) and restoring the best checkpoint")
    torch.set_num_threads(1)
    dataset, val = load_data()
    model, optimizer, _ = build(width=256, lr=2e-2, dropout=0.0)  # big and fast: it overfits within a few epochs
    stopper = ckstore.EarlyStopping(metric="val_loss", mode="min", patience=3, min_delta=1e-4)
    sampler = ckstore.ResumableSampler(len(dataset), seed=2)
    loader = DataLoader(dataset, batch_size=25, sampler=sampler)
    state = {"model": model, "optimizer": optimizer, "data": sampler, "early_stopping": stopper, "rng": ckstore.RNGState()}
    with ckstore.Store(demo.early_stopping_path, keep_best=1, keep_last=1, metric="val_loss") as store:
        epoch = ckstore.resume(store, state)
        with ckstore.Checkpointer(store, state, every=None, signals=()) as ckpt:
            while not stopper.should_stop and epoch < 60:
                for x, y in sampler.track(loader):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                epoch += 1
                val_loss = validation_loss(model, val)
                stopper.update(val_loss, step=epoch)
                ckpt.step(epoch, metrics={"val_loss": val_loss})  # saved: the store ranks by val_loss
                mark = "new best" if stopper.improved else f"{stopper.since_best} without improvement"
                print(f"   epoch {epoch:2d}: val_loss {val_loss:.5f}  ({mark})")
        print(f"   stopped after {stopper.patience} evaluations without improvement")
        print(f"   best: epoch {stopper.best_step}, val_loss {stopper.best:.5f}")
        info = stopper.restore_best(store, {"model": model})
        again = validation_loss(model, val)
        verdict = "matches" if again == stopper.best else "DIFFERS"
        print(f"   restored checkpoint step {info.step}; val_loss recomputed: {again:.5f} ({verdict} the best)")
        demo.ok &= again == stopper.best and stopper.stopped
    print()


def step_publish_and_pull(demo: Demo) -> None:
    print("== 4. publishing the best checkpoint through DVC and pulling it into a fresh clone")
    from demo_dvc import publish_and_pull  # examples/ is on sys.path when this file runs

    with ckstore.Store(demo.store_path) as store:
        verified = publish_and_pull(store, "best", workdir=demo.root / "dvc")
    print(f"   pulled checkpoint verified: {'yes' if verified else 'NO'}")
    demo.ok &= verified


STEPS = [
    step_fresh_start,
    step_interrupted_run,
    step_uninterrupted_run,
    step_compare,
    step_early_stopping,
    step_publish_and_pull,
]


# ---------------------------------------------------------------- helpers


def compare(a: Any, b: Any, path: str = "state"):
    """Yield the paths where ``a`` and ``b`` differ (tensors and arrays compared byte for byte)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            yield path
        elif a.reshape(-1).view(torch.uint8).numpy().tobytes() != b.reshape(-1).view(torch.uint8).numpy().tobytes():
            yield path
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and a.tobytes() == b.tobytes()):
            yield path
    elif isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            yield path
        for key in a.keys() & b.keys():
            yield from compare(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            yield path
        for i, (x, y) in enumerate(zip(a, b)):
            yield from compare(x, y, f"{path}[{i}]")
    elif a != b and not (isinstance(a, float) and isinstance(b, float) and a != a and b != b):
        yield path


def count_tensors(node: Any) -> int:
    if isinstance(node, torch.Tensor):
        return 1
    if isinstance(node, dict):
        return sum(count_tensors(v) for v in node.values())
    if isinstance(node, (list, tuple)):
        return sum(count_tensors(v) for v in node)
    return 0


def main() -> int:
    started = time.monotonic()
    torch.set_num_threads(1)  # before any fork: no OpenMP pool in the parent
    torch.use_deterministic_algorithms(True)
    handler = logging.StreamHandler(sys.stdout)  # flushed per record, so a killed child's last lines are not lost
    handler.setFormatter(logging.Formatter("   [ckstore] %(message)s"))
    logging.getLogger("ckstore").addHandler(handler)
    logging.getLogger("ckstore").setLevel(logging.INFO)
    demo = Demo()
    for step in STEPS:
        step(demo)
    print(f"== done in {time.monotonic() - started:.0f} s: {'all checks passed' if demo.ok else 'A CHECK FAILED'}")
    return 0 if demo.ok else 1


if __name__ == "__main__":
    sys.exit(main())
