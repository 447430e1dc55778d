"""Store behaviour: ordering, bad input, corruption on load, verify, recovery, readonly, disk full."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import uuid
import warnings

import pytest
import torch
from conftest import assert_same, flip_byte

import ckstore
from ckstore.storage import durable as _durable


def _state(value: float, n: int = 16) -> dict:
    return {"model": {"w": torch.full((n,), value), "b": torch.arange(n, dtype=torch.int32)}, "opt": {"lr": value}, "epoch": int(value)}


def _tensor_file(info: ckstore.CheckpointInfo) -> str:
    return str(info.path / sorted(info.files)[0])


def _leftovers(root) -> list[str]:
    if not root.exists():
        return []  # a store is created by its first write: one that never wrote has nothing left over
    out = [f".staging/{n}" for n in os.listdir(root / ".staging")] + [f".trash/{n}" for n in os.listdir(root / ".trash")]
    return out + [n for n in os.listdir(root) if ".tmp-" in n]


# ---------------------------------------------------------------- basics


def test_save_returns_info_and_load_round_trips(store):
    info = store.save(_state(1.0), step=5, metrics={"loss": 0.5}, tags=["first"])
    assert info.step == 5 and info.metrics == {"loss": 0.5} and info.tags == ("first",)
    assert info.path == store.path / "checkpoints" / "step-00000005"
    assert info.nbytes == sum(e.size for e in info.files.values()) > 0
    assert abs(info.created - os.path.getmtime(info.path / "manifest.json")) < 60
    loaded = store.load(step=5)
    assert torch.equal(loaded["model"]["w"], torch.full((16,), 1.0)) and loaded["opt"] == {"lr": 1.0} and loaded["epoch"] == 1
    assert store.checkpoints() == [info] and store.latest() == info
    assert store.load()["epoch"] == 1 and store.load(step="latest")["epoch"] == 1 and store.load(step="first")["epoch"] == 1


def test_steps_order_numerically(store):
    for step in (9, 10, 2, 100, 99_999_999, 100_000_000, 0):
        store.save({"s": step}, step=step)
    assert [i.step for i in store.checkpoints()] == [0, 2, 9, 10, 100, 99_999_999, 100_000_000]
    # "latest" is the last committed checkpoint (commit order, see ckstore.checkpoint.retention), not the highest step.
    assert store.latest().step == 0
    assert store.load()["s"] == 0
    # Stray entries that are not step directories are never taken for checkpoints.
    for stray in ("step-abc", "step-", "notes", "step-00000007.partial", "step-00000003\n"):
        (store.path / "checkpoints" / stray).mkdir()
    assert [i.step for i in store.checkpoints()] == [0, 2, 9, 10, 100, 99_999_999, 100_000_000]


@pytest.mark.guarantee("G7")
def test_existing_step_is_refused(store):
    store.save({"v": 1}, step=3)
    with pytest.raises(ckstore.CheckpointExistsError) as excinfo:
        store.save({"v": 2}, step=3)
    assert excinfo.value.step == 3
    assert isinstance(excinfo.value, FileExistsError)
    assert store.load(step=3) == {"v": 1}


@pytest.mark.parametrize("step", [-1, True, False, 1.0, "3", None, 2**63, 10**40])
def test_bad_steps_are_refused(store, step):
    with pytest.raises(ckstore.InvalidArgumentError):
        store.save({}, step=step)
    assert store.checkpoints() == []
    assert _leftovers(store.path) == []


@pytest.mark.parametrize("metrics", [{"loss": float("nan")}, {"loss": float("inf")}, {"loss": -float("inf")}, {"loss": "0.1"}, {"": 1.0}, [1.0]])
def test_bad_metrics_are_refused(store, metrics):
    with pytest.raises(ckstore.InvalidArgumentError):
        store.save({}, step=1, metrics=metrics)
    assert store.checkpoints() == []


@pytest.mark.parametrize("tags", [["latest"], ["best"], ["a b"], ["../x"], [""], [3]])
def test_bad_tags_are_refused(store, tags):
    with pytest.raises(ckstore.InvalidArgumentError):
        store.save({}, step=1, tags=tags)
    assert store.checkpoints() == []


def test_resolving_unknown_steps(store):
    with pytest.raises(ckstore.CheckpointNotFoundError):
        store.load()
    assert store.latest() is None and store.best() is None
    store.save({}, step=1)
    for step in (2, "nope", "latest-ish"):
        with pytest.raises(ckstore.CheckpointNotFoundError):
            store.load(step=step)
    with pytest.raises(ckstore.InvalidArgumentError):
        store.load(step="bad tag!")
    with pytest.raises(ckstore.InvalidArgumentError):
        store.best()  # no metric configured or recorded


def test_best_uses_the_configured_metric(store_path):
    with ckstore.Store(store_path, metric="acc", mode="max") as store:
        store.save({}, step=1, metrics={"acc": 0.7})
        store.save({}, step=2, metrics={"acc": 0.9})
        store.save({}, step=3, metrics={"acc": 0.8})
        store.save({}, step=4)
        assert store.best().step == 2 and store.resolve("best").step == 2


def test_sha256_store_verifies(store_path):
    with ckstore.Store(store_path, hash_algorithm="sha256") as store:
        info = store.save(_state(2.0), step=1)
        assert all(e.hash.algo == "sha256" for e in info.files.values())
        assert store.verify() == []
        assert store.load(step=1)["epoch"] == 2


def test_an_unknown_hash_algorithm_is_a_bad_argument_naming_the_option(store_path):
    """A bad option is the caller's mistake, not a malformed manifest: a ValueError that names ``hash_algorithm``
    (it was a ManifestError saying only "unsupported hash algorithm 'md5'"), raised at open, before anything is written."""
    with pytest.raises(ckstore.InvalidArgumentError) as excinfo:
        ckstore.Store(store_path, hash_algorithm="md5")
    assert isinstance(excinfo.value, ckstore.CkstoreError) and isinstance(excinfo.value, ValueError)
    assert not isinstance(excinfo.value, ckstore.ManifestError)
    assert "hash_algorithm" in str(excinfo.value) and "md5" in str(excinfo.value)
    assert not store_path.exists()


def test_store_path_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ckstore.InvalidArgumentError):
        ckstore.Store(tmp_path / "file")
    with pytest.raises(ckstore.CheckpointNotFoundError):
        ckstore.Store(tmp_path / "absent", readonly=True)


def test_closed_store_refuses_work(store_path):
    store = ckstore.Store(store_path)
    store.save({}, step=1)
    store.close()
    store.close()  # idempotent
    for call in (lambda: store.save({}, step=2), lambda: store.load(), store.checkpoints, store.verify):
        with pytest.raises(ckstore.InvalidArgumentError):
            call()


# ---------------------------------------------------------------- corruption


def _truncate(path):
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)


def _zero_fill(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.write(b"\0" * size)  # same size: only the hash can tell (a power cut after a rename without fsync)


def _flip_last(path):
    flip_byte(path, -1)


def _flip_header(path):
    flip_byte(path, 9)


CORRUPTIONS = {"flip_data": _flip_last, "flip_header": _flip_header, "truncate": _truncate, "zero_fill": _zero_fill, "delete": os.unlink}


@pytest.mark.guarantee("G3")
@pytest.mark.parametrize("corrupt", sorted(CORRUPTIONS))
def test_load_of_a_corrupt_checkpoint_names_the_file(store, corrupt):
    store.save(_state(1.0), step=1)
    info = store.save(_state(2.0), step=2)
    victim = _tensor_file(info)
    CORRUPTIONS[corrupt](victim)
    with pytest.raises(ckstore.IntegrityError) as excinfo:
        store.load(step=2)
    assert excinfo.value.path == victim
    assert victim in str(excinfo.value)
    assert excinfo.value.expected is not None and excinfo.value.actual is not None
    with pytest.raises(ckstore.IntegrityError):
        store.load(step="latest")
    # No step: fall back to the newest that verifies, with a warning; keep the corrupt one on disk.
    with pytest.warns(ckstore.CorruptCheckpointWarning, match="step 2"):
        loaded = store.load()
    assert loaded["epoch"] == 1
    assert info.path.is_dir() and (info.path / "manifest.json").exists()
    assert [p.path for p in store.verify()] == [victim]
    assert [p.step for p in store.verify(2)] == [2] and store.verify(1) == []
    # Loading into live tensors: a corrupt checkpoint raises; falling back restores the good one in place.
    target = torch.zeros(16)
    with pytest.raises(ckstore.IntegrityError):
        store.load({"model": {"w": target}}, step=2)
    with pytest.warns(ckstore.CorruptCheckpointWarning):
        store.load({"model": {"w": target}})
    assert torch.equal(target, torch.full((16,), 1.0))


@pytest.mark.guarantee("G3")
def test_flipped_manifest_byte_is_an_integrity_error(store):
    store.save(_state(1.0), step=1)
    info = store.save(_state(2.0), step=2)
    manifest = info.path / "manifest.json"
    data = manifest.read_bytes()
    position = data.index(b'"hash":"') + len('"hash":"blake3:') + 3  # inside a file hash
    flip_byte(manifest, position)
    with pytest.raises(ckstore.IntegrityError) as excinfo:
        store.load(step=2)
    assert excinfo.value.path == str(manifest)
    with pytest.warns(ckstore.CorruptCheckpointWarning):
        assert store.load()["epoch"] == 1
    problems = store.verify(2)
    assert [p.path for p in problems] == [str(manifest)]
    assert manifest.exists()


@pytest.mark.guarantee("G3")
@pytest.mark.parametrize("position", [0, 1, 10, 50, 100, -2, -1])
def test_any_manifest_flip_fails_loudly(store, position):
    info = store.save(_state(2.0), step=2)
    manifest = info.path / "manifest.json"
    flip_byte(manifest, position)
    with pytest.raises((ckstore.IntegrityError, ckstore.ManifestError)) as excinfo:
        store.load(step=2)
    assert excinfo.value.path == str(manifest)
    assert len(store.verify()) == 1


@pytest.mark.guarantee("G4", "G6")
def test_no_checkpoint_verifies(store):
    for step in (1, 2):
        info = store.save(_state(float(step)), step=step)
        _flip_last(_tensor_file(info))
    with pytest.warns(ckstore.CorruptCheckpointWarning):
        with pytest.raises(ckstore.CheckpointNotFoundError, match="no checkpoint verifies"):
            store.load()
    assert len(store.checkpoints()) == 2


@pytest.mark.guarantee("G3", "G6")
def test_verify_reports_every_problem(store):
    a = store.save(_state(1.0), step=1)
    b = store.save(_state(2.0), step=2)
    c = store.save(_state(3.0), step=3)
    store.save(_state(4.0), step=4)
    _flip_last(_tensor_file(a))
    os.unlink(_tensor_file(b))
    (c.path / "extra.bin").write_bytes(b"not listed")
    os.unlink(store.path / "checkpoints" / "step-00000004" / "manifest.json")
    problems = store.verify()
    by_step = {}
    for p in problems:
        by_step.setdefault(p.step, []).append(p)
    assert sorted(by_step) == [1, 2, 3, 4]
    assert by_step[1][0].path == _tensor_file(a) and "hash" in by_step[1][0].message
    assert by_step[2][0].actual == "missing"
    assert by_step[3][0].path == str(c.path / "extra.bin") and "not listed" in by_step[3][0].message
    assert by_step[4][0].actual == "missing"
    assert len(problems) == 4
    # verify modified nothing
    assert (c.path / "extra.bin").exists() and a.path.exists()


# ---------------------------------------------------------------- recovery and readonly


def _plant_leftovers(root):
    staging = root / ".staging" / "step-00000009.deadbeef"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"\0" * 100)
    trash = root / ".trash" / "step-00000001.cafebabe"
    trash.mkdir()
    (trash / "manifest.json").write_bytes(b"{}")
    (root / ".tags.json.tmp-0123456789ab").write_bytes(b"partial")


@pytest.mark.guarantee("G13")
def test_leftovers_are_removed_by_the_first_write_but_ignored_by_reads(store_path):
    with ckstore.Store(store_path) as store:
        store.save(_state(1.0), step=1)
    _plant_leftovers(store_path)
    with ckstore.Store(store_path, readonly=True) as reader:
        assert [i.step for i in reader.checkpoints()] == [1]
        assert reader.load()["epoch"] == 1
        assert reader.verify() == []
    assert len(_leftovers(store_path)) == 3  # readonly touched nothing
    with ckstore.Store(store_path) as store:
        assert store.load(step=1)["epoch"] == 1
        assert len(_leftovers(store_path)) == 3  # neither did a plain open that only read
        store.save({}, step=2)
        assert _leftovers(store_path) == []


@pytest.mark.guarantee("G13")
def test_recovery_waits_for_the_lock_holder(store_path, peer):
    """A writable open while another process writes must not remove that writer's staging."""
    with ckstore.Store(store_path) as store:
        store.save({}, step=1)  # holds the lock from here on
        _plant_leftovers(store_path)
        assert peer.call(op="open", path=store_path) == {"ok": True, "steps": [1]}
        assert len(_leftovers(store_path)) == 3
    with ckstore.Store(store_path) as store:
        store.recover()
        assert _leftovers(store_path) == []


@pytest.mark.guarantee("G13")
def test_tags_of_missing_checkpoints_are_dropped_on_recovery(store_path):
    with ckstore.Store(store_path) as store:
        store.save({}, step=1, tags=["a"])
        store.save({}, step=2, tags=["b"])
    shutil.move(store_path / "checkpoints" / "step-00000002", store_path / ".trash" / "step-00000002.x")  # a delete cut short
    with ckstore.Store(store_path) as store:
        assert [(i.step, i.tags) for i in store.checkpoints()] == [(1, ("a",))]
        with pytest.raises(ckstore.CheckpointNotFoundError):
            store.resolve("b")


def test_readonly_store_refuses_writes(store_path):
    with ckstore.Store(store_path) as store:
        store.save({}, step=1, tags=["t"])
    with ckstore.Store(store_path, readonly=True) as reader:
        for call in (
            lambda: reader.save({}, step=2),
            lambda: reader.tag(1, "x"),
            lambda: reader.untag("t"),
            lambda: reader.delete(1),
            lambda: reader.gc(),
        ):
            with pytest.raises(ckstore.ReadOnlyStoreError):
                call()
        assert [(i.step, i.tags) for i in reader.checkpoints()] == [(1, ("t",))]
    assert not (store_path / "checkpoints" / "step-00000002").exists()


@pytest.mark.guarantee("G13")
def test_readonly_store_takes_no_lock(store_path):
    with ckstore.Store(store_path) as writer:
        writer.save({}, step=1)
        with ckstore.Store(store_path, readonly=True) as reader:
            assert reader.latest().step == 1
            writer.save({}, step=2)
            assert reader.latest().step == 2


@pytest.mark.guarantee("G11")
def test_delete(store):
    for step in (1, 2, 3):
        store.save({}, step=step)
    store.delete(2)
    assert [i.step for i in store.checkpoints()] == [1, 3]
    assert os.listdir(store.path / ".trash") == []
    with pytest.raises(ckstore.CheckpointNotFoundError):
        store.delete(2)
    with pytest.raises(ckstore.InvalidArgumentError):
        store.delete(-2)


# ---------------------------------------------------------------- disk full


def _record_ops(action, phase):
    ops = []

    def hook(op, phase_, path, info):
        if phase_ == phase:
            ops.append((op, info.get("site"), path))

    with _durable.hooked(hook):
        action()
    return ops


def _seed(template):
    with ckstore.Store(template, keep_last=2) as store:
        store.save(_state(1.0), step=1, metrics={"loss": 1.0})
        store.save(_state(2.0), step=2, metrics={"loss": 2.0}, tags=["keep"])


_FROZEN = torch.ones(2000)


def _saved(step: int) -> dict:
    """The state ``_failing_save`` saves at ``step``. Every tensor but ``frozen`` differs between steps 3 and 4, so
    an incremental save links exactly one file (``frozen``) whatever the allocator does: a tensor with equal bytes
    at a reused address would be linked in one run and written in the next, and the two runs would make different
    numbers of operations."""
    value = float(step)
    return {"model": {"w": torch.full((1000,), value), "b": torch.arange(1000, dtype=torch.int32) + step},
            "opt": {"lr": value}, "epoch": step, "frozen": _FROZEN}


def _failing_save(root, incremental=False, done=None):
    """Save step 3 (and, incremental, step 4 hard-linking ``frozen`` from 3); ``done`` collects the steps whose save returned."""
    done = [] if done is None else done
    with ckstore.Store(root, keep_last=2, incremental=incremental) as store:
        store.save(_saved(3), step=3, metrics={"loss": 3.0}, tags=["new"])
        done.append(3)
        if incremental:
            store.save(_saved(4), step=4, metrics={"loss": 4.0})
            done.append(4)


@pytest.mark.guarantee("G14")
@pytest.mark.parametrize("phase, incremental", [("before", False), ("after", False), ("before", True)], ids=["before", "after", "incremental"])
def test_enospc_at_each_operation_of_a_save(fast_path, phase, incremental):
    """Open a store and save (with tags and retention); fail the i-th durable operation with ENOSPC, for every i.

    ``before``: the system call fails; ``after``: it took effect, then reported failure (as a failed fsync does).
    ``incremental``: two saves of an incremental store, the second hard-linking a file of the first.
    Every injection must fire (a sweep that skipped the ones that never fired could test nothing and pass), and
    which checkpoints survive follows from the error alone.
    """
    template = fast_path / "template"
    _seed(template)
    probe = fast_path / "probe"
    shutil.copytree(template, probe, symlinks=True)
    ops = _record_ops(lambda: _failing_save(probe, incremental), phase)
    assert [o for o in ops if o[0] == "rename" and "step-00000003" in o[2]], "the save never committed?"
    if incremental:
        assert [o[0] for o in ops].count("link") == 1, "the incremental save did not link exactly the frozen file"
    assert any(o[0] == "fsync" for o in ops) and any(o[0] == "fsync_dir" for o in ops)
    # keep_last=2 with step 2 tagged: the save also deletes step 1, so retention's operations are covered too.
    assert any(o[0] == "rename" and "step-00000001" in o[2] for o in ops)

    fired = []
    for index, (op, site, _) in enumerate(ops):
        root = fast_path / f"case{index}"
        shutil.copytree(template, root, symlinks=True)
        events = iter(range(10**6))
        seen = []

        renamed = set()  # steps whose commit rename took effect

        def counting(op_, phase_, path, info, index=index):
            if op_ == "rename" and info.get("site") == "commit" and phase_ == "after":
                renamed.add(int(os.path.basename(info["dst"]).removeprefix("step-")))
            if phase_ == phase:
                seen.append(op_)
                if next(events) == index:
                    fired.append(index)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

        raised, done = None, []
        with _durable.hooked(counting):
            try:
                _failing_save(root, incremental, done)
            except Exception as exc:  # noqa: BLE001 - checked below
                raised = exc
        # The probe's operation at this index; the writer and sync threads may order a run's file operations
        # differently, so the run's own operation #index can be another one of the same save.
        where = f"ENOSPC {phase} op #{index} (the probe's {op} at {site})"
        assert fired[-1:] == [index], f"{where}: the injection never fired (this run made {len(seen)} operations, the probe {len(ops)})"
        # Before the commit point: StorageError (nothing committed). After it (tags, retention):
        # CommittedWithErrorsError, since the step is durable and saving it again would be refused.
        assert isinstance(raised, (ckstore.StorageError, ckstore.CommittedWithErrorsError)), f"{where}: got {raised!r}"
        assert raised.errno == errno.ENOSPC, where
        committed = set(done)
        if isinstance(raised, ckstore.CommittedWithErrorsError):
            assert raised.step in (3, 4), where
            committed.add(raised.step)
        assert committed <= renamed, where
        if renamed - committed:
            assert isinstance(raised, ckstore.StorageError), f"{where}: {raised!r}"
            if not (phase == "after" and op == "rename" and site == "commit"):
                # The commit rename took effect, then the directory fsync after it failed: the checkpoint is whole
                # and visible, but whether it survives a power cut is unknown, and the error must say so. (A rename
                # that reports failure after taking effect is told apart by nobody: the save calls itself abandoned.)
                assert "committed but its durability is unknown" in str(raised), f"{where}: {raised!r}"
        # Earlier checkpoints are intact and loadable; the next write (here an explicit recover) leaves no debris.
        with ckstore.Store(root) as store:
            store.recover()
            assert _leftovers(root) == [], where
            steps = {i.step for i in store.checkpoints()}
            # Exactly the steps whose commit rename took effect are there, whole: a save that failed before it
            # leaves nothing visible.
            assert steps & {3, 4} == renamed, f"{where}: steps {sorted(steps)} after {raised!r}"
            # Step 1 goes only by the retention of a step 3 whose save went on past its commit; step 2 is tagged.
            assert steps - {3, 4} in ({1, 2}, {2} if 3 in committed else {1, 2}), f"{where}: steps {sorted(steps)}"
            assert store.verify() == [], where
            assert store.load(step=2)["epoch"] == 2, where
            if 1 in steps:
                assert store.load(step=1)["epoch"] == 1, where
            for step in sorted(renamed):
                assert_same(store.load(step=step), _saved(step), where)
            # and the store keeps working once space is back
            store.save(_state(5.0), step=5)
            assert store.load()["epoch"] == 5, where
    assert fired == list(range(len(ops)))


@pytest.mark.guarantee("G14")
def test_store_keeps_working_after_a_failed_save_in_the_same_object(store_path):
    with ckstore.Store(store_path) as store:
        store.save(_state(1.0), step=1)

        def hook(op, phase, path, info):
            if op == "fsync" and phase == "before":
                raise OSError(errno.EIO, "I/O error", path)

        with _durable.hooked(hook), pytest.raises(ckstore.StorageError) as excinfo:
            store.save(_state(2.0), step=2)
        assert excinfo.value.errno == errno.EIO
        assert os.listdir(store_path / ".staging") == []  # the failed save cleaned up after itself
        assert [i.step for i in store.checkpoints()] == [1]
        store.save(_state(2.0), step=2)
        assert store.load()["epoch"] == 2


@contextlib.contextmanager
def _tmpfs(path, size):
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"ckstore-test-{uuid.uuid4().hex[:8]}", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); CI runs as root with mount rights")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.guarantee("G14")
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)")
def test_real_full_filesystem(tmp_path):
    with _tmpfs(tmp_path / "small", "1m") as mount:
        root = mount / "store"
        with ckstore.Store(root) as store:
            store.save({"w": torch.ones(100_000, dtype=torch.uint8)}, step=1)  # ~100 KB
            with pytest.raises(ckstore.StorageError) as excinfo:
                store.save({"w": torch.ones(2_000_000, dtype=torch.uint8)}, step=2)  # 2 MB: cannot fit
            assert excinfo.value.errno == errno.ENOSPC
            assert [i.step for i in store.checkpoints()] == [1]
            assert store.verify() == []
            assert os.listdir(root / ".staging") == []
            store.save({"w": torch.zeros(100_000, dtype=torch.uint8)}, step=2)  # space came back
        with ckstore.Store(root) as store:
            assert _leftovers(root) == []
            assert torch.equal(store.load(step=1)["w"], torch.ones(100_000, dtype=torch.uint8))
            assert [i.step for i in store.checkpoints()] == [1, 2]


@pytest.mark.guarantee("G7")
def test_committed_files_are_never_rewritten(store):
    """A committed checkpoint is immutable: tagging and later saves leave its bytes alone."""
    info = store.save(_state(1.0), step=1)
    before = {name: (info.path / name).read_bytes() for name in os.listdir(info.path)}
    store.tag(1, "x")
    store.save(_state(2.0), step=2, tags=["x"])
    store.untag("x")
    after = {name: (info.path / name).read_bytes() for name in os.listdir(info.path)}
    assert before == after
    assert json.loads(before["manifest.json"])["step"] == 1


@pytest.mark.guarantee("G16")
def test_no_pickle_on_disk(store, make_training_state):
    model, optimizer, scheduler = make_training_state()
    info = store.save({"model": model, "optimizer": optimizer, "scheduler": scheduler}, step=1)
    for name in os.listdir(info.path):
        data = (info.path / name).read_bytes()
        assert not data.startswith(b"\x80") and b"PK\x03\x04" not in data[:4]  # pickle protocol marker / torch.save zip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store.load({"model": model, "optimizer": optimizer, "scheduler": scheduler}, step=1)


def test_verify_reports_a_tensor_the_manifest_names_but_the_file_lacks(store):
    import dataclasses

    from ckstore.format.manifest import parse_manifest

    store.save({"v": torch.ones(2), "w": torch.arange(4.0)}, step=1)
    path = store.latest().path / "manifest.json"
    manifest = parse_manifest(path.read_bytes())
    state = json.loads(json.dumps(manifest.state))
    state["v"]["key"] = "renamed"
    path.write_bytes(dataclasses.replace(manifest, state=state).to_json())  # validly re-signed
    problems = store.verify(1)
    assert [p.expected for p in problems] == ["renamed"]
    assert problems[0].path.endswith("v.safetensors")
    with pytest.raises(ckstore.IntegrityError):
        store.load(step=1)


def test_a_corrupt_tags_file_never_blocks_opening_saving_or_loading(store_path):
    with ckstore.Store(store_path, keep_last=1) as store:
        store.save({"w": torch.ones(3)}, step=1, tags=["keep"])
    tags = store_path / "tags.json"
    tags.write_bytes(tags.read_bytes().replace(b'"keep"', b'"kept"'))  # checksum no longer matches
    before = tags.read_bytes()
    with ckstore.Store(store_path, keep_last=1) as store:
        with pytest.warns(ckstore.CorruptCheckpointWarning):
            store.save({"w": torch.zeros(3)}, step=2)  # recovery warns; retention is skipped: which steps are pinned is unknown
        with pytest.warns(ckstore.CorruptCheckpointWarning):
            assert [i.step for i in store.checkpoints()] == [1, 2]
        assert torch.equal(store.load(step=1)["w"], torch.ones(3))
        with pytest.raises(ckstore.IntegrityError):
            store.tag(2, "other")
    assert tags.read_bytes() == before  # nothing that fails to verify is rewritten or deleted
