"""The invariants checked on every crash state, whatever tier produced it.

Each invariant has a stable name; every violation message starts with it
(``"acked-kept-by-policy: ..."``), so the mutation tier can say which
invariant caught a bug.

``opens-writable``
    The store opens writable without manual repair (opening runs recovery).
``no-leftovers``
    After recovery no staging, trash or temp-file leftovers remain.
``visible-verifies``
    Every checkpoint visible in ``checkpoints/`` verifies (no torn or partial
    checkpoint is ever visible).
``acked-kept-by-policy``
    The retention lower bound. A committed checkpoint that was acknowledged
    (a save that returned, or one present before the crash window) may be
    missing only when the retention policy allows it *given what is present
    and verified*: for ``keep_last`` at least that many newer checkpoints are
    there, for ``keep_best`` as many better ones, it is not a multiple of
    ``keep_every``, not pinned, not the newest, and not the checkpoint the
    latest save committed. A checkpoint under an explicit delete that began is
    exempt; one whose delete was acknowledged must stay gone
    (``delete-stays-done``).
``no-retention-leak``
    The retention upper bound, checked wherever the store is quiescent (a run
    that finished, and after the save that follows every crash state): each
    visible checkpoint is one the policy keeps, pinned, or the latest save's.
``tags-as-acked``
    Every tag points where the acknowledged operations put it, or where an
    operation in flight at the crash was moving it (a save carrying the tag, a
    ``tagging`` mark, an untag or explicit delete that began). Publish pins
    (``published.*``) are the DVC workloads' business.
``content-exact``
    Every visible checkpoint loads to exactly the state saved at its step.
``load-newest``
    ``load()`` without a step returns the newest verified commit (commit
    order, as retention ranks: after a rollback the newest is not the highest step).
``corrupt-never-deleted``
    A checkpoint that failed verification before the window (bit rot) is never
    deleted: its bytes are still somewhere in the store (in place or in a
    quarantine), whatever the run did.
``writable-save-keeps-committed``
    After every crash state and every damaged store: open writable, save a new
    step, and no committed checkpoint is removed except by the retention rule
    (both bounds are checked again on the result).
``workload-check``
    The workload's own check (tags, a resumed training run, a DVC tree).
``workload-completes``
    A run without a fault finishes without an exception (checked by the tiers).
``error-surfaces``
    An injected disk error surfaces as a typed ``StorageError`` carrying its
    errno, a failed fsync is never retried and never followed by the commit
    (checked by the disk-error tier).

The retention rule is evaluated by :func:`policy_keeps`, an implementation
independent of ``ckstore.checkpoint.retention`` (a bug there must not also be in the
oracle), over steps, metrics and tags taken from the *recorded operations*:
the checkpoints present before the window (``base.json`` beside the store,
written when the template was prepared) and the workload's acknowledgements
(``intent`` marks carry each save's metrics and tags; ``save``, ``tag``,
``untag``, ``deleting`` and ``delete`` mark what returned). The store's own
listing is used only as the evidence a deletion needs (which checkpoints are
present and verify), never as the source of what was promised.

:func:`check_store` returns violation messages; an empty list means the state
is good. An unexpected exception anywhere is itself a violation.
"""

from __future__ import annotations

import hashlib
import json
import os
import traceback
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import ckstore
from ckstore.storage import durable as _durable

from .workloads import Workload, expected_state, same_state

OPENS = "opens-writable"
LEFTOVERS = "no-leftovers"
VERIFIES = "visible-verifies"
ACKED_KEPT = "acked-kept-by-policy"
NO_LEAK = "no-retention-leak"
DELETE_STAYS = "delete-stays-done"
TAGS = "tags-as-acked"
CONTENT = "content-exact"
NEWEST = "load-newest"
CORRUPT_KEPT = "corrupt-never-deleted"
WRITABLE_SAVE = "writable-save-keeps-committed"
WORKLOAD = "workload-check"
COMPLETES = "workload-completes"
ERRORS = "error-surfaces"
CHECKER = "checker-crashed"

NAMES = (OPENS, LEFTOVERS, VERIFIES, ACKED_KEPT, NO_LEAK, DELETE_STAYS, TAGS, CONTENT, NEWEST, CORRUPT_KEPT, WRITABLE_SAVE, WORKLOAD, COMPLETES, ERRORS, CHECKER)

#: The file beside a template's store that records its checkpoints (see :func:`write_base`).
BASE_FILE = "base.json"
#: The post-crash save uses steps above every step a workload writes.
PROBE_OFFSET = 100_000


def invariant_of(message: str) -> str:
    """The first invariant name a violation message carries ("" if none); tiers prefix where it happened."""
    found = [(message.find(f"{name}: "), name) for name in NAMES if f"{name}: " in message]
    return min(found)[1] if found else ""


# ---------------------------------------------------------------- the oracle


@dataclass
class Oracle:
    """What the recorded operations promise: committed steps, their metrics and pins."""

    policy: dict[str, Any]
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    acked: set[int] = field(default_factory=set)  # committed and durable: base + acknowledged saves
    base: set[int] = field(default_factory=set)
    corrupt: dict[int, list[str]] = field(default_factory=dict)  # base step -> sha256 of its damaged files
    deleting: set[int] = field(default_factory=set)  # an explicit delete began
    deleted: set[int] = field(default_factory=set)  # an explicit delete returned
    sure_tags: dict[str, int] = field(default_factory=dict)  # tag -> step, acknowledged
    maybe_pinned: set[int] = field(default_factory=set)  # any tag might point here
    last_saved: int | None = None  # the most recent acknowledged save
    tag_moves: dict[str, set[int | None]] = field(default_factory=dict)  # tag -> where an op in flight may leave it
    #: Commit order: base checkpoints by their recorded commit time, then the run's saves as begun,
    #: then the probe save. Retention ranks by commit order, not by step (a rollback's saves are newest).
    order: dict[int, tuple[int, float]] = field(default_factory=dict)
    intended: list[int] = field(default_factory=list)  # every save begun, in order

    @classmethod
    def build(cls, policy: Mapping[str, Any], base: Iterable[Mapping[str, Any]], acks: Iterable[tuple[str, Any]]) -> Oracle:
        keys = ("keep_last", "keep_best", "metric", "mode", "keep_every")
        oracle = cls({k: policy[k] for k in keys if k in policy})
        for n, entry in enumerate(sorted(base, key=lambda e: (e.get("created", 0.0), e["step"]))):
            if not entry.get("corrupt"):
                oracle.order[int(entry["step"])] = (0, n)
        for entry in base:
            step = int(entry["step"])
            if entry.get("corrupt"):
                oracle.corrupt[step] = list(entry["corrupt"])
                continue  # a corrupt checkpoint is no committed checkpoint: it holds no slot
            oracle.base.add(step)
            oracle.acked.add(step)
            oracle.metrics[step] = dict(entry.get("metrics") or {})
            for tag in entry.get("tags") or ():
                oracle.sure_tags[tag] = step
                oracle.maybe_pinned.add(step)
        intent_tags: dict[int, list[str]] = {}
        moves: list[tuple[str, int | None, tuple[str, Any]]] = []  # tag, target, the ack that settles it
        for kind, value in acks:
            if kind == "intent":
                step, metrics, tags = value
                oracle.metrics[int(step)] = dict(metrics or {})
                intent_tags[int(step)] = list(tags or ())
                oracle.intended.append(int(step))
                oracle.order[int(step)] = (1, len(oracle.intended))
                if tags:
                    oracle.maybe_pinned.add(int(step))
                moves.extend((tag, int(step), ("save", int(step))) for tag in tags or ())
            elif kind == "tagging":
                name, step = value
                oracle.maybe_pinned.add(int(step))
                moves.append((name, int(step), ("tag", (name, int(step)))))
            elif kind == "begin" and isinstance(value, str) and value.startswith("untag "):
                moves.append((value[6:], None, ("untag", value[6:])))
            elif kind == "save":
                step = int(value)
                if step not in oracle.intended:  # a save acknowledged without an intent mark: ranked at its ack
                    oracle.intended.append(step)
                    oracle.order[step] = (1, len(oracle.intended))
                oracle.acked.add(step)
                oracle.metrics.setdefault(step, {})
                oracle.last_saved = step
                for tag in intent_tags.get(step, ()):
                    oracle.sure_tags[tag] = step
            elif kind == "tag":
                name, step = value
                oracle.sure_tags[name] = int(step)
                oracle.maybe_pinned.add(int(step))
            elif kind == "untag":
                oracle.sure_tags.pop(value, None)
            elif kind == "deleting":
                oracle.deleting.add(int(value))
                moves.extend((tag, None, ("delete", int(value))) for tag, at in list(oracle.sure_tags.items()) if at == int(value))
            elif kind == "delete":
                oracle.deleted.add(int(value))
                oracle.acked.discard(int(value))
                for tag in [t for t, at in oracle.sure_tags.items() if at == int(value)]:
                    del oracle.sure_tags[tag]  # a forced delete takes its tags with it
        settled = {(k, tuple(v) if isinstance(v, list) else v) for k, v in acks if k in ("save", "tag", "untag", "delete")}
        for tag, target, settles in moves:
            if settles not in settled or oracle.sure_tags.get(tag, None) != target:
                oracle.tag_moves.setdefault(tag, set()).add(target)
        return oracle

    def tag_allowed(self, tag: str) -> set[int | None]:
        return {self.sure_tags.get(tag)} | self.tag_moves.get(tag, set())

    @property
    def sure_pinned(self) -> set[int]:
        """Steps pinned by a tag no operation in flight was moving (a moving tag may already be gone)."""
        return {step for tag, step in self.sure_tags.items() if tag not in self.tag_moves}

    def keeps(self, steps: Iterable[int], *, pinned: Iterable[int] = (), latest: int | None = None) -> set[int]:
        return policy_keeps(set(steps), self.metrics, self.policy, set(pinned), latest, self.order)


def policy_keeps(
    steps: set[int],
    metrics: Mapping[int, Mapping[str, float]],
    policy: Mapping[str, Any],
    pinned: set[int],
    latest: int | None,
    order: Mapping[int, tuple[int, float]] | None = None,
) -> set[int]:
    """The reference retention rule (README): the newest commit, the keep_last most recent commits, the
    keep_best best (ties to the higher step), keep_every multiples, pinned, and the checkpoint the latest
    save committed (a save never removes its own checkpoint). ``order`` ranks commits (default: by step)."""
    if not steps:
        return set()
    keep_last, keep_best, keep_every = policy.get("keep_last"), policy.get("keep_best"), policy.get("keep_every")
    if keep_last is None and keep_best is None and keep_every is None:
        return set(steps)
    rank = order or {}
    order = sorted(steps, key=lambda s: (rank.get(s, (1, float("inf"))), s))
    keep = {order[-1]}
    if keep_last:
        keep.update(order[-keep_last:])
    if keep_best and policy.get("metric"):
        metric, sign = policy["metric"], (1 if policy.get("mode", "min") == "min" else -1)
        scored = sorted((s for s in order if metric in metrics.get(s, {})), key=lambda s: (sign * metrics[s][metric], -s))
        keep.update(scored[:keep_best])
    if keep_every:
        keep.update(s for s in order if s % keep_every == 0)
    keep.update(pinned & steps)
    if latest is not None and latest in steps:
        keep.add(latest)
    return keep


def retention_lower_bound(oracle: Oracle, present: set[int], *, label: str = "") -> list[str]:
    """Every acknowledged step missing from ``present`` must be one the policy may drop given ``present``."""
    out = []
    # A checkpoint the user deleted explicitly still counts as evidence: it was committed and durable
    # when retention dropped older ones, and its own deletion does not oblige retention to bring them back.
    evidence = present | oracle.deleting | oracle.deleted
    # "The latest save" is the last one begun that committed: a save in flight at the crash may have
    # committed and run its retention before its acknowledgement.
    latest = next((s for s in reversed(oracle.intended) if s in present), oracle.last_saved)
    for step in sorted(oracle.acked - present - oracle.deleting):
        keeps = oracle.keeps(evidence | {step}, pinned=oracle.sure_pinned, latest=latest)
        if step in keeps:
            what = "checkpoint from before the crash window" if step in oracle.base else "acknowledged save"
            out.append(f"{ACKED_KEPT}: {what} of step {step} lost{label}, but the policy {oracle.policy or '(keep all)'} still keeps it given the checkpoints present {sorted(present)}")
    for step in sorted(oracle.deleted & present):
        out.append(f"{DELETE_STAYS}: acknowledged delete of step {step} undone{label}")
    return out


def retention_upper_bound(oracle: Oracle, present: set[int], store_pins: Iterable[int] = (), *, latest: int | None = None, label: str = "") -> list[str]:
    """Every present step must be kept by the policy over ``present`` (or pinned, or the latest save's)."""
    pinned = oracle.maybe_pinned | set(store_pins)
    keeps = oracle.keeps(present, pinned=pinned, latest=latest if latest is not None else oracle.last_saved)
    extra = sorted(present - keeps)
    if extra:
        return [f"{NO_LEAK}: steps {extra} kept{label} although the policy {oracle.policy} keeps only {sorted(keeps)} of {sorted(present)}"]
    return []


# ---------------------------------------------------------------- base checkpoints


def write_base(root: str) -> list[int]:
    """Record the template store's checkpoints (steps, metrics, tags, damaged files) in ``base.json`` beside it.

    This is the set-up's own record of what exists before the crash window,
    taken once when the template is built; returns the good steps.
    """
    entries: list[dict[str, Any]] = []
    if os.path.isdir(root):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with ckstore.Store(root, readonly=True) as store:
                infos = {info.step: info for info in store.checkpoints()}
                bad = {problem.step for problem in store.verify()}
        for step, info in sorted(infos.items()):
            entry: dict[str, Any] = {"step": step, "metrics": dict(info.metrics), "tags": sorted(info.tags), "created": info.created}
            if step in bad:
                entry["corrupt"] = _hashes(str(info.path))
            entries.append(entry)
    with open(os.path.join(os.path.dirname(root), BASE_FILE), "w", encoding="utf-8") as fh:
        json.dump(entries, fh)
    return [e["step"] for e in entries if not e.get("corrupt")]


def read_base(root: str, base_steps: Iterable[int] = ()) -> list[dict[str, Any]]:
    path = os.path.join(os.path.dirname(root), BASE_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return [{"step": s} for s in base_steps]


def _hashes(directory: str) -> list[str]:
    out = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with open(os.path.join(directory, name), "rb") as fh:
                out.append(hashlib.sha256(fh.read()).hexdigest())
    return out


def _all_hashes(root: str) -> set[str]:
    found = set()
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as fh:
                    found.add(hashlib.sha256(fh.read()).hexdigest())
    return found


# ---------------------------------------------------------------- the checker


def check_store(
    root: str,
    workload: Workload,
    acks: Iterable[tuple[str, Any]],
    base_steps: Iterable[int] = (),
    *,
    quiescent: bool = False,
    probe: bool = True,
) -> list[str]:
    """All invariants on the store at ``root`` after a crash (``quiescent``: the run finished, no crash).

    ``probe``: end with the writable open + save of ``writable-save-keeps-committed``.
    """
    acks = list(acks)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            oracle = Oracle.build(workload.store_kwargs, read_base(root, base_steps), acks)
            return _check(root, workload, acks, oracle, quiescent=quiescent, probe=probe)
    except Exception as exc:  # any exception escaping the checks is a finding, not a harness crash
        last = traceback.extract_tb(exc.__traceback__)[-1]
        return [f"{CHECKER}: unexpected {type(exc).__name__} during checking: {str(exc)[:200]} (at {os.path.basename(last.filename)}:{last.lineno})"]


def _check(root: str, workload: Workload, acks: list[tuple[str, Any]], oracle: Oracle, *, quiescent: bool, probe: bool) -> list[str]:
    out: list[str] = []
    try:
        store = ckstore.Store(root, **workload.store_kwargs)
        store.recover()  # what the next write does first (opening alone recovers nothing)
    except Exception as exc:
        return [f"{OPENS}: store does not open after the crash: {type(exc).__name__}: {str(exc)[:200]}"]
    try:
        for sub in (".staging", ".trash"):
            left = sorted(os.listdir(os.path.join(root, sub)))
            if left:
                out.append(f"{LEFTOVERS}: leftovers in {sub} after recovery: {left[:3]}")
        temps = [n for n in os.listdir(root) if _durable.is_temp_name(n)]
        if temps:
            out.append(f"{LEFTOVERS}: temp files left after recovery: {temps[:3]}")
        bad = set()
        for problem in store.verify():
            bad.add(problem.step)
            if problem.step in oracle.corrupt:
                continue  # damaged before the window (the workload's bit rot): corrupt-never-deleted covers it
            out.append(f"{VERIFIES}: visible checkpoint fails verification: step {problem.step}: {problem.message[:160]}")
        infos = store.checkpoints()
        present = {info.step for info in infos} - bad
        out.extend(retention_lower_bound(oracle, present))
        if quiescent:
            out.extend(retention_upper_bound(oracle, present, [i.step for i in infos if i.tags]))
        out.extend(_corrupt_kept(root, oracle))
        out.extend(check_tags(oracle, {t: i.step for i in infos for t in i.tags}))
        if workload.content is not None:
            for info in infos:
                if info.step in bad and info.step in oracle.corrupt:
                    continue
                try:
                    loaded = store.load(step=info.step)
                except ckstore.CkstoreError as exc:
                    out.append(f"{CONTENT}: step {info.step} lists but does not load: {type(exc).__name__}: {str(exc)[:160]}")
                    continue
                if not same_state(loaded, workload.content(info.step, workload.scale)):
                    out.append(f"{CONTENT}: step {info.step} loads with content that differs from what was saved (torn data)")
        if present:
            try:
                newest = store.load()
            except ckstore.CkstoreError as exc:
                out.append(f"{NEWEST}: load() of the newest checkpoint failed: {type(exc).__name__}: {str(exc)[:160]}")
            else:
                # "Newest" is the last commit (the oracle's commit order), not the highest step: after a rollback they differ.
                last = max(present, key=lambda s: (oracle.order.get(s, (1, float("inf"))), s))
                if isinstance(newest, dict) and "step" in newest and newest.get("step") != last:
                    out.append(f"{NEWEST}: load() returned step {newest.get('step')}, the newest verified commit is {last}")
        if workload.check is not None and not out:
            out.extend(f"{WORKLOAD}: {m}" for m in workload.check(store, acks))
    finally:
        store.close()
    if probe and workload.probe and not out:
        out.extend(writable_save(root, workload.store_kwargs, oracle))
    return out


def check_tags(oracle: Oracle, store_tags: Mapping[str, int]) -> list[str]:
    """``tags-as-acked``: every tag the operations name is where they left it (or where one in flight may)."""
    out = []
    for tag in sorted(set(oracle.sure_tags) | set(oracle.tag_moves) | set(store_tags)):
        if tag.startswith("published."):
            continue
        now = store_tags.get(tag)
        allowed = oracle.tag_allowed(tag)
        if now not in allowed:
            out.append(f"{TAGS}: tag {tag!r} points at {now}, the acknowledged operations leave it at {sorted(allowed, key=str)}")
    return out


def _corrupt_kept(root: str, oracle: Oracle) -> list[str]:
    if not oracle.corrupt:
        return []
    found = _all_hashes(root)
    out = []
    for step, hashes in sorted(oracle.corrupt.items()):
        if any(h not in found for h in hashes):
            out.append(f"{CORRUPT_KEPT}: the damaged checkpoint of step {step} was deleted (its files are nowhere in the store)")
    return out


def step_dirs(root: str) -> set[str]:
    """Names of the step directories under ``checkpoints/`` (parseable or not)."""
    try:
        return {n for n in os.listdir(os.path.join(root, "checkpoints")) if n.startswith("step-")}
    except FileNotFoundError:
        return set()


def writable_save(root: str, store_kwargs: Mapping[str, Any], oracle: Oracle | None = None, *, scale: int = 8) -> list[str]:
    """Open writable, save a new step, and check that nothing committed went except by the retention rule.

    Checked: every step directory that was in ``checkpoints/`` (a damaged one
    included) is still there unless the policy drops it, and an unparseable or
    damaged one is never deleted (a corrupt checkpoint holds no slot); both
    retention bounds hold on the result, and the new step loads.
    """
    oracle = oracle or Oracle.build(store_kwargs, [], [])
    out: list[str] = []
    before = step_dirs(root)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with ckstore.Store(root, readonly=True) as reader:
                listed = reader.checkpoints()
                good_before = {i.step for i in listed} - {p.step for p in reader.verify()}
                # The tags as they stand (tags-as-acked has already checked them against the operations):
                # they, not the tags of operations cut short, are what pins during this save.
                tags_before = {t: i.step for i in listed for t in i.tags}
            known = [*oracle.acked, *oracle.intended, *good_before, *oracle.corrupt, 0]
            probe = max(known) + PROBE_OFFSET
            state = expected_state(probe, scale)
            with ckstore.Store(root, **store_kwargs) as store:
                store.save(state, step=probe)
                infos = store.checkpoints()
                present = {i.step for i in infos} - {p.step for p in store.verify()}
                pins = [i.step for i in infos if i.tags]
                loaded = store.load(step=probe)
    except Exception as exc:
        return [f"{WRITABLE_SAVE}: open writable + save after the crash failed: {type(exc).__name__}: {str(exc)[:200]}"]
    if not same_state(loaded, state):
        out.append(f"{WRITABLE_SAVE}: the new step {probe} does not load back")
    after = step_dirs(root)
    damaged_before = {int(n[5:13]) for n in before if n[5:13].isdigit()} - good_before
    for step in sorted(damaged_before):
        name = f"step-{step:08d}"
        if name not in after and not _corrupt_anywhere(root, name):
            out.append(f"{WRITABLE_SAVE}: writable open + save removed the damaged checkpoint {name} (it must be kept or quarantined)")
    # The post-save oracle: everything that verified before counts as committed.
    post = Oracle.build(oracle.policy, [], [])
    post.metrics = dict(oracle.metrics)
    post.acked = (oracle.acked | good_before) - oracle.deleted
    post.base = set(post.acked)
    post.sure_tags = tags_before
    post.maybe_pinned = set(oracle.maybe_pinned) | set(tags_before.values())
    post.order = dict(oracle.order)
    post.order.update({s: (0, -1.0) for s in good_before if s not in post.order})  # committed before the window
    post.acked.add(probe)
    post.last_saved = probe
    post.metrics[probe] = {}
    post.order[probe] = (2, 0.0)
    out.extend(m.replace(ACKED_KEPT, WRITABLE_SAVE, 1) for m in retention_lower_bound(post, present, label=" by the writable save"))
    out.extend(retention_upper_bound(post, present, pins, latest=probe, label=" after the writable save"))
    return out


def _corrupt_anywhere(root: str, name: str) -> bool:
    """A directory named after the step (with any suffix) anywhere in the store but staging and trash: a quarantine."""
    for dirpath, dirnames, _ in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel.split(os.sep)[0] in (".staging", ".trash") or rel == "checkpoints":
            continue
        if any(d.startswith(name) for d in dirnames):
            return True
    return False
