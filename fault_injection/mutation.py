"""Tier 5: the mutation check. Remove each fsync, one at a time; tier 2 or 3 must notice.

The mutants are real code: the installed ``ckstore`` package is copied to a
temp directory and one statement is replaced there, textually:

* each fsync system call inside ``durable.py`` (the file fsync and the
  directory fsync themselves: every caller loses it, and the hook still
  reports the fsync, so only the power-cut tier can see these);
* each call of ``sync_dir(...)`` and each ``<writer>.sync()`` anywhere in the
  package (one call site loses its fsync; the hook no longer reports it, so
  the crash model sees it).

The replacement statement records that it was reached. A fresh interpreter
runs tier 2 (then, if that found nothing, tier 3 on ext4) against the copy via
``PYTHONPATH`` and stops at the first violation. Tier 2 runs only the
workloads of :data:`MODEL_WORKLOADS` whose run executes the mutated line (a
quick unrecorded pass finds them): any other one runs unmutated code. The
DVC workloads (``publish_swap``, ``pull_install``) reach the publish and pull
sites; their starting repositories are built once by the parent. A mutant is *caught* when a
violation is found. One that no workload reaches (a write path without a
workload yet) is reported as not exercised. A reached mutant that survives is
listed with the site, for a person to judge: either the harness is blind
there, or that fsync protects nothing an invariant promises.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import ckstore

from .report import Row

REACHED_ENV = "FI_MUTANT_REACHED"
TEMPLATES_ENV = "FI_MUTANT_TEMPLATES"
MARKER = f'__import__("os").environ.__setitem__("{REACHED_ENV}", "1")'

#: The fsync system calls in durable.py: the file's (``self._fsync``) and the directory's (``fsync``),
#: the backend's system call (``os.fsync`` unless a backend passes its own).
# The fsync call itself, however durable.py spells it: ``os.fsync(fd)``, or ``(self._fsync or os.fsync)(self._fd)``
# since a backend may supply its fsync (storage/local.py). A spelling this misses drops those mutants silently.
_DURABLE_FSYNC = re.compile(r"^(os\.fsync|self\._fsync|fsync|\((self\.)?_?fsync or os\.fsync\))\([^()]*\)$")
_SYNC_DIR = re.compile(r"^(_durable\.)?sync_dir\(.*\)$")
_WRITER_SYNC = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*\.sync\(\)$")
_SITE = re.compile(r'site=(?:"([^"]+)"|([A-Za-z_][A-Za-z0-9_ +"]*))')

#: Functions whose fsyncs make only the removal of garbage durable: losing one can bring
#: back a leftover that the next recovery removes again, which no invariant forbids.
CLEANUP_FUNCTIONS = {"_recover"}


@dataclass
class Mutant:
    file: str  # relative to the package
    line: int  # 1-based
    text: str
    kind: str  # "fsync in _durable" | "sync_dir call" | "writer.sync call"
    function: str = ""  # the enclosing def

    @property
    def label(self) -> str:
        return f"{self.file}:{self.line} {self.text}"

    @property
    def site(self) -> str | None:
        match = _SITE.search(self.text)
        return (match.group(1) or match.group(2)) if match else None


def _balanced(text: str) -> bool:
    return text.count("(") == text.count(")")


def find_mutants(package_dir: str) -> list[Mutant]:
    out = []
    # Walk every subpackage: the fsyncs live in storage/, the commit in checkpoint/ and store.py,
    # and a flat listdir would silently find no mutants at all after a move.
    names = sorted(
        os.path.relpath(os.path.join(folder, f), package_dir).replace(os.sep, "/")
        for folder, dirs, files in os.walk(package_dir)
        if "__pycache__" not in folder
        for f in files
        if f.endswith(".py")
    )
    for name in names:
        with open(os.path.join(package_dir, name), encoding="utf-8") as fh:
            lines = fh.read().splitlines()
        function = ""
        for n, line in enumerate(lines, 1):
            text = line.strip()
            match = re.match(r"^\s*(?:async\s+)?def\s+(\w+)", line)
            if match:
                function = match.group(1)
            if not _balanced(text):
                continue
            if name == "storage/durable.py" and _DURABLE_FSYNC.match(text):
                out.append(Mutant(name, n, text, "fsync in _durable", function))
            elif _SYNC_DIR.match(text):
                out.append(Mutant(name, n, text, "sync_dir call", function))
            elif _WRITER_SYNC.match(text):
                out.append(Mutant(name, n, text, "writer.sync call", function))
    return out


def make_mutant(package_dir: str, mutant: Mutant, target: str) -> str:
    """Copy the package under ``target`` with the mutant's statement replaced; return the PYTHONPATH entry."""
    shutil.rmtree(target, ignore_errors=True)
    dest = os.path.join(target, "ckstore")
    shutil.copytree(package_dir, dest, ignore=shutil.ignore_patterns("__pycache__"))
    path = os.path.join(dest, mutant.file)
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    line = lines[mutant.line - 1]
    indent = line[: len(line) - len(line.lstrip())]
    assert line.strip() == mutant.text, (line, mutant.text)
    lines[mutant.line - 1] = indent + MARKER
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
    return target


def run_tier(workdir: str, *, power_cycles: int, timeout: float = 300, jobs: int = 2) -> list[Row]:
    # Mutate a snapshot, not the live package: its sources may change while the tier runs.
    package_dir = os.path.join(workdir, "pristine", "ckstore")
    shutil.rmtree(os.path.dirname(package_dir), ignore_errors=True)
    shutil.copytree(os.path.dirname(os.path.abspath(ckstore.__file__)), package_dir, ignore=shutil.ignore_patterns("__pycache__"))
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mutants = find_mutants(package_dir)
    row = Row("5 mutation", "fsync removals")
    survivors_ok, unreached, caught = [], [], {"model": 0, "power": 0}
    start = time.monotonic()
    results: dict[int, dict] = {}
    running: dict[int, tuple[subprocess.Popen, float]] = {}
    queue = list(range(len(mutants)))

    def launch(i: int) -> None:
        target = make_mutant(package_dir, mutants[i], os.path.join(workdir, f"mutant-{i}"))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([target, repo_root]), **{TEMPLATES_ENV: json.dumps(templates)})
        env.pop(REACHED_ENV, None)
        work = os.path.join(workdir, f"mutant-{i}-work")
        os.makedirs(work, exist_ok=True)
        cmd = [sys.executable, "-m", "fault_injection", "mutant-check", "--workdir", work, "--power-cycles", str(power_cycles)]
        # cwd is the scratch dir, not the repository: the mutant must shadow the real package
        running[i] = (subprocess.Popen(cmd, env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), time.monotonic())

    subsumed = subsumed_sites(workdir)
    # The DVC workloads' starting points (a git + DVC repository, a publish, a clone) take seconds to
    # build: build them once, with the unmutated package (they are set-up, not the code under test),
    # and let every mutant's check copy them.
    from .killpoints import prepare_template
    from .workloads import WORKLOADS

    shared = os.path.join(workdir, "shared-templates")
    templates = {name: prepare_template(WORKLOADS[name], shared) for name in SHARED_TEMPLATES}
    while queue or running:
        while queue and len(running) < jobs:
            launch(queue.pop(0))
        time.sleep(0.2)
        for i, (proc, began) in list(running.items()):
            if proc.poll() is None and time.monotonic() - began < timeout:
                continue
            if proc.poll() is None:
                proc.kill()
            out, err = proc.communicate()
            try:
                results[i] = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                results[i] = {"error": f"no result (rc {proc.returncode}): {err[-500:]}"}
            del running[i]
            shutil.rmtree(os.path.join(workdir, f"mutant-{i}"), ignore_errors=True)
            shutil.rmtree(os.path.join(workdir, f"mutant-{i}-work"), ignore_errors=True)
    for i, mutant in enumerate(mutants):
        result = results[i]
        row.cycles += 1
        if "error" in result or "caught_by" not in result:
            row.violation(f"mutant {mutant.label}: harness error {result.get('error')}")
        elif result["caught_by"]:
            caught[result["caught_by"]] += 1
        elif not result["reached"]:
            unreached.append(mutant.label)
        elif mutant.function in CLEANUP_FUNCTIONS:
            survivors_ok.append(mutant.label)
        elif mutant.site and mutant.site in subsumed:
            survivors_ok.append(f"{mutant.label} (every time it runs, {subsumed[mutant.site]} fsyncs the same directory before anything is acknowledged)")
        else:
            row.violation(f"mutant survived (no tier noticed the missing fsync): {mutant.label}")
    row.seconds = time.monotonic() - start
    exercised = len(mutants) - len(unreached)
    row.note = (
        f"{sum(caught.values())}/{exercised - len(survivors_ok)} mutants caught (model {caught['model']}, power {caught['power']})"
        + (f"; {len(survivors_ok)} redundant survive (listed)" if survivors_ok else "")
        + (f"; {len(unreached)} not reached" if unreached else "")
    )
    for label in survivors_ok:
        why = "redundant" if "(every time" in label else "cleanup-only fsync (a lost removal of a leftover is redone by the next recovery)"
        row.examples.append(f"survived, {why}: {label}")
    for label in unreached:
        row.examples.append(f"not reached by the tier-2/3 workloads: {label}")
    return [row]


def subsumed_sites(workdir: str) -> dict[str, str]:
    """Directory-fsync sites that, in every recorded trace, are followed by another fsync of the same
    directory before the next acknowledgement: removing one cannot change what survives a crash."""
    from . import crashmodel
    from .workloads import WORKLOADS

    verdict: dict[str, str | None] = {}
    for name in ("first_save", "next_save", "retention", "tag_update", "second_writer", "recover_leftovers", "gc_delete"):
        _, _, ops, _ = crashmodel.record(WORKLOADS[name], os.path.join(workdir, "subsumed"))
        for i, op in enumerate(ops):
            if op.kind != "fsync_dir":
                continue
            site = op.what.rsplit("[", 1)[-1].rstrip("]")
            later = None
            for other in ops[i + 1 :]:
                if other.kind == "ack":
                    break
                if other.kind == "fsync_dir" and other.a == op.a:
                    later = other.what.rsplit("[", 1)[-1].rstrip("]")
                    break
            verdict[site] = later if verdict.get(site, later) is not None and later is not None else None
    return {site: later for site, later in verdict.items() if later is not None}


#: The crash-model workloads a mutant is checked against: the store's write paths, then ckstore's own
#: steps of a DVC publish (materialize + swap, files copied) and of a pull (install + swap).
MODEL_WORKLOADS = ["first_save", "next_save", "retention", "tag_update", "second_writer", "recover_leftovers", "gc_delete", "publish_swap", "pull_install"]

#: Workloads whose templates the parent builds once for all mutants.
SHARED_TEMPLATES = ("publish_swap", "pull_install")


def mutant_check(workdir: str, *, power_cycles: int) -> dict:
    """Run inside the mutant's interpreter: tier 2, then tier 3 on ext4, stopping at the first violation."""
    from . import crashmodel, powercut

    os.makedirs(workdir, exist_ok=True)
    names = MODEL_WORKLOADS
    # A quick pass first: a mutant none of these workloads reaches needs no crash-state enumeration.
    from .killpoints import fresh_copy, prepare_template
    from .workloads import WORKLOADS, run_in_process_variant

    given = {name: (template, list(steps)) for name, (template, steps) in json.loads(os.environ.get(TEMPLATES_ENV, "{}")).items()}
    if given:  # git and DVC of this check get their own HOME and caches (the templates are only read)
        from .publish import hermetic_env

        os.environ.update(hermetic_env(workdir))
    prepared, reaching = {}, []
    for name in names:
        workload = WORKLOADS[name]
        # The templates are reused by the model pass below (the DVC ones take seconds to build).
        prepared[name] = given.get(name) or prepare_template(workload, os.path.join(workdir, "templates"))
        os.environ.pop(REACHED_ENV, None)  # count only the run (a preparation may pass the site too)
        run_in_process_variant(workload)(fresh_copy(prepared[name][0], workdir, "reach"), lambda kind, value: None, workload.scale)
        if os.environ.get(REACHED_ENV) == "1":
            reaching.append(name)
    if not reaching:
        os.environ.pop(REACHED_ENV, None)
        return {"caught_by": None, "reached": False}
    os.environ[REACHED_ENV] = "1"
    # A workload that never runs the mutated line runs exactly the unmutated code: it cannot notice.
    rows = crashmodel.run_tier(workdir, workloads=reaching, random_subsets=2, seed=0, exhaustive=4, stop_on_violation=True, prepared=prepared)
    found = [r for r in rows if r.violations]
    if found:
        return {"caught_by": "model", "reached": True, "example": found[0].examples[0]}
    reached = os.environ.get(REACHED_ENV) == "1"
    if power_cycles and reached and powercut.skip_reason("ext4") is None:
        for fs in ("ext4",):
            row = powercut.run_fs(fs, workdir, cycles=power_cycles, scale=1 << 16, seed=0, stop_on_violation=True)
            if row.violations:
                return {"caught_by": "power", "reached": True, "example": row.examples[0]}
    return {"caught_by": None, "reached": reached or os.environ.get(REACHED_ENV) == "1"}


# ---------------------------------------------------------------- realistic bugs (fault_injection/mutants.py)


def mutant_run(name: str, workdir: str, *, tiers: list[str], first: bool, power_cycles: int) -> dict:
    """Run inside the mutant's interpreter: each tier of ``tiers`` on the mutant's workloads.

    Returns per tier whether it caught the bug, by which invariant, with one
    example. With ``first`` the first catch ends the run (the later tiers are
    "not run"); otherwise every tier runs, so the table can say which missed.
    """
    from . import badfiles, crashmodel, diskerrors, killpoints, mutants, powercut
    from .invariants import invariant_of
    from .workloads import WORKLOADS

    mutant = mutants.by_name(name)
    os.makedirs(workdir, exist_ok=True)
    if any(w in ("pull_local", "publish_loop") for w in mutant.workloads):
        from .publish import hermetic_env

        os.environ.update(hermetic_env(workdir))
    results: dict[str, dict] = {}
    order = list(mutant.first) + [t for t in mutants.TIER_ORDER if t not in mutant.first] if first else list(mutants.TIER_ORDER)
    for tier in order:
        if tier not in tiers or tier not in mutant.tiers + ("power",):
            continue
        if tier == "badfiles" and not mutant.badfiles:
            continue
        started = time.monotonic()
        rows: list[Row] = []
        if tier == "power":
            if power_cycles and powercut.skip_reason("ext4") is None:
                rows.append(powercut.run_fs("ext4", workdir, cycles=power_cycles, scale=1 << 14, seed=0, stop_on_violation=True))
            else:
                continue
        elif tier == "badfiles":
            rows.append(badfiles.run_crafted(workdir))
        else:
            for wname in mutant.workloads:
                workload = WORKLOADS[wname]
                if tier == "kill":
                    rows.append(killpoints.run_boundaries(workload, workdir, stride=1, stop_on_violation=True))
                elif tier == "model":
                    rows.append(crashmodel.run_workload(workload, workdir, random_subsets=2, seed=0, exhaustive=4, stop_on_violation=True))
                elif tier == "fsyncgate":
                    rows.append(crashmodel.run_fsyncgate(workload, workdir, limit=8, seed=0, stop_on_violation=True))
                elif tier == "errors":
                    rows.append(diskerrors.run_injected(workload, workdir, stop_on_violation=True))
                if rows[-1].violations:
                    break
        hit = next((r for r in rows if r.violations), None)
        example = hit.examples[0] if hit else ""
        results[tier] = {
            "caught": hit is not None,
            "invariant": invariant_of(example) or ("(unnamed)" if hit else ""),
            "where": hit.workload if hit else "",
            "example": example[:400],
            "seconds": round(time.monotonic() - started, 1),
        }
        if first and hit is not None:
            break
    return {"results": results}


def run_realistic(workdir: str, *, tiers: list[str], first: bool, power_cycles: int, timeout: float = 420, jobs: int = 2) -> list[Row]:
    """One row per realistic mutant: which tier caught it, by which invariant, and which tiers missed it."""
    from . import mutants

    package_dir = os.path.join(workdir, "pristine-realistic", "ckstore")
    shutil.rmtree(os.path.dirname(package_dir), ignore_errors=True)
    shutil.copytree(os.path.dirname(os.path.abspath(ckstore.__file__)), package_dir, ignore=shutil.ignore_patterns("__pycache__"))
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows: dict[str, Row] = {}
    queue = list(mutants.MUTANTS)
    by_name = {m.name: m for m in mutants.MUTANTS}
    running: dict[str, tuple[subprocess.Popen, float, Row]] = {}

    def launch(mutant: mutants.Mutant) -> None:
        row = Row("5 mutation", f"{mutant.name} ({mutant.kind})")
        rows[mutant.name] = row
        try:
            target = mutants.apply(package_dir, mutant, os.path.join(workdir, f"real-{mutant.name}"))
        except mutants.PatchError as exc:  # loud: a mutant that does not apply proves nothing
            row.violation(f"PATCH DOES NOT APPLY: {exc}")
            row.note = "patch does not apply"
            return
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([target, repo_root]))
        work = os.path.join(workdir, f"real-{mutant.name}-work")
        os.makedirs(work, exist_ok=True)
        cmd = [sys.executable, "-m", "fault_injection", "mutant-run", "--name", mutant.name, "--workdir", work, "--tiers", ",".join(tiers), "--power-cycles", str(power_cycles)]
        if first:
            cmd.append("--first")
        running[mutant.name] = (subprocess.Popen(cmd, env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), time.monotonic(), row)

    start = time.monotonic()
    while queue or running:
        while queue and len(running) < jobs:
            launch(queue.pop(0))
        time.sleep(0.2)
        for name, (proc, began, row) in list(running.items()):
            if proc.poll() is None and time.monotonic() - began < timeout:
                continue
            if proc.poll() is None:
                proc.kill()
            out, err = proc.communicate()
            del running[name]
            row.seconds = time.monotonic() - began
            shutil.rmtree(os.path.join(workdir, f"real-{name}"), ignore_errors=True)
            shutil.rmtree(os.path.join(workdir, f"real-{name}-work"), ignore_errors=True)
            try:
                result = json.loads(out.strip().splitlines()[-1])["results"]
            except (ValueError, IndexError, KeyError):
                row.violation(f"harness error (rc {proc.returncode}): {err[-600:]}")
                row.note = "harness error"
                continue
            caught = [(t, r) for t, r in result.items() if r["caught"]]
            missed = [t for t, r in result.items() if not r["caught"]]
            skipped = [t for t in tiers if t not in result and (t != "badfiles" or by_name[name].badfiles)]
            row.cycles = len(result)
            if not caught:
                row.violation(f"SURVIVED every tier run ({', '.join(result) or 'none'})")
                row.note = f"SURVIVED; missed by {', '.join(missed) or '-'}"
                continue
            tier, first_hit = caught[0]
            row.note = (
                f"caught by {tier} [{first_hit['invariant']}] on {first_hit['where']}"
                + (", also " + ", ".join(f"{t} [{r['invariant']}]" for t, r in caught[1:]) if len(caught) > 1 else "")
                + f"; missed by {', '.join(missed) or '-'}"
                + (f"; not run: {', '.join(skipped)}" if skipped else "")
            )
            row.examples.append(f"caught: {first_hit['example'][:300]}")
    ordered = [rows[m.name] for m in mutants.MUTANTS]
    _ = start
    return ordered
