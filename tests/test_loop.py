"""resume, Checkpointer (intervals, signals, at-exit), checkpoint_interval, EarlyStopping."""

from __future__ import annotations

import logging
import math
import os
import signal
import warnings

import pytest
import torch
from conftest import assert_same, flip_byte
from hypothesis import given
from hypothesis import strategies as st

import ckstore


def steps_of(store: ckstore.Store) -> list[int]:
    return [i.step for i in store.checkpoints()]


# ---------------------------------------------------------------- resume


def test_resume_on_a_fresh_store_is_step_zero(store, make_model):
    assert ckstore.resume(store, {"model": make_model()}) == 0


def test_resume_restores_the_newest_and_returns_its_step(store, make_training_state):
    model, opt, sched = make_training_state(seed=1)
    store.save({"model": model, "optimizer": opt, "scheduler": sched}, step=10)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    store.save({"model": model, "optimizer": opt, "scheduler": sched}, step=20)
    newest = {k: v.clone() for k, v in model.state_dict().items()}
    other, opt2, sched2 = make_training_state(seed=2)
    assert ckstore.resume(store, {"model": other, "optimizer": opt2, "scheduler": sched2}) == 20
    assert_same(other.state_dict(), newest)
    assert_same(opt2.state_dict()["state"], opt.state_dict()["state"])
    assert expected  # step 10 is still there for the next test's fallback


@pytest.mark.guarantee("G4")
def test_resume_skips_a_corrupt_newest_checkpoint(store, make_model):
    model = make_model(seed=1)
    store.save({"model": model}, step=1)
    store.save({"model": make_model(seed=2)}, step=2)
    info = store.resolve(2)
    flip_byte(next(p for p in info.path.iterdir() if p.suffix == ".safetensors"), offset=-1)
    target = make_model(seed=3)
    with pytest.warns(ckstore.CorruptCheckpointWarning):
        assert ckstore.resume(store, {"model": target}) == 1
    assert_same(target.state_dict(), model.state_dict())


def test_resume_refuses_to_start_over_when_nothing_verifies(store, make_model):
    store.save({"model": make_model()}, step=1)
    flip_byte(next(p for p in store.resolve(1).path.iterdir() if p.suffix == ".safetensors"), offset=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ckstore.CorruptCheckpointWarning)
        with pytest.raises(ckstore.CheckpointNotFoundError):
            ckstore.resume(store, {"model": make_model()})


def test_resume_needs_a_store(make_model):
    with pytest.raises(ckstore.InvalidArgumentError):
        ckstore.resume("runs/x", {"model": make_model()})


# ---------------------------------------------------------------- intervals


def test_every_n_steps_saves_the_multiples(store):
    state = {"w": torch.zeros(2)}
    with ckstore.Checkpointer(store, state, every=3, signals=()) as ckpt:
        for step in range(1, 11):
            ckpt.step(step)
    assert steps_of(store) == [3, 6, 9]


def test_at_exit_saves_the_last_step_on_a_clean_exit(store):
    with ckstore.Checkpointer(store, {"w": torch.zeros(2)}, every=4, at_exit=True, signals=()) as ckpt:
        for step in range(1, 11):
            ckpt.step(step)
    assert steps_of(store) == [4, 8, 10]


def test_no_save_when_an_exception_escapes_a_step(store):
    with pytest.raises(RuntimeError), ckstore.Checkpointer(store, {"w": torch.zeros(2)}, every=4, at_exit=True, signals=()) as ckpt:
        for step in range(1, 7):
            ckpt.step(step)
        raise RuntimeError("mid-step failure")
    assert steps_of(store) == [4]


def test_save_true_and_false_override_the_interval(store):
    with ckstore.Checkpointer(store, {"w": torch.zeros(1)}, every=2, signals=()) as ckpt:
        ckpt.step(1, save=True)
        ckpt.step(2, save=False)
        ckpt.step(3)
        ckpt.step(4)
    assert steps_of(store) == [1, 4]


def test_explicit_save_of_a_saved_step_is_refused(store):
    with ckstore.Checkpointer(store, {"w": torch.zeros(1)}, every=1, signals=()) as ckpt:
        ckpt.step(1)
        with pytest.raises(ckstore.CheckpointExistsError):
            ckpt.save()


def test_metric_the_store_ranks_by_forces_a_save(tmp_path):
    with ckstore.Store(tmp_path / "s", keep_best=1, keep_last=1, metric="val_loss") as store:
        with ckstore.Checkpointer(store, {"w": torch.zeros(1)}, every=100, signals=()) as ckpt:
            ckpt.step(1, metrics={"loss": 1.0})
            ckpt.step(2, metrics={"val_loss": 0.5})
            ckpt.step(3, metrics={"val_loss": 0.7})
        assert steps_of(store) == [2, 3]


def test_every_seconds_saves_when_the_time_has_passed(store, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(ckstore.training.loop.time, "monotonic", lambda: clock[0])
    with ckstore.Checkpointer(store, {"w": torch.zeros(1)}, every="1min", signals=()) as ckpt:
        for step in range(1, 8):
            clock[0] += 25.0
            ckpt.step(step)
    assert steps_of(store) == [3, 6]


def test_auto_saves_first_then_logs_the_interval(store, monkeypatch, caplog):
    clock = [0.0]
    monkeypatch.setattr(ckstore.training.loop.time, "monotonic", lambda: clock[0])
    real_save = store.save

    def timed_save(*args, **kwargs):
        clock[0] += 0.5  # every save costs 0.5 s of the fake clock
        return real_save(*args, **kwargs)

    monkeypatch.setattr(store, "save", timed_save)
    caplog.set_level(logging.INFO, logger="ckstore")
    with ckstore.Checkpointer(store, {"w": torch.zeros(1)}, every="auto", max_overhead=0.05, signals=()) as ckpt:
        for step in range(1, 45):
            clock[0] += 1.0  # every step takes 1 s
            ckpt.step(step)
        assert ckpt.interval == 10  # ceil(0.5 / (0.05 * 1.0))
    assert steps_of(store) == [1, 11, 21, 31, 41]
    assert "checkpoint interval: every 10 step(s)" in caplog.text


def test_auto_with_mtbf_uses_young_daly(store, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(ckstore.training.loop.time, "monotonic", lambda: clock[0])
    real_save = store.save

    def timed_save(*args, **kwargs):
        clock[0] += 2.0
        return real_save(*args, **kwargs)

    monkeypatch.setattr(store, "save", timed_save)
    with ckstore.Checkpointer(store, {"w": torch.zeros(1)}, every="auto", mtbf=3600, signals=()) as ckpt:
        clock[0] += 1.0
        ckpt.step(1)
        assert ckpt.interval == 120  # sqrt(2 * 2 s * 3600 s) = 120 s of 1 s steps


def test_checkpoint_interval_values():
    assert ckstore.checkpoint_interval(1.0, 0.5) == 100  # 1 / (0.02 * 0.5)
    assert ckstore.checkpoint_interval(0.0, 1.0) == 1
    assert ckstore.checkpoint_interval(10.0, 1.0, mtbf=20.0) == 20
    assert ckstore.checkpoint_interval(1e-3, 10.0, mtbf=1.0) == 1


@given(save=st.floats(1e-4, 1e3), step=st.floats(1e-4, 1e2), budget=st.floats(0.001, 0.5))
def test_property_interval_is_the_smallest_within_budget(save, step, budget):
    n = ckstore.checkpoint_interval(save, step, max_overhead=budget)
    assert save / (n * step) <= budget * (1 + 1e-9)
    if n > 1:
        assert save / ((n - 1) * step) > budget * (1 - 1e-9)


@given(save=st.floats(1e-3, 1e3), step=st.floats(1e-3, 1e2), mtbf=st.floats(1.0, 1e7))
def test_property_young_daly_interval(save, step, mtbf):
    n = ckstore.checkpoint_interval(save, step, mtbf=mtbf)
    optimum = math.sqrt(2 * save * mtbf) / step
    assert n == max(1, round(optimum))


@pytest.mark.parametrize("every", [0, -5, 1.5, True, "sometimes", "0s", "-3min", [3]])
def test_bad_every_is_refused(store, every):
    with pytest.raises(ckstore.InvalidArgumentError):
        ckstore.Checkpointer(store, {}, every=every, signals=())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_overhead": 0},
        {"max_overhead": 1.5},
        {"mtbf": 0},
        {"mtbf": float("inf")},
        {"exit_code": 300},
        {"exit_code": "x"},
        {"signals": (9999,)},
    ],
)
def test_bad_options_are_refused(store, kwargs):
    kwargs.setdefault("signals", ())
    with pytest.raises(ckstore.InvalidArgumentError):
        ckstore.Checkpointer(store, {}, **kwargs)


@pytest.mark.parametrize("args", [(-1.0, 1.0), (1.0, float("nan")), ("1", 1.0)])
def test_checkpoint_interval_refuses_bad_numbers(args):
    with pytest.raises(ckstore.InvalidArgumentError):
        ckstore.checkpoint_interval(*args)


def test_steps_must_increase(store):
    with ckstore.Checkpointer(store, {}, every=None, signals=()) as ckpt:
        ckpt.step(5)
        with pytest.raises(ckstore.InvalidArgumentError):
            ckpt.step(5)
        with pytest.raises(ckstore.InvalidArgumentError):
            ckpt.step(-1)
    with pytest.raises(ckstore.InvalidArgumentError):
        ckpt.step(6)  # closed


def test_background_saves_are_durable_when_the_checkpointer_closes(store):
    state = {"w": torch.zeros(1000)}
    with ckstore.Checkpointer(store, state, every=2, blocking=False, at_exit=True, signals=()) as ckpt:
        for step in range(1, 8):
            state["w"] += 1  # changes after the call must not reach the saved copy
            handle = ckpt.step(step)
            if step % 2 == 0:
                assert handle is not None and not isinstance(handle, ckstore.CheckpointInfo)
    assert steps_of(store) == [2, 4, 6, 7]
    assert [store.load(step=s)["w"][0].item() for s in (2, 4, 6, 7)] == [2.0, 4.0, 6.0, 7.0]


def test_signal_with_background_saves_exits_after_a_durable_save(store):
    state = {"w": torch.zeros(10)}
    with pytest.raises(SystemExit) as info, ckstore.Checkpointer(store, state, every=1, blocking=False) as ckpt:
        ckpt.step(1)
        os.kill(os.getpid(), signal.SIGTERM)
        state["w"] += 2
        ckpt.step(2)
    assert info.value.code == 143
    assert steps_of(store) == [1, 2]
    assert store.load(step=2)["w"][0].item() == 2.0


# ---------------------------------------------------------------- signals


@pytest.mark.parametrize("signum, status", [(signal.SIGUSR1, 138), (signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_finishes_the_step_saves_and_exits(store, signum, status):
    before = signal.getsignal(signum)
    state = {"w": torch.zeros(1)}
    with pytest.raises(SystemExit) as info, ckstore.Checkpointer(store, state, every=100) as ckpt:
        for step in range(1, 10):
            state["w"] += 1
            if step == 4:
                os.kill(os.getpid(), signum)  # a real signal; the handler only sets a flag
                state["w"] += 0  # the step goes on to its end
            ckpt.step(step)
    assert info.value.code == status
    assert steps_of(store) == [4]
    assert store.load()["w"].item() == 4.0
    assert signal.getsignal(signum) == before


def test_exit_code_can_be_fixed(store):
    with pytest.raises(SystemExit) as info, ckstore.Checkpointer(store, {"w": torch.zeros(1)}, every=None, exit_code=0) as ckpt:
        ckpt.step(1)
        os.kill(os.getpid(), signal.SIGUSR1)
        ckpt.step(2)
    assert info.value.code == 0
    assert steps_of(store) == [2]


def test_signal_after_the_last_step_saves_on_close(store):
    with pytest.raises(SystemExit) as info, ckstore.Checkpointer(store, {"w": torch.zeros(1)}, every=None) as ckpt:
        ckpt.step(1)
        os.kill(os.getpid(), signal.SIGTERM)
    assert info.value.code == 143
    assert steps_of(store) == [1]


def test_a_second_sigint_interrupts_at_once(store):
    with pytest.raises(KeyboardInterrupt), ckstore.Checkpointer(store, {"w": torch.zeros(1)}, every=None) as ckpt:
        ckpt.step(1)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
    assert steps_of(store) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_at_exit_saves_at_interpreter_exit(tmp_path, run_python):
    """Two real interpreter exits (forked from one process, so torch is imported once): sys.exit and an unhandled error."""
    code = """
        import os, sys, torch, ckstore

        def scenario(path, how):
            store = ckstore.Store(path)
            ckpt = ckstore.Checkpointer(store, {"w": torch.ones(2)}, every=5, at_exit=True)
            for step in range(1, 8):
                ckpt.step(step)
            if how == "raise":
                raise RuntimeError("unhandled")
            sys.exit(0)

        pids = []
        for how in ("exit", "raise"):
            pid = os.fork()
            if pid == 0:
                scenario(os.path.join(sys.argv[1], how), how)  # the child's interpreter exits from in here
            pids.append(pid)
        for how, pid in zip(("exit", "raise"), pids):
            print("STATUS", how, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
    """
    result = run_python(code, str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "STATUS exit 0" in result.stdout and "STATUS raise 1" in result.stdout, result.stdout + result.stderr[-3000:]
    assert "RuntimeError: unhandled" in result.stderr
    with ckstore.Store(tmp_path / "exit", readonly=True) as s:
        assert steps_of(s) == [5, 7]
    with ckstore.Store(tmp_path / "raise", readonly=True) as s:
        assert steps_of(s) == [5]  # an unhandled exception may have left the state mid-step


# ---------------------------------------------------------------- early stopping


def reference_early_stopping(values, mode, patience, min_delta):
    """A plain restatement of the rule, for the property test."""
    best, since, stop_at = None, 0, None
    for i, v in enumerate(values):
        better = not math.isnan(v) and (best is None or (v < best - min_delta if mode == "min" else v > best + min_delta))
        if better:
            best, since = v, 0
        else:
            since += 1
        if since >= patience and stop_at is None:
            stop_at = i
    return best, stop_at


values_strategy = st.lists(st.one_of(st.floats(-10, 10), st.just(float("nan"))), min_size=1, max_size=30)


@given(
    values=values_strategy,
    mode=st.sampled_from(["min", "max"]),
    patience=st.integers(1, 5),
    min_delta=st.sampled_from([0.0, 0.1, 1.0]),
    cut=st.integers(0, 30),
)
def test_property_early_stopping_rule_and_resume(values, mode, patience, min_delta, cut):
    best, stop_at = reference_early_stopping(values, mode, patience, min_delta)
    stopper = ckstore.EarlyStopping(metric="m", mode=mode, patience=patience, min_delta=min_delta)
    stops = []
    for i, v in enumerate(values):
        if i == cut:  # a restart: a new object fed the saved state
            saved = stopper.state_dict()
            stopper = ckstore.EarlyStopping(metric="m", mode=mode, patience=patience, min_delta=min_delta)
            stopper.load_state_dict(saved)
        stops.append(stopper.update({"m": v}, step=i))
    assert stopper.best == best or (best is None and stopper.best is None)
    assert (stops.index(True) if True in stops else None) == stop_at


def test_early_stopping_counts_and_stops():
    stopper = ckstore.EarlyStopping(metric="val_loss", patience=2, min_delta=0.05)
    assert stopper.update(1.0, step=1) is False and stopper.improved
    assert stopper.update(0.97, step=2) is False and not stopper.improved  # within min_delta
    assert stopper.update(0.5, step=3) is False and stopper.best_step == 3
    assert stopper.update(0.6, step=4) is False
    assert stopper.update(torch.tensor(0.7), step=5) is True and stopper.should_stop
    assert (stopper.best, stopper.best_step, stopper.evaluations, stopper.since_best) == (0.5, 3, 5, 2)


def test_restore_best_loads_the_best_checkpoint(tmp_path, make_model):
    model = make_model(seed=0)
    stopper = ckstore.EarlyStopping(metric="val_loss", patience=2)
    state = {"model": model, "early_stopping": stopper}
    best_weights = None
    with ckstore.Store(tmp_path / "s", keep_best=1, keep_last=1, metric="val_loss") as store:
        with ckstore.Checkpointer(store, state, every=None, signals=()) as ckpt:
            for step, val in enumerate([0.9, 0.4, 0.6, 0.8], start=1):
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(0.1)
                stop = stopper.update(val, step=step)
                ckpt.step(step, metrics={"val_loss": val})
                if step == 2:
                    best_weights = {k: v.clone() for k, v in model.state_dict().items()}
                if stop:
                    break
        assert stopper.stopped and step == 4
        assert steps_of(store) == [2, 4]  # keep_best kept the best evaluation
        info = stopper.restore_best(store, state)
        assert info.step == 2 and info.metrics["val_loss"] == 0.4
        assert_same(model.state_dict(), best_weights)
        assert stopper.stopped and stopper.evaluations == 4  # its own progress is kept

        fresh = ckstore.EarlyStopping(metric="val_loss", patience=2)
        assert ckstore.resume(store, {"early_stopping": fresh}) == 4
        assert fresh.state_dict() == stopper.state_dict()


def test_restore_best_explains_a_missing_checkpoint(store):
    stopper = ckstore.EarlyStopping(metric="acc", mode="max")
    with pytest.raises(ckstore.CheckpointNotFoundError):
        stopper.restore_best(store, {})
    stopper.update(0.9, step=7)
    with pytest.raises(ckstore.CheckpointNotFoundError, match="keep_best"):
        stopper.restore_best(store, {})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"metric": ""},
        {"metric": "m", "mode": "up"},
        {"metric": "m", "patience": 0},
        {"metric": "m", "min_delta": -1},
        {"metric": "m", "patience": 1.5},
    ],
)
def test_early_stopping_bad_arguments(kwargs):
    with pytest.raises(ckstore.InvalidArgumentError):
        ckstore.EarlyStopping(**kwargs)


def test_early_stopping_bad_updates_and_states():
    stopper = ckstore.EarlyStopping(metric="m")
    with pytest.raises(ckstore.InvalidArgumentError):
        stopper.update({"other": 1.0}, step=1)
    with pytest.raises(ckstore.InvalidArgumentError):
        stopper.update("low", step=1)
    with pytest.raises(ckstore.InvalidArgumentError):
        stopper.update(1.0, step=-2)
    with pytest.raises(ckstore.StateError):
        stopper.load_state_dict(ckstore.EarlyStopping(metric="other").state_dict())
    with pytest.raises(ckstore.StateError):
        stopper.load_state_dict(ckstore.EarlyStopping(metric="m", mode="max").state_dict())
    with pytest.raises(ckstore.StateError):
        stopper.load_state_dict({"metric": "m", "mode": "min"})


# ---------------------------------------------------------------- the examples


def test_examples_run(tmp_path, run_python):
    """Every example in examples/ (except the demo and its DVC step) runs to a successful end, in one interpreter."""
    from conftest import REPO_ROOT

    code = """
        import runpy, sys
        import torch
        torch.set_num_threads(1)  # a shared 2-core box: no intra-op thread contention
        examples, root = sys.argv[1], sys.argv[2]
        runs = [
            ("plain_loop.py", [root + "/plain", "--steps", "120"]),
            ("early_stopping.py", [root + "/early", "--patience", "2", "--max-epochs", "12"]),
            ("mid_epoch_resume.py", [root + "/mid", "--workers", "2"]),
        ]
        for name, argv in runs:
            sys.argv = [name, *argv]
            try:
                runpy.run_path(examples + "/" + name, run_name="__main__")
            except SystemExit as exc:
                assert exc.code in (0, None), (name, exc.code)
            print("EXAMPLE-OK", name, flush=True)
    """
    result = run_python(code, str(REPO_ROOT / "examples"), str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("EXAMPLE-OK") == 3, result.stdout
    assert "done at step 120" in result.stdout
    assert "restored the best model" in result.stdout
    assert "same order as the uninterrupted run: yes" in result.stdout


def test_forked_children_keep_their_usual_signal_behaviour(store):
    """DataLoader workers are forked with the handler installed; a SIGTERM must still end them."""
    import multiprocessing
    import time

    with ckstore.Checkpointer(store, {}, every=None):
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
        child.start()
        time.sleep(0.2)
        os.kill(child.pid, signal.SIGTERM)
        child.join(timeout=30)
        assert child.exitcode == -signal.SIGTERM
