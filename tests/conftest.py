"""Shared fixtures and hypothesis profiles for the ckstore test suite.

Hypothesis profiles (choose with ``HYPOTHESIS_PROFILE=<name>``; ``ci`` is the default):

* ``ci``: no deadline (a shared 2-core CI box has noisy timings), a modest
  number of examples so the whole suite stays within its time budget;
* ``dev``: fewer examples, for a quick local loop;
* ``thorough``: many more examples, for a nightly or pre-release run.

Fixtures other test modules may use:

* ``store_path``: a fresh path (not yet created) for a store under ``tmp_path``;
* ``fast_path``: a fresh directory on tmpfs when available (for save-heavy tests
  whose subject is not the disk), else under ``tmp_path``;
* ``store``: a writable :class:`ckstore.Store` at ``store_path``, closed afterwards;
* ``make_model``: ``make_model(seed=0, width=8)`` -> a small deterministic ``nn.Module``;
* ``make_training_state``: ``make_training_state(seed=0)`` -> ``(model, optimizer, scheduler)``
  after one real optimisation step, so the optimizer has per-parameter state;
* ``run_python``: run a Python snippet in a real subprocess with this interpreter
  and ``ckstore`` importable; returns ``subprocess.CompletedProcess``;
* ``peer``: a session-wide second process (see :class:`Peer`) for lock and
  reader tests, so that torch is imported once rather than once per test.

Plain helpers (import with ``from conftest import ...``): :func:`assert_same`
(bitwise equality of nested states, tensors compared by dtype, shape and bytes),
:func:`flip_byte`, :data:`PYTHON`, :data:`REPO_ROOT`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

import ckstore

REPO_ROOT = Path(os.path.abspath(__file__)).parent.parent
PYTHON = sys.executable

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=15,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=1000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# ---------------------------------------------------------------- helpers


def assert_same(actual: Any, expected: Any, path: str = "state") -> None:
    """Assert two nested states are equal, tensors bitwise (dtype, shape and bytes), floats incl. NaN and -0.0."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{path}: expected a tensor, got {type(actual).__name__}"
        assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}"
        assert tuple(actual.shape) == tuple(expected.shape), f"{path}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert actual.device == expected.device, f"{path}: device {actual.device} != {expected.device}"
        # clone(contiguous_format), not contiguous(): a 1-element view may keep an odd stride.
        a = actual.detach().cpu().clone(memory_format=torch.contiguous_format)
        e = expected.detach().cpu().resolve_conj().resolve_neg().clone(memory_format=torch.contiguous_format)
        if e.numel():
            assert bytes(a.view(-1).view(torch.uint8).numpy()) == bytes(e.view(-1).view(torch.uint8).numpy()), f"{path}: bytes differ"
        return
    if isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray), f"{path}: expected ndarray, got {type(actual).__name__}"
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, f"{path}: {actual.dtype}{actual.shape} != {expected.dtype}{expected.shape}"
        assert np.ascontiguousarray(actual).tobytes() == np.ascontiguousarray(expected).tobytes(), f"{path}: bytes differ"
        return
    if isinstance(expected, np.generic):
        assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
        assert actual.tobytes() == expected.tobytes(), f"{path}: {actual!r} != {expected!r}"
        return
    if isinstance(expected, Mapping):
        assert isinstance(actual, Mapping), f"{path}: expected a mapping, got {type(actual).__name__}"
        assert list(actual.keys()) == list(expected.keys()), f"{path}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{path}[{key!r}]")
        return
    if isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected), f"{path}: {type(actual).__name__} != {type(expected).__name__}"
        assert len(actual) == len(expected), f"{path}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{path}[{i}]")
        return
    if isinstance(expected, float):
        assert type(actual) is float, f"{path}: {type(actual).__name__} != float"
        if math.isnan(expected):
            assert math.isnan(actual), f"{path}: {actual!r} is not NaN"
        else:
            assert actual == expected and math.copysign(1, actual) == math.copysign(1, expected), f"{path}: {actual!r} != {expected!r}"
        return
    assert type(actual) is type(expected), f"{path}: {type(actual).__name__} != {type(expected).__name__}"
    assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def flip_byte(path: str | os.PathLike[str], offset: int = -1) -> None:
    """XOR one byte of a file in place (``offset`` may be negative, counted from the end)."""
    with open(path, "r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        position = offset % size
        fh.seek(position)
        byte = fh.read(1)
        fh.seek(position)
        fh.write(bytes([byte[0] ^ 0x01]))


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONHASHSEED", "0")
    return env


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """A path for a new store (the directory does not exist yet)."""
    return tmp_path / "store"


def _memory_dir(prefix: str) -> str | None:
    base = "/dev/shm"
    if not os.access(base, os.W_OK):
        return None
    import tempfile

    return tempfile.mkdtemp(prefix=prefix, dir=base)


@pytest.fixture(scope="session")
def fast_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Session-wide tmpfs directory (see ``fast_path``) for module-scoped fixtures; removed at the end."""
    yield from _memory_or("ckstore-session-", lambda: tmp_path_factory.mktemp("fast"))


@pytest.fixture
def fast_path(tmp_path: Path) -> Iterator[Path]:
    """A fresh directory on tmpfs (``/dev/shm``) when there is one, else under ``tmp_path``.

    For tests that make hundreds of saves whose subject is not the disk (fault
    injection through hooks, SIGKILL, property tests): fsync on tmpfs returns at
    once, so a busy CI disk does not set their pace. Tests of real I/O use ``tmp_path``.
    """
    yield from _memory_or("ckstore-test-", lambda: tmp_path)


def _memory_or(prefix: str, fallback) -> Iterator[Path]:
    """Yield a new tmpfs directory (removed afterwards), or ``fallback()`` where there is no tmpfs."""
    directory = _memory_dir(prefix)
    if directory is None:
        yield fallback()
        return
    try:
        yield Path(directory)
    finally:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def store(store_path: Path) -> Iterator[ckstore.Store]:
    """A writable store with no retention policy, closed after the test."""
    with ckstore.Store(store_path) as s:
        yield s


def _make_model(seed: int = 0, width: int = 8) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return model


@pytest.fixture
def make_model() -> Callable[..., torch.nn.Module]:
    return _make_model


def _make_training_state(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    model = _make_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(16, 4, generator=generator)
    loss = model(x).pow(2).mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return model, optimizer, scheduler


@pytest.fixture
def make_training_state() -> Callable[..., tuple[torch.nn.Module, torch.optim.Optimizer, Any]]:
    return _make_training_state


def _run_python(code: str, *args: str, timeout: float = 120, check: bool = False, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-c", textwrap.dedent(code), *args],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
        **kwargs,
    )


@pytest.fixture
def run_python() -> Callable[..., subprocess.CompletedProcess]:
    return _run_python


# ---------------------------------------------------------------- a second process

_PEER = r"""
import json, socket, sys, os, warnings
import torch, ckstore

def reply(**payload):
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()

def error(exc):
    return {"error": type(exc).__name__, "message": str(exc), "pid": getattr(exc, "pid", None), "host": getattr(exc, "host", None)}

def read_loop(path, rounds):
    warnings.simplefilter("error")  # a CorruptCheckpointWarning would mean a partial checkpoint was visible
    seen, gone, done = set(), 0, 0
    while done < rounds:
        with ckstore.Store(path, readonly=True) as store:
            infos = store.checkpoints()
            if not infos:
                continue
            steps = [i.step for i in infos]
            assert steps == sorted(steps), steps
            state = store.load()
            assert torch.equal(state["w"], torch.full_like(state["w"], float(state["step"]))), state["step"]
            assert state["meta"] == {"step": state["step"], "tag": "x" * (state["step"] % 7)}, state["meta"]
            seen.add(state["step"])
            try:  # the oldest listed is the one retention deletes: gone mid-check is not corrupt
                problems = store.verify(infos[0].step)
                assert problems == [], problems
            except ckstore.CheckpointNotFoundError:
                pass
            try:
                old = store.load(step=infos[0].step)  # the oldest listed: often deleted by retention meanwhile
                assert torch.equal(old["w"], torch.full_like(old["w"], float(infos[0].step)))
            except ckstore.CheckpointNotFoundError:
                gone += 1
            done += 1
    return {"rounds": done, "distinct": len(seen), "gone": gone}

reply(ready=True, pid=os.getpid(), host=socket.gethostname())
for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd.pop("op")
    try:
        if op == "save":
            with ckstore.Store(cmd["path"], lock_timeout=cmd.get("timeout", 0)) as store:
                store.save(cmd.get("state", {}), step=cmd["step"])
            reply(ok=True)
        elif op == "open":
            with ckstore.Store(cmd["path"]) as store:
                reply(ok=True, steps=[i.step for i in store.checkpoints()])
        elif op == "read_loop":
            reply(ok=True, **read_loop(cmd["path"], cmd["rounds"]))
        elif op == "quit":
            break
        else:
            reply(error="unknown op " + op)
    except Exception as exc:
        reply(**error(exc))
"""


class Peer:
    """A second Python process with ckstore imported, driven by JSON lines (imports torch once per session).

    ``peer.call(op="save", path=..., step=..., timeout=0)`` -> reply dict; ``peer.send(...)`` and
    ``peer.reply(timeout)`` split a call so the test can act while the peer is blocked (``reply``
    returns None if nothing arrived within ``timeout`` seconds). Ops: ``save`` (opens a writable
    store with ``lock_timeout=timeout``, saves ``state`` at ``step``, closes), ``open`` (a writable
    open, which recovers leftovers if it can take the lock), ``read_loop`` (``rounds`` readonly
    list-and-load rounds, asserting that every checkpoint seen is whole). Errors come back as
    ``{"error": class name, "message", "pid", "host"}``.
    """

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [PYTHON, "-c", _PEER], env=subprocess_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        hello = self.reply(timeout=300)
        assert hello and hello.get("ready"), self._stderr()
        self.pid = hello["pid"]

    def send(self, **command: Any) -> None:
        self.process.stdin.write(json.dumps(command, default=os.fspath) + "\n")
        self.process.stdin.flush()

    def reply(self, timeout: float = 300) -> dict[str, Any] | None:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.process.stdout.readline()
        assert line, f"peer process died: {self._stderr()}"
        return json.loads(line)

    def call(self, **command: Any) -> dict[str, Any]:
        self.send(**command)
        answer = self.reply()
        assert answer is not None, "peer did not answer"
        return answer

    def _stderr(self) -> str:
        if self.process.poll() is None:
            return "(still running)"
        return self.process.stderr.read()

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                self.send(op="quit")
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            stream.close()


@pytest.fixture(scope="session")
def peer() -> Iterator[Peer]:
    """One long-lived second process shared by the tests that need a real other process."""
    p = Peer()
    try:
        yield p
    finally:
        p.close()
