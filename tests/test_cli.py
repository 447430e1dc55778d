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

COMMANDS = ["ls", "show", "verify", "tag", "gc", "delete", "diff", "plot", "import", "export"]


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
    assert code == 0 and payload == {"ok": True, "checked": [1, 2, 9, 10], "formats": {"1": 2, "2": 2, "9": 2, "10": 2}, "problems": []}
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


# ---------------------------------------------------------------- issue 15: delete, diff, plot, show best --metric, progress


def test_ls_with_an_unknown_metric_is_an_error_naming_the_option(capsys, populated):
    code, out, err = run(capsys, "ls", populated, "--metric", "acc")
    assert code == 2 and "--metric" in err and "'acc'" in err and "loss" in err  # names the metrics there are
    assert run_json(capsys, "ls", populated, "--metric", "acc")[1]["error"] == "InvalidArgumentError"


def test_show_best_with_metric(capsys, store_path):
    with ckstore.Store(store_path) as store:  # no metric configured: "best" needs --metric
        for step, acc in [(1, 0.5), (2, 0.9), (3, 0.7)]:
            store.save({"w": torch.ones(2) * step}, step=step, metrics={"acc": acc, "loss": 1 - acc + step})
    code, out, err = run(capsys, "show", store_path, "best")
    assert code == 2 and "--metric" in err and "metric=" not in err
    assert run_json(capsys, "show", store_path, "best", "--metric", "acc", "--mode", "max")[1]["step"] == 2
    assert run_json(capsys, "show", store_path, "best", "--metric", "loss")[1]["step"] == 1
    code, out, err = run(capsys, "show", store_path, "best", "--metric", "nope")
    assert code == 2 and "--metric" in err and "nope" in err
    code, out, err = run(capsys, "show", store_path, "2", "--metric", "acc")
    assert code == 2 and "--metric" in err  # only 'best' is ranked: a metric beside a step is a mistake


def test_delete(capsys, populated):
    code, payload, _ = run_json(capsys, "delete", populated, "9")
    assert code == 0 and payload == {"deleted": 9, "untagged": []}
    code, out, err = run(capsys, "delete", populated, "1")  # tagged "first": refused as Store.delete refuses it
    assert code == 2 and "--force" in err and "force=True" not in err and "first" in err
    code, out, err = run(capsys, "delete", populated, "first", "--force")
    assert code == 0 and "deleted step 1" in out and "first" in out
    assert [c["step"] for c in run_json(capsys, "ls", populated)[1]["checkpoints"]] == [2, 10]
    assert run(capsys, "delete", populated, "999")[0] == 2


def test_delete_refuses_a_published_pin_without_force(capsys, populated):
    with ckstore.Store(populated) as store:
        store.tag(2, "published.best")
    code, out, err = run(capsys, "delete", populated, "2")
    assert code == 2 and "published.best" in err and "--force" in err


def test_diff(capsys, store_path):
    with ckstore.Store(store_path) as store:
        store.save({"a": torch.zeros(4), "b": torch.ones(3, dtype=torch.float64), "gone": torch.ones(1)}, step=1)
        store.save({"a": torch.zeros(4), "b": torch.full((3,), 2.0, dtype=torch.float64), "new": torch.ones(2, 2)}, step=2)
    code, payload, _ = run_json(capsys, "diff", store_path, "1", "2")
    assert code == 0
    assert payload["a"] == 1 and payload["b"] == 2 and payload["unchanged"] == ["a"]
    (changed,) = payload["changed"]
    assert changed["key"] == "b" and changed["nbytes"] == [24, 24] and changed["dtype"] == ["float64", "float64"]
    assert changed["hash"][0] != changed["hash"][1] and all(h.startswith("blake3:") for h in changed["hash"])
    assert [(e["key"], e["shape"], e["nbytes"]) for e in payload["added"]] == [("new", [2, 2], 16)]
    assert [e["key"] for e in payload["removed"]] == ["gone"]
    code, out, _ = run(capsys, "diff", store_path, "1", "latest")
    assert code == 0 and "changed  b" in out and "added    new" in out and "removed  gone" in out and "1 unchanged" in out
    assert run_json(capsys, "diff", store_path, "2", "2")[1]["changed"] == []


def test_plot_png(capsys, populated, tmp_path):
    from PIL import Image

    with ckstore.Store(populated) as store:
        store.tag(9, "published.best")
    out_png = tmp_path / "plot.png"
    code, payload, _ = run_json(capsys, "plot", populated, "--metric", "loss", "-o", out_png)
    assert code == 0 and payload["path"] == str(out_png) and payload["best"] == 2 and payload["points"] == 4
    assert payload["tagged"] == [1] and payload["published"] == [9]
    with Image.open(out_png) as image:
        assert image.format == "PNG" and image.size == (1000, 500)
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colors) > 50  # a line, markers, labels, not a blank canvas
    assert max(count for count, _ in colors) < 0.95 * 1000 * 500
    code, out, err = run(capsys, "plot", populated, "--metric", "nope", "-o", tmp_path / "x.png")
    assert code == 2 and "--metric" in err and not (tmp_path / "x.png").exists()


def test_plot_writes_through_storage(capsys, populated, tmp_path):
    """The PNG is written by the storage layer (hooked, fsynced, replaced atomically), not by matplotlib's savefig."""
    from ckstore.storage import durable

    seen = []
    with durable.hooked(lambda op, phase, path, info: seen.append((op, info["site"])) if phase == "after" else None):
        code, _, _ = run_json(capsys, "plot", populated, "--metric", "loss", "-o", tmp_path / "p.png")
    assert code == 0 and ("fsync", "plot") in seen and ("rename", "plot") in seen


def test_plot_without_matplotlib_names_the_extra(capsys, populated, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without ckstore[plot] sees: ImportError
    code, out, err = run(capsys, "plot", populated, "--metric", "loss", "-o", tmp_path / "x.png")
    assert code == 2 and "ckstore[plot]" in err


def test_progress_is_quiet_off_a_tty_and_shown_on_one(populated):
    """A real pseudo-terminal: the bar is drawn there; with --json, or into a pipe, nothing but the result."""
    import pty
    import select

    script = Path(sys.executable).parent / "ckstore"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "ckstore"]

    def on_tty(*argv):
        master, slave = pty.openpty()
        proc = subprocess.Popen([*command, *argv], stdout=slave, stderr=slave, env=subprocess_env() | {"COLUMNS": "100"})
        os.close(slave)
        chunks = []
        while True:
            ready, _, _ = select.select([master], [], [], 60)
            try:
                data = os.read(master, 65536) if ready else b""
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        os.close(master)
        assert proc.wait(timeout=60) == 0
        return b"".join(chunks).decode(errors="replace")

    shown = on_tty("verify", str(populated))
    assert "verify" in shown and "\x1b[" in shown and "OK: 4 checkpoint(s) verified" in shown
    piped = subprocess.run([*command, "verify", str(populated)], capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert piped.returncode == 0 and piped.stderr == "" and "\x1b" not in piped.stdout
    as_json = on_tty("verify", str(populated), "--json")
    assert "\x1b[" not in as_json and json.loads(as_json)["ok"] is True


def test_a_closed_stdout_is_no_traceback(populated):
    """`ckstore show ... | head -3`: the reader went away; exit quietly, as ls | head does, not with a BrokenPipeError traceback."""
    script = Path(sys.executable).parent / "ckstore"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "ckstore"]
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to stdout now fails with EPIPE
    try:
        result = subprocess.run([*command, "show", str(populated), "1"], stdout=write_end, stderr=subprocess.PIPE, text=True,
                                env=subprocess_env(), timeout=60)
    finally:
        os.close(write_end)
    assert "Traceback" not in result.stderr and result.returncode == 141  # 128 + SIGPIPE, what a shell reports for `ls | head`


def test_gc_with_a_metric_no_checkpoint_records_deletes_nothing(capsys, populated):
    """A typo in --metric gave --keep-best nothing to rank, so the best checkpoints were pruned as if unranked."""
    code, out, err = run(capsys, "gc", populated, "--keep-last", "1", "--keep-best", "1", "--metric", "los")
    assert code == 2 and "--metric 'los'" in err
    assert [c["step"] for c in run_json(capsys, "ls", populated)[1]["checkpoints"]] == [1, 2, 9, 10]


def test_metric_options_on_an_empty_store_are_fine(capsys, store_path):
    with ckstore.Store(store_path) as store:
        store.recover()  # creates the layout, no checkpoint
    assert run_json(capsys, "gc", store_path, "--keep-best", "1", "--metric", "loss")[0] == 0
    assert run_json(capsys, "ls", store_path, "--metric", "loss")[1]["best"] is None
    code, out, err = run(capsys, "plot", store_path, "--metric", "loss", "-o", store_path / "p.png")
    assert code == 2 and "nothing to plot" in err


# ---------------------------------------------------------------- export


@pytest.fixture(scope="module")
def hf_store(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from ckstore.integrations.export import hf_metadata

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=16)
    model = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("hf-store") / "store"
    with ckstore.Store(path) as store:
        store.save({"model": model, "hf": {"model": hf_metadata(model)}, "optimizer": torch.optim.AdamW(model.parameters())}, step=5)
    return path, model, transformers


def test_export_hf_and_safetensors(capsys, hf_store, tmp_path):
    from safetensors.torch import load_file

    path, model, transformers = hf_store
    out = tmp_path / "exported"
    code, payload, err = run_json(capsys, "export", path, "latest", "--hf", out)
    assert code == 0 and err == "" and payload["step"] == 5
    assert "model.safetensors" in payload["files"] and "config.json" in payload["files"]
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.arange(8).unsqueeze(0)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    code, out_text, err = run(capsys, "export", path, "5", "--hf", out)
    assert code == 2 and "--force" in err and "overwrite=" not in err  # an existing export is not replaced silently
    assert run(capsys, "export", path, "5", "--hf", out, "--force")[0] == 0
    flat = tmp_path / "weights.safetensors"
    code, payload, _ = run_json(capsys, "export", path, "5", "--safetensors", flat)
    assert code == 0 and payload["files"] == [str(flat)]
    assert load_file(flat).keys() == load_file(out / "model.safetensors").keys()
    code, _, err = run(capsys, "export", path, "5", "--hf", tmp_path / "no" / "such" / "dir")
    assert code == 2 and "--hf" in err
    code, _, err = run(capsys, "export", path, "5", "--hf", tmp_path / "x", "--max-shard-size", "lots")
    assert code == 2 and "--max-shard-size" in err and "max_shard_size" not in err


def test_export_needs_exactly_one_destination(capsys, hf_store, tmp_path):
    path, _, _ = hf_store
    for extra in ([], ["--hf", str(tmp_path / "a"), "--safetensors", str(tmp_path / "b")]):
        with pytest.raises(SystemExit) as excinfo:
            main(["export", str(path), "5", *extra])
        assert excinfo.value.code == 2
    capsys.readouterr()
