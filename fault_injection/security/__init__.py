"""Security tier: every finding of the untrusted-input audit (issue 16), run as an attack.

Each attack builds a crafted store, repo, remote or journal in its own scratch
directory, plants a *victim* beside it (a file and a directory tree that
nothing may read, write, move or delete), runs ckstore against the crafted
input, and then checks:

* the victim is byte-for-byte and inode-for-inode untouched;
* the attack function itself reported nothing (it returns a list of findings:
  a hang, an untyped exception, a load that did not fall back, ...);
* the child neither hung (each attack runs in a forked child under a timeout)
  nor ran past its memory cap (``RLIMIT_AS``, a few GiB above the child's size
  at fork, so a bomb fails fast instead of taking the machine down).

Attacks live in one module per area, so each area grows on its own:

* ``store.py``  recovery, delete, layout, ownership, readonly opens, CLI output
* ``read.py``   FIFOs, /dev/zero, sparse files, manifest and nesting bombs
* ``dvc.py``    pull traversal, crafted journals, git hooks, .dvc YAML

Register an attack with ``@attack("area")``; its function takes an ``Attack
context`` (:class:`Ctx`) and returns a list of findings (empty = passed).
Cross-user cases run a command as a second uid through :func:`as_user`
(``setpriv``), since the harness runs as root.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from ..report import Row

AREAS = ("store", "read", "dvc")
NOBODY = 65534


@dataclass
class Ctx:
    """What an attack gets: a scratch directory, and a victim beside it that must stay untouched."""

    root: str  # scratch directory of this attack; build the crafted input inside it
    victim: str  # a directory tree outside every store/repo: victim/secret.txt, victim/tree/deep/file.bin
    victim_file: str  # victim/secret.txt
    notes: list[str] = field(default_factory=list)


@dataclass
class Attack:
    name: str
    area: str
    fn: Callable[[Ctx], list[str]]
    timeout: float = 60.0
    memory_gib: float = 3.0  # RLIMIT_AS headroom above the child's size at fork


ATTACKS: list[Attack] = []


def attack(area: str, *, timeout: float = 60.0, memory_gib: float = 3.0) -> Callable[[Callable[[Ctx], list[str]]], Callable[[Ctx], list[str]]]:
    """Register ``fn`` as an attack of ``area`` (its name is the function's name)."""
    if area not in AREAS:
        raise ValueError(f"unknown area {area!r}; known: {AREAS}")

    def register(fn: Callable[[Ctx], list[str]]) -> Callable[[Ctx], list[str]]:
        ATTACKS.append(Attack(fn.__name__, area, fn, timeout, memory_gib))
        return fn

    return register


def plant_victim(base: str) -> tuple[str, str]:
    victim = os.path.join(base, "victim")
    os.makedirs(os.path.join(victim, "tree", "deep"))
    secret = os.path.join(victim, "secret.txt")
    with open(secret, "w") as fh:
        fh.write("do not touch\n")
    with open(os.path.join(victim, "tree", "deep", "file.bin"), "wb") as fh:
        fh.write(os.urandom(4096))
    os.chmod(victim, 0o755)
    return victim, secret


def snapshot(top: str) -> dict[str, tuple]:
    """Path -> (type, inode, mode, size, sha256) for everything under ``top`` (not following links)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            digest = ""
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as fh:
                    digest = hashlib.sha256(fh.read()).hexdigest()
            out[os.path.relpath(path, top)] = (st.st_mode >> 12, st.st_ino, st.st_mode & 0o7777, st.st_size, digest)
    st = os.lstat(top)
    out["."] = (st.st_mode >> 12, st.st_ino, st.st_mode & 0o7777, 0, "")
    return out


def as_user(argv: list[str], *, uid: int = NOBODY, gid: int = NOBODY, timeout: float = 60, env: dict[str, str] | None = None,
            cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as another user (default: nobody) with ``setpriv``; the harness itself runs as root."""
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"] + argv
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, stdin=subprocess.DEVNULL)


def _child(a: Attack, ctx: Ctx, write_fd: int) -> None:
    try:
        with open("/proc/self/status") as fh:
            vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
        cap = vm + int(a.memory_gib * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        findings = [str(f) for f in a.fn(ctx)]
    except MemoryError:
        findings = ["ran out of memory (a bomb was not bounded)"]
    except BaseException:
        findings = ["untyped escape: " + traceback.format_exc(limit=6).strip().splitlines()[-1]]
    with os.fdopen(write_fd, "w") as fh:
        fh.write("\n".join(f.replace("\n", " ") for f in findings))
    os._exit(0)


def run_one(a: Attack, workdir: str) -> list[str]:
    base = tempfile.mkdtemp(prefix=f"sec-{a.name}-", dir=workdir)
    os.chmod(base, 0o755)  # a second uid must be able to reach its own files under here
    try:
        victim, secret = plant_victim(base)
        root = os.path.join(base, "attack")
        os.makedirs(root)
        os.chmod(root, 0o755)
        before = snapshot(victim)
        ctx = Ctx(root=root, victim=victim, victim_file=secret)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            os.setsid()
            _child(a, ctx, write_fd)
        os.close(write_fd)
        deadline = time.monotonic() + a.timeout
        findings: list[str] = []
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                findings.append(f"hung: no result after {a.timeout:.0f} s")
                status = 0
                break
            time.sleep(0.02)
        with os.fdopen(read_fd) as fh:
            text = fh.read().strip()
        if text:
            findings.extend(text.splitlines())
        elif not findings and os.waitstatus_to_exitcode(status) != 0:
            findings.append(f"child died: exit {os.waitstatus_to_exitcode(status)}")
        try:
            after = snapshot(victim)
        except FileNotFoundError:
            after = {}
        if after != before:
            changed = sorted(set(before) ^ set(after) | {k for k in before if k in after and before[k] != after[k]})
            findings.append(f"victim touched: {changed[:5]}")
        return findings
    finally:
        subprocess.run(["chattr", "-R", "-i", base], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def load_areas(areas: tuple[str, ...] = AREAS) -> None:
    import importlib

    for area in areas:
        importlib.import_module(f"{__name__}.{area}")


def run_tier(workdir: str, *, areas: tuple[str, ...] = AREAS, only: str | None = None) -> list[Row]:
    """One row per area: attacks run, and each finding (victim touched, hang, untyped error) is a violation."""
    load_areas(areas)
    os.chmod(workdir, 0o755)  # the cross-user attacks' second uid must reach its own files below
    rows = []
    for area in areas:
        row = Row("security", area)
        t0 = time.monotonic()
        for a in ATTACKS:
            if a.area != area or (only and only not in a.name):
                continue
            row.cycles += 1
            for finding in run_one(a, workdir):
                row.violation(f"{a.name}: {finding}")
        row.seconds = time.monotonic() - t0
        row.note = f"{row.cycles} attacks, victim checked after each"
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m fault_injection.security [--only NAME] [AREA ...]``: run attacks, print findings."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fault_injection.security")
    parser.add_argument("areas", nargs="*", default=list(AREAS))
    parser.add_argument("--only", help="run only attacks whose name contains this")
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="ckstore-sec-")
    os.chmod(workdir, 0o755)
    try:
        rows = run_tier(workdir, areas=tuple(args.areas), only=args.only)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for row in rows:
        print(f"{row.area if hasattr(row, 'area') else row.workload}: {row.cycles} attacks, {row.violations} violations")
        for ex in row.examples:
            print("   ", ex)
    return 1 if any(r.violations for r in rows) else 0
