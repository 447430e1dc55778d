"""Running a workload in a forked child that reports acknowledgements over a pipe.

The harness imports torch and ckstore once and forks a child per cycle (a
fresh interpreter per cycle would spend two seconds importing torch). The
child talks to the parent through one pipe of JSON lines:
``{"ack": [kind, value]}`` after each acknowledged operation,
``{"events": n}`` when it finishes, ``{"error": text}`` if the workload
raised. Whatever the child had written to the pipe before it died is there
for the parent to read, so acknowledgements survive the SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ckstore.storage import durable as _durable

from .workloads import Workload


@dataclass
class ChildResult:
    status: int  # raw wait status
    acks: list[tuple[str, Any]] = field(default_factory=list)
    events: int | None = None
    error: str | None = None
    #: The event the child was killed at, as the killed run itself saw it ("before rename [commit]").
    killed_at: str | None = None

    @property
    def killed(self) -> bool:
        return os.WIFSIGNALED(self.status) and os.WTERMSIG(self.status) == signal.SIGKILL

    @property
    def ok(self) -> bool:
        return os.WIFEXITED(self.status) and os.WEXITSTATUS(self.status) == 0


def _as_ack(item: list[Any]) -> tuple[str, Any]:
    kind, value = item
    return kind, tuple(value) if isinstance(value, list) else value


def fork_workload(
    workload: Workload,
    root: str,
    *,
    kill_at: int = 0,
    before_run: Callable[[], None] | None = None,
    hook: _durable.Hook | None = None,
    wait: Callable[[int], None] | None = None,
) -> ChildResult:
    """Run ``workload.run`` in a child; SIGKILL its process group at the ``kill_at``-th hook event (1-based; 0 never).

    ``before_run`` runs in the child first (rlimits, signal timers); ``hook`` is
    called for every event before the kill counter; ``wait(pid)`` runs in the
    parent while the child works (e.g. to kill it after a random delay; the
    child leads a process group of its own, ``os.killpg(pid, ...)`` kills it all).
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            # Its own process group, so that a kill takes any helper it started
            # (git under a DVC publish, a lock holder) with it, as a power cut would.
            os.setpgid(0, 0)
            os.close(read_fd)

            def send(obj: Any) -> None:
                os.write(write_fd, (json.dumps(obj) + "\n").encode())

            count = 0

            def counting_hook(op: str, phase: str, path: str, info: dict[str, Any]) -> None:
                nonlocal count
                if hook is not None:
                    hook(op, phase, path, info)
                count += 1
                if count == kill_at:
                    # The label comes from this run's own trace: a dry run's thread interleaving may differ.
                    send({"at": f"{phase} {op} [{info.get('site')}]"})
                    os.killpg(0, signal.SIGKILL)

            if before_run is not None:
                before_run()
            _durable.set_hook(counting_hook)
            try:
                workload.run(root, lambda kind, value: send({"ack": [kind, value]}), workload.scale)
            except BaseException as exc:
                send({"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]})
                raise
            _durable.set_hook(None)
            send({"events": count})
            code = 0
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    with contextlib.suppress(OSError):  # the child may already have done it (or exited)
        os.setpgid(pid, pid)
    os.close(write_fd)
    if wait is not None:
        wait(pid)
    chunks = []
    while True:
        chunk = os.read(read_fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    result = ChildResult(status)
    for line in b"".join(chunks).decode(errors="replace").splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue  # a line cut by the kill
        if "ack" in msg:
            result.acks.append(_as_ack(msg["ack"]))
        elif "at" in msg:
            result.killed_at = msg["at"]
        elif "events" in msg:
            result.events = msg["events"]
        elif "error" in msg:
            result.error = msg["error"] + "\n" + msg.get("trace", "")
    return result
