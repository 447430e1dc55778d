"""Untrusted repos, remotes and journals against publish and pull (issue 16), with real git + DVC.

Each test builds what an attacker ships (a crafted DVC directory object in the
remote, a journal in ``.dvc/tmp``, a git hook, a YAML bomb, a symlinked
``models/``) and plants a victim beside it that must stay untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from test_dvc import ck_here, env, git, make_repo, train  # noqa: F401  (env is a fixture)

import ckstore
from ckstore import _dvc

pytest.importorskip("dvc.repo", reason="DVC is an optional extra: pip install 'ckstore[dvc]'")
pytestmark = pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")


def published_clone(tmp_path: Path, env: dict[str, str], remote_at: Path | None = None) -> tuple[Path, Path]:
    """Publish a small checkpoint as ``best``, clone the repo; returns (clone, remote directory).

    ``remote_at`` moves the clone's remote there (the attacker chooses the
    remote's URL too: it is in the cloned ``.dvc/config``).
    """
    repo, remote = make_repo(tmp_path, env)
    with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
        train(store, steps=(1,), losses=(0.1,))
        store.publish(1, name="best", repo=repo, wait=True)
    clone = tmp_path / "clone"
    git("clone", "-q", str(repo), str(clone), cwd=tmp_path, env=env)
    if remote_at is not None:
        deep = remote_at
        deep.parent.mkdir(parents=True)
        shutil.copytree(remote, deep)
        config = clone / ".dvc" / "config"
        config.write_text(config.read_text().replace(str(remote), str(deep)))
        remote = deep
    return clone, remote


def plant_dir_object(clone: Path, remote: Path, edit) -> str:
    """Rewrite ``best``'s directory object with ``edit(listing)``, store it in the remote, point best.dvc at it."""
    dvc_file = clone / "models" / "best.dvc"
    md5, _ = _dvc.read_dvc_file(str(dvc_file))
    listing = json.loads((remote / "files" / "md5" / md5[:2] / md5[2:-4]).with_suffix(".dir").read_text())
    listing = edit(listing)
    raw = json.dumps(listing, separators=(", ", ": ")).encode()
    new = hashlib.md5(raw).hexdigest()
    obj = remote / "files" / "md5" / new[:2] / (new[2:] + ".dir")
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_bytes(raw)
    dvc_file.write_text(dvc_file.read_text().replace(md5, new + ".dir"))
    return new + ".dir"


def traversal(from_dir: Path, to: Path) -> str:
    """An object name that dvc-data's ``cache + '/' + oid[:2] + '/' + oid[2:]`` turns into ``to``."""
    rel = os.path.relpath(to, from_dir)  # ../../x/y relative to <cache>/files/md5
    return ".." + "/" + rel  # oid[:2] == "..": one level up, then the rest from <cache>/files


def snapshot(top: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(top)): (p.lstat().st_ino, p.read_bytes() if p.is_file() else b"") for p in sorted(top.rglob("*"))}


# ---------------------------------------------------------------- finding 1: traversal in a directory object


def test_pull_never_deletes_a_file_a_directory_object_points_at_outside_the_cache(tmp_path, env):
    clone, remote = published_clone(tmp_path, env)
    victim = tmp_path / "victim"
    victim.mkdir()
    secret = victim / "secret.txt"
    secret.write_text("do not touch\n")
    before = snapshot(victim)
    cache_md5_dir = clone / ".dvc" / "cache" / "files" / "md5"
    evil = traversal(cache_md5_dir.parent, secret)

    def edit(listing):
        manifest = next(e for e in listing if e["relpath"].endswith("/manifest.json"))
        manifest["md5"] = evil
        return listing

    plant_dir_object(clone, remote, edit)
    # Twice: plain DVC keeps the directory object in the cache after the first (failed) fetch, and
    # then takes every object it names as present, so the second pull hashes the victim's file.
    for _ in range(2):
        with pytest.raises(ckstore.DvcError) as exc:
            _dvc.pull(clone / "models" / "best.dvc")
        assert "md5" in str(exc.value) and "manifest.json" in str(exc.value), exc.value
        assert snapshot(victim) == before, "pull touched a file outside the repository"
    assert snapshot(victim) == before, "pull touched a file outside the repository"
    assert not (clone / "models" / "best").exists()


def test_pull_never_creates_a_file_a_directory_object_points_at_outside_the_cache(tmp_path, env):
    # <tmp>/attacker/d0/d1/remote/files and <tmp>/clone/.dvc/cache/files are equally deep, so one object
    # name reads the attacker's <tmp>/attacker/victim/bashrc from the remote and writes <tmp>/victim/bashrc.
    clone, remote = published_clone(tmp_path, env, remote_at=tmp_path / "attacker" / "d0" / "d1" / "remote")
    victim = tmp_path / "victim"
    victim.mkdir()
    target = victim / "bashrc"  # missing: plain `dvc fetch` "downloads" the attacker's bytes there
    evil = traversal(clone / ".dvc" / "cache" / "files", target)
    source = Path(os.path.normpath(f"{remote}/files/md5/{evil[:2]}/{evil[2:]}"))
    assert source == tmp_path / "attacker" / "victim" / "bashrc"
    source.parent.mkdir(parents=True)
    source.write_bytes(b"echo owned\n")

    def edit(listing):
        listing.append({"md5": evil, "relpath": "checkpoints/step-00000001/extra.safetensors"})
        return listing

    plant_dir_object(clone, remote, edit)
    proc = ck_here("pull", "models/best", "--json", cwd=clone)
    assert not target.exists(), "pull wrote a file outside the repository"
    assert proc.returncode == 2, proc
    err = json.loads(proc.stdout)
    assert err["error"] == "DvcError" and "extra.safetensors" in err["message"], err
    assert not (clone / "models" / "best").exists()
