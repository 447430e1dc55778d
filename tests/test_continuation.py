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

import errno
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import flip_byte, subprocess_env

import ckstore
from ckstore.storage import durable as _durable
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


@pytest.mark.guarantee("G8")
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


def test_resume_after_a_rollback_continues_the_rolled_back_run(store_path):
    with ckstore.Store(store_path, keep_last=3) as store:
        store.save(state(100), step=100, tags=["release"])
        store.save(state(300), step=300)
        store.load(step="release")
        store.save(state(101), step=101)
    with ckstore.Store(store_path, keep_last=3) as store:  # killed and restarted
        s = state(0)
        assert ckstore.resume(store, s) == 101 and float(s["w"][0]) == 101.0
        assert steps_of(store) == [100, 101, 300]  # 300 is still kept (keep_last=3), but not resumed


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


@pytest.mark.guarantee("G6")
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


@pytest.mark.guarantee("G6")
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


@pytest.mark.guarantee("G7")
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


@pytest.mark.guarantee("G6")
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


# ---------------------------------------------------------------- 8. tags and pins from a shell while a run holds the store

_WRITER = r"""
import sys, time, torch, ckstore
from ckstore.storage import durable as _durable
path, last = sys.argv[1], int(sys.argv[2])

def widen(op, phase, p, info):
    # Stretch retention's window between reading the tags and renaming a doomed checkpoint
    # into .trash/, so a tag added in it would be lost if retention did not hold the metadata lock.
    if op == "rename" and phase == "before" and info["site"] == "delete":
        time.sleep(0.03)

_durable.set_hook(widen)
with ckstore.Store(path, keep_last=1) as store:
    print("READY", flush=True)
    for step in range(1, last + 1):
        store.save({"w": torch.full((256,), float(step))}, step=step)  # retention deletes every older untagged step
"""

_TAGGER = r"""
import contextlib, io, json, sys, time, ckstore
from ckstore.cli import main
path, rounds = sys.argv[1], int(sys.argv[2])
done = []
for k in range(rounds):
    with ckstore.Store(path, readonly=True) as reader:
        newest = max(i.step for i in reader.checkpoints())  # the one the next save's retention deletes
    time.sleep(0.005 * (k % 5))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["tag", path, f"pin{k}", str(newest), "--json"])
    if code == 0:
        done.append((f"pin{k}", json.loads(out.getvalue())["step"]))
    else:
        done.append((f"pin{k}", None, json.loads(out.getvalue())["error"]))
print(json.dumps(done), flush=True)
"""


@pytest.mark.guarantee("G10")
def test_a_shell_tags_while_a_training_process_saves_and_retention_honours_every_pin(store_path, run_python):
    """Two real processes race: one saves with keep_last=1, the other tags the latest checkpoint through the CLI."""
    with ckstore.Store(store_path) as store:
        store.save(state(0), step=0)  # the store exists before the tagger starts
    command = [sys.executable, "-c", _WRITER, str(store_path), "300"]
    writer = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "READY"
        tagger = run_python(_TAGGER, str(store_path), "120", timeout=300)
        assert tagger.returncode == 0, tagger.stderr
        assert writer.wait(300) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    results = json.loads(tagger.stdout)
    pinned = {r[0]: r[1] for r in results if r[1] is not None}
    refused = [r[2] for r in results if r[1] is None]
    assert len(pinned) >= 20, results  # the writer lock never stops a tag
    assert set(refused) <= {"CheckpointNotFoundError"}  # only: the step was deleted before the tag was taken
    with ckstore.Store(store_path) as store:
        tags = {t: i.step for i in store.checkpoints() for t in i.tags}
        assert {t: s for t, s in tags.items() if t.startswith("pin")} == pinned  # every pin survived retention
        assert store.verify() == []
        assert set(steps_of(store)) == set(pinned.values()) | {300}


# ---------------------------------------------------------------- 9. fork while a background save is in flight

_FORK = r"""
import os, sys, time, torch, ckstore
from ckstore.storage import durable as _durable

path, mode = sys.argv[1], sys.argv[2]
store = ckstore.Store(path)
store.save({"w": torch.zeros(8)}, step=1)

def slow(op, phase, p, info):
    if op == "write" and phase == "before" and info["site"] != "lock_owner":
        time.sleep(0.5)
_durable.set_hook(slow)
handle = store.save({"w": torch.ones(1 << 16)}, step=2, blocking=False)
pid = os.fork()
if pid == 0:
    _durable.set_hook(None)
    if mode == "close":
        store.close()  # must neither wait for the parent's save nor release the parent's lock
    elif mode == "save":
        other = ckstore.Store(path + "-child")
        other.save({"w": torch.ones(4)}, step=1, blocking=False)
        other.close()
    sys.exit(0)  # a normal exit: atexit handlers run
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    time.sleep(0.05)
else:
    os.kill(pid, 9)
    print("CHILD HUNG", flush=True)
    sys.exit(3)
_durable.set_hook(None)
print("CHILD", os.waitstatus_to_exitcode(status), flush=True)
print("SAVED", handle.result().step, flush=True)
try:
    ckstore.Store(path).save({}, step=9)
    print("LOCK LOST", flush=True)
except ckstore.StoreLockedError:
    print("LOCK HELD", flush=True)
store.save({"w": torch.ones(8)}, step=3)
store.close()
print("DONE", flush=True)
"""


@pytest.mark.parametrize("mode", ["exit", "close", "save"])
def test_a_child_forked_during_a_background_save_exits_normally(store_path, run_python, mode):
    proc = run_python(_FORK, str(store_path), mode, timeout=180)
    assert proc.stdout.split("\n")[:-1] == ["CHILD 0", "SAVED 2", "LOCK HELD", "DONE"], (proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stderr
    with ckstore.Store(store_path, readonly=True) as store:
        assert steps_of(store) == [1, 2, 3] and store.verify() == []


# ---------------------------------------------------------------- 10. metrics for a step already saved


@pytest.mark.parametrize("blocking", [True, False])
def test_the_readme_loop_saves_every_step_and_reports_validation_at_the_end_of_the_epoch(store_path, blocking):
    val_losses = {0: 0.9, 1: 0.3, 2: 0.5, 3: 0.6}  # epoch 1 is the best
    steps_per_epoch = 4
    with ckstore.Store(store_path, keep_last=2, keep_best=1, metric="val_loss") as store:
        s = state(0)
        step = 0
        with ckstore.Checkpointer(store, s, every=1, signals=(), blocking=blocking) as ckpt:
            for epoch, val_loss in val_losses.items():
                for _ in range(steps_per_epoch):
                    step += 1
                    s["w"].fill_(step)
                    ckpt.step(step, metrics={"loss": 1.0 / step})
                ckpt.step(step, metrics={"val_loss": val_loss})  # the same step: recorded, not saved again
        best_step = 2 * steps_per_epoch
        assert store.best().step == best_step and store.resolve(best_step).metrics == {"loss": 1.0 / best_step, "val_loss": 0.3}
        assert steps_of(store) == [best_step, 15, 16]  # keep_best kept epoch 1's step through two later epochs
        assert value_of(store, best_step) == float(best_step)


@pytest.mark.guarantee("G7")
def test_recording_metrics_never_modifies_the_committed_checkpoint(store):
    store.save(state(1), step=1, metrics={"loss": 0.5})
    directory = store.resolve(1).path
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.iterdir()}
    info = store.record_metrics(1, {"val_loss": 0.25, "acc": 0.75})
    assert info.metrics == {"loss": 0.5, "val_loss": 0.25, "acc": 0.75}
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.iterdir()} == before
    assert store.record_metrics(1, {"loss": 0.5}).metrics["loss"] == 0.5  # the same value again: fine
    with pytest.raises(ckstore.InvalidArgumentError, match="val_loss"):
        store.record_metrics(1, {"val_loss": 0.1})
    with pytest.raises(ckstore.InvalidArgumentError, match="loss"):
        store.record_metrics(1, {"loss": 0.4})
    with pytest.raises(ckstore.CheckpointNotFoundError):
        store.record_metrics(2, {"val_loss": 0.1})
    for bad in ({}, {"x": float("nan")}, {"x": "high"}, None):
        with pytest.raises(ckstore.InvalidArgumentError):
            store.record_metrics(1, bad)
    assert store.verify() == []
    with ckstore.Store(store.path, readonly=True) as reader:
        assert reader.resolve(1).metrics == {"loss": 0.5, "val_loss": 0.25, "acc": 0.75}
        with pytest.raises(ckstore.ReadOnlyStoreError):
            reader.record_metrics(1, {"other": 1.0})


def test_recorded_metrics_do_not_attach_to_a_later_checkpoint_of_the_same_step(store):
    store.save(state(1), step=1)
    store.save(state(2), step=2)
    store.record_metrics(2, {"val_loss": 0.1})
    corrupt(store, 2)
    with pytest.warns(ckstore.CorruptCheckpointWarning):
        store.save(state(-2), step=2)
    assert store.resolve(2).metrics == {}
    store.record_metrics(2, {"val_loss": 0.7})  # the stale entry neither clashes nor survives
    assert store.resolve(2).metrics == {"val_loss": 0.7}


def test_a_corrupt_metrics_file_stops_best_retention_and_is_reported(store_path):
    with ckstore.Store(store_path, keep_last=1, keep_best=1, metric="val_loss") as store:
        store.save(state(1), step=1)
        store.record_metrics(1, {"val_loss": 0.1})
        store.save(state(2), step=2, metrics={"val_loss": 0.5})
        assert steps_of(store) == [1, 2]
        flip_byte(store.path / "metrics.json", 20)
        with pytest.warns(ckstore.CorruptCheckpointWarning, match="retention skipped"):
            store.save(state(3), step=3, metrics={"val_loss": 0.6})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert steps_of(store) == [1, 2, 3]  # nothing deleted while the best is unknown
        assert [p.path for p in store.verify()] == [str(store.path / "metrics.json")]
        with pytest.raises((ckstore.IntegrityError, ckstore.ManifestError)):
            store.record_metrics(3, {"acc": 1.0})  # never drops what others recorded


def test_an_evaluation_process_records_metrics_while_training_holds_the_store(store_path, run_python):
    with ckstore.Store(store_path) as store:
        store.save(state(1), step=1)
        proc = run_python(
            "import sys, ckstore\n"
            "with ckstore.Store(sys.argv[1]) as s:\n"
            "    print(s.record_metrics(1, {'val_loss': 0.2}).metrics)\n",
            str(store_path),
        )
        assert proc.returncode == 0, proc.stderr
        assert store.resolve(1).metrics == {"val_loss": 0.2}
        store.save(state(2), step=2)  # the writer still holds its lock and goes on


# ---------------------------------------------------------------- 12. a save that committed, then failed


@pytest.mark.parametrize("blocking", [True, False])
def test_a_save_asking_for_tags_while_tags_json_is_corrupt_is_refused_before_it_commits(store, blocking):
    store.save(state(1), step=1, tags=["first"])
    flip_byte(store.path / "tags.json", -3)
    with pytest.raises((ckstore.IntegrityError, ckstore.ManifestError)):
        store.save(state(2), step=2, tags=["second"], blocking=blocking)
    store.wait()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ckstore.CorruptCheckpointWarning)
        assert steps_of(store) == [1]  # absent: a retry after repairing tags.json just works
    (store.path / "tags.json").unlink()
    store.save(state(2), step=2, tags=["second"], blocking=blocking)
    store.wait()
    assert store.resolve("second").step == 2


def _enospc_at(op_name: str, site: str):
    def hook(op, phase, path, info):
        if op == op_name and phase == "before" and info["site"] == site:
            raise OSError(errno.ENOSPC, "injected ENOSPC", path)

    return hook


@pytest.mark.guarantee("G14")
@pytest.mark.parametrize("blocking", [True, False])
@pytest.mark.parametrize("op, site", [("rename", "tags"), ("rename", "delete")])
def test_a_failure_after_the_commit_says_the_checkpoint_is_committed(store_path, blocking, op, site):

    with ckstore.Store(store_path, keep_last=1) as store:
        store.save(state(1), step=1)
        with _durable.hooked(_enospc_at(op, site)):
            with pytest.raises(ckstore.CommittedWithErrorsError) as excinfo:
                handle = store.save(state(2), step=2, tags=["new"], blocking=blocking)
                if not blocking:
                    handle.result()
        error = excinfo.value
        assert not isinstance(error, (ckstore.AsyncSaveError, ckstore.StorageError))  # not "failed, retry"
        assert error.step == 2 and error.errno == errno.ENOSPC and "committed" in str(error)
        assert 2 in steps_of(store) and store.verify() == [] and value_of(store, 2) == 2.0
        with pytest.raises(ckstore.CheckpointExistsError):
            store.save(state(2), step=2)
        store.save(state(3), step=3)
        assert store.latest().step == 3


@pytest.mark.guarantee("G15")
def test_a_background_save_committed_with_errors_is_reported_so_by_the_next_call(store_path):
    with ckstore.Store(store_path) as store:
        with _durable.hooked(_enospc_at("rename", "tags")):
            store.save(state(1), step=1, tags=["a"], blocking=False)
            with pytest.raises(ckstore.CommittedWithErrorsError) as excinfo:
                store.wait()
        assert excinfo.value.step == 1
        store.save(state(2), step=2)  # reported once
        assert steps_of(store) == [1, 2]


def test_a_symlinked_quarantine_is_never_listed_or_emptied_through(store, tmp_path):
    victim = tmp_path / "elsewhere"
    (victim / "step-00000001.20261202T000000Z.0badc0de").mkdir(parents=True)
    (victim / "step-00000001.20261202T000000Z.0badc0de" / "precious").write_text("keep me")
    store.save(state(1), step=1)
    os.symlink(victim, store.path / ".quarantine")
    for call in (store.quarantine, store.empty_quarantine):
        with pytest.raises(ckstore.UnsafeStoreError):
            call()
    assert (victim / "step-00000001.20261202T000000Z.0badc0de" / "precious").read_text() == "keep me"
    corrupt(store, 1)
    with pytest.raises(ckstore.StorageError):  # nor is a checkpoint moved into it
        store.save(state(-1), step=1)
    assert sorted(os.listdir(victim)) == ["step-00000001.20261202T000000Z.0badc0de"]


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink"])
def test_a_metrics_json_that_is_not_a_file_is_reported_not_fatal(store, kind, tmp_path):
    store.save(state(1), step=1)
    target = store.path / "metrics.json"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    else:
        (tmp_path / "real.json").write_text("{}")
        os.symlink(tmp_path / "real.json", target)
    with pytest.warns(ckstore.CorruptCheckpointWarning):
        assert steps_of(store) == [1]
    assert [p.path for p in store.verify()] == [str(target)]
    with pytest.raises(ckstore.ManifestError):
        store.record_metrics(1, {"val_loss": 0.1})


def test_ckstore_publish_from_a_shell_while_the_training_process_holds_the_store(tmp_path, monkeypatch):
    """The shell's publish pins the checkpoint with the metadata lock only; the run's retention keeps it."""
    pytest.importorskip("dvc.repo", reason="DVC is an optional extra: pip install 'ckstore[dvc]'")
    import test_dvc

    for key, value in test_dvc.hermetic_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    env = subprocess_env()
    repo, remote = test_dvc.make_repo(tmp_path, env)
    store_dir = repo / "runs" / "exp"
    with ckstore.Store(store_dir, keep_last=1, metric="val_loss") as store:  # holds the writer lock from the first save
        test_dvc.train(store, steps=(10, 20), losses=(0.5, 0.2))
        out = test_dvc.ck("publish", "runs/exp", "best", "--json", cwd=repo, env=env, check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        assert json.loads(out.stdout)["step"] == 20
        test_dvc.train(store, steps=(30, 40), losses=(0.4, 0.3))
        assert steps_of(store) == [20, 40] and store.resolve("published.best").step == 20
    assert test_dvc.remote_objects(remote)
