"""Background saves: the stored values are the ones at the call, failures surface, crashes leave whole checkpoints."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import assert_same, subprocess_env

import ckstore
from ckstore.engine import host_copy
from ckstore.storage import durable as _durable


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return {"model": model, "extra": {"a": torch.randn(1000, generator=g), "b": torch.arange(10)}, "step_note": "x"}


def _snapshot(state: dict) -> dict:
    return {
        "model": {k: v.detach().clone() for k, v in state["model"].state_dict().items()},
        "extra": {k: v.clone() for k, v in state["extra"].items()},
        "step_note": state["step_note"],
    }


def test_tensors_modified_right_after_the_call_do_not_leak_into_the_checkpoint(store):
    state = _state()
    expected = _snapshot(state)
    handle = store.save(state, step=1, blocking=False)
    assert isinstance(handle, ckstore.AsyncSave)
    with torch.no_grad():  # the training loop goes on at once
        for p in state["model"].parameters():
            p.add_(1000.0)
        state["extra"]["a"].zero_()
        state["extra"]["b"].fill_(-1)
    info = handle.result()
    assert info.step == 1
    assert_same(store.load(step=1), expected)
    assert store.verify() == []


def test_at_most_one_save_in_flight_and_the_wait_is_recorded(store):
    release = threading.Event()
    entered = threading.Event()

    def hook(op, phase, path, info):
        if op == "fsync" and phase == "before" and info["site"] == "tensor_file" and not release.is_set():
            entered.set()
            release.wait(30)  # hold the first background save mid-write

    state = _state()
    with _durable.hooked(hook):
        first = store.save(state, step=1, blocking=False)
        assert entered.wait(30)
        assert not first.done()
        threading.Timer(0.2, release.set).start()
        second = store.save(state, step=2, blocking=False)  # must wait for the first
        assert first.done(), "a second save started while the first was still in flight"
        assert second.wait_s > 0 and second.stall_s >= second.wait_s
        assert store.stats["wait_s"] == second.wait_s
        assert store.wait().step == 2
    assert [i.step for i in store.checkpoints()] == [1, 2]


def test_staging_memory_is_allocated_once_and_reused(store):
    state = _state()
    for step in range(1, 5):
        store.save(state, step=step, blocking=False)
    store.wait()
    assert store._host_copy.allocations == 1
    assert store._host_copy._slices == [(0, 6)]  # a state under 16 MiB is copied by the calling thread alone
    assert store.stats["staging_bytes"] == store._host_copy.capacity
    assert [i.step for i in store.checkpoints()] == [1, 2, 3, 4]


def test_staged_views_are_remade_when_the_structure_changes(store):
    """Each save loads back exactly, whether it reuses the previous save's staged views or needs new ones."""
    g = torch.Generator().manual_seed(0)
    states = [
        {"a": torch.randn(100, generator=g), "b": torch.arange(10)},
        {"a": torch.randn(100, generator=g), "b": torch.arange(10) * 2},  # same structure: views reused
        {"a": torch.randn(10, 10, generator=g), "b": torch.arange(10)},  # same sizes, new shape
        {"a": torch.randn(100, generator=g).double(), "b": torch.arange(10)},  # new dtype, larger: a new block
        {"b": torch.arange(10).t(), "a": torch.randn(100, generator=g).double()},  # keys swapped
        {"a": torch.randn(3, generator=g), "z": torch.zeros(0), "c": torch.randn(4, 4, generator=g).t()},
        {"a": torch.randn(100, generator=g), "b": torch.arange(10)},  # the first structure again, in the larger block
    ]
    expected = []
    for step, state in enumerate(states):
        expected.append({k: v.clone() for k, v in state.items()})
        store.save(state, step=step, blocking=False)
        for tensor in state.values():
            tensor.zero_()
    store.wait()
    for step, want in enumerate(expected):
        assert_same(store.load(step=step), want)
    assert store._host_copy.allocations == 2


def _fail_fsync(op, phase, path, info):
    if op == "fsync" and phase == "before" and info["site"] == "tensor_file":
        raise OSError(errno.EIO, "injected EIO", path)


@pytest.mark.guarantee("G15")
def test_background_failure_surfaces_on_the_next_save_with_the_cause_chained(store):
    state = _state()
    store.save(state, step=1)
    with _durable.hooked(_fail_fsync):
        store.save(state, step=2, blocking=False)
        with pytest.raises(ckstore.AsyncSaveError) as caught:
            store.save(state, step=3, blocking=False)
    assert isinstance(caught.value.__cause__, ckstore.StorageError)
    assert caught.value.__cause__.errno == errno.EIO
    # Reported once; the failed step left nothing behind, the earlier one is intact.
    assert [i.step for i in store.checkpoints()] == [1]
    assert os.listdir(store.path / ".staging") == []
    store.save(state, step=2, blocking=False)
    assert store.wait().step == 2
    assert store.verify() == []


@pytest.mark.guarantee("G15")
def test_background_failure_surfaces_on_wait_and_on_the_handle(store):
    state = _state()
    with _durable.hooked(_fail_fsync):
        handle = store.save(state, step=1, blocking=False)
        with pytest.raises(ckstore.AsyncSaveError) as caught:
            store.wait()
    assert isinstance(caught.value.__cause__, ckstore.StorageError)
    with pytest.raises(ckstore.AsyncSaveError):
        handle.result()  # the handle always reports its own outcome
    assert store.wait() is None  # already reported: not raised twice
    with _durable.hooked(_fail_fsync):
        handle = store.save(state, step=2, blocking=False)
        with pytest.raises(ckstore.AsyncSaveError):
            handle.result()
    store.save(state, step=3)  # seen through the handle: the next save is not refused
    assert [i.step for i in store.checkpoints()] == [3]


@pytest.mark.guarantee("G15")
def test_background_failure_surfaces_on_close(store_path):
    store = ckstore.Store(store_path)
    with _durable.hooked(_fail_fsync):
        store.save(_state(), step=1, blocking=False)
        with pytest.raises(ckstore.AsyncSaveError):
            store.close()
    # close released the lock even though it raised
    with ckstore.Store(store_path) as again:
        again.save(_state(), step=1)


def test_existing_step_and_bad_state_are_refused_at_the_call(store):
    store.save(_state(), step=1)
    with pytest.raises(ckstore.CheckpointExistsError):
        store.save(_state(), step=1, blocking=False)
    with pytest.raises(ckstore.StateError):
        store.save({"bad": object()}, step=2, blocking=False)
    with pytest.raises(ckstore.StateError):
        store.save({"sparse": torch.eye(3).to_sparse()}, step=2, blocking=False)
    assert store.wait() is None


def test_non_contiguous_and_conjugate_views_are_staged_by_value(store):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    z = torch.randn(5, dtype=torch.complex64)
    state = {"t": base.t(), "slice": base[:, ::2], "conj": z.conj(), "scalar": base[1, 1]}
    expected = {k: v.clone().resolve_conj() for k, v in state.items()}
    store.save(state, step=1, blocking=False)
    base.zero_()
    store.wait()
    assert_same(store.load(step=1), expected)


def test_shared_and_overlapping_tensors_in_a_background_save_are_told_apart(store):
    """Tensors met at one address are one stored tensor only when they are the same view of it."""
    base = torch.arange(12, dtype=torch.float32)
    state = {"model": {"a": base, "b": base, "c": base[:6], "d": base.view(3, 4), "e": base[6:], "f": torch.zeros(0), "g": torch.zeros(0)}}
    expected = {k: v.clone() for k, v in state["model"].items()}
    store.save(state, step=1, blocking=False)
    base.zero_()
    store.wait()
    refs = store._catalog.manifest(store.resolve(1).path.name).state["model"]
    assert (refs["a"]["file"], refs["a"]["key"]) == (refs["b"]["file"], refs["b"]["key"])
    assert len({(r["file"], r["key"]) for r in refs.values()}) == 6  # a and b once; the views and the empties apart
    loaded = store.load(step=1)["model"]
    assert loaded["a"] is loaded["b"]
    assert_same(loaded, expected)


def test_a_background_save_of_a_state_without_tensors(store):
    store.save({"step": 3, "note": "no tensors"}, step=1, blocking=False)
    store.save({"step": 4, "empty": torch.zeros(0)}, step=2, blocking=False)
    store.wait()
    assert store.load(step=1) == {"step": 3, "note": "no tensors"}
    assert store.load(step=2)["empty"].shape == (0,)


@pytest.mark.parametrize("blocking", [True, False])
def test_a_meta_tensor_is_refused_with_its_key(store, blocking):
    store.save({"w": torch.ones(3)}, step=1)
    with pytest.raises(ckstore.StateError, match="meta tensor") as info:
        store.save({"model": {"w": torch.ones(3), "x": torch.empty(3, device="meta")}}, step=2, blocking=blocking)
    assert "'x'" in info.value.key
    assert [i.step for i in store.checkpoints()] == [1]


def test_a_large_state_is_copied_by_several_threads_bit_for_bit(store):
    """Above the threshold the staging copy is split between threads; every dtype and view arrives intact."""
    g = torch.Generator().manual_seed(3)
    state = {
        "model": {f"w{i:03d}": torch.randn(64 * 1024 + i, generator=g) for i in range(48)},  # 12 MiB of float32
        "other": {
            "bf16": torch.randn(1 << 20, generator=g).bfloat16(),
            "i64": torch.randint(-(1 << 40), 1 << 40, (1 << 19,), generator=g),
            "bool": torch.rand(1 << 16, generator=g) > 0.5,
            "conj": torch.randn(1 << 16, dtype=torch.complex64, generator=g).conj(),
            "t": torch.randn(512, 256, generator=g).t(),
        },
    }
    expected = {part: {k: v.clone().resolve_conj() for k, v in tensors.items()} for part, tensors in state.items()}
    store.save(state, step=1, blocking=False)
    for tensors in state.values():
        for tensor in tensors.values():
            tensor.zero_()
    store.wait()
    assert len(store._host_copy._slices) == host_copy.copy_threads()  # 2 on a 2-core CI machine
    assert_same(store.load(step=1), expected)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 1 << 30), max_size=60), st.integers(1, 6))
def test_the_copy_is_split_into_ordered_slices_of_about_equal_bytes(sizes, parts):
    slices = host_copy._split(sizes, parts)
    assert 1 <= len(slices) <= parts
    assert slices[0][0] == 0 and slices[-1][1] == len(sizes)
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))  # contiguous, in order
    if sizes:
        assert all(start < end for start, end in slices)
        biggest = max(sizes)
        for start, end in slices:
            assert sum(sizes[start:end]) <= sum(sizes) / parts + biggest


def test_a_copy_that_fails_in_a_helper_thread_raises_in_the_caller():
    dst = [torch.empty(4), torch.empty(3)]
    src = [torch.ones(4), torch.ones(4)]  # the second cannot go into its destination
    with pytest.raises(RuntimeError):
        host_copy._parallel_copy(dst, src, [(0, 1), (1, 2)])
    assert torch.equal(dst[0], torch.ones(4))


_CHILD = r"""
import os, sys, time, torch, ckstore
from ckstore.storage import durable as _durable
path, mode = sys.argv[1], sys.argv[2]
state = {"w": torch.full((1 << 20,), 1.0), "m": {f"l{i}": torch.full((4096,), float(i)) for i in range(8)}}
store = ckstore.Store(path, wait_at_exit=(mode != "no-wait"))
store.save(state, step=1)

def hook(op, phase, p, info):
    if mode.startswith("kill-at-") and op == mode[8:] and phase == "before" and threading.current_thread() is not main:
        print("POINT", op, info.get("site"), flush=True)
        time.sleep(60)  # the parent SIGKILLs us here
    if mode == "exit-raise" and op == "write" and phase == "before":
        time.sleep(0.1)  # a slow disk: the save is still running when main returns
    if mode == "no-wait" and op == "write" and phase == "before" and threading.current_thread() is not main:
        # A slow write: with the opt-out the exit stops the save after the write in progress, so step 2
        # is never committed; were the exit to wait for the save, it would be committed and seen.
        time.sleep(2)

import threading
main = threading.main_thread()
_durable.set_hook(hook)
state["w"].fill_(2.0)
handle = store.save(state, step=2, blocking=False)
state["w"].fill_(3.0)
print("ACK", flush=True)
if mode == "exit-raise":
    raise SystemExit(7)
"""


def _spawn(path, mode):
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), mode], env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _steps_and_values(path):
    with ckstore.Store(path) as store:
        store.recover()  # recovery is a write: it runs on request (or the first save), never on open
        assert store.verify() == []
        assert os.listdir(os.path.join(path, ".staging")) == []
        out = {}
        for info in store.checkpoints():
            out[info.step] = float(store.load(step=info.step)["w"][0])
        return out


@pytest.mark.guarantee("G2")
@pytest.mark.parametrize("op", ["write", "rename", "fsync_dir"])
def test_sigkill_during_a_background_save_leaves_only_whole_checkpoints(store_path, op):
    """A real SIGKILL of a real process while the background thread is at ``op`` (mid-file, at the commit rename, after it)."""
    child = _spawn(store_path, f"kill-at-{op}")
    try:
        lines = []
        for line in child.stdout:
            lines.append(line)
            if line.startswith("POINT"):
                break
        assert any(line.startswith("POINT") for line in lines), (lines, child.stderr.read() if child.poll() is not None else "")
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    found = _steps_and_values(store_path)
    # step 2 is absent, or whole with the values at the call (2.0, never 3.0)
    assert found.get(1) == 1.0
    assert set(found) <= {1, 2}
    if 2 in found:
        assert found[2] == 2.0


@pytest.mark.guarantee("G15")
def test_process_exit_waits_for_the_acknowledged_save(store_path):
    # main ends by raising SystemExit while the (slowed) background save runs
    child = _spawn(store_path, "exit-raise")
    out, err = child.communicate(timeout=120)
    assert child.returncode == 7, err
    assert "ACK" in out
    assert _steps_and_values(store_path) == {1: 1.0, 2: 2.0}


@pytest.mark.guarantee("G15")
@pytest.mark.parametrize("attempt", range(3))
def test_opting_out_of_the_exit_wait_abandons_the_save_cleanly(store_path, attempt):
    # Repeated: before the exit handler stopped the abandoned save, about one run in three
    # aborted (SIGABRT, "terminate called without an active exception") as the interpreter
    # tore down a thread that was inside a torch call.
    child = _spawn(store_path, "no-wait")
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert "ACK" in out and "failed" not in err  # an abandoned save is not reported as a failure
    assert _steps_and_values(store_path) == {1: 1.0}  # never committed; recovery removed the staging


@pytest.mark.guarantee("G15")
def test_a_failure_found_at_exit_is_printed(run_python, store_path):
    code = textwrap.dedent(
        """
        import errno, sys, torch, ckstore
        from ckstore.storage import durable as _durable
        def hook(op, phase, path, info):
            if op == "fsync" and phase == "before" and info["site"] == "tensor_file":
                raise OSError(errno.ENOSPC, "injected ENOSPC", path)
        _durable.set_hook(hook)
        store = ckstore.Store(sys.argv[1])
        store.save({"w": torch.ones(100)}, step=5, blocking=False)
        """
    )
    proc = run_python(code, str(store_path))
    assert "background save of step 5 failed" in proc.stderr
    assert _steps_and_values(store_path) == {}


def _many(n, scale, shape_at=None):
    out = {}
    for i in range(n):
        shape = (7,) if i == shape_at else (64 + i % 5,)
        out[f"t{i:04d}"] = torch.full(shape, float(i) * scale)
    return out


def test_copies_made_during_encoding_match_the_state_at_every_save(store):
    """Staged views are reused while the layout repeats; a changed shape or count re-plans them, never mixes them up."""
    states = [_many(600, 1.0), _many(600, 2.0), _many(600, 3.0, shape_at=300), _many(600, 4.0, shape_at=300), _many(599, 5.0)]
    for step, state in enumerate(states, start=1):
        expected = {k: v.clone() for k, v in state.items()}
        handle = store.save({"m": state, "note": step}, step=step, blocking=False)
        for tensor in state.values():
            tensor.fill_(-1.0)  # after the call: must not reach the checkpoint
        handle.result()
        assert_same(store.load(step=step)["m"], expected)


def test_a_state_that_fails_to_encode_leaves_the_staging_usable(store):
    good = _many(600, 1.0)
    store.save({"m": good}, step=1, blocking=False).result()
    bad = _many(600, 2.0)
    bad["zzz"] = object()  # met last, after 600 tensors were encoded
    with pytest.raises(ckstore.StateError):
        store.save({"m": bad}, step=2, blocking=False)
    again = _many(600, 3.0)
    expected = {k: v.clone() for k, v in again.items()}
    store.save({"m": again}, step=3, blocking=False).result()
    assert_same(store.load(step=3)["m"], expected)
    assert [info.step for info in store.checkpoints()] == [1, 3]
