"""A multi-rank DCP save killed at every durable-operation boundary of one rank, of the coordinator, and of all
ranks at once (``fault_injection/distributed.py``): no partial checkpoint, no acknowledged save lost.

Run in a subprocess: the harness forks its ranks from an interpreter that has imported torch once. The same kill
points and crash model are the ``distributed`` tier of ``python -m fault_injection run``; the last two tests run
that tier through the main harness, on the package and on a planted copy of it.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import PYTHON, REPO_ROOT, subprocess_env


def test_every_kill_point_of_a_two_rank_save_keeps_the_invariants():
    done = subprocess.run(
        [PYTHON, "-m", "fault_injection.distributed", "--world", "2", "--json"],
        cwd=REPO_ROOT, env={**subprocess_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode in (0, 1), done.stderr[-3000:]
    rows = json.loads(done.stdout)
    assert [r for r in rows if r["violations"]] == []
    for victim, at_least in (("rank1", 4), ("coordinator", 15), ("all", 15)):
        fired = [r for r in rows if r["victim"] == victim and r["fired"]]
        assert len(fired) >= at_least, (victim, len(fired))
        # the last run of each victim went through: its save was acknowledged and committed
        last = [r for r in rows if r["victim"] == victim][-1]
        assert not last["fired"] and last["committed"] and last["acked"] == [0, 1]
    # kills after the commit rename leave a whole checkpoint (checked to load bitwise by the harness)
    assert any(r["committed"] for r in rows if r["victim"] == "coordinator" and r["fired"])


def _kill_runs(api: str, victims: str) -> list[dict]:
    done = subprocess.run(
        [PYTHON, "-m", "fault_injection.distributed", "--world", "2", "--api", api, "--victims", victims, "--json"],
        cwd=REPO_ROOT, env={**subprocess_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode in (0, 1), done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("api", ["store", "store_async"])
def test_every_kill_point_of_a_two_rank_store_save_keeps_the_invariants_and_survivors_raise_at_once(api):
    """``Store(path, process_group=pg).save`` (blocking, and blocking=False then wait()): the same invariants, and a
    rank spared by the kill raises a ckstore error (DistributedError, AsyncSaveError) within the bound, not a hang."""
    import fault_injection.distributed as fid

    rows = _kill_runs(api, "rank1")
    assert [r for r in rows if r["violations"]] == []
    fired = [r for r in rows if r["fired"]]
    assert len(fired) >= 4 and not rows[-1]["fired"] and rows[-1]["acked"] == [0, 1] and rows[-1]["committed"]
    # the surviving coordinator raised and removed its staging directory itself: the store is left as before the save
    for r in fired:
        assert r["survivor_errors"] and all(e["ckstore"] for e in r["survivor_errors"]), r
        assert r["survivor_raised_s"] < fid.SURVIVOR_BOUND_S, r


def test_a_survivor_does_not_say_nothing_was_committed_when_the_coordinator_died_after_the_rename():
    """Coordinator killed after renaming step 1 into checkpoints/ (its last 2 kill points): rank 1 raised
    DistributedError ending '; nothing was committed', though step 1 is listed, verifies and loads (a user told so may
    redo work or save step 1 again). Rank 1 cannot know the outcome, and now says so."""
    rows = _kill_runs("store", "coordinator")
    late = [r for r in rows if r["fired"] and r["committed"]]
    assert late, rows
    assert [r["k"] for r in late if r["survivor_denies_commit"]] == [], [r["survivor_errors"] for r in late]


def test_the_crash_model_finds_no_violation_in_a_two_rank_save(tmp_path):
    """Every on-disk state POSIX allows at every crash point (power cuts included) of two 2-rank saves with
    retention. Removing the staging-directory fsync before the commit rename gives 338 violations (a rank's file
    lost from a committed checkpoint); this run must give none."""
    import fault_injection.distributed as fid

    row = fid.run_crash_model(str(tmp_path), world=2)
    assert row.violations == 0, row.examples[:3]
    assert row.states >= 50  # the model really enumerated states


# ---------------------------------------------------------------- the tier in the main harness

#: The manifest written into the checkpoint after the commit rename, not before it: a kill or a power cut between
#: the two leaves a committed directory without a manifest. A copy of the package gets the patch (the mutation
#: tier's way, ``fault_injection.mutants.apply``); the harness runs against the copy through PYTHONPATH.
_MANIFEST_AFTER_RENAME = (
    (
        "checkpoint/commit.py",
        'with _durable.create(os.path.join(staging, MANIFEST_NAME), site="manifest") as writer:',
        "replace",
        ("if False:  # planted: the manifest moves after the rename",),
    ),
    (
        "checkpoint/commit.py",
        "renamed.append(True)",
        "after",
        (
            'with _durable.create(os.path.join(self.ckpt_dir, final_name, MANIFEST_NAME), site="manifest") as writer:',
            "    writer.write(data)",
            "    writer.sync()",
        ),
    ),
)


def _harness(tmp_path, pythonpath: str, profile: str) -> tuple[int, list[list[str]], str]:
    """``python -m fault_injection run --profile <profile> --tiers distributed``: exit status, the table's rows, output."""
    report = tmp_path / "report.txt"
    done = subprocess.run(
        [PYTHON, "-m", "fault_injection", "run", "--profile", profile, "--tiers", "distributed", "--report", str(report), "--workdir", str(tmp_path)],
        # not cwd=REPO_ROOT: ``python -m`` puts the working directory first on sys.path, ahead of a planted copy
        cwd=tmp_path,
        env={**subprocess_env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout[-4000:] + done.stderr[-4000:]
    assert report.exists(), output
    lines = report.read_text().splitlines()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("| distributed ")]
    return done.returncode, rows, output


def test_the_harness_runs_the_distributed_tier_and_fails_on_a_manifest_written_after_the_rename(tmp_path):
    """The ci profile's distributed tier through ``python -m fault_injection run``: every row of the tier in the one
    table, a violation makes the run exit 1. Planted: the crash model and the coordinator's kill points both see it."""
    import ckstore
    from fault_injection import mutants

    plant = mutants.Mutant(
        "manifest_after_rename", "ordering", "the manifest is written after the commit rename",
        tuple(mutants.Edit(file, anchor, action, lines) for file, anchor, action, lines in _MANIFEST_AFTER_RENAME), ("dcp",),
    )
    target = mutants.apply(os.path.dirname(ckstore.__file__), plant, str(tmp_path / "planted"))
    (tmp_path / "work").mkdir()
    code, rows, output = _harness(tmp_path / "work", os.pathsep.join([target, str(REPO_ROOT)]), "ci")
    assert code == 1, output
    by_name = {row[1]: row for row in rows}
    model = [row for name, row in by_name.items() if "crash model" in name]
    coordinator = [row for name, row in by_name.items() if name.startswith("kill coordinator")]
    assert model and all(int(row[4]) > 0 for row in model), rows
    assert coordinator and all(int(row[4]) > 0 for row in coordinator), rows
    # Store(path, process_group=pg).save, sync and blocking=False + wait(): the same StoreWriter under its own agree
    # step, error broadcast and background path; its coordinator's and all-ranks kills must see the plant too.
    for victim in ("coordinator", "all"):
        for api in ("Store.save", "Store.save(blocking=False)"):
            store_rows = [row for name, row in by_name.items() if name == f"kill {victim}: 2-rank {api}"]
            assert store_rows and int(store_rows[0][4]) > 0, (victim, api, rows)


def test_the_harness_distributed_tier_is_clean_without_the_plant(tmp_path):
    code, rows, output = _harness(tmp_path, str(REPO_ROOT), "ci")
    assert code == 0, output
    names = [row[1] for row in rows]
    for victim in ("rank1", "coordinator", "all"):
        for api in ("dcp.save", "Store.save", "Store.save(blocking=False)"):
            assert f"kill {victim}: 2-rank {api}" in names, names
    # a killed rank's peers raised within the bound: the rows that have survivors say how fast
    assert all("survivors raised" in row[6] for row in rows if row[1].startswith(("kill rank1", "kill coordinator"))), rows
    assert any("crash model" in name for name in names), names
    assert all(int(row[4]) == 0 for row in rows), rows
    assert all(int(row[2]) > 0 for row in rows), rows  # every row ran cycles
