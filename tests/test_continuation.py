"""Continuing safely after a rollback or a fallback.

* the save just committed is never removed by its own retention; "latest" and
  ``keep_last`` follow commit order, so a rolled-back run is predictable;
* saving over a committed step that fails verification (or that a rollback
  left behind) moves it into the quarantine, never deletes it;
* tags and metrics are store metadata that a shell may change while a
  training process holds the store (a short metadata lock, not the writer lock);
* a child forked while a background save is in flight exits normally;
* a save that committed but failed afterwards says so with its own error.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from conftest import flip_byte

import ckstore
from ckstore.cli import main


def steps_of(store: ckstore.Store) -> list[int]:
    return [i.step for i in store.checkpoints()]


def state(value: float) -> dict:
    return {"w": torch.full((16,), float(value))}


def corrupt(store: ckstore.Store, step: int) -> str:
    """Bit rot in one tensor file of ``step``; returns the file's path."""
    victim = next(p for p in store.resolve(step).path.iterdir() if p.suffix == ".safetensors")
    flip_byte(victim, -1)
    return str(victim)


def value_of(store: ckstore.Store, step: int) -> float:
    return float(store.load(step=step)["w"][0])


# ---------------------------------------------------------------- 1. the new save survives its retention


@pytest.mark.parametrize("blocking", [True, False])
def test_a_save_after_rolling_back_to_a_tag_is_kept_and_is_the_latest(store_path, blocking):
    with ckstore.Store(store_path, keep_last=1) as store:
        store.save(state(100), step=100, tags=["release"])
        store.save(state(300), step=300)
        store.load(step="release")
        handle = store.save(state(101), step=101, blocking=blocking)
        info = handle if blocking else handle.result()
        assert info.step == 101
        # keep_last counts by commit order: 101 is the newest commit, 300 lost its slot; 100 is pinned.
        assert steps_of(store) == [100, 101]
        assert store.latest().step == 101 and value_of(store, 101) == 101.0
        store.save(state(102), step=102, blocking=blocking)
        store.wait()
        assert steps_of(store) == [100, 102]
    with ckstore.Store(store_path) as store:  # a restarted run resumes where the rolled-back run was
        assert ckstore.resume(store, state(0)) == 102


def test_latest_is_the_last_committed_and_load_falls_back_in_commit_order(store_path):
    with ckstore.Store(store_path, keep_last=3) as store:
        for step in (10, 20, 30):
            store.save(state(step), step=step)
        store.load(step=10)
        store.save(state(11), step=11)
        store.save(state(12), step=12)
        assert steps_of(store) == [11, 12, 30]  # 10 and 20 are the oldest commits
        assert store.latest().step == 12 and float(store.load()["w"][0]) == 12.0
        corrupt(store, 12)
        with pytest.warns(ckstore.CorruptCheckpointWarning):
            assert float(store.load()["w"][0]) == 11.0  # the next newest commit, not step 30
        created = [i.created for i in sorted(store.checkpoints(), key=lambda i: i.created)]
        assert len(set(created)) == len(created)  # commit times are strictly increasing


def test_a_save_after_falling_back_past_a_corrupt_checkpoint_is_kept(store_path):
    with ckstore.Store(store_path) as store:
        store.save(state(10), step=10)
        store.save(state(20), step=20)
        corrupt(store, 20)
    with ckstore.Store(store_path, keep_last=1) as store:
        with pytest.warns(ckstore.CorruptCheckpointWarning):
            assert float(store.load()["w"][0]) == 10.0
        assert store.save(state(11), step=11).step == 11
        # 11 is kept; 20 failed verification, so retention neither counts nor deletes it.
        assert steps_of(store) == [11, 20]
        assert store.latest().step == 11


def test_a_corrupt_checkpoint_never_holds_the_best_slot(store_path):
    with ckstore.Store(store_path) as store:
        store.save(state(10), step=10, metrics={"loss": 0.5})
        store.save(state(20), step=20, metrics={"loss": 0.1})
        corrupt(store, 20)
    with ckstore.Store(store_path, keep_last=1, keep_best=1, metric="loss") as store:
        with pytest.warns(ckstore.CorruptCheckpointWarning):
            assert ckstore.resume(store, state(0)) == 10
        store.save(state(11), step=11, metrics={"loss": 0.3})
        store.save(state(12), step=12, metrics={"loss": 0.4})
        # 11 is the best that verifies; corrupt 20 (loss 0.1) holds no slot and is not deleted.
        assert steps_of(store) == [11, 12, 20]


# ---------------------------------------------------------------- 2. the quarantine


def test_the_checkpointer_passes_a_corrupt_step_by_quarantining_it(store_path):
    with ckstore.Store(store_path, keep_last=2) as store:
        store.save(state(10), step=10)
        store.save(state(20), step=20)
        victim = corrupt(store, 20)
        evidence = open(victim, "rb").read()
    with ckstore.Store(store_path, keep_last=2) as store:
        s = state(0)
        with pytest.warns(ckstore.CorruptCheckpointWarning):
            step = ckstore.resume(store, s)
        assert step == 10
        with ckstore.Checkpointer(store, s, every=5, signals=()) as ckpt:
            while step < 25:
                step += 1
                s["w"].fill_(step)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    ckpt.step(step)
                if step == 20:
                    assert any("quarantine" in str(w.message) for w in caught)
        assert steps_of(store) == [20, 25]
        assert value_of(store, 20) == 20.0 and store.verify() == []
        entries = store.quarantine()
        assert [(q.step, q.reason) for q in entries] == [(20, "failed verification")]
        assert entries[0].path.parent == store.path / ".quarantine"
        moved = entries[0].path / os.path.basename(victim)
        assert moved.read_bytes() == evidence  # kept byte for byte, never deleted
    with ckstore.Store(store_path) as store:  # a restart resumes from the new step 20's successor
        assert ckstore.resume(store, state(0)) == 25
        assert [q.step for q in store.quarantine()] == [20]
        assert store.empty_quarantine() == [entries[0].path]
        assert store.quarantine() == [] and not os.listdir(store.path / ".quarantine")
        assert steps_of(store) == [20, 25]


def test_saving_a_step_that_verifies_is_still_refused(store):
    store.save(state(10), step=10)
    store.save(state(20), step=20)
    for step in (10, 20):
        with pytest.raises(ckstore.CheckpointExistsError):
            store.save(state(0), step=step)
        with pytest.raises(ckstore.CheckpointExistsError):
            store.save(state(0), step=step, blocking=False)
    assert store.quarantine() == [] and value_of(store, 20) == 20.0


def test_a_step_left_ahead_by_a_rollback_is_quarantined_when_the_run_reaches_it(store_path):
    with ckstore.Store(store_path, keep_last=2, keep_every=100) as store:
        for step in (100, 200, 300):
            store.save(state(step), step=step, tags=["release"] if step == 100 else ())
        store.tag(300, "experiment")
        store.load(step="release")
        store.save(state(150), step=150)
        with pytest.warns(ckstore.CorruptCheckpointWarning, match="quarantine"):
            store.save(state(-200), step=200)
        assert steps_of(store) == [100, 150, 200, 300] and value_of(store, 200) == -200.0
        assert [(q.step, q.reason) for q in store.quarantine()] == [(200, "left ahead by a rollback")]
        with pytest.warns(ckstore.CorruptCheckpointWarning, match="experiment"):
            store.save(state(-300), step=300)
        entry = store.quarantine()[-1]
        assert (entry.step, entry.tags) == (300, ("experiment",))  # the tag went with it, and is recorded
        assert "experiment" not in store.resolve(300).tags


def test_a_checkpoint_without_a_readable_manifest_is_quarantined_by_a_save_of_its_step(store):
    store.save(state(1), step=1)
    store.save(state(2), step=2)
    flip_byte(store.path / "checkpoints" / "step-00000002" / "manifest.json", 30)
    with pytest.warns(ckstore.CorruptCheckpointWarning):
        store.save(state(-2), step=2)
    assert value_of(store, 2) == -2.0
    assert [q.step for q in store.quarantine()] == [2]


def test_the_cli_lists_and_empties_the_quarantine(store_path, capsys):
    with ckstore.Store(store_path) as store:
        store.save(state(1), step=1)
        corrupt(store, 1)
        with pytest.warns(ckstore.CorruptCheckpointWarning):
            store.save(state(-1), step=1)
    assert main(["ls", str(store_path)]) == 0
    out = capsys.readouterr().out
    assert "quarantined" in out and "failed verification" in out
    assert main(["ls", str(store_path), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [(q["step"], q["reason"]) for q in payload["quarantine"]] == [(1, "failed verification")]
    assert main(["quarantine", str(store_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [q["step"] for q in listed["quarantine"]] == [1]
    assert main(["quarantine", str(store_path), "--empty", "--json"]) == 0
    emptied = json.loads(capsys.readouterr().out)
    assert emptied["removed"] == [listed["quarantine"][0]["path"]]
    assert main(["quarantine", str(store_path)]) == 0
    assert "(quarantine is empty)" in capsys.readouterr().out
