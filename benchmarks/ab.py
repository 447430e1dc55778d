"""Interleaved A/B of the benchmarks at two commits, so that a change is judged against the
code it replaced on the same disk in the same minutes.

    python -m benchmarks.ab --old 3abe7ad --new HEAD --rounds 3 -- --size-mib 256 --reps 1

Each round runs `python -m benchmarks` once at each commit, alternating which goes first, each
from a detached git worktree of that commit (so the benchmark code is the one of its commit too).
The disk here has measured anywhere from 0.3 to 2.4 GB/s within one week, and other jobs move it
within minutes: a sequential "old, then new" comparison would mostly measure the drift.
Interleaving spreads the drift over both sides, and the table reports, per case, the median of
each side's per-run medians and their ratio. Cases that exist at one commit only are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def _worktree(rev: str, root: str) -> str:
    path = tempfile.mkdtemp(prefix=f"ckstore-ab-{rev[:12]}-")
    os.rmdir(path)
    subprocess.run(["git", "-C", root, "worktree", "add", "-q", "--detach", path, rev], check=True)
    return path


def _run(tree: str, bench_args: list[str], out: str) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, PYTHONHASHSEED="0")
    cmd = [sys.executable, "-m", "benchmarks", "--json", out, "--dir", os.path.join(tree, ".bench"), *bench_args]
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(out) as fh:
        return json.load(fh)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="the commit to compare against")
    parser.add_argument("--new", default="HEAD", help="the commit under test (default HEAD)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per side, interleaved (default 3)")
    parser.add_argument("bench_args", nargs="*", help="arguments for python -m benchmarks (after --)")
    args = parser.parse_args(argv)
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], check=True, capture_output=True, text=True).stdout.strip()
    revs = {}
    for side in ("old", "new"):
        rev = getattr(args, side)
        revs[side] = subprocess.run(["git", "-C", root, "rev-parse", "--short", rev], check=True, capture_output=True, text=True).stdout.strip()
    trees = {side: _worktree(rev, root) for side, rev in revs.items()}
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for rnd in range(args.rounds):
                order = ("old", "new") if rnd % 2 == 0 else ("new", "old")
                for side in order:
                    print(f"round {rnd + 1}/{args.rounds}: {side} ({revs[side]})", file=sys.stderr, flush=True)
                    runs[side].append(_run(trees[side], args.bench_args, os.path.join(tmp, f"{side}{rnd}.json")))
    finally:
        for tree in trees.values():
            subprocess.run(["git", "-C", root, "worktree", "remove", "--force", tree], check=False)
    machine = runs["new"][0]["machine"]
    print(f"A/B: old {revs['old']} vs new {revs['new']}, {args.rounds} interleaved rounds, benchmarks {' '.join(args.bench_args)}")
    print(f"machine: {machine}\n")
    for index, result in enumerate(runs["new"][0]["results"]):
        label = result["label"]
        print(f"## {label}")
        print("| case | old median s | new median s | new/old |")
        print("|---|---:|---:|---:|")
        for case in result["medians"]:
            try:
                old = statistics.median(run["results"][index]["medians"][case] for run in runs["old"])
            except KeyError:
                continue
            new = statistics.median(run["results"][index]["medians"][case] for run in runs["new"])
            print(f"| {case} | {old:.3f} | {new:.3f} | {new / old:.2f}x |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
