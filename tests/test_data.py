"""ResumableSampler: a resumed loader reads exactly the uninterrupted order, this epoch and every later one."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader

import ckstore

torchdata = pytest.importorskip("torchdata.stateful_dataloader", reason="torchdata is part of the dev extra")
StatefulDataLoader = torchdata.StatefulDataLoader

EPOCHS = 3


def plain(dataset, sampler, **kwargs):
    return DataLoader(dataset, batch_size=kwargs.pop("batch_size", 4), sampler=sampler, **kwargs)


def stateful(dataset, sampler, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchdata 0.11 warns about a deprecated torch.set_vital call
        return StatefulDataLoader(dataset, batch_size=kwargs.pop("batch_size", 4), sampler=sampler, generator=torch.Generator(), **kwargs)


def read(loader, sampler, *, tracked: bool, epochs: int = EPOCHS, cut: int | None = None):
    """Read ``epochs`` epochs as (epoch, batch) pairs; with ``cut``, stop after that many and return the state too."""
    got = []
    for epoch in range(sampler.epoch, epochs):
        for batch in sampler.track(loader) if tracked else loader:
            got.append((epoch, batch.tolist()))
            if cut is not None and len(got) == cut:
                return got, (sampler.state_dict(), None if tracked else loader.state_dict())
    return got, None


def interrupted(make, dataset, cut, *, tracked, **kwargs):
    """Read up to ``cut`` batches, save, build everything afresh from the saved state, read the rest."""
    sampler = ckstore.ResumableSampler(len(dataset), seed=3)
    got, saved = read(make(dataset, sampler, **kwargs), sampler, tracked=tracked, cut=cut)
    sampler = ckstore.ResumableSampler(len(dataset), seed=3)
    loader = make(dataset, sampler, **kwargs)
    sampler.load_state_dict(saved[0])
    if saved[1] is not None:
        loader.load_state_dict(saved[1])
    rest, _ = read(loader, sampler, tracked=tracked)
    return got + rest


def uninterrupted(make, dataset, *, tracked, **kwargs):
    sampler = ckstore.ResumableSampler(len(dataset), seed=3)
    return read(make(dataset, sampler, **kwargs), sampler, tracked=tracked)[0]


# ---------------------------------------------------------------- the order itself


def test_order_is_a_pure_function_of_seed_and_epoch():
    a, b = ckstore.ResumableSampler(50, seed=1), ckstore.ResumableSampler(50, seed=1)
    assert a.order(3) == b.order(3)
    assert sorted(a.order(0)) == list(range(50))
    assert a.order(0) != a.order(1)
    assert a.order(0) != ckstore.ResumableSampler(50, seed=2).order(0)
    assert ckstore.ResumableSampler(5, shuffle=False).order(4) == [0, 1, 2, 3, 4]
    assert a.sample_seed(7, epoch=2) == b.sample_seed(7, epoch=2) != a.sample_seed(8, epoch=2)


def test_plain_iteration_moves_through_epochs():
    sampler = ckstore.ResumableSampler(6, seed=0)
    first, second = list(sampler), list(sampler)
    assert first == sampler.order(0) and second == sampler.order(1)
    assert sampler.epoch == 1 and len(sampler) == 6


# ---------------------------------------------------------------- resume at every cut


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("make, tracked", [(plain, True), (stateful, False)], ids=["DataLoader", "StatefulDataLoader"])
def test_resume_at_every_batch_single_process(make, tracked, drop_last):
    dataset = list(range(22))
    reference = uninterrupted(make, dataset, tracked=tracked, drop_last=drop_last)
    assert len(reference) == EPOCHS * (5 if drop_last else 6)
    for cut in range(1, len(reference) + 1):
        assert interrupted(make, dataset, cut, tracked=tracked, drop_last=drop_last) == reference, f"cut after batch {cut}"


@pytest.mark.parametrize("make, tracked", [(plain, True), (stateful, False)], ids=["DataLoader", "StatefulDataLoader"])
def test_resume_with_two_workers(make, tracked):
    dataset = list(range(22))
    reference = uninterrupted(make, dataset, tracked=tracked, num_workers=2)
    assert reference == uninterrupted(make, dataset, tracked=tracked)  # workers change nothing
    for cut in (2, 6, 7, 11):  # mid-epoch, the last batch of an epoch, the first of the next, mid-epoch 2
        assert interrupted(make, dataset, cut, tracked=tracked, num_workers=2) == reference, f"cut after batch {cut}"


@given(
    length=st.integers(1, 40),
    batch_size=st.integers(1, 9),
    drop_last=st.booleans(),
    cut_fraction=st.floats(0, 1),
    seed=st.integers(0, 2**32),
)
def test_property_any_cut_any_shape(length, batch_size, drop_last, cut_fraction, seed):
    dataset = list(range(length))

    def make(dataset, sampler):
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last)

    sampler = ckstore.ResumableSampler(length, seed=seed)
    reference, _ = read(make(dataset, sampler), sampler, tracked=True)
    if not reference:
        return
    cut = max(1, round(cut_fraction * len(reference)))
    sampler = ckstore.ResumableSampler(length, seed=seed)
    got, saved = read(make(dataset, sampler), sampler, tracked=True, cut=cut)
    sampler = ckstore.ResumableSampler(length, seed=seed)
    sampler.load_state_dict(saved[0])
    rest, _ = read(make(dataset, sampler), sampler, tracked=True)
    assert got + rest == reference


def test_state_survives_a_real_store(tmp_path):
    dataset = list(range(10))
    sampler = ckstore.ResumableSampler(10, seed=4)
    loader = plain(dataset, sampler, batch_size=3)
    batches = sampler.track(loader)
    next(batches), next(batches)
    with ckstore.Store(tmp_path / "s") as store:
        store.save({"data": sampler}, step=1)
        fresh = ckstore.ResumableSampler(10, seed=4)
        store.load({"data": fresh})
    assert (fresh.epoch, fresh.position) == (0, 6)
    assert [b.tolist() for b in fresh.track(plain(dataset, fresh, batch_size=3))] == [b.tolist() for b in batches]


def test_breaking_out_keeps_the_position():
    dataset = list(range(12))
    sampler = ckstore.ResumableSampler(12, seed=0)
    loader = plain(dataset, sampler)
    for i, _ in enumerate(sampler.track(loader)):
        if i == 1:
            break
    assert (sampler.epoch, sampler.position) == (0, 8)
    rest = [b.tolist() for b in sampler.track(loader)]
    assert sum(rest, []) == sampler.order(0)[8:]
    assert (sampler.epoch, sampler.position) == (1, 0)


def test_tracked_iteration_leaves_the_global_torch_rng_alone():
    """A plain DataLoader draws its worker seed from torch's global RNG; a resume could not replay that draw."""
    sampler = ckstore.ResumableSampler(8, seed=0)
    loader = plain(list(range(8)), sampler)
    before = torch.get_rng_state()
    list(sampler.track(loader))
    assert torch.equal(before, torch.get_rng_state())


def test_shuffle_true_stateful_loader_shifts_later_epochs():
    """Documents the torchdata behaviour ResumableSampler exists for (see ckstore/training/data.py).

    If this starts failing, torchdata fixed it: update the module docstring and README.
    """
    dataset = list(range(20))

    def make():
        g = torch.Generator().manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return StatefulDataLoader(dataset, batch_size=4, shuffle=True, generator=g)

    loader = make()
    reference = [b.tolist() for _ in range(2) for b in loader]
    loader = make()
    iterator = iter(loader)
    got = [next(iterator).tolist(), next(iterator).tolist()]
    saved = loader.state_dict()
    resumed = make()
    resumed.load_state_dict(saved)
    got += [b.tolist() for b in resumed]
    assert got == reference[:5]  # the rest of the interrupted epoch is right
    got += [b.tolist() for b in resumed]
    assert got[5:] != reference[5:]  # the next epoch is not


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs", [{"length": -1}, {"length": 2.5}, {"length": True}, {"length": 4, "seed": -3}])
def test_bad_arguments(kwargs):
    length = kwargs.pop("length")
    with pytest.raises(ckstore.InvalidArgumentError):
        ckstore.ResumableSampler(length, **kwargs)


@pytest.mark.parametrize(
    "state",
    [
        {"epoch": 0, "position": 0, "seed": 9},
        {"epoch": 0, "position": 0, "length": 11},
        {"epoch": 0, "position": 0, "shuffle": False},
        {"epoch": -1, "position": 0},
        {"epoch": 0, "position": 11},
        {"epoch": 0},
        {"epoch": "0", "position": 0},
        [0, 0],
    ],
)
def test_state_that_does_not_fit_is_a_state_error(state):
    with pytest.raises(ckstore.StateError):
        ckstore.ResumableSampler(10, seed=0).load_state_dict(state)


def test_track_refuses_a_loader_that_is_not_its_own():
    sampler = ckstore.ResumableSampler(4)
    with pytest.raises(ckstore.InvalidArgumentError):
        next(sampler.track(DataLoader(list(range(4)), batch_size=2)))
    with pytest.raises(ckstore.InvalidArgumentError):
        next(sampler.track(DataLoader(list(range(4)), batch_size=None, sampler=sampler)))
    with pytest.raises(ckstore.InvalidArgumentError):
        next(sampler.track([1, 2, 3]))


@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_dataloader_state_survives_a_real_store(tmp_path, workers):
    """First-class StatefulDataLoader support: its snapshot (prefetching included) goes through the store."""
    dataset = list(range(22))
    reference = uninterrupted(stateful, dataset, tracked=False, num_workers=workers)
    sampler = ckstore.ResumableSampler(len(dataset), seed=3)
    loader = stateful(dataset, sampler, num_workers=workers)
    got, saved = read(loader, sampler, tracked=False, cut=8)  # epoch 1, second batch
    with ckstore.Store(tmp_path / "s") as store:
        store.save({"loader": loader, "sampler": sampler}, step=8)
        del loader
        sampler = ckstore.ResumableSampler(len(dataset), seed=3)
        loader = stateful(dataset, sampler, num_workers=workers)
        assert ckstore.resume(store, {"loader": loader, "sampler": sampler}) == 8
    assert sampler.epoch == 1
    rest, _ = read(loader, sampler, tracked=False)
    assert got + rest == reference


# ---------------------------------------------------------------- StatefulDataLoader(shuffle=True, generator=g) through a store


def _shuffling(dataset, workers, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return StatefulDataLoader(dataset, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(seed), num_workers=workers)


def _epochs(loader, epochs, *, cut=None, store=None):
    """Read ``epochs`` epochs; with ``cut``, save {"loader": loader} to ``store`` after that many batches and stop."""
    got = []
    for _ in range(epochs):
        for batch in loader:
            got.append(batch.tolist())
            if cut is not None and len(got) == cut:
                store.save({"loader": loader}, step=cut)
                return got
    return got


def _resumed_in_a_fresh_process(run_python, store_path, cuts, workers, epochs):
    """A new interpreter builds, for each checkpoint, a fresh loader (another seed), loads it and reads to the end of ``epochs``."""
    code = f"""
import json, warnings
import torch, ckstore
from torchdata.stateful_dataloader import StatefulDataLoader
warnings.simplefilter("ignore")
out = {{}}
with ckstore.Store({str(store_path)!r}, readonly=True) as store:
    for cut in {list(cuts)!r}:
        loader = StatefulDataLoader(list(range(22)), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(123), num_workers={workers})
        store.load({{"loader": loader}}, step=cut)
        rest = []
        for _ in range({epochs} - (cut - 1) // 6):  # the interrupted epoch's rest, then the later ones
            rest += [b.tolist() for b in loader]
        out[cut] = rest
print(json.dumps(out))
"""
    result = run_python(code, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return {int(k): v for k, v in json.loads(result.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.guarantee("G18")
@pytest.mark.parametrize("workers", [0, 2])
def test_a_shuffling_stateful_loader_resumes_bitwise_in_a_fresh_process(tmp_path, run_python, workers):
    """Stopped mid-epoch (or at an epoch's last batch) and resumed in a new process: this epoch and every later one
    read exactly what the uninterrupted run read. Before the fix, with 0 workers every later epoch was shuffled anew."""
    dataset = list(range(22))  # 6 batches an epoch, the last one short
    epochs = 3
    reference = _epochs(_shuffling(dataset, workers), epochs)
    cuts = [2, 6, 9] if workers else [2, 5, 6, 7, 11]
    with ckstore.Store(tmp_path / "s") as store:
        for cut in cuts:
            assert _epochs(_shuffling(dataset, workers), epochs, cut=cut, store=store) == reference[:cut]
    rests = _resumed_in_a_fresh_process(run_python, tmp_path / "s", cuts, workers, epochs)
    for cut in cuts:
        assert reference[:cut] + rests[cut] == reference, f"resumed after batch {cut}"


def test_a_plain_state_dict_of_a_shuffling_loader_resumes_bitwise_too(tmp_path):
    """The tutorials' pattern: {"loader": loader.state_dict()} saved, loaded into {"loader": loader}."""
    dataset = list(range(22))
    reference = _epochs(_shuffling(dataset, 0), 3)
    loader = _shuffling(dataset, 0)
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    with ckstore.Store(tmp_path / "s") as store:
        store.save({"loader": loader.state_dict()}, step=1)
        fresh = _shuffling(dataset, 0, seed=99)
        store.load({"loader": fresh}, step=1)
    rest = [b.tolist() for _ in range(3) for b in fresh]
    assert reference[:3] + rest == reference


def test_a_plain_dataloader_is_refused_naming_the_key_and_what_to_use(store):
    loader = DataLoader(list(range(8)), batch_size=2, shuffle=True)
    with pytest.raises(ckstore.StateError) as excinfo:
        store.save({"model": torch.nn.Linear(2, 2), "data": {"train": loader}}, step=1)
    assert excinfo.value.key == "state['data']['train']"
    assert "StatefulDataLoader" in str(excinfo.value) and "ResumableSampler" in str(excinfo.value)
    store.save({"data": {"train": {"epoch": 1}}}, step=1)
    with pytest.raises(ckstore.StateError) as excinfo:
        store.load({"data": {"train": loader}}, step=1)
    assert excinfo.value.key == "state['data']['train']" and "ResumableSampler" in str(excinfo.value)


@pytest.mark.parametrize(
    "make",
    [
        lambda d: StatefulDataLoader(d, batch_size=2, sampler=torch.utils.data.RandomSampler(d)),
        lambda d: StatefulDataLoader(d, batch_size=2, sampler=torch.utils.data.SubsetRandomSampler(range(len(d)))),
        lambda d: StatefulDataLoader(d, batch_size=2, sampler=torchdata.sampler.RandomSampler(d, replacement=True, generator=torch.Generator())),
    ],
    ids=["random_sampler", "subset_random_sampler", "with_replacement"],
)
def test_stateful_loaders_that_cannot_resume_exactly_are_refused(store, make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = make(list(range(8)))
    with pytest.raises(ckstore.StateError) as excinfo:
        store.save({"loader": loader}, step=1)
    assert excinfo.value.key == "state['loader']" and "ResumableSampler" in str(excinfo.value)


def test_a_loader_with_a_generator_does_not_load_into_one_without(store):
    loader = _shuffling(list(range(8)), 0)
    next(iter(loader))
    store.save({"loader": loader}, step=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = StatefulDataLoader(list(range(8)), batch_size=4, shuffle=True)
    with pytest.raises(ckstore.StateError) as excinfo:
        store.load({"loader": other}, step=1)
    assert "generator" in str(excinfo.value)
