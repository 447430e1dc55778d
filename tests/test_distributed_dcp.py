"""ckstore's DCP storage pair in one process (``no_dist``): the commit, the JSON metadata, verification on load.

The multi-rank runs (real gloo process groups, resharding, a killed rank) are in
``test_distributed_ranks.py``; these pin the pieces a single process can show.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException

import ckstore
from ckstore.distributed import StoreReader, StoreWriter
from ckstore.distributed.metadata_json import metadata_from_json, metadata_to_json
from conftest import REPO_ROOT, assert_same, flip_byte

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optim": opt.state_dict(), "extra": {"epoch": 3, "name": "run-a"}, "half": torch.arange(7, dtype=torch.bfloat16)}


def _empty_like(state: dict) -> dict:
    fresh = _state(seed=1)
    fresh["extra"] = {"epoch": 0, "name": ""}
    fresh["half"] = torch.zeros(7, dtype=torch.bfloat16)
    return fresh


def _save(path, state, step, **kwargs):
    with ckstore.Store(path) as store:
        dcp.save(state, storage_writer=StoreWriter(store, step=step, **kwargs))


def test_save_commits_one_checkpoint_the_store_lists_and_verifies(store_path):
    state = _state()
    _save(store_path, state, 5, metrics={"loss": 0.5}, tags=["good"])
    with ckstore.Store(store_path, readonly=True) as store:
        infos = store.checkpoints()
        assert [i.step for i in infos] == [5]
        assert infos[0].metrics == {"loss": 0.5} and tuple(infos[0].tags) == ("good",)
        assert store.verify(5) == []
        # Without a template, the ordinary load returns the raw, verified shards and the JSON metadata.
        raw = store.load(step=5)
        assert isinstance(raw["dcp_metadata"], str)
        assert {item["fqn"] for item in raw["items"]} >= {"model.0.weight", "optim.state.0.exp_avg"}
        # Into a state, Store.load (no DCP planner) refuses, naming the ways that load such a checkpoint.
        for call in (lambda: store.load(_empty_like(state), step=5), lambda: store.load(_empty_like(state))):
            with pytest.raises(ckstore.StateError, match="StoreReader"):
                call()
    assert not os.listdir(store_path / ".staging")


def test_load_through_dcp_is_bitwise_equal(store_path):
    state = _state()
    _save(store_path, state, 1)
    target = _empty_like(state)
    with ckstore.Store(store_path, readonly=True) as store:
        dcp.load(target, storage_reader=StoreReader(store, step=1))
    assert_same(target, state)


def test_metadata_is_json_not_pickle(store_path):
    _save(store_path, _state(), 2)
    manifest = (store_path / "checkpoints" / "step-00000002" / "manifest.json").read_bytes()
    body = json.loads(manifest)
    text = body["state"]["dcp_metadata"]
    meta = json.loads(text)
    assert meta["format"] == "ckstore.dcp-metadata"
    # a pickle stream starts with protocol byte 0x80; none is anywhere in the manifest
    assert b"\x80" not in manifest
    again = metadata_to_json(metadata_from_json(text))
    assert again == text


def test_metadata_round_trip_keeps_every_field(store_path):
    _save(store_path, _state(), 3)
    with ckstore.Store(store_path, readonly=True) as store:
        reader = StoreReader(store, step=3)
        meta = reader.read_metadata()
    assert set(meta.state_dict_metadata) >= {"model.0.weight", "extra.epoch", "half"}
    weight = meta.state_dict_metadata["model.0.weight"]
    assert weight.size == torch.Size([5, 6]) and weight.properties.dtype == torch.float32
    assert meta.state_dict_metadata["half"].properties.dtype == torch.bfloat16
    # planner_data keeps tuples (the flattening's paths) as tuples
    assert meta.planner_data["model.0.weight"] == ("model", "0.weight")
    for index, chunk in meta.storage_data.items():
        assert chunk.hash.startswith(("blake3:", "sha256:"))


def test_same_step_twice_is_refused_and_the_first_survives(store_path):
    state = _state()
    _save(store_path, state, 4)
    with pytest.raises(CheckpointException) as info:
        _save(store_path, _state(seed=9), 4)
    assert "CheckpointExistsError" in repr(info.value.failures)
    target = _empty_like(state)
    with ckstore.Store(store_path, readonly=True) as store:
        dcp.load(target, storage_reader=StoreReader(store, step=4))
    assert_same(target, state)


def test_a_flipped_byte_in_a_shard_fails_the_load(store_path):
    _save(store_path, _state(), 6)
    shards = sorted((store_path / "checkpoints" / "step-00000006").glob("*.safetensors"))
    assert shards
    flip_byte(shards[0], -3)  # inside the last tensor's data
    target = _empty_like(_state())
    with ckstore.Store(store_path, readonly=True) as store, pytest.raises(CheckpointException) as info:
        dcp.load(target, storage_reader=StoreReader(store, step=6))
    assert "IntegrityError" in repr(info.value.failures)


def test_retention_is_applied_by_the_coordinator(store_path):
    state = _state()
    with ckstore.Store(store_path, keep_last=2) as store:
        for step in (1, 2, 3):
            dcp.save(state, storage_writer=StoreWriter(store, step=step))
        assert [i.step for i in store.checkpoints()] == [2, 3]


def test_reader_defaults_to_the_latest_committed(store_path):
    _save(store_path, _state(seed=0), 1)
    newer = _state(seed=5)
    _save(store_path, newer, 2)
    target = _empty_like(newer)
    with ckstore.Store(store_path, readonly=True) as store:
        dcp.load(target, storage_reader=StoreReader(store))
    assert_same(target, newer)


def test_bad_arguments_are_typed_errors(store_path):
    with ckstore.Store(store_path) as store:
        with pytest.raises(ckstore.InvalidArgumentError, match="step"):
            StoreWriter(store, step=-1)
        with pytest.raises(ckstore.InvalidArgumentError, match="checkpoint_id"):
            StoreWriter(store, step=1).reset(str(store_path) + "-other")
        with pytest.raises(ckstore.InvalidArgumentError, match="store"):
            StoreWriter(42, step=1)
    assert StoreWriter.validate_checkpoint_id(store_path) is False  # nothing there yet
    _save(store_path, _state(), 1)
    assert StoreWriter.validate_checkpoint_id(store_path) is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ckstore.Store(store_path, readonly=True) as store, pytest.raises(ckstore.CheckpointNotFoundError):
            StoreReader(store, step=99).read_metadata()


def test_a_manifest_past_the_readers_limit_is_refused_before_the_commit(store_path, monkeypatch):
    """Metadata grows with ranks x tensors: a save whose manifest no reader would accept must not commit."""
    from ckstore.checkpoint import commit

    monkeypatch.setattr(commit, "MAX_MANIFEST_BYTES", 2000)
    with pytest.raises(CheckpointException) as info:
        _save(store_path, _state(), 8)
    assert "StateError" in repr(info.value.failures) and "manifest" in repr(info.value.failures)
    with ckstore.Store(store_path, readonly=True) as store:
        assert store.checkpoints() == []
    assert os.listdir(store_path / ".staging") == []


class _Custom:
    """A class DCP would pickle as a bytes item; unpickling it runs whatever the pickle names."""

    def __init__(self, value: int) -> None:
        self.value = value


@pytest.mark.guarantee("G16")
def test_a_non_tensor_value_that_json_cannot_hold_is_refused_on_save_and_nothing_is_committed(store_path):
    with pytest.raises(CheckpointException) as info:
        _save(store_path, {"w": torch.ones(3), "obj": _Custom(7)}, 1)
    failure = next(iter(info.value.failures.values()))[0]
    assert isinstance(failure, ckstore.StateError) and failure.key == "obj" and "_Custom" in str(failure)
    with ckstore.Store(store_path, readonly=True) as store:
        assert store.checkpoints() == []


@pytest.mark.guarantee("G16")
def test_non_tensor_values_are_json_and_come_back_through_the_default_planner(store_path):
    values = {
        "plain": {"lr": 0.1, "betas": (0.9, 0.99), "name": "run-a", "none": None, "nan": float("nan")},
        "blob": b"\x80\x04raw",
        "key": np.arange(6, dtype=np.uint32),  # a NumPy RNG key: DCP hands an array leaf over as a bytes item
        "when": datetime.date(2026, 12, 2),
    }
    _save(store_path, {"w": torch.ones(3), **values}, 1)
    for path in (store_path / "checkpoints").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            # a pickle stream opens with PROTO (0x80) and a protocol number 2..5
            assert not any(bytes([0x80, n]) in data for n in range(2, 6)), path.name
    target = {"w": torch.zeros(3), "plain": {"lr": 0.0, "betas": (0.0, 0.0), "name": "", "none": 1, "nan": 0.0}, "blob": b"", "key": None, "when": None}
    with ckstore.Store(store_path, readonly=True) as store:
        dcp.load(target, storage_reader=StoreReader(store, step=1))  # DCP's DefaultLoadPlanner
    assert math.isnan(target["plain"].pop("nan"))
    values["plain"].pop("nan")
    assert target["plain"] == values["plain"] and target["blob"] == values["blob"] and target["when"] == values["when"]
    assert target["key"].dtype == np.uint32 and np.array_equal(target["key"], values["key"])


def test_a_planner_that_reads_values_as_pickle_is_refused_by_name(store_path):
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class PicklePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            raise AssertionError("never handed bytes")

    _save(store_path, {"w": torch.ones(3), "epoch": 3}, 1)
    with ckstore.Store(store_path, readonly=True) as store, pytest.raises(CheckpointException) as info:
        dcp.load({"w": torch.zeros(3), "epoch": 0}, storage_reader=StoreReader(store, step=1), planner=PicklePlanner())
    failure = next(iter(info.value.failures.values()))[0]
    assert isinstance(failure, ckstore.StateError) and failure.key == "epoch" and "load_value" in str(failure)


def test_a_checkpoint_whose_values_were_pickled_by_an_earlier_version_still_loads(tmp_path):
    """Format 1 of the DCP metadata (values as DCP's pickles): loaded only under torch.load(weights_only=True)."""
    store_path = tmp_path / "store"
    shutil.copytree(REPO_ROOT / "tests" / "fixtures" / "dcp_v1_store", store_path)
    target = {"w": torch.zeros(4), "extra": {"epoch": 0, "betas": (0.0, 0.0)}}
    with ckstore.Store(store_path, readonly=True) as store:
        dcp.load(target, storage_reader=StoreReader(store, step=1))
    assert torch.equal(target["w"], torch.arange(4, dtype=torch.float32)) and target["extra"] == {"epoch": 3, "betas": (0.9, 0.99)}


def test_a_writer_given_a_path_releases_the_lock_when_its_save_fails(store_path):
    """StoreWriter(path) opens its own Store: a failed save must close it, or the writer lock stays taken."""
    _save(store_path, _state(), 1)
    with pytest.raises(CheckpointException):
        dcp.save(_state(), storage_writer=StoreWriter(store_path, step=1))  # refused: step 1 is committed
    with pytest.raises(CheckpointException):
        dcp.save({"w": torch.ones(2), "obj": _Custom(1)}, storage_writer=StoreWriter(store_path, step=2))  # fails in write_data
    with ckstore.Store(store_path) as store:  # would raise StoreLockedError while a writer's Store holds the lock
        store.save({"w": torch.ones(2)}, step=3)
        assert [i.step for i in store.checkpoints()] == [1, 3]
        assert os.listdir(store_path / ".staging") == []
