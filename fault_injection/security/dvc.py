"""Security attacks of area ``dvc`` (see the package docstring for the contract).

Each attack builds a real git + DVC repository with a local remote in its
scratch directory, crafts what an attacker ships (a directory object in the
remote, a journal, a hook, a ``.dvc`` file, a symlink) and aims it at the
victim. The harness checks the victim afterwards; the attack itself reports a
missing or untyped refusal.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable

import torch

import ckstore

from .. import workloads  # noqa: F401  (first: workloads and publish import each other in this order)
from ..publish import hermetic_env, init_dvc_repo
from . import Ctx, attack

TIMEOUT = 180.0


def _setup(ctx: Ctx) -> str:
    """Hermetic env, a store with step 1 published as ``best``; returns the repository."""
    os.environ.update(hermetic_env(ctx.root))
    repo = os.path.join(ctx.root, "repo")
    init_dvc_repo(repo)
    with ckstore.Store(os.path.join(ctx.root, "run")) as store:
        store.save({"w": torch.arange(64, dtype=torch.float32)}, step=1, metrics={"loss": 0.5})
        store.publish(1, name="best", repo=repo, wait=True)
    return repo


def _refused(what: str, fn: Callable[[], object], expected: type[ckstore.CkstoreError]) -> list[str]:
    """Run ``fn``; a finding unless it raises ``expected`` (a typed refusal)."""
    try:
        fn()
    except expected:
        return []
    except ckstore.CkstoreError as exc:
        return [f"{what}: refused with {type(exc).__name__} instead of {expected.__name__}: {str(exc)[:200]}"]
    except Exception as exc:
        return [f"{what}: untyped {type(exc).__name__}: {str(exc)[:200]}"]
    return [f"{what}: accepted"]


def _plant_dir_object(clone: str, remote: str, edit: Callable[[list[dict[str, str]]], list[dict[str, str]]]) -> None:
    from ckstore.integrations.dvc.files import read_dvc_file

    dvc_file = os.path.join(clone, "models", "best.dvc")
    md5, _ = read_dvc_file(dvc_file)
    with open(os.path.join(remote, "files", "md5", md5[:2], md5[2:]), encoding="utf-8") as fh:
        listing = edit(json.load(fh))
    raw = json.dumps(listing).encode()
    new = hashlib.md5(raw).hexdigest() + ".dir"
    os.makedirs(os.path.join(remote, "files", "md5", new[:2]), exist_ok=True)
    with open(os.path.join(remote, "files", "md5", new[:2], new[2:]), "wb") as fh:
        fh.write(raw)
    with open(dvc_file, encoding="utf-8") as fh:
        text = fh.read()
    with open(dvc_file, "w", encoding="utf-8") as fh:
        fh.write(text.replace(md5, new))


def _clone(repo: str, at: str) -> str:
    subprocess.run(["git", "clone", "-q", repo, at], check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return at


@attack("dvc", timeout=TIMEOUT)
def pull_dir_object_traversal(ctx: Ctx) -> list[str]:
    """An entry md5 ``../../victim/secret.txt`` in the remote's directory object: no deletion, no creation."""
    from ckstore.integrations.dvc import publish as _dvc

    repo = _setup(ctx)
    remote = os.path.join(ctx.root, "remote")
    findings = []
    # Delete: the manifest's md5 points at the victim's existing file (twice: the second pull
    # finds the directory object cached, and plain DVC then takes every object it names as present).
    clone = _clone(repo, os.path.join(ctx.root, "clone"))
    cache_files = os.path.join(clone, ".dvc", "cache", "files")
    evil = ".." + "/" + os.path.relpath(ctx.victim_file, cache_files)

    def point_manifest(listing):
        for entry in listing:
            if entry["relpath"].endswith("/manifest.json"):
                entry["md5"] = evil
        return listing

    _plant_dir_object(clone, remote, point_manifest)
    for attempt in (1, 2):
        findings += _refused(f"pull #{attempt} of a traversal to an existing file", lambda: _dvc.pull(os.path.join(clone, "models", "best")), ckstore.DvcError)
    # Create: an extra entry whose md5 reaches a missing file in the victim's tree, from the cache
    # and (the attacker chooses the remote URL) from an equally deep remote holding the payload.
    clone2 = _clone(repo, os.path.join(ctx.root, "clone2"))
    deep_remote = os.path.join(ctx.root, "attacker", "d0", "d1", "remote")
    shutil.copytree(remote, deep_remote)
    config = os.path.join(clone2, ".dvc", "config")
    with open(config, encoding="utf-8") as fh:
        text = fh.read()
    with open(config, "w", encoding="utf-8") as fh:
        fh.write(text.replace(os.path.join("..", "remote"), deep_remote))
    target = os.path.join(ctx.victim, "tree", "bashrc")
    evil2 = ".." + "/" + os.path.relpath(target, os.path.join(clone2, ".dvc", "cache", "files"))
    payload = os.path.normpath(f"{deep_remote}/files/md5/{evil2[:2]}/{evil2[2:]}")
    if payload.startswith(ctx.root + os.sep):
        os.makedirs(os.path.dirname(payload), exist_ok=True)
        with open(payload, "w", encoding="utf-8") as fh:
            fh.write("echo owned\n")

    def add_entry(listing):
        return [*listing, {"md5": evil2, "relpath": "checkpoints/step-00000001/extra.safetensors"}]

    _plant_dir_object(clone2, deep_remote, add_entry)
    findings += _refused("pull of a traversal to a missing file", lambda: _dvc.pull(os.path.join(clone2, "models", "best")), ckstore.DvcError)
    return findings


@attack("dvc", timeout=TIMEOUT)
def publish_crafted_journal(ctx: Ctx) -> list[str]:
    """A shipped journal whose ``tmp``/``old`` name the victim: recovery and the next publish refuse it."""
    from ckstore.integrations.dvc import publish as _dvc

    repo = _setup(ctx)
    findings = []
    for stage in ("materialize", "swap"):
        key = hashlib.sha256(b"models\0evil").hexdigest()[:16]
        journal = os.path.join(repo, ".dvc", "tmp", "ckstore", f"publish-evil-{key}.json")
        job = {"name": "evil", "step": 1, "store": "/x", "repo": repo, "dest": "models", "remote": None, "metrics": {}}
        record = {"format": "ckstore.publish-journal", "format_version": 1, "stage": stage, "job": job,
                  "tmp": os.path.join(ctx.victim, "tree"), "old": ctx.victim}
        with open(journal, "w", encoding="utf-8") as fh:
            json.dump(record, fh)
        findings += _refused(f"recover with a crafted {stage} journal", lambda: _dvc.recover(repo), ckstore.DvcError)
        with ckstore.Store(os.path.join(ctx.root, "run")) as store:
            findings += _refused(
                f"publish with a crafted {stage} journal", lambda: store.publish(1, name="best", repo=repo).result(), ckstore.DvcError
            )
        os.unlink(journal)
    return findings


@attack("dvc", timeout=TIMEOUT)
def publish_git_hooks_and_fsmonitor(ctx: Ctx) -> list[str]:
    """A downloaded repository's post-commit hook and core.fsmonitor write into the victim: none may run."""
    repo = _setup(ctx)
    marker = os.path.join(ctx.victim, "tree")
    for hook in ("post-commit", "reference-transaction", "post-index-change"):
        path = os.path.join(repo, ".git", "hooks", hook)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(f"#!/bin/sh\ntouch {marker}/{hook}\n")
        os.chmod(path, 0o755)
    monitor = os.path.join(ctx.root, "fsmonitor.sh")
    with open(monitor, "w", encoding="utf-8") as fh:
        fh.write(f"#!/bin/sh\ntouch {marker}/fsmonitor\nexit 1\n")
    os.chmod(monitor, 0o755)
    subprocess.run(["git", "-C", repo, "config", "core.fsmonitor", monitor], check=True, capture_output=True)
    with ckstore.Store(os.path.join(ctx.root, "run")) as store:
        store.save({"w": torch.zeros(8)}, step=2)
        store.publish(2, name="best", repo=repo, wait=True)
    ran = sorted(n for n in os.listdir(marker) if n != "deep")
    return [f"publish ran the repository's {', '.join(ran)}"] if ran else []


@attack("dvc", timeout=TIMEOUT)
def dvc_file_yaml_bomb(ctx: Ctx) -> list[str]:
    """A 500-byte .dvc file whose md5 is a YAML alias bomb (43 million scalars): refused before it expands."""
    from ckstore.integrations.dvc import publish as _dvc

    os.environ.update(hermetic_env(ctx.root))
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for prev, name in zip("abcdefg", "bcdefgh"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    path = os.path.join(ctx.root, "best.dvc")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\nouts:\n- md5: *h\n  path: best\n")
    t0 = time.monotonic()
    findings = _refused("reading a YAML alias bomb", lambda: _dvc.read_dvc_file(path), ckstore.DvcError)
    elapsed = time.monotonic() - t0
    if elapsed > 5:  # the expansion itself is the attack: refusing after it is too late
        findings.append(f"reading a {os.path.getsize(path)}-byte .dvc file took {elapsed:.0f} s (the aliases were expanded)")
    return findings


@attack("dvc", timeout=TIMEOUT)
def publish_symlinked_dest(ctx: Ctx) -> list[str]:
    """A cloned repository whose ``models`` is a symlink to the victim: publish writes nothing through it."""
    os.environ.update(hermetic_env(ctx.root))
    repo = os.path.join(ctx.root, "repo")
    init_dvc_repo(repo)
    os.symlink(ctx.victim, os.path.join(repo, "models"))
    with ckstore.Store(os.path.join(ctx.root, "run")) as store:
        store.save({"w": torch.zeros(8)}, step=1)
        return _refused("publish into a symlinked models/", lambda: store.publish(1, name="best", repo=repo).result(), ckstore.InvalidArgumentError)
