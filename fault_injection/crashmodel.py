"""Tier 2: an ALICE-style crash-state model.

A workload runs once with a recording hook; every durable operation (with the
bytes of each write) becomes a trace entry, and each acknowledgement is a mark
in the trace. The trace is replayed onto an in-memory file system of inodes
(directories map names to inodes, files hold bytes) starting from the
prepared store, and for each crash point (every prefix of the trace) the
harness enumerates the on-disk states POSIX allows:

* an operation is *durable* once a later fsync covers it: a write once its
  file is fsynced; a creation, unlink or same-directory rename once that
  directory is fsynced; a rename between directories only once **both**
  directories are fsynced (the strict reading the protocol is written for);
* every operation not yet durable is *pending*: any subset of the pending
  operations may have reached the disk, in any order (each is applied
  atomically, in program order among those chosen);
* a pending write may also reach the disk truncated (its first half) or as
  zeros (the size grew, the data blocks never came: ext4 delalloc);
* an entry whose creation or rename was lost takes its subtree with it.

Per crash point the states tried are: all pending ops, none, each one
omitted, each one alone, each prefix of them in program order, each pending
write truncated or zero-filled, and every subset when at most
:data:`EXHAUSTIVE` operations are pending (seeded random subsets otherwise). Each distinct state is written to a real
directory, recovery runs on it (a writable Store opens), and the invariants
of :mod:`fault_injection.invariants` are checked.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Any

from ckstore import _durable

from .invariants import check_store
from .killpoints import prepare_template
from .report import Row
from .workloads import WORKLOADS, Workload, run_in_process_variant


# ---------------------------------------------------------------- the model file system


@dataclass(frozen=True)
class Op:
    kind: str  # link | unlink | rename | write | fsync | fsync_dir | ack
    a: Any = None  # link/unlink: parent inode; rename: src parent; write/fsync: inode; fsync_dir: dir inode
    name: str | None = None
    b: Any = None  # link: child inode; rename: dst parent; write: offset
    name2: str | None = None  # rename: dst name
    ino: int | None = None  # rename: the inode moved
    new: str | None = None  # link of a new inode: "d" or "f"
    data: bytes | None = None
    what: str = ""  # human description


class Tree:
    """Inodes: directories are dicts name -> inode, files are bytearrays."""

    def __init__(self) -> None:
        self.nodes: dict[int, dict[str, int] | bytearray] = {}
        self.next = 1

    def new(self, node: dict[str, int] | bytearray) -> int:
        ino = self.next
        self.next += 1
        self.nodes[ino] = node
        return ino

    @classmethod
    def snapshot(cls, path: str) -> tuple[Tree, int]:
        tree = cls()

        def walk(p: str) -> int:
            if os.path.isdir(p) and not os.path.islink(p):
                entries = {name: walk(os.path.join(p, name)) for name in sorted(os.listdir(p))}
                return tree.new(entries)
            with open(p, "rb") as fh:
                return tree.new(bytearray(fh.read()))

        return tree, walk(path)

    def copy(self) -> Tree:
        other = Tree()
        other.next = self.next
        other.nodes = {ino: (dict(n) if isinstance(n, dict) else bytearray(n)) for ino, n in self.nodes.items()}
        return other

    def apply(self, op: Op, variant: str = "full") -> None:
        if op.kind == "link":
            self.nodes[op.a][op.name] = op.b
        elif op.kind == "unlink":
            self.nodes[op.a].pop(op.name, None)
        elif op.kind == "rename":
            self.nodes[op.a].pop(op.name, None)
            self.nodes[op.b][op.name2] = op.ino
        elif op.kind == "write":
            data = op.data
            if variant == "half":
                data = data[: len(data) // 2]
            elif variant == "zeros":
                data = bytes(len(data))
            buf = self.nodes[op.a]
            end = op.b + len(data)
            if len(buf) < end:
                buf.extend(bytes(end - len(buf)))
            buf[op.b : end] = data

    def materialize(self, root_ino: int, path: str) -> None:
        os.mkdir(path)
        for name, ino in self.nodes[root_ino].items():
            node = self.nodes[ino]
            child = os.path.join(path, name)
            if isinstance(node, dict):
                self.materialize(ino, child)
            else:
                with open(child, "wb") as fh:
                    fh.write(node)

    def digest(self, root_ino: int) -> str:
        h = hashlib.blake2b(digest_size=16)

        def walk(ino: int, prefix: str) -> None:
            node = self.nodes[ino]
            if isinstance(node, dict):
                h.update(f"D{prefix}\0".encode())
                for name in sorted(node):
                    walk(node[name], prefix + "/" + name)
            else:
                h.update(f"F{prefix}\0{len(node)}\0".encode())
                h.update(node)

        walk(root_ino, "")
        return h.hexdigest()


# ---------------------------------------------------------------- recording


class Recorder:
    """A durability hook that turns a workload's operations into model ops on inodes."""

    def __init__(self, base: str, tree: Tree, base_ino: int) -> None:
        self.base = base
        self.tree = tree  # the live namespace (applied as recorded)
        self.paths: dict[str, int] = {}
        self.ops: list[Op] = []

        def index(ino: int, rel: str) -> None:
            self.paths[rel] = ino
            node = tree.nodes[ino]
            if isinstance(node, dict):
                for name, child in node.items():
                    index(child, f"{rel}/{name}" if rel else name)

        index(base_ino, "")

    def _rel(self, path: str) -> str:
        rel = os.path.relpath(path, self.base)
        if rel.startswith(".."):
            raise RuntimeError(f"operation outside the recorded directory: {path}")
        return "" if rel == "." else rel

    def _parent(self, rel: str) -> tuple[int, str]:
        parent, name = os.path.split(rel)
        return self.paths[parent], name

    def _emit(self, op: Op) -> None:
        self.ops.append(op)
        self.tree.apply(op)

    def mark(self, kind: str, value: Any) -> None:
        self.ops.append(Op("ack", name=kind, data=value, what=f"ack {kind} {value}"))

    def hook(self, op: str, phase: str, path: str, info: dict[str, Any]) -> None:
        if phase != "after":
            return
        rel = self._rel(path)
        site = info.get("site")
        if op in ("mkdir", "create"):
            parent, name = self._parent(rel)
            kind = "d" if op == "mkdir" else "f"
            ino = self.tree.new({} if kind == "d" else bytearray())
            self.paths[rel] = ino
            self._emit(Op("link", parent, name, ino, new=kind, what=f"{op} {rel} [{site}]"))
        elif op == "write":
            data = bytes(info["data"])
            self._emit(Op("write", self.paths[rel], b=info["offset"], data=data, what=f"write {rel} +{info['offset']} {len(data)}B [{site}]"))
        elif op == "fsync":
            self.ops.append(Op("fsync", self.paths[rel], what=f"fsync {rel} [{site}]"))
        elif op == "fsync_dir":
            self.ops.append(Op("fsync_dir", self.paths[rel], what=f"fsync_dir {rel or '.'} [{site}]"))
        elif op in ("unlink", "rmdir"):
            parent, name = self._parent(rel)
            self._emit(Op("unlink", parent, name, what=f"{op} {rel} [{site}]"))
            for p in [p for p in self.paths if p == rel or p.startswith(rel + "/")]:
                del self.paths[p]
        elif op == "rename":
            dst = self._rel(info["dst"])
            sp, sname = self._parent(rel)
            dp, dname = self._parent(dst)
            ino = self.paths[rel]
            self._emit(Op("rename", sp, sname, dp, dname, ino, what=f"rename {rel} -> {dst} [{site}]"))
            moved = {p: i for p, i in self.paths.items() if p == rel or p.startswith(rel + "/")}
            for p in [p for p in self.paths if p == dst or p.startswith(dst + "/")]:
                del self.paths[p]
            for p, i in moved.items():
                del self.paths[p]
                self.paths[dst + p[len(rel) :]] = i
        elif op == "link":  # a hard link (if the durability module grows one): a new name for an inode
            dst = self._rel(info["dst"])
            dp, dname = self._parent(dst)
            ino = self.paths[rel]
            self._emit(Op("link", dp, dname, ino, what=f"link {rel} -> {dst} [{site}]"))
            self.paths[dst] = ino
        # "close" changes nothing on disk


def record(workload: Workload, workdir: str, prepared: tuple[str, list[int]] | None = None) -> tuple[Tree, int, list[Op], list[int]]:
    """Run ``workload`` once with the recording hook; return the base tree, its root inode, the trace and base steps.

    ``prepared``: a template and its steps from :func:`prepare_template` to reuse instead of preparing again.
    """
    template, base_steps = prepared or prepare_template(workload, workdir)
    base = os.path.join(workdir, f"recorded-{workload.name}")
    shutil.rmtree(base, ignore_errors=True)
    shutil.copytree(template, base, symlinks=True)
    tree, base_ino = Tree.snapshot(base)
    recorder = Recorder(base, tree.copy(), base_ino)
    run = run_in_process_variant(workload)
    with _durable.hooked(recorder.hook):
        run(os.path.join(base, "store"), recorder.mark, workload.scale)
    return tree, base_ino, recorder.ops, base_steps


# ---------------------------------------------------------------- enumeration


def pending_at(ops: list[Op], k: int) -> list[int]:
    """Indices of the operations among the first ``k`` that are not yet durable."""
    pending: list[int] = []
    # rename index -> the directories that still need an fsync
    waiting: dict[int, set[int]] = {}
    for i in range(k):
        op = ops[i]
        if op.kind in ("link", "unlink", "write"):
            pending.append(i)
        elif op.kind == "rename":
            pending.append(i)
            waiting[i] = {op.a, op.b}
        elif op.kind == "fsync":
            pending = [j for j in pending if not (ops[j].kind == "write" and ops[j].a == op.a)]
        elif op.kind == "fsync_dir":
            keep = []
            for j in pending:
                o = ops[j]
                if o.kind in ("link", "unlink") and o.a == op.a:
                    continue
                if o.kind == "rename":
                    waiting[j].discard(op.a)
                    if not waiting[j]:
                        continue
                keep.append(j)
            pending = keep
    return pending


#: Up to this many pending operations, every subset of them is a crash state.
EXHAUSTIVE = 8


def states_at(ops: list[Op], k: int, rng: random.Random, random_subsets: int, exhaustive: int = EXHAUSTIVE) -> list[dict[int, str]]:
    """Crash states at crash point ``k``: each maps pending op index -> variant ("full", "half", "zeros"); absent = lost."""
    pending = pending_at(ops, k)
    writes = [j for j in pending if ops[j].kind == "write"]
    full = {j: "full" for j in pending}
    out = [full, {}]
    for n, j in enumerate(pending):
        out.append({i: v for i, v in full.items() if i != j})
        out.append({j: "full"})
        out.append({i: "full" for i in pending[:n]})  # persisted in program order up to j
    for j in writes:
        out.append({**full, j: "half"})
        out.append({**full, j: "zeros"})
    if len(pending) <= exhaustive:  # a small window: every subset of the pending operations
        for mask in range(1 << len(pending)):
            out.append({j: "full" for bit, j in enumerate(pending) if mask >> bit & 1})
    for _ in range(random_subsets if len(pending) > exhaustive else 0):
        chosen = {}
        for j in pending:
            if rng.random() < 0.5:
                chosen[j] = rng.choice(("full", "full", "half", "zeros")) if ops[j].kind == "write" else "full"
        out.append(chosen)
    return out


def build(tree: Tree, ops: list[Op], k: int, chosen: dict[int, str]) -> Tree:
    pending = set(pending_at(ops, k))
    state = tree.copy()
    for op in ops[:k]:
        if op.new is not None:  # inodes exist from their creation on, reachable or not
            state.nodes[op.b] = {} if op.new == "d" else bytearray()
    for i in range(k):
        op = ops[i]
        if op.kind not in ("link", "unlink", "rename", "write"):
            continue
        if i in pending:
            if i not in chosen:
                continue
            state.apply(op, chosen[i])
        else:
            state.apply(op)
    return state


def run_workload(
    workload: Workload,
    workdir: str,
    *,
    random_subsets: int,
    seed: int,
    exhaustive: int = EXHAUSTIVE,
    max_states: int | None = None,
    stop_on_violation: bool = False,
    prepared: tuple[str, list[int]] | None = None,
) -> Row:
    row = Row("2 crash model", workload.name)
    start = time.monotonic()
    tree, base_ino, ops, base_steps = record(workload, workdir, prepared)
    rng = random.Random(seed)
    seen: set[str] = set()
    states_dir = os.path.join(workdir, "model-state")
    for k in range(len(ops) + 1):
        acks = [(op.name, op.data) for op in ops[:k] if op.kind == "ack"]
        for chosen in states_at(ops, k, rng, random_subsets, exhaustive):
            state = build(tree, ops, k, chosen)
            digest = state.digest(base_ino)
            key = digest + repr(sorted(acks, key=repr))
            if key in seen:
                continue
            seen.add(key)
            shutil.rmtree(states_dir, ignore_errors=True)
            state.materialize(base_ino, states_dir)
            row.states += 1
            for message in check_store(os.path.join(states_dir, "store"), workload, acks, base_steps):
                where = ops[k - 1].what if k else "before the first operation"
                lost = [ops[j].what for j in pending_at(ops, k) if j not in chosen][:3]
                row.violation(f"crash after op {k} ({where}); lost/partial {lost}: {message}")
            if stop_on_violation and row.violations:
                break
            if max_states is not None and row.states >= max_states:
                break
        if (stop_on_violation and row.violations) or (max_states is not None and row.states >= max_states):
            break
    row.cycles = len(ops) + 1
    row.seconds = time.monotonic() - start
    row.note = f"{len(ops)} ops, {sum(1 for o in ops if o.kind in ('fsync', 'fsync_dir'))} fsyncs"
    return row


def run_tier(
    workdir: str,
    *,
    workloads: list[str],
    random_subsets: int,
    seed: int,
    exhaustive: int = EXHAUSTIVE,
    stop_on_violation: bool = False,
    prepared: dict[str, tuple[str, list[int]]] | None = None,
) -> list[Row]:
    rows = []
    for n, name in enumerate(workloads):
        rows.append(
            run_workload(
                WORKLOADS[name],
                workdir,
                random_subsets=random_subsets,
                seed=seed + n,
                exhaustive=exhaustive,
                stop_on_violation=stop_on_violation,
                prepared=(prepared or {}).get(name),
            )
        )
        if stop_on_violation and rows[-1].violations:
            break
    return rows
