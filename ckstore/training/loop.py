"""Loop helpers: :func:`resume`, :class:`Checkpointer`, :class:`EarlyStopping`, :func:`checkpoint_interval`.

Wrapping an existing loop takes four lines::

    state = {"model": model, "optimizer": opt, "scheduler": sched, "data": sampler, "rng": ckstore.RNGState()}
    step = ckstore.resume(store, state)                   # 0 for a fresh store
    with ckstore.Checkpointer(store, state, every="auto") as ckpt:
        while step < total_steps:
            train_one_step(...)
            step += 1
            ckpt.step(step, metrics={"loss": loss})       # saves on the interval, on a signal, ...

Step numbers are counts of *completed* steps: checkpoint ``N`` holds the state
after ``N`` steps, and :func:`resume` returns ``N``, the number of steps the
loop can skip.

Signals. While a :class:`Checkpointer` is open, SIGTERM, SIGUSR1 and SIGINT
(the ones schedulers send before a preemption or a time limit: SLURM
``--signal``, Kubernetes, Ctrl-C) only set a flag: the loop finishes the step
it is in, the next :meth:`Checkpointer.step` saves that step durably and the
process exits with status ``128 + signal number`` (SIGTERM 143, SIGUSR1 138,
SIGINT 130), the status a shell reports for a process killed by that signal.
Job scripts and schedulers therefore still see "stopped by a signal", not
success; ``exit_code=`` overrides it (e.g. for a requeue convention). A second
SIGINT while the first is pending raises ``KeyboardInterrupt`` at once, so a
person can always break a stuck loop.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import CheckpointNotFoundError, InvalidArgumentError, StateError
from ..checkpoint.catalog import CheckpointInfo
from ..store import Store

logger = logging.getLogger("ckstore")

DEFAULT_SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


# ---------------------------------------------------------------- resume


def resume(store: Store, state: Any, *, map_location: Any = None, strict: bool = True) -> int:
    """Restore the last committed checkpoint that verifies into ``state``; return its step (0 for an empty store).

    ``state`` must match the checkpoint, and its plain values (``state["epoch"]``)
    are restored too; ``strict=False`` restores what matches and warns about
    the rest (see :meth:`Store.load`).

    A newer checkpoint that fails verification is skipped with a
    :class:`CorruptCheckpointWarning` (and left on disk). If the store has
    checkpoints but none verifies, :class:`CheckpointNotFoundError` is raised
    rather than silently starting over.

    On a store with a ``process_group`` this is a collective: every rank loads
    the newest checkpoint that verifies on every rank.
    """
    if not isinstance(store, Store):
        raise InvalidArgumentError(f"resume() needs a ckstore.Store, got {type(store).__name__}")
    try:
        loaded = store._load_newest(state, map_location=map_location, verify=True, strict=strict, stacklevel=4)
    except CheckpointNotFoundError as exc:
        raise CheckpointNotFoundError(f"{exc}; refusing to start over", step=None) from exc.__cause__
    if loaded is None:
        return 0
    info, _ = loaded
    logger.info("resumed from step %d (%s)", info.step, info.path)
    return info.step


# ---------------------------------------------------------------- interval


def checkpoint_interval(save_seconds: float, step_seconds: float, *, max_overhead: float = 0.02, mtbf: float | None = None) -> int:
    """Steps between checkpoints for a measured save cost and step time.

    Without ``mtbf``: the fewest steps that keep saving under ``max_overhead``
    of training time, ``ceil(save / (max_overhead * step))``. With ``mtbf``
    (mean time between failures, seconds): Young/Daly's optimum
    ``sqrt(2 * save * mtbf)`` seconds, converted to steps. Always at least 1.
    """
    for name, value in (("save_seconds", save_seconds), ("step_seconds", step_seconds)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise InvalidArgumentError(f"{name} must be a finite non-negative number, got {value!r}")
    _check_overhead(max_overhead)
    if mtbf is not None:
        _check_mtbf(mtbf)
    step_seconds = max(float(step_seconds), 1e-9)
    if mtbf is not None:
        seconds = math.sqrt(2.0 * float(save_seconds) * float(mtbf))
        return max(1, round(seconds / step_seconds))
    return max(1, math.ceil(float(save_seconds) / (max_overhead * step_seconds)))


def _check_overhead(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise InvalidArgumentError(f"max_overhead must be a fraction in (0, 1), got {value!r}")
    return float(value)


def _check_mtbf(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidArgumentError(f"mtbf must be a positive number of seconds, got {value!r}")
    return float(value)


# [0-9], not \d: "\d" also matches "١" and "５", which float() reads as 1 and 5.
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(s|sec|secs|seconds?|m|min|mins|minutes?|h|hr|hours?)\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def _parse_every(every: Any) -> tuple[str, float | int | None]:
    """("never"|"steps"|"seconds"|"auto", value)."""
    if every is None:
        return "never", None
    if isinstance(every, bool):
        raise InvalidArgumentError(f"every must be steps (int), a duration ('10min', timedelta) or 'auto', got {every!r}")
    if isinstance(every, int):
        if every < 1:
            raise InvalidArgumentError(f"every must be at least 1 step, got {every}")
        return "steps", every
    if isinstance(every, datetime.timedelta):
        seconds = every.total_seconds()
    elif isinstance(every, str):
        if every.strip().lower() == "auto":
            return "auto", None
        match = _DURATION.match(every)
        if not match:
            raise InvalidArgumentError(f"every={every!r}: expected 'auto' or a duration such as '90s', '10min', '2h'")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)[0].lower()]
    elif isinstance(every, float):
        raise InvalidArgumentError(f"every={every!r} is ambiguous: pass an int for steps or a string such as '{every:g}s' for seconds")
    else:
        raise InvalidArgumentError(f"every must be steps (int), a duration ('10min', timedelta) or 'auto', got {type(every).__name__}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidArgumentError(f"every must be a positive duration, got {every!r}")
    return "seconds", seconds


# ---------------------------------------------------------------- checkpointer


class Checkpointer:
    """Saves ``state`` into ``store`` from inside a training loop.

    ``every``: an int (steps), a duration (``"90s"``, ``"10min"``, ``"2h"``,
    a ``timedelta``), ``"auto"`` (default) or ``None`` (only on signals, at exit
    and when asked). ``"auto"`` saves at the first step to measure the save
    cost, then picks the interval with :func:`checkpoint_interval` from the
    measured save and step times (``max_overhead``, ``mtbf``) and re-picks it
    after every save; each new choice is logged on the ``"ckstore"`` logger.

    A step whose ``metrics`` contain the store's ranking metric
    (``Store(metric=...)``) is always saved, so ``keep_best`` sees every
    evaluation. ``at_exit=True`` saves the last completed step when the
    checkpointer closes or the interpreter exits normally (``sys.exit``
    included); never while an exception propagates, because the state may then
    be halfway through a step.

    ``blocking=False`` makes the interval saves asynchronous
    (``Store.save(..., blocking=False)``: the loop pays only for the copy into
    staging memory; the save cost ``"auto"`` measures is that stall). Saves for
    a signal or at exit are always waited for: the process exits only once its
    last checkpoint is durable.

    On a store with a ``process_group`` every rank calls :meth:`step` at the
    same boundary: the ranks agree there, in one all-reduce, on whether to
    save and whether any rank was signalled (docs/distributed.md).
    """

    def __init__(
        self,
        store: Store,
        state: Any,
        *,
        every: int | str | datetime.timedelta | None = "auto",
        signals: Iterable[int] = DEFAULT_SIGNALS,
        at_exit: bool = False,
        exit_code: int | None = None,
        max_overhead: float = 0.02,
        mtbf: float | None = None,
        blocking: bool = True,
    ) -> None:
        if not isinstance(store, Store):
            raise InvalidArgumentError(f"Checkpointer needs a ckstore.Store, got {type(store).__name__}")
        self.store = store
        self.state = state
        self._mode, self._every = _parse_every(every)
        self.max_overhead = _check_overhead(max_overhead)
        self.mtbf = None if mtbf is None else _check_mtbf(mtbf)
        if exit_code is not None and (isinstance(exit_code, bool) or not isinstance(exit_code, int) or not 0 <= exit_code <= 255):
            raise InvalidArgumentError(f"exit_code must be an int in 0..255, got {exit_code!r}")
        self.exit_code = exit_code
        self.at_exit = bool(at_exit)
        self.blocking = bool(blocking)
        try:
            self.signals = tuple(signal.Signals(s) for s in signals)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"signals must be signal numbers, e.g. (signal.SIGTERM,): {exc}") from None
        self.interval: int | None = self._every if self._mode == "steps" else None  # type: ignore[assignment]
        self.last_step: int | None = None
        self.last_saved_step: int | None = None
        self.pending_signal: signal.Signals | None = None
        self.save_seconds: list[float] = []
        self._step_time_total = 0.0
        self._step_count = 0
        self._last_mark = time.monotonic()
        self._last_save_time = self._last_mark
        self._closed = False
        self._previous: dict[signal.Signals, Any] = {}
        self._pid = os.getpid()
        #: With Store(process_group=): the ranks this loop agrees with at every step (see _agree).
        self._ranks = store._ranks
        if self.signals:
            if threading.current_thread() is not threading.main_thread():
                raise InvalidArgumentError("signal handling needs the Checkpointer to be created in the main thread (or pass signals=())")
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        if self.at_exit:
            atexit.register(self._interpreter_exit)

    # ------------------------------------------------------------ signals

    def _on_signal(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            # A forked child (a DataLoader worker) inherited this handler: act as
            # it would have without ckstore (SIGTERM ends it, SIGINT raises
            # KeyboardInterrupt, which torch's worker loop ignores).
            self._forward(signum, frame)
            return
        # Only set a flag: saving from a handler could interleave with a step
        # that is half applied (optimizer updated, scheduler not yet).
        if signum == signal.SIGINT and self.pending_signal == signal.SIGINT:
            raise KeyboardInterrupt
        if self.pending_signal is None:
            self.pending_signal = signal.Signals(signum)

    def _forward(self, signum: int, frame: Any) -> None:
        previous = self._previous.get(signal.Signals(signum), signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _exit_status(self) -> int:
        if self.exit_code is not None:
            return self.exit_code
        assert self.pending_signal is not None
        return 128 + int(self.pending_signal)

    # ------------------------------------------------------------ the loop's call

    def step(self, step: int, metrics: Mapping[str, Any] | None = None, *, save: bool | None = None) -> Any:
        """Record that ``step`` steps are complete; save if due.

        Returns the new checkpoint's info (with ``blocking=False``, the save's
        ``AsyncSave`` handle), or None when nothing was saved.

        ``save=True`` forces a save, ``save=False`` skips it (a pending signal
        still saves). After a signal this saves and raises ``SystemExit`` with
        the documented status.

        Calling it again for the step just reported, with ``metrics`` (the
        validation at the end of an epoch), adds them to that step: recorded
        with :meth:`Store.record_metrics` if the step was saved (the checkpoint
        is never modified), else saved with them if due.
        """
        self._check_open()
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise InvalidArgumentError(f"step must be a non-negative integer, got {step!r}")
        if self.last_step is not None and step == self.last_step and (metrics or save):
            return self._report_again(step, metrics, save)
        if self.last_step is not None and step <= self.last_step:
            raise InvalidArgumentError(
                f"step must increase: got {step} after {self.last_step} (metrics for the step just reported may be passed again with it)"
            )
        now = time.monotonic()
        self._step_time_total += now - self._last_mark
        self._step_count += step - (self.last_step if self.last_step is not None else step - 1)
        self._last_mark = now
        self.last_step = step
        info = None
        stop, wanted = self._agree(save if save is not None else self._due(step, metrics))
        if stop is None and wanted and step != self.last_saved_step:
            info = self._save(step, metrics)
        if stop is not None:
            self._exit_on_signal(metrics)
        return info

    def _report_again(self, step: int, metrics: Mapping[str, Any] | None, save: bool | None) -> Any:
        info = None
        if step == self.last_saved_step:
            if metrics and (self._ranks is None or self._ranks.rank == 0):  # at N ranks the coordinator records them
                info = self.store.record_metrics(step, metrics)
            stop, _ = self._agree(False)
        else:
            stop, wanted = self._agree(save if save is not None else self._due(step, metrics))
            if stop is None and wanted:
                info = self._save(step, metrics)
        if stop is not None:
            self._exit_on_signal(metrics)
        return info

    def _agree(self, wanted: bool) -> tuple[signal.Signals | None, bool]:
        """(the signal to stop for, whether to save): this process's own, or at N ranks what the ranks agree on.

        With ``Store(process_group=)`` every rank calls ``step`` at the same
        boundary, and one all-reduce (MAX) carries each rank's signal and
        wish to save: a save is a collective, so a signal to one rank or a
        clock-driven interval (``every="10min"``, ``"auto"``) that fell due on
        one rank only would otherwise leave that rank saving alone until the
        group's timeout. The decision is the agreed value, never the live
        flag: a signal that lands after the all-reduce is carried by the next.
        """
        if self._ranks is None:
            return self.pending_signal, bool(wanted)
        received, due = self._ranks.agree_max([int(self.pending_signal or 0), int(bool(wanted))])
        if not received:
            return None, bool(due)
        if self.pending_signal is None:
            self.pending_signal = signal.Signals(received)  # another rank's: this one stops with it
        return self.pending_signal, bool(due)

    def _due(self, step: int, metrics: Mapping[str, Any] | None) -> bool:
        ranked = self.store.policy.metric
        if metrics and ranked and ranked in metrics:
            return True
        if self._mode == "steps":
            # Multiples of the interval: the same steps are saved however often the run was restarted.
            return step % self._every == 0  # type: ignore[operator]
        if self._mode == "seconds":
            return time.monotonic() - self._last_save_time >= self._every  # type: ignore[operator]
        if self._mode == "auto":
            # The first step of a run is saved to measure the save cost.
            return self.interval is None or self.last_saved_step is None or step - self.last_saved_step >= self.interval
        return False

    def _exit_on_signal(self, metrics: Mapping[str, Any] | None) -> None:
        signum = self.pending_signal
        assert signum is not None
        step = self.last_step
        if step is not None and step != self.last_saved_step:
            self._save(step, metrics, wait=True)
        self._make_durable()
        status = self._exit_status()
        what = f"saved step {step}" if step is not None else "no step completed in this run, nothing new to save"
        logger.warning("received %s: %s, exiting with status %d", signum.name, what, status)
        self.close(final_save=False)
        raise SystemExit(status)

    # ------------------------------------------------------------ saving

    def save(self, step: int | None = None, metrics: Mapping[str, Any] | None = None) -> CheckpointInfo:
        """Save now, as ``step`` (default: the last step passed to :meth:`step`), and wait until it is durable."""
        self._check_open()
        if step is None:
            step = self.last_step
            if step is None:
                raise InvalidArgumentError("no step completed yet; pass step=")
        return self._save(step, metrics, wait=True)

    def _make_durable(self) -> None:
        if not self.blocking:
            self.store.wait()  # the last background save; raises AsyncSaveError if it failed

    def _save(self, step: int, metrics: Mapping[str, Any] | None, *, wait: bool = False) -> Any:
        started = time.monotonic()
        if self.blocking or wait:
            info = self.store.save(self.state, step=step, metrics=metrics)
        else:
            info = self.store.save(self.state, step=step, metrics=metrics, blocking=False)
        finished = time.monotonic()
        self.last_saved_step = step
        self._last_save_time = finished
        self.save_seconds.append(finished - started)
        self._last_mark = finished  # time spent saving is not step time
        if self._mode == "auto":
            self._choose_interval()
        return info

    def _choose_interval(self) -> None:
        recent = sorted(self.save_seconds[-5:])
        save_cost = recent[len(recent) // 2]
        step_time = self._step_time_total / max(self._step_count, 1)
        chosen = checkpoint_interval(save_cost, step_time, max_overhead=self.max_overhead, mtbf=self.mtbf)
        # Log the first choice and real changes, not every re-estimate's jitter.
        if self.interval is None or abs(chosen - self.interval) > 0.25 * self.interval:
            rule = f"Young/Daly sqrt(2*save*MTBF), MTBF {self.mtbf:g} s" if self.mtbf else f"overhead budget {self.max_overhead:.1%}"
            logger.info("checkpoint interval: every %d step(s) (save %.3f s, step %.4f s, %s)", chosen, save_cost, step_time, rule)
        self.interval = chosen

    # ------------------------------------------------------------ lifecycle

    def close(self, *, final_save: bool = True) -> None:
        """Restore the signal handlers; with ``at_exit``, save the last completed step first. Idempotent."""
        if self._closed:
            return
        try:
            if final_save and self._ranks is not None:
                self._agree(False)  # a signal that reached one rank after its last step: every rank stops for it
            if final_save and self.at_exit:
                self._final_save()
            if self.pending_signal is not None and final_save:
                self._exit_on_signal(None)
            if final_save:
                self._make_durable()
        finally:
            self._release()

    def _final_save(self) -> None:
        step = self.last_step
        if step is not None and step != self.last_saved_step:
            self._save(step, None, wait=True)

    def _release(self) -> None:
        if self._closed:
            return
        self._closed = True
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        if self.at_exit:
            atexit.unregister(self._interpreter_exit)

    def _interpreter_exit(self) -> None:
        if self._closed:
            return
        if getattr(sys, "last_value", None) is not None:
            self._release()  # an unhandled exception ended the program: the state may be mid-step
            return
        try:
            self._final_save()
            self._make_durable()
        except Exception as exc:  # the store may already be closed; say so rather than crash at exit
            logger.warning("at-exit save failed: %s", exc)
        finally:
            self._release()

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgumentError("this Checkpointer is closed")

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None or issubclass(exc_type, SystemExit):
            self.close()
        else:
            self._release()  # an exception mid-step: the state may be half updated, do not save it


# ---------------------------------------------------------------- early stopping


class EarlyStopping:
    """Stop after ``patience`` evaluations without improvement; restore the best checkpoint at the end.

    Improvement means ``value < best - min_delta`` (``mode="min"``) or
    ``value > best + min_delta`` (``mode="max"``); a NaN never improves. Keep
    the object in the saved state: its progress (best value and step, the
    evaluations since the best) then survives a restart, so patience is not
    reset by a preemption. Save the evaluated steps with the metric (a store
    with ``keep_best=1, metric=...`` keeps the best one) and call
    :meth:`restore_best` at the end.
    """

    def __init__(self, *, metric: str, mode: str = "min", patience: int = 3, min_delta: float = 0.0) -> None:
        if not isinstance(metric, str) or not metric:
            raise InvalidArgumentError(f"metric must be a non-empty string, got {metric!r}")
        if mode not in ("min", "max"):
            raise InvalidArgumentError(f"mode must be 'min' or 'max', got {mode!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise InvalidArgumentError(f"patience must be a positive integer, got {patience!r}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not math.isfinite(min_delta) or min_delta < 0:
            raise InvalidArgumentError(f"min_delta must be a finite non-negative number, got {min_delta!r}")
        self.metric = metric
        self.mode = mode
        self.patience = patience
        self.min_delta = float(min_delta)
        self.best: float | None = None
        self.best_step: int | None = None
        self.evaluations = 0
        self.since_best = 0
        self.stopped = False
        self.improved = False

    def update(self, value: float | Mapping[str, Any], *, step: int) -> bool:
        """Record one evaluation at ``step``; return True when training should stop."""
        if isinstance(value, Mapping):
            if self.metric not in value:
                raise InvalidArgumentError(f"metrics have no {self.metric!r} (got {sorted(value)})")
            value = value[self.metric]
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgumentError(f"{self.metric} must be a number, got {type(value).__name__}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise InvalidArgumentError(f"step must be a non-negative integer, got {step!r}")
        value = float(value)
        self.evaluations += 1
        self.improved = self._better(value)
        if self.improved:
            self.best, self.best_step, self.since_best = value, step, 0
        else:
            self.since_best += 1
        if self.since_best >= self.patience:
            self.stopped = True
        return self.stopped

    def _better(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    @property
    def should_stop(self) -> bool:
        return self.stopped

    def state_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "mode": self.mode,
            "best": self.best,
            "best_step": self.best_step,
            "evaluations": self.evaluations,
            "since_best": self.since_best,
            "stopped": self.stopped,
            "improved": self.improved,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise StateError(f"early stopping state must be a mapping, got {type(state).__name__}", key="early_stopping")
        for name in ("metric", "mode"):
            if state.get(name) != getattr(self, name):
                raise StateError(
                    f"early stopping: the checkpoint tracked {name}={state.get(name)!r}, this object tracks {getattr(self, name)!r}",
                    key=f"early_stopping.{name}",
                )
        try:
            best, best_step = state["best"], state["best_step"]
            self.best = None if best is None else float(best)
            self.best_step = None if best_step is None else int(best_step)
            self.evaluations = int(state["evaluations"])
            self.since_best = int(state["since_best"])
            self.stopped = bool(state["stopped"])
            self.improved = bool(state.get("improved", False))
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"early stopping: malformed state ({exc})", key="early_stopping") from None

    def restore_best(self, store: Store, state: Any, *, map_location: Any = None, strict: bool = True) -> CheckpointInfo:
        """Load the best evaluated checkpoint into ``state`` (e.g. ``{"model": model}``); return its info.

        This object's own progress is kept even if ``state`` contains it.
        """
        if self.best_step is None:
            raise CheckpointNotFoundError(f"no evaluation of {self.metric!r} recorded yet; nothing to restore", step="best")
        try:
            info = store.resolve(self.best_step)
        except CheckpointNotFoundError:
            raise CheckpointNotFoundError(
                f"{store.path}: the best step {self.best_step} ({self.metric}={self.best:g}) was not saved or was deleted; "
                f"save evaluated steps with their metrics and keep them with Store(keep_best=1, metric={self.metric!r})",
                step=self.best_step,
            ) from None
        mine = self.state_dict()
        try:
            store.load(state, step=info.step, map_location=map_location, strict=strict)
        finally:
            self.load_state_dict(mine)
        logger.info("restored the best checkpoint: step %d (%s=%s)", info.step, self.metric, info.metrics.get(self.metric, self.best))
        return info
