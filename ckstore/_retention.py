"""Which checkpoints to keep: a pure function of the committed checkpoints and a policy.

No I/O happens here; the store applies the result only after the newest
checkpoint is durable. The kept set is the union of:

* the newest checkpoint, always;
* the ``keep_last`` newest;
* the ``keep_best`` best by ``metric`` (``mode`` ``"min"`` or ``"max"``; a
  checkpoint without the metric is never "best"; ties go to the newer step);
* every checkpoint whose step is a multiple of ``keep_every``;
* every tagged (pinned) checkpoint.

A policy with none of ``keep_last``, ``keep_best``, ``keep_every`` set keeps
everything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ._errors import InvalidArgumentError


class Ranked(Protocol):
    @property
    def step(self) -> int: ...

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

    @property
    def prunes(self) -> bool:
        """True when the policy can delete anything."""
        return self.keep_last is not None or self.keep_best is not None or self.keep_every is not None


def rank_best(checkpoints: Iterable[Ranked], metric: str, mode: str = "min") -> list[Ranked]:
    """Checkpoints that have ``metric``, best first; among equal values the newer step first."""
    scored = [c for c in checkpoints if metric in c.metrics]
    sign = 1 if mode == "min" else -1
    return sorted(scored, key=lambda c: (sign * c.metrics[metric], -c.step))


def select_kept(checkpoints: Iterable[Ranked], policy: RetentionPolicy) -> frozenset[int]:
    """The steps to keep. Everything else may be deleted."""
    items = sorted(checkpoints, key=lambda c: c.step)
    if not items:
        return frozenset()
    if not policy.prunes:
        return frozenset(c.step for c in items)
    keep = {items[-1].step}
    if policy.keep_last is not None:
        keep.update(c.step for c in items[-policy.keep_last :])
    if policy.keep_best is not None and policy.metric is not None:
        keep.update(c.step for c in rank_best(items, policy.metric, policy.mode)[: policy.keep_best])
    if policy.keep_every is not None:
        keep.update(c.step for c in items if c.step % policy.keep_every == 0)
    keep.update(c.step for c in items if c.tags)
    return frozenset(keep)
