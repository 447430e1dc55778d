"""The DVC publish write path as a workload: kill points during ``Store.publish``.

The template holds a store (steps 1 and 2), a git + DVC repository and a local
DVC remote side by side, so each cycle copies all three (the remote is named
by a relative path). The child publishes step 2 as ``best`` and waits for it;
the kill tier kills it at every durable-operation boundary of the publish
(materializing the checkpoint, the swap, each journal write between the DVC
and git stages). The whole process group is killed, so a ``git`` child dies
with it, as on a power cut.

Checked after each kill, besides the store invariants: an acknowledged
publish is already committed in git; running recovery and the publish again
completes it; afterwards no journal entry is pending, ``HEAD`` names step 2,
the remote holds the directory object the ``.dvc`` file names, the work tree
is clean and no temporary directories are left.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

import ckstore

from .workloads import Workload, expected_state


def hermetic_env(base: str) -> dict[str, str]:
    """Environment for git and DVC that touches nothing outside ``base`` (as the DVC tests do)."""
    home = os.path.join(base, "home")
    env = {
        "HOME": home,
        "XDG_CONFIG_HOME": os.path.join(home, ".config"),
        "XDG_CACHE_HOME": os.path.join(home, ".cache"),
        "DVC_SITE_CACHE_DIR": os.path.join(base, "dvc-site-cache"),
        "DVC_GLOBAL_CONFIG_DIR": os.path.join(home, ".config", "dvc"),
        "DVC_SYSTEM_CONFIG_DIR": os.path.join(base, "dvc-system"),
        "DVC_NO_ANALYTICS": "1",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "ckstore fault injection",
        "GIT_AUTHOR_EMAIL": "fi@ckstore.invalid",
        "GIT_COMMITTER_NAME": "ckstore fault injection",
        "GIT_COMMITTER_EMAIL": "fi@ckstore.invalid",
    }
    for key in ("XDG_CONFIG_HOME", "DVC_SITE_CACHE_DIR"):
        os.makedirs(env[key], exist_ok=True)
    return env


def _sh(args: list[str], cwd: str) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip()[:300]}")
    return proc.stdout


def _dvc(args: list[str], cwd: str) -> str:
    import sys

    return _sh([sys.executable, "-m", "dvc", *args], cwd)


def store_with_two_steps(root: str, scale: int) -> tuple[str, str]:
    """Hermetic env, a store at ``root`` holding steps 1 and 2, and the path its repository will use."""
    base = os.path.dirname(root)
    os.environ.update(hermetic_env(os.path.dirname(base)))
    with ckstore.Store(root) as store:
        for step in (1, 2):
            store.save(expected_state(step, scale), step=step)
    return base, os.path.join(base, "repo")


def init_dvc_repo(repo: str) -> None:
    """A new git + DVC repository at ``repo`` whose default remote is the folder ``remote`` beside it."""
    os.makedirs(repo)
    os.makedirs(os.path.join(os.path.dirname(repo), "remote"))
    _sh(["git", "init", "-q", "-b", "main"], repo)
    _dvc(["init", "-q"], repo)
    # A relative path (DVC stores it relative to .dvc/): the remote travels with each copy of the template.
    _dvc(["remote", "add", "-d", "origin", os.path.join("..", "remote")], repo)
    _sh(["git", "add", ".dvc", ".dvcignore"], repo)
    _sh(["git", "commit", "-q", "-m", "init dvc"], repo)


def _prepare(root: str, scale: int) -> None:
    _, repo = store_with_two_steps(root, scale)
    init_dvc_repo(repo)


def _run(root: str, ack: Any, scale: int) -> None:
    repo = os.path.join(os.path.dirname(root), "repo")
    with ckstore.Store(root) as store:
        store.publish(2, name="best", repo=repo, wait=True)
        ack("publish", 2)


def _head_step(repo: str) -> str:
    return _sh(["git", "log", "-1", "--format=%B", "--", "models/best.dvc"], repo)


def _check(store: ckstore.Store, acks: list[tuple[str, Any]]) -> list[str]:
    from ckstore.integrations.dvc import publish as _dvc

    out = []
    repo = os.path.join(os.path.dirname(str(store.path)), "repo")
    if ("publish", 2) in acks and "Ckstore-Step: 2" not in _head_step(repo):
        out.append("acknowledged publish is not committed in git")
    if "published.best" not in next((i.tags for i in store.checkpoints() if i.step == 2), ()) and any(k == "publish" for k, _ in acks):
        out.append("published checkpoint lost its pin tag")
    try:
        _dvc.recover(repo)
        store.publish(2, name="best", repo=repo, wait=True)
    except Exception as exc:
        return out + [f"recovery + re-publish failed: {type(exc).__name__}: {str(exc)[:200]}"]
    if _dvc.pending(repo):
        out.append(f"journal entries still pending after recovery: {len(_dvc.pending(repo))}")
    if "Ckstore-Step: 2" not in _head_step(repo):
        out.append("HEAD does not name the published step after recovery")
    md5, _ = _dvc.read_dvc_file(os.path.join(repo, "models", "best.dvc"))
    plain = md5.removesuffix(".dir")
    if not os.path.exists(os.path.join(os.path.dirname(repo), "remote", "files", "md5", plain[:2], plain[2:] + ".dir")):
        out.append(f"the remote lacks the directory object {md5} that HEAD names")
    status = _sh(["git", "status", "--porcelain"], repo).strip()
    if status:
        out.append(f"work tree not clean after recovery: {status[:120]}")
    left = [n for n in os.listdir(os.path.join(repo, "models")) if ".ckstore-" in n]
    if left:
        out.append(f"temporary publish directories left: {left}")
    return out


PUBLISH = Workload("dvc_publish", _run, _prepare, check=_check, content=expected_state)
