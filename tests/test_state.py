"""State round-trips through a real store: nested values, every dtype, views, sharing, training objects."""

from __future__ import annotations

import itertools
import math
import os
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_same
from hypothesis import given
from hypothesis import strategies as st

import ckstore
from ckstore.state.decode import decode_state
from ckstore.state.encode import encode_state
from ckstore.state.targets import drop_overlapping as _drop_overlapping
from ckstore.format.safetensors import DTYPE_NAMES

DTYPES = sorted(DTYPE_NAMES, key=str)


@pytest.fixture(scope="module")
def shared_store(fast_root):
    """One store per module for the property tests (a fresh step for each example)."""
    with ckstore.Store(fast_root / "state-store") as s:
        yield s, itertools.count()


def roundtrip(store_and_steps, state, target=None):
    store, steps = store_and_steps
    step = next(steps)
    store.save(state, step=step)
    return store.load(target, step=step)


# ---------------------------------------------------------------- strategies


@st.composite
def tensors(draw, dtypes=st.sampled_from(DTYPES)):
    dtype = draw(dtypes)
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    n = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if dtype == torch.bool:
        base = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool).reshape(shape)
    elif n == 0:
        base = torch.empty(shape, dtype=dtype)
    else:
        raw = bytearray(draw(st.binary(min_size=n * itemsize, max_size=n * itemsize)))
        base = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape).clone()
    view = draw(st.sampled_from(["plain", "transpose", "step", "narrow"]))
    if view == "transpose" and base.dim() >= 2:
        return base.transpose(0, 1)
    if view == "step" and base.dim() >= 1:
        return base[::2]
    if view == "narrow" and base.dim() >= 1 and base.shape[0] >= 2:
        return base[1:]
    return base


numpy_arrays = st.sampled_from([np.float32, np.float64, np.float16, np.int8, np.int64, np.uint16, np.uint64, np.bool_, np.complex64]).flatmap(
    lambda dt: st.lists(st.integers(0, 3), max_size=3).map(
        lambda shape: (np.arange(math.prod(shape)).reshape(shape) % 2 == 1).astype(dt) if dt is np.bool_ else np.arange(math.prod(shape)).reshape(shape).astype(dt)
    )
)
numpy_scalars = st.one_of(
    st.floats(width=32).map(np.float32),
    st.floats().map(np.float64),
    st.integers(-(2**63), 2**63 - 1).map(np.int64),
    st.integers(0, 255).map(np.uint8),
    st.booleans().map(np.bool_),
)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([-0.0, 0.0, math.inf, -math.inf, math.nan, 5e-324, 1e-05]),
    st.text(max_size=12),
    st.binary(max_size=12),
    tensors(),
    numpy_arrays,
    numpy_scalars,
)
keys = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["$ck", "-x", ".hidden", "a..b", "model.encoder.weight", "manifest.json", "__metadata__", "../etc"]),
    st.integers(-5, 5),
    st.tuples(st.integers(0, 3), st.text(max_size=3)),
)
states = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=12,
)


# ---------------------------------------------------------------- properties


@given(state=states)
def test_any_nested_state_round_trips(shared_store, state):
    assert_same(roundtrip(shared_store, state), state)


@given(state=states)
def test_any_nested_state_round_trips_through_a_background_save(shared_store, state):
    store, steps = shared_store
    step = next(steps)
    store.save(state, step=step, blocking=False).result()
    assert_same(store.load(step=step), state)


_VIEWS = {
    "all": lambda t: t,
    "same": lambda t: t,
    "head": lambda t: t[:2],
    "tail": lambda t: t[2:],
    "2d": lambda t: t.view(2, -1),
    "empty": lambda t: t[:0],
    "bytes": lambda t: t.view(torch.uint8),
}


@given(st.lists(st.tuples(st.integers(0, 2), st.sampled_from(sorted(_VIEWS))), min_size=1, max_size=12))
def test_both_walks_store_a_tensor_once_exactly_when_it_is_the_same_view_of_the_same_memory(refs):
    """Views of a few bases, some repeated. A background save's walk (tensors only validated, found by address
    first) and the general walk (each tensor prepared) both share a stored tensor between two keys exactly when
    the two are the same view of the same memory (or the very same empty tensor)."""
    bases = [torch.arange(8, dtype=torch.float32) + 10 * i for i in range(3)]
    made: dict = {}
    state = {"model": {}}
    for n, (base, view) in enumerate(refs):
        # "same" is the very object made before for this base and view kind; the others are new views
        key = (base, "all") if view == "same" else (base, view, n)
        tensor = made.setdefault(key, _VIEWS[view](bases[base]))
        state["model"][f"k{n:02d}"] = tensor

    def partition(identity):
        groups: dict = {}
        for k, v in state["model"].items():
            groups.setdefault(identity(k, v), []).append(k)
        return sorted(groups.values())

    def same_bytes_same_view(k, t):  # the definition: same memory seen the same way; an empty tensor is only itself
        return (t.data_ptr(), t.dtype, t.storage_offset(), tuple(t.shape), t.stride()) if t.numel() else id(t)

    expected = partition(same_bytes_same_view)
    for encoded in (encode_state(state, prepare=None), encode_state(state)):
        nodes = encoded.skeleton["model"]
        assert partition(lambda k, v: (nodes[k]["file"], nodes[k]["key"])) == expected


@given(state=st.dictionaries(keys, tensors(), min_size=1, max_size=5))
def test_dict_of_tensors_round_trips_and_keeps_key_order(shared_store, state):
    loaded = roundtrip(shared_store, state)
    assert list(loaded) == list(state)
    assert_same(loaded, state)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_round_trips(store, dtype):
    values = torch.tensor([0.0, 1.0, -2.0, 0.5, 3.0, 1.0]).reshape(2, 3)
    tensor = values.to(dtype) if dtype != torch.bool else values > 0
    state = {
        "plain": tensor,
        "zero_d": tensor.reshape(-1)[1].clone(),
        "empty": tensor[:0],
        "empty_2d": tensor.new_empty((0, 5)),
        "transposed": tensor.t(),
        "stepped": tensor[:, ::2],
        "column": tensor[:, 1],
    }
    store.save(state, step=0)
    loaded = store.load(step=0)
    assert_same(loaded, state)
    assert loaded["zero_d"].dim() == 0


def test_shared_tensors_are_stored_once_and_restored_shared(store):
    weight = torch.randn(64, 64)
    state = {"a": weight, "b": weight, "nested": [weight, {"again": weight}], "other": torch.randn(64, 64)}
    info = store.save(state, step=0)
    assert info.nbytes < 3 * 64 * 64 * 4  # two 16 KiB tensors, not five
    loaded = store.load(step=0)
    assert loaded["a"] is loaded["b"] is loaded["nested"][0] is loaded["nested"][1]["again"]
    assert loaded["other"] is not loaded["a"]
    assert_same(loaded["a"], weight)


def test_tied_module_weights_stay_tied(store):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    store.save({"model": model}, step=0)
    fresh = Tied()
    loaded = store.load({"model": fresh}, step=0)
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    state = loaded["model"]
    assert state["embed.weight"].untyped_storage().data_ptr() == state["head.weight"].untyped_storage().data_ptr()


def test_fresh_tensors_from_state_dict_are_never_mistaken_for_shared(store):
    """Regression: tensor identity used the storage address of temporaries that were freed mid-encode,
    so the allocator reused the address and later objects were silently saved with earlier objects' data."""

    class Fresh:
        def __init__(self, value):
            self.value = value

        def state_dict(self):
            return {"w": torch.full((4, 4), float(self.value)).t()}  # a new non-contiguous tensor each call

        def load_state_dict(self, state):
            self.loaded = state["w"]

    objects = {str(i): Fresh(i) for i in range(50)}
    encoded = encode_state(objects)
    assert sum(len(entries) for entries in encoded.files.values()) == 50
    store.save(objects, step=0)
    targets = {str(i): Fresh(None) for i in range(50)}
    store.load(targets, step=0)
    for i in range(50):
        assert torch.equal(targets[str(i)].loaded, torch.full((4, 4), float(i)))


def test_numpy_arrays_and_scalars(store):
    state = {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "transposed": np.arange(6, dtype=np.int64).reshape(2, 3).T,
        "zero_d": np.array(2.5),
        "empty": np.zeros((0, 3), dtype=np.uint16),
        "bools": np.array([True, False]),
        "scalars": [np.float32(1.5), np.int64(-7), np.bool_(True), np.float64("nan"), np.uint8(255)],
    }
    store.save(state, step=0)
    assert_same(store.load(step=0), state)


def test_python_scalars_edge_values(store):
    state = {"big": 2**200, "neg_big": -(2**100), "nan": math.nan, "inf": math.inf, "ninf": -math.inf, "negzero": -0.0,
             "tiny": 5e-324, "text": "é\n\"\\\u2028", "bytes": b"\x00\xff", "none": None, "bools": [True, False]}
    store.save(state, step=0)
    assert_same(store.load(step=0), state)


def test_unsorted_and_non_string_keys_survive(store):
    state = {"z": 1, "a": 2, "m": {"b": 1, "a": 2}, 3: "three", (1, "x"): "tuple", -1: None, "$ck": "mark"}
    store.save(state, step=0)
    loaded = store.load(step=0)
    assert list(loaded) == list(state)
    assert list(loaded["m"]) == ["b", "a"]
    assert_same(loaded, state)


# ---------------------------------------------------------------- training objects


def _train(model, optimizer, steps=3, scheduler=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=generator)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def _assert_state_dicts_equal(actual, expected):
    """Bitwise comparison of optimizer/scheduler state dicts (plain dict equality would ignore -0.0 and dtypes)."""
    assert_same(_normalize(actual), _normalize(expected))


def _normalize(value):
    if isinstance(value, dict):
        return {k: _normalize(value[k]) for k in sorted(value, key=repr)}
    if isinstance(value, (list, tuple)):
        return type(value)(_normalize(v) for v in value)
    return value


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
        lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True),
        lambda p: torch.optim.AdamW([{"params": p[:2], "lr": 1e-3}, {"params": p[2:], "weight_decay": 0.5}], lr=1e-2),
    ],
    ids=["adam", "sgd_momentum", "adamw_groups"],
)
def test_optimizer_state_round_trips_exactly(store, make_model, make_optimizer):
    model = make_model(seed=1)
    optimizer = make_optimizer(list(model.parameters()))
    _train(model, optimizer)
    store.save({"model": model, "optimizer": optimizer}, step=3)

    fresh_model = make_model(seed=2)
    fresh_optimizer = make_optimizer(list(fresh_model.parameters()))
    store.load({"model": fresh_model, "optimizer": fresh_optimizer}, step=3)
    _assert_state_dicts_equal(fresh_optimizer.state_dict(), optimizer.state_dict())
    _assert_state_dicts_equal(fresh_model.state_dict(), model.state_dict())
    assert all(isinstance(k, int) for k in fresh_optimizer.state_dict()["state"])

    # Training on from the restored state gives bit-identical parameters.
    _train(model, optimizer, steps=2, seed=9)
    _train(fresh_model, fresh_optimizer, steps=2, seed=9)
    _assert_state_dicts_equal(fresh_model.state_dict(), model.state_dict())


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.3),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda=lambda epoch: 0.9**epoch),
    ],
    ids=["steplr", "onecycle", "lambdalr"],
)
def test_lr_scheduler_round_trips(store, make_model, make_scheduler):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = make_scheduler(optimizer)
    _train(model, optimizer, steps=5, scheduler=scheduler)
    store.save({"model": model, "optimizer": optimizer, "scheduler": scheduler}, step=5)

    fresh_model = make_model(seed=3)
    fresh_optimizer = torch.optim.SGD(fresh_model.parameters(), lr=0.1, momentum=0.9)
    fresh_scheduler = make_scheduler(fresh_optimizer)
    store.load({"model": fresh_model, "optimizer": fresh_optimizer, "scheduler": fresh_scheduler}, step=5)
    _assert_state_dicts_equal(fresh_scheduler.state_dict(), scheduler.state_dict())
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    _train(model, optimizer, steps=3, scheduler=scheduler, seed=4)
    _train(fresh_model, fresh_optimizer, steps=3, scheduler=fresh_scheduler, seed=4)
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    _assert_state_dicts_equal(fresh_model.state_dict(), model.state_dict())


def test_grad_scaler_round_trips(store):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CPU GradScaler may warn on some builds
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
        scaler._init_scale = 1024.0
        fresh = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=2)
    store.save({"scaler": scaler}, step=0)
    store.load({"scaler": fresh}, step=0)
    assert fresh.state_dict() == scaler.state_dict()
    assert fresh.state_dict()["growth_interval"] == 7


def test_stateful_dataloader_resumes_where_it_stopped(store):
    from torchdata.stateful_dataloader import StatefulDataLoader

    dataset = list(range(40))
    loader = StatefulDataLoader(dataset, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    store.save({"loader": loader}, step=3)
    expected_rest = [batch.tolist() for batch in iterator]

    fresh = StatefulDataLoader(dataset, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(123))
    store.load({"loader": fresh}, step=3)
    assert [batch.tolist() for batch in fresh] == expected_rest


# ---------------------------------------------------------------- refusals


class _Plain:
    pass


@pytest.mark.parametrize(
    "state, key",
    [
        ({"a": {"fn": lambda: 1}}, "state['a']['fn']"),
        ({"obj": [1, _Plain()]}, "state['obj'][1]"),
        ({"s": {1, 2}}, "state['s']"),
        ({"x": [1, "\ud800"]}, "state['x'][1]"),
        ({"huge": 1 << 20000}, "state['huge']"),
        ({"c": torch.zeros(2, dtype=torch.complex128)}, "state['c']"),
        ({"sparse": torch.eye(3).to_sparse()}, "state['sparse']"),
        ({"objs": np.array([object()])}, "state['objs']"),
        ({"k": {frozenset([1]): 1}}, "state['k']"),
        ({"m": {"a": torch.ones(2), "\ud800": torch.ones(2)}}, "state['m']"),
    ],
    ids=["lambda", "object", "set", "surrogate", "huge_int", "complex128", "sparse", "object_array", "frozenset_key", "surrogate_key"],
)
@pytest.mark.parametrize("blocking", [True, False], ids=["sync", "background"])
def test_unsupported_values_name_their_key(store, state, key, blocking):
    with pytest.raises(ckstore.StateError) as excinfo:
        store.save(state, step=0, blocking=blocking)
    assert excinfo.value.key == key
    assert key in str(excinfo.value)
    assert store.checkpoints() == []
    assert os.listdir(store.path / ".staging") == []


def test_cyclic_structures_are_refused(store):
    cyclic = [1, 2]
    cyclic.append(cyclic)
    with pytest.raises(ckstore.StateError) as excinfo:
        store.save({"loop": cyclic}, step=0)
    assert excinfo.value.key == "state['loop'][2]"
    d = {}
    d["self"] = d
    with pytest.raises(ckstore.StateError):
        store.save(d, step=1)
    shared = [1]
    store.save({"a": shared, "b": shared}, step=2)  # shared but acyclic is fine


def test_loading_into_wrong_shape_or_dtype_is_refused(store, make_model):
    model = make_model(width=8)
    store.save({"model": model, "t": torch.zeros(3)}, step=0)
    with pytest.raises(ckstore.StateError) as excinfo:
        store.load({"model": make_model(width=16)}, step=0)
    assert "model" in excinfo.value.key
    with pytest.raises(ckstore.StateError):
        store.load({"model": make_model().to(torch.float64)}, step=0)
    with pytest.raises(ckstore.StateError):
        store.load({"t": torch.zeros(4)}, step=0)
    with pytest.raises(ckstore.StateError):
        store.load({"t": torch.zeros(3, dtype=torch.int32)}, step=0)
    target = torch.ones(3)
    store.load({"t": target}, step=0)
    assert torch.equal(target, torch.zeros(3))


def test_targets_are_read_in_place_and_returned_as_themselves(store):
    """Tensors without grad get the file's bytes in their own memory and come back as the same objects; grad survives."""
    saved = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.arange(4, dtype=torch.int16), "p": torch.randn(3)}
    store.save({"model": saved}, step=0)
    param = torch.nn.Parameter(torch.zeros(3))
    targets = {"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.int16), "p": param}
    pointers = {k: t.data_ptr() for k, t in targets.items()}
    out = store.load({"model": targets}, step=0)
    for key in saved:
        assert out["model"][key] is targets[key]
        assert targets[key].data_ptr() == pointers[key]
        assert torch.equal(targets[key], saved[key])
    assert param.requires_grad and param.grad is None


@pytest.mark.parametrize("verify", [True, False])
def test_wrong_targets_are_refused_on_the_fast_path_too(store, verify):
    """A target of another dtype or shape (a view included) is never read into: the load raises StateError naming the key."""
    store.save({"model": {"w": torch.randn(4, 4), "v": torch.randn(3)}}, step=0)
    for wrong in (torch.zeros(4, 4, dtype=torch.float64), torch.zeros(16), torch.zeros(4, 5), torch.zeros(8, 6)[::2, :5]):
        with pytest.raises(ckstore.StateError) as excinfo:
            store.load({"model": {"w": wrong, "v": torch.zeros(3)}}, step=0, verify=verify)
        assert "'w'" in excinfo.value.key


@pytest.mark.parametrize("map_location", [None, "cpu"])
def test_shared_and_repeated_targets(store, map_location):
    """A tensor saved once for two keys fills both targets; one target under two keys ends up with the last value, as copies run in order."""
    x, y = torch.randn(5), torch.randn(5)
    store.save({"model": {"a": x, "b": x}}, step=0)
    store.save({"model": {"a": x, "b": y}}, step=1)
    ta, tb = torch.zeros(5), torch.zeros(5)
    out = store.load({"model": {"a": ta, "b": tb}}, step=0, map_location=map_location)
    assert out["model"]["a"] is ta and out["model"]["b"] is tb
    assert torch.equal(ta, x) and torch.equal(tb, x)
    one = torch.zeros(5)
    store.load({"model": {"a": one, "b": one}}, step=1, map_location=map_location)
    assert torch.equal(one, y)


def test_one_target_under_two_keys_never_fails_verification(store):
    """Two stored tensors for one target memory: reading both into it raced the background hash of the first (CI saw a false IntegrityError)."""
    x, y = torch.randn(1 << 20), torch.randn(1 << 20)
    store.save({"model": {"a": x, "b": y}}, step=0)
    for _ in range(10):
        one = torch.zeros(1 << 20)
        store.load({"model": {"a": one, "b": one}}, step=0)
        assert torch.equal(one, y)


@pytest.mark.parametrize("order", ["ab", "ba"])
def test_overlapping_view_targets_take_the_state_order(store, order):
    """Views that share bytes are filled in the state's order: the later key's bytes stay where they overlap."""
    saved = {"a": torch.full((6,), 1.0), "b": torch.full((6,), 2.0)}
    store.save({k: saved[k] for k in order}, step=0)
    base = torch.zeros(10)
    views = {"a": base[0:6], "b": base[4:10]}
    store.load({k: views[k] for k in order}, step=0)
    first, last = (1.0, 2.0) if order == "ab" else (2.0, 1.0)
    low, high = (base[0:4], base[6:10]) if order == "ab" else (base[6:10], base[0:4])
    assert torch.equal(low, torch.full((4,), first)) and torch.equal(high, torch.full((4,), last))
    assert torch.equal(base[4:6], torch.full((2,), last))


@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 8), st.sampled_from([1, 2, 3])), min_size=1, max_size=12))
def test_drop_overlapping_keeps_exactly_the_targets_no_other_touches(views):
    """A target stays a direct-read target iff no other's span (first to last element) meets its span; so none that stays shares a byte."""
    base = torch.zeros(64)
    targets: dict[str, dict[str, torch.Tensor]] = {}
    cells, spans = {}, {}
    for i, (offset, count, step) in enumerate(views):
        view = base[offset : offset + (count - 1) * step + 1 : step]
        targets.setdefault(f"file{i % 3}", {})[f"k{i}"] = view
        cells[f"k{i}"] = {offset + j * step for j in range(count)}
        spans[f"k{i}"] = set(range(offset, offset + (count - 1) * step + 1))
    _drop_overlapping(targets)
    kept = {key for keyed in targets.values() for key in keyed}

    def alone(sets: dict[str, set[int]], key: str) -> bool:
        return not any(sets[key] & other for o, other in sets.items() if o != key)

    assert kept == {k for k in spans if alone(spans, k)}
    assert all(alone(cells, k) for k in kept)


@pytest.mark.parametrize("map_location", [None, "cpu"])
def test_non_contiguous_view_targets_are_filled(store, map_location):
    """A view that cannot be read into (transposed, strided) is copied into, and writes through to its base."""
    saved = torch.arange(12.0).reshape(3, 4)
    store.save({"w": saved, "v": torch.arange(3.0)}, step=0)
    base, strided_base = torch.zeros(4, 3), torch.zeros(6)
    out = store.load({"w": base.t(), "v": strided_base[::2]}, step=0, map_location=map_location)
    assert torch.equal(out["w"], saved) and torch.equal(base, saved.t())
    assert torch.equal(strided_base, torch.tensor([0.0, 0, 1, 0, 2, 0]))


def test_plain_targets_are_written_before_a_module_in_the_state_loads(store, make_model):
    """Copies are batched, but a module later in the state still loads after them (the state's order), so its values win."""
    model = make_model(seed=1)
    store.save({"a": torch.full_like(model.state_dict()["0.weight"], 7.0), "m": model}, step=0)
    other = make_model(seed=2)
    alias = other.state_dict()["0.weight"]  # the same memory as the module's parameter
    store.load({"a": alias, "m": other}, step=0, map_location="cpu")
    assert torch.equal(other.state_dict()["0.weight"], model.state_dict()["0.weight"])


def test_loading_into_module_restores_in_place(store, make_model):
    model = make_model(seed=1)
    store.save({"model": model, "epoch": 4}, step=0)
    other = make_model(seed=2)
    loaded = store.load({"model": other}, step=0)
    assert loaded["epoch"] == 4
    for a, b in zip(other.parameters(), model.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- devices


def _resign(manifest_path):
    """Rewrite a manifest after editing it, with a correct checksum (as a writer on another machine would have)."""
    import json

    from ckstore.format.hashing import hash_bytes

    raw = json.loads(manifest_path.read_bytes())
    return raw, lambda: manifest_path.write_bytes(_signed(raw, hash_bytes))


def _signed(raw, hash_bytes):
    import json

    canonical = lambda obj: json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()  # noqa: E731
    body = {k: v for k, v in raw.items() if k != "checksum"}
    body["checksum"] = str(hash_bytes(canonical(body)))
    return canonical(body)


@pytest.mark.parametrize("map_location", ["cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda saved: "cpu"], ids=["str", "device", "mapping", "callable"])
def test_map_location_forms(store, map_location):
    store.save({"w": torch.arange(4.0), "n": np.arange(3)}, step=0)
    loaded = store.load(step=0, map_location=map_location)
    assert loaded["w"].device.type == "cpu" and torch.equal(loaded["w"], torch.arange(4.0))
    assert isinstance(loaded["n"], np.ndarray)


def test_tensor_saved_on_a_missing_gpu_needs_map_location(store):
    """A checkpoint written on a CUDA machine (device recorded in the manifest) loaded on a CPU-only one."""
    info = store.save({"cpu": torch.ones(2), "w": torch.arange(4.0)}, step=0)
    raw, write = _resign(info.path / "manifest.json")
    raw["state"]["w"]["device"] = "cuda:3"
    write()
    with ckstore.Store(store.path, readonly=True) as reader:
        if not torch.cuda.is_available() or torch.cuda.device_count() < 4:
            with pytest.raises(ckstore.StateError) as excinfo:
                reader.load(step=0)
            assert excinfo.value.key == "state['w']" and "map_location" in str(excinfo.value)
        loaded = reader.load(step=0, map_location="cpu")
        assert torch.equal(loaded["w"], torch.arange(4.0)) and loaded["w"].device.type == "cpu"
        loaded = reader.load(step=0, map_location={"cuda:3": "cpu"})
        assert loaded["w"].device.type == "cpu"


def test_many_groups_are_pooled_and_round_trip(store):
    """More than 64 file groups are pooled into a few files; every tensor still comes back, modules load in place."""
    state = {f"k{i}": torch.full((3,), float(i)) for i in range(100)}
    state["state"] = {"small": torch.ones(2), "x.y": torch.zeros(1)}  # "state.small" is also the pool's own name
    state["m"] = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(80)])
    info = store.save(state, step=0)
    assert len(info.files) < 10
    loaded = store.load(step=0)
    for i in range(100):
        assert torch.equal(loaded[f"k{i}"], state[f"k{i}"])
    assert torch.equal(loaded["state"]["small"], torch.ones(2)) and torch.equal(loaded["state"]["x.y"], torch.zeros(1))
    fresh = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(80)])
    store.load({"m": fresh}, step=0)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), state["m"].parameters()))


def _layout_of(state):
    encoded = encode_state(state)
    return {name: [key for key, _ in entries] for name, entries in encoded.files.items()}


def test_the_reused_file_layout_follows_every_change_of_keys_and_sizes():
    """The layout of the previous save is reused only for equal paths and sizes; each change lays out afresh."""
    big = torch.zeros(1 << 20)  # 4 MiB: a group of its own among the pooled small ones
    many = {f"k{i}": torch.ones(3) for i in range(70)}
    first = _layout_of({"m": many})
    assert _layout_of({"m": many}) == first == {"m.small.safetensors": [f"m/k{i}" for i in range(70)]}
    assert _layout_of({"m": {**many, "k5": big}}) == {
        "m.small.safetensors": [f"m/k{i}" for i in range(70) if i != 5],
        "m.k5.safetensors": ["m/k5"],
    }
    assert _layout_of({"m": {**many, "k70": torch.ones(3)}})["m.small.safetensors"][-1] == "m/k70"
    assert _layout_of({"n": many}) == {"n.small.safetensors": [f"n/k{i}" for i in range(70)]}


@pytest.mark.parametrize("key", [1.0, True])
def test_keys_that_compare_equal_but_print_differently_get_their_own_layout(store, key):
    """1, 1.0 and True are equal dict keys but name different tensors ("m/1", "m/1.0", "m/True")."""
    assert _layout_of({"m": {1: torch.ones(2)}}) == {"m.safetensors": ["m/1"]}
    assert _layout_of({"m": {key: torch.ones(2)}}) == {"m.safetensors": [f"m/{key}"]}
    store.save({"m": {1: torch.ones(2)}}, step=0)
    store.save({"m": {key: torch.zeros(2)}}, step=1)
    assert_same(store.load(step=0), {"m": {1: torch.ones(2)}})
    loaded = store.load(step=1)
    assert list(loaded["m"]) == [key] and type(next(iter(loaded["m"]))) is type(key)
    assert torch.equal(loaded["m"][key], torch.zeros(2))


def test_nan_sign_and_payload_survive_a_round_trip(tmp_path):
    """Found by hypothesis: a float32 -nan came back as +nan (the manifest kept only "nan")."""
    import struct

    neg32 = -np.float32("nan")
    payload32 = np.frombuffer(bytes.fromhex("0100c0ff"), dtype=np.float32)[0]
    payload64 = struct.unpack("<d", bytes.fromhex("0100000000f8ff7f"))[0]
    state = {"neg32": neg32, "payload32": payload32, "payload64": payload64, "neg64": -float("nan"), "plain": float("nan")}
    with ckstore.Store(tmp_path / "s") as store:
        store.save(state, step=1)
        out = store.load(step=1)
    assert out["neg32"].tobytes() == neg32.tobytes()
    assert out["payload32"].tobytes() == payload32.tobytes()
    for key in ("payload64", "neg64", "plain"):
        assert struct.pack("<d", out[key]) == struct.pack("<d", state[key])


@pytest.mark.parametrize("bits", ["zz" * 8, "0000000000000000", 7, "00f8"])
def test_malformed_nan_bits_are_a_manifest_error(bits):
    with pytest.raises(ckstore.ManifestError):
        decode_state({"x": {"$ck": "float", "value": "nan", "bits": bits}}, lambda f, k: None)


# ---------------------------------------------------------------- crafted skeletons (an untrusted store)


def _with_state(store, step, state_node, *, on_top=None):
    """Commit ``step`` normally, then rewrite its manifest's state (re-signed, as a crafted store would be)."""
    info = store.save(on_top if on_top is not None else {"a": 1}, step=step)
    raw, write = _resign(info.path / "manifest.json")
    raw["state"] = state_node
    write()
    return info


def _nested_lists(depth):
    node = 1
    for _ in range(depth):
        node = [node]
    return node


@pytest.mark.parametrize("depth", [257, 300, 500, 700, 900])
def test_a_skeleton_nested_past_the_limit_is_a_manifest_error_and_load_falls_back(store, depth):
    """Found by the audit: nesting past what the decoder's recursion can take raised RecursionError (wrapped in a
    StateError), so one crafted newest checkpoint stopped load() and resume() instead of being skipped."""
    store.save({"a": 1}, step=1)
    _with_state(store, 2, {"a": _nested_lists(depth)})
    with ckstore.Store(store.path, readonly=True) as reader:
        with pytest.raises(ckstore.ManifestError):
            reader.load(step=2)
        with pytest.warns(ckstore.CorruptCheckpointWarning):
            assert reader.load() == {"a": 1}
        with pytest.warns(ckstore.CorruptCheckpointWarning):
            assert ckstore.resume(reader, {"a": 0}) == 1
        assert reader.verify(2), "verify() and load() agree: the malformed skeleton is a problem"


def _json_depth(node):
    deepest, stack = 0, [(node, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


_WRAPS = {
    "list": lambda x: [x],
    "tuple": lambda x: (x,),
    "int_key_dict": lambda x: {1: x},
    "unsorted_dict": lambda x: {"b": 1, "a": x},
    "plain_dict": lambda x: {"a": x},
}


@pytest.mark.parametrize("wrap", sorted(_WRAPS))
@pytest.mark.parametrize("leaf", [1, math.nan, b"x", torch.ones(1)], ids=["int", "nan", "bytes", "tensor"])
def test_every_state_the_encoder_accepts_the_decoder_accepts(store, wrap, leaf):
    """The nesting limit is one number, in JSON levels of the stored skeleton: the deepest state save() accepts
    loads back, even from a caller already deep in its own stack; one level more is refused by save() naming the key."""
    from ckstore.format.skeleton import MAX_DEPTH

    def nest(n):
        node = leaf
        for _ in range(n):
            node = _WRAPS[wrap](node)
        return {"x": node}

    low, high = 1, MAX_DEPTH  # the deepest n that saves
    while low < high:
        mid = (low + high + 1) // 2
        try:
            encode_state(nest(mid))
            low = mid
        except ckstore.StateError as exc:
            assert exc.key.startswith("state['x']")
            high = mid - 1
    info = store.save(nest(low), step=0)
    raw, _ = _resign(info.path / "manifest.json")
    assert MAX_DEPTH - 3 <= _json_depth(raw["state"]) <= MAX_DEPTH

    def deep_call(levels):
        return deep_call(levels - 1) if levels else store.load(step=0)

    assert_same(deep_call(300), nest(low))
    with pytest.raises(ckstore.StateError):
        store.save(nest(low + 1), step=1)


@pytest.mark.parametrize(
    "node",
    [
        {"$ck": "pickle", "payload": "gASV"},
        {"$ck": "tensor", "file": "x.safetensors"},
        {"$ck": "float", "value": "1e999999"},
        {"$ck": "float", "value": "nan", "bits": "zz" * 8},
        {"$ck": "bytes", "base64": "not base64!"},
        {"$ck": "bytes"},
        {"$ck": "numpy_scalar", "dtype": "<i8", "value": 2**70},
        {"$ck": "numpy_scalar", "dtype": "|u1", "value": -1},
        {"$ck": "numpy_scalar", "dtype": "O", "value": 1},
        {"$ck": "numpy_scalar", "dtype": "<f4", "value": "1.5"},
        {"$ck": "size", "items": [2**70]},
        {"$ck": "size", "items": [-1]},
        {"$ck": "tuple", "items": "abc"},
        {"$ck": "dict", "items": [[1]]},
        {"$ck": "dict", "items": [[[1, 2], 3]]},
        {"$ck": "stateful", "class": "Linear"},
        {"$ck": "device", "name": "cuda:99999999999999999999"},
        {"$ck": "device", "name": "\x1b[31mred"},
        {"$ck": "device", "name": "warp:9"},
        {"$ck": "dtype", "name": "not_a_dtype"},
        {"$ck": 7},
    ],
    ids=lambda node: "-".join(str(v)[:12] for v in node.values()),
)
def test_malformed_nodes_are_manifest_errors_and_load_falls_back(store, node):
    """Every malformed skeleton node is a ManifestError (OverflowError and TypeError escaped before, or a StateError
    that load() did not fall back on) and verify() reports it."""
    store.save({"a": 1}, step=1)
    _with_state(store, 2, {"a": node})
    with ckstore.Store(store.path, readonly=True) as reader:
        with pytest.raises(ckstore.ManifestError):
            reader.load(step=2)
        with pytest.warns(ckstore.CorruptCheckpointWarning):
            assert reader.load() == {"a": 1}
        assert reader.verify(2)


def test_dtype_names_are_looked_up_in_a_table_never_as_torch_attributes(store, run_python):
    """getattr(torch, name) on a crafted name imported torch.onnx (seconds, and code the user never asked for)."""
    info = _with_state(store, 0, {"a": {"$ck": "dtype", "name": "onnx"}, "b": {"$ck": "dtype", "name": "bfloat16"}})
    code = (
        "import sys, ckstore\n"
        f"s = ckstore.Store({str(store.path)!r}, readonly=True)\n"
        "try:\n    s.load(step=0)\nexcept ckstore.ManifestError as e:\n    print('refused', type(e).__name__)\n"
        "print('onnx imported' if 'torch.onnx' in sys.modules else 'onnx not imported')\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "refused ManifestError" in result.stdout and "onnx not imported" in result.stdout
    raw, write = _resign(info.path / "manifest.json")
    raw["state"]["a"]["name"] = "float16"
    write()
    assert store.load(step=0) == {"a": torch.float16, "b": torch.bfloat16}


def test_the_number_of_skeleton_values_is_capped_on_save_and_on_load(store, monkeypatch):
    """A skeleton of more values than the cap is refused on load (a typed error, then fallback), and save() refuses
    to write one: a checkpoint that could not be loaded again is never committed."""
    import ckstore.format.skeleton as decode

    monkeypatch.setattr(decode, "MAX_VALUES", 1000)
    store.save({"a": list(range(900))}, step=1)
    assert store.load(step=1) == {"a": list(range(900))}
    with pytest.raises(ckstore.StateError) as excinfo:
        store.save({"a": list(range(1000))}, step=2)
    assert "1000" in str(excinfo.value)
    monkeypatch.setattr(decode, "MAX_VALUES", 10_000)
    _with_state(store, 3, {"a": list(range(5000))})
    monkeypatch.setattr(decode, "MAX_VALUES", 1000)
    with ckstore.Store(store.path, readonly=True) as reader:
        with pytest.raises(ckstore.ManifestError):
            reader.load(step=3)
        with pytest.warns(ckstore.CorruptCheckpointWarning):
            assert reader.load() == {"a": list(range(900))}


# ---------------------------------------------------------------- NumPy values ckstore cannot store


@pytest.mark.parametrize(
    "value, what",
    [
        (np.longdouble(1.5), "longdouble"),
        (np.clongdouble(1.5), "clongdouble"),
        (np.zeros(3, dtype=np.longdouble), "longdouble"),
        (np.arange(3, dtype=">f4"), "big-endian"),
        (np.arange(3, dtype=">i8").reshape(3, 1), "big-endian"),
        (np.complex64(1 + 2j), "complex"),
        (np.datetime64("2026-12-02"), "datetime64"),
    ],
    ids=["longdouble_scalar", "clongdouble_scalar", "longdouble_array", "big_endian_f4", "big_endian_i8", "complex_scalar", "datetime_scalar"],
)
@pytest.mark.parametrize("blocking", [True, False], ids=["sync", "background"])
def test_numpy_values_that_cannot_be_stored_name_their_key(store, value, what, blocking):
    """np.longdouble scalars recursed forever (a RecursionError, reported as 'nests too deeply'), longdouble and
    big-endian arrays raised torch's untyped TypeError/ValueError."""
    with pytest.raises(ckstore.StateError) as excinfo:
        store.save({"ok": 1, "bad": [value]}, step=0, blocking=blocking)
    assert excinfo.value.key == "state['bad'][0]"
    assert "state['bad'][0]" in str(excinfo.value) and what in str(excinfo.value)
    assert store.checkpoints() == []


def test_numpy_scalars_of_every_storable_dtype_round_trip(store):
    values = [np.bool_(True), np.int8(-3), np.uint8(200), np.int16(-300), np.uint16(60000), np.int32(-7), np.uint32(4_000_000_000),
              np.int64(-(2**62)), np.uint64(2**63 + 5), np.float16(1.5), np.float32(-2.25), np.float64(3.5), np.bytes_(b"raw")]
    store.save({"v": values}, step=0)
    loaded = store.load(step=0)["v"]
    for got, want in zip(loaded, values):
        assert type(got) is type(want) and got == want
