"""Publishing to DVC and pulling back (``ckstore.integrations.dvc.publish``), against real git + DVC repositories.

Every test is hermetic: a temporary git repository with ``dvc init``, a local
directory remote, HOME/XDG/DVC site-cache dirs under ``tmp_path``, DVC
analytics off, a git identity in the environment. The clone-side commands are
the plain ones a DVC user types (``git clone``, ``dvc pull <name>.dvc``,
``ckstore verify``), run as real subprocesses.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ckstore
from ckstore.integrations.dvc import publish as _dvc

pytest.importorskip("dvc.repo", reason="DVC is an optional extra: pip install 'ckstore[dvc]'")
# DVC 3.67 trips a pygtrie deprecation on every index build; it is DVC's, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")

PYTHON = sys.executable


# ---------------------------------------------------------------- hermetic set-up


def hermetic_env(base: Path) -> dict[str, str]:
    home = base / "home"
    env = {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "DVC_SITE_CACHE_DIR": str(base / "dvc-site-cache"),
        "DVC_GLOBAL_CONFIG_DIR": str(home / ".config" / "dvc"),
        "DVC_SYSTEM_CONFIG_DIR": str(base / "dvc-system"),
        "DVC_NO_ANALYTICS": "1",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "ckstore tests",
        "GIT_AUTHOR_EMAIL": "tests@ckstore.invalid",
        "GIT_COMMITTER_NAME": "ckstore tests",
        "GIT_COMMITTER_EMAIL": "tests@ckstore.invalid",
        "TMPDIR": str(base / "tmp"),
    }
    for key in ("XDG_CONFIG_HOME", "DVC_SITE_CACHE_DIR", "TMPDIR"):
        os.makedirs(env[key], exist_ok=True)
    return env


@pytest.fixture
def env(tmp_path, monkeypatch) -> dict[str, str]:
    values = hermetic_env(tmp_path)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    for key in ("DVC_STUDIO_TOKEN", "DVC_ROOT", "GIT_DIR", "GIT_WORK_TREE", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    return dict(os.environ)


def run(cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def dvc(*args: str, cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([PYTHON, "-m", "dvc", *args], cwd, env, check)


def ck(*args: str, cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([PYTHON, "-m", "ckstore", *args], cwd, env, check)


def ck_here(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The ``ckstore`` command run in this process (``cli.main``): same code, no interpreter start-up."""
    from ckstore import cli

    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(list(args))
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess(["ckstore", *args], rc, out.getvalue(), err.getvalue())


def git(*args: str, cwd: Path, env: dict[str, str]) -> str:
    return run(["git", *args], cwd, env).stdout


def make_repo(base: Path, env: dict[str, str], remote_url: str | None = None) -> tuple[Path, Path]:
    """A git + DVC repository with a default remote (a local directory unless ``remote_url``); returns (repo, remote dir).

    ``dvc init`` and ``dvc remote add -d`` are done through DVC's Python API (same files, no interpreter start-up).
    """
    from dvc.repo import Repo

    repo, remote = base / "repo", base / "remote"
    repo.mkdir(parents=True)
    git("init", "-q", "-b", "main", cwd=repo, env=env)
    Repo.init(str(repo)).close()
    with Repo(str(repo)) as dvc_repo, dvc_repo.config.edit() as conf:
        conf["remote"]["origin"] = {"url": remote_url or str(remote)}
        conf["core"]["remote"] = "origin"
    git("add", ".dvc", ".dvcignore", cwd=repo, env=env)
    git("commit", "-q", "-m", "init dvc", cwd=repo, env=env)
    return repo, remote


def remote_objects(remote: Path) -> list[str]:
    return sorted(str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))


def train(store: ckstore.Store, steps=(10, 20, 30), losses=(0.5, 0.2, 0.4), frozen: torch.Tensor | None = None) -> None:
    """A short real training run: a linear model, SGD, one checkpoint per 'epoch'."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    embed = frozen if frozen is not None else torch.arange(64, dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    for step, loss in zip(steps, losses):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        store.save({"model": model, "frozen": {"embed": embed}}, step=step, metrics={"val_loss": loss})


# ---------------------------------------------------------------- round trip


@pytest.mark.guarantee("G19")
def test_publish_best_then_plain_dvc_pull_in_a_fresh_clone_verifies(tmp_path, env):
    repo, remote = make_repo(tmp_path, env)
    store_dir = tmp_path / "run"  # outside the repo: publishing materializes it inside
    with ckstore.Store(store_dir, keep_last=1, metric="val_loss") as store:
        train(store, steps=(10, 20), losses=(0.5, 0.2))
        publication = store.publish("best", name="best", repo=repo)  # queued; training goes on
        # Pinned: retention (keep_last=1) keeps the published step 20 as more steps arrive.
        train(store, steps=(30, 40), losses=(0.4, 0.3))
        result = publication.result()
        assert result.step == 20 and result.tag == "best@v1.0.0"
        assert [i.step for i in store.checkpoints()] == [20, 40]
        assert store.resolve("published.best").step == 20

    assert (repo / "models" / "best.dvc").is_file()
    log = git("log", "-1", "--format=%B", cwd=repo, env=env)
    assert "Ckstore-Name: best" in log and "Ckstore-Step: 20" in log
    assert git("status", "--porcelain", cwd=repo, env=env).strip() == ""
    assert remote_objects(remote), "nothing was pushed"

    clone = tmp_path / "clone"
    git("clone", "-q", str(repo), str(clone), cwd=tmp_path, env=env)
    assert not (clone / "models" / "best").exists()
    dvc("pull", "models/best.dvc", cwd=clone, env=env)
    out = ck("verify", "models/best", "--json", cwd=clone, env=env)
    assert json.loads(out.stdout) | {"problems": []} == {"ok": True, "checked": [20], "formats": {"20": 2}, "problems": []}
    with ckstore.Store(clone / "models" / "best", readonly=True) as pulled:
        state = pulled.load()
        assert pulled.latest().metrics == {"val_loss": 0.2}
    with ckstore.Store(store_dir, readonly=True) as original:
        expected = original.load(step=20)
    assert torch.equal(state["model"]["weight"], expected["model"]["weight"])


def test_ckstore_pull_cli_installs_verified_checkpoint(tmp_path, env):
    repo, _ = make_repo(tmp_path, env)
    with ckstore.Store(repo / "runs" / "exp", metric="val_loss") as store:  # a store inside the repo
        train(store)
    (repo / ".gitignore").write_text("/runs/\n")
    out = ck_here("publish", "runs/exp", "latest", "--name", "last", "--json", cwd=repo)
    payload = json.loads(out.stdout)
    assert payload["step"] == 30 and payload["dvc_file"].endswith("models/last.dvc")
    clone = tmp_path / "clone"
    git("clone", "-q", str(repo), str(clone), cwd=tmp_path, env=env)
    out = ck_here("pull", "models/last", "--json", cwd=clone)
    assert json.loads(out.stdout) | {"path": None} == {"ok": True, "checked": [30], "path": None, "problems": []}
    # DVC agrees the workspace matches the .dvc file: the verified install is what dvc would check out.
    assert "up to date" in dvc("status", "models/last.dvc", cwd=clone, env=env).stdout.lower()


def test_republish_moves_name_and_keeps_history(tmp_path, env):
    repo, remote = make_repo(tmp_path, env)
    with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
        train(store)
        first = store.publish(10, name="best", repo=repo).result()
        second = store.publish(30, name="best", repo=repo).result()
        assert (first.tag, second.tag) == ("best@v1.0.0", "best@v2.0.0")
        assert store.resolve("published.best").step == 30  # the pin moved with the name
        again = store.publish(30, name="best", repo=repo, wait=True).result()
        assert again.tag == "best@v2.0.0" and again.commit == second.commit  # nothing changed: no new commit
    assert sorted(os.listdir(repo / "models" / "best" / "checkpoints")) == ["step-00000030"]
    assert len(git("log", "--format=%H", "--", "models/best.dvc", cwd=repo, env=env).split()) == 2

    # `ckstore gc --dvc --cloud` collects what nothing names, and keeps what the tags name (best@v1.0.0).
    from dvc.repo import Repo

    (repo / "scratch.bin").write_bytes(os.urandom(1000))
    with Repo(str(repo)) as dvc_repo:
        dvc_repo.add([str(repo / "scratch.bin")])
        dvc_repo.push([str(repo / "scratch.bin.dvc")])
    orphan = (repo / "scratch.bin.dvc").read_text().split("md5: ")[1].split()[0]
    (repo / "scratch.bin.dvc").unlink()
    (repo / "scratch.bin").unlink()
    before = set(remote_objects(remote))
    assert ck_here("gc", str(tmp_path / "run"), "--dvc", "--cloud", "--repo", str(repo), cwd=repo).returncode == 0
    after = set(remote_objects(remote))
    assert before - after == {f"files/md5/{orphan[:2]}/{orphan[2:]}"}
    assert not list((repo / ".dvc" / "cache").rglob(orphan[2:]))
    # An older version comes back with the commands a DVC user types.
    clone = tmp_path / "clone"
    git("clone", "-q", str(repo), str(clone), cwd=tmp_path, env=env)
    git("checkout", "-q", "best@v1.0.0", "--", "models/best.dvc", cwd=clone, env=env)
    dvc("pull", "models/best.dvc", cwd=clone, env=env)
    assert sorted(os.listdir(clone / "models" / "best" / "checkpoints")) == ["step-00000010"]
    assert ck_here("verify", "models/best", cwd=clone).returncode == 0


# ---------------------------------------------------------------- dedup


def test_unchanged_tensor_file_is_stored_once_in_the_remote(tmp_path, env):
    repo, remote = make_repo(tmp_path, env)
    frozen = torch.arange(4096, dtype=torch.float32)
    with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
        train(store, steps=(1, 2), losses=(0.3, 0.2), frozen=frozen)
        files = [set(store.resolve(s).files.items()) for s in (1, 2)]
        shared = files[0] & files[1]
        assert len(shared) == 1, "the frozen tensor's file must be byte-identical in both checkpoints"
        store.publish(1, name="first", repo=repo)
        store.publish(2, name="second", repo=repo, wait=True)
    objects = remote_objects(remote)
    dirs = [o for o in objects if o.endswith(".dir")]
    # Each published checkpoint has its tensor files (the model's merged into model.safetensors, whose stable
    # link <name>/model.safetensors is the same object) + a manifest; the shared one is stored once.
    per_checkpoint = len(os.listdir(repo / "models" / "first" / "checkpoints" / "step-00000001"))
    assert per_checkpoint == 3  # model.safetensors, the frozen tensor's file, manifest.json
    assert len(dirs) == 2
    assert len(objects) - len(dirs) == 2 * per_checkpoint - 1


# ---------------------------------------------------------------- corruption


@pytest.mark.guarantee("G19")
def test_corrupt_remote_object_fails_pull_and_installs_nothing(tmp_path, env):
    repo, remote = make_repo(tmp_path, env)
    with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
        train(store)
        info = store.resolve("best")
        store.publish("best", name="best", repo=repo, wait=True)
    victim_name = max(info.files, key=lambda n: info.files[n].size)
    clone = tmp_path / "clone"
    git("clone", "-q", str(repo), str(clone), cwd=tmp_path, env=env)
    # Find the remote object of the largest tensor file through the .dir object, flip one byte.
    md5, _ = _dvc.read_dvc_file(str(clone / "models" / "best.dvc"))
    listing = json.loads((remote / "files" / "md5" / md5[:2] / md5[2:]).read_text())
    (obj_md5,) = [e["md5"] for e in listing if e["relpath"].endswith("/" + victim_name)]
    obj = remote / "files" / "md5" / obj_md5[:2] / obj_md5[2:]
    os.chmod(obj, 0o644)
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0x01
    obj.write_bytes(bytes(data))
    os.chmod(obj, 0o444)  # bit rot keeps DVC's read-only mode (a writable object DVC re-hashes and skips as missing)

    proc = ck_here("pull", "models/best", "--json", cwd=clone)
    assert proc.returncode == 2
    err = json.loads(proc.stdout)
    assert err["error"] == "IntegrityError"
    assert victim_name in err["message"] and "corrupt" in err["message"]
    assert not (clone / "models" / "best").exists()
    assert not [p for p in (clone / "models").iterdir() if "ckstore-tmp" in p.name]
    # The corrupt copy is not left in the local cache for a later `dvc checkout` to install.
    assert not list((clone / ".dvc" / "cache").rglob(obj_md5[2:]))

    with pytest.raises(ckstore.IntegrityError) as info_exc:
        _dvc.pull(clone / "models" / "best.dvc")
    assert info_exc.value.path.endswith(victim_name)


@pytest.mark.guarantee("G19")
def test_corrupt_source_checkpoint_is_never_published(tmp_path, env):
    repo, remote = make_repo(tmp_path, env)
    with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
        train(store)
        info = store.resolve(20)
        victim = info.path / max(info.files, key=lambda n: info.files[n].size)
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0x80
        victim.write_bytes(bytes(data))
        with pytest.raises(ckstore.IntegrityError) as exc:
            store.publish(20, name="best", repo=repo).result()
        assert exc.value.path == str(victim)
    assert _dvc.pending(repo) == [] and remote_objects(remote) == []
    assert not (repo / "models" / "best").exists() and not (repo / "models" / "best.dvc").exists()
    assert "ckstore publish" not in git("log", "--format=%s", cwd=repo, env=env)


def test_publish_copies_and_fsyncs_when_hard_links_are_impossible(tmp_path, env, monkeypatch):
    """Store and repository on different filesystems (EXDEV): the files are copied, hashed while copied."""
    import errno

    def no_link(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(_dvc.os, "link", no_link)
    repo, _ = make_repo(tmp_path, env)
    synced = []
    previous = ckstore.storage.durable.set_hook(lambda op, phase, path, info: synced.append(path) if (op, phase) == ("fsync", "after") else None)
    try:
        with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
            train(store, steps=(1,), losses=(0.1,))
            store.publish(1, name="copied", repo=repo, wait=True)
            source = store.resolve(1)
    finally:
        ckstore.storage.durable.set_hook(previous)
    published = repo / "models" / "copied" / "checkpoints" / "step-00000001"
    for name in [*source.files, "manifest.json"]:
        if name.startswith("model."):  # merged into model.safetensors (see weights.py): written anew, not linked
            continue
        assert os.stat(published / name).st_ino != os.stat(source.path / name).st_ino
        assert any(".copied.ckstore-tmp-" in p and p.endswith(f"/step-00000001/{name}") for p in synced), name
    with ckstore.Store(repo / "models" / "copied", readonly=True) as copy:
        assert copy.verify() == []


# ---------------------------------------------------------------- errors and the worker


def test_bad_inputs_raise_typed_errors(tmp_path, env):
    repo, _ = make_repo(tmp_path, env)
    with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
        train(store, steps=(1,), losses=(0.1,))
        for bad in ("", "1abc", "a/b", "../x", "a..b", "x.lock", "a b", None):
            with pytest.raises(ckstore.InvalidArgumentError):
                store.publish(1, name=bad, repo=repo)
        with pytest.raises(ckstore.InvalidArgumentError):
            store.publish(1, name="ok", repo=repo, dest="../outside")
        with pytest.raises(ckstore.InvalidArgumentError):
            store.publish(1, name="ok", repo=tmp_path / "run")  # not a DVC repository
        with pytest.raises(ckstore.CheckpointNotFoundError):
            store.publish(99, name="ok", repo=repo)
        with pytest.MonkeyPatch.context() as mp:  # DVC missing: a typed error with the install hint
            mp.setitem(sys.modules, "dvc", None)
            mp.setitem(sys.modules, "dvc.repo", None)
            with pytest.raises(ckstore.DvcError, match=r"pip install 'ckstore\[dvc\]'"):
                store.publish(1, name="ok", repo=repo)
        assert store.checkpoints()[0].tags == ()  # refused before pinning anything
    with pytest.raises(ckstore.CheckpointNotFoundError):
        _dvc.pull(repo / "models" / "never")
    proc = ck_here("pull", str(repo / "models" / "never"), cwd=repo)
    assert proc.returncode == 2 and "no such .dvc file" in proc.stderr


def test_background_failure_surfaces_on_result_and_next_publish(tmp_path, env):
    repo, _ = make_repo(tmp_path, env)
    dvc("remote", "modify", "origin", "url", str(tmp_path / "blocker" / "remote"), cwd=repo, env=env)
    (tmp_path / "blocker").write_text("a file where the remote's parent directory should be")
    with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
        train(store, steps=(1, 2), losses=(0.1, 0.2))
        pub = store.publish(1, name="one", repo=repo)
        with pytest.raises(ckstore.DvcError, match="push"):
            pub.result(timeout=120)
        failing = store.publish(2, name="two", repo=repo)
        failing._future.exception(timeout=120)  # let it fail without collecting it
        with pytest.raises(ckstore.DvcError, match="earlier publish failed"):
            store.publish(2, name="three", repo=repo)
    # Git history never names what the remote lacks: the failed publishes made no commit.
    assert "ckstore publish" not in git("log", "--format=%s", cwd=repo, env=env)


def test_refuses_to_replace_what_it_did_not_publish(tmp_path, env):
    repo, _ = make_repo(tmp_path, env)
    (repo / "models" / "mine").mkdir(parents=True)
    (repo / "models" / "mine" / "notes.txt").write_text("user data")
    with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
        train(store, steps=(1,), losses=(0.1,))
        with pytest.raises(ckstore.InvalidArgumentError, match="not published by ckstore"):
            store.publish(1, name="mine", repo=repo, wait=True)
    assert (repo / "models" / "mine" / "notes.txt").read_text() == "user data"


@pytest.mark.guarantee("G19")
def test_failed_publish_is_finished_by_the_next_one_or_dropped_if_its_directory_is_gone(tmp_path, env):
    repo, remote = make_repo(tmp_path, env)

    def fail_at(stage: str, phase: str):
        def hook(s, p, info):
            if (s, p) == (stage, phase):
                raise RuntimeError(f"injected failure at {s}/{p}")

        return hook

    with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
        train(store)
        previous = _dvc.set_stage_hook(fail_at("push", "before"))
        try:
            with pytest.raises(ckstore.DvcError, match="injected failure at push/before"):
                store.publish(10, name="first", repo=repo).result()
        finally:
            _dvc.set_stage_hook(previous)
        assert [(r["job"]["name"], r["stage"]) for r in _dvc.pending(repo)] == [("first", "push")]
        assert "first" not in git("log", "--format=%B", cwd=repo, env=env)  # HEAD never names unpushed data
        store.publish(20, name="second", repo=repo, wait=True)
        log = git("log", "--format=%s", cwd=repo, env=env)
        assert "ckstore publish first: step 10" in log and "ckstore publish second: step 20" in log
        assert_consistent(repo, remote, env)

        previous = _dvc.set_stage_hook(fail_at("add", "after"))
        try:
            with pytest.raises(ckstore.DvcError):
                store.publish(30, name="third", repo=repo).result()
        finally:
            _dvc.set_stage_hook(previous)
        import shutil

        shutil.rmtree(repo / "models" / "third")  # the user removed the half-published directory
        with pytest.warns(RuntimeWarning, match="third"):
            store.publish(30, name="fourth", repo=repo, wait=True)
    assert _dvc.pending(repo) == []
    assert "third" not in git("log", "--format=%B", cwd=repo, env=env)
    assert_consistent(repo, remote, env)


EXIT_SCRIPT = textwrap.dedent("""
    import sys, torch, ckstore
    good, bad = sys.argv[1:3]
    store = ckstore.Store(sys.argv[3], metric="val_loss")
    store.save({"w": torch.ones(100)}, step=1, metrics={"val_loss": 1.0})
    store.publish(1, name="kept", repo=good)   # never waited for: must still finish
    store.publish(1, name="lost", repo=bad)    # fails; nobody collects the error
    print("main thread done", flush=True)
""")


def test_script_exit_finishes_queued_publishes_and_reports_uncollected_failures(tmp_path, env):
    good, _ = make_repo(tmp_path / "a", env)
    bad, _ = make_repo(tmp_path / "b", env)
    dvc("remote", "modify", "origin", "url", str(tmp_path / "blocker" / "x"), cwd=bad, env=env)
    (tmp_path / "blocker").write_text("not a directory")
    proc = run([PYTHON, "-c", EXIT_SCRIPT, str(good), str(bad), str(tmp_path / "run")], tmp_path, env)
    assert "main thread done" in proc.stdout
    assert "Ckstore-Name: kept" in git("log", "-1", "--format=%B", cwd=good, env=env)
    assert "publish failed and nobody collected the error" in proc.stderr and "push" in proc.stderr


def test_publish_waits_for_dvc_lock_held_by_another_process(tmp_path, env):
    repo, _ = make_repo(tmp_path, env)
    holder = subprocess.Popen(
        [PYTHON, "-c", textwrap.dedent(f"""
            import sys, time
            from dvc.repo import Repo
            r = Repo({str(repo)!r})
            with r.lock:
                print("locked", flush=True)
                time.sleep(4)  # longer than the 3 s after which a DVC command that does not wait fails
        """)],
        env=env, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
            train(store, steps=(1,), losses=(0.1,))
            result = store.publish(1, name="one", repo=repo, wait=True).result()
        assert result.tag == "one@v1.0.0"
    finally:
        holder.wait(timeout=60)
    assert holder.returncode == 0


# ---------------------------------------------------------------- kill -9 at every stage

KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, threading, time
    import ckstore
    from ckstore.integrations.dvc import publish as _dvc
    store_dir, repo, stage, phase = sys.argv[1:5]

    def hook(s, p, info):
        if s == stage and p == phase:
            print(f"killing at {s}/{p}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if s == "push" and p == "before" and stage == "push-mid":
            # Kill in the middle of the upload: after the first object lands in the remote.
            from dvc_objects.fs import local
            original = local.LocalFileSystem.put_file
            count = [0]
            def put_file(self, *a, **k):
                original(self, *a, **k)
                count[0] += 1
                if count[0] == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
            local.LocalFileSystem.put_file = put_file
    _dvc.set_stage_hook(hook)
    with ckstore.Store(store_dir) as store:
        store.publish(int(sys.argv[5]), name="best", repo=repo, wait=True)
    print("finished", flush=True)
""")


def assert_consistent(repo: Path, remote: Path, env: dict[str, str]) -> None:
    """Git HEAD names only objects the remote holds, and the repo has no stray staged state."""
    committed = git("ls-tree", "-r", "--name-only", "HEAD", cwd=repo, env=env).split()
    for rel in committed:
        if rel.endswith(".dvc") and rel.startswith("models/"):
            text = git("show", f"HEAD:{rel}", cwd=repo, env=env)
            md5 = text.split("md5: ")[1].split()[0]
            dir_obj = remote / "files" / "md5" / md5[:2] / md5[2:]
            assert dir_obj.is_file(), f"HEAD names {md5} that the remote lacks"
            for entry in json.loads(dir_obj.read_text()):
                assert (remote / "files" / "md5" / entry["md5"][:2] / entry["md5"][2:]).is_file()


#: Where the publishing process is killed: before anything touched the repository, with the
#: verified copy in place but not added, after ``dvc add``, in the middle of the upload (after
#: the second object), after the push, and after the git commit (before the tag).
KILL_POINTS = [
    ("materialize", "before"),
    ("swap", "after"),
    ("add", "after"),
    ("push-mid", "none"),
    ("push", "after"),
    ("commit", "after"),
]


@pytest.mark.guarantee("G19")
def test_sigkill_at_each_publish_stage_then_rerun_or_recover_completes(tmp_path, env):
    """A real SIGKILL of a real publishing process at every stage; each time HEAD and the remote stay
    consistent, and re-running the publish (or ``ckstore publish --recover``) completes it."""
    repo, remote = make_repo(tmp_path, env)
    store_dir = tmp_path / "run"
    steps = [10 * (i + 1) for i in range(len(KILL_POINTS) + 1)]
    with ckstore.Store(store_dir, metric="val_loss") as store:
        train(store, steps=steps, losses=[1.0 / s for s in steps])
        store.publish(steps[0], name="best", repo=repo, wait=True)  # the name exists before the first kill
        store.close()
        for (stage, phase), step in zip(KILL_POINTS, steps[1:]):
            proc = run([PYTHON, "-c", KILL_SCRIPT, str(store_dir), str(repo), stage, phase, str(step)], tmp_path, env, check=False)
            assert proc.returncode == -signal.SIGKILL, (stage, proc.stdout + proc.stderr)
            assert_consistent(repo, remote, env)
            head = git("log", "-1", "--format=%B", "--", "models/best.dvc", cwd=repo, env=env)
            assert (f"Ckstore-Step: {step}" in head) == (stage == "commit"), (stage, head)
            if stage == "add":  # recovery alone (the CLI), without re-running the publish
                out = ck_here("publish", str(store_dir), "--recover", "--repo", str(repo), "--json", cwd=tmp_path)
                assert [r["step"] for r in json.loads(out.stdout)["recovered"]] == [step]
            else:
                with ckstore.Store(store_dir) as again:
                    assert again.publish(step, name="best", repo=repo, wait=True).result().step == step
            assert _dvc.pending(repo) == []
            assert_consistent(repo, remote, env)
            assert f"Ckstore-Step: {step}" in git("log", "-1", "--format=%B", "--", "models/best.dvc", cwd=repo, env=env)
            assert not [p for p in (repo / "models").iterdir() if ".ckstore-" in p.name], stage
            assert git("status", "--porcelain", cwd=repo, env=env).strip() == "", stage
    tags = git("tag", "--list", "best@v*", cwd=repo, env=env).split()
    assert sorted(tags, key=lambda t: int(t.split("@v")[1].split(".")[0])) == [f"best@v{k}.0.0" for k in range(1, len(steps) + 1)]
    clone = tmp_path / "clone"
    git("clone", "-q", str(repo), str(clone), cwd=tmp_path, env=env)
    dvc("pull", "models/best.dvc", cwd=clone, env=env)
    assert os.listdir(clone / "models" / "best" / "checkpoints") == [f"step-{steps[-1]:08d}"]
    ck("verify", "models/best", cwd=clone, env=env)


def test_close_waits_for_queued_publishes_and_raises_an_unseen_failure(tmp_path, env):
    repo, _ = make_repo(tmp_path, env)
    dvc("remote", "modify", "origin", "url", str(tmp_path / "blocker" / "remote"), cwd=repo, env=env)
    (tmp_path / "blocker").write_text("a file where the remote's parent directory should be")
    store = ckstore.Store(tmp_path / "run", metric="val_loss")
    train(store, steps=(1,), losses=(0.1,))
    pub = store.publish(1, name="one", repo=repo)  # queued; close() must not drop it or its failure
    with pytest.raises(ckstore.DvcError, match="push"):
        store.close()
    assert pub.done()
    with pytest.raises(ckstore.InvalidArgumentError, match="closed"):
        store.save({"w": torch.ones(1)}, step=2)
    with ckstore.Store(tmp_path / "run") as again:  # the lock was released despite the failure
        assert [i.step for i in again.checkpoints()] == [1]


def test_publish_sweeps_an_old_version_a_crash_brought_back(tmp_path, env):
    repo, _ = make_repo(tmp_path, env)
    with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
        train(store, steps=(1, 2), losses=(0.2, 0.1))
        store.publish(1, name="best", repo=repo, wait=True)
        # The swap's removal of the previous version is not fsynced; a power cut can bring it back.
        stale = repo / "models" / ".best.ckstore-old-deadbeef"
        shutil.copytree(repo / "models" / "best", stale)
        other = repo / "models" / ".other.ckstore-old-deadbeef"
        other.mkdir()
        store.publish(2, name="best", repo=repo, wait=True)
    assert not stale.exists()
    assert other.exists()  # another name's leftovers are that name's publish to sweep
    assert os.listdir(repo / "models" / "best" / "checkpoints") == ["step-00000002"]


# ---------------------------------------------------------------- pull never deletes local work (issue 11)


def test_pull_refuses_to_delete_checkpoints_saved_locally_and_a_held_writer_lock(tmp_path, env):
    repo, _ = make_repo(tmp_path, env)
    with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
        train(store, steps=(1,), losses=(0.1,))
        store.publish(1, name="best", repo=repo, wait=True)
    clone = tmp_path / "clone"
    git("clone", "-q", str(repo), str(clone), cwd=tmp_path, env=env)
    assert ck_here("pull", "models/best", cwd=clone).returncode == 0
    assert ck_here("pull", "models/best", cwd=clone).returncode == 0  # pulling the same version again is fine
    pulled = clone / "models" / "best"
    with ckstore.Store(pulled, metric="val_loss") as writer:  # fine-tuning from the pulled model
        state = writer.load()
        writer.save(state, step=2, metrics={"val_loss": 0.05})
        # While the writer holds the store: refused, whatever is in it.
        proc = ck_here("pull", "models/best", cwd=clone)
        assert proc.returncode == 2 and "--force" in proc.stderr and "a writer (pid" in proc.stderr, proc.stderr
        assert "readonly=" not in proc.stderr and "lock_timeout=" not in proc.stderr
    assert sorted(os.listdir(pulled / "checkpoints")) == ["step-00000001", "step-00000002"]
    # The writer is gone, but step 2 is local work no published version has: refused, named.
    proc = ck_here("pull", "models/best", cwd=clone)
    assert proc.returncode == 2 and "step-00000002" in proc.stderr and "--force" in proc.stderr, proc.stderr
    assert sorted(os.listdir(pulled / "checkpoints")) == ["step-00000001", "step-00000002"]
    with ckstore.Store(pulled, readonly=True) as reader:
        assert reader.verify() == []
    # --force replaces it with the published version.
    assert ck_here("pull", "models/best", "--force", cwd=clone).returncode == 0
    assert sorted(os.listdir(pulled / "checkpoints")) == ["step-00000001"]


# ---------------------------------------------------------------- publishing from a shell during training (issue 11)

TRAINER_SCRIPT = textwrap.dedent("""
    import sys, time, torch, ckstore
    store_dir, seconds = sys.argv[1], float(sys.argv[2])
    with ckstore.Store(store_dir, keep_last=1, metric="loss") as store:
        step = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            step += 1
            store.save({"w": torch.full((256,), float(step))}, step=step, metrics={"loss": 1.0 / step})
            if step == 3:
                print("training", flush=True)
        print("done", step, flush=True)
""")


def test_cli_publish_works_while_training_holds_the_store_and_its_retention_honours_the_pin(tmp_path, env):
    repo, _ = make_repo(tmp_path, env)
    store_dir = repo / "runs" / "exp1"
    (repo / ".gitignore").write_text("/runs/\n")
    trainer = subprocess.Popen([PYTHON, "-c", TRAINER_SCRIPT, str(store_dir), "25"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout.readline().strip() == "training"
        # keep_last=1 deletes every older step while the shell publishes "the latest so far".
        out = ck("publish", "runs/exp1", "latest", "--name", "last", "--json", cwd=repo, env=env)
        published = json.loads(out.stdout)["step"]
        with ckstore.Store(store_dir, readonly=True) as reader:
            assert reader.resolve("published.last").step == published  # pinned: the trainer's retention kept it
        assert trainer.poll() is None, "the trainer stopped while the shell published"
    finally:
        stdout, stderr = trainer.communicate(timeout=120)
    assert trainer.returncode == 0, stderr
    last = int(stdout.split()[-1])
    assert last > published
    with ckstore.Store(store_dir, readonly=True) as reader:
        assert [i.step for i in reader.checkpoints()] == [published, last]
    clone = tmp_path / "clone"
    git("clone", "-q", str(repo), str(clone), cwd=tmp_path, env=env)
    assert ck_here("pull", "models/last", cwd=clone).returncode == 0


def test_cli_lock_errors_name_cli_options(tmp_path, env):
    repo, _ = make_repo(tmp_path, env)
    with ckstore.Store(repo / "runs" / "exp1", metric="val_loss") as store:
        train(store, steps=(1,), losses=(0.1,))
        proc = ck_here("gc", "runs/exp1", "--keep-last", "1", cwd=repo)
        assert proc.returncode == 2 and "--wait" in proc.stderr, proc.stderr
        assert "lock_timeout=" not in proc.stderr and "readonly=" not in proc.stderr


# ---------------------------------------------------------------- publishing from the loop as the best moves (issue 11)


def test_publishing_the_moving_best_from_the_loop_supersedes_queued_publishes_and_never_fails(tmp_path, env):
    import threading

    repo, _ = make_repo(tmp_path, env)
    gate = threading.Event()

    def hold_first(stage, phase, info):
        if (stage, phase, info["step"]) == ("materialize", "before", 1):
            assert gate.wait(120)

    previous = _dvc.set_stage_hook(hold_first)
    try:
        with ckstore.Store(tmp_path / "run", keep_last=1, metric="loss") as store:
            publications = []
            for step in range(1, 6):  # the README's loop: publish the best as it moves
                store.save({"w": torch.full((64,), float(step))}, step=step, metrics={"loss": 1.0 / step})
                publications.append(store.publish("best", name="best", repo=repo))
            gate.set()
            results = [p.result(timeout=300) for p in publications]
            store.publish("best", name="best", repo=repo, wait=True)  # nothing failed unseen either
            # Only 5 is pinned now (the running publish's pin on 1 was removed when it finished):
            # retention keeps nothing else.
            assert {t: i.step for i in store.checkpoints() for t in i.tags} == {"published.best": 5}
            store.gc()
            assert [i.step for i in store.checkpoints()] == [5]
    finally:
        _dvc.set_stage_hook(previous)
    # The first was running when the best moved: pinned until done, published. 2-4 were superseded
    # by 5 while queued: their result is 5's.
    assert [r.step for r in results] == [1, 5, 5, 5, 5]
    assert results[0].tag == "best@v1.0.0" and results[-1].tag == "best@v2.0.0"
    assert git("tag", "--list", cwd=repo, env=env).split() == ["best@v1.0.0", "best@v2.0.0"]


def test_version_tags_stay_distinct_across_dest(tmp_path, env):
    repo, _ = make_repo(tmp_path, env)
    with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
        train(store)
        assert store.publish(10, name="best", repo=repo, wait=True).result().tag == "best@v1.0.0"
        assert store.publish(20, name="best", repo=repo, dest="exports", wait=True).result().tag == "exports/best@v1.0.0"
        assert store.publish(30, name="best", repo=repo, wait=True).result().tag == "best@v2.0.0"
    assert sorted(git("tag", "--list", cwd=repo, env=env).split()) == ["best@v1.0.0", "best@v2.0.0", "exports/best@v1.0.0"]
    show = git("show", "-s", "--format=%B", "exports/best@v1.0.0^{commit}", cwd=repo, env=env)
    assert "Ckstore-Dvc-File: exports/best.dvc" in show



def test_a_version_tag_with_non_ascii_digits_is_not_a_version(tmp_path, env):
    """``best@v١٠٠`` (Arabic-Indic digits, made by hand) is not version 100: the next publish is v1, not v101."""
    repo, _ = make_repo(tmp_path, env)
    git("commit", "--allow-empty", "-q", "-m", "hand-made tag", cwd=repo, env=env)
    git("tag", "-a", "best@v\u0661\u0660\u0660", "-m", "by hand", cwd=repo, env=env)
    with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
        train(store)
        assert store.publish(10, name="best", repo=repo, wait=True).result().tag == "best@v1.0.0"

FORK_SCRIPT = textwrap.dedent("""
    import os, sys, threading, time, torch, ckstore
    from ckstore.integrations.dvc import publish as _dvc
    store_dir, repo = sys.argv[1:3]
    started, gate = threading.Event(), threading.Event()
    def hook(stage, phase, info):
        if (stage, phase) == ("materialize", "before"):
            started.set()
            gate.wait(60)
    _dvc.set_stage_hook(hook)
    store = ckstore.Store(store_dir)
    store.save({"w": torch.zeros(4)}, step=1)
    publication = store.publish(1, name="best", repo=repo)
    started.wait(60)
    pid = os.fork()
    if pid == 0:
        sys.exit(0)  # a normal exit: atexit handlers, thread joins, open stores closed
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        print("child hung at exit", flush=True)
        status = -1
    gate.set()
    print("child exit", os.waitstatus_to_exitcode(status) if status != -1 else "hung", flush=True)
    print("parent published", publication.result().tag, flush=True)
    store.close()
""")


def test_a_child_forked_while_a_publish_is_in_flight_exits_normally(tmp_path, env):
    repo, _ = make_repo(tmp_path, env)
    proc = run([PYTHON, "-c", FORK_SCRIPT, str(tmp_path / "run"), str(repo)], tmp_path, env)
    assert "child exit 0" in proc.stdout, proc.stdout + proc.stderr
    assert "parent published best@v1.0.0" in proc.stdout
