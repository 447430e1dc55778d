"""Tier 3: real power cuts on ext4, xfs and btrfs.

There is no device-mapper on the target machines, but loop devices work. Each
file system lives in an image file in tmpfs, mounted through a loop device
with a long commit interval (nothing reaches the "device" unless an fsync or
the journal forces it). Per cycle:

1. copy the prepared template image, attach it, mount it;
2. a forked writer saves checkpoints (with tags and retention), acknowledging
   each save over a pipe; the parent SIGKILLs it at a random moment;
3. copy the image at once: the copy holds only the blocks the file system
   already sent to the device, which is what a power cut would leave;
4. unmount the original, mount the copy (journal replay), open the store and
   check the invariants, unmount.

Measured on the development machine (2 cores): 2 to 4 cycles per second.
Needs root (losetup, mount); without it the tier is skipped and says why.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import ckstore

from . import _child
from .invariants import Oracle, check_store, write_base
from .report import Row
from .workloads import Workload, expected_state, intent

# image size, mkfs command, mount options (long commit intervals; ext4 without the
# rename-over heuristic that would hide a missing fsync of a replaced file)
FILESYSTEMS: dict[str, tuple[int, list[str], list[str]]] = {
    "ext4": (64 << 20, ["mkfs.ext4", "-q", "-F"], ["-o", "commit=60,noauto_da_alloc"]),
    "xfs": (320 << 20, ["mkfs.xfs", "-q", "-f"], ["-o", "nouuid"]),
    "btrfs": (128 << 20, ["mkfs.btrfs", "-q", "-f"], ["-o", "commit=60"]),
}

KEEP_LAST = 3
FIRST_STEP = 3
LAST_STEP = 14


#: cycles per file system that cut right after the k-th acknowledged save (k = 1..N)
ACK_ALIGNED_CUTS = 3

_MOUNT_PROBE: list[str | None] = []


def _cut_after_ack(k: int) -> Any:
    """A hook (run in the writer) that cuts at the first operation of the save after the ``k``-th acknowledged one.

    The workload acknowledges save ``n`` before it starts save ``n + 1``, whose first durable
    operation is the ``mkdir`` of its staging directory (site ``staging``): the ``k + 1``-th such
    event comes right after the ``k``-th acknowledgement.
    """
    seen = 0

    def hook(op: str, phase: str, path: str, info: dict[str, Any]) -> None:
        nonlocal seen
        if op == "mkdir" and phase == "before" and info.get("site") == "staging":
            seen += 1
            if seen == k + 1:
                os.killpg(0, signal.SIGKILL)

    return hook


def can_mount() -> str | None:
    """None if this process may mount file systems (probed once with a tiny tmpfs), else why not."""
    if not _MOUNT_PROBE:
        probe = tempfile.mkdtemp(prefix="ckstore-fi-mount-probe-")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe], capture_output=True, text=True)
        if proc.returncode == 0:
            subprocess.run(["umount", probe], capture_output=True)
            _MOUNT_PROBE.append(None)
        else:
            _MOUNT_PROBE.append(f"mount is not permitted here ({proc.stderr.strip()[:100]}); a container without CAP_SYS_ADMIN?")
        os.rmdir(probe)
    return _MOUNT_PROBE[0]


def skip_reason(fs: str | None = None) -> str | None:
    """Why this tier cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root for losetup and mount (CI runs as root)"
    if not os.path.exists("/dev/loop-control"):
        return "no loop device support (/dev/loop-control missing)"
    for tool in ("losetup", "mount", "umount", "cp"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    if fs is not None and shutil.which(FILESYSTEMS[fs][1][0]) is None:
        return f"{FILESYSTEMS[fs][1][0]} not installed (apt: e2fsprogs, xfsprogs, btrfs-progs)"
    if subprocess.run(["losetup", "--find"], capture_output=True).returncode != 0:
        return "no free loop device"
    return can_mount()


def _sh(*args: str) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[:300]}")
    return proc.stdout.strip()


@contextlib.contextmanager
def mounted(image: str, mnt: str, fs: str) -> Iterator[str]:
    loop = _sh("losetup", "--find", "--show", image)
    try:
        _sh("mount", "-t", fs, *FILESYSTEMS[fs][2], loop, mnt)
        try:
            yield loop
        finally:
            for attempt in range(50):
                try:
                    _sh("umount", mnt)
                    break
                except RuntimeError:
                    if attempt == 49:
                        raise
                    time.sleep(0.1)
    finally:
        for attempt in range(50):
            try:
                _sh("losetup", "-d", loop)
                break
            except RuntimeError:
                if attempt == 49:
                    raise
                time.sleep(0.1)
        if fs == "btrfs":
            # Forget the detached device so that the next image with the same fsid is not confused with it.
            with contextlib.suppress(RuntimeError, FileNotFoundError):
                _sh("btrfs", "device", "scan", "--forget")


def _copy(src: str, dst: str) -> None:
    _sh("cp", "--sparse=always", src, dst)


def _run_saves(root: str, ack: Any, scale: int) -> None:
    with ckstore.Store(root, keep_last=KEEP_LAST) as store:
        for step in range(FIRST_STEP, LAST_STEP + 1):
            intent(ack, step, tags=["head"])
            store.save(expected_state(step, scale), step=step, tags=["head"])
            ack("save", step)


def _prepare(root: str, scale: int) -> None:
    with ckstore.Store(root) as store:
        for step in (1, 2):
            store.save(expected_state(step, scale), step=step)


def power_workload(scale: int) -> Workload:
    return Workload("power_saves", _run_saves, _prepare, {"keep_last": KEEP_LAST}, scale=scale)


def run_fs(fs: str, workdir: str, *, cycles: int, scale: int, seed: int, stop_on_violation: bool = False) -> Row:
    row = Row("3 power cut", f"{fs}: saves+tags+retention")
    reason = skip_reason(fs)
    if reason is not None:
        row.note = f"SKIPPED: {reason}"
        return row
    start = time.monotonic()
    rng = random.Random(seed)
    workload = power_workload(scale)
    base = os.path.join(workdir, f"power-{fs}")
    shutil.rmtree(base, ignore_errors=True)
    mnt = os.path.join(base, "mnt")
    os.makedirs(mnt)
    template = os.path.join(base, "template.img")
    work = os.path.join(base, "work.img")
    crash = os.path.join(base, "crash.img")
    size, mkfs, _ = FILESYSTEMS[fs]
    with open(template, "wb") as fh:
        fh.truncate(size)
    _sh(*mkfs, template)
    with mounted(template, mnt, fs):
        _prepare(os.path.join(mnt, "store"), scale)
        base_steps = write_base(os.path.join(mnt, "store"))  # mnt/base.json travels in every copy of the image
    # Calibrate: how long the whole run takes when nothing kills it.
    _copy(template, work)
    with mounted(work, mnt, fs):
        t0 = time.monotonic()
        dry = _child.fork_workload(workload, os.path.join(mnt, "store"))
        span = time.monotonic() - t0
    os.unlink(work)
    if not dry.ok:
        raise RuntimeError(f"power-cut dry run on {fs} failed: {dry.error}")
    acked_total = required = 0
    phases = {"before the first ack": 0, "mid-run": 0, "after the run finished": 0}
    # Random cuts, then one cut right after each acknowledgement: the writer dies at the first
    # durable operation of the next save, so nothing later (a file fsync that makes ext4 commit its
    # journal) can rescue a rename whose directory fsync is missing. A random delay lands in that
    # window only by luck; these cycles make a missing directory fsync a certain finding.
    plans: list[tuple[str, float | int]] = [("random", rng.uniform(0.0, span)) for _ in range(cycles)]
    plans += [("after ack", k) for k in range(1, ACK_ALIGNED_CUTS + 1)]
    for kind, when in plans:
        _copy(template, work)
        with mounted(work, mnt, fs):
            if kind == "random":

                def wait(pid: int, delay: float = float(when)) -> None:
                    time.sleep(delay)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)

                result = _child.fork_workload(workload, os.path.join(mnt, "store"), wait=wait)
                label = f"power cut at {float(when) * 1000:.0f} ms"
            else:
                result = _child.fork_workload(workload, os.path.join(mnt, "store"), hook=_cut_after_ack(int(when)))
                label = f"power cut right after acknowledgement {when}"
            _copy(work, crash)  # the power cut: only what reached the device survives
        os.unlink(work)
        row.cycles += 1
        saves = {v for kind, v in result.acks if kind == "save"}
        phase = "after the run finished" if result.ok else ("mid-run" if saves else "before the first ack")
        phases[phase] += 1
        if phase == "mid-run":
            acked_total += len(saves)
            oracle = Oracle.build(workload.store_kwargs, [{"step": s} for s in base_steps], result.acks)
            required += len(oracle.keeps(oracle.acked, latest=oracle.last_saved) & saves)
        if not (result.killed or result.ok):
            row.violation(f"writer failed: {result.error or result.status}")
        else:
            with mounted(crash, mnt, fs):
                for message in check_store(os.path.join(mnt, "store"), workload, result.acks, base_steps):
                    row.violation(f"{label} after {len(result.acks)} acks: {message}")
        os.unlink(crash)
        if stop_on_violation and row.violations:
            break
    shutil.rmtree(base, ignore_errors=True)
    row.seconds = time.monotonic() - start
    row.note = (
        f"cut {phases['mid-run']} mid-run ({acked_total} acknowledged saves, {required} of them required to survive by the policy), "
        f"{phases['before the first ack']} before the first ack, {phases['after the run finished']} after the run finished "
        f"({ACK_ALIGNED_CUTS} of the cuts right after an acknowledgement, the rest at random); "
        f"{expected_mb(scale):.1f} MB/save; kill + lost page cache, no device-level reordering"
    )
    return row


def expected_mb(scale: int) -> float:
    state = expected_state(0, scale)
    return (sum(t.numel() for t in state["model"].values()) + state["optimizer"]["state"]["momentum"].numel()) * 4 / 1e6


def run_tier(workdir: str, *, filesystems: list[str], cycles: int, scale: int, seed: int, stop_on_violation: bool = False) -> list[Row]:
    rows = []
    for n, fs in enumerate(filesystems):
        rows.append(run_fs(fs, workdir, cycles=cycles, scale=scale, seed=seed + n, stop_on_violation=stop_on_violation))
        if stop_on_violation and rows[-1].violations:
            break
    return rows
