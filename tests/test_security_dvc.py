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
from ckstore.integrations.dvc import publish as _dvc

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


# ---------------------------------------------------------------- finding 12: YAML alias bomb in a .dvc file


def test_a_yaml_alias_bomb_in_a_dvc_file_is_refused_before_it_expands(tmp_path):
    import tracemalloc

    levels = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i, name in enumerate("bcdefgh"):
        prev = "abcdefgh"[i]
        levels.append(f"{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]")
    text = "\n".join(levels) + "\nouts:\n- md5: *h\n  path: best\n"
    assert len(text) < 600  # 9**8 = 43 million "lol"s when expanded
    bomb = tmp_path / "best.dvc"
    bomb.write_text(text)
    tracemalloc.start()
    try:
        with pytest.raises(ckstore.DvcError) as exc:
            _dvc.read_dvc_file(str(bomb))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "alias" in str(exc.value) and len(str(exc.value)) < 500
    assert peak < 16 << 20, f"reading a {len(text)}-byte .dvc file took {peak >> 20} MiB"


def test_a_dvc_file_that_is_a_fifo_or_too_large_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "fifo.dvc"
    os.mkfifo(fifo)
    with pytest.raises(ckstore.DvcError, match="not a regular file"):
        _dvc.read_dvc_file(str(fifo))
    big = tmp_path / "big.dvc"
    big.write_bytes(b"#" * (2 << 20))
    with pytest.raises(ckstore.DvcError, match="cap"):
        _dvc.read_dvc_file(str(big))


# ---------------------------------------------------------------- finding 16 and 10: names, dests, commit messages


@pytest.mark.parametrize("bad", ["best\n", "best\r", "b\x1best"])
def test_names_with_a_trailing_newline_or_control_characters_are_refused(bad):
    with pytest.raises(ckstore.InvalidArgumentError):
        _dvc.check_name(bad)


@pytest.mark.parametrize("bad", ["models\nCkstore-Step: 999", "mod\x1b[2Jels", "models\\..\\x"])
def test_dests_with_control_characters_or_backslashes_are_refused(bad):
    with pytest.raises(ckstore.InvalidArgumentError):
        _dvc.check_dest(bad)


def test_remote_names_with_control_characters_are_refused(tmp_path):
    with pytest.raises(ckstore.InvalidArgumentError, match="remote"):
        _dvc.pull(tmp_path / "models" / "best", remote="origin\n-x")


def test_metric_names_cannot_inject_commit_trailers(tmp_path, env):
    # save() refuses such names now; a job replayed from a journal, or a store written by an older
    # version, can still carry them to the commit message.
    repo, _ = make_repo(tmp_path, env)
    with ckstore.Store(tmp_path / "run") as store:
        store.save({"x": __import__("torch").zeros(2)}, step=1)
    job = _dvc.PublishJob(name="best", step=1, store=str(tmp_path / "run"), repo=str(repo), metrics={"loss\nCkstore-Step: 999": 0.5})
    _dvc.run_publish(job)
    message = git("log", "-1", "--format=%B", cwd=repo, env=env)
    trailers = [line for line in message.splitlines() if line.startswith("Ckstore-Step:")]
    assert trailers == ["Ckstore-Step: 1"], message
    assert "\\n" in message.splitlines()[0]  # the metric name is shown escaped on the subject line


# ---------------------------------------------------------------- finding 6: git hooks and fsmonitor


def test_publish_runs_no_git_hook_and_no_fsmonitor_of_the_repository(tmp_path, env):
    repo, _ = make_repo(tmp_path, env)
    markers = tmp_path / "markers"
    markers.mkdir()
    hooks = repo / ".git" / "hooks"
    for hook in ("pre-commit", "commit-msg", "post-commit", "reference-transaction", "post-index-change", "pre-auto-gc"):
        (hooks / hook).write_text(f"#!/bin/sh\ntouch {markers}/{hook}\n")
        (hooks / hook).chmod(0o755)
    monitor = tmp_path / "fsmonitor.sh"
    monitor.write_text(f"#!/bin/sh\ntouch {markers}/fsmonitor\nexit 1\n")
    monitor.chmod(0o755)
    git("config", "core.fsmonitor", str(monitor), cwd=repo, env=env)
    with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
        train(store, steps=(1,), losses=(0.1,))
        result = store.publish(1, name="best", repo=repo, wait=True).result()
    assert result.commit and result.tag == "best@v1.0.0"
    assert sorted(os.listdir(markers)) == [], "publish ran code the repository configured"


# ---------------------------------------------------------------- finding 15: a symlinked models/ in the repository


def test_publish_never_writes_through_a_symlinked_dest(tmp_path, env):
    repo, _ = make_repo(tmp_path, env)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "secret.txt").write_text("do not touch\n")
    before = snapshot(victim)
    (repo / "models").symlink_to(victim)
    with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
        train(store, steps=(1,), losses=(0.1,))
        with pytest.raises(ckstore.InvalidArgumentError, match="symlink"):
            store.publish(1, name="best", repo=repo).result()
    assert snapshot(victim) == before
    assert os.listdir(victim) == ["secret.txt"]


def test_pull_never_writes_through_a_symlinked_dest(tmp_path, env):
    clone, _ = published_clone(tmp_path, env)
    victim = tmp_path / "victim"
    victim.mkdir()
    shutil.move(clone / "models" / "best.dvc", victim / "best.dvc")
    (clone / "models").rmdir() if not os.listdir(clone / "models") else shutil.rmtree(clone / "models")
    (clone / "models").symlink_to(victim)
    before = snapshot(victim)
    with pytest.raises(ckstore.InvalidArgumentError, match="symlink"):
        _dvc.pull(clone / "models" / "best", repo=clone)
    assert snapshot(victim) == before


# ---------------------------------------------------------------- finding 3: crafted journals


def plant_journal(repo: Path, name: str, stage: str, **fields) -> Path:
    key = hashlib.sha256(f"models\0{name}".encode()).hexdigest()[:16]
    journal = repo / ".dvc" / "tmp" / "ckstore" / f"publish-{name}-{key}.json"
    journal.parent.mkdir(parents=True, exist_ok=True)
    job = {"name": name, "step": 1, "store": "/nowhere", "repo": str(repo), "dest": "models", "remote": None, "metrics": {}}
    record = {"format": "ckstore.publish-journal", "format_version": 1, "stage": stage, "job": job} | fields
    journal.write_text(json.dumps(record))
    journal.chmod(0o644)
    return journal


@pytest.mark.parametrize("stage", ["materialize", "swap"])
def test_a_crafted_journal_never_removes_or_moves_anything_outside(tmp_path, env, stage):
    repo, _ = make_repo(tmp_path, env)
    victim = tmp_path / "victim"
    (victim / "tree").mkdir(parents=True)
    (victim / "tree" / "file.bin").write_bytes(b"x" * 100)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("keep\n")
    before = snapshot(victim), snapshot(other)
    journal = plant_journal(repo, "evil", stage, tmp=str(victim / "tree"), old=str(other))
    with pytest.raises(ckstore.DvcError) as exc:
        _dvc.recover(repo)
    assert str(journal) in str(exc.value)
    assert (snapshot(victim), snapshot(other)) == before
    assert not (repo / "models" / "evil").exists()
    # The next ordinary publish refuses too, naming the journal, and touches nothing.
    with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
        train(store, steps=(1,), losses=(0.1,))
        with pytest.raises(ckstore.DvcError, match="journal"):
            store.publish(1, name="best", repo=repo).result()
    assert (snapshot(victim), snapshot(other)) == before


def test_a_journal_another_user_could_write_is_refused(tmp_path, env):
    repo, _ = make_repo(tmp_path, env)
    journal = plant_journal(repo, "best", "materialize")
    journal.chmod(0o666)
    with pytest.raises(ckstore.DvcError, match="writable"):
        _dvc.recover(repo)
    journal.chmod(0o644)
    os.chown(journal, 65534, 65534)
    with pytest.raises(ckstore.DvcError, match="owned"):
        _dvc.recover(repo)


@pytest.mark.parametrize("planted", [".dvcignore", "models/.gitignore"])
def test_publish_never_reads_or_writes_through_a_symlinked_ignore_file(tmp_path, env, planted):
    repo, _ = make_repo(tmp_path, env)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "secret.txt").write_text("do not touch\n")
    before = snapshot(victim)
    link = repo / planted
    link.parent.mkdir(exist_ok=True)
    if link.exists():
        link.unlink()
    link.symlink_to(victim / "secret.txt")
    with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
        train(store, steps=(1,), losses=(0.1,))
        with pytest.raises(ckstore.CkstoreError, match="symlink"):
            store.publish(1, name="best", repo=repo).result()
    assert snapshot(victim) == before
    assert "do not touch" not in git("log", "-p", "--all", cwd=repo, env=env)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("planted", ["fifo", "symlink"])
def test_publish_of_a_store_with_a_fifo_or_symlink_for_a_file_is_refused_without_hanging(tmp_path, env, planted):
    repo, _ = make_repo(tmp_path, env)
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"secret" * 100)
    with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
        train(store, steps=(1,), losses=(0.1,))
        info = store.resolve(1)
    for name in [max(info.files, key=lambda n: info.files[n].size), "manifest.json"]:
        path = info.path / name
        original = path.read_bytes()
        path.unlink()
        os.mkfifo(path) if planted == "fifo" else path.symlink_to(victim)
        with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
            with pytest.raises((ckstore.IntegrityError, ckstore.ManifestError, ckstore.CheckpointNotFoundError)) as exc:
                store.publish(1, name="best", repo=repo).result(timeout=60)
        assert name in str(exc.value)
        path.unlink()
        path.write_bytes(original)
    assert not (repo / "models" / "best").exists()
