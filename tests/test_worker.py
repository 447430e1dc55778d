"""The one background-worker primitive (ckstore.engine.worker) and the guard that it is the only one."""

from __future__ import annotations

import os
import pathlib
import re
import threading

import pytest

from ckstore.engine.worker import SerialWorker, UnseenFailures

ROOT = pathlib.Path(__file__).resolve().parents[1] / "ckstore"


def test_calls_run_in_submission_order_on_one_thread():
    worker = SerialWorker("t-order")
    seen: list[tuple[int, str]] = []
    futures = [worker.submit(lambda i=i: seen.append((i, threading.current_thread().name))) for i in range(50)]
    for future in futures:
        future.result(10)
    worker.shutdown()
    assert [i for i, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"t-order"}


def test_an_exception_lands_on_its_future_and_later_calls_still_run():
    worker = SerialWorker("t-fail", stop_when_idle=True)
    failed = worker.submit(lambda: 1 / 0)
    later = worker.submit(lambda: 7)
    with pytest.raises(ZeroDivisionError):
        failed.result(10)
    assert later.result(10) == 7
    worker.join()
    assert worker._thread is None  # stopped when idle: nothing outlives its work


def test_unseen_failures_are_reported_once_oldest_first():
    record: UnseenFailures[str] = UnseenFailures()
    record.add("a")
    record.add("b")
    record.add("c")
    record.seen("b")
    assert record.peek_all() == ["a", "c"]
    assert record.pop() == "a"
    assert record.pop() == "c"
    assert record.pop() is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_a_fresh_worker_and_no_parent_failure():
    # The parent's thread is busy (and holds nothing the child could wait for) at the fork.
    worker = SerialWorker("t-fork")
    record: UnseenFailures[str] = UnseenFailures()
    record.add("parent's failure")
    gate = threading.Event()
    busy = worker.submit(gate.wait, 30)
    worker.submit(lambda: None)  # queued behind it: the parent's, never the child's
    pid = os.fork()
    if pid == 0:  # child: must not hang, must not see the parent's failure
        code = 1
        try:
            ok = worker.submit(lambda: 42).result(10) == 42 and record.pop() is None
            code = 0 if ok else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    gate.set()
    busy.result(10)
    worker.shutdown()
    assert os.waitstatus_to_exitcode(status) == 0
    assert record.pop() == "parent's failure"


def test_no_other_module_makes_its_own_worker_thread_or_exit_hook():
    # One implementation: threads that run queued work, and the private exit hook, live in
    # engine/worker.py. The others start threads that are not background workers, each named why.
    allowed = {
        "engine/worker.py": "the primitive",
        "engine/hashpool.py": "a pool of parallel hash threads (one per core), not a serial worker",
        "engine/host_copy.py": "copy threads joined before the call returns",
        "_cli/progress.py": "runs one command's work while the main thread draws progress",
    }
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel in allowed:
            continue
        text = path.read_text()
        if re.search(r"threading\.Thread\(|_register_atexit|queue\.SimpleQueue\(", text):
            offenders.append(rel)
    assert offenders == []
