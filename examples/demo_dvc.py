"""The DVC end of the demo: publish the best checkpoint, pull it into a fresh clone, verify it.

``publish_and_pull(store, "best", workdir=".demo/dvc")`` builds, under
``workdir``, a throw-away git + DVC repository with a local directory remote
(no network, no set-up, nothing written to this project's own git history),
publishes the checkpoint there with :meth:`ckstore.Store.publish`, clones the
repository into a fresh directory, runs the plain ``dvc pull models/<name>.dvc``
there, and verifies every file of what arrived against its manifest. It prints
each step and returns True when the pulled checkpoint verified.

Run alone (after ``make demo`` has filled ``.demo/``)::

    .venv/bin/python examples/demo_dvc.py [.demo/store]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import ckstore

MARKER = ".ckstore-demo-dvc"


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def _fresh_workdir(workdir: Path) -> None:
    if workdir.exists():
        if not (workdir / MARKER).exists():
            raise ckstore.InvalidArgumentError(f"{workdir} exists and was not made by this demo; pass another workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("made by examples/demo_dvc.py; safe to delete\n")


def publish_and_pull(store: ckstore.Store, step_or_name: int | str, *, workdir: str | os.PathLike[str], name: str = "best") -> bool:
    """Publish ``step_or_name`` of ``store`` as ``name`` into a new git + DVC repo under ``workdir``, pull it into a clone, verify."""
    workdir = Path(os.path.abspath(workdir))
    _fresh_workdir(workdir)
    repo, remote, clone = workdir / "repo", workdir / "remote", workdir / "clone"
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")  # also for DVC running inside this process
    env = dict(os.environ)
    dvc = [sys.executable, "-m", "dvc"]
    ident = ["-c", "user.name=ckstore demo", "-c", "user.email=demo@ckstore.invalid"]

    print(f"[dvc] creating a git + DVC repository {repo} with a local remote {remote}")
    repo.mkdir()
    _run(["git", "init", "-q", "-b", "main"], repo, env)
    _run([*dvc, "init", "-q"], repo, env)
    _run([*dvc, "remote", "add", "-d", "local", str(remote)], repo, env)
    _run(["git", "add", ".dvc", ".dvcignore"], repo, env)
    _run(["git", *ident, "commit", "-q", "-m", "dvc init"], repo, env)

    result = store.publish(step_or_name, name=name, repo=repo, wait=True).result()
    rel = os.path.relpath(result.dvc_file, repo)
    print(f"[dvc] published step {result.step} as {name!r}: {rel} committed ({result.commit[:10]}), tagged {result.tag}, pushed")

    print(f"[dvc] fresh clone {clone}: git clone + dvc pull {rel}")
    _run(["git", "clone", "-q", str(repo), str(clone)], workdir, env)
    _run([*dvc, "pull", "-q", rel], clone, env)

    pulled = clone / rel[: -len(".dvc")]
    with ckstore.Store(pulled, readonly=True) as copy, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        problems = copy.verify()
        infos = copy.checkpoints()
    if problems or [i.step for i in infos] != [result.step]:
        for problem in problems:
            print(f"[dvc] FAIL {problem.path}: {problem.message}")
        print(f"[dvc] the pulled checkpoint did NOT verify (found steps {[i.step for i in infos]})")
        return False
    nfiles = len(infos[0].files)
    print(f"[dvc] verified: step {result.step} pulled into the fresh clone, {nfiles} tensor files + manifest match their hashes")
    print(f"[dvc] a DVC user types: git clone {repo} clone && cd clone && dvc pull {rel} && ckstore verify {rel[: -len('.dvc')]}")
    return True


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else ".demo/store"
    with ckstore.Store(path) as demo_store:
        ok = publish_and_pull(demo_store, "best" if demo_store.best() else "latest", workdir=".demo/dvc")
    sys.exit(0 if ok else 1)
