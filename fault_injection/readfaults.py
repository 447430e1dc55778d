"""Read-fault tier: EIO, short reads and early end of file at every read of load, verify and read_tensor; files vanishing between listing and open.

The store's reads all go through ``ckstore.storage.safeio`` (every open and every
``pread``/``preadv`` of a store file), whose hook is the injection point, as
``_durable``'s is for writes. A dry run of each operation counts its read
events; then, for every event ``n``, the operation is run again with one
fault at event ``n``:

* ``eio``: the system call fails with ``OSError(EIO)``;
* ``short``: the read returns half of what was asked (a short read is legal;
  the result must be exactly the fault-free result);
* ``eof``: the read returns 0 bytes, an early end of file (a truncated file);
* ``vanish`` (open events only): the file is really unlinked just before the
  open, as a writer's retention or a user's ``rm`` would do after listing.

The store holds steps 3 and 5 (and a tag, so ``tags.json`` is read too).
Every operation must end in one of: the fault-free result; a typed
``CkstoreError``; for ``load()`` and ``resume()``, a fallback to step 3 whose
state is exactly step 3's. A raw ``OSError`` or any other exception, a torn
state (equal to neither step), a ``verify()`` that raises, or a ``verify()``
that reports nothing although a fault hit a checkpoint file, is a violation.
After each fault but ``vanish``, the store must verify clean without the
hook: reads never change a store.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
import warnings
from collections.abc import Callable
from typing import Any

import ckstore
from ckstore.storage import safeio as _safeio

from .report import Row
from .workloads import expected_state, same_state

SCALE = 16
KINDS = ("eio", "short", "eof", "vanish")


def _target() -> dict[str, Any]:
    """A state to resume into: the shape of expected_state with other values."""
    state = expected_state(0, SCALE)
    state["step"], state["note"] = -1, ""
    return state


def _load(store: ckstore.Store) -> Any:
    return store.load()


def _load_step(store: ckstore.Store) -> Any:
    return store.load(step=5)


def _verify(store: ckstore.Store) -> Any:
    return store.verify()


def _read_tensor(store: ckstore.Store) -> Any:
    return store.read_tensor("model/enc.weight", step=5)


def _read_tensor_verified(store: ckstore.Store) -> Any:
    return store.read_tensor("model/enc.weight", step=5, verify=True)


def _resume(store: ckstore.Store) -> Any:
    state = _target()
    step = ckstore.resume(store, state)
    return step, state


OPERATIONS: dict[str, Callable[[ckstore.Store], Any]] = {
    "load": _load,
    "load_step": _load_step,
    "verify": _verify,
    "read_tensor": _read_tensor,
    "read_tensor_verified": _read_tensor_verified,
    "resume": _resume,
}


class _Fault:
    """One fault at the ``target``-th event (1-based) of kind ``kind``; records where it hit."""

    def __init__(self, target: int, kind: str) -> None:
        self.target, self.kind = target, kind
        self.count = 0
        self.hit: tuple[str, str] | None = None  # (op, path)
        self.events: list[tuple[str, str]] = []

    def __call__(self, op: str, path: str, info: dict[str, Any]) -> int | None:
        self.count += 1
        self.events.append((op, path))
        if self.count != self.target:
            return None
        if self.kind == "vanish":
            if op != "open":
                return None
            self.hit = (op, path)
            os.unlink(path)
            return None
        if self.kind == "eio":
            self.hit = (op, path)
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        if op != "read":
            return None  # a short read or EOF only applies to reads
        self.hit = (op, path)
        return max(1, info["size"] // 2) if self.kind == "short" else 0


def _same(name: str, a: Any, b: Any) -> bool:
    if name == "verify":
        return a == b
    if name == "resume":
        return a[0] == b[0] and same_state(a[1], b[1])
    return same_state(a, b)


def _judge(name: str, result: Any, error: BaseException | None, clean: Any, fault: _Fault) -> list[str]:
    """Violations of one faulted run of operation ``name``."""
    if fault.hit:
        op, path = fault.hit
        where = f"{fault.kind} at event {fault.target} ({op} {os.path.basename(os.path.dirname(path))}/{os.path.basename(path)})"
    else:
        where = f"{fault.kind} at event {fault.target} (not applicable there)"
    harmless = fault.hit is None or fault.kind == "short"  # a short read is legal: nothing may change
    if error is not None:
        if not isinstance(error, ckstore.CkstoreError):
            return [f"{name}: {where}: untyped {type(error).__name__}: {str(error)[:160]}"]
        if name == "verify":
            return [f"verify raised {type(error).__name__} on {where}: {str(error)[:160]}"]
        if harmless:
            return [f"{name}: {where}: failed although nothing failed: {type(error).__name__}: {str(error)[:160]}"]
        return []
    if _same(name, result, clean):
        # Fine: the fault hit a read whose bytes were not needed (an EOF where the file ends anyway,
        # a listing of the older step). Except that verify must report an EIO in any file it reads.
        if name == "verify" and fault.kind == "eio" and fault.hit is not None:
            return [f"verify: {where}: reported no problem"]
        return []
    if harmless:
        return [f"{name}: {where}: result differs from the fault-free run"]
    if name == "verify":
        return []  # it reported the fault as a problem
    if name == "load":
        return [] if same_state(result, expected_state(3, SCALE)) else [f"load: {where}: torn load (state equals no committed step)"]
    if name == "resume":
        step, state = result
        return [] if step == 3 and same_state(state, expected_state(3, SCALE)) else [f"resume: {where}: torn resume (returned {step})"]
    return [f"{name}: {where}: torn result (differs from step 5 and no error)"]


def _run(root: str, name: str, hook: Any) -> tuple[Any, BaseException | None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with ckstore.Store(root, readonly=True) as store:
                if hook is None:
                    return OPERATIONS[name](store), None
                with _safeio.hooked(hook):
                    return OPERATIONS[name](store), None
        except Exception as exc:
            return None, exc


def _template(workdir: str) -> str:
    base = os.path.join(workdir, "readfaults-template")
    shutil.rmtree(base, ignore_errors=True)
    root = os.path.join(base, "store")
    with ckstore.Store(root) as store:
        for step in (3, 5):
            store.save(expected_state(step, SCALE), step=step, metrics={"loss": 1.0 / step})
        store.tag(3, "release")
    return root


def run_operation(name: str, workdir: str, *, kinds: tuple[str, ...] = KINDS) -> Row:
    row = Row("readfaults", f"{name}: {'/'.join(kinds)} each read")
    start = time.monotonic()
    template = _template(workdir)
    clean, error = _run(template, name, None)
    if error is not None:
        row.violation(f"{name} fails without faults: {type(error).__name__}: {error}")
        return row
    counter = _Fault(0, "none")
    _run(template, name, counter)
    events = len(counter.events)
    scratch = os.path.join(workdir, "readfaults-case")
    for kind in kinds:
        for n in range(1, events + 1):
            if kind == "vanish" and counter.events[n - 1][0] != "open":
                continue
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.copytree(os.path.dirname(template), scratch, symlinks=True)
            root = os.path.join(scratch, "store")
            fault = _Fault(n, kind)
            result, error = _run(root, name, fault)
            row.cycles += 1
            row.states += fault.hit is not None
            for message in _judge(name, result, error, clean, fault):
                row.violation(message)
            if kind != "vanish":
                after, failure = _run(root, "verify", None)
                if failure is not None or after:
                    row.violation(f"{name}: {kind} at event {n}: the store no longer verifies afterwards: {failure or after}")
    shutil.rmtree(scratch, ignore_errors=True)
    row.seconds = time.monotonic() - start
    row.note = f"{events} read events; faults that hit: {row.states}"
    return row


def run_tier(workdir: str, *, operations: tuple[str, ...] = tuple(OPERATIONS)) -> list[Row]:
    return [run_operation(name, workdir) for name in operations]
