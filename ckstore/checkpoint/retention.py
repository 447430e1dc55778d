"""Which checkpoints to keep: a pure function of the committed checkpoints and a policy.

No I/O happens here; the store applies the result only after the newest
checkpoint is durable.

**Commit order.** Checkpoints are ordered by when they were committed (the
manifest's ``created``, which the store makes strictly increasing; ties, only
possible in stores written by hand, go to the higher step), not by step number.
"Latest" is the last committed checkpoint. In an ordinary run the two orders
agree. After a rollback (``load(step="release")`` then ``save(step=101)`` in a
store that holds step 300) they differ, and commit order is what a user
expects: the rolled-back run's saves are the newest, so they are what
``latest``, ``load()`` and ``resume()`` return, and the steps left ahead of
them (300) are older commits that ``keep_last`` phases out as the new run saves.

The kept set is the union of:

* the newest commit, always, and every step in ``protect`` (the store passes
  the checkpoint the save just committed, so a save's own retention can never
  remove it, whatever its step);
* the ``keep_last`` most recently committed;
* the ``keep_best`` best by ``metric`` (``mode`` ``"min"`` or ``"max"``; a
  checkpoint without the metric is never "best"; ties go to the newer step);
* every checkpoint whose step is a multiple of ``keep_every``;
* every tagged (pinned) checkpoint.

A policy with none of ``keep_last``, ``keep_best``, ``keep_every`` set keeps
everything.

**Corrupt checkpoints hold no slot.** :func:`plan_deletions` takes the steps
known to be corrupt, ranks only the others, and never deletes a corrupt one:
it stays where it is (``load`` skips it with a warning) until a save of its
step moves it into the store's quarantine. The store knows a checkpoint is
corrupt when its manifest does not parse (it is then not even listed) or when
a load, ``resume`` or ``verify`` through the same ``Store`` object found a
file that fails verification.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import InvalidArgumentError
from ..format.text import has_unsafe_chars


class Ranked(Protocol):
    @property
    def step(self) -> int: ...

    @property
    def created(self) -> float: ...

    @property
    def metrics(self) -> Mapping[str, float]: ...

    @property
    def tags(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int | None = None
    keep_best: int | None = None
    metric: str | None = None
    mode: str = "min"
    keep_every: int | None = None

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_best", "keep_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidArgumentError(f"{name} must be a positive integer or None, got {value!r}")
        if self.mode not in ("min", "max"):
            raise InvalidArgumentError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if self.keep_best is not None and not self.metric:
            raise InvalidArgumentError("keep_best needs metric= (the metric to rank checkpoints by)")
        if self.metric is not None and (not isinstance(self.metric, str) or not self.metric):
            raise InvalidArgumentError(f"metric must be a non-empty string, got {self.metric!r}")
        if self.metric is not None and has_unsafe_chars(self.metric):
            raise InvalidArgumentError(f"metric {self.metric!r} holds control or format characters")  # as check_metrics refuses

    @property
    def prunes(self) -> bool:
        """True when the policy can delete anything."""
        return self.keep_last is not None or self.keep_best is not None or self.keep_every is not None


def rank_best(checkpoints: Iterable[Ranked], metric: str, mode: str = "min") -> list[Ranked]:
    """Checkpoints that have ``metric``, best first; among equal values the newer step first."""
    scored = [c for c in checkpoints if metric in c.metrics]
    sign = 1 if mode == "min" else -1
    return sorted(scored, key=lambda c: (sign * c.metrics[metric], -c.step))


def commit_order(checkpoints: Iterable[Ranked]) -> list[Ranked]:
    """Checkpoints oldest commit first: by ``created``, then by step."""
    return sorted(checkpoints, key=lambda c: (c.created, c.step))


def select_kept(checkpoints: Iterable[Ranked], policy: RetentionPolicy, *, protect: Iterable[int] = ()) -> frozenset[int]:
    """The steps to keep. Everything else may be deleted.

    ``protect``: steps kept whatever the policy says (the checkpoint a save
    just committed); a protected step that is not among ``checkpoints`` is ignored.
    """
    items = commit_order(checkpoints)
    if not items:
        return frozenset()
    if not policy.prunes:
        return frozenset(c.step for c in items)
    present = {c.step for c in items}
    keep = {items[-1].step} | (set(protect) & present)
    if policy.keep_last is not None:
        keep.update(c.step for c in items[-policy.keep_last :])
    if policy.keep_best is not None and policy.metric is not None:
        keep.update(c.step for c in rank_best(items, policy.metric, policy.mode)[: policy.keep_best])
    if policy.keep_every is not None:
        keep.update(c.step for c in items if c.step % policy.keep_every == 0)
    keep.update(c.step for c in items if c.tags)
    return frozenset(keep)


def plan_deletions(
    checkpoints: Iterable[Ranked], policy: RetentionPolicy, *, protect: Iterable[int] = (), corrupt: Iterable[int] = ()
) -> list[int]:
    """The steps retention deletes, ascending: those not kept among the checkpoints not known corrupt.

    A corrupt checkpoint is left out before ranking, so it holds no slot
    (newest, last, best, every) and is never in the result.
    """
    bad = set(corrupt)
    sound = [c for c in checkpoints if c.step not in bad]
    keep = select_kept(sound, policy, protect=protect)
    return sorted(c.step for c in sound if c.step not in keep)


def left_ahead(checkpoints: Iterable[Ranked], step: int) -> bool:
    """True when a checkpoint with a lower step than ``step`` was committed after it: a rollback left ``step`` ahead of the run."""
    items = list(checkpoints)
    mine = [c for c in items if c.step == step]
    if not mine:
        return False
    created = mine[0].created
    return any(c.step < step and (c.created, c.step) > (created, step) for c in items)
