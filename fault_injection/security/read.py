"""Security attacks of area ``read`` (see the package docstring for the contract).

Crafted files where ckstore reads: FIFOs, links to ``/dev/zero`` and
directories at every file it opens (``manifest.json``, ``tags.json``, tensor
files, the lock owner file), a sparse tensor file that claims 8 GiB, a
manifest bomb, and a tarball of manifest bombs, each under ``ckstore ls``
(in process) and ``load()``. Each attack returns what went wrong: a hang or an
unbounded read (the harness's timeout and memory cap), an untyped exception,
a store whose good checkpoints became unreachable, memory out of proportion
to the bytes read.

Run against commit 74a1b18 (before the fixes of issues 11 and 16) with this
harness (2026-12-02, 2-core VM), these reported findings:
``tags_json_odd_files`` (hung on the FIFO), ``manifest_odd_files``
(IsADirectoryError), ``lock_owner_odd_files`` (hung on the FIFO),
``lock_owner_host_escapes`` (the escapes in the message),
``sparse_tensor_file`` (untyped RuntimeError from the 8 GiB allocation),
``manifest_bomb`` (peak memory grew by 1,447 MiB) and
``tarball_of_manifests`` (ran out of memory: every parse was cached). With
the fixes: none. ``tensor_file_odd_files`` passed there already (tensor files
were opened O_NOFOLLOW|O_NONBLOCK and checked); it guards that.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import tarfile
import warnings

import torch

import ckstore
from ckstore.format.hashing import default_algorithm, hash_bytes

from . import Ctx, attack

_STEP1, _STEP2 = "step-00000001", "step-00000002"


def _store(ctx: Ctx) -> str:
    root = os.path.join(ctx.root, "store")
    with ckstore.Store(root) as store:
        store.save({"w": torch.full((4,), 1.0)}, step=1, metrics={"loss": 1.0})
        store.save({"w": torch.full((4,), 2.0)}, step=2, metrics={"loss": 0.5})
        store.tag(1, "release")
    return root


def _plant(path: str, kind: str) -> None:
    if os.path.lexists(path):
        os.unlink(path)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "devzero":
        os.symlink("/dev/zero", path)
    elif kind == "directory":
        os.mkdir(path)
    else:
        raise ValueError(kind)


def _ls(root: str) -> tuple[int, str, str]:
    """``ckstore ls --json`` in this (forked) process; an escaped exception is a finding of the caller."""
    from ckstore.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("default")
        try:
            code = main(["ls", "--json", root])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def _reads_fine(root: str, what: str, *, steps: list[int], loads: float) -> list[str]:
    """``ls`` lists ``steps``, ``load()`` returns the checkpoint holding ``loads``, ``verify()`` raises nothing."""
    findings = []
    try:
        code, out, _ = _ls(root)
        listed = [c["step"] for c in json.loads(out)["checkpoints"]] if code == 0 else None
        if listed != steps:
            findings.append(f"{what}: ckstore ls exit {code}, listed {listed}, expected {steps}")
    except ckstore.CkstoreError as exc:
        findings.append(f"{what}: ckstore ls raised {type(exc).__name__}: {str(exc)[:120]}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ckstore.Store(root, readonly=True) as store:
            try:
                value = float(store.load()["w"][0])
                if value != loads:
                    findings.append(f"{what}: load() returned the checkpoint holding {value}, expected {loads}")
            except ckstore.CkstoreError as exc:
                findings.append(f"{what}: load() raised {type(exc).__name__}: {str(exc)[:120]}")
            store.verify()
    return findings


def _each_kind(ctx: Ctx, relpath: str, *, steps: list[int], loads: float) -> list[str]:
    findings = []
    for kind in ("fifo", "devzero", "directory"):
        root = _store(ctx)
        try:
            _plant(os.path.join(root, relpath), kind)
            findings += _reads_fine(root, f"{relpath} is a {kind}", steps=steps, loads=loads)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(root, relpath))
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(root, relpath))
            shutil.rmtree(root, ignore_errors=True)
    return findings


@attack("read", timeout=120)
def tags_json_odd_files(ctx: Ctx) -> list[str]:
    """``tags.json`` a FIFO (was: ``ckstore ls`` hung), a link to /dev/zero (was: an unbounded read), a directory."""
    return _each_kind(ctx, "tags.json", steps=[1, 2], loads=2.0)


@attack("read", timeout=120)
def manifest_odd_files(ctx: Ctx) -> list[str]:
    """The newest ``manifest.json`` a FIFO, a /dev/zero link or a directory: skipped, the older one listed and loaded."""
    return _each_kind(ctx, os.path.join("checkpoints", _STEP2, "manifest.json"), steps=[1], loads=1.0)


@attack("read", timeout=120)
def tensor_file_odd_files(ctx: Ctx) -> list[str]:
    """A tensor file of the newest checkpoint a FIFO, a /dev/zero link or a directory: load() falls back."""
    return _each_kind(ctx, os.path.join("checkpoints", _STEP2, "w.safetensors"), steps=[1, 2], loads=1.0)


@attack("read", timeout=60)
def lock_owner_odd_files(ctx: Ctx) -> list[str]:
    """The lock owner file (read to name the holder in StoreLockedError) a FIFO (was: hung) or a /dev/zero link."""
    findings = []
    root = _store(ctx)
    owner = os.path.join(root, ".ckstore.lock.owner")
    for kind in ("fifo", "devzero", "directory"):
        from ckstore.storage.lock import WriterLock

        holder = WriterLock(root)
        holder.acquire()
        try:
            _plant(owner, kind)
            try:
                ckstore.Store(root).save({"w": 1}, step=9)
                findings.append(f"owner file {kind}: a second writer saved while the lock was held")
            except ckstore.StoreLockedError:
                pass
        finally:
            holder.release()
            with contextlib.suppress(OSError):
                os.unlink(owner)
            with contextlib.suppress(OSError):
                os.rmdir(owner)
    return findings


@attack("read", timeout=60)
def lock_owner_host_escapes(ctx: Ctx) -> list[str]:
    """A host name with terminal escapes in the lock owner file must not reach the lock error's message raw."""
    from ckstore.storage.lock import WriterLock

    root = _store(ctx)
    holder = WriterLock(root)
    holder.acquire()
    try:
        owner = os.path.join(root, ".ckstore.lock.owner")
        os.unlink(owner)
        with open(owner, "w") as fh:
            json.dump({"pid": 7, "host": "evil\x1b[2J\x1b]0;pwned\x07\nhost", "since": 1.0}, fh)
        try:
            ckstore.Store(root).save({"w": 1}, step=9)
            return ["a second writer saved while the lock was held"]
        except ckstore.StoreLockedError as exc:
            if not str(exc).isprintable() or (exc.host is not None and not exc.host.isprintable()):
                return [f"lock error carries control characters: {str(exc)!r:.160}"]
    finally:
        holder.release()
    return []


def _resign(directory: str, edit) -> None:
    path = os.path.join(directory, "manifest.json")
    with open(path, "rb") as fh:
        body = json.loads(fh.read())
    edit(body)
    body.pop("checksum", None)
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    body["checksum"] = str(hash_bytes(canon, default_algorithm()))
    with open(path, "wb") as fh:
        fh.write(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())


@attack("read", timeout=120)
def sparse_tensor_file(ctx: Ctx) -> list[str]:
    """A 28 KB tensor file claiming 8 GiB (a hole), size in the manifest to match: refused typed, load() falls back."""
    root = _store(ctx)
    directory = os.path.join(root, "checkpoints", _STEP2)
    path = os.path.join(directory, "w.safetensors")
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 31], "data_offsets": [0, 8 << 30]}}).encode()
    header += b" " * (-len(header) % 8)
    os.unlink(path)
    with open(path, "wb") as fh:
        fh.write(len(header).to_bytes(8, "little") + header)
        fh.truncate(8 + len(header) + (8 << 30))
    def claim_size(entry: dict, size: int) -> None:
        """Set the size; in format 2 also a chunk table of the matching length, each chunk the old first one's hash (the lie)."""
        entry["size"] = size
        if "chunks" in entry:
            from ckstore.format.chunks import ChunkedHash, chunk_count

            entry["chunks"] = [entry["chunks"][0]] * chunk_count(size, entry["chunk_size"])
            digests = tuple(bytes.fromhex(c) for c in entry["chunks"])
            entry["hash"] = str(ChunkedHash(entry["hash"].split(":")[0], size, entry["chunk_size"], digests).root)

    _resign(directory, lambda body: claim_size(body["files"]["w.safetensors"], os.path.getsize(path)))
    findings = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ckstore.Store(root, readonly=True) as store:
            try:
                store.load(step=2)
                findings.append("load(step=2) accepted a lying sparse file")
            except ckstore.CkstoreError:
                pass
    return findings + _reads_fine(root, "sparse 8 GiB tensor file", steps=[1, 2], loads=1.0)


def _grown_mib(before: int) -> int:
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) >> 10


@attack("read", timeout=120)
def manifest_bomb(ctx: Ctx) -> list[str]:
    """A 60 MiB manifest of ``{},{},...`` (22 million dicts, ~1.5 GB parsed): refused before parsing, memory stays near its size."""
    root = _store(ctx)
    with ckstore.Store(root, readonly=True) as store:
        store.load(step=1)
        store.verify(1)  # imports and first-use allocations done before measuring
    items = (60 << 20) // 3
    with open(os.path.join(root, "checkpoints", _STEP2, "manifest.json"), "wb") as fh:
        fh.write(b'{"state":[' + b"{}," * (items - 1) + b"{}]}")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    findings = _reads_fine(root, "manifest bomb", steps=[1], loads=1.0)
    grown = _grown_mib(before)
    if grown > 512:
        findings.append(f"manifest bomb: peak memory grew by {grown} MiB for a 60 MiB file")
    return findings


def _valid_bomb(step: int, items: int) -> bytes:
    """A manifest ckstore's parser accepts (format, checksum, canonical form) whose state is ``items`` empty dicts."""
    head = b'"created":1.0,"files":{},"format":"ckstore.checkpoint","format_version":1,"metrics":{},"retention":null,"state":['
    tail = b'],"step":' + str(step).encode() + b"}"
    body = b"{" + head + b"{}," * (items - 1) + b"{}" + tail
    checksum = str(hash_bytes(body, default_algorithm())).encode()
    return b'{"checksum":"' + checksum + b'",' + head + b"{}," * (items - 1) + b"{}" + tail


@attack("read", timeout=300, memory_gib=3.0)
def tarball_of_manifests(ctx: Ctx) -> list[str]:
    """A small tarball of valid manifests of millions of empty dicts each, unpacked into a store: ``ckstore ls`` must not cache them all."""
    root = _store(ctx)
    tarball = os.path.join(ctx.root, "bomb.tar.gz")
    with tarfile.open(tarball, "w:gz") as tar:
        for step in range(3, 7):
            data = _valid_bomb(step, (40 << 20) // 3)
            info = tarfile.TarInfo(f"checkpoints/step-{step:08d}/manifest.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            del data
    small = os.path.getsize(tarball)
    with tarfile.open(tarball) as tar:
        tar.extractall(root, filter="data")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    findings = _reads_fine(root, f"tarball of manifests ({small >> 10} KiB)", steps=[1, 2], loads=2.0)
    grown = _grown_mib(before)
    if grown > 768:
        findings.append(f"tarball of manifests ({small >> 10} KiB): peak memory grew by {grown} MiB")
    return findings
