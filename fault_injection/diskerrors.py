"""Tier 4: disk errors. EIO and ENOSPC at every operation, real ENOSPC, real short writes, signal storms.

Injected errors: the durability hook raises ``OSError(EIO)`` or
``OSError(ENOSPC)`` before the n-th operation of a workload, for every n. The
operation that failed must surface as a typed ``StorageError`` (never another
exception), or as ``CommittedWithErrorsError`` when it came after the commit
rename (tagging, retention: the checkpoint is durable and the error says so); after a failed fsync the file must never be fsynced again and the
save must not commit (Linux may have dropped the dirty pages, a second fsync
can report success over lost data); afterwards every invariant holds on the
directory (earlier checkpoints intact, leftovers recovered, the store opens).

Real errors, no hook involved:

* ENOSPC from a small tmpfs mounted for the purpose (root only);
* a short write followed by EFBIG: a child lowers ``RLIMIT_FSIZE`` so that the
  kernel accepts only part of a write, as a full disk or a quota does;
* EINTR: a child saves while a 2 kHz ``SIGALRM`` interval timer with a Python
  handler interrupts its system calls (CPython retries them, PEP 475); every
  save must still verify.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import subprocess
import time
from typing import Any

import ckstore
from ckstore.storage import durable as _durable

from . import _child
from .invariants import ERRORS, check_store
from .killpoints import fresh_copy, prepare_template
from .report import Row
from .workloads import WORKLOADS, Workload, expected_state, same_state


class _Injector:
    """Fails the ``target``-th operation with ``err``; records every event after it.

    An fsync fails at the system call itself (:meth:`fsync` replaces
    ``os.fsync`` for the run), inside the library's own error handling; other
    operations fail from the hook just before their system call.
    """

    def __init__(self, target: int, err: int) -> None:
        self.target = target
        self.err = err
        self.count = 0
        self.failed: tuple[str, str, str] | None = None  # op, site, path of the injected failure
        self.after: list[tuple[str, str, str, dict[str, Any]]] = []
        self._armed = False
        self._real_fsync = os.fsync

    def fsync(self, fd: int) -> None:
        if self._armed:
            self._armed = False
            raise OSError(self.err, os.strerror(self.err))
        self._real_fsync(fd)

    def hook(self, op: str, phase: str, path: str, info: dict[str, Any]) -> None:
        if self.failed is not None:
            self.after.append((op, phase, path, {k: v for k, v in info.items() if k != "data"}))
        if phase != "before":
            return
        self.count += 1
        if self.count == self.target:
            self.failed = (op, info.get("site"), path)
            if op in ("fsync", "fsync_dir"):
                self._armed = True
                return
            raise OSError(self.err, os.strerror(self.err), path)


def _count_before_events(workload: Workload, template: str, workdir: str) -> list[str]:
    events: list[str] = []

    def hook(op: str, phase: str, path: str, info: dict[str, Any]) -> None:
        if phase == "before":
            events.append(f"{op} [{info.get('site')}]")

    root = fresh_copy(template, workdir, "errors-dry")
    with _durable.hooked(hook):
        workload.run(root, lambda kind, value: None, workload.scale)
    return events


#: ENOSPC is injected only where space is allocated; elsewhere it takes EIO's path exactly.
ENOSPC_OPS = ("write", "create", "mkdir", "link")


def run_injected(workload: Workload, workdir: str, *, stop_on_violation: bool = False) -> Row:
    row = Row("4 disk errors", f"{workload.name}: EIO each op, ENOSPC where space is allocated")
    start = time.monotonic()
    template, base_steps = prepare_template(workload, workdir)
    events = _count_before_events(workload, template, workdir)
    enospc = 0
    for n in range(1, len(events) + 1):
        if stop_on_violation and row.violations:
            break
        errs = (errno.EIO, errno.ENOSPC) if events[n - 1].split(" ")[0] in ENOSPC_OPS else (errno.EIO,)
        enospc += len(errs) - 1
        for err in errs:
            root = fresh_copy(template, workdir, "errors-cycle")
            injector = _Injector(n, err)
            acks: list[tuple[str, Any]] = []
            raised: BaseException | None = None
            os.fsync = injector.fsync
            try:
                with _durable.hooked(injector.hook):
                    workload.run(root, lambda kind, value: acks.append((kind, value)), workload.scale)
            except BaseException as exc:  # classified below
                raised = exc
            finally:
                os.fsync = injector._real_fsync
            row.cycles += 1
            where = f"{errno.errorcode[err]} at op {n} ({events[n - 1]})"
            # The typed outcomes: StorageError (nothing committed), or CommittedWithErrorsError (the checkpoint
            # committed, then tagging or retention failed; it says so). A background save wraps either.
            typed = (ckstore.StorageError, ckstore.CommittedWithErrorsError)
            if isinstance(raised, ckstore.AsyncSaveError):
                raised = raised.__cause__ if isinstance(raised.__cause__, typed) else raised
            if injector.failed is None:
                row.violation(f"{ERRORS}: {where}: injection point not reached")
                continue
            if raised is None:
                row.violation(f"{ERRORS}: {where}: the error was swallowed; the workload completed as if it had succeeded")
            elif isinstance(raised, ckstore.CommittedWithErrorsError):
                # A failure after the commit rename (tags, retention): the checkpoint is durable and the error says so.
                if "rename [commit]" not in events[: n - 1]:
                    row.violation(f"{ERRORS}: {where}: CommittedWithErrorsError, but the save never reached its commit rename")
                elif raised.errno != err:
                    row.violation(f"{ERRORS}: {where}: CommittedWithErrorsError carries errno {raised.errno}, expected {err}")
            elif not isinstance(raised, ckstore.StorageError):
                row.violation(f"{ERRORS}: {where}: raised {type(raised).__name__} ({str(raised)[:120]}), not StorageError or CommittedWithErrorsError")
            elif raised.errno != err:
                row.violation(f"{ERRORS}: {where}: StorageError carries errno {raised.errno}, expected {err}")
            op, site, path = injector.failed
            if op == "fsync":
                if any(o == "fsync" and p == path for o, _, p, _ in injector.after):
                    row.violation(f"{ERRORS}: {where}: the failed fsync was retried on {os.path.basename(path)}")
                if site in ("tensor_file", "manifest") and any(o == "rename" and i.get("site") == "commit" for o, ph, _, i in injector.after if ph == "after"):
                    row.violation(f"{ERRORS}: {where}: the save committed after its fsync failed")
            for message in check_store(root, workload, acks, base_steps):
                row.violation(f"{where}: {message}")
    row.seconds = time.monotonic() - start
    row.note = f"EIO at each of {len(events)} ops (fsync failed at the system call), ENOSPC at the {enospc} that allocate space"
    return row


# ---------------------------------------------------------------- real errors


def _saves_until_error(root: str, ack: Any, scale: int) -> None:
    with ckstore.Store(root) as store:
        for step in (3, 4, 5):
            try:
                store.save(expected_state(step, scale), step=step)
            except ckstore.StorageError as exc:
                ack("error", ["StorageError", exc.errno])
                return
            except Exception as exc:
                ack("error", [type(exc).__name__, str(exc)[:200]])
                return
            ack("save", step)


def _two_steps(root: str, scale: int) -> None:
    with ckstore.Store(root) as store:
        for step in (1, 2):
            store.save(expected_state(step, 16), step=step)


def _real_error_row(name: str, workdir: str, root_parent: str, *, scale: int, before_run: Any, expect_errno: set[int]) -> Row:
    row = Row("4 disk errors", name)
    start = time.monotonic()
    small = Workload(name, _saves_until_error, _two_steps, scale=scale, content=lambda step, _scale: expected_state(step, 16 if step <= 2 else scale))
    root = os.path.join(root_parent, "store")
    _two_steps(root, scale)
    result = _child.fork_workload(small, root, before_run=before_run)
    row.cycles = 1
    errors = [value for kind, value in result.acks if kind == "error"]
    if not result.ok:
        row.violation(f"writer failed: {result.error or result.status}")
    elif not errors:
        row.violation("no error happened (the state fit)")
    elif errors[0][0] != "StorageError" or errors[0][1] not in expect_errno:
        row.violation(f"raised {errors[0]}, expected StorageError with errno in {sorted(expect_errno)}")
    for message in check_store(root, small, result.acks, [1, 2]):
        row.violation(message)
    row.seconds = time.monotonic() - start
    row.note = f"got {errors[0][0]}({errno.errorcode.get(errors[0][1], errors[0][1])})" if errors and isinstance(errors[0][1], int) else ""
    return row


def run_real_enospc(workdir: str) -> Row:
    from .powercut import can_mount

    reason = "mounting a small tmpfs needs root (CI runs as root)" if os.geteuid() != 0 else can_mount()
    if reason is not None:
        row = Row("4 disk errors", "real ENOSPC (1 MiB tmpfs)")
        row.note = f"SKIPPED: {reason}"
        return row
    mnt = os.path.join(workdir, "tiny-tmpfs")
    os.makedirs(mnt, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt], check=True, capture_output=True)
    try:
        return _real_error_row("real ENOSPC (1 MiB tmpfs)", workdir, mnt, scale=1 << 14, before_run=None, expect_errno={errno.ENOSPC})
    finally:
        subprocess.run(["umount", mnt], capture_output=True)


def run_short_write(workdir: str) -> Row:
    base = os.path.join(workdir, "short-write")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_003, hard))  # a write across this offset comes back short

    return _real_error_row("real short write, then EFBIG (RLIMIT_FSIZE)", workdir, base, scale=1 << 14, before_run=limit, expect_errno={errno.EFBIG})


def _storm_saves(root: str, ack: Any, scale: int) -> None:
    with ckstore.Store(root, keep_last=3) as store:
        for step in range(3, 13):
            store.save(expected_state(step, scale), step=step)
            ack("save", step)
    ack("signals", _SIGNALS[0])


_SIGNALS = [0]


def run_signal_storm(workdir: str, *, scale: int = 1 << 15) -> Row:
    row = Row("4 disk errors", "EINTR: 2 kHz SIGALRM during saves")
    start = time.monotonic()
    base = os.path.join(workdir, "storm")
    shutil.rmtree(base, ignore_errors=True)
    workload = Workload("storm", _storm_saves, None, {"keep_last": 3}, scale=scale)

    def storm() -> None:
        def handler(signum: int, frame: Any) -> None:
            _SIGNALS[0] += 1

        signal.signal(signal.SIGALRM, handler)
        signal.siginterrupt(signal.SIGALRM, True)  # interrupt system calls (EINTR) rather than restart them
        signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)

    result = _child.fork_workload(workload, os.path.join(base, "store"), before_run=storm)
    row.cycles = 1
    if not result.ok:
        row.violation(f"saves under a signal storm failed: {result.error or result.status}")
    signals = next((v for k, v in result.acks if k == "signals"), 0)
    with ckstore.Store(os.path.join(base, "store"), readonly=True) as store:
        for info in store.checkpoints():
            if not same_state(store.load(step=info.step), expected_state(info.step, scale)):
                row.violation(f"step {info.step} differs after the signal storm")
    for message in check_store(os.path.join(base, "store"), workload, result.acks, []):  # ends with a writable save
        row.violation(message)
    row.states = 0
    row.seconds = time.monotonic() - start
    row.note = f"{signals} signals delivered during 10 saves"
    return row


def run_tier(workdir: str, *, workloads: list[str], seed: int) -> list[Row]:
    rows = [run_injected(WORKLOADS[name], workdir) for name in workloads]
    rows.append(run_real_enospc(workdir))
    rows.append(run_short_write(workdir))
    rows.append(run_signal_storm(workdir))
    return rows

