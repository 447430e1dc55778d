"""Strict loads: the state a caller loads into must match the checkpoint, or nothing is restored and a StateError names every key.

Each case below used to return normally having restored nothing (issue: "loads that restore nothing, silently").
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_same
from hypothesis import given
from test_state import states  # the round-trip tests' strategy of nested states

import ckstore


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, params):
    return all(torch.equal(v, params[k]) for k, v in model.state_dict().items())


@pytest.fixture
def trained(make_training_state):
    return make_training_state(seed=1)


# ---------------------------------------------------------------- the tutorials' pattern, both ways


@pytest.mark.parametrize("verify", [True, False])
def test_a_checkpoint_saved_from_state_dicts_loads_into_the_objects(store, trained, make_training_state, verify):
    model, optimizer, scheduler = trained
    store.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, step=1)
    fresh_model, fresh_optimizer, fresh_scheduler = make_training_state(seed=2)
    assert not _same(fresh_model, _params(model))
    store.load({"model": fresh_model, "optimizer": fresh_optimizer, "scheduler": fresh_scheduler}, step=1, verify=verify)
    assert _same(fresh_model, _params(model))
    assert torch.equal(fresh_optimizer.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert fresh_scheduler.state_dict() == scheduler.state_dict()


def test_a_checkpoint_saved_from_a_module_loads_into_its_state_dict(store, make_model):
    model = make_model(seed=1)
    store.save({"model": model}, step=1)
    fresh = make_model(seed=2)
    out = store.load({"model": fresh.state_dict()}, step=1)
    assert _same(fresh, _params(model))
    assert set(out["model"]) == set(model.state_dict())


def test_a_state_dict_target_must_have_the_saved_keys_both_ways(store, make_model):
    model = make_model(seed=1)
    store.save({"model": model}, step=1)
    partial = dict(make_model(seed=2).state_dict())
    partial.pop("0.bias")
    before = {k: v.clone() for k, v in partial.items()}
    with pytest.raises(ckstore.StateError) as excinfo:
        store.load({"model": partial}, step=1)
    assert "unexpected" in str(excinfo.value) and "state['model']['0.bias']" in str(excinfo.value)
    assert all(torch.equal(v, before[k]) for k, v in partial.items()), "nothing is restored by a refused load"


# ---------------------------------------------------------------- refusals name every key


@pytest.mark.guarantee("G17")
def test_a_key_typo_is_refused_and_restores_nothing(store, trained, make_training_state):
    model, optimizer, _ = trained
    store.save({"model": model, "optimizer": optimizer}, step=1)
    fresh_model, fresh_optimizer, _ = make_training_state(seed=2)
    before = _params(fresh_model)
    with pytest.raises(ckstore.StateError) as excinfo:
        store.load({"modle": fresh_model, "optimizer": fresh_optimizer}, step=1)
    assert excinfo.value.key == "state['modle']"
    assert "missing" in str(excinfo.value) and "strict=False" in str(excinfo.value)
    assert _same(fresh_model, before)
    assert fresh_optimizer.state_dict()["state"][0]["exp_avg"].abs().sum() != optimizer.state_dict()["state"][0]["exp_avg"].abs().sum()


@pytest.mark.guarantee("G17")
def test_a_key_added_after_the_checkpoint_is_missing(store, trained, make_training_state):
    model, optimizer, _ = trained
    store.save({"model": model, "optimizer": optimizer}, step=1)
    fresh_model, fresh_optimizer, fresh_scheduler = make_training_state(seed=2)
    before = _params(fresh_model)
    with pytest.raises(ckstore.StateError) as excinfo:
        ckstore.resume(store, {"model": fresh_model, "optimizer": fresh_optimizer, "scheduler": fresh_scheduler})
    assert excinfo.value.key == "state['scheduler']"
    assert _same(fresh_model, before), "the model was not half restored"


@pytest.mark.guarantee("G17")
def test_a_module_with_other_layers_is_refused_naming_each_key(store, make_model):
    model = make_model(seed=1)
    store.save({"model": model}, step=1)
    wider = torch.nn.Sequential(*make_model(seed=2), torch.nn.Linear(2, 2))
    with pytest.raises(ckstore.StateError) as excinfo:
        store.load({"model": wider}, step=1)
    assert "state['model']['3.weight']" in str(excinfo.value) and "missing" in str(excinfo.value)
    narrower = torch.nn.Sequential(*list(make_model(seed=2))[:1])
    with pytest.raises(ckstore.StateError) as excinfo:
        store.load({"model": narrower}, step=1)
    assert "unexpected" in str(excinfo.value) and "state['model']['2.weight']" in str(excinfo.value)


@pytest.mark.guarantee("G17")
@pytest.mark.parametrize(
    "saved, target, words",
    [
        ({"model": [1, 2]}, lambda m: {"model": m}, "a list"),
        ({"epoch": "three"}, lambda m: {"epoch": 0}, "a string"),
        ({"w": torch.ones(2)}, lambda m: {"w": np.zeros(2, dtype=np.float32)}, "a tensor"),
        ({"w": np.ones(2)}, lambda m: {"w": torch.zeros(2)}, "a NumPy array"),
        ({"history": {"a": 1}}, lambda m: {"history": []}, "a dict"),
        ({"fn": 1}, lambda m: {"fn": print}, "cannot restore into"),
    ],
    ids=["list_for_module", "str_for_int", "tensor_for_array", "array_for_tensor", "dict_for_list", "into_a_function"],
)
def test_values_of_another_kind_are_refused(store, make_model, saved, target, words):
    store.save(saved, step=1)
    with pytest.raises(ckstore.StateError) as excinfo:
        store.load(target(make_model()), step=1)
    assert "of another kind" in str(excinfo.value) and words in str(excinfo.value)
    assert excinfo.value.key == f"state[{next(iter(saved))!r}]"


@pytest.mark.guarantee("G17")
def test_a_refused_load_does_not_fall_back_to_an_older_checkpoint(store, make_model):
    """A mismatch is the caller's, not the checkpoint's: every checkpoint would disagree alike."""
    store.save({"model": make_model(seed=1)}, step=1)
    store.save({"model": make_model(seed=2)}, step=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no CorruptCheckpointWarning: nothing was skipped
        with pytest.raises(ckstore.StateError):
            store.load({"model": make_model(), "extra": 0})


# ---------------------------------------------------------------- strict=False


@pytest.mark.guarantee("G17")
def test_strict_false_restores_what_matches_and_warns_naming_the_rest(store, trained, make_training_state):
    model, optimizer, _ = trained
    store.save({"model": model, "optimizer": optimizer, "epoch": 3}, step=1)
    fresh_model, fresh_optimizer, fresh_scheduler = make_training_state(seed=2)
    state = {"model": fresh_model, "optimiser": fresh_optimizer, "scheduler": fresh_scheduler, "epoch": 0}
    with pytest.warns(ckstore.StateMismatchWarning) as record:
        assert ckstore.resume(store, state, strict=False) == 1
    warning = record[0].message
    assert warning.missing == ("state['optimiser']", "state['scheduler']")
    assert warning.unexpected == () and warning.mismatched == ()
    assert _same(fresh_model, _params(model)) and state["epoch"] == 3


def test_strict_false_loads_the_matching_keys_of_a_module(store, make_model):
    model = make_model(seed=1)
    store.save({"model": model}, step=1)
    wider = torch.nn.Sequential(*make_model(seed=2), torch.nn.Linear(2, 3))
    extra = wider[3].weight.detach().clone()
    with pytest.warns(ckstore.StateMismatchWarning) as record:
        store.load({"model": wider}, step=1, strict=False)
    assert record[0].message.missing == ("state['model']['3.weight']", "state['model']['3.bias']")
    assert all(torch.equal(wider.state_dict()[k], v) for k, v in model.state_dict().items())
    assert torch.equal(wider[3].weight, extra)


def test_strict_false_skips_tensors_of_another_shape(store, make_model):
    store.save({"a": torch.ones(3), "b": torch.full((2,), 7.0), "m": make_model(seed=1, width=8)}, step=1)
    a, b, m = torch.zeros(4), torch.zeros(2), make_model(seed=2, width=16)
    before = _params(m)
    with pytest.raises(ckstore.StateError):
        store.load({"a": a, "b": b, "m": m}, step=1)
    with pytest.warns(ckstore.StateMismatchWarning) as record:
        store.load({"a": a, "b": b, "m": m}, step=1, strict=False)
    mismatched = record[0].message.mismatched
    assert "state['a']" in mismatched and "state['m']['0.weight']" in mismatched
    assert torch.equal(a, torch.zeros(4)) and torch.equal(b, torch.full((2,), 7.0))
    assert torch.equal(m.state_dict()["0.weight"], before["0.weight"])


# ---------------------------------------------------------------- plain values


def test_resume_restores_plain_values_into_the_callers_dict(store, make_model):
    model = make_model(seed=1)
    history = [0.9, 0.5]
    saved = {"model": model, "epoch": 7, "best": 0.25, "name": "run-1", "history": history, "config": {"lr": 0.1, "tags": ["a"]}, "best_step": 40, "done": True}
    store.save(saved, step=40)
    my_history, my_config = [], {"lr": 1.0, "tags": []}
    state = {"model": make_model(seed=2), "epoch": 0, "best": float("inf"), "name": "", "history": my_history, "config": my_config, "best_step": None, "done": False}
    assert ckstore.resume(store, state) == 40
    assert state["epoch"] == 7 and state["best"] == 0.25 and state["name"] == "run-1" and state["best_step"] == 40 and state["done"] is True
    assert state["history"] is my_history and my_history == [0.9, 0.5], "lists are filled in place"
    assert state["config"] is my_config and my_config == {"lr": 0.1, "tags": ["a"]}
    assert _same(state["model"], _params(model))


def test_plain_values_inside_lists_arrays_and_nested_dicts(store):
    store.save({"runs": [{"model": torch.ones(2), "step": 5}, 0.5], "mask": np.arange(3), "meta": {}, "best": np.float32(0.25)}, step=1)
    target_tensor, mask, meta = torch.zeros(2), np.zeros(3, dtype=np.int64), {}
    state = {"runs": [{"model": target_tensor, "step": 0}, 0.0], "mask": mask, "meta": meta, "best": np.float32(1)}
    store.load(state, step=1)
    assert state["runs"][0]["step"] == 5 and state["runs"][1] == 0.5 and torch.equal(target_tensor, torch.ones(2))
    assert state["best"] == np.float32(0.25) and type(state["best"]) is np.float32
    assert state["mask"] is mask and mask.tolist() == [0, 1, 2]
    assert state["meta"] is meta and meta == {}


def test_a_nested_plain_dict_gets_the_saved_keys_and_reports_the_ones_it_lacks(store):
    store.save({"config": {"lr": 0.1, "wd": 0.0}}, step=1)
    state = {"config": {}}
    store.load(state, step=1)
    assert state["config"] == {"lr": 0.1, "wd": 0.0}
    with pytest.raises(ckstore.StateError) as excinfo:
        store.load({"config": {"lr": 1.0, "momentum": 0.9}}, step=1)
    assert excinfo.value.key == "state['config']['momentum']"


def test_plain_values_in_a_tuple_cannot_be_restored_and_say_so(store, make_model):
    model = make_model(seed=1)
    store.save({"pair": (model, 4)}, step=1)
    with pytest.raises(ckstore.StateError) as excinfo:
        store.load({"pair": (make_model(seed=2), 0)}, step=1)
    assert excinfo.value.key == "state['pair'][1]" and "tuple" in str(excinfo.value)
    fresh = make_model(seed=2)
    store.load({"pair": (fresh, 4)}, step=1)  # an equal value needs no restoring
    assert _same(fresh, _params(model))


def test_loading_without_a_target_or_a_part_of_the_checkpoint_is_not_a_mismatch(store, make_model):
    """The target names what to restore: a full training checkpoint loads into {"model": model} (inference, EarlyStopping)."""
    model = make_model(seed=1)
    store.save({"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1), "epoch": 3}, step=1)
    fresh = make_model(seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = store.load({"model": fresh}, step=1)
        assert out["epoch"] == 3 and _same(fresh, _params(model))
        assert store.load(step=1)["epoch"] == 3


# ---------------------------------------------------------------- every state loads into itself


@pytest.fixture(scope="module")
def own_store(fast_root):
    """One store for the property below (a fresh step for each example); its own path, apart from test_state's."""
    with ckstore.Store(fast_root / "strict-load-store") as s:
        yield s, itertools.count()


@given(state=states)
def test_any_state_loads_strictly_into_itself(own_store, state):
    """Whatever save() accepts is a strict target for its own checkpoint, and comes back unchanged."""
    store, steps = own_store
    step = next(steps)
    store.save(state, step=step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = store.load(state, step=step)
    assert_same(loaded, state)
