"""The invariants checked on every crash state, whatever tier produced it.

1. The store opens writable without manual repair (opening runs recovery).
2. After recovery no staging, trash or temp-file leftovers remain.
3. Every checkpoint visible in ``checkpoints/`` verifies (no torn or partial
   checkpoint is ever visible) and ``tags.json`` parses.
4. An acknowledged save (``save`` returned) is never lost, unless the workload
   itself may delete that step (retention); an acknowledged delete stays done.
   Checkpoints from before the crash window are never lost either.
5. No torn data is loaded: every visible checkpoint loads to exactly the state
   saved at its step, and ``load()`` with no step returns the newest one.
6. The workload's own check (tags, a resumed training run).

:func:`check_store` returns violation messages; an empty list means the state
is good. An unexpected exception anywhere is itself a violation.
"""

from __future__ import annotations

import os
import traceback
import warnings
from collections.abc import Iterable
from typing import Any

import ckstore
from ckstore import _durable

from .workloads import Workload, same_state


def check_store(root: str, workload: Workload, acks: Iterable[tuple[str, Any]], base_steps: Iterable[int] = ()) -> list[str]:
    acks = list(acks)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _check(root, workload, acks, set(base_steps))
    except Exception as exc:  # any exception escaping the checks is a finding, not a harness crash
        last = traceback.extract_tb(exc.__traceback__)[-1]
        return [f"unexpected {type(exc).__name__} during checking: {str(exc)[:200]} (at {os.path.basename(last.filename)}:{last.lineno})"]


def _check(root: str, workload: Workload, acks: list[tuple[str, Any]], base_steps: set[int]) -> list[str]:
    out: list[str] = []
    try:
        store = ckstore.Store(root, **workload.store_kwargs)
        store.recover()  # what the next write does first (opening alone recovers nothing)
    except Exception as exc:
        return [f"store does not open after the crash: {type(exc).__name__}: {str(exc)[:200]}"]
    try:
        for sub in (".staging", ".trash"):
            left = sorted(os.listdir(os.path.join(root, sub)))
            if left:
                out.append(f"leftovers in {sub} after recovery: {left[:3]}")
        temps = [n for n in os.listdir(root) if _durable.is_temp_name(n)]
        if temps:
            out.append(f"temp files left after recovery: {temps[:3]}")
        for problem in store.verify():
            out.append(f"visible checkpoint fails verification: step {problem.step}: {problem.message[:160]}")
        infos = store.checkpoints()
        steps = {info.step for info in infos}
        acked = {value for kind, value in acks if kind == "save"}
        for step in sorted((acked | base_steps) - workload.may_vanish - steps):
            out.append(f"{'acknowledged save' if step in acked else 'earlier checkpoint'} of step {step} lost")
        for step in sorted({value for kind, value in acks if kind == "delete"} & steps):
            out.append(f"acknowledged delete of step {step} undone")
        if workload.content is not None:
            for info in infos:
                try:
                    loaded = store.load(step=info.step)
                except ckstore.CkstoreError as exc:
                    out.append(f"step {info.step} lists but does not load: {type(exc).__name__}: {str(exc)[:160]}")
                    continue
                if not same_state(loaded, workload.content(info.step, workload.scale)):
                    out.append(f"step {info.step} loads with content that differs from what was saved (torn data)")
        if infos:
            try:
                newest = store.load()
            except ckstore.CkstoreError as exc:
                out.append(f"load() of the newest checkpoint failed: {type(exc).__name__}: {str(exc)[:160]}")
            else:
                if isinstance(newest, dict) and newest.get("step") != max(steps):
                    out.append(f"load() returned step {newest.get('step')}, newest verified is {max(steps)}")
        if workload.check is not None and not out:
            out.extend(workload.check(store, acks))
    finally:
        store.close()
    return out
