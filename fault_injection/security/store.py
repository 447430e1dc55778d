"""Security attacks of area ``store`` (see the package docstring for the contract).

Crafted store directories: symlinks and swapped-in entries in every directory
ckstore reads or cleans (``.staging/``, ``.trash/``, ``checkpoints/`` and its
``step-N``), odd file types in the layout, a store another uid pre-created or
filled, a store a plain open would modify, and text that would reach the
terminal raw through the CLI. Each attack returns what went wrong; the harness
also checks that the victim beside the scratch directory is untouched.

Every attack here reported a finding on commit 252efb1 (before the fixes of
issue 16); the notes in each docstring say what it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import stat
import subprocess
import sys
import traceback

import torch

import ckstore
from ckstore.storage import durable as _durable

from . import NOBODY, Ctx, as_user, attack

_STEP1 = "step-00000001"


def _store(root: str, *steps: int) -> str:
    with ckstore.Store(root) as store:
        for step in steps:
            store.save({"w": torch.full((4,), float(step))}, step=step, metrics={"loss": 1.0 / (step + 1)})
    return root


def _typed(what: str, call) -> list[str]:
    """Run ``call``; a CkstoreError is a fine answer to a crafted store, anything else is a finding."""
    try:
        call()
    except ckstore.CkstoreError:
        pass
    except Exception as exc:  # noqa: BLE001 - an untyped escape is exactly what is reported
        return [f"{what}: untyped {type(exc).__name__}: {str(exc)[:160]}"]
    return []


def _cli(*argv: str) -> subprocess.CompletedProcess[bytes]:
    """Run the ``ckstore`` command in this (forked) process, capturing what it prints; a traceback goes to stderr.

    In-process because each attack makes several calls and a fresh interpreter
    with torch costs seconds; :func:`_cli_process` runs the real entry point.
    """
    from ckstore.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 2
        except Exception:  # noqa: BLE001 - what a user would see as a traceback
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(["ckstore", *argv], code, out.getvalue().encode(), err.getvalue().encode())


def _cli_process(*argv: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m ckstore`` with the ckstore this process imported."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(ckstore.__file__))))
    return subprocess.run([sys.executable, "-m", "ckstore", *argv], capture_output=True, timeout=120, env=env, stdin=subprocess.DEVNULL)


def _cli_findings(what: str, done: subprocess.CompletedProcess[bytes], *, codes: tuple[int, ...] = (0, 1, 2)) -> list[str]:
    out = []
    if b"Traceback" in done.stderr:
        out.append(f"{what}: traceback: {done.stderr.decode(errors='replace').strip().splitlines()[-1][:160]}")
    elif done.returncode not in codes:
        out.append(f"{what}: exit {done.returncode}, expected {codes}")
    return out


def _save(root: str, step: int, **kwargs) -> None:
    with ckstore.Store(root, **kwargs) as store:
        store.save({"w": torch.zeros(2)}, step=step)


# ---------------------------------------------------------------- recovery and removal


def _plant_links(ctx: Ctx, sub: str, *, to_file: bool = False) -> str:
    root = os.path.join(ctx.root, "store")
    if not os.path.isdir(root):
        _store(root, 1)
    links = {"step-00000003.deadbeef": ctx.victim_file} if to_file else {
        "step-00000002.deadbeef": ctx.victim,
        "step-00000004.deadbeef": os.path.join(ctx.victim, "tree"),
    }
    for name, target in links.items():
        if not os.path.lexists(os.path.join(root, sub, name)):  # a link an earlier round failed to remove stays
            os.symlink(target, os.path.join(root, sub, name))
    return root


def _recover_planted_links(ctx: Ctx, sub: str) -> list[str]:
    """Links in ``sub`` are leftovers like any other: the next save removes them (not their targets) and succeeds."""
    out = []
    for step, to_file in ((2, False), (3, True)):
        root = _plant_links(ctx, sub, to_file=to_file)
        try:
            _save(root, step)
        except Exception as exc:  # noqa: BLE001 - a leftover must never block the store
            out.append(f"save after planting {'a file' if to_file else 'directory'} links in {sub}: {type(exc).__name__}: {str(exc)[:160]}")
        left = os.listdir(os.path.join(root, sub))
        if left:
            out.append(f"links planted in {sub} survived recovery: {left}")
    return out


@attack("store")
def recovery_follows_a_symlink_in_staging(ctx: Ctx) -> list[str]:
    """Links at the top of .staging/ to the victim; the next save recovers. 252efb1: emptied the victim, or failed."""
    return _recover_planted_links(ctx, ".staging")


@attack("store")
def recovery_follows_a_symlink_in_trash(ctx: Ctx) -> list[str]:
    """Links at the top of .trash/ to the victim; the next save recovers. 252efb1: emptied the victim, or failed."""
    return _recover_planted_links(ctx, ".trash")


@attack("store", timeout=120)
def recovery_through_the_cli(ctx: Ctx) -> list[str]:
    """``ckstore gc`` and ``ckstore tag`` recover a store with planted links. 252efb1: emptied the victim."""
    out = []
    for sub in (".staging", ".trash"):
        root = _plant_links(ctx, sub)
        out += _cli_findings(f"gc with {sub} links", _cli("gc", root), codes=(0,))
        _plant_links(ctx, sub)
        out += _cli_findings(f"tag with {sub} links", _cli("tag", root, "pinned", "1"), codes=(0,))
        shutil.rmtree(root)
    return out


@attack("store")
def directory_swapped_for_a_symlink_mid_recovery(ctx: Ctx) -> list[str]:
    """Another user swaps a listed directory of a leftover for a link to the victim while recovery removes it.

    The swap runs from the durable-operations hook at the first unlink, the
    moment a path-based walk has listed the directory but not entered it.
    252efb1: the walk followed the link and emptied the victim's tree.
    """
    root = _store(os.path.join(ctx.root, "store"), 1)
    leftover = os.path.join(root, ".staging", "step-00000002.deadbeef")
    for sub in ("a", "m", "z"):
        os.makedirs(os.path.join(leftover, sub))
        with open(os.path.join(leftover, sub, "f.safetensors"), "wb") as fh:
            fh.write(b"\0" * 64)
    swapped: list[str] = []

    def swap(op: str, phase: str, path: str, info: dict) -> None:
        if op == "unlink" and phase == "before" and not swapped and path.startswith(leftover):
            for sub in ("a", "m", "z"):
                other = os.path.join(leftover, sub)
                if not path.startswith(other + os.sep):
                    shutil.rmtree(other)
                    os.symlink(os.path.join(ctx.victim, "tree"), other)
                    swapped.append(other)

    with _durable.hooked(swap):
        out = _typed("save while a leftover is being swapped", lambda: _save(root, 2))
    if not swapped:
        out.append("the swap never ran (recovery made no unlink under the leftover)")
    return out


@attack("store")
def delete_of_a_symlinked_step(ctx: Ctx) -> list[str]:
    """``checkpoints/step-N`` is a link to the victim; ``delete(N)``. 252efb1: emptied the victim."""
    root = _store(os.path.join(ctx.root, "store"), 1, 2)
    os.symlink(ctx.victim, os.path.join(root, "checkpoints", "step-00000005"))

    def run() -> None:
        with ckstore.Store(root) as store:
            store.delete(5)

    return _typed("delete(5) of a symlinked step", run)


# ---------------------------------------------------------------- the layout


@attack("store")
def symlinked_layout_directories(ctx: Ctx) -> list[str]:
    """``.staging``/``.trash`` are links to the victim's tree (writes), ``checkpoints`` a link out (reads).

    252efb1: recovery emptied the victim's tree through the link; a readonly
    open listed and loaded the checkpoints of another store through it.
    """
    out = []
    for sub in (".staging", ".trash"):
        root = _store(os.path.join(ctx.root, f"store{sub}"), 1)
        shutil.rmtree(os.path.join(root, sub))
        os.symlink(os.path.join(ctx.victim, "tree"), os.path.join(root, sub))
        out += _typed(f"save with {sub} a symlink", lambda: _save(root, 2))
    elsewhere = _store(os.path.join(ctx.root, "elsewhere"), 3)
    root = os.path.join(ctx.root, "store")
    os.makedirs(root)
    os.symlink(os.path.join(elsewhere, "checkpoints"), os.path.join(root, "checkpoints"))
    try:
        with ckstore.Store(root, readonly=True) as reader:
            listed = [i.step for i in reader.checkpoints()]
        if listed:
            out.append(f"a readonly open followed a symlinked checkpoints/ out of the store and listed steps {listed}")
    except ckstore.CkstoreError:
        pass
    return out


def _fifo(path: str) -> None:
    os.mkfifo(path)


def _file(path: str) -> None:
    with open(path, "wb") as fh:
        fh.write(b"not a directory")


@attack("store", timeout=120)
def odd_file_types_in_the_layout(ctx: Ctx) -> list[str]:
    """``checkpoints``, ``.staging`` or ``.trash`` is a file or a FIFO: a typed error, never a traceback or a hang.

    252efb1: ``checkpoints`` a file gave NotADirectoryError from a readonly
    listing and a traceback from ``ckstore ls``.
    """
    out = []
    for sub in ("checkpoints", ".staging", ".trash"):
        for make in (_file, _fifo):
            root = _store(os.path.join(ctx.root, f"store{sub}-{make.__name__}"), 1)
            shutil.rmtree(os.path.join(root, sub))
            make(os.path.join(root, sub))
            what = f"{sub} a {make.__name__[1:]}"

            def read() -> None:
                with ckstore.Store(root, readonly=True) as reader:
                    reader.checkpoints()
                    reader.load()

            out += _typed(f"readonly load with {what}", read)
            out += _typed(f"save with {what}", lambda: _save(root, 2))
            if sub == "checkpoints" and make is _file:
                out += _cli_findings(f"ckstore ls with {what}", _cli("ls", root))
                out += _cli_findings(f"ckstore gc with {what}", _cli("gc", root))
    return out


@attack("store")
def step_directory_with_non_ascii_digits(ctx: Ctx) -> list[str]:
    """``checkpoints/step-١`` (Arabic-Indic one) beside ``step-00000001``. 252efb1: listed as a second step 1."""
    root = _store(os.path.join(ctx.root, "store"), 1)
    shutil.copytree(os.path.join(root, "checkpoints", _STEP1), os.path.join(root, "checkpoints", "step-\u0661"))
    with ckstore.Store(root, readonly=True) as reader:
        names = [i.path.name for i in reader.checkpoints()]
    return [f"a step directory with non-ASCII digits was listed: {names}"] if names != [_STEP1] else []


# ---------------------------------------------------------------- loading never writes


@attack("store")
def a_plain_open_that_only_reads_writes_nothing(ctx: Ctx) -> list[str]:
    """A downloaded store with leftovers, opened with a plain ``Store(path)`` to load. 252efb1: recovered (deleted) them."""
    root = _store(os.path.join(ctx.root, "store"), 1, 2)
    os.makedirs(os.path.join(root, ".staging", "step-00000009.deadbeef"))
    os.makedirs(os.path.join(root, ".trash", "step-00000001.cafebabe"))
    with open(os.path.join(root, ".tags.json.tmp-0123456789ab"), "wb") as fh:
        fh.write(b"partial")
    for name in (".ckstore.lock", ".ckstore.lock.owner"):
        os.unlink(os.path.join(root, name))
    before = _tree(root)
    with ckstore.Store(root) as store:
        store.load()
        store.checkpoints()
        store.verify()
    after = _tree(root)
    if after != before:
        return [f"a plain open that only loaded changed the store: {sorted(set(before) ^ set(after))[:5]}"]
    return []


def _tree(top: str) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), top)] = (st.st_ino, st.st_size)
    return out


# ---------------------------------------------------------------- other users


def _shared(ctx: Ctx) -> str:
    shared = os.path.join(ctx.root, "tmp")
    os.makedirs(shared)
    os.chmod(shared, 0o1777)  # like /tmp: anyone may create, only owners may remove
    return shared


@attack("store")
def a_store_precreated_by_another_user(ctx: Ctx) -> list[str]:
    """Another uid pre-creates the store path world-writable in a shared sticky directory. 252efb1: saved into it."""
    path = os.path.join(_shared(ctx), "run")
    made = as_user(["mkdir", "-m", "0777", path])
    if made.returncode != 0:
        return [f"setup: the second uid could not create {path}: {made.stderr.strip()}"]
    try:
        _save(path, 1)
    except PermissionError as exc:
        if not isinstance(exc, ckstore.CkstoreError):
            return [f"refused, but with an untyped {type(exc).__name__}: {exc}"]
        return []
    except ckstore.CkstoreError as exc:
        return [f"refused with {type(exc).__name__} rather than a PermissionError: {exc}"]
    return [f"saved into a store directory owned by uid {NOBODY} and writable by all"]


@attack("store")
def a_look_alike_store_of_another_user(ctx: Ctx) -> list[str]:
    """Another uid puts a valid store (its own copy) where yours is expected; a plain open loads it. 252efb1: loaded."""
    original = _store(os.path.join(ctx.root, "original"), 7)
    subprocess.run(["chmod", "-R", "a+rX", original], check=True)
    path = os.path.join(_shared(ctx), "run")
    copied = as_user(["cp", "-r", original, path])
    if copied.returncode != 0:
        return [f"setup: the second uid could not copy the store: {copied.stderr.strip()}"]
    try:
        with ckstore.Store(path) as store:
            store.load()
    except ckstore.CkstoreError:
        return []
    return [f"a plain (writable) open accepted a store owned by uid {NOBODY} and loaded it"]


@attack("store")
def a_store_writable_by_others(ctx: Ctx) -> list[str]:
    """Your own store with a layout directory made writable by all (no sticky bit). 252efb1: wrote into it."""
    out = []
    for sub in ("", "checkpoints", ".staging", ".trash"):
        root = _store(os.path.join(ctx.root, f"store-{sub.strip('.') or 'root'}"), 1)
        target = os.path.join(root, sub)
        os.chmod(target, stat.S_IMODE(os.stat(target).st_mode) | 0o777)
        try:
            _save(root, 2)
        except ckstore.CkstoreError:
            continue
        out.append(f"saved into a store whose {sub or 'root'} is writable by others")
    return out


# ---------------------------------------------------------------- the CLI


def _evil_store(ctx: Ctx) -> str:
    root = _store(os.path.join(ctx.root, "store"), 1)
    good = ckstore.Store(root, readonly=True)._catalog.manifest(_STEP1)
    evil = dataclasses.replace(good, step=2, metrics={"loss\x1b]0;pwned\x07\x1b[2J\nOK: 9 checkpoint(s) verified": 0.5})
    target = os.path.join(root, "checkpoints", "step-00000002")
    shutil.copytree(os.path.join(root, "checkpoints", _STEP1), target)
    os.unlink(os.path.join(target, "manifest.json"))
    with open(os.path.join(target, "manifest.json"), "wb") as fh:
        fh.write(evil.to_json())
    return root


@attack("store", timeout=120)
def terminal_escapes_through_the_cli(ctx: Ctx) -> list[str]:
    """A metric name with escape sequences and a newline, printed by ls/show/verify/tag. 252efb1: raw on the terminal."""
    root = _evil_store(ctx)
    out = []
    runs = [("ls",), ("show", "2"), ("show", "latest"), ("verify",), ("tag",)]
    for argv in runs:
        done = (_cli_process if argv == ("ls",) else _cli)(argv[0], root, *argv[1:])  # once through the real entry point
        out += _cli_findings(" ".join(argv), done)
        for name, stream in (("stdout", done.stdout), ("stderr", done.stderr)):
            raw = sorted({f"{b:#04x}" for b in stream if (b < 0x20 and b not in (0x09, 0x0A)) or b == 0x7F})
            if raw:
                out.append(f"ckstore {' '.join(argv)}: control bytes {raw} reached {name}")
    done = _cli("ls", os.path.join(root, "missing\x1b[2J"))
    if b"\x1b" in done.stderr:
        out.append("ckstore ls: an escape sequence in a path reached stderr raw in the error message")
    return out


@attack("store", timeout=120)
def loose_cli_inputs(ctx: Ctx) -> list[str]:
    """``tag -d ""`` and commands on paths that are not stores must exit 2. 252efb1: exit 0 ("OK: 0 checkpoint(s)")."""
    root = _store(os.path.join(ctx.root, "store"), 1)
    out = []
    done = _cli("tag", root, "-d", "")
    if done.returncode != 2:
        out.append(f'ckstore tag -d "": exit {done.returncode}, expected 2')
    for command in ("ls", "verify"):
        for path in (ctx.root, os.path.join(root, "checkpoints"), "/"):
            done = _cli(command, path)
            if done.returncode != 2:
                out.append(f"ckstore {command} {path} (not a store): exit {done.returncode}, expected 2")
    return out
