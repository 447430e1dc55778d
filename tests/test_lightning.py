"""ckstore.integrations.lightning with real Lightning: a tiny model trained on CPU, no downloads.

The kill test runs the training in a subprocess, SIGKILLs it mid-run with a
real signal, resumes from the newest checkpoint that verifies and compares
the global step, optimizer and scheduler state and every later loss with an
uninterrupted run.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import os
import signal
import subprocess
import sys
import time
import warnings
from argparse import Namespace
from collections import OrderedDict
from datetime import date, datetime, timedelta, timezone
from pathlib import Path, PurePosixPath

import pytest
import torch

import ckstore
from conftest import PYTHON, REPO_ROOT, assert_same, flip_byte, subprocess_env

pl = pytest.importorskip("lightning.pytorch")
from torch.utils.data import DataLoader, Sampler, TensorDataset  # noqa: E402

from ckstore.integrations import lightning as ckl  # noqa: E402

BATCHES = 4  # per epoch
EPOCHS = 5


class EpochSampler(Sampler[int]):
    """A shuffled order that is a pure function of (seed, epoch): Lightning calls set_epoch, so a resumed run sees the same data."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


class Tiny(pl.LightningModule):
    def __init__(self, lr: float = 0.05, hidden: int = 6, **extra):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCHES * 8, 3, generator=g)
    y = (x * torch.tensor([1.0, -2.0, 0.5])).sum(1, keepdim=True)
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=8, sampler=EpochSampler(len(ds))), DataLoader(ds, batch_size=16)


class LossLog(pl.Callback):
    """Records (global step, loss) after each step; optionally appends them to a file and sleeps (the kill test)."""

    def __init__(self, path: str | None = None, pause: float = 0.0) -> None:
        self.losses: list[tuple[int, float]] = []
        self.path, self.pause = path, pause
        self.resumed: dict | None = None
        self.snapshots: dict[int, dict] = {}  # global step at each epoch end -> optimizer and scheduler state

    def on_train_start(self, trainer, pl_module):
        self.resumed = copy.deepcopy(
            {
                "global_step": trainer.global_step,
                "optimizer": trainer.optimizers[0].state_dict(),
                "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
            }
        )

    def on_train_epoch_end(self, trainer, pl_module):
        self.snapshots[trainer.global_step] = copy.deepcopy(
            {"optimizer": trainer.optimizers[0].state_dict(), "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict()}
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        entry = (trainer.global_step, float(outputs["loss"]))
        self.losses.append(entry)
        if self.path:
            with open(self.path, "a") as fh:
                fh.write(f"{entry[0]} {entry[1].hex()}\n")
        if self.pause:
            time.sleep(self.pause)


def _trainer(callbacks, *, epochs: int = EPOCHS, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def _fit(store: Path, *, epochs: int = EPOCHS, ckpt_path=None, model=None, log_path=None, pause=0.0, **options):
    options.setdefault("monitor", "val_loss")
    options.setdefault("save_top_k", 2)
    options.setdefault("save_last", True)
    ckpt = ckl.ModelCheckpoint(store, **options)
    losses = LossLog(log_path, pause)
    trainer = _trainer([ckpt, losses], epochs=epochs)
    train, val = _data()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        trainer.fit(model or Tiny(), train, val, ckpt_path=ckpt_path)
    return trainer, ckpt, losses


def _listing(path: Path) -> dict[int, tuple[str, ...]]:
    with ckstore.Store(path, readonly=True) as store:
        return {info.step: info.tags for info in store.checkpoints()}


@pytest.fixture(autouse=True)
def _one_thread():
    # One intra-op thread: the subprocess and this process then reduce in the same order, bit for bit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- wiring


def test_import_ckstore_never_imports_lightning():
    code = "import sys, ckstore, ckstore.integrations; assert 'lightning' not in sys.modules, sorted(m for m in sys.modules if 'lightning' in m)"
    subprocess.run([PYTHON, "-c", code], check=True, env=subprocess_env(), cwd=REPO_ROOT, timeout=60)


def test_lightning_file_names_are_tags(store_path):
    with ckstore.Store(store_path) as store:
        store.save({"x": torch.ones(1)}, step=11, tags=["epoch=0-step=11.ckpt"])
        assert store.resolve("epoch=0-step=11.ckpt").step == 11


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("mode", "maximum"),
        ("save_top_k", -2),
        ("save_top_k", 2.0),
        ("save_last", "yes"),
        ("every_n_train_steps", -1),
        ("every_n_epochs", True),
        ("monitor", ""),
        ("blocking", "no"),
        ("filename", "sub/{epoch}"),
        ("train_time_interval", 5),
        ("verbose", 1),
        ("classes", [int]),
    ],
)
def test_bad_option_is_a_typed_error_naming_it(tmp_path, option, value):
    with pytest.raises(ckstore.InvalidArgumentError, match=option):
        ckl.ModelCheckpoint(tmp_path / "s", **{"monitor": "val_loss", option: value})


def test_combined_triggers_and_topk_without_monitor_are_refused(tmp_path):
    with pytest.raises(ckstore.InvalidArgumentError, match="every_n_epochs"):
        ckl.ModelCheckpoint(tmp_path / "s", every_n_train_steps=2, every_n_epochs=1)
    with pytest.raises(ckstore.InvalidArgumentError, match="save_top_k"):
        ckl.ModelCheckpoint(tmp_path / "s", save_top_k=3)
    with pytest.raises(ckstore.InvalidArgumentError, match="dirpath"):
        ckl.ModelCheckpoint(None)
    with pytest.raises(ckstore.InvalidArgumentError, match="blocking"):
        ckl.CkstoreCheckpointIO(tmp_path / "s", blocking=None)


def test_a_foreign_checkpoint_io_is_refused(tmp_path):
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    ckpt = ckl.ModelCheckpoint(tmp_path / "s")
    trainer = _trainer([ckpt], epochs=1, plugins=[AsyncCheckpointIO()])
    train, val = _data()
    with pytest.raises(ckstore.InvalidArgumentError, match="checkpoint_io AsyncCheckpointIO"):
        trainer.fit(Tiny(), train, val)


def test_paths_outside_the_store_are_refused(tmp_path):
    io = ckl.CkstoreCheckpointIO(tmp_path / "s")
    with pytest.raises(ckstore.InvalidArgumentError, match="not in the store"):
        io.save_checkpoint({"global_step": 1}, tmp_path / "elsewhere" / "a.ckpt")
    with pytest.raises(ckstore.InvalidArgumentError, match="global_step"):
        io.save_checkpoint({"epoch": 1}, tmp_path / "s" / "a.ckpt")
    with pytest.raises(ckstore.InvalidArgumentError, match="storage_options"):
        io.save_checkpoint({"global_step": 1}, tmp_path / "s" / "a.ckpt", storage_options={"x": 1})


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("blocking", [True, False], ids=["sync", "background"])
def test_topk_and_last_at_one_step_are_one_checkpoint_with_two_names(tmp_path, blocking):
    trainer, ckpt, losses = _fit(tmp_path / "s", epochs=3, blocking=blocking)
    listing = _listing(tmp_path / "s")
    last = trainer.global_step
    assert last == 3 * BATCHES
    # Retention: top 2 by val_loss plus the newest; every survivor holds a name.
    assert len(listing) <= 3 and all(listing.values()), listing
    assert "last.ckpt" in listing[last]
    assert f"epoch=2-step={last}.ckpt" in listing[last]  # the same checkpoint, two names
    assert sorted(os.listdir(tmp_path / "s" / "checkpoints")) == [f"step-{s:08d}" for s in sorted(listing)]
    # Lightning's own bookkeeping names checkpoints that exist in the store.
    best_name = os.path.basename(ckpt.best_model_path)
    assert sorted(os.path.basename(p) for p in ckpt.best_k_models) == sorted(t for ts in listing.values() for t in ts if t != "last.ckpt")
    with ckstore.Store(tmp_path / "s", readonly=True) as store:
        assert store.best().step == store.resolve(best_name).step
        assert store.resolve(best_name).metrics["val_loss"] == pytest.approx(float(ckpt.best_model_score))
        assert store.verify() == []


def test_every_n_train_steps_and_keep_all(tmp_path):
    _fit(tmp_path / "s", epochs=2, monitor=None, save_top_k=-1, save_last=False, every_n_train_steps=3)
    listing = _listing(tmp_path / "s")
    assert sorted(listing) == [3, 6]
    assert listing[3] == ("epoch=0-step=3.ckpt",)


def test_load_from_checkpoint_by_name_store_and_best(tmp_path):
    trainer, ckpt, _ = _fit(tmp_path / "s", epochs=3, model=Tiny(lr=0.01, hidden=5))
    trained = trainer.lightning_module
    for path in (ckpt.last_model_path, tmp_path / "s", tmp_path / "s" / "latest"):
        model = ckl.load_from_checkpoint(Tiny, path)
        assert model.hparams.hidden == 5 and model.hparams.lr == 0.01
        assert_same(model.state_dict(), trained.state_dict())
    best = ckl.load_from_checkpoint(Tiny, tmp_path / "s" / "best", map_location="cpu")
    by_name = ckl.load_from_checkpoint(Tiny, ckpt.best_model_path)
    assert_same(best.state_dict(), by_name.state_dict())
    override = ckl.load_from_checkpoint(Tiny, tmp_path / "s", lr=0.5)
    assert override.hparams.lr == 0.5
    with pytest.raises(ckstore.CheckpointNotFoundError):
        ckl.load_from_checkpoint(Tiny, tmp_path / "s" / "no-such.ckpt")


def test_ckpt_path_best_loads_the_best_that_verifies(tmp_path):
    _fit(tmp_path / "s", epochs=3, save_top_k=2)
    with ckstore.Store(tmp_path / "s", readonly=True) as store:
        ranked = sorted((i for i in store.checkpoints() if "val_loss" in i.metrics), key=lambda i: i.metrics["val_loss"])
        weights = [store.load(step=info.step)["state_dict"] for info in ranked]
    assert len(ranked) >= 2

    def validate_best() -> dict:
        # A new trainer and callback, as in a new process: Lightning knows no best path of its own.
        trainer = _trainer([ckl.ModelCheckpoint(tmp_path / "s", monitor="val_loss", save_top_k=2)], epochs=1)
        model = Tiny()
        trainer.validate(model, _data()[1], ckpt_path="best", verbose=False)
        return model.state_dict()

    assert_same(validate_best(), weights[0])
    # The best fails verification: "best" falls back to the next best, with a warning naming it.
    victim = ranked[0].path / sorted(f for f in os.listdir(ranked[0].path) if f.startswith("state_dict"))[0]
    flip_byte(victim, 200)
    with pytest.warns(ckstore.CorruptCheckpointWarning, match=f"step {ranked[0].step}"):
        assert_same(validate_best(), weights[1])


def test_fit_from_an_older_best_into_saved_steps_is_refused(tmp_path):
    _fit(tmp_path / "s", epochs=3, monitor="val_loss", save_top_k=-1)
    # Resuming from an older checkpoint (by name here; "best" alike) and training on reaches steps the
    # first run saved: ckstore never overwrites a step, and says what to do instead.
    with pytest.raises(ckstore.CheckpointExistsError, match="resumed from step"):
        _fit(tmp_path / "s", epochs=3, monitor="val_loss", save_top_k=-1, ckpt_path=tmp_path / "s" / f"epoch=0-step={BATCHES}.ckpt")


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_newest_makes_last_fall_back(tmp_path, damage):
    _fit(tmp_path / "s", epochs=2, monitor=None, save_top_k=-1)
    steps = sorted(_listing(tmp_path / "s"))
    assert steps == [BATCHES, 2 * BATCHES]
    newest = tmp_path / "s" / "checkpoints" / f"step-{steps[-1]:08d}"
    victim = newest / sorted(f for f in os.listdir(newest) if f.startswith("state_dict"))[0]
    if damage == "flip":
        flip_byte(victim, 200)
    else:
        os.truncate(victim, os.path.getsize(victim) // 2)
    with pytest.warns(ckstore.CorruptCheckpointWarning, match=f"step {steps[-1]}"):
        trainer, _, log = _fit(tmp_path / "s", epochs=3, monitor=None, save_top_k=-1, ckpt_path="last")
    assert log.resumed["global_step"] == steps[0]
    # It trained on from there and saved step 2*BATCHES again: the corrupt one went to the quarantine.
    assert trainer.global_step == 3 * BATCHES
    with ckstore.Store(tmp_path / "s", readonly=True) as store:
        assert store.verify() == []
        assert [q.step for q in store.quarantine()] == [steps[-1]]


def test_the_plugin_alone_names_checkpoints_and_refuses_lightnings_own_directory(tmp_path):
    io = ckl.CkstoreCheckpointIO(tmp_path / "s", keep_last=1)
    trainer = _trainer([], epochs=1, plugins=[io], enable_checkpointing=False)
    train, val = _data()
    trainer.fit(Tiny(), train, val)
    trainer.save_checkpoint(tmp_path / "s" / "manual.ckpt")
    trainer.save_checkpoint(tmp_path / "s" / "again.ckpt")  # the same global step: a second name, not a copy
    assert _listing(tmp_path / "s") == {BATCHES: ("again.ckpt", "manual.ckpt")}
    log = LossLog()
    _trainer([log], epochs=2, plugins=[ckl.CkstoreCheckpointIO(tmp_path / "s")], enable_checkpointing=False).fit(
        Tiny(), train, val, ckpt_path=tmp_path / "s" / "manual.ckpt"
    )
    assert log.resumed["global_step"] == BATCHES
    # With Lightning's own ModelCheckpoint (saving under lightning_logs/), the plugin says what to do.
    trainer = _trainer([], epochs=1, plugins=[ckl.CkstoreCheckpointIO(tmp_path / "s2")], default_root_dir=tmp_path)
    with pytest.raises(ckstore.InvalidArgumentError, match="not in the store.*ckstore's ModelCheckpoint"):
        trainer.fit(Tiny(), train, val)


def test_ckpt_path_last_on_an_empty_store_starts_fresh(tmp_path):
    with pytest.warns(UserWarning, match="no last checkpoint"):
        trainer, _, log = _fit(tmp_path / "s", epochs=1, ckpt_path="last")
    assert log.resumed["global_step"] == 0 and trainer.global_step == BATCHES


# ---------------------------------------------------------------- SIGKILL and resume

_CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
import test_lightning as t
t._fit({store!r}, log_path={log!r}, pause=0.15, blocking={blocking!r})
"""


def _read_log(path: Path) -> list[tuple[int, float]]:
    if not path.exists():
        return []
    lines = [line.split() for line in path.read_text().splitlines()]
    return [(int(s), float.fromhex(v)) for s, v in lines if v]


@pytest.mark.parametrize("blocking", [True, False], ids=["sync", "background"])
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, blocking):
    # The uninterrupted reference run, in this process, into its own store.
    ref_trainer, _, ref = _fit(tmp_path / "ref", blocking=blocking)
    ref_losses = dict(ref.losses)
    assert len(ref_losses) == EPOCHS * BATCHES

    store, log = tmp_path / "run", tmp_path / "losses.txt"
    code = _CHILD.format(tests=str(Path(__file__).parent), store=str(store), log=str(log), blocking=blocking)
    child = subprocess.Popen([PYTHON, "-c", code], env=subprocess_env(), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        # Kill mid-epoch 3, after two epochs' checkpoints were acknowledged.
        while len(_read_log(log)) < 2 * BATCHES + 2:
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the child made no progress"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    before = _read_log(log)
    assert len(before) < EPOCHS * BATCHES  # really mid-run
    for step, loss in before:
        assert loss == ref_losses[step], f"step {step}: the killed run diverged before the kill"

    trainer, _, resumed = _fit(store, ckpt_path="last", blocking=blocking)
    start = resumed.resumed["global_step"]
    assert 2 * BATCHES <= start < EPOCHS * BATCHES and start % BATCHES == 0
    # Optimizer (Adam moments, step counts) and scheduler state at the resume point are the reference's at that step.
    assert_same(resumed.resumed["optimizer"]["state"], ref.snapshots[start]["optimizer"]["state"])
    assert resumed.resumed["optimizer"]["param_groups"] == ref.snapshots[start]["optimizer"]["param_groups"]
    assert resumed.resumed["scheduler"] == ref.snapshots[start]["scheduler"]
    # Every loss after the resume equals the uninterrupted run's, bit for bit.
    assert [s for s, _ in resumed.losses] == list(range(start + 1, EPOCHS * BATCHES + 1))
    for step, loss in resumed.losses:
        assert loss == ref_losses[step], f"step {step}: {loss} != {ref_losses[step]}"
    assert trainer.global_step == ref_trainer.global_step
    assert_same(trainer.lightning_module.state_dict(), ref_trainer.lightning_module.state_dict())
    assert_same(trainer.optimizers[0].state_dict()["state"], ref_trainer.optimizers[0].state_dict()["state"])


# ---------------------------------------------------------------- hyperparameters


class Color(enum.Enum):
    RED = "red"
    BLUE = 2


@dataclasses.dataclass(frozen=True)
class Config:
    depth: int
    name: str = "x"
    scale: float = 0.5


def _hparams() -> dict:
    return {
        "out": Path("/data/run 1"),
        "pure": PurePosixPath("a/b"),
        "args": Namespace(a=1, b="z", c=[1, 2]),
        "day": date(2026, 12, 2),
        "when": datetime(2026, 12, 2, 9, 30, 1, 5, tzinfo=timezone(timedelta(hours=-3, minutes=-30))),
        "utc": datetime(2026, 1, 1, tzinfo=timezone.utc),
        "naive": datetime(2026, 1, 1, 23, 59, 59, 999999),
        "span": timedelta(days=1, seconds=3, microseconds=7),
        "color": Color.RED,
        "order": OrderedDict([("b", 1), ("a", OrderedDict([("y", 2), ("x", 3)]))]),
        "cfg": Config(3),
        "nested": [Config(1, "y", 2.5), {"c": Color.BLUE}],
    }


def _assert_exact(actual, expected, path="hparams"):
    assert type(actual) is type(expected), f"{path}: {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"{path}: key order"
        for key in expected:
            _assert_exact(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_exact(a, e, f"{path}[{i}]")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"
        if isinstance(expected, datetime):
            assert actual.tzinfo == expected.tzinfo and actual.fold == expected.fold


def test_hyperparameters_round_trip_exactly(tmp_path):
    hparams = _hparams()
    trainer, ckpt, _ = _fit(tmp_path / "s", epochs=1, model=Tiny(**hparams))
    model = ckl.load_from_checkpoint(Tiny, tmp_path / "s", classes=[Color, Config])
    for key, value in hparams.items():
        _assert_exact(model.hparams[key], value, key)
    # The lightning module's state_dict is an OrderedDict, and loads as one.
    assert type(ckl.load_checkpoint(tmp_path / "s", classes=[Color, Config])["state_dict"]) is OrderedDict
    # A class that is not allowed is refused with the key named, and nothing is imported to find it.
    with pytest.raises(ckstore.StateError, match=r"\['hyper_parameters'\]\['cfg'\].*classes="):
        ckl.load_from_checkpoint(Tiny, tmp_path / "s", classes=[Color])
    # fit(ckpt_path="last") allows the classes the model's own hparams hold.
    trainer, _, log = _fit(tmp_path / "s", epochs=2, model=Tiny(**hparams), ckpt_path="last")
    assert log.resumed["global_step"] == BATCHES and trainer.global_step == 2 * BATCHES
