"""Resumable data order: :class:`ResumableSampler`, and saving and restoring torchdata's ``StatefulDataLoader`` exactly.

The order of an epoch is a pure function of ``(seed, epoch)``, so resuming
needs only two integers: the epoch and how many of its samples the training
loop has already taken. Nothing depends on a generator's running state, which
is what makes the *later* epochs of a resumed run line up too.

``StatefulDataLoader(shuffle=True, generator=g)`` (torchdata 0.11, measured
with torch 2.13) is supported too, through a workaround: its sampler iterator
saves the generator state from *before* the epoch's ``randperm`` and replays
the ``randperm`` on load, but the loader draws one more number from the same
generator for each epoch (the worker base seed, ``_BaseDataLoaderIter.__init__``),
and a resumed single-process loader does not replay that draw: the rest of
the current epoch would be right and every later epoch a different
permutation. So ckstore saves such a loader as its ``state_dict()`` plus the
generator's state at the moment of the save, and on load builds the resumed
iterator at once and puts the generator back to that state (see
:func:`ckstore.state.loaders.restore_loader`): every later epoch then draws what the uninterrupted
run drew, with 0 or more workers. Loaders whose order cannot be resumed
exactly are refused with a :class:`StateError` (:func:`ckstore.state.loaders.loader_refusal`): a
plain ``DataLoader`` (it has no state), and a ``StatefulDataLoader`` over a
random sampler that keeps no state (``torch.utils.data.RandomSampler``,
``SubsetRandomSampler``, ``WeightedRandomSampler``: torchdata fast-forwards a
fresh, differently shuffled pass) or over torchdata's ``RandomSampler`` with
``replacement=True`` (its replay skips the seed draw between chunks).

Supported:

* plain ``torch.utils.data.DataLoader`` over a map-style dataset, any
  ``num_workers``, ``batch_size`` set (so that a batch's size is known), with
  ``sampler=ResumableSampler(...)`` and the loop iterating
  ``sampler.track(loader)``. Put the sampler in the saved state.
* torchdata's ``StatefulDataLoader`` with ``sampler=ResumableSampler(...)``:
  put the loader in the saved state (its snapshot carries the position,
  prefetching included) and the sampler too (for the epoch number). Pass the
  loader a ``generator=`` of its own so that creating an iterator does not draw
  from torch's global generator.
* torchdata's ``StatefulDataLoader(dataset, shuffle=True, generator=g)``, any
  ``num_workers``: put the loader in the saved state (see above).

What a resume does not restore: the RNG state *inside* worker processes
mid-epoch. Workers of a tracked loader are seeded from ``(seed, epoch)`` (the
loader's generator is set for that), so random transforms in workers are
reproducible across epochs; to be exact across a mid-epoch resume, derive a
transform's randomness from the sample index (:meth:`sample_seed`). With
``persistent_workers=True`` the order is still exact, but workers keep the
seed of the first epoch their process read.

Not supported: iterable-style datasets (their position lives in the dataset:
use StatefulDataLoader with a stateful dataset), a custom ``batch_sampler``
without a ``batch_size``, and changing the dataset length across a resume
(refused with :class:`StateError`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import Sampler

from ..errors import InvalidArgumentError, StateError


def _mix(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (stable across processes and runs)."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class ResumableSampler(Sampler[int]):
    """Yields the indices of a map-style dataset in an order fixed by ``(seed, epoch)``.

    State (``state_dict``): ``epoch`` (the epoch being read) and ``position``
    (how many of its samples the training loop has taken). ``shuffle=False``
    reads ``0 .. length-1`` in order every epoch.
    """

    def __init__(self, length: int, *, seed: int = 0, shuffle: bool = True) -> None:
        for name, value in (("length", length), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgumentError(f"{name} must be a non-negative integer, got {value!r}")
        self.length = int(length)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.position = 0
        # Set once an iterator has handed out the epoch's last index: the next
        # __iter__ then starts the next epoch. Never saved (see track()).
        self._handed_out_all = False
        self._cache: tuple[int, list[int]] | None = None

    # ------------------------------------------------------------ order

    def order(self, epoch: int) -> list[int]:
        """The indices of ``epoch`` in the order they are read."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(_mix("order", self.seed, epoch))
            indices = torch.randperm(self.length, generator=generator).tolist()
        else:
            indices = list(range(self.length))
        self._cache = (epoch, indices)
        return indices

    def sample_seed(self, index: int, epoch: int | None = None) -> int:
        """A seed for random transforms of sample ``index`` that a resume reproduces exactly."""
        return _mix("sample", self.seed, self.epoch if epoch is None else epoch, int(index))

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        if self._handed_out_all:
            self.epoch += 1
            self.position = 0
            self._handed_out_all = False
        return _SamplerIterator(self, self.epoch, self.position)

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "length": self.length, "shuffle": self.shuffle}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        epoch, position = _check_position(state, "sampler")
        for name in ("seed", "length", "shuffle"):
            if name in state and state[name] != getattr(self, name):
                raise StateError(
                    f"sampler: the checkpoint was taken with {name}={state[name]!r}, this sampler has {name}={getattr(self, name)!r}; "
                    "the saved position would point into a different order",
                    key=f"sampler.{name}",
                )
        if position > self.length:
            raise StateError(f"sampler: position {position} is past the end of an epoch of {self.length}", key="sampler.position")
        self.epoch, self.position = epoch, position
        self._handed_out_all = False

    # ------------------------------------------------------------ plain DataLoader

    def track(self, loader: Iterable[Any]) -> Iterator[Any]:
        """Iterate one epoch (or its rest, after a resume) of ``loader``, counting what the loop takes.

        ``loader`` is a ``DataLoader`` built with ``sampler=self`` and a
        ``batch_size``. The position advances as each batch is handed to the
        loop, before the loop body runs, so a checkpoint saved in the body
        counts that batch as done. When the loader is exhausted the sampler
        moves to the next epoch. Breaking out early keeps the position: the
        next ``track`` continues the same epoch.

        The loader's ``generator`` is set from ``(seed, epoch)``: it only seeds
        worker processes when a sampler is given, and without it creating the
        iterator would draw from torch's global generator, which a resume
        restores to a point after that draw.
        """
        batch_size = _batch_size_of(loader, self)
        generator = torch.Generator()
        generator.manual_seed(_mix("workers", self.seed, self.epoch))
        loader.generator = generator  # type: ignore[attr-defined]
        self._handed_out_all = False
        epoch = self.epoch
        for batch in loader:
            self.position = min(self.position + batch_size, self.length)
            yield batch
        if self.epoch == epoch:
            self.epoch += 1
            self.position = 0
            self._handed_out_all = False


class _SamplerIterator(Iterator[int]):
    """One pass over an epoch from a position; stateful for torchdata's StatefulDataLoader snapshots."""

    def __init__(self, sampler: ResumableSampler, epoch: int, position: int) -> None:
        self.sampler = sampler
        self.epoch = epoch
        self.position = position
        self._order: list[int] | None = None

    def __iter__(self) -> _SamplerIterator:
        return self

    def __next__(self) -> int:
        order = self._order
        if order is None:
            order = self._order = self.sampler.order(self.epoch)
        position = self.position
        if position >= len(order):
            self._mark_done()
            raise StopIteration
        self.position = position + 1
        if position + 1 == len(order):
            self._mark_done()
        return order[position]

    def _mark_done(self) -> None:
        if self.sampler.epoch == self.epoch:
            self.sampler._handed_out_all = True

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        epoch, position = _check_position(state, "sampler iterator")
        if position > self.sampler.length:
            raise StateError(f"sampler iterator: position {position} is past the end of the epoch", key="sampler.position")
        self.epoch, self.position = epoch, position
        self._order = None
        self.sampler.epoch = epoch
        self.sampler._handed_out_all = position >= self.sampler.length


def _check_position(state: Any, what: str) -> tuple[int, int]:
    if not isinstance(state, Mapping):
        raise StateError(f"{what}: state must be a mapping, got {type(state).__name__}", key=what)
    try:
        epoch, position = state["epoch"], state["position"]
    except KeyError as exc:
        raise StateError(f"{what}: state lacks {exc.args[0]!r}", key=what) from None
    for name, value in (("epoch", epoch), ("position", position)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise StateError(f"{what}: {name} must be a non-negative integer, got {value!r}", key=f"{what}.{name}")
    return int(epoch), int(position)


def _batch_size_of(loader: Any, sampler: ResumableSampler) -> int:
    if not hasattr(loader, "batch_sampler") or not hasattr(loader, "sampler"):
        raise InvalidArgumentError(f"track() needs a torch DataLoader, got {type(loader).__name__}")
    batch_sampler = loader.batch_sampler
    uses_me = loader.sampler is sampler or getattr(batch_sampler, "sampler", None) is sampler
    if not uses_me:
        raise InvalidArgumentError("the loader does not read from this sampler; build it with DataLoader(..., sampler=sampler)")
    size = loader.batch_size if loader.batch_size is not None else getattr(batch_sampler, "batch_size", None)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidArgumentError("track() needs a loader with a batch_size (the position is counted in samples)")
    return size
