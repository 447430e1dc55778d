"""Shared filesystems: what ckstore does when a mount's locks or fsync behave like NFS or Lustre.

Each test mounts ``tests/fusefs.py``, a real FUSE passthrough filesystem (``/dev/fuse``, fuse3, mfusepy) that
answers flock and fsync the way a shared filesystem may (see its docstring), and drives a real ``Store``
through it. What they pin (docs/distributed.md, "Shared filesystems"):

* a mount whose flock fails (Lustre without ``-o flock``: ENOSYS; NFSv3 without a lock manager: ENOLCK) gives
  ``LockUnsupportedError`` before anything is written, never a silent fallback to a lock file that a dead
  writer would leave behind and that two hosts could both take;
* a mount whose kernel keeps flock locks locally (``local_lock=flock``, ``localflock``) excludes a second
  writer process on the same host, and the lock dies with its holder;
* an fsync error reaching through the mount abandons the save (G14).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import ckstore

HERE = Path(__file__).parent

#: The tests that mount FUSE need /dev/fuse, fuse3 and (here) root; the mountinfo tests need none of them.
needs_fuse = [
    pytest.mark.root,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(shutil.which("fusermount3") is None, reason="needs fuse3 (apt install fuse3)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting FUSE here needs root"),
]


def fuse_test(fn):
    for mark in needs_fuse:
        fn = mark(fn)
    return fn


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[..., tuple[Path, Path]]]:
    """``mount(flock=..., fsync=...)`` -> (backing dir, mount point) of a fresh FUSE passthrough mount."""
    pytest.importorskip("mfusepy")
    mounted: list[tuple[subprocess.Popen, Path]] = []

    def start(*, flock: str = "kernel", fsync: str = "pass") -> tuple[Path, Path]:
        n = len(mounted)
        backing, point = tmp_path / f"backing{n}", tmp_path / f"mnt{n}"
        backing.mkdir()
        point.mkdir()
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "fusefs.py"), str(backing), str(point), "--flock", flock, "--fsync", fsync],
            stderr=subprocess.PIPE,
        )
        mounted.append((proc, point))
        deadline = time.monotonic() + 15
        while not os.path.ismount(point):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"FUSE mount failed: {proc.stderr.read().decode()[-500:] if proc.poll() is not None else 'timeout'}")
            time.sleep(0.05)
        return backing, point

    yield start
    for proc, point in mounted:
        subprocess.run(["fusermount3", "-u", "-z", str(point)], check=False, capture_output=True)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _state() -> dict:
    return {"w": torch.arange(12, dtype=torch.float32)}


@fuse_test
@pytest.mark.guarantee("G12")
@pytest.mark.parametrize(("flock", "code"), [("enosys", errno.ENOSYS), ("enolck", errno.ENOLCK)])
def test_writer_lock_on_a_mount_without_flock_is_a_typed_error(mount, flock, code):
    backing, point = mount(flock=flock)
    store = ckstore.Store(point)
    with _no_warning():
        with pytest.raises(ckstore.LockUnsupportedError) as excinfo:
            store.save(_state(), step=1)
    err = excinfo.value
    assert isinstance(err, ckstore.StorageError) and err.errno == code
    assert err.path == str(point / ".ckstore.lock")
    assert "flock" in str(err) and ("localflock" in str(err) or "lockd" in str(err))
    store.close()
    # Nothing was written: no checkpoint, no soft-lock marker that a second host could take as well.
    assert not list(backing.glob("checkpoints/*")) and not list(backing.glob(".staging/*"))
    assert ckstore.Store(point, readonly=True).checkpoints() == []


class _no_warning:
    """Fails if a warning is emitted inside (filelock warns when it falls back to a soft lock)."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings(record=True)
        self._caught = self._ctx.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        messages = [str(w.message) for w in self._caught if "flock" in str(w.message).lower()]
        assert not messages, messages
        return False


@fuse_test
@pytest.mark.guarantee("G12")
def test_metadata_lock_on_a_mount_without_flock_is_a_typed_error(mount):
    backing, point = mount(flock="enosys")
    with ckstore.Store(backing) as local:  # written on the backing filesystem, where flock works
        local.save(_state(), step=1)
    store = ckstore.Store(point)
    with pytest.raises(ckstore.LockUnsupportedError) as excinfo:
        store.tag(1, "release")
    assert excinfo.value.errno == errno.ENOSYS
    assert excinfo.value.path == str(point / ".ckstore.meta.lock")
    store.close()
    assert not ckstore.Store(backing, readonly=True).resolve(1).tags


_HOLDER = """
import sys, time, torch, ckstore
store = ckstore.Store(sys.argv[1])
store.save({"w": torch.zeros(3)}, step=1)
print("held", flush=True)
time.sleep(120)
"""


@fuse_test
@pytest.mark.guarantee("G12")
def test_kernel_local_flock_excludes_a_second_writer_and_dies_with_it(mount):
    _, point = mount(flock="kernel")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(point)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with ckstore.Store(point) as second:
            with pytest.raises(ckstore.StoreLockedError) as excinfo:
                second.save(_state(), step=2)
            assert excinfo.value.pid == holder.pid
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        # The kernel released the dead holder's lock: no stale lock to break by hand.
        with ckstore.Store(point) as third:
            third.save(_state(), step=2)
            assert [c.step for c in third.checkpoints()] == [1, 2]
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


@fuse_test
@pytest.mark.guarantee("G14")
def test_fsync_error_through_the_mount_abandons_the_save(mount):
    backing, point = mount(fsync="eio")
    with ckstore.Store(point) as store:
        with pytest.raises(ckstore.StorageError) as excinfo:
            store.save(_state(), step=1)
        assert excinfo.value.errno == errno.EIO
    assert ckstore.Store(backing, readonly=True).checkpoints() == []


# --- Mounts whose locks are local to the host: flock succeeds, so only the mount options can tell. ---

_MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
101 27 0:55 / /shared rw,relatime - {fstype} server:/export rw,{options}
102 101 0:56 / /shared/local\\040disk rw,relatime - ext4 /dev/vdb rw
"""


@pytest.mark.parametrize(
    ("fstype", "options", "reason"),
    [
        ("nfs", "vers=3,nolock,local_lock=all,addr=10.0.0.1", "nolock"),
        ("nfs4", "vers=4.2,local_lock=flock,addr=10.0.0.1", "local_lock=flock"),
        ("lustre", "localflock", "localflock"),
        ("nfs4", "vers=4.2,local_lock=none,addr=10.0.0.1", None),
        ("nfs", "vers=3,local_lock=posix", None),  # posix: only fcntl locks are local; flock still reaches the server
        ("lustre", "flock", None),
    ],
)
def test_host_local_lock_mounts_are_recognised(fstype, options, reason):
    from ckstore.storage.mounts import host_local_locks

    info = _MOUNTINFO.format(fstype=fstype, options=options)
    found = host_local_locks("/shared/runs/exp1", info)
    assert (found is None) if reason is None else (reason in found and "/shared" in found)
    # A path on another mount below it (with an escaped space in its name) or elsewhere is judged by that mount.
    assert host_local_locks("/shared/local disk/runs", info) is None
    assert host_local_locks("/home/runs", info) is None


@pytest.mark.guarantee("G12")
def test_writer_lock_on_a_host_local_lock_mount_warns(tmp_path, monkeypatch):
    from ckstore.storage import mounts

    real = os.path.realpath(tmp_path)
    local = f"27 1 254:0 / / rw - ext4 /dev/vda rw\n101 27 0:55 / {real} rw - nfs4 server:/x rw,vers=4.2,local_lock=flock\n"
    monkeypatch.setattr(mounts, "MOUNTINFO", str(tmp_path.parent / "mountinfo"))
    (tmp_path.parent / "mountinfo").write_text(local)
    with pytest.warns(mounts.HostLocalLockWarning, match="local_lock=flock") as caught:
        with ckstore.Store(tmp_path / "store") as store:
            store.save(_state(), step=1)
    assert "other hosts" in str(caught[0].message)
    (tmp_path.parent / "mountinfo").write_text(local.replace("local_lock=flock", "local_lock=none"))
    with _no_warning(), ckstore.Store(tmp_path / "store") as store:
        store.save(_state(), step=2)
