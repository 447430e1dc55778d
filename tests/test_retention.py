"""Retention: the pure policy function (property tests) and how the store applies it."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import ckstore
from ckstore import RetentionPolicy, select_kept
from ckstore.checkpoint.retention import commit_order, left_ahead, plan_deletions, rank_best
from fault_injection.invariants import policy_keeps


@dataclass(frozen=True)
class Ck:
    step: int
    metrics: dict = field(default_factory=dict)
    tags: tuple = ()
    created: float = -1.0  # -1: commit order follows the step (set in __post_init__)

    def __post_init__(self):
        if self.created == -1.0:
            object.__setattr__(self, "created", float(self.step))


@st.composite
def checkpoint_lists(draw):
    steps = draw(st.lists(st.integers(0, 300), unique=True, max_size=25))
    # Commit order: usually the step order; after a rollback, any order (some ties too).
    if draw(st.booleans()):
        times = {s: float(s) for s in steps}
    else:
        times = {s: float(draw(st.integers(0, 40))) for s in steps}
    out = []
    for step in steps:
        metrics = {}
        if draw(st.booleans()):
            metrics["loss"] = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0]) | st.floats(-10, 10))  # small set: ties are common
        if draw(st.integers(0, 3)) == 0:
            metrics["other"] = 1.0
        tags = tuple(draw(st.lists(st.sampled_from(["release", "keep", "v1"]), max_size=1, unique=True)))
        out.append(Ck(step, metrics, tags, times[step]))
    return out


policies = st.builds(
    RetentionPolicy,
    keep_last=st.none() | st.integers(1, 6),
    keep_best=st.none() | st.integers(1, 6),
    metric=st.just("loss"),
    mode=st.sampled_from(["min", "max"]),
    keep_every=st.none() | st.integers(1, 50),
)


def _committed_after(c, other) -> bool:
    """``other`` was committed after ``c``: a later ``created``; at equal times (hand-made stores) the higher step."""
    return other.created > c.created or (other.created == c.created and other.step > c.step)


def _better(policy, c, other) -> bool:
    """``other`` ranks above ``c`` for keep_best: a better value of the metric; at equal values the newer (higher) step."""
    mine, theirs = c.metrics[policy.metric], other.metrics[policy.metric]
    strictly = theirs < mine if policy.mode == "min" else theirs > mine
    return strictly or (theirs == mine and other.step > c.step)


def _reference(checkpoints, policy, protect=()):
    """The documented rule, decided one checkpoint at a time by counting, with no sorting or slicing (the way
    ``select_kept`` computes it), so a mistake there is not repeated here.

    A checkpoint is kept when the policy keeps everything (none of keep_last, keep_best, keep_every set), or when
    any of these holds: no checkpoint was committed after it (the newest); it is protected; fewer than keep_last
    were committed after it; it has the metric and fewer than keep_best that have it rank above it; its step is a
    multiple of keep_every; it is tagged.
    """
    keep_all = policy.keep_last is None and policy.keep_best is None and policy.keep_every is None
    kept = set()
    for c in checkpoints:
        newer = sum(_committed_after(c, o) for o in checkpoints if o is not c)
        reasons = [
            keep_all,
            newer == 0,
            c.step in protect,
            policy.keep_last is not None and newer < policy.keep_last,
            policy.keep_best is not None
            and policy.metric in c.metrics
            and sum(_better(policy, c, o) for o in checkpoints if o is not c and policy.metric in o.metrics) < policy.keep_best,
            policy.keep_every is not None and c.step % policy.keep_every == 0,
            bool(c.tags),
        ]
        if any(reasons):
            kept.add(c.step)
    return kept


_TIE = [Ck(1, {"loss": 0.5}), Ck(2, {"loss": 0.5}), Ck(3, {"loss": 0.9}), Ck(4)]
_ROLLBACK = [Ck(100, tags=("release",), created=1.0), Ck(300, created=2.0), Ck(101, created=3.0), Ck(150, created=3.0)]


@pytest.mark.guarantee("G8", "G9")
@given(checkpoints=checkpoint_lists(), policy=policies, order=st.randoms(), protect_at=st.none() | st.integers(0, 24))
# Cases random draws reach only now and then: a tie for the last best slot (the newer step wins), equal commit
# times (the higher step is the newer commit), the step a save just committed after a rollback.
@example(checkpoints=_TIE, policy=RetentionPolicy(keep_best=1, metric="loss"), order=random.Random(0), protect_at=None)
@example(checkpoints=_TIE, policy=RetentionPolicy(keep_best=2, metric="loss", mode="max"), order=random.Random(0), protect_at=None)
@example(checkpoints=_ROLLBACK, policy=RetentionPolicy(keep_last=1), order=random.Random(1), protect_at=2)
@example(checkpoints=_ROLLBACK, policy=RetentionPolicy(keep_last=2, keep_every=100), order=random.Random(2), protect_at=None)
def test_kept_set_is_exactly_the_union(checkpoints, policy, order, protect_at):
    """select_kept, and the fault-injection harness's oracle that judges the store against the same rule, keep
    exactly what the reference model keeps."""
    steps = [c.step for c in checkpoints]
    protect = {steps[protect_at % len(steps)]} if steps and protect_at is not None else set()
    shuffled = list(checkpoints)
    order.shuffle(shuffled)  # input order must not matter
    expected = _reference(checkpoints, policy, protect)
    assert set(select_kept(shuffled, policy, protect=protect)) == expected
    oracle = policy_keeps(
        set(steps),
        {c.step: c.metrics for c in checkpoints},
        {k: v for k, v in vars(policy).items() if v is not None},
        {c.step for c in checkpoints if c.tags},
        next(iter(protect), None),
        order={c.step: (0, c.created) for c in checkpoints},
    )
    assert oracle == expected


@given(checkpoints=checkpoint_lists(), policy=policies)
def test_invariants(checkpoints, policy):
    kept = select_kept(checkpoints, policy)
    steps = {c.step for c in checkpoints}
    assert kept <= steps
    newest = commit_order(checkpoints)[-1].step if checkpoints else None
    if checkpoints:
        assert newest in kept  # the last committed is always kept
    assert {c.step for c in checkpoints if c.tags} <= kept  # every tagged one
    if policy.keep_last:
        assert {c.step for c in commit_order(checkpoints)[-policy.keep_last :]} <= kept
    if policy.keep_best:
        with_metric = [c for c in checkpoints if "loss" in c.metrics]
        kept_with_metric = [c for c in with_metric if c.step in kept]
        assert len(kept_with_metric) >= min(policy.keep_best, len(with_metric))
        # the best value is always among the kept
        if with_metric:
            best = (min if policy.mode == "min" else max)(c.metrics["loss"] for c in with_metric)
            assert any(c.metrics["loss"] == best for c in kept_with_metric)
    # Applying the policy again to what it kept deletes nothing that is pinned or newest.
    again = select_kept([c for c in checkpoints if c.step in kept], policy)
    assert {c.step for c in checkpoints if c.tags} <= again
    if checkpoints:
        assert newest in again


@pytest.mark.guarantee("G8")
@given(checkpoints=checkpoint_lists(), policy=policies, data=st.data())
def test_a_protected_step_is_always_kept_and_protection_only_adds(checkpoints, policy, data):
    """The store protects the step a save just committed, whatever its step and commit time."""
    steps = sorted(c.step for c in checkpoints)
    protect = set(data.draw(st.lists(st.sampled_from(steps), max_size=3))) if steps else set()
    stray = data.draw(st.integers(301, 400))  # not a checkpoint: ignored
    kept = select_kept(checkpoints, policy, protect=protect | {stray})
    assert protect <= kept and stray not in kept
    assert kept == select_kept(checkpoints, policy) | protect


@pytest.mark.guarantee("G6")
@given(checkpoints=checkpoint_lists(), policy=policies, data=st.data())
def test_corrupt_checkpoints_hold_no_slot_and_are_never_deleted(checkpoints, policy, data):
    steps = sorted(c.step for c in checkpoints)
    corrupt = set(data.draw(st.lists(st.sampled_from(steps), max_size=4))) if steps else set()
    protect = set(data.draw(st.lists(st.sampled_from(steps), max_size=1))) if steps else set()
    doomed = plan_deletions(checkpoints, policy, protect=protect, corrupt=corrupt)
    assert doomed == sorted(doomed) and not (set(doomed) & corrupt) and not (set(doomed) & protect)
    sound = [c for c in checkpoints if c.step not in corrupt]
    # Exactly what the policy would delete if the corrupt ones did not exist.
    assert set(doomed) == {c.step for c in sound} - select_kept(sound, policy, protect=protect)
    assert set(doomed) | select_kept(sound, policy, protect=protect) | corrupt == set(steps)


@given(checkpoints=checkpoint_lists(), data=st.data())
def test_left_ahead_means_a_lower_step_was_committed_later(checkpoints, data):
    if not checkpoints:
        assert not left_ahead(checkpoints, 5)
        return
    step = data.draw(st.sampled_from([c.step for c in checkpoints]))
    mine = next(c for c in checkpoints if c.step == step)
    expected = any(c.step < step and (c.created > mine.created or (c.created == mine.created and c.step > step)) for c in checkpoints)
    assert left_ahead(checkpoints, step) == expected
    assert not left_ahead(checkpoints, 1000)
    # In an ordinary run (commit order = step order) nothing is ever left ahead.
    ordered = [Ck(c.step, c.metrics, c.tags) for c in checkpoints]
    assert not any(left_ahead(ordered, c.step) for c in ordered)


@pytest.mark.guarantee("G9")
def test_keep_last_counts_commits_not_steps_after_a_rollback():
    # 100 (tagged), 200, 300 saved; rolled back to 100; then 101 and 102 saved.
    cks = [Ck(100, tags=("release",), created=1.0), Ck(200, created=2.0), Ck(300, created=3.0), Ck(101, created=4.0), Ck(102, created=5.0)]
    assert select_kept(cks, RetentionPolicy(keep_last=1)) == {100, 102}
    assert select_kept(cks, RetentionPolicy(keep_last=3)) == {100, 300, 101, 102}
    assert select_kept(cks[:4], RetentionPolicy(keep_last=1)) == {100, 101}
    assert [c.step for c in commit_order(cks)] == [100, 200, 300, 101, 102]


@pytest.mark.guarantee("G9")
@given(checkpoints=checkpoint_lists(), mode=st.sampled_from(["min", "max"]), k=st.integers(1, 5))
def test_checkpoints_without_the_metric_are_never_best(checkpoints, mode, k):
    policy = RetentionPolicy(keep_best=k, metric="loss", mode=mode)
    kept = select_kept(checkpoints, policy)
    newest = commit_order(checkpoints)[-1].step if checkpoints else None
    best_only = {s for s in kept if s != newest and not any(c.step == s and c.tags for c in checkpoints)}
    assert all("loss" in c.metrics for c in checkpoints if c.step in best_only)
    ranked = rank_best(checkpoints, "loss", mode)
    assert all("loss" in c.metrics for c in ranked)


@pytest.mark.guarantee("G9")
@given(checkpoints=checkpoint_lists())
def test_no_policy_keeps_everything(checkpoints):
    assert select_kept(checkpoints, RetentionPolicy()) == {c.step for c in checkpoints}
    assert select_kept(checkpoints, RetentionPolicy(metric="loss", mode="max")) == {c.step for c in checkpoints}
    assert not RetentionPolicy().prunes


@pytest.mark.guarantee("G9")
def test_ties_go_to_the_newer_step():
    cks = [Ck(1, {"loss": 1.0}), Ck(2, {"loss": 0.5}), Ck(3, {"loss": 0.5}), Ck(4, {"loss": 2.0}), Ck(5)]
    assert select_kept(cks, RetentionPolicy(keep_best=1, metric="loss")) == {3, 5}
    assert select_kept(cks, RetentionPolicy(keep_best=2, metric="loss")) == {2, 3, 5}
    assert select_kept(cks, RetentionPolicy(keep_best=1, metric="loss", mode="max")) == {4, 5}


def test_keep_every_and_keep_last():
    cks = [Ck(s) for s in range(0, 100, 7)]
    assert select_kept(cks, RetentionPolicy(keep_every=21)) == {0, 21, 42, 63, 84, 98}
    assert select_kept(cks, RetentionPolicy(keep_last=2)) == {91, 98}
    assert select_kept(cks, RetentionPolicy(keep_last=2, keep_every=50)) == {0, 91, 98}  # 0 is a multiple of 50
    assert select_kept([], RetentionPolicy(keep_last=1)) == set()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep_last": 0},
        {"keep_last": -1},
        {"keep_last": 1.5},
        {"keep_last": True},
        {"keep_last": "3"},
        {"keep_best": 2},  # no metric
        {"keep_best": 0, "metric": "loss"},
        {"keep_every": 0},
        {"mode": "median"},
        {"metric": ""},
        {"metric": 3, "keep_best": 1},
    ],
)
def test_invalid_policies_are_refused(kwargs, store_path):
    with pytest.raises(ckstore.InvalidArgumentError):
        RetentionPolicy(**kwargs)
    with pytest.raises(ckstore.InvalidArgumentError):
        ckstore.Store(store_path, **kwargs)


# ---------------------------------------------------------------- in a store


@pytest.mark.guarantee("G9")
def test_store_applies_union_of_policies(store_path):
    losses = {10: 0.9, 20: 0.1, 30: 0.5, 40: 0.7, 50: 0.8, 60: 0.95}
    with ckstore.Store(store_path, keep_last=2, keep_best=1, metric="loss", keep_every=30) as store:
        for step, loss in losses.items():
            store.save({"step": step}, step=step, metrics={"loss": loss})
        assert [i.step for i in store.checkpoints()] == [20, 30, 50, 60]
        assert store.best().step == 20


def test_best_k_survives_reopening(store_path):
    with ckstore.Store(store_path, keep_last=1, keep_best=2, metric="acc", mode="max") as store:
        for step, acc in [(1, 0.5), (2, 0.9), (3, 0.7), (4, 0.8)]:
            store.save({}, step=step, metrics={"acc": acc})
        assert [i.step for i in store.checkpoints()] == [2, 4]
    # A new process would open the store afresh: bookkeeping comes from the manifests.
    with ckstore.Store(store_path, keep_last=1, keep_best=2, metric="acc", mode="max") as store:
        store.save({}, step=5, metrics={"acc": 0.1})
        assert [i.step for i in store.checkpoints()] == [2, 4, 5]
        store.save({}, step=6, metrics={"acc": 0.95})
        assert [i.step for i in store.checkpoints()] == [2, 6]
    with ckstore.Store(store_path, readonly=True) as store:
        assert store.best().step == 6  # the policy the writer used is recorded in the manifests


def test_checkpoints_without_metric_are_not_kept_as_best(store_path):
    with ckstore.Store(store_path, keep_last=1, keep_best=1, metric="loss") as store:
        store.save({}, step=1, metrics={"loss": 1.0})
        store.save({}, step=2)  # no metric
        store.save({}, step=3, metrics={"other": 0.0})
        store.save({}, step=4)
        assert [i.step for i in store.checkpoints()] == [1, 4]


@pytest.mark.guarantee("G8", "G11")
def test_deletion_happens_only_after_the_new_checkpoint_is_durable(store_path):
    from ckstore.storage import durable as _durable

    events = []

    def hook(op, phase, path, info):
        if phase == "after":
            events.append((op, info.get("site"), path, info.get("dst")))

    with ckstore.Store(store_path, keep_last=1) as store:
        store.save({"w": torch.ones(2)}, step=1)
        with _durable.hooked(hook):
            store.save({"w": torch.ones(2)}, step=2)
    commit = next(i for i, e in enumerate(events) if e[0] == "rename" and e[3] and e[3].endswith("step-00000002"))
    synced = next(i for i, e in enumerate(events) if e[0] == "fsync_dir" and e[2] == str(store_path / "checkpoints") and i > commit)
    deletion = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2].endswith("step-00000001"))
    first_unlink = next(i for i, e in enumerate(events) if e[0] in ("unlink", "rmdir") and "step-00000001" in e[2])
    assert commit < synced < deletion < first_unlink
    # the deletion leaves checkpoints/ in one rename; the trash entry is removed after that rename is durable
    trash_sync = next(i for i, e in enumerate(events) if e[0] == "fsync_dir" and e[2] == str(store_path / "checkpoints") and i > deletion)
    assert trash_sync < first_unlink


def test_gc_applies_a_policy_on_demand(store_path):
    with ckstore.Store(store_path) as store:
        for step in range(1, 7):
            store.save({}, step=step, metrics={"loss": {1: 5.0, 2: 4.0, 3: 0.0, 4: 3.0, 5: 2.0, 6: 1.0}[step]})
        assert store.gc(policy=RetentionPolicy(keep_last=2), dry_run=True) == [1, 2, 3, 4]
        assert len(store.checkpoints()) == 6
        assert store.gc(policy=RetentionPolicy(keep_last=1, keep_best=1, metric="loss")) == [1, 2, 4, 5]
        assert [i.step for i in store.checkpoints()] == [3, 6]
        assert store.gc() == []  # the store's own policy keeps all
