"""Gaps found auditing issue 11 (continuing safely after a fallback or rollback)."""

from __future__ import annotations

import os
import re
import warnings

import pytest
import torch

import ckstore
from ckstore.checkpoint.tagfile import read_tags
from conftest import REPO_ROOT


def test_docs_state_the_retention_rule_quarantine_strict_loads_and_read_faults():
    """Issue 11's "Done when": the reference says each of these (issue 12 moved it from the README into docs/)."""
    guarantees = (REPO_ROOT / "docs" / "guarantees.md").read_text()
    api = (REPO_ROOT / "docs" / "api.md").read_text()
    assert "## Retention, rollback and the quarantine" in guarantees
    assert "## Strict loads" in api
    assert "`.quarantine/" in guarantees and "ckstore quarantine PATH --empty" in guarantees
    assert "### G5: A read fault falls back too" in guarantees and "CheckpointReadError" in guarantees
    readme = (REPO_ROOT / "README.md").read_text()
    assert "(docs/guarantees.md)" in readme and "(docs/api.md)" in readme


# ---------------------------------------------------------------- a malformed committed step N, saved again


def test_tag_of_a_step_whose_manifest_is_a_directory_survives_recovery_and_goes_to_the_quarantine_note(tmp_path):
    """Recovery prunes tags of vanished steps; a malformed step is not vanished (its tag is recorded when it is quarantined)."""
    root = tmp_path / "s"
    store = ckstore.Store(root)
    store.save({"w": torch.zeros(2)}, step=1)
    store.save({"w": torch.zeros(2)}, step=2, tags=["keep"])
    store.close()
    manifest = root / "checkpoints" / "step-00000002" / "manifest.json"
    manifest.unlink()
    manifest.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ckstore.CorruptCheckpointWarning)
        store = ckstore.Store(root)
        store.gc()  # the first write runs recovery, which prunes tags of steps that are gone
        assert {t: e.step for t, e in read_tags(str(root / "tags.json")).items()} == {"keep": 2}
        store.save({"w": torch.ones(2)}, step=2)  # quarantines the malformed step 2 and proceeds
    [entry] = store.quarantine()
    assert entry.step == 2 and entry.tags == ("keep",)
    assert (entry.path / "manifest.json").is_dir()  # moved aside whole, not deleted
    assert [i.step for i in store.checkpoints()] == [1, 2]
    store.close()


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_saving_over_a_step_whose_manifest_is_not_a_file_quarantines_it(tmp_path, kind):
    root = tmp_path / "s"
    store = ckstore.Store(root)
    store.save({"w": torch.zeros(2)}, step=1)
    manifest = root / "checkpoints" / "step-00000001" / "manifest.json"
    manifest.unlink()
    manifest.mkdir() if kind == "directory" else os.mkfifo(manifest)
    with pytest.warns(ckstore.CorruptCheckpointWarning, match="quarantine"):
        info = store.save({"w": torch.ones(2)}, step=1)
    assert info.step == 1 and [e.step for e in store.quarantine()] == [1]
    assert torch.equal(store.load(step=1)["w"], torch.ones(2))
    store.close()


# ---------------------------------------------------------------- best() and a checkpoint known to be corrupt


def _flip_a_tensor_byte(info: ckstore.CheckpointInfo) -> None:
    [tensor_file] = [p for p in info.path.iterdir() if p.name != "manifest.json"]
    data = bytearray(tensor_file.read_bytes())
    data[-1] ^= 0xFF
    tensor_file.write_bytes(bytes(data))


def _two_ranked(tmp_path):
    store = ckstore.Store(tmp_path / "s", metric="loss", mode="min")
    store.save({"w": torch.full((4,), 1.0)}, step=1, metrics={"loss": 0.5})
    store.save({"w": torch.full((4,), 2.0)}, step=2, metrics={"loss": 0.1})  # the best
    _flip_a_tensor_byte(store.resolve(2))
    return store


@pytest.mark.guarantee("G4")
def test_load_best_falls_back_to_the_next_best_that_loads(tmp_path):
    store = _two_ranked(tmp_path)
    with pytest.warns(ckstore.CorruptCheckpointWarning, match="step 2"):
        state = store.load(step="best")
    assert torch.equal(state["w"], torch.full((4,), 1.0))
    store.close()


def test_best_skips_a_checkpoint_this_store_saw_fail(tmp_path):
    store = _two_ranked(tmp_path)
    with pytest.raises(ckstore.IntegrityError):
        store.load(step=2)  # asked for by number: the error, no fallback
    assert store.best().step == 1
    store.close()


def test_load_best_when_no_ranked_checkpoint_loads_is_a_typed_error_naming_each(tmp_path):
    store = _two_ranked(tmp_path)
    _flip_a_tensor_byte(store.resolve(1))
    with pytest.warns(ckstore.CorruptCheckpointWarning), pytest.raises(ckstore.CheckpointNotFoundError, match="step 1.*step 2|step 2.*step 1"):
        store.load(step="best")
    store.close()


# ---------------------------------------------------------------- CLI errors speak in CLI options

_PYTHON_SPEAK = re.compile(r"\b(metric|keep_last|keep_best|keep_every|lock_timeout|readonly|trust_foreign|repo|force|strict|mode)=")


def _cli(capsys, *argv) -> tuple[int, str]:
    from ckstore.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own refusal: exit 2 with usage
        code = exc.code
    return code, capsys.readouterr().err


@pytest.fixture
def unranked(tmp_path):
    root = tmp_path / "s"
    with ckstore.Store(root) as store:
        store.save({"w": torch.zeros(2)}, step=1)
    return root


@pytest.mark.parametrize(
    "argv, option",
    [
        (["gc", "{s}", "--keep-best", "2"], "--metric"),
        (["gc", "{s}", "--keep-last", "0"], "--keep-last"),
        (["gc", "{s}", "--keep-every", "-3"], "--keep-every"),
        (["gc", "{s}", "--keep-best", "1", "--metric", ""], "--metric"),
        (["gc", "{s}", "--wait", "-1"], "--wait"),
        (["tag", "{s}", "x", "1", "--wait", "-1"], "--wait"),
        (["gc", "{s}", "--wait", "nan"], "--wait"),
        (["show", "{s}", "best"], "--metric"),
        (["tag", "{s}", "good", "best"], "--metric"),
    ],
)
def test_cli_errors_name_cli_options_not_python_arguments(capsys, unranked, argv, option):
    code, err = _cli(capsys, *(a.format(s=unranked) for a in argv))
    assert code == 2
    assert "Traceback" not in err
    assert option in err, err
    assert not _PYTHON_SPEAK.search(err), err


def test_cli_error_without_a_dvc_repo_names_repo_option(capsys, unranked, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no DVC repository above the store or here
    code, err = _cli(capsys, "gc", unranked, "--dvc")
    assert code == 2 and "--repo" in err and not _PYTHON_SPEAK.search(err), err


# ---------------------------------------------------------------- a fresh writer never gives an unverified corrupt checkpoint a slot


def _flip_tensor_byte_of(root, step: int) -> None:
    directory = root / "checkpoints" / f"step-{step:08d}"
    [tensor_file] = [p for p in directory.iterdir() if p.name != "manifest.json"]
    data = bytearray(tensor_file.read_bytes())
    data[-1] ^= 0xFF
    tensor_file.write_bytes(bytes(data))


@pytest.mark.guarantee("G6")
@pytest.mark.parametrize("policy", [{"keep_last": 2}, {"keep_best": 1, "metric": "loss"}])
def test_a_fresh_store_that_saves_without_loading_never_deletes_past_a_corrupt_checkpoint(tmp_path, policy):
    """Found by the fault-injection tier's corrupt_continue workload: a fresh Store(keep_last=2) that saved without
    loading first counted the bit-rotted newest step 20 as kept and deleted step 10, the only one that verifies."""
    root = tmp_path / "s"
    with ckstore.Store(root) as store:
        store.save({"w": torch.full((4,), 10.0)}, step=10, metrics={"loss": 0.5})
        store.save({"w": torch.full((4,), 20.0)}, step=20, metrics={"loss": 0.1})
    _flip_tensor_byte_of(root, 20)
    with ckstore.Store(root, **policy) as store, warnings.catch_warnings():
        warnings.simplefilter("ignore", ckstore.CorruptCheckpointWarning)
        store.save({"w": torch.full((4,), 21.0)}, step=21, metrics={"loss": 0.9})
        steps = [i.step for i in store.checkpoints()]
        assert 10 in steps, f"the last checkpoint that verifies was deleted: {steps}"
        assert 20 in steps  # failed verification: never deleted
        store.save({"w": torch.full((4,), 22.0)}, step=22, metrics={"loss": 0.8})
        steps = [i.step for i in store.checkpoints()]
    expected = {"keep_last": [20, 21, 22], "keep_best": [10, 20, 22]}[next(iter(policy))]
    assert steps == expected


# ---------------------------------------------------------------- no untyped exception from the public API


@pytest.mark.parametrize("location", ["nodevice", "cuda:7", {"cpu": "warp:0"}, lambda saved: "nodevice"])
def test_a_bad_map_location_is_a_state_error_not_a_corrupt_checkpoint(tmp_path, location):
    """A map_location the machine cannot honour is the caller's mistake: a StateError raised at once, never a
    ManifestError that makes load() skip every good checkpoint as corrupt (or a raw AssertionError from torch)."""
    with ckstore.Store(tmp_path / "s") as store:
        store.save({"w": torch.ones(2)}, step=1)
        store.save({"w": torch.ones(2) * 2}, step=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ckstore.CorruptCheckpointWarning)  # no checkpoint is skipped as corrupt
            with pytest.raises(ckstore.StateError, match="map_location"):
                store.load(step=1, map_location=location)
            with pytest.raises(ckstore.StateError, match="map_location"):
                store.load(map_location=location)
            assert float(store.load()["w"][0]) == 2.0


@pytest.mark.parametrize("path", ["a\0b", b"/tmp/x", 3, None])
def test_a_store_path_that_is_not_text_is_a_typed_error(path):
    with pytest.raises(ckstore.InvalidArgumentError, match="path"):
        ckstore.Store(path)


@pytest.mark.parametrize("timeout", ["x", -1, float("nan"), True])
def test_a_bad_lock_timeout_is_refused_when_the_store_is_opened(tmp_path, timeout):
    """Not at the first write, minutes into a run."""
    with pytest.raises(ckstore.InvalidArgumentError, match="lock_timeout"):
        ckstore.Store(tmp_path / "s", lock_timeout=timeout)
    assert not (tmp_path / "s").exists()


def test_gc_with_a_policy_that_is_not_a_retention_policy_is_a_typed_error(tmp_path):
    with ckstore.Store(tmp_path / "s") as store:
        store.save({"w": torch.ones(2)}, step=1)
        with pytest.raises(ckstore.InvalidArgumentError, match="RetentionPolicy"):
            store.gc(policy={"keep_last": 1})
        assert [i.step for i in store.checkpoints()] == [1]


def test_tagging_a_step_whose_manifest_is_a_directory_is_refused_before_the_tag_is_written(tmp_path):
    """The checkpoint is there but malformed: a ManifestError naming the file (not "no checkpoint"), and no tag."""
    root = tmp_path / "s"
    with ckstore.Store(root) as store:
        store.save({"w": torch.zeros(2)}, step=1)
        manifest = root / "checkpoints" / "step-00000001" / "manifest.json"
        manifest.unlink()
        manifest.mkdir()
        with pytest.raises(ckstore.ManifestError, match="manifest"):
            store.tag(1, "pinned")
        assert read_tags(str(root / "tags.json")) == {}


@pytest.mark.parametrize("how", ["load", "verify"])
def test_retention_does_not_hash_again_what_a_verified_load_or_verify_just_checked(tmp_path, how):
    """After resume()/load() (or a clean verify()) the first pruning save must not re-read the checkpoint's
    tensor files: they were hashed moments ago by this Store. Only the slot holders nobody checked are read."""
    from ckstore.storage import safeio as _safeio

    path = tmp_path / "s"
    with ckstore.Store(path) as s:
        for step in (1, 2):
            s.save({"w": torch.full((1024,), float(step))}, step=step)
    with ckstore.Store(path, keep_last=2) as s:
        if how == "load":
            s.load({"w": torch.zeros(1024)})
        else:
            assert s.verify(2) == []
        opened: list[str] = []
        with _safeio.hooked(lambda op, p, info: opened.append(p) if op == "open" else None):
            s.save({"w": torch.full((1024,), 3.0)}, step=3)
        assert [c.step for c in s.checkpoints()] == [2, 3]
    reread = [p for p in opened if "step-00000002" in p and p.endswith(".safetensors")]
    assert reread == [], reread


def test_a_checkpoint_that_verifies_after_a_transient_read_error_gets_its_retention_slot_back(tmp_path):
    """A read error once (EIO) marks a checkpoint corrupt for this Store; a later clean verify() clears it,
    so it holds its keep_last slot again instead of keeping an older one alive beside it."""
    import errno

    from ckstore.storage import safeio as _safeio

    path = tmp_path / "s"
    with ckstore.Store(path) as s:
        for step in (1, 2):
            s.save({"w": torch.full((8,), float(step))}, step=step)
    with ckstore.Store(path, keep_last=2) as s:

        def eio(op, p, info):
            if op == "read" and "step-00000002" in p and p.endswith(".safetensors"):
                raise OSError(errno.EIO, "injected", p)

        with _safeio.hooked(eio), pytest.warns(ckstore.CorruptCheckpointWarning):
            assert s.load()["w"][0] == 1.0  # fell back past the read error
        assert s.verify(2) == []
        s.save({"w": torch.full((8,), 3.0)}, step=3)
        assert [c.step for c in s.checkpoints()] == [2, 3]
