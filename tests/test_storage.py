"""The storage seam: the protocol, the local backend, and the recording backend the crash model uses."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ckstore
from ckstore.storage import base, durable
from ckstore.storage.local import LocalStorage
from ckstore.storage.recording import RecordingStorage

PROTOCOL = [name for name, value in vars(base.Storage).items() if inspect.isfunction(value) and not name.startswith("_")]


def test_the_protocol_is_small_and_names_what_the_checkpoint_layer_needs():
    assert {"create", "read_ranges", "list", "commit", "remove_tree", "lock"} <= set(PROTOCOL)
    assert len(PROTOCOL) <= 16


@pytest.mark.parametrize("backend", [LocalStorage, RecordingStorage])
def test_each_backend_has_every_operation_with_the_protocols_signature(backend):
    for name in PROTOCOL:
        wanted = inspect.signature(getattr(base.Storage, name))
        got = inspect.signature(getattr(backend, name))
        assert list(got.parameters) == list(wanted.parameters), name
        assert [p.kind for p in got.parameters.values()] == [p.kind for p in wanted.parameters.values()], name


def test_durable_operations_run_on_the_installed_backend(tmp_path):
    """Every layer calls storage.durable's functions; with a backend installed, they are its operations."""
    calls = []

    class Counting(LocalStorage):
        def rename(self, src, dst, *, site, replace=False):
            calls.append(("rename", site))
            super().rename(src, dst, site=site, replace=replace)

        def sync_dir(self, path, *, site):
            calls.append(("sync_dir", site))
            super().sync_dir(path, site=site)

    with base.using(Counting()):
        durable.write_file_atomic(tmp_path / "f", b"x", site="t")  # a composite: its steps are dispatched too
    durable.write_file_atomic(tmp_path / "g", b"y", site="t")  # none installed: the local code as written
    assert calls == [("rename", "t"), ("sync_dir", "t_dir")]
    assert base.installed() is None and (tmp_path / "f").read_bytes() == b"x"


def _recorded(record_into: list):
    return RecordingStorage(lambda op, phase, path, info: record_into.append((op, phase, os.path.basename(path), info["site"])))


def test_the_recording_backend_reports_each_step_of_a_composite_operation(tmp_path):
    events = []
    top = tmp_path / "t"
    (top / "d").mkdir(parents=True)
    (top / "d" / "f").write_bytes(b"1")
    os.symlink("/etc", top / "link")
    with base.using(_recorded(events)):
        durable.write_file_atomic(tmp_path / "tags.json", b"{}", site="tags")
        durable.remove_tree(top, site="gc")
    after = [(op, name, site) for op, phase, name, site in events if phase == "after"]
    tmp = next(name for op, name, _ in after if op == "create")
    assert after[:6] == [("create", tmp, "tags"), ("write", tmp, "tags"), ("fsync", tmp, "tags"), ("close", tmp, "tags"),
                         ("rename", tmp, "tags"), ("fsync_dir", tmp_path.name, "tags_dir")]
    assert sorted(after[6:]) == [("rmdir", "d", "gc"), ("rmdir", "t", "gc"), ("unlink", "f", "gc"), ("unlink", "link", "gc")]
    assert not top.exists() and os.path.isdir("/etc")


def test_a_save_through_the_recording_backend_reports_the_commit_protocol(tmp_path):
    events = []
    with ckstore.Store(tmp_path / "s") as store, base.using(_recorded(events)):
        store.save({"w": __import__("torch").ones(3)}, step=1)
    after = [(op, site) for op, phase, _, site in events if phase == "after"]
    commit = after.index(("rename", "commit"))
    assert ("fsync", "tensor_file") in after[:commit] and ("fsync", "manifest") in after[:commit]
    assert ("fsync_dir", "staging_dir") in after[:commit] and ("fsync_dir", "checkpoints_dir") in after[commit:]


def test_a_failing_fsync_system_call_reaches_the_writer_which_then_refuses_work(tmp_path):
    """The recording backend fails fsync where the system call is, so FileWriter's own handling runs (fsyncgate)."""

    def eio(fd):
        raise OSError(5, "Input/output error")

    with base.using(RecordingStorage(lambda *a: None, fsync=eio)):
        writer = durable.create(tmp_path / "f", site="t")
        writer.write(b"data")
        with pytest.raises(OSError, match="Input/output"):
            writer.sync()
        with pytest.raises(OSError, match="must be abandoned"):
            writer.sync()  # never a second fsync over dropped pages
        writer.close()
        with pytest.raises(OSError, match="Input/output"):
            durable.sync_dir(tmp_path, site="t")


def test_local_reads_lists_commits_and_locks(tmp_path):
    local = LocalStorage()
    (tmp_path / "staging").mkdir()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "staging" / "f").write_bytes(bytes(range(100)))
    assert local.read_ranges(tmp_path / "staging" / "f", [(0, 3), (98, 2)]) == [b"\x00\x01\x02", b"\x62\x63"]
    local.commit(tmp_path / "staging", tmp_path / "checkpoints" / "c", site="commit", sync=[tmp_path / "checkpoints", tmp_path])
    assert local.list(tmp_path) == ["checkpoints"] and local.list(tmp_path / "checkpoints" / "c") == ["f"]
    store = tmp_path / "store"
    ckstore.Store(store).close()
    other = [sys.executable, "-c", f"import ckstore; ckstore.Store({str(store)!r}, lock_timeout=0).save({{'a': 1}}, step=1)"]
    with local.lock(store):  # another process's writer is refused while it is held
        proc = subprocess.run(other, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert proc.returncode == 1 and "StoreLockedError" in proc.stderr
    assert subprocess.run(other, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).returncode == 0
    os.symlink(tmp_path / "checkpoints" / "c" / "f", tmp_path / "ln")
    with pytest.raises(OSError):
        local.read_ranges(tmp_path / "ln", [(0, 1)])  # a planted link is never followed


def test_outside_storage_writers_come_from_the_installed_backend():
    """A FileWriter made directly would bypass the installed backend: the crash model would miss its writes."""
    import ast

    package = Path(ckstore.__file__).parent
    direct = []
    for module in package.rglob("*.py"):
        rel = module.relative_to(package).as_posix()
        if rel.startswith("storage/"):
            continue
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "FileWriter":
                direct.append(f"{rel}:{node.lineno}")
    assert direct == [], "use storage.durable.create(...)"


def test_a_store_given_a_backend_runs_every_operation_under_its_root_on_it(tmp_path):
    """Store(path, storage=...): its saves (a background one's threads too) go through the backend; another
    store's do not, and after close() neither does a later Store on the same directory."""
    import torch

    events = []
    recording = _recorded(events)
    with ckstore.Store(tmp_path / "a", storage=recording) as a, ckstore.Store(tmp_path / "b") as b:
        a.save({"w": torch.ones(3)}, step=1)
        a.save({"w": torch.zeros(3)}, step=2, blocking=False)  # written by the background saver's threads
        b.save({"w": torch.ones(3)}, step=1)
        a.wait()
        with pytest.raises(ckstore.InvalidArgumentError, match="another storage backend"):
            ckstore.Store(tmp_path / "a", storage=LocalStorage())
    commits = [name for op, phase, name, site in events if (op, phase, site) == ("rename", "after", "commit")]
    assert len(commits) == 2 and all(name.startswith("step-0000000") for name in commits)
    assert ("fsync", "after") in {(op, phase) for op, phase, _, site in events if site == "tensor_file"}
    recorded = len(events)
    with ckstore.Store(tmp_path / "a") as again:
        again.save({"w": torch.ones(3)}, step=3)
    assert len(events) == recorded and base.installed(tmp_path / "a") is None
