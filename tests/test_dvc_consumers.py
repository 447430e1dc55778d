"""DVC for consumers of published models (issue 15): reading never modifies, ``pull --rev``,
``dvc.yaml`` artifacts, GTO-parseable version tags, weights-only publishing at a stable path.

Real git + DVC repositories with a local directory remote, as in ``test_dvc``; the consumer side
runs the plain commands a DVC user types (``dvc import``, ``dvc artifacts get``, ``dvc status``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from pathlib import Path

import pytest
import torch
from test_dvc import ck_here, dvc, env, git, make_repo, run, train  # noqa: F401  (env is a fixture)

import ckstore
from ckstore.integrations.dvc import publish as _dvc

pytest.importorskip("dvc.repo", reason="DVC is an optional extra: pip install 'ckstore[dvc]'")
pytestmark = pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")


def tree(root: Path, *, skip: tuple[str, ...] = (".git", os.path.join(".dvc", "tmp"))) -> dict[str, str]:
    """Every file and directory under ``root`` (but ``skip``) with a digest of its bytes: what "never modified" compares."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if any(rel == s or rel.startswith(s + os.sep) for s in skip):
            continue
        found[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def read_everything(model_dir: Path, cwd: Path) -> None:
    """What a consumer does with a model directory: open it (writable, the default), load, list, show, verify."""
    with ckstore.Store(model_dir) as store:
        assert store.checkpoints() and store.verify() == []
        state = store.load()
        assert state["model"]["weight"].shape == (3, 6)
        store.tensor_keys()
    for args in (["ls", str(model_dir)], ["show", str(model_dir), "latest"], ["verify", str(model_dir)]):
        proc = ck_here(*args, "--json", cwd=cwd)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)


def assert_dvc_clean(cwd: Path, env: dict[str, str], *targets: str) -> None:
    out = dvc("status", *targets, cwd=cwd, env=env).stdout
    assert "up to date" in out.lower(), out


# ---------------------------------------------------------------- reading a store never modifies it


@pytest.mark.guarantee("G19")
def test_a_pulled_or_dvc_imported_model_opens_loads_and_verifies_without_creating_a_file(tmp_path, env):
    repo, _ = make_repo(tmp_path, env)
    with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
        train(store)
        store.publish("best", name="best", repo=repo, wait=True)

    # A clone that pulled the model with ckstore.
    clone = tmp_path / "clone"
    git("clone", "-q", str(repo), str(clone), cwd=tmp_path, env=env)
    assert ck_here("pull", "models/best", cwd=clone).returncode == 0
    before = tree(clone)
    read_everything(clone / "models" / "best", clone)
    assert tree(clone) == before
    assert_dvc_clean(clone, env)

    # A consumer repository that imported it with plain DVC: no ckstore patterns in its .dvcignore,
    # so a lock or staging file written into the directory would show as a change.
    consumer = tmp_path / "consumer"
    consumer.mkdir()
    git("init", "-q", "-b", "main", cwd=consumer, env=env)
    dvc("init", "-q", cwd=consumer, env=env)
    dvc("import", str(repo), "models/best", "-o", "best", cwd=consumer, env=env)
    assert "ckstore" not in (consumer / ".dvcignore").read_text()
    before = tree(consumer)
    read_everything(consumer / "best", consumer)
    assert tree(consumer) == before
    assert_dvc_clean(consumer, env)


# ---------------------------------------------------------------- version tags GTO parses


def test_version_tags_are_gto_semver_and_old_tags_keep_their_number(tmp_path, env):
    from gto.constants import tag_re

    repo, _ = make_repo(tmp_path, env)
    # A repository published before semver tags: best@v1 and best@v2 (annotated), as earlier releases made them.
    for k in (1, 2):
        git("commit", "--allow-empty", "-q", "-m", f"old publish {k}", cwd=repo, env=env)
        git("tag", "-a", f"best@v{k}", "-m", "ckstore publish best", cwd=repo, env=env)
    with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
        train(store)
        first = store.publish(10, name="best", repo=repo, wait=True).result()
        again = store.publish(10, name="best", repo=repo, wait=True).result()
        second = store.publish(30, name="best", repo=repo, dest="exports", wait=True).result()
    assert first.tag == "best@v3.0.0" and again.tag == first.tag
    assert second.tag == "exports/best@v1.0.0"
    for tag, artifact, version in ((first.tag, "best", "v3.0.0"), (second.tag, "exports/best", "v1.0.0")):
        match = tag_re.fullmatch(tag)
        assert match and (match["artifact"], match["version"]) == (artifact, version), tag
    # Annotated, on the commit that holds the .dvc file: what GTO (and dvc artifacts) resolve.
    assert git("cat-file", "-t", first.tag, cwd=repo, env=env).strip() == "tag"
    assert git("rev-parse", f"{first.tag}^{{commit}}", cwd=repo, env=env).strip() == first.commit
    # Another dest's name is the artifact <dest>/<name>, which dvc artifacts get resolves through its tag.
    assert second.artifact == "exports/best"
    dvc("artifacts", "get", str(repo), "exports/best", "-o", "got", cwd=tmp_path, env=env)
    with ckstore.Store(tmp_path / "got", readonly=True) as got:
        assert [i.step for i in got.checkpoints()] == [30] and got.verify() == []


# ---------------------------------------------------------------- dvc.yaml artifacts


@pytest.mark.guarantee("G19")
def test_each_published_name_is_a_dvc_artifact_that_dvc_artifacts_get_fetches_by_version(tmp_path, env):
    repo, _ = make_repo(tmp_path, env)
    with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
        train(store)
        v1 = store.publish(10, name="best", repo=repo, wait=True).result()
        v2 = store.publish(30, name="best", repo=repo, wait=True).result()
        expected = {step: store.load(step=step)["model"]["weight"] for step in (10, 30)}
    from ruamel.yaml import YAML

    artifacts = YAML(typ="safe").load((repo / "dvc.yaml").read_text())["artifacts"]
    assert artifacts["best"]["path"] == "models/best" and artifacts["best"]["type"] == "model"
    assert "ckstore" in artifacts["best"]["labels"]
    assert git("status", "--porcelain", cwd=repo, env=env).strip() == ""
    assert "dvc.yaml" in git("show", "--name-only", "--format=", v1.commit, cwd=repo, env=env).split()
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        assert dvc_repo.artifacts.get_rev("best") == v2.commit  # the greatest semver tag
        assert dvc_repo.artifacts.get_rev("best", version="v1.0.0") == v1.commit

    # The real `dvc artifacts get` from another directory, by version and (no version) the newest.
    out = tmp_path / "fetched"
    out.mkdir()
    dvc("artifacts", "get", str(repo), "best", "--rev", "v1.0.0", "-o", "v1", cwd=out, env=env)
    dvc("artifacts", "get", str(repo), "best", "-o", "newest", cwd=out, env=env)
    for sub, step in (("v1", 10), ("newest", 30)):
        before = tree(out / sub)
        with ckstore.Store(out / sub) as got:
            assert [i.step for i in got.checkpoints()] == [step] and got.verify() == []
            assert torch.equal(got.load()["model"]["weight"], expected[step])
        assert tree(out / sub) == before


#: A publish SIGKILLed while it replaces ``dvc.yaml`` (the temp file is written and synced, not yet renamed).
KILL_AT_DVC_YAML = """
import os, signal, sys
import ckstore
from ckstore.storage import durable

def hook(op, phase, path, info):
    if op == "rename" and phase == "before" and info.get("site") == "publish_dvc_yaml":
        os.kill(os.getpid(), signal.SIGKILL)

durable.set_hook(hook)
with ckstore.Store(sys.argv[1]) as store:
    store.publish(int(sys.argv[3]), name="best", repo=sys.argv[2], wait=True)
"""


@pytest.mark.guarantee("G19")
@pytest.mark.parametrize("finish", ["recover", "publish"])
def test_a_publish_killed_while_replacing_dvc_yaml_leaves_no_temp_file_after_recovery(tmp_path, env, finish):
    """The killed publish leaves ``.dvc.yaml.tmp-<hex>``: an untracked file in the user's git work tree
    until publish recovery (``--recover`` or the next publish) removes it, as it does the other temp files."""
    import signal
    import sys

    repo, _ = make_repo(tmp_path, env)
    with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
        train(store, steps=(10,), losses=(0.5,))
    proc = run([sys.executable, "-c", KILL_AT_DVC_YAML, str(tmp_path / "run"), str(repo), "10"], tmp_path, env, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert [n for n in os.listdir(repo) if n.startswith(".dvc.yaml.tmp-")], "the kill did not land inside the dvc.yaml replace"
    if finish == "recover":
        out = ck_here("publish", str(tmp_path / "run"), "--recover", "--repo", str(repo), "--json", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert [r["step"] for r in json.loads(out.stdout)["recovered"]] == [10]
    else:
        with ckstore.Store(tmp_path / "run") as store:
            assert store.publish(10, name="best", repo=repo, wait=True).result().step == 10
    assert [n for n in os.listdir(repo) if ".tmp-" in n] == []
    assert git("status", "--porcelain", "--untracked-files=all", cwd=repo, env=env).strip() == ""
    assert "Ckstore-Step: 10" in git("log", "-1", "--format=%B", "--", "dvc.yaml", cwd=repo, env=env)


# ---------------------------------------------------------------- pull --rev


@pytest.mark.guarantee("G19")
def test_pull_rev_installs_the_version_a_tag_names_verified_and_dvc_agrees(tmp_path, env):
    repo, _ = make_repo(tmp_path, env)
    with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
        train(store)
        store.publish(10, name="best", repo=repo, wait=True)
        store.publish(30, name="best", repo=repo, wait=True)
    clone = tmp_path / "clone"
    git("clone", "-q", str(repo), str(clone), cwd=tmp_path, env=env)

    proc = ck_here("pull", "models/best", "--rev", "best@v1.0.0", "--json", cwd=clone)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["checked"] == [10]
    assert os.listdir(clone / "models" / "best" / "checkpoints") == ["step-00000010"]
    # The workspace .dvc file is that version's (as `git checkout best@v1.0.0 -- models/best.dvc`): DVC agrees.
    assert (clone / "models" / "best.dvc").read_text() == git("show", "best@v1.0.0:models/best.dvc", cwd=clone, env=env)
    assert_dvc_clean(clone, env)

    # The API, back to the newest by a commit id.
    head = git("rev-parse", "HEAD", cwd=clone, env=env).strip()
    assert _dvc.pull(clone / "models" / "best", rev=head) == clone / "models" / "best"
    with ckstore.Store(clone / "models" / "best", readonly=True) as pulled:
        assert [i.step for i in pulled.checkpoints()] == [30] and pulled.verify() == []
    assert git("status", "--porcelain", cwd=clone, env=env).strip() == ""

    # A revision that does not exist, one without the name, and one that is an option: typed errors naming it.
    with pytest.raises(ckstore.CheckpointNotFoundError, match="nope"):
        _dvc.pull(clone / "models" / "best", rev="nope")
    with pytest.raises(ckstore.CheckpointNotFoundError, match="models/best.dvc"):
        _dvc.pull(clone / "models" / "best", rev=git("rev-list", "--max-parents=0", "HEAD", cwd=clone, env=env).strip())
    from ckstore import cli

    err = io.StringIO()
    with pytest.raises(SystemExit) as exited, contextlib.redirect_stderr(err):
        cli.main(["pull", str(clone / "models" / "best"), "--rev=--output=/tmp/x"])
    assert exited.value.code == 2 and "argument --rev" in err.getvalue(), err.getvalue()
    assert [i.step for i in ckstore.Store(clone / "models" / "best", readonly=True).checkpoints()] == [30]


# ---------------------------------------------------------------- weights-only, at a stable path


def train_with_optimizer(store: ckstore.Store, steps=(10, 20)) -> torch.nn.Module:
    """A small MLP with Adam (optimizer state twice the weights), a tied pair of weights, and a config entry."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.Linear(4, 8, bias=False))
    model[1].weight = model[0].weight  # tied, as a language model's lm_head and embeddings
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for step in steps:
        opt.zero_grad()
        model(torch.arange(8)).square().mean().backward()
        opt.step()
        store.save({"model": model, "optimizer": opt, "config": {"vocab": 8}}, step=step, metrics={"val_loss": 1.0 / step})
    return model


@pytest.mark.guarantee("G19")
def test_weights_only_publish_has_a_stable_weights_path_across_versions(tmp_path, env):
    from safetensors.torch import load as load_safetensors

    import dvc.api

    repo, _ = make_repo(tmp_path, env)
    with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
        model = train_with_optimizer(store)
        full = store.load(step=10)
        v1 = store.publish(10, name="best", repo=repo, wait=True).result()  # a full publish: optimizer included
        v2 = store.publish(20, name="best", repo=repo, weights_only=True, wait=True).result()
        store.save({"net": model}, step=30, metrics={"val_loss": 1.0})
        with pytest.raises(ckstore.InvalidArgumentError, match="'model'"):
            store.publish(30, name="other", repo=repo, weights_only=True, wait=True).result()
        # Without a "model" entry a publish keeps the checkpoint's own files (the layout of earlier releases).
        plain = store.publish(30, name="plain", repo=repo, wait=True).result()
    out = ck_here("publish", str(tmp_path / "run"), "20", "--name", "cli", "--weights-only", "--repo", str(repo), "--json", cwd=tmp_path)
    assert json.loads(out.stdout)["artifact"] == "cli", out.stderr
    assert sorted(os.listdir(repo / "models" / "cli" / "checkpoints" / "step-00000020")) == ["manifest.json", "model.safetensors"]
    published = repo / "models" / "best"
    weights = published / "model.safetensors"
    step_dir = published / "checkpoints" / "step-00000020"
    assert sorted(os.listdir(step_dir)) == ["manifest.json", "model.safetensors"]  # no optimizer file
    assert os.path.samefile(weights, step_dir / "model.safetensors")
    expected = {k: v for k, v in model.state_dict().items()}
    with ckstore.Store(published) as pub:
        state = pub.load()
        assert set(state) == {"model", "config"} and state["config"] == {"vocab": 8}
        fresh = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.Linear(4, 8, bias=False))
        fresh[1].weight = fresh[0].weight
        pub.load({"model": fresh, "config": None})
        assert fresh[0].weight is fresh[1].weight and torch.equal(fresh[0].weight, expected["0.weight"])
        assert pub.verify() == []

    # The stable path, by any consumer, at either version: the weights under their state-dict names.
    at = {}
    for rev in (v1.tag, v2.tag):
        with dvc.api.open("models/best/model.safetensors", repo=str(repo), rev=rev, mode="rb") as fh:
            at[rev] = load_safetensors(fh.read())
    assert set(at[v2.tag]) == {"0.weight"}  # the tied weight is stored once, as save_pretrained does
    assert torch.equal(at[v2.tag]["0.weight"], expected["0.weight"])
    assert torch.equal(at[v1.tag]["0.weight"], full["model"]["0.weight"])
    assert not (repo / "models" / "plain" / "model.safetensors").exists()
    clone = tmp_path / "clone"
    git("clone", "-q", str(repo), str(clone), cwd=tmp_path, env=env)
    assert ck_here("pull", "models/best", "--rev", v1.tag, cwd=clone).returncode == 0
    with ckstore.Store(clone / "models" / "best", readonly=True) as old:
        assert set(old.load()) == {"model", "optimizer", "config"}
    assert ck_here("pull", "models/best", "--rev", v2.tag, cwd=clone).returncode == 0
    pulled = clone / "models" / "best"
    assert os.path.samefile(pulled / "model.safetensors", pulled / "checkpoints" / "step-00000020" / "model.safetensors")
    assert ck_here("pull", "models/plain", cwd=clone).returncode == 0
    with ckstore.Store(clone / "models" / "plain", readonly=True) as other:
        assert other.verify() == [] and set(other.load()) == {"net"}
    assert_dvc_clean(clone, env, "models/best.dvc", "models/plain.dvc")


def test_pull_refuses_a_stable_weights_path_that_is_not_the_checkpoints_file():
    """A crafted directory object whose model.safetensors differs from the checkpoint's is refused before any fetch."""
    from ckstore.integrations.dvc import pull as _pull

    step = "checkpoints/step-00000001/"
    good = {step + "manifest.json": "a" * 32, step + "model.safetensors": "b" * 32}
    assert _pull._one_checkpoint({**good, "model.safetensors": "b" * 32}, "best.dvc") == "step-00000001"
    with pytest.raises(ckstore.DvcError, match="model.safetensors"):
        _pull._one_checkpoint({**good, "model.safetensors": "c" * 32}, "best.dvc")
    with pytest.raises(ckstore.DvcError, match="model.safetensors"):
        _pull._one_checkpoint({step + "manifest.json": "a" * 32, "model.safetensors": "c" * 32}, "best.dvc")


def test_the_artifacts_entry_keeps_what_else_dvc_yaml_holds_and_refuses_aliases(tmp_path):
    from ckstore.integrations.dvc import artifacts

    text = "# my pipeline\nstages:\n  train:\n    cmd: python train.py  # keep me\nartifacts:\n  other:\n    path: data/x\n    type: dataset\n"
    (tmp_path / "dvc.yaml").write_text(text)
    assert artifacts.update(str(tmp_path), "best", artifacts.entry("models/best"))
    new = (tmp_path / "dvc.yaml").read_text()
    assert new.startswith(text.rstrip("\n")) and "  best:\n    path: models/best\n    type: model\n" in new
    assert not artifacts.update(str(tmp_path), "best", artifacts.entry("models/best"))  # unchanged: not rewritten
    from gto.constants import name_re

    names = ("best", "exports/best", "release.1", "a_b-c", "best-", "_x", "a+b/c", "deep/er/best")
    assert [artifacts.artifact_name(n) for n in names] == [n if name_re.fullmatch(n) else None for n in names]
    assert artifacts.artifact_name("release.1") is None and artifacts.artifact_name("exports/best") == "exports/best"
    (tmp_path / "dvc.yaml").write_text("a: &x [1, 2]\nb: *x\n")
    with pytest.raises(ckstore.DvcError, match="aliases"):
        artifacts.update(str(tmp_path), "best", artifacts.entry("models/best"))
    assert (tmp_path / "dvc.yaml").read_text() == "a: &x [1, 2]\nb: *x\n"
