"""Each invariant of ``fault_injection/invariants.py`` flags a crafted bad trace or store, and passes the good one.

A trace is the list of acknowledgements a workload sent (``intent``, ``save``,
``tag``, ``deleting``, ``delete``...); the store is real, built with ckstore.
Each test first shows the invariant quiet on the honest trace, then fails it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import ckstore
from fault_injection import invariants as inv
from fault_injection.workloads import Workload, expected_state


def _run(root: str, ack, scale: int) -> None:  # never called: the checker only reads the workload's promises
    raise AssertionError


def _workload(**store_kwargs) -> Workload:
    return Workload("crafted", _run, None, store_kwargs, scale=8)


def _store(path: Path, steps: dict[int, float] | list[int], tags: dict[str, int] | None = None, **kwargs) -> str:
    root = str(path / "store")
    metrics = steps if isinstance(steps, dict) else {s: None for s in steps}
    with ckstore.Store(root, **kwargs) as store:
        for step, loss in metrics.items():
            store.save(expected_state(step, 8), step=step, metrics={"loss": loss} if loss is not None else None)
        for name, step in (tags or {}).items():
            store.tag(step, name)
    return root


def _names(messages: list[str]) -> set[str]:
    return {inv.invariant_of(m) for m in messages}


def _saves(*steps: int, metrics: dict[int, float] | None = None) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for step in steps:
        out.append(("intent", (step, {"loss": metrics[step]} if metrics and step in metrics else {}, [])))
        out.append(("save", step))
    return out


# ---------------------------------------------------------------- retention lower bound


@pytest.mark.guarantee("G9")
def test_acked_kept_by_policy_flags_a_save_lost_while_the_policy_keeps_it() -> None:
    oracle = inv.Oracle.build({"keep_last": 2}, [{"step": 1}, {"step": 2}], _saves(3, 4))
    assert inv.retention_lower_bound(oracle, {3, 4}) == []  # 1 and 2 went by the rule: two newer ones are there
    bad = inv.retention_lower_bound(oracle, {4})  # 3 gone with only one newer checkpoint present
    assert _names(bad) == {inv.ACKED_KEPT} and any("save of step 3 lost" in m for m in bad)
    # retention ran before the new checkpoint was durable: 4 lost in the crash, 1 and 2 gone too
    early = inv.retention_lower_bound(inv.Oracle.build({"keep_last": 2}, [{"step": 1}, {"step": 2}], [("intent", (3, {}, []))]), set())
    assert {m.split(" lost")[0].rsplit(" ", 1)[-1] for m in early} == {"1", "2"}


@pytest.mark.guarantee("G9", "G10")
def test_acked_kept_by_policy_honours_best_pins_and_explicit_deletes() -> None:
    base = [{"step": 1, "metrics": {"loss": 0.1}}, {"step": 2, "metrics": {"loss": 0.9}, "tags": ["keep"]}]
    acks = _saves(3, metrics={3: 0.5})
    oracle = inv.Oracle.build({"keep_last": 1, "keep_best": 1, "metric": "loss"}, base, acks)
    assert inv.retention_lower_bound(oracle, {1, 2, 3}) == []
    assert _names(inv.retention_lower_bound(oracle, {2, 3})) == {inv.ACKED_KEPT}  # the best (1) lost
    assert _names(inv.retention_lower_bound(oracle, {1, 3})) == {inv.ACKED_KEPT}  # the pinned (2) lost
    deleting = inv.Oracle.build({"keep_last": 1}, [{"step": 1}], [*_saves(2), ("deleting", 2)])
    assert inv.retention_lower_bound(deleting, {1}) == []  # an explicit delete in flight may take it


@pytest.mark.guarantee("G11")
def test_delete_stays_done() -> None:
    oracle = inv.Oracle.build({}, [{"step": 1}, {"step": 2}], [("deleting", 2), ("delete", 2)])
    assert inv.retention_lower_bound(oracle, {1}) == []
    assert _names(inv.retention_lower_bound(oracle, {1, 2})) == {inv.DELETE_STAYS}


# ---------------------------------------------------------------- retention upper bound


@pytest.mark.guarantee("G9")
def test_no_retention_leak_flags_a_step_the_policy_drops() -> None:
    oracle = inv.Oracle.build({"keep_last": 2}, [{"step": 1}], _saves(2, 3))
    assert inv.retention_upper_bound(oracle, {2, 3}) == []
    assert _names(inv.retention_upper_bound(oracle, {1, 2, 3})) == {inv.NO_LEAK}
    assert inv.retention_upper_bound(oracle, {1, 2, 3}, store_pins=[1]) == []  # pinned in the store: kept by right


# ---------------------------------------------------------------- tags


def test_tags_as_acked() -> None:
    acks = [("intent", (3, {}, ["head"])), ("save", 3), ("tagging", ("top", 2))]
    oracle = inv.Oracle.build({}, [{"step": 1, "tags": ["head"]}, {"step": 2}], acks)
    assert inv.check_tags(oracle, {"head": 3}) == []
    assert inv.check_tags(oracle, {"head": 3, "top": 2}) == []  # the tag in flight may have landed
    assert _names(inv.check_tags(oracle, {"head": 1})) == {inv.TAGS}  # an acknowledged move undone
    assert _names(inv.check_tags(oracle, {"head": 3, "top": 1})) == {inv.TAGS}  # a tag nobody set


# ---------------------------------------------------------------- the whole checker on real stores


def test_check_store_is_quiet_on_an_honest_store(tmp_path: Path) -> None:
    root = _store(tmp_path, [1, 2, 3], keep_last=2)
    assert inv.check_store(root, _workload(keep_last=2), _saves(1, 2, 3), quiescent=True) == []


@pytest.mark.guarantee("G13")
def test_opens_writable(tmp_path: Path) -> None:
    root = _store(tmp_path, [1])
    shutil.rmtree(os.path.join(root, ".staging"))
    with open(os.path.join(root, ".staging"), "w") as fh:  # a file where recovery needs a directory
        fh.write("x")
    assert _names(inv.check_store(root, _workload(), _saves(1))) == {inv.OPENS}


@pytest.mark.guarantee("G13")
def test_no_leftovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _store(tmp_path, [1])
    monkeypatch.setattr(ckstore.Store, "_recover", lambda self: None)  # a recovery that forgets its job
    os.makedirs(os.path.join(root, ".staging", "step-00000002.0badf00d"))
    assert inv.LEFTOVERS in _names(inv.check_store(root, _workload(), _saves(1)))


@pytest.mark.guarantee("G2")
def test_visible_verifies_and_content_exact(tmp_path: Path) -> None:
    root = _store(tmp_path, [1, 2])
    target = os.path.join(root, "checkpoints", "step-00000002")
    name = sorted(n for n in os.listdir(target) if n.endswith(".safetensors"))[0]
    with open(os.path.join(target, name), "r+b") as fh:
        fh.seek(-2, os.SEEK_END)
        fh.write(b"\x7f\x7f")
    assert {inv.VERIFIES, inv.CONTENT} <= _names(inv.check_store(root, _workload(), _saves(1, 2)))


def test_content_exact_sees_a_whole_but_wrong_checkpoint(tmp_path: Path) -> None:
    root = str(tmp_path / "store")
    with ckstore.Store(root) as store:
        store.save(expected_state(1, 8), step=1)
        store.save(expected_state(7, 8), step=2)  # verifies, but is not what step 2 saved
    assert inv.CONTENT in _names(inv.check_store(root, _workload(), _saves(1, 2)))


@pytest.mark.guarantee("G4")
def test_load_newest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _store(tmp_path, [1, 2])
    real = ckstore.Store.load

    def stale(self, state=None, *, step=None, **kw):  # a load() that picks the oldest
        return real(self, state, step=step if step is not None else 1, **kw)

    monkeypatch.setattr(ckstore.Store, "load", stale)
    assert _names(inv.check_store(root, _workload(), _saves(1, 2))) == {inv.NEWEST}


@pytest.mark.guarantee("G6")
def test_corrupt_never_deleted(tmp_path: Path) -> None:
    root = _store(tmp_path, [1, 2])
    target = os.path.join(root, "checkpoints", "step-00000002")
    name = sorted(n for n in os.listdir(target) if n.endswith(".safetensors"))[0]
    with open(os.path.join(target, name), "r+b") as fh:
        fh.seek(-2, os.SEEK_END)
        fh.write(b"\x7f\x7f")
    inv.write_base(root)
    with open(os.path.join(str(tmp_path), inv.BASE_FILE)) as fh:
        base = json.load(fh)
    assert [e["step"] for e in base if e.get("corrupt")] == [2]
    assert inv.CORRUPT_KEPT not in _names(inv.check_store(root, _workload(), [], probe=False))
    shutil.rmtree(target)  # deleted instead of kept or quarantined
    assert _names(inv.check_store(root, _workload(), [], probe=False)) == {inv.CORRUPT_KEPT}


def test_writable_save_keeps_committed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _store(tmp_path, [1, 2, 3])
    assert inv.writable_save(root, {"keep_last": 2}, inv.Oracle.build({"keep_last": 2}, [{"step": s} for s in (1, 2, 3)], [])) == []
    root2 = _store(tmp_path / "b", [1, 2, 3])
    # a retention that keeps one too few: 3 goes although keep_last=2 keeps it next to the new step
    from ckstore.checkpoint import pruning

    monkeypatch.setattr(pruning, "plan_deletions", lambda infos, policy, **kw: sorted(i.step for i in infos)[:-1])
    bad = inv.writable_save(root2, {"keep_last": 2}, inv.Oracle.build({"keep_last": 2}, [{"step": s} for s in (1, 2, 3)], []))
    assert _names(bad) == {inv.WRITABLE_SAVE}


@pytest.mark.guarantee("G6")
def test_writable_save_flags_a_deleted_damaged_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _store(tmp_path, [1, 2])
    with open(os.path.join(root, "checkpoints", "step-00000002", "manifest.json"), "w") as fh:
        fh.write("{not json")
    assert inv.writable_save(root, {}) == []  # kept: the honest library leaves it alone
    original = ckstore.Store._recover

    def deleting_recover(self) -> None:  # recovery "cleans up" what it cannot parse
        original(self)
        shutil.rmtree(os.path.join(self._committer.ckpt_dir, "step-00000002"), ignore_errors=True)

    monkeypatch.setattr(ckstore.Store, "_recover", deleting_recover)
    assert _names(inv.writable_save(root, {})) == {inv.WRITABLE_SAVE}


def test_workload_check_messages_are_named(tmp_path: Path) -> None:
    root = _store(tmp_path, [1])
    workload = Workload("crafted", _run, None, {}, check=lambda store, acks: ["tag 'x' lost"], scale=8)
    assert _names(inv.check_store(root, workload, _saves(1))) == {inv.WORKLOAD}


def test_invariant_of_finds_the_name_behind_a_tier_prefix() -> None:
    assert inv.invariant_of("kill at event 5 (before rename [commit]): acked-kept-by-policy: step 3 lost") == inv.ACKED_KEPT
    assert inv.invariant_of("something else") == ""
