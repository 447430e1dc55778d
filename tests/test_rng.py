"""RNGState: every generator continues exactly where the checkpoint left it; stored without pickle."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ckstore
from ckstore.state.decode import decode_state
from ckstore.state.encode import encode_state


def draw(generators: dict[str, torch.Generator]) -> list:
    """A few numbers from every generator RNGState covers, including the cached-gaussian paths."""
    out = [random.random(), random.gauss(0, 1), random.getrandbits(64)]
    out += [float(np.random.rand()), float(np.random.normal()), int(np.random.randint(0, 2**31))]
    out += torch.rand(3).tolist() + torch.randn(2).tolist()
    for name in sorted(generators):
        out += torch.rand(2, generator=generators[name]).tolist()
    return out


def in_memory_roundtrip(rng: ckstore.RNGState) -> None:
    """Save ``rng`` as ckstore stores it (JSON skeleton + tensors), then load it back into ``rng``."""
    encoded = encode_state({"rng": rng})
    tensors = {(name, key): tensor.clone() for name, entries in encoded.files.items() for key, tensor in entries}
    skeleton = json.loads(json.dumps(encoded.skeleton))  # must be plain JSON
    decode_state(skeleton, lambda f, k: tensors[(f, k)], target={"rng": rng})


@pytest.fixture(autouse=True)
def _keep_global_rngs():
    """Tests here reseed the global generators; put them back afterwards."""
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    yield
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])


def test_store_roundtrip_continues_every_generator(tmp_path):
    extra = torch.Generator().manual_seed(5)
    rng = ckstore.RNGState(generators={"aug": extra})
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves gauss_next cached
    np.random.normal()  # leaves NumPy's cached gaussian
    with ckstore.Store(tmp_path / "s") as store:
        store.save({"rng": rng}, step=1)
        expected = draw({"aug": extra})
        draw({"aug": extra})  # move everything further on
        random.seed(99)
        store.load({"rng": rng})
    assert draw({"aug": extra}) == expected


def test_captured_as_tensors_and_json(tmp_path):
    rng = ckstore.RNGState(generators={"g": torch.Generator()})
    encoded = encode_state({"rng": rng})
    dtypes = {key: tensor.dtype for entries in encoded.files.values() for key, tensor in entries}
    assert dtypes["rng/python/state"] == torch.int64
    assert dtypes["rng/numpy/key"] == torch.uint32
    assert dtypes["rng/torch"] == torch.uint8
    assert dtypes["rng/generators/g"] == torch.uint8
    json.dumps(encoded.skeleton, allow_nan=False)  # the rest is plain JSON


@given(
    seeds=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1)),
    warmup=st.integers(0, 700),
)
def test_property_restore_reproduces_the_next_draws(seeds, warmup):
    random.seed(seeds[0])
    np.random.seed(seeds[1])
    torch.manual_seed(seeds[2])
    extra = torch.Generator().manual_seed(seeds[3])
    for _ in range(warmup):  # walk MT19937 past its 624-word refill now and then
        random.random()
    np.random.rand(warmup)
    torch.rand(warmup)
    rng = ckstore.RNGState()
    rng.register("extra", extra)
    snapshot = rng.state_dict()
    expected = draw({"extra": extra})
    rng.load_state_dict(snapshot)
    assert draw({"extra": extra}) == expected
    rng.load_state_dict(snapshot)
    in_memory_roundtrip(rng)
    assert draw({"extra": extra}) == expected


def test_switched_off_generators_are_left_alone():
    rng = ckstore.RNGState(python=False, numpy=False)
    snapshot = rng.state_dict()
    assert set(snapshot) == {"torch"}
    random.seed(7)
    expected = random.random()
    random.seed(7)
    rng.load_state_dict(snapshot)
    assert random.random() == expected


def test_cuda_state_is_not_touched_without_cuda():
    assert "cuda" not in ckstore.RNGState().state_dict() or torch.cuda.is_initialized()


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda s: s.pop("python"), "rng.python"),
        (lambda s: s.pop("numpy"), "rng.numpy"),
        (lambda s: s.pop("torch"), "rng.torch"),
        (lambda s: s["python"].update(state=torch.zeros(3, dtype=torch.int64)), "rng.python"),
        (lambda s: s["numpy"].pop("key"), "rng.numpy"),
        (lambda s: s.update(torch=torch.zeros(4, dtype=torch.float32)), "rng.torch"),
        (lambda s: s.pop("generators"), "rng.generators"),
        (lambda s: s["generators"].update(g=torch.zeros(3, dtype=torch.uint8)), "rng.generators.g"),
    ],
)
def test_bad_state_is_a_state_error(mutate, key):
    rng = ckstore.RNGState(generators={"g": torch.Generator()})
    state = rng.state_dict()
    mutate(state)
    with pytest.raises(ckstore.StateError) as info:
        rng.load_state_dict(state)
    assert info.value.key == key


def test_not_a_mapping_is_a_state_error():
    with pytest.raises(ckstore.StateError):
        ckstore.RNGState().load_state_dict([1, 2, 3])


def test_register_refuses_bad_input():
    rng = ckstore.RNGState()
    with pytest.raises(ckstore.InvalidArgumentError):
        rng.register("x", np.random.default_rng())
    with pytest.raises(ckstore.InvalidArgumentError):
        rng.register("", torch.Generator())
    g = torch.Generator()
    rng.register("g", g)
    rng.register("g", g)  # the same one again is fine
    with pytest.raises(ckstore.InvalidArgumentError):
        rng.register("g", torch.Generator())
    assert rng.generators == {"g": g}


def test_dropout_masks_repeat_after_restore(tmp_path):
    """The reason it exists: dropout after a resume draws the masks the uninterrupted run drew."""
    layer = torch.nn.Dropout(0.5)
    x = torch.ones(64)
    rng = ckstore.RNGState()
    torch.manual_seed(0)
    with ckstore.Store(tmp_path / "s") as store:
        store.save({"rng": rng}, step=1)
        first = [layer(x) for _ in range(3)]
        torch.manual_seed(12345)
        store.load({"rng": rng})
    again = [layer(x) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in itertools.pairwise(first))
