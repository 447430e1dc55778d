"""A multi-rank DCP save killed at every durable-operation boundary of one rank, of the coordinator, and of all
ranks at once (``fault_injection/distributed.py``): no partial checkpoint, no acknowledged save lost.

Run in a subprocess: the harness forks its ranks from an interpreter that has imported torch once.
"""

from __future__ import annotations

import json
import subprocess

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


def test_the_crash_model_finds_no_violation_in_a_two_rank_save(tmp_path):
    """Every on-disk state POSIX allows at every crash point (power cuts included) of two 2-rank saves with
    retention. Removing the staging-directory fsync before the commit rename gives 338 violations (a rank's file
    lost from a committed checkpoint); this run must give none."""
    import fault_injection.distributed as fid

    row = fid.run_crash_model(str(tmp_path), world=2)
    assert row.violations == 0, row.examples[:3]
    assert row.states >= 50  # the model really enumerated states
