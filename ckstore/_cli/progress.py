"""Progress bars for the CLI's long operations, drawn with rich on stderr, and only where someone watches.

A bar is drawn only when stderr is a terminal, the command was not given ``--json`` and ``rich`` is installed
(``pip install 'ckstore[progress]'``; without it the commands run the same, silently). Output for scripts
(stdout, JSON, a pipe) never holds a bar or an escape sequence.

Work the library does in one call (``Store.verify``, ``Store.save``) reports no progress of its own, so
:meth:`Bars.run` runs it in a thread and measures it from outside: the bytes this process has read and written
(``rchar`` and ``wchar`` of ``/proc/self/io``) against the bytes the work will move. Where that counter does
not exist (not Linux) or the work happens in another process (DVC), the bar shows activity and elapsed time.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


_own_reads = 0  # bytes read from /proc/self/io itself: counted in rchar, but not the work's


def io_bytes(*, writes: bool = True) -> int | None:
    """Bytes this process has read (plus written) so far (Linux), less its reads of the counter, or None.

    ``writes=False`` for work that only reads (verification): the bar's own drawing is written, not read.
    """
    global _own_reads
    try:
        with open("/proc/self/io", "rb") as f:
            data = f.read()
        _own_reads += len(data)
        fields = dict(line.split(b":", 1) for line in data.splitlines() if b":" in line)
        return int(fields[b"rchar"]) - _own_reads + (int(fields[b"wchar"]) if writes else 0)
    except (OSError, KeyError, ValueError):
        return None


def _amount(done: float, total: float | None) -> str:
    """``12.0/512.0 MiB``, or nothing when the total is unknown (a bar of activity only)."""
    if not total:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if total < 1024 or unit == "TiB":
            return f"{done:.0f}/{total:.0f} {unit}" if unit == "B" else f"{done:.1f}/{total:.1f} {unit}"
        done, total = done / 1024, total / 1024
    return ""


class Task:
    def __init__(self, bars: Bars, task_id: Any) -> None:
        self._bars, self._id = bars, task_id

    def advance(self, n: float = 1) -> None:
        if self._bars.live is not None:
            self._bars.live.advance(self._id, n)

    def update(self, **fields: Any) -> None:
        if self._bars.live is not None:
            self._bars.live.update(self._id, **fields)

    def bytes_done(self, done: float, total: float) -> None:
        self.update(completed=done, amount=_amount(done, total))


class Bars:
    """``with Bars(enabled) as bars: ...``: a rich ``Progress`` on stderr, or nothing at all when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.live: Any = None
        if enabled and sys.stderr.isatty():
            try:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    Progress,
                    SpinnerColumn,
                    TextColumn,
                    TimeElapsedColumn,
                    TimeRemainingColumn,
                )
            except ImportError:
                return
            self.live = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[amount]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,  # the bar goes when the work is done; the result line stays
            )

    def __enter__(self) -> Bars:
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()

    def task(self, description: str, total: float | None = None) -> Task:
        return Task(self, self.live.add_task(description, total=total, amount="") if self.live is not None else None)

    def run(self, description: str, total_bytes: float | None, fn: Callable[..., T], *args: Any, writes: bool = False, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, with a bar that follows the bytes this process reads (and, with
        ``writes=True``, writes) against ``total_bytes``."""
        if self.live is None:
            return fn(*args, **kwargs)
        task = self.task(description, total=total_bytes or None)
        result: list[Any] = []
        failure: list[BaseException] = []

        def work() -> None:
            try:
                result.append(fn(*args, **kwargs))
            except BaseException as exc:  # re-raised in the calling thread below
                failure.append(exc)

        start = io_bytes(writes=writes)
        # A daemon thread: Ctrl-C ends the command at once (every store write is crash-safe by design).
        worker = threading.Thread(target=work, name=f"ckstore-cli-{description}", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.1)
            now = io_bytes(writes=writes)
            if total_bytes and start is not None and now is not None:
                task.bytes_done(max(0, min(now - start, total_bytes)), total_bytes)
        if failure:
            raise failure[0]
        if total_bytes:
            task.bytes_done(total_bytes, total_bytes)
        return result[0]


@contextmanager
def bars_for(args: Any) -> Iterator[Bars]:
    """The bars for a command: none under ``--json``."""
    with Bars(enabled=not getattr(args, "json", False)) as bars:
        yield bars
