"""The ``ckstore`` command: every command's --help and --json, exit codes, errors; once through the real entry point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import flip_byte, subprocess_env

import ckstore
from ckstore.cli import main

COMMANDS = ["ls", "show", "verify", "tag", "gc"]


@pytest.fixture
def populated(store_path):
    with ckstore.Store(store_path, metric="loss") as store:
        for step, loss in [(1, 0.9), (2, 0.4), (9, 0.5), (10, 0.6)]:
            store.save({"w": torch.full((8,), float(step)), "step": step}, step=step, metrics={"loss": loss}, tags=["first"] if step == 1 else ())
    return store_path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    return code, json.loads(out), err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as excinfo:
        main([command, "--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ckstore " + command)
    assert "--json" in out and "store" in out


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


def test_ls(capsys, populated):
    code, payload, _ = run_json(capsys, "ls", populated)
    assert code == 0
    assert [c["step"] for c in payload["checkpoints"]] == [1, 2, 9, 10]
    assert payload["best"] == 2
    first = payload["checkpoints"][0]
    assert first["tags"] == ["first"] and first["metrics"] == {"loss": 0.9} and first["nbytes"] > 0
    assert set(first) >= {"step", "metrics", "tags", "path", "created", "nbytes"}
    code, out, _ = run(capsys, "ls", populated)
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["1", "2", "9", "10"]
    assert "(best)" in lines[2] and "(latest)" in lines[4] and "[first]" in lines[1]
    code, payload, _ = run_json(capsys, "ls", populated, "--metric", "loss", "--mode", "max")
    assert payload["best"] == 1


def test_show(capsys, populated):
    code, payload, _ = run_json(capsys, "show", populated, "latest")
    assert code == 0 and payload["step"] == 10
    assert payload["files"] and all(f["hash"].startswith("blake3:") for f in payload["files"].values())
    assert run_json(capsys, "show", populated, "best")[1]["step"] == 2
    assert run_json(capsys, "show", populated, "first")[1]["step"] == 1
    assert run_json(capsys, "show", populated, "9")[1]["step"] == 9
    code, out, _ = run(capsys, "show", populated, "9")
    assert code == 0 and "step      9" in out and "manifest.json" in out


def test_verify_ok_and_corrupt(capsys, populated):
    code, payload, _ = run_json(capsys, "verify", populated)
    assert code == 0 and payload == {"ok": True, "checked": [1, 2, 9, 10], "problems": []}
    code, out, _ = run(capsys, "verify", populated, "9")
    assert code == 0 and out.startswith("OK")

    victim = next((populated / "checkpoints" / "step-00000009").glob("*.safetensors"))
    flip_byte(victim, -1)
    code, payload, _ = run_json(capsys, "verify", populated)
    assert code == 1 and payload["ok"] is False
    assert [(p["step"], p["path"]) for p in payload["problems"]] == [(9, str(victim))]
    code, out, _ = run(capsys, "verify", populated)
    assert code == 1 and "FAIL step 9" in out
    assert run(capsys, "verify", populated, "10")[0] == 0


def test_verify_one_step_with_a_corrupt_manifest_exits_1(capsys, populated):
    """Regression: verifying one step resolved it through its manifest, so a corrupt manifest gave exit 2."""
    manifest = populated / "checkpoints" / "step-00000009" / "manifest.json"
    flip_byte(manifest, 40)
    code, payload, _ = run_json(capsys, "verify", populated, "9")
    assert code == 1 and payload["checked"] == [9]
    assert payload["problems"][0]["path"] == str(manifest)
    code, payload, _ = run_json(capsys, "verify", populated)
    assert code == 1 and 9 in payload["checked"]


def test_tag_set_list_move_delete(capsys, populated):
    code, payload, _ = run_json(capsys, "tag", populated, "release", "9")
    assert code == 0 and payload["step"] == 9 and "release" in payload["tags"]
    assert run_json(capsys, "tag", populated)[1] == {"tags": {"first": 1, "release": 9}}
    assert run_json(capsys, "tag", populated, "release")[1]["step"] == 10  # default: latest (moves the tag)
    assert run_json(capsys, "tag", populated, "release", "best")[1]["step"] == 2
    code, payload, _ = run_json(capsys, "tag", populated, "-d", "release")
    assert code == 0 and payload == {"untagged": "release"}
    code, out, _ = run(capsys, "tag", populated)
    assert code == 0 and out.split() == ["first", "1"]


def test_gc(capsys, populated):
    (populated / ".staging" / "step-00000011.abcd").mkdir()
    code, payload, _ = run_json(capsys, "gc", populated, "--keep-last", "1", "--dry-run")
    assert code == 0 and payload == {"dry_run": True, "deleted": [2, 9], "remaining": [1, 2, 9, 10]}  # 1 is tagged
    code, payload, _ = run_json(capsys, "gc", populated)
    assert payload["deleted"] == [] and payload["remaining"] == [1, 2, 9, 10]
    assert os.listdir(populated / ".staging") == []  # gc recovers leftovers
    code, payload, _ = run_json(capsys, "gc", populated, "--keep-last", "1", "--keep-best", "1", "--metric", "loss")
    assert code == 0 and payload["deleted"] == [9] and payload["remaining"] == [1, 2, 10]
    code, out, _ = run(capsys, "gc", populated, "--keep-every", "5")
    assert code == 0 and out.strip() == "deleted 1 checkpoint(s): 2; 2 remain"  # 10 is a multiple of 5, 1 is tagged
    assert [c["step"] for c in run_json(capsys, "ls", populated)[1]["checkpoints"]] == [1, 10]


@pytest.mark.parametrize(
    "argv",
    [
        ["show", "{store}", "999"],
        ["show", "{store}", "no-such-tag"],
        ["show", "{store}", "²"],
        ["show", "{store}", "bad tag!"],
        ["ls", "{missing}"],
        ["verify", "{missing}"],
        ["verify", "{store}", "999"],
        ["tag", "{store}", "latest", "1"],
        ["tag", "{store}", "x", "999"],
        ["tag", "{store}", "-d", "nope"],
        ["gc", "{store}", "--keep-best", "1"],
        ["gc", "{store}", "--keep-last", "0"],
        ["tag", "{missing}", "x"],
        ["gc", "{missing}"],
    ],
)
def test_errors_exit_2_with_a_message(capsys, populated, tmp_path, argv):
    args = [a.format(store=populated, missing=tmp_path / "missing") for a in argv]
    code, out, err = run(capsys, *args)
    assert code == 2
    assert err.startswith("ckstore: error: ")
    assert not (tmp_path / "missing").exists()  # a mistyped path never becomes a new store
    code, out, err = run(capsys, *args, "--json")
    assert code == 2 and set(json.loads(out)) == {"error", "message"}
    assert json.loads(out)["error"].endswith("Error")


def test_usage_errors_exit_2(capsys, populated):
    for argv in (["frobnicate"], [], ["ls"], ["gc", str(populated), "--keep-last", "x"]):
        with pytest.raises(SystemExit) as excinfo:
            main(argv)
        assert excinfo.value.code == 2
    capsys.readouterr()


def test_writer_lock_held_is_an_error_that_names_the_cli_option(capsys, populated):
    with ckstore.Store(populated) as store:
        store.save({}, step=11)
        code, payload, err = run_json(capsys, "gc", populated, "--keep-last", "1")
        assert code == 2 and payload["error"] == "StoreLockedError"
        assert str(os.getpid()) in payload["message"] and "--wait" in payload["message"]
        assert "lock_timeout=" not in payload["message"] and "readonly=" not in payload["message"]
        assert run_json(capsys, "tag", populated, "x", "11")[0] == 0  # tags need only the metadata lock


def test_real_entry_point(populated):
    """Through the installed ``ckstore`` script (or ``python -m ckstore`` without one), in a real subprocess."""
    script = Path(sys.executable).parent / "ckstore"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "ckstore"]
    victim = next((populated / "checkpoints" / "step-00000002").glob("*.safetensors"))
    shutil.copy(victim, victim.with_name("extra.safetensors"))
    result = subprocess.run([*command, "verify", str(populated), "--json"], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert result.returncode == 1, result.stderr
    payload = json.loads(result.stdout)
    assert [(p["step"], p["actual"]) for p in payload["problems"]] == [(2, "unlisted file")]
