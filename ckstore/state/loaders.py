"""Saving and restoring torchdata's ``StatefulDataLoader`` exactly: the state codec's adapter for data loaders.

Why a loader is saved as its ``state_dict()`` plus its generator's state, and
which loaders are refused, is told in ``ckstore.training.data``'s docstring
(the sampler a resumable run uses instead lives there). This part belongs to
the codec: ``encode`` and ``targets`` call it for every loader in a state, and
the codec sits below ``training`` in the layers (tests/test_architecture.py).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler, SubsetRandomSampler, WeightedRandomSampler

from ..errors import StateError

_LOADER_MODULE = "torchdata.stateful_dataloader.stateful_dataloader"
_SAMPLER_MODULE = "torchdata.stateful_dataloader.sampler"
#: The two entries of a saved StatefulDataLoader (see the module docstring of ``ckstore.training.data``).
_SAVED = frozenset({"generator", "loader"})
_ALTERNATIVES = "use torchdata's StatefulDataLoader, or DataLoader(sampler=ckstore.ResumableSampler(...)) and put the sampler in the state"


def is_stateful_loader(value: object) -> bool:
    """A torchdata ``StatefulDataLoader`` (torchdata is not imported here: if it is not loaded, nothing is one)."""
    module = sys.modules.get(_LOADER_MODULE)
    return module is not None and isinstance(value, module.StatefulDataLoader)


def loader_refusal(value: object) -> str | None:
    """Why ``value``, a data loader, cannot be saved or restored exactly; None if it can (or is not a loader)."""
    if not isinstance(value, DataLoader):
        return None
    if not is_stateful_loader(value):
        return f"a torch DataLoader keeps no position, so a resume would restart its epoch; {_ALTERNATIVES}"
    sampler = value.sampler
    random_without_state = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)
    if isinstance(sampler, random_without_state) and not callable(getattr(sampler, "state_dict", None)):
        return (
            f"StatefulDataLoader over a {type(sampler).__name__} cannot resume its order exactly "
            "(it keeps no state, so torchdata skips ahead in a fresh, differently shuffled pass); "
            "use shuffle=True with generator=, or sampler=ckstore.ResumableSampler(...)"
        )
    samplers = sys.modules.get(_SAMPLER_MODULE)
    if samplers is not None and isinstance(sampler, samplers.RandomSampler) and sampler.replacement:
        return (
            "StatefulDataLoader with a replacement=True RandomSampler cannot resume its order exactly "
            "(torchdata's replay skips the seed drawn between chunks); use replacement=False or sampler=ckstore.ResumableSampler(...)"
        )
    return None


def state_to_save(value: Any, key: str) -> Any:
    """What ckstore stores for an object with ``state_dict()``: that, except for a StatefulDataLoader
    (the loader's state and its generator's)."""
    if not is_stateful_loader(value):
        return value.state_dict()
    refusal = loader_refusal(value)
    if refusal is not None:
        raise StateError(f"{key}: {refusal}", key=key)
    state = value.state_dict()  # first: on a loader not yet iterated it draws the first epoch's numbers
    generator = value.generator
    return {"generator": None if generator is None else generator.get_state(), "loader": state}


def restore_loader(loader: Any, state: Any, key: str) -> None:
    """Restore a StatefulDataLoader so that this epoch and every later one read what the uninterrupted run read.

    ``state`` is what :func:`state_to_save` stored, or a plain
    ``loader.state_dict()`` (the tutorials' pattern, or an older ckstore).
    """
    refusal = loader_refusal(loader)
    if refusal is not None:
        raise StateError(f"{key}: {refusal}", key=key)
    generator = loader.generator
    if isinstance(state, Mapping) and set(state) == _SAVED:
        inner, saved = state["loader"], state["generator"]
        if (saved is None) != (generator is None):
            had = "without" if saved is None else "with"
            raise StateError(
                f"{key}: the checkpoint was saved from a StatefulDataLoader {had} a generator=, this one is the opposite; "
                "the order after the resume would differ",
                key=key,
            )
    else:
        inner, saved = state, None
    loader.load_state_dict(inner)
    # Build the resumed iterator now, as state_dict() does for a loader that
    # has none (iter(loader) then continues with it), so that the draws its
    # construction makes can be undone here: from the loader's generator
    # (set to its saved state below) or, without one, from torch's global
    # generator, which RNGState may already have restored.
    global_state = torch.get_rng_state()
    try:
        loader.state_dict()
    finally:
        torch.set_rng_state(global_state)
    if generator is None:
        return
    if saved is not None:
        generator.set_state(saved)
    elif loader.num_workers == 0 and isinstance(loader.sampler, sys.modules[_SAMPLER_MODULE].RandomSampler):
        # A plain state_dict() lacks the generator's state. torchdata's replay
        # left it after the epoch's randperm; the single-process iterator drew
        # the worker seed next, which torchdata does not replay: draw it here.
        torch.empty((), dtype=torch.int64).random_(generator=generator)
