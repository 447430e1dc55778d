"""Tier 2: an ALICE-style crash-state model.

A workload runs once with the recording storage backend installed
(``ckstore/storage/recording.py``); every operation it reports (with the
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

from ckstore.storage.base import using
from ckstore.storage.recording import RecordingStorage

from .invariants import COMPLETES, check_store
from .killpoints import prepare_template
from .report import Row
from .workloads import WORKLOADS, Workload, run_in_process_variant


# ---------------------------------------------------------------- the model file system

#: The lock-owner file (pid and host, written with durable=False): its operations are noise for the state count.
LOCK_OWNER = ".ckstore.lock.owner"


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

    def apply(self, op: Op, variant: str = "full", stale: bytes = b"") -> None:
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
            elif variant == "tail":  # the second half landed, the first is a hole
                data = bytes(len(data) // 2) + data[len(data) // 2 :]
            elif variant == "zeros":
                data = bytes(len(data))
            elif variant == "stale":  # a reused block: another file's old bytes
                data = (stale * (len(data) // max(1, len(stale)) + 1))[: len(data)]
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

    def digest(self, root_ino: int, *, skip_lock_owner: bool = False) -> str:
        """A digest of the tree; ``skip_lock_owner`` leaves out the lock-owner file and its temp files
        (informational, never fsynced: states that differ only there are the same store)."""
        h = hashlib.blake2b(digest_size=16)

        def walk(ino: int, prefix: str) -> None:
            node = self.nodes[ino]
            if isinstance(node, dict):
                h.update(f"D{prefix}\0".encode())
                for name in sorted(node):
                    if skip_lock_owner and LOCK_OWNER in name:
                        continue
                    walk(node[name], prefix + "/" + name)
            else:
                h.update(f"F{prefix}\0{len(node)}\0".encode())
                h.update(node)

        walk(root_ino, "")
        return h.hexdigest()


# ---------------------------------------------------------------- recording


class Recorder:
    """Turns the operations the recording backend reports (:meth:`hook`) into model ops on inodes."""

    def __init__(self, base: str, tree: Tree, base_ino: int) -> None:
        self.base = base
        self.tree = tree  # the live namespace (applied as recorded)
        self.paths: dict[str, int] = {}
        #: Files open for writing, by the path they were created at: a writer's later operations
        #: (write, fsync, close) name that path even after a rename moved the file or its directory,
        #: exactly as its descriptor still names the same inode.
        self.open_files: dict[str, int] = {}
        #: Every file by the path it was created at, closed or not: a duplicated descriptor may still
        #: fsync it after close (that is a legal, if late, fsync of the same inode).
        self.created: dict[str, int] = {}
        self.ops: list[Op] = []
        #: Fail the n-th file fsync (1-based, 0: never) with EIO, and drop that file's dirty pages (fsyncgate).
        self.fail_fsync = 0
        self.fsyncs = 0
        self._armed: str | None = None  # the op whose fsync system call must fail
        self._failed_op: str | None = None  # its "after" event (a swallowed failure) makes nothing durable

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
        if parent not in self.paths:
            self._untracked_dirs(parent)
        return self.paths[parent], name

    def _untracked_dirs(self, rel: str) -> None:
        """Directories made outside the durability module (``os.makedirs``): created, never fsynced.

        They enter the trace as creations no fsync covers, so a crash may lose
        them, and everything under them, as a power cut would.
        """
        parent, name = os.path.split(rel)
        if parent not in self.paths:
            self._untracked_dirs(parent)
        ino = self.tree.new({})
        self.paths[rel] = ino
        self._emit(Op("link", self.paths[parent], name, ino, new="d", what=f"mkdir {rel} [outside _durable]"))

    def _file(self, rel: str) -> int:
        if rel in self.open_files:
            return self.open_files[rel]
        return self.paths[rel] if rel in self.paths else self.created[rel]

    def fsync_syscall(self, real: Any) -> Any:
        """The fsync system call for the recording backend: fails the armed call with EIO, inside the
        library's own error handling (the failure comes from the system call, not from the report before it)."""

        def fsync(fd: int) -> None:
            if self._armed is not None:
                self._failed_op, self._armed = self._armed, None
                raise OSError(5, "Input/output error (injected at the fsync system call)")
            real(fd)

        return fsync

    def _emit(self, op: Op) -> None:
        self.ops.append(op)
        self.tree.apply(op)

    def mark(self, kind: str, value: Any) -> None:
        self.ops.append(Op("ack", name=kind, data=value, what=f"ack {kind} {value}"))

    def hook(self, op: str, phase: str, path: str, info: dict[str, Any]) -> None:
        rel = self._rel(path)
        site = info.get("site")
        if phase == "before" and op in ("fsync", "fsync_dir"):
            self.fsyncs += 1
            if self.fsyncs == self.fail_fsync:
                # The kernel reports EIO; for a file it drops the dirty pages, and a later fsync would
                # succeed. A failed directory fsync makes nothing durable.
                self._armed = op
                if op == "fsync":
                    self.ops.append(Op("fsync_fail", self._file(rel), what=f"fsync {rel} FAILED (EIO, pages dropped) [{site}]"))
                else:
                    self.ops.append(Op("ack", name="note", what=f"fsync_dir {rel or '.'} FAILED (EIO) [{site}]"))
        if phase != "after":
            return
        if op == self._failed_op:  # the library went on as if the failed fsync had worked: it did not
            self._failed_op = None
            return
        if op in ("mkdir", "create"):
            parent, name = self._parent(rel)
            kind = "d" if op == "mkdir" else "f"
            ino = self.tree.new({} if kind == "d" else bytearray())
            self.paths[rel] = ino
            if kind == "f":
                self.open_files[rel] = ino
                self.created[rel] = ino
            self._emit(Op("link", parent, name, ino, new=kind, what=f"{op} {rel} [{site}]"))
        elif op == "write":
            data = bytes(info["data"])
            self._emit(Op("write", self._file(rel), b=info["offset"], data=data, what=f"write {rel} +{info['offset']} {len(data)}B [{site}]"))
        elif op == "fsync":
            self.ops.append(Op("fsync", self._file(rel), what=f"fsync {rel} [{site}]"))
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
        elif op == "close":  # changes nothing on disk; the descriptor is gone
            self.open_files.pop(rel, None)


def record(
    workload: Workload, workdir: str, prepared: tuple[str, list[int]] | None = None, *, fail_fsync: int = 0
) -> tuple[Tree, int, list[Op], list[int]]:
    """Run ``workload`` once with the recording hook; return the base tree, its root inode, the trace and base steps.

    ``prepared``: a template and its steps from :func:`prepare_template` to reuse instead of preparing again.
    ``fail_fsync``: fail the n-th file fsync (fsyncgate); the run's own error is then expected and
    recorded as an ``ack`` of kind ``failed``. Any other exception is recorded as ``raised``.
    """
    template, base_steps = prepared or prepare_template(workload, workdir)
    base = os.path.join(workdir, f"recorded-{workload.name}")
    shutil.rmtree(base, ignore_errors=True)
    shutil.copytree(template, base, symlinks=True)
    tree, base_ino = Tree.snapshot(base)
    recorder = Recorder(base, tree.copy(), base_ino)
    recorder.fail_fsync = fail_fsync
    run = run_in_process_variant(workload)
    backend = RecordingStorage(recorder.hook, fsync=recorder.fsync_syscall(os.fsync))
    try:
        with using(backend):
            run(os.path.join(base, "store"), recorder.mark, workload.scale)
    except Exception as exc:
        recorder.mark("failed" if fail_fsync and recorder.fsyncs >= fail_fsync else "raised", f"{type(exc).__name__}: {str(exc)[:300]}")
    return tree, base_ino, recorder.ops, base_steps


# ---------------------------------------------------------------- enumeration


def durability(ops: list[Op], k: int) -> tuple[list[int], set[int]]:
    """Among the first ``k`` operations: the indices not yet durable, and the writes whose pages were
    dropped by a failed fsync (they never reach the disk, whatever fsync follows: fsyncgate)."""
    pending: list[int] = []
    dropped: set[int] = set()
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
        elif op.kind == "fsync_fail":
            gone = {j for j in pending if ops[j].kind == "write" and ops[j].a == op.a}
            dropped |= gone
            pending = [j for j in pending if j not in gone]
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
    return pending, dropped


def pending_at(ops: list[Op], k: int) -> list[int]:
    """Indices of the operations among the first ``k`` that are not yet durable."""
    return durability(ops, k)[0]


#: Up to this many pending operations, every subset of them is a crash state.
EXHAUSTIVE = 8

#: How a pending write may reach the disk: whole, a prefix ("half"), a suffix with a hole before it
#: ("tail": not a prefix), size grown but no data ("zeros"), or another file's old bytes ("stale").
TORN = ("half", "tail", "zeros", "stale")


def states_at(ops: list[Op], k: int, rng: random.Random, random_subsets: int, exhaustive: int = EXHAUSTIVE, *, torn: bool = True) -> list[dict[int, str]]:
    """Crash states at crash point ``k``: each maps pending op index -> variant ("full" or one of :data:`TORN`); absent = lost."""
    pending = pending_at(ops, k)
    writes = [j for j in pending if ops[j].kind == "write"]
    full = {j: "full" for j in pending}
    out = [full, {}]
    if not torn:  # the reduced set (fsyncgate runs): all, none, and each program-order prefix
        return out + [{i: "full" for i in pending[:n]} for n in range(1, len(pending))]
    for n, j in enumerate(pending):
        out.append({i: v for i, v in full.items() if i != j})
        out.append({j: "full"})
        out.append({i: "full" for i in pending[:n]})  # persisted in program order up to j
    for j in writes if torn else ():
        for variant in TORN:
            out.append({**full, j: variant})
    if torn and len(writes) > 1:  # several torn writes in one state
        for variant in TORN:
            out.append({**full, **{j: variant for j in writes}})
        out.append({**full, **{j: rng.choice(TORN) for j in writes}})
    if len(pending) <= exhaustive:  # a small window: every subset of the pending operations
        for mask in range(1 << len(pending)):
            out.append({j: "full" for bit, j in enumerate(pending) if mask >> bit & 1})
    for _ in range(random_subsets if len(pending) > exhaustive else 0):
        chosen = {}
        for j in pending:
            if rng.random() < 0.5:
                chosen[j] = rng.choice(("full", "full") + TORN) if ops[j].kind == "write" else "full"
        out.append(chosen)
    return out


def _stale_source(ops: list[Op], i: int) -> bytes:
    """Old bytes a reused block may hold: the data of the latest earlier write to another file."""
    for j in range(i - 1, -1, -1):
        if ops[j].kind == "write" and ops[j].a != ops[i].a and ops[j].data:
            return ops[j].data
    return b"\xa5"


def build(tree: Tree, ops: list[Op], k: int, chosen: dict[int, str]) -> Tree:
    pending_list, dropped = durability(ops, k)
    pending = set(pending_list)
    state = tree.copy()
    for op in ops[:k]:
        if op.new is not None:  # inodes exist from their creation on, reachable or not
            state.nodes[op.b] = {} if op.new == "d" else bytearray()
    for i in range(k):
        op = ops[i]
        if op.kind not in ("link", "unlink", "rename", "write"):
            continue
        if i in dropped:
            state.apply(op, "zeros")  # the size was recorded, the pages were dropped
        elif i in pending:
            if i not in chosen:
                continue
            variant = chosen[i]
            state.apply(op, variant, stale=_stale_source(ops, i) if variant == "stale" else b"")
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
    check_states(row, workload, workdir, tree, base_ino, ops, base_steps, random.Random(seed), random_subsets, exhaustive, max_states, stop_on_violation)
    row.seconds = time.monotonic() - start
    return row


def check_states(
    row: Row,
    workload: Workload,
    workdir: str,
    tree: Tree,
    base_ino: int,
    ops: list[Op],
    base_steps: list[int],
    rng: random.Random,
    random_subsets: int,
    exhaustive: int = EXHAUSTIVE,
    max_states: int | None = None,
    stop_on_violation: bool = False,
    points: range | None = None,
    torn: bool = True,
) -> None:
    """Enumerate, deduplicate and check the crash states of a recorded trace; count them into ``row``.

    ``row.states`` counts distinct states without the lock-owner file's noise
    (only those are checked, one representative each); the note also gives
    the count with it, as earlier tables reported.
    """
    raised = [op.data for op in ops if op.kind == "ack" and op.name == "raised"]
    if raised:
        row.violation(f"{COMPLETES}: the recorded run raised: {raised[0]}")
    seen: set[str] = set()
    noisy: set[str] = set()
    states_dir = os.path.join(workdir, "model-state")
    lock_ops = sum(1 for op in ops if LOCK_OWNER in op.what)
    for k in points if points is not None else range(len(ops) + 1):
        acks = [(op.name, op.data) for op in ops[:k] if op.kind == "ack"]
        ack_key = repr(sorted(acks, key=repr))
        pending = pending_at(ops, k)
        for chosen in states_at(ops, k, rng, random_subsets, exhaustive, torn=torn):
            state = build(tree, ops, k, chosen)
            noisy.add(state.digest(base_ino) + ack_key)
            key = state.digest(base_ino, skip_lock_owner=True) + ack_key
            if key in seen:
                continue
            seen.add(key)
            shutil.rmtree(states_dir, ignore_errors=True)
            state.materialize(base_ino, states_dir)
            row.states += 1
            final = k == len(ops) and not raised and all(chosen.get(j) == "full" for j in pending)
            for message in check_store(os.path.join(states_dir, "store"), workload, acks, base_steps, quiescent=final):
                where = ops[k - 1].what if k else "before the first operation"
                lost = [f"{ops[j].what} ({chosen[j]})" if j in chosen else ops[j].what for j in pending if chosen.get(j) != "full"][:3]
                row.violation(f"crash after op {k} ({where}); lost/partial {lost}: {message}")
            if stop_on_violation and row.violations:
                break
            if max_states is not None and row.states >= max_states:
                break
        if (stop_on_violation and row.violations) or (max_states is not None and row.states >= max_states):
            break
    row.cycles += len(points) if points is not None else len(ops) + 1
    row.extra += len(noisy)
    fsyncs = sum(1 for o in ops if o.kind in ("fsync", "fsync_dir"))
    row.note = (
        f"{len(ops)} ops ({lock_ops} lock-owner), {fsyncs} fsyncs; "
        f"{row.extra} states counting lock-owner variants"
    )


def run_fsyncgate(workload: Workload, workdir: str, *, limit: int, seed: int, stop_on_violation: bool = False, prepared: tuple[str, list[int]] | None = None) -> Row:
    """Fail each file fsync of the run in turn (up to ``limit`` of them, spread over the run) with EIO;
    the failing file's dirty pages are dropped, as Linux does, and a later fsync of it would succeed.

    Every state from the failure to the end of the run is checked (reduced variants): a save that
    ignored the failure and committed would leave a visible checkpoint with a hole in its data.
    """
    row = Row("2 crash model", f"{workload.name} (fsyncgate)")
    start = time.monotonic()
    prepared = prepared or prepare_template(workload, workdir)
    _, _, clean, _ = record(workload, workdir, prepared)
    total = sum(1 for op in clean if op.kind in ("fsync", "fsync_dir"))
    picks = sorted({1 + (i * total) // max(1, limit) for i in range(min(limit, total))})
    rng = random.Random(seed)
    for n in picks:
        tree, base_ino, ops, base_steps = record(workload, workdir, prepared, fail_fsync=n)
        failed_at = next((i for i, op in enumerate(ops) if op.kind == "fsync_fail" or "FAILED" in op.what), len(ops))
        check_states(row, workload, workdir, tree, base_ino, ops, base_steps, rng, 0, exhaustive=2, stop_on_violation=stop_on_violation, points=range(failed_at + 1, len(ops) + 1), torn=False)
        if stop_on_violation and row.violations:
            break
    row.seconds = time.monotonic() - start
    row.note = f"{len(picks)} of {total} fsyncs failed in turn at the system call; " + row.note
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
