"""Read-side faults and malformed entries: typed errors, fallback, and a store that stays usable.

Faults are injected through ``ckstore.storage.safeio``'s read hook, the read-side
twin of ``_durable``'s hooks: the hook raises a real ``OSError`` (EIO) before
the system call, or shortens what one read returns (a short read, or an
early end of file). A file vanishing between listing and open is a real
unlink done by the hook just before the open. Unreadable files are made
unreadable for real, and read as a second uid (``setpriv``).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import warnings

import pytest
import torch

import ckstore
from conftest import PYTHON, REPO_ROOT, assert_same


def _state(step: int) -> dict:
    gen = torch.Generator().manual_seed(step)
    return {"w": torch.randn(64, 8, generator=gen), "b": torch.randn(8, generator=gen), "step": step, "note": f"at {step}"}


@pytest.fixture
def two(tmp_path):
    root = tmp_path / "store"
    with ckstore.Store(root) as store:
        store.save(_state(1), step=1)
        store.save(_state(2), step=2)
    return root


def _step_dir(root, step: int):
    return root / "checkpoints" / f"step-{step:08d}"


def _tensor_file(root, step: int, key: str = "w") -> str:
    """The file holding tensor ``key`` of checkpoint ``step``."""
    return str(_step_dir(root, step) / f"{key}.safetensors")


class _Inject:
    """Fail (or shorten) every read of files whose path contains ``needle``."""

    def __init__(self, needle: str, *, ops=("open", "read"), err: int | None = errno.EIO, limit: int | None = None, vanish: bool = False):
        self.needle, self.ops, self.err, self.limit, self.vanish = needle, ops, err, limit, vanish
        self.fired = 0

    def __call__(self, op: str, path: str, info: dict):
        if self.needle not in path or op not in self.ops:
            return None
        self.fired += 1
        if self.vanish:
            os.unlink(path)
            return None
        if self.err is not None:
            raise OSError(self.err, os.strerror(self.err), path)
        return self.limit


def _hooked(inject):
    from ckstore.storage import safeio as _safeio

    return _safeio.hooked(inject)


# ---------------------------------------------------------------- EIO


@pytest.mark.guarantee("G5")
@pytest.mark.parametrize("target", ["tensor", "manifest"])
def test_eio_while_reading_the_newest_checkpoint_falls_back_and_is_typed(two, target):
    needle = "step-00000002/" + ("manifest.json" if target == "manifest" else "")
    if target == "tensor":
        needle = _tensor_file(two, 2)
    inject = _Inject(needle)
    with ckstore.Store(two, readonly=True) as store, _hooked(inject):
        with pytest.warns(ckstore.CorruptCheckpointWarning):
            assert_same(store.load(), _state(1))
        assert inject.fired
        with pytest.raises(ckstore.CheckpointReadError) as info:
            store.load(step=2)
        err = info.value
        assert isinstance(err, ckstore.CkstoreError) and isinstance(err, OSError)
        assert err.errno == errno.EIO and "step-00000002" in err.path and "step-00000002" in str(err)
        problems = store.verify()
        assert [p.step for p in problems] == [2] and "step-00000002" in problems[0].path
        if target == "tensor":
            with pytest.raises(ckstore.CheckpointReadError):
                store.read_tensor("w", step=2)
            with pytest.raises(ckstore.CheckpointReadError):
                store.read_tensor("w", step=2, verify=True)


@pytest.mark.guarantee("G5")
def test_resume_falls_back_past_a_read_error(two):
    state = {"w": torch.zeros(64, 8), "b": torch.zeros(8), "step": 0, "note": ""}
    with ckstore.Store(two, readonly=True) as store, _hooked(_Inject(_tensor_file(two, 2))):
        with pytest.warns(ckstore.CorruptCheckpointWarning):
            assert ckstore.resume(store, state) == 1
    assert torch.equal(state["w"], _state(1)["w"])


@pytest.mark.guarantee("G5")
def test_eio_reading_tags_is_reported_not_raised(two):
    with ckstore.Store(two) as store:
        store.tag(2, "release")
    with ckstore.Store(two, readonly=True) as store, _hooked(_Inject("tags.json")):
        with pytest.warns(ckstore.CorruptCheckpointWarning):
            assert [i.step for i in store.checkpoints()] == [1, 2]
        problems = store.verify()
        assert [p.path for p in problems] == [str(two / "tags.json")]
        with pytest.raises(ckstore.CheckpointReadError):
            store.resolve("release")


# ---------------------------------------------------------------- short reads and early EOF


def test_short_reads_are_retried_and_load_is_exact(two):
    inject = _Inject("checkpoints", ops=("read",), err=None, limit=7)
    with ckstore.Store(two, readonly=True) as store, _hooked(inject):
        assert_same(store.load(), _state(2))
        assert store.verify() == []
        assert torch.equal(store.read_tensor("w", step=2, verify=True), _state(2)["w"])
    assert inject.fired > 10


@pytest.mark.guarantee("G3")
def test_early_end_of_file_never_gives_a_torn_load(two):
    inject = _Inject(_tensor_file(two, 2), ops=("read",), err=None, limit=0)
    with ckstore.Store(two, readonly=True) as store, _hooked(inject):
        with pytest.warns(ckstore.CorruptCheckpointWarning):
            assert_same(store.load(), _state(1))
        with pytest.raises(ckstore.IntegrityError):
            store.load(step=2)
        assert [p.step for p in store.verify()] == [2]


# ---------------------------------------------------------------- vanishing files


@pytest.mark.guarantee("G5")
@pytest.mark.parametrize("what", ["manifest.json", "tensor"])
def test_a_file_vanishing_between_listing_and_open_falls_back(two, what):
    needle = _tensor_file(two, 2) if what == "tensor" else str(_step_dir(two, 2) / "manifest.json")
    with ckstore.Store(two, readonly=True) as store:
        store.checkpoints()  # listed (and cached) first
        with _hooked(_Inject(needle, ops=("open",), err=None, vanish=True)), warnings.catch_warnings():
            warnings.simplefilter("ignore", ckstore.CorruptCheckpointWarning)
            if what == "tensor":
                assert_same(store.load(), _state(1))
            else:
                store._catalog.manifest_cache.clear()
                assert_same(store.load(), _state(1))


# ---------------------------------------------------------------- malformed entries


def _make_odd(path, kind: str, outside) -> None:
    if os.path.lexists(path):
        os.unlink(path)
    if kind == "directory":
        os.mkdir(path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        shutil.copyfile(outside, outside + ".copy") if not os.path.exists(outside + ".copy") else None
        os.symlink(outside + ".copy", path)
    else:
        raise AssertionError(kind)


@pytest.mark.guarantee("G5")
@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink"])
def test_an_odd_manifest_is_skipped_and_the_store_stays_usable(two, kind, tmp_path):
    manifest = str(_step_dir(two, 2) / "manifest.json")
    outside = str(tmp_path / "outside-manifest.json")
    shutil.copyfile(manifest, outside)
    _make_odd(manifest, kind, outside)
    with ckstore.Store(two, readonly=True) as store, warnings.catch_warnings():
        warnings.simplefilter("ignore", ckstore.CorruptCheckpointWarning)
        assert [i.step for i in store.checkpoints()] == [1]
        assert_same(store.load(), _state(1))
        with pytest.raises(ckstore.CkstoreError):
            store.load(step=2)
        assert [p.step for p in store.verify()] == [2]


@pytest.mark.guarantee("G5")
@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink"])
def test_an_odd_tags_file_is_reported_and_the_store_stays_usable(two, kind, tmp_path):
    with ckstore.Store(two) as store:
        store.tag(1, "release")
    tags = str(two / "tags.json")
    outside = str(tmp_path / "outside-tags.json")
    shutil.copyfile(tags, outside)
    _make_odd(tags, kind, outside)
    with ckstore.Store(two, readonly=True) as store, warnings.catch_warnings():
        warnings.simplefilter("ignore", ckstore.CorruptCheckpointWarning)
        infos = store.checkpoints()
        assert [i.step for i in infos] == [1, 2] and all(i.tags == () for i in infos)  # a symlinked tags.json is not followed
        assert_same(store.load(), _state(2))
        assert [p.path for p in store.verify()] == [tags]
        with pytest.raises(ckstore.CkstoreError):
            store.resolve("release")


def test_a_malformed_newest_checkpoint_state_falls_back(two):
    """A skeleton that fails to decode (a crafted or buggy writer) is skipped like any corrupt checkpoint."""
    sys.path.insert(0, str(REPO_ROOT))
    from fault_injection import badfiles

    case = badfiles.Case(str(two))
    case.dir = str(_step_dir(two, 2))
    badfiles._edit_manifest(badfiles._bogus_state("bad_float"))(case)
    with ckstore.Store(two, readonly=True) as store:
        with pytest.warns(ckstore.CorruptCheckpointWarning):
            assert_same(store.load(), _state(1))
        state = {"w": torch.zeros(64, 8), "b": torch.zeros(8), "step": 0, "note": ""}
        with pytest.warns(ckstore.CorruptCheckpointWarning):
            assert ckstore.resume(store, state) == 1


@pytest.fixture
def shared_dir():
    """A directory a second uid can reach (pytest's tmp_path is private to root)."""
    import tempfile
    from pathlib import Path

    path = tempfile.mkdtemp(prefix="ckstore-test-", dir="/tmp")
    os.chmod(path, 0o755)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def test_an_unreadable_manifest_is_skipped_by_another_user(shared_dir):
    """Made unreadable for real (mode 000) and listed by a second uid: the good checkpoint stays listed."""
    root = shared_dir / "store"
    with ckstore.Store(root) as store:
        store.save(_state(1), step=1)
        store.save(_state(2), step=2)
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    os.chmod(_step_dir(root, 2) / "manifest.json", 0)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HOME="/tmp")
    code = (
        "import warnings, ckstore\n"
        "warnings.simplefilter('ignore')\n"
        f"s = ckstore.Store({str(root)!r}, readonly=True)\n"
        "print([i.step for i in s.checkpoints()], s.load()['step'], [p.step for p in s.verify()])\n"
    )
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", PYTHON, "-c", code],
        capture_output=True, text=True, env=env, timeout=120, cwd="/tmp",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[0] == "[1] 1 [2]"


# ---------------------------------------------------------------- memory held by loaded tensors


def test_loaded_tensors_do_not_pin_their_files_buffer(tmp_path):
    layer = {"small": torch.arange(4.0), **{f"w{i}": torch.randn(1 << 16) for i in range(64)}}  # 16 MiB in all
    with ckstore.Store(tmp_path / "s") as store:
        store.save({"layer": layer}, step=1)
        info = store.checkpoints()[0]
        assert len(info.files) == 1 and info.nbytes > 16 << 20  # every tensor in one file: the case that pinned it
        out = store.load()
    small = out["layer"]["small"]
    assert torch.equal(small, torch.arange(4.0))
    assert small.untyped_storage().nbytes() <= 4096
    loaded = out["layer"]["w0"]
    assert torch.equal(loaded, layer["w0"])
    # Large tensors are still read straight into memory of their own (no copy, no extra buffer).
    assert loaded.untyped_storage().nbytes() == loaded.nbytes


# ---------------------------------------------------------------- the readfaults tier


@pytest.mark.guarantee("G5")
@pytest.mark.parametrize("operation", ["load_step", "resume", "read_tensor_verified"])
def test_readfaults_tier_finds_no_violation(tmp_path, operation):
    """Every read of the operation failed in turn (EIO, short read, early EOF, vanished file): typed or fallback, never torn."""
    sys.path.insert(0, str(REPO_ROOT))
    from fault_injection import readfaults

    row = readfaults.run_operation(operation, str(tmp_path))
    assert row.violations == 0, row.examples[:5]
    assert row.states >= 20  # faults really hit reads


# ---------------------------------------------------------------- one reader


def test_checkpoint_files_are_read_only_through_safeio():
    """The modules that read manifests, tags, tensor files and the lock owner never open or read a file themselves.

    Every such read goes through ``ckstore.storage.safeio`` (no symlink, no FIFO,
    capped, hookable), or a FIFO or a read fault could slip past the checks
    and the readfaults tier. The scan checks itself: _safeio does match.
    """
    import re

    pattern = re.compile(r"\bos\.(open|read|readv|pread|preadv)\(|(?<![\w.])open\(")
    package = REPO_ROOT / "ckstore"
    assert pattern.search((package / "storage/safeio.py").read_text())
    for name in ("store.py", "engine/read.py", "checkpoint/catalog.py", "format/tags.py", "storage/lock.py", "format/manifest.py", "checkpoint/manifest_cache.py"):
        offenders = [line.strip() for line in (package / name).read_text().splitlines() if pattern.search(line) and not line.lstrip().startswith("#")]
        assert not offenders, f"{name} reads files itself: {offenders}"
