"""Gaps found auditing issue 16 (untrusted stores): one reader, one escaper, ASCII-only step names."""

from __future__ import annotations

import errno
import re

import pytest
import torch

import ckstore
from ckstore.storage import safeio as _safeio
from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "ckstore"


# ---------------------------------------------------------------- one no-follow reader


def test_metrics_log_and_quarantine_notes_read_only_through_safeio():
    """metrics.json and the quarantine notes are read through _safeio, not by a reader of their own.

    Two private copies of the no-follow, non-blocking, capped open would drift
    apart and escape the readfaults tier's hook. The scan checks itself: _safeio matches.
    """
    pattern = re.compile(r"\bos\.(open|read|readv|pread|preadv)\(|(?<![\w.])open\(")
    assert pattern.search((PACKAGE / "storage/safeio.py").read_text())
    for name in ("checkpoint/metrics_log.py", "checkpoint/quarantine.py"):
        offenders = [line.strip() for line in (PACKAGE / name).read_text().splitlines() if pattern.search(line) and not line.lstrip().startswith("#")]
        assert not offenders, f"{name} reads files itself: {offenders}"


def _eio_on(suffix: str, seen: list[str]):
    def hook(op: str, path: str, info: dict) -> None:
        seen.append(path)
        if op == "open" and path.endswith(suffix):
            raise OSError(errno.EIO, "Input/output error", path)

    return hook


def test_metrics_json_read_fault_is_typed_and_seen_by_the_read_hook(tmp_path):
    store = ckstore.Store(tmp_path / "s")
    store.save({"w": torch.zeros(2)}, step=1)
    store.record_metrics(1, {"val": 0.5})
    seen: list[str] = []
    with _safeio.hooked(_eio_on("metrics.json", seen)):
        with pytest.raises(ckstore.CheckpointReadError) as info:
            store.record_metrics(1, {"other": 1.0})
    assert info.value.errno == errno.EIO and str(info.value.path).endswith("metrics.json")
    assert any(p.endswith("metrics.json") for p in seen)
    # Listing still works (the recorded metrics are dropped with a warning, not the checkpoints).
    with _safeio.hooked(_eio_on("metrics.json", [])), pytest.warns(ckstore.CorruptCheckpointWarning):
        assert [i.step for i in store.checkpoints()] == [1]
    store.close()


def test_quarantine_note_is_read_through_safeio(tmp_path):
    store = ckstore.Store(tmp_path / "s")
    store.save({"w": torch.zeros(2)}, step=1)
    (store.resolve(1).path / "manifest.json").write_text("{}")  # corrupt: the next save of step 1 quarantines it
    with pytest.warns(ckstore.CorruptCheckpointWarning):
        store.save({"w": torch.ones(2)}, step=1)
    [entry] = store.quarantine()
    assert entry.reason == "failed verification"
    seen: list[str] = []
    with _safeio.hooked(_eio_on(".json", seen)):
        [faulted] = store.quarantine()
    assert any(p == f"{entry.path}.json" for p in seen), seen
    assert faulted.reason.startswith("unknown")  # an unreadable note leaves the entry listed, without its note
    store.close()


# ---------------------------------------------------------------- one escaper


def test_one_implementation_escapes_control_characters():
    """Output escaping lives in ckstore/format/text.py only (the lock owner's host used a second copy in _safeio)."""
    assert not hasattr(_safeio, "escape_control")
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).as_posix() == "format/text.py":
            continue
        assert "unicode_escape" not in path.read_text(), f"{path.name} escapes control characters itself"


# ---------------------------------------------------------------- ASCII digits only


@pytest.mark.parametrize("every", ["\u0661\u0660min", "1\u0660s", "\uff15s"])  # Arabic-Indic and fullwidth digits
def test_checkpointer_duration_takes_ascii_digits_only(tmp_path, every):
    with ckstore.Store(tmp_path / "s") as store, pytest.raises(ckstore.InvalidArgumentError, match="duration"):
        ckstore.Checkpointer(store, {"w": torch.zeros(2)}, every=every, signals=())


# ---------------------------------------------------------------- verification hashes through a fixed buffer


def test_verify_hashes_a_large_tensor_file_in_bounded_memory(tmp_path):
    """Issue 16, "What must hold" 2: verification's memory does not grow with the file (a 256 MiB file, < 32 MiB traced)."""
    import tracemalloc

    with ckstore.Store(tmp_path / "s") as store:
        store.save({"w": torch.zeros(64 << 20, dtype=torch.float32)}, step=1)
    with ckstore.Store(tmp_path / "s", readonly=True) as reader:
        reader.checkpoints()
        tracemalloc.start()
        try:
            problems = reader.verify(1)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert problems == []
    assert peak < 32 << 20, f"verify() allocated {peak >> 20} MiB for a 256 MiB file"


@pytest.mark.parametrize("name", ["step-\u0661", "step-0000000\u0661", "step-\uff11"])
def test_pull_refuses_a_directory_object_whose_step_has_non_ascii_digits(name):
    """The store never lists "step-١" (ASCII digits only), so pull must not install one as if it were step 1."""
    from ckstore.integrations.dvc.pull import _one_checkpoint

    assert _one_checkpoint({"checkpoints/step-00000001/manifest.json": "0" * 32}, "models/x.dvc") == "step-00000001"
    with pytest.raises(ckstore.DvcError, match="one-checkpoint"):
        _one_checkpoint({f"checkpoints/{name}/manifest.json": "0" * 32}, "models/x.dvc")


@pytest.mark.parametrize("step", ["\u0661", "\u00b2", "\uff11"])  # Arabic-Indic one, superscript two, fullwidth one
def test_cli_publish_does_not_take_non_ascii_digits_for_a_step_number(tmp_path, capsys, step):
    from ckstore.cli import main

    with ckstore.Store(tmp_path / "s") as store:
        store.save({"w": torch.zeros(2)}, step=1)
    assert main(["publish", str(tmp_path / "s"), step, "--repo", str(tmp_path / "norepo")]) == 2
    err = capsys.readouterr().err
    assert "step number" not in err, err


def test_cli_publish_of_a_store_others_can_write_names_an_option_publish_takes(tmp_path, capsys):
    """The refusal advised --trust-foreign, which `ckstore publish` did not accept."""
    from ckstore.cli import main

    root = tmp_path / "s"
    with ckstore.Store(root) as store:
        store.save({"w": torch.zeros(2)}, step=1)
    root.chmod(0o777)  # world-writable, no sticky bit: refused for writing (publish pins the step with a tag)
    argv = ["publish", str(root), "1", "--name", "m", "--repo", str(tmp_path / "norepo")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--trust-foreign" in err, err
    assert main([*argv, "--trust-foreign"]) == 2  # the option exists and passes the check: the next error is the missing repo
    err = capsys.readouterr().err
    assert "not a DVC repository" in err and "trust" not in err, err
