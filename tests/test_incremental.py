"""Incremental saves: unchanged tensor files are hard-linked, proven identical by hash, independent on delete."""

from __future__ import annotations

import os

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from conftest import assert_same, flip_byte
from hypothesis import given, settings

import ckstore
from ckstore.storage import durable as _durable


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # Three top-level modules: three tensor files (model.embed, model.body, model.head).
    return torch.nn.ModuleDict({"embed": torch.nn.Embedding(50, 16), "body": torch.nn.Linear(16, 16), "head": torch.nn.Linear(16, 4)})


def _inode(store: ckstore.Store, step: int, name: str) -> int:
    return os.stat(store.resolve(step).path / name).st_ino


def test_frozen_files_are_linked_and_trained_files_written(store_path):
    model = _model()
    with ckstore.Store(store_path, incremental=True) as store:
        store.save({"model": model}, step=1)
        assert store.stats["files_linked"] == 0
        with torch.no_grad():
            model["head"].weight.add_(0.5)  # only the head trains
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        store.save({"model": model}, step=2)
        assert store.stats["files_linked"] == 2 and store.stats["files_written"] == 1
        assert _inode(store, 1, "model.embed.safetensors") == _inode(store, 2, "model.embed.safetensors")
        assert _inode(store, 1, "model.head.safetensors") != _inode(store, 2, "model.head.safetensors")
        assert store.resolve(2).files == {**store.resolve(1).files, "model.head.safetensors": store.resolve(2).files["model.head.safetensors"]}

        # Deleting the older checkpoint never harms the newer one (and vice versa).
        store.delete(1)
        assert store.verify() == []
        fresh = _model(seed=9)
        store.load({"model": fresh}, step=2)
        assert_same(fresh.state_dict(), expected)


def test_a_change_the_version_counter_misses_is_caught_by_the_hash(store_path):
    model = _model()
    with ckstore.Store(store_path, incremental=True) as store:
        store.save({"model": model}, step=1)
        version = model["body"].weight._version
        model["body"].weight.data.add_(1.0)  # .data has its own version counter
        np.asarray(model["head"].bias.detach().numpy())[:] = 7.0  # neither does a write through NumPy
        assert model["body"].weight._version == version
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        store.save({"model": model}, step=2)
        assert store.stats["files_linked"] == 1  # only the embedding is unchanged
        assert_same(store.load(step=2)["model"], expected)
        assert store.verify() == []


def test_linked_files_share_fate_on_bit_rot_and_verify_reports_both(store_path):
    model = _model()
    with ckstore.Store(store_path, incremental=True) as store:
        store.save({"model": model}, step=1)
        store.save({"model": model}, step=2)
        assert store.stats["files_linked"] == 3
        flip_byte(store.resolve(2).path / "model.embed.safetensors")
        problems = store.verify()
        assert sorted(p.step for p in problems) == [1, 2]
        with pytest.raises(ckstore.IntegrityError):
            store.load(step=1)


def test_a_previous_checkpoint_removed_by_retention_is_written_again(store_path):
    model = _model()
    with ckstore.Store(store_path, incremental=True, keep_last=1) as store:
        store.save({"model": model}, step=1)
        store.save({"model": model}, step=2)  # links from 1, then retention deletes 1
        assert store.stats["files_linked"] == 3
        assert [i.step for i in store.checkpoints()] == [2]
        store.save({"model": model}, step=3)  # links from 2
        assert store.stats["files_linked"] == 3
        store._committer.previous = {name: (prints, entry, "step-00000001") for name, (prints, entry, _) in store._committer.previous.items()}
        store.save({"model": model}, step=4)  # the recorded source is gone: written, not linked
        assert store.stats["files_linked"] == 0 and store.stats["files_written"] == 3
        assert store.verify() == []


def test_links_go_through_the_durability_module(store_path):
    seen = []

    def hook(op, phase, path, info):
        if phase == "after":
            seen.append((op, info["site"]))

    model = _model()
    with ckstore.Store(store_path, incremental=True) as store:
        store.save({"model": model}, step=1)
        with _durable.hooked(hook):
            store.save({"model": model}, step=2)
    assert seen.count(("link", "incremental")) == 3
    assert ("write", "tensor_file") not in seen
    assert seen.index(("link", "incremental")) < seen.index(("fsync_dir", "staging_dir")) < seen.index(("rename", "commit"))


def test_without_incremental_nothing_is_linked(store):
    model = _model()
    store.save({"model": model}, step=1)
    store.save({"model": model}, step=2)
    assert store.stats["files_linked"] == 0
    assert _inode(store, 1, "model.body.safetensors") != _inode(store, 2, "model.body.safetensors")


@settings(max_examples=12)
@given(st.lists(st.tuples(st.sets(st.sampled_from(["embed", "body", "head"])), st.sampled_from(["inplace", "data", "none"]), st.booleans()), min_size=1, max_size=6))
def test_every_checkpoint_loads_what_was_saved_whatever_changes_and_deletes(tmp_path_factory, plan):
    """Property: any sequence of partial updates (seen or unseen by version counters) and deletes of older checkpoints."""
    path = tmp_path_factory.mktemp("inc") / "store"
    model = _model()
    expected: dict[int, dict] = {}
    with ckstore.Store(path, incremental=True) as store:
        for step, (changed, how, delete_oldest) in enumerate(plan, start=1):
            for part in changed:
                weight = model[part].weight
                if how == "inplace":
                    with torch.no_grad():
                        weight.mul_(1.5)
                elif how == "data":
                    weight.data.mul_(0.5)
            expected[step] = {k: v.clone() for k, v in model.state_dict().items()}
            store.save({"model": model}, step=step)
            if delete_oldest and len(expected) > 1:
                oldest = min(expected)
                store.delete(oldest)
                del expected[oldest]
        assert store.verify() == []
        for step, values in expected.items():
            assert_same(store.load(step=step)["model"], values)
