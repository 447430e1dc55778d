"""ckstore.integrations.accelerate with a real Accelerator on CPU: save, mutate, load, bitwise equal."""

from __future__ import annotations

import copy
import os
import random

import numpy as np
import pytest
import torch

import ckstore

pytest.importorskip("accelerate")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DataLoaderConfiguration  # noqa: E402

from ckstore.integrations.accelerate import load_state, save_state  # noqa: E402


class Ema:
    """A registered custom object, as with ``accelerator.register_for_checkpointing``."""

    def __init__(self) -> None:
        self.shadow = torch.zeros(4)
        self.updates = 0

    def state_dict(self) -> dict:
        return {"shadow": self.shadow.clone(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = state["shadow"].clone()
        self.updates = state["updates"]


def _setup(stateful: bool = False, shuffle: bool = True):
    config = DataLoaderConfiguration(use_stateful_dataloader=True) if stateful else None
    accelerator = Accelerator(cpu=True, dataloader_config=config) if config else Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=shuffle)
    model, opt, sched, loader = accelerator.prepare(model, opt, sched, loader)
    ema = Ema()
    accelerator.register_for_checkpointing(ema)
    return accelerator, model, opt, sched, loader, ema


def _train(accelerator, model, opt, sched, batches, ema) -> None:
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        ema.shadow = ema.shadow * 0.9 + torch.rand(4)
        ema.updates += 1


def _snapshot(model, opt, sched, ema) -> dict:
    return copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "ema": ema.state_dict()})


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_save_mutate_load_is_bitwise(tmp_path) -> None:
    accelerator, model, opt, sched, loader, ema = _setup()
    batches = iter(loader)
    _train(accelerator, model, opt, sched, [next(batches) for _ in range(3)], ema)
    with ckstore.Store(tmp_path / "store") as store:
        info = save_state(accelerator, store, step=3, metrics={"loss": 0.5})
        assert info.step == 3
        saved = _snapshot(model, opt, sched, ema)
        after_save = (random.random(), np.random.rand(), torch.rand(3))
        # Mutate everything: more steps, other RNG draws, a changed custom object.
        _train(accelerator, model, opt, sched, [next(batches) for _ in range(3)], ema)
        assert not _equal(_snapshot(model, opt, sched, ema), saved)
        assert load_state(accelerator, store) == 3
    assert _equal(_snapshot(model, opt, sched, ema), saved)
    # The RNG continues from where it was at the save.
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert after_save[0] == again[0] and after_save[1] == again[1] and torch.equal(after_save[2], again[2])


def test_checkpoint_carries_each_registered_object_and_no_pickle(tmp_path) -> None:
    accelerator, model, opt, sched, loader, ema = _setup()
    _train(accelerator, model, opt, sched, [next(iter(loader))], ema)
    with ckstore.Store(tmp_path / "store") as store:
        save_state(accelerator, store, step=1)
        loaded = store.load(None, step=1)
    assert {"model", "optimizer", "scheduler", "custom_0", "rng", "accelerator_step", "step"} <= set(loaded)
    assert loaded["custom_0"]["updates"] == 1
    assert not any(p.suffix in {".pkl", ".bin", ".pt"} for p in (tmp_path / "store").rglob("*"))


@pytest.mark.guarantee("G4")
def test_fallback_past_corrupt_newest(tmp_path) -> None:
    accelerator, model, opt, sched, loader, ema = _setup()
    batches = iter(loader)
    with ckstore.Store(tmp_path / "store") as store:
        _train(accelerator, model, opt, sched, [next(batches)], ema)
        save_state(accelerator, store, step=1)
        first = _snapshot(model, opt, sched, ema)
        _train(accelerator, model, opt, sched, [next(batches)], ema)
        newest = save_state(accelerator, store, step=2)
        target = next(p for p in newest.path.iterdir() if p.name.startswith("model"))
        raw = bytearray(target.read_bytes())
        raw[-1] ^= 0xFF
        target.write_bytes(bytes(raw))
        with pytest.warns(ckstore.CorruptCheckpointWarning):
            assert load_state(accelerator, store) == 1
    assert _equal(_snapshot(model, opt, sched, ema), first)


@pytest.mark.guarantee("G17")
def test_registered_object_missing_at_load_is_a_state_error(tmp_path) -> None:
    accelerator, model, opt, sched, loader, ema = _setup()
    with ckstore.Store(tmp_path / "store") as store:
        save_state(accelerator, store, step=0)
        accelerator.register_for_checkpointing(Ema())  # custom_1 is not in the checkpoint
        with pytest.raises(ckstore.StateError, match="custom_1"):
            load_state(accelerator, store)


def test_stateful_dataloader_position_round_trips(tmp_path) -> None:
    # Sequential order: over a RandomSampler, accelerate's stateful loader does not restore the order
    # (its own load_state neither), see docs/huggingface.md.
    pytest.importorskip("torchdata")
    accelerator, model, opt, sched, loader, ema = _setup(stateful=True, shuffle=False)
    it = iter(loader)
    _train(accelerator, model, opt, sched, [next(it) for _ in range(2)], ema)
    with ckstore.Store(tmp_path / "store") as store:
        save_state(accelerator, store, step=2)
        expected = [next(it)[0] for _ in range(2)]
        load_state(accelerator, store)
        assert "dataloader" in store.load(None, step=2)
    it = iter(loader)
    assert all(torch.equal(next(it)[0], x) for x in expected)


def test_bad_arguments_are_typed(tmp_path) -> None:
    accelerator, *_ = _setup()
    with pytest.raises(ckstore.InvalidArgumentError):
        save_state(accelerator, str(tmp_path), step=1)
    with pytest.raises(ckstore.InvalidArgumentError):
        load_state(object(), ckstore.Store(tmp_path / "s"))
