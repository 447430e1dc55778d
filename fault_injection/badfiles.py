"""Tier 6: crafted corrupt checkpoints and fuzzing of the manifest and tensor-file readers.

Crafted cases start from a store holding two good checkpoints (steps 3 and 5)
and break step 5 in one way each: safetensors header defects, manifest
defects (bad JSON, checksum, versions, missing or extra files, wrong hash or
size, path traversal, symlinks), torn and zero-filled data. Where a defect
would otherwise be caught by the content hash alone, the manifest is rewritten
with a valid checksum and the matching size and hash, so the parser itself has
to catch it. For each case:

* ``load(step=5)`` raises a ``CkstoreError`` (and nothing else);
* ``verify()`` reports a problem for step 5 and raises nothing;
* ``load()`` falls back to step 3, the newest checkpoint that verifies;
* nothing outside the store is read: traversal and symlink cases point at a
  file outside the store whose size and hash the manifest lists correctly, so
  following the link would *succeed*; a refusal is the only passing outcome.

Each case runs in a forked child under a 20-second alarm, so a hang (say,
opening a FIFO) is a finding rather than a stuck harness.

Fuzzing: a seeded mutation loop feeds the manifest parser (and, when a
manifest parses, the state decoder) and the tensor-file parser (header
parse plus tensor construction). Half the inputs are byte-level mutations
(flips, inserts, deletes, truncation, splices); half are structural: the JSON
is mutated and re-serialized with correct lengths and a valid checksum, so the
input gets past the first gate. Anything but a ``CkstoreError`` is a finding.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import time
from collections.abc import Callable
from typing import Any

import torch

import ckstore
from ckstore.state import decode as _decode
from ckstore.format import manifest as _manifest
from ckstore.format import safetensors as _safetensors
from ckstore.format.chunks import DEFAULT_CHUNK_SIZE, ChunkedHash, ChunkStreamHasher
from ckstore.format.hashing import default_algorithm, hash_bytes

from .report import Row
from .workloads import expected_state, same_state

STEP_DIR = "checkpoints/step-00000005"


# ---------------------------------------------------------------- helpers for crafting


class Case:
    def __init__(self, root: str) -> None:
        self.root = root
        self.dir = os.path.join(root, STEP_DIR)
        self.outside = os.path.join(os.path.dirname(root), "outside")

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.dir, "manifest.json")

    def manifest(self) -> dict[str, Any]:
        with open(self.manifest_path, "rb") as fh:
            return json.loads(fh.read())

    def write_manifest(self, body: dict[str, Any], *, rehash: bool = True) -> None:
        body = dict(body)
        if rehash:
            body.pop("checksum", None)
            body["checksum"] = str(hash_bytes(_canon(body), default_algorithm()))
        self.write_raw("manifest.json", _canon(body))

    def tensor_files(self) -> list[str]:
        return sorted(self.manifest()["files"])

    def read(self, name: str) -> bytes:
        with open(os.path.join(self.dir, name), "rb") as fh:
            return fh.read()

    def write_raw(self, name: str, data: bytes) -> None:
        path = os.path.join(self.dir, name)
        if os.path.lexists(path):
            os.unlink(path)
        with open(path, "wb") as fh:
            fh.write(data)

    def replace_file(self, name: str, data: bytes) -> None:
        """Replace a tensor file and update the manifest's size and hash to match (so only the parser can object)."""
        self.write_raw(name, data)
        body = self.manifest()
        body["files"][name] = _entry_for(body, data)
        self.write_manifest(body)

    def header(self, name: str) -> tuple[dict[str, Any], bytes]:
        data = self.read(name)
        (n,) = struct.unpack_from("<Q", data, 0)
        return json.loads(data[8 : 8 + n]), data[8 + n :]

    def replace_header(self, name: str, header: Any, body: bytes | None = None, *, raw_json: bytes | None = None) -> None:
        old_header, old_body = self.header(name)
        text = raw_json if raw_json is not None else json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        self.replace_file(name, struct.pack("<Q", len(text)) + text + (old_body if body is None else body))


def _entry_for(body: dict[str, Any], data: bytes) -> dict[str, Any]:
    """A correct file entry for ``data`` in the manifest's format: 1, one hash; 2, a chunk table and its root."""
    if body.get("format_version") != 2:
        return {"hash": str(hash_bytes(data, default_algorithm())), "size": len(data)}
    hasher = ChunkStreamHasher(default_algorithm(), DEFAULT_CHUNK_SIZE)
    hasher.update(data)
    return _table_entry(hasher.table())


def _table_entry(table: ChunkedHash) -> dict[str, Any]:
    return {"chunk_size": table.chunk_size, "chunks": [d.hex() for d in table.digests], "hash": str(table.root), "size": table.size}


def _chunk_edit(fn: Callable[[dict[str, Any]], None], *, reroot: bool) -> Callable[[dict[str, Any]], None]:
    """Edit the first file's format-2 entry; with ``reroot`` the root is recomputed, so only the table can disagree (with the file)."""

    def edit(body: dict[str, Any]) -> None:
        entry = body["files"][sorted(body["files"])[0]]
        fn(entry)
        if reroot:
            algo = entry["hash"].split(":")[0]
            digests = tuple(bytes.fromhex(c) for c in entry["chunks"])
            entry["hash"] = str(ChunkedHash(algo, entry["size"], entry["chunk_size"], digests).root)

    return edit


def _other_digest(entry: dict[str, Any]) -> None:
    entry["chunks"][0] = hash_bytes(b"not this chunk", "blake3").hexdigest


def _canon(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True).encode()


def _first(c: Case) -> str:
    """The tensor file with the most tensors (the defects that need two tensors use it)."""
    return max(c.tensor_files(), key=lambda name: (len(c.header(name)[0]), name))


def _first_tensor(c: Case) -> tuple[str, str, dict[str, Any]]:
    name = _first(c)
    header, _ = c.header(name)
    key = next(k for k in header if k != "__metadata__")
    return name, key, header


def _edit_header(fn: Callable[[dict[str, Any], str], None]) -> Callable[[Case], None]:
    def mutate(c: Case) -> None:
        name, key, header = _first_tensor(c)
        fn(header, key)
        c.replace_header(name, header)

    return mutate


def _edit_manifest(fn: Callable[[dict[str, Any]], None], *, rehash: bool = True) -> Callable[[Case], None]:
    def mutate(c: Case) -> None:
        body = c.manifest()
        fn(body)
        c.write_manifest(body, rehash=rehash)

    return mutate


def _outside_copy(c: Case, name: str) -> str:
    """A byte-identical copy of a tensor file outside the store (reading it would verify)."""
    os.makedirs(c.outside, exist_ok=True)
    target = os.path.join(c.outside, name)
    shutil.copyfile(os.path.join(c.dir, name), target)
    return target


def _traversal(prefix: str) -> Callable[[Case], None]:
    def mutate(c: Case) -> None:
        name = _first(c)
        target = _outside_copy(c, name)
        rel = os.path.relpath(target, c.dir) if prefix == "rel" else target
        body = c.manifest()
        body["files"][rel] = body["files"].pop(name)
        _state_rename_file(body, name, rel)
        os.unlink(os.path.join(c.dir, name))
        c.write_manifest(body)

    return mutate


def _state_rename_file(body: dict[str, Any], old: str, new: str) -> None:
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("$ck") == "tensor" and node.get("file") == old:
                node["file"] = new
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(body["state"])


def _symlink_file(c: Case) -> None:
    name = _first(c)
    target = _outside_copy(c, name)
    os.unlink(os.path.join(c.dir, name))
    os.symlink(target, os.path.join(c.dir, name))


def _symlink_manifest(c: Case) -> None:
    os.makedirs(c.outside, exist_ok=True)
    target = os.path.join(c.outside, "manifest.json")
    shutil.copyfile(c.manifest_path, target)
    os.unlink(c.manifest_path)
    os.symlink(target, c.manifest_path)


def _symlink_dir(c: Case) -> None:
    os.makedirs(c.outside, exist_ok=True)
    target = os.path.join(c.outside, "step-00000005")
    shutil.move(c.dir, target)
    os.symlink(target, c.dir)


def _fifo(c: Case) -> None:
    name = _first(c)
    os.unlink(os.path.join(c.dir, name))
    os.mkfifo(os.path.join(c.dir, name))


def _as_dir(c: Case) -> None:
    name = _first(c)
    os.unlink(os.path.join(c.dir, name))
    os.mkdir(os.path.join(c.dir, name))


def _bytes_edit(fn: Callable[[bytes], bytes], *, rehash: bool = False, target: str = "tensor") -> Callable[[Case], None]:
    def mutate(c: Case) -> None:
        name = "manifest.json" if target == "manifest" else _first(c)
        data = fn(c.read(name))
        if rehash and target == "tensor":
            c.replace_file(name, data)
        else:
            c.write_raw(name, data)

    return mutate


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at % len(b)] ^= 0x10
    return bytes(b)


def _sparse_huge_manifest(c: Case) -> None:
    with open(c.manifest_path, "r+b") as fh:
        fh.truncate(300 << 20)


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any], str], None]:
    def fn(header: dict[str, Any], key: str) -> None:
        node: Any = header[key]
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value

    return fn


def _second_key_overlap(header: dict[str, Any], key: str) -> None:
    keys = [k for k in header if k != "__metadata__"]
    a, b = header[keys[0]], header[keys[1]]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + (b["data_offsets"][1] - b["data_offsets"][0])]


def _gap(header: dict[str, Any], key: str) -> None:
    for k, v in header.items():
        if k != "__metadata__":
            v["data_offsets"] = [v["data_offsets"][0] + 4, v["data_offsets"][1] + 4]


def _drop_file_entry(body: dict[str, Any]) -> None:
    body["files"].pop(sorted(body["files"])[0])


def _bad_hash(body: dict[str, Any]) -> None:
    name = sorted(body["files"])[0]
    body["files"][name]["hash"] = "blake3:" + "0" * 64 if body["files"][name]["hash"].startswith("blake3") else "sha256:" + "0" * 64


def _bad_size(body: dict[str, Any]) -> None:
    name = sorted(body["files"])[0]
    body["files"][name]["size"] += 8


def _add_state(body: dict[str, Any], key: str, value: Any) -> None:
    """Add ``key: value`` at the top of the state skeleton, whichever way the top-level dict is encoded."""
    state = body["state"]
    if isinstance(state, dict) and state.get("$ck") == "dict":
        state["items"].append([key, value])
    else:
        state[key] = value


def _deep_manifest(c: Case) -> None:
    """A manifest whose state nests 100,000 lists deep, with a checksum that matches its text."""
    body = c.manifest()
    body.pop("checksum")
    _add_state(body, "extra", "@DEEP@")
    deep = "[" * 100_000 + "]" * 100_000
    text = _canon(body).decode().replace('"@DEEP@"', deep)
    body_text = text[:-1] + ',"checksum":"' + str(hash_bytes(text.encode(), default_algorithm())) + '"}'
    c.write_raw("manifest.json", body_text.encode())


def _bogus_state(kind: str) -> Callable[[dict[str, Any]], None]:
    def fn(body: dict[str, Any]) -> None:
        first = sorted(body["files"])[0]
        value: Any = {
            "unknown_mark": {"$ck": "pickle", "payload": "gASV"},
            "tensor_no_key": {"$ck": "tensor", "file": first},
            "unlisted_file": {"$ck": "tensor", "file": "ghost.safetensors", "key": "x"},
            "missing_key": {"$ck": "tensor", "file": first, "key": "no.such.tensor"},
            "bad_float": {"$ck": "float", "value": "banana"},
            "bad_bytes": {"$ck": "bytes", "base64": "***not base64***"},
            "dict_items_not_pairs": {"$ck": "dict", "items": [[1, 2, 3]]},
            "unhashable_key": {"$ck": "dict", "items": [[[1], 2]]},
            "bad_dtype_name": {"$ck": "dtype", "name": "Tensor"},
            "bad_device": {"$ck": "device", "name": "warp:9"},
            "bad_numpy": {"$ck": "numpy_scalar", "dtype": "not-a-dtype", "value": 1},
        }.get(kind)
        _add_state(body, "extra", value)

    return fn


#: How strictly a case is judged. "file": a defect of the files themselves: load(step=5)
#: raises a CkstoreError, verify() reports it, load() falls back to step 3 (an unlisted
#: file in the checkpoint is such a defect: load refuses it as verify reports it). "decode": a
#: semantically malformed state skeleton under a valid checksum (only a crafted or
#: buggy writer makes one): load(step=5) raises a CkstoreError, and neither verify()
#: nor load() raise anything that is not one.
CASES: list[tuple[str, Callable[[Case], None], str]] = [
    # safetensors headers (manifest rewritten to match, so the parser must object)
    ("header length 2^63", _bytes_edit(lambda d: struct.pack("<Q", 1 << 63) + d[8:], rehash=True), "file"),
    ("header length past EOF", _bytes_edit(lambda d: struct.pack("<Q", len(d)) + d[8:], rehash=True), "file"),
    ("header length 0", _bytes_edit(lambda d: struct.pack("<Q", 0) + d[8:], rehash=True), "file"),
    ("file of 5 bytes", _bytes_edit(lambda d: d[:5], rehash=True), "file"),
    ("empty tensor file", _bytes_edit(lambda d: b"", rehash=True), "file"),
    ("header not JSON", lambda c: c.replace_header(_first(c), None, raw_json=b"{not json"), "file"),
    ("header JSON is a list", lambda c: c.replace_header(_first(c), [1, 2, 3]), "file"),
    ("header not UTF-8", lambda c: c.replace_header(_first(c), None, raw_json=b'{"\xff\xfe": 1}'), "file"),
    ("header nested 100k deep", lambda c: c.replace_header(_first(c), None, raw_json=b"[" * 100_000 + b"]" * 100_000), "file"),
    ("overlapping offsets", _edit_header(_second_key_overlap), "file"),
    ("gap before data", _edit_header(_gap), "file"),
    ("offsets past the end", _edit_header(_set(["data_offsets"], [0, 1 << 40])), "file"),
    ("end before begin", _edit_header(_set(["data_offsets"], [16, 8])), "file"),
    ("offsets are floats", _edit_header(_set(["data_offsets"], [0.0, 8.0])), "file"),
    ("offsets are booleans", _edit_header(_set(["data_offsets"], [False, True])), "file"),
    ("three offsets", _edit_header(_set(["data_offsets"], [0, 4, 8])), "file"),
    ("unknown dtype", _edit_header(_set(["dtype"], "F128")), "file"),
    ("dtype not a string", _edit_header(_set(["dtype"], 7)), "file"),
    ("negative dimension", _edit_header(_set(["shape"], [-1, 4])), "file"),
    ("shape not a list", _edit_header(_set(["shape"], "64x4")), "file"),
    ("shape does not match bytes", _edit_header(_set(["shape"], [3, 3])), "file"),
    ("shape product overflows", _edit_header(_set(["shape"], [1 << 62, 1 << 62, 16])), "file"),
    ("extra field in entry", _edit_header(_set(["crc"], 0)), "file"),
    ("missing data_offsets", _edit_header(lambda h, k: h[k].pop("data_offsets")), "file"),
    ("__metadata__ not strings", _edit_header(lambda h, k: h.__setitem__("__metadata__", {"a": 1})), "file"),
    ("tensor renamed in the file", _edit_header(lambda h, k: h.__setitem__(k + ".renamed", h.pop(k))), "decode"),
    ("trailing bytes after data", lambda c: c.replace_header(_first(c), c.header(_first(c))[0], c.header(_first(c))[1] + b"\0" * 8), "file"),
    # manifests
    ("manifest not JSON", _bytes_edit(lambda d: b"{" + d, target="manifest"), "file"),
    ("manifest empty", _bytes_edit(lambda d: b"", target="manifest"), "file"),
    ("manifest truncated", _bytes_edit(lambda d: d[: len(d) // 2], target="manifest"), "file"),
    ("manifest zero-filled", _bytes_edit(lambda d: bytes(len(d)), target="manifest"), "file"),
    ("manifest byte flipped (checksum)", _bytes_edit(lambda d: _flip(d, len(d) // 3), target="manifest"), "file"),
    ("manifest is 300 MB (sparse)", _sparse_huge_manifest, "file"),
    ("unknown format_version", _edit_manifest(lambda b: b.__setitem__("format_version", 3)), "file"),
    # Format 2: the chunk table (each rewritten with a valid manifest checksum, so the table checks must catch it).
    ("chunk table disagrees with the file", _edit_manifest(_chunk_edit(_other_digest, reroot=True)), "file"),
    ("chunk list truncated", _edit_manifest(_chunk_edit(lambda e: e["chunks"].pop(), reroot=True)), "file"),
    ("chunk list has an extra chunk", _edit_manifest(_chunk_edit(lambda e: e["chunks"].append(e["chunks"][0]), reroot=True)), "file"),
    ("chunk size not a power of two", _edit_manifest(_chunk_edit(lambda e: e.__setitem__("chunk_size", 3 << 19), reroot=True)), "file"),
    ("chunk size below 1 MiB", _edit_manifest(_chunk_edit(lambda e: e.__setitem__("chunk_size", 4096), reroot=True)), "file"),
    ("chunk size is a float", _edit_manifest(_chunk_edit(lambda e: e.__setitem__("chunk_size", float(e["chunk_size"])), reroot=False)), "file"),
    ("chunk digest not hex", _edit_manifest(_chunk_edit(lambda e: e["chunks"].__setitem__(0, "z" * 64), reroot=False)), "file"),
    ("root does not match its chunks", _edit_manifest(_chunk_edit(_other_digest, reroot=False)), "file"),
    ("format-1 entry in a format-2 manifest", _edit_manifest(_chunk_edit(lambda e: [e.pop("chunks"), e.pop("chunk_size")], reroot=False)), "file"),
    ("chunk fields in a format-1 manifest", _edit_manifest(lambda b: b.__setitem__("format_version", 1)), "file"),
    ("format field missing", _edit_manifest(lambda b: b.pop("format")), "file"),
    ("unknown extra field", _edit_manifest(lambda b: b.__setitem__("signature", "x")), "file"),
    ("NaN metric", _edit_manifest(lambda b: b["metrics"].__setitem__("loss", float("nan"))), "file"),
    ("step disagrees with directory", _edit_manifest(lambda b: b.__setitem__("step", 6)), "file"),
    ("listed file missing on disk", lambda c: os.unlink(os.path.join(c.dir, _first(c))), "file"),
    ("file dropped from the manifest", _edit_manifest(_drop_file_entry), "file"),
    ("extra unlisted file on disk", lambda c: c.write_raw("extra.safetensors", b"\0" * 16), "file"),
    ("unlisted symlink to /etc/passwd", lambda c: os.symlink("/etc/passwd", os.path.join(c.dir, "passwd")), "file"),
    ("header: empty tensor of 2^70 elements", _edit_header(lambda h, k: h.__setitem__("empty", {"dtype": "F32", "shape": [0, 1 << 70], "data_offsets": [0, 0]})), "file"),
    ("wrong hash in manifest", _edit_manifest(_bad_hash), "file"),
    ("wrong size in manifest", _edit_manifest(_bad_size), "file"),
    ("malformed hash string", _edit_manifest(lambda b: b["files"][sorted(b["files"])[0]].__setitem__("hash", "md5:abc")), "file"),
    ("path traversal ../", _traversal("rel"), "file"),
    ("absolute path", _traversal("abs"), "file"),
    ("file name with a slash", _edit_manifest(lambda b: b["files"].__setitem__("sub/x.safetensors", {"hash": "blake3:" + "0" * 64, "size": 0})), "file"),
    ("tensor file is a symlink out", _symlink_file, "file"),
    ("manifest is a symlink out", _symlink_manifest, "file"),
    ("checkpoint dir is a symlink out", _symlink_dir, "file"),
    ("tensor file is a FIFO", _fifo, "file"),
    ("tensor file is a directory", _as_dir, "file"),
    ("state: unknown $ck kind", _edit_manifest(_bogus_state("unknown_mark")), "file"),
    ("state: tensor ref without key", _edit_manifest(_bogus_state("tensor_no_key")), "file"),
    ("state: ref to unlisted file", _edit_manifest(_bogus_state("unlisted_file")), "file"),
    ("state: ref to missing tensor", _edit_manifest(_bogus_state("missing_key")), "file"),
    ("state: bad float tag", _edit_manifest(_bogus_state("bad_float")), "file"),
    ("state: bad base64", _edit_manifest(_bogus_state("bad_bytes")), "file"),
    ("state: dict items not pairs", _edit_manifest(_bogus_state("dict_items_not_pairs")), "file"),
    ("state: unhashable dict key", _edit_manifest(_bogus_state("unhashable_key")), "file"),
    ("state: bad dtype name", _edit_manifest(_bogus_state("bad_dtype_name")), "file"),
    ("state: bad device name", _edit_manifest(_bogus_state("bad_device")), "file"),
    ("state: bad numpy scalar", _edit_manifest(_bogus_state("bad_numpy")), "file"),
    ("state: nested 100k deep", lambda c: _deep_manifest(c), "file"),
    # torn and zero-filled data (manifest untouched: the hash must catch it)
    ("data truncated to half", _bytes_edit(lambda d: d[: len(d) // 2]), "file"),
    ("data zero-filled", _bytes_edit(lambda d: bytes(len(d))), "file"),
    ("tail zero-filled", _bytes_edit(lambda d: d[: len(d) - 256] + bytes(256)), "file"),
    ("one bit flipped in data", _bytes_edit(lambda d: _flip(d, len(d) - 3)), "file"),
    ("one bit flipped in header", _bytes_edit(lambda d: _flip(d, 12)), "file"),
    ("file grew by zeros", _bytes_edit(lambda d: d + bytes(4096)), "file"),
]


def _good_store(base: str) -> str:
    root = os.path.join(base, "store")
    with ckstore.Store(root) as store:
        for step in (3, 5):
            store.save(expected_state(step, 16), step=step, metrics={"loss": 1.0 / step})
    return root


def _run_case(root: str, mutate: Callable[[Case], None], mode: str) -> list[str]:
    """Apply one defect and check the store's reaction. Runs in a child: returns violation messages."""
    import warnings

    out = []
    mutate(Case(root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ckstore.Store(root, readonly=True) as store:
            try:
                store.load(step=5)
                out.append("load(step=5) succeeded on a corrupt checkpoint")
            except ckstore.CkstoreError:
                pass
            except Exception as exc:
                out.append(f"load(step=5) raised {type(exc).__name__}: {str(exc)[:120]}")
            try:
                problems = store.verify()
                if mode != "decode" and not any(p.step in (5, None) for p in problems):
                    out.append("verify() found no problem")
            except Exception as exc:
                out.append(f"verify() raised {type(exc).__name__}: {str(exc)[:120]}")
            try:
                state = store.load()
                if mode == "file" and not same_state(state, expected_state(3, 16)):
                    out.append(f"load() returned step {state.get('step') if isinstance(state, dict) else '?'}, not the verified step 3")
            except ckstore.CkstoreError as exc:
                if mode == "file":
                    out.append(f"load() did not fall back to step 3: {type(exc).__name__}: {str(exc)[:120]}")
            except Exception as exc:
                out.append(f"load() raised {type(exc).__name__}: {str(exc)[:120]}")
        # Then as a training run would: open writable (recovery runs) and save. Nothing committed may go:
        # the good step 3 stays, and the damaged step 5 is kept or quarantined, never deleted.
        from .invariants import Oracle, writable_save

        out.extend(writable_save(root, {}, Oracle.build({}, [{"step": 3}], [])))
    return out


def run_crafted(workdir: str) -> Row:
    row = Row("6 bad files", "crafted corrupt checkpoints")
    start = time.monotonic()
    template = os.path.join(workdir, "badfiles-template")
    shutil.rmtree(template, ignore_errors=True)
    os.makedirs(template)
    _good_store(template)
    for name, mutate, mode in CASES:
        base = os.path.join(workdir, "badfiles-case")
        shutil.rmtree(base, ignore_errors=True)
        shutil.copytree(template, base, symlinks=True)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                os.close(read_fd)
                signal.alarm(20)
                try:
                    messages = _run_case(os.path.join(base, "store"), mutate, mode)
                except Exception as exc:
                    messages = [f"harness error while crafting: {type(exc).__name__}: {exc}"]
                os.write(write_fd, json.dumps(messages).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_fd)
        data = b""
        while chunk := os.read(read_fd, 65536):
            data += chunk
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
        row.states += 1
        if os.WIFSIGNALED(status):
            row.violation(f"{name}: the check hung or crashed (signal {os.WTERMSIG(status)})")
            continue
        for message in json.loads(data or b"[]") or []:
            row.violation(f"{name}: {message}")
    row.cycles = row.states
    row.seconds = time.monotonic() - start
    row.note = f"{len(CASES)} cases ({sum(1 for c in CASES if c[2] != 'decode')} file defects, {sum(1 for c in CASES if c[2] == 'decode')} malformed state skeletons)"
    return row


# ---------------------------------------------------------------- fuzzing


def _mutate_bytes(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(6)
        if not b:
            b = bytearray(rng.randbytes(rng.randint(0, 16)))
            continue
        at = rng.randrange(len(b))
        if choice == 0:
            b[at] ^= 1 << rng.randrange(8)
        elif choice == 1:
            b[at] = rng.choice(b'{}[]":,0123456789-.eE \\ntrufalsn\x00\xff')
        elif choice == 2:
            del b[at : at + rng.randint(1, 16)]
        elif choice == 3:
            b[at:at] = rng.randbytes(rng.randint(1, 8))
        elif choice == 4:
            b = b[:at]
        else:
            other = rng.choice(pool)
            j = rng.randrange(len(other) or 1)
            b[at:] = other[j : j + rng.randint(1, 64)]
    return bytes(b)


_JSON_VALUES: list[Any] = [None, True, False, 0, -1, 1 << 64, 1.5, -0.0, 1e308, "", "x", "../x", "blake3:" + "0" * 64, [], {}, [0, 1], {"$ck": "tensor"}, "F32", [1 << 62, 1 << 62]]


def _mutate_json(rng: random.Random, node: Any, depth: int = 0) -> Any:
    """Return a copy of ``node`` with one random structural change somewhere."""
    if isinstance(node, dict) and node and rng.random() < 0.8:
        key = rng.choice(list(node))
        out = dict(node)
        r = rng.random()
        if r < 0.5:
            out[key] = _mutate_json(rng, node[key], depth + 1)
        elif r < 0.65:
            del out[key]
        elif r < 0.8:
            out[key] = rng.choice(_JSON_VALUES)
        elif r < 0.9:
            out[rng.choice(["$ck", "file", "key", "items", "dtype", "shape", "data_offsets", key + "x"])] = rng.choice(_JSON_VALUES)
        else:
            out[key] = {"$ck": rng.choice(["tensor", "tuple", "dict", "float", "bytes", "stateful", "numpy_scalar", "dtype", "device", "size", "bogus"]), "items": rng.choice(_JSON_VALUES)}
        return out
    if isinstance(node, list) and node and rng.random() < 0.8:
        out = list(node)
        i = rng.randrange(len(out))
        r = rng.random()
        if r < 0.5:
            out[i] = _mutate_json(rng, out[i], depth + 1)
        elif r < 0.7:
            del out[i]
        else:
            out.insert(i, rng.choice(_JSON_VALUES))
        return out
    return rng.choice(_JSON_VALUES)


class _Fuzzer:
    def __init__(self, workdir: str, seed: int) -> None:
        self.rng = random.Random(seed)
        base = os.path.join(workdir, "fuzz-seed")
        shutil.rmtree(base, ignore_errors=True)
        os.makedirs(base)
        root = os.path.join(base, "store")
        with ckstore.Store(root) as store:
            model = torch.nn.Linear(3, 2)
            store.save({"model": model, "t": (1, 2.5, float("nan")), "b": b"\x00\x01", "n": None, "s": {"x": [1, "y"]}, "i": torch.arange(5, dtype=torch.int16)}, step=1, metrics={"loss": 0.5})
            info = store.checkpoints()[0]
        with open(os.path.join(info.path, "manifest.json"), "rb") as fh:
            self.manifest = fh.read()
        self.files = {}
        for name in info.files:
            with open(os.path.join(info.path, name), "rb") as fh:
                self.files[name] = fh.read()
        self.tensor_pool = list(self.files.values())
        self.tensors = {name: _safetensors.tensors_from_buffer(bytearray(data), name) for name, data in self.files.items()}
        self.manifest_json = json.loads(self.manifest)
        self.findings: list[str] = []
        self.accepted = 0

    def _finding(self, what: str, exc: BaseException, data: bytes) -> None:
        if len(self.findings) < 5:
            self.findings.append(f"{what}: {type(exc).__name__}: {str(exc)[:120]} on input {data[:80]!r}")
        else:
            self.findings.append("")

    def manifest_input(self) -> bytes:
        if self.rng.random() < 0.5:
            return _mutate_bytes(self.rng, self.manifest, [self.manifest])
        body = _mutate_json(self.rng, {k: v for k, v in self.manifest_json.items() if k != "checksum"})
        if isinstance(body, dict):
            body["checksum"] = str(hash_bytes(_canon(body), default_algorithm()))
        return _canon(body)

    def tensor_input(self) -> bytes:
        data = self.rng.choice(self.tensor_pool)
        if self.rng.random() < 0.5:
            return _mutate_bytes(self.rng, data, self.tensor_pool)
        (n,) = struct.unpack_from("<Q", data, 0)
        header = _mutate_json(self.rng, json.loads(data[8 : 8 + n]))
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        body = data[8 + n :]
        if self.rng.random() < 0.3:
            body = body[: self.rng.randrange(len(body) + 1)] + self.rng.randbytes(self.rng.randrange(16))
        return struct.pack("<Q", len(text)) + text + body

    def source(self, file: str, key: str) -> torch.Tensor:
        try:
            return self.tensors[file][key]
        except KeyError:
            raise ckstore.IntegrityError(f"{file}: no tensor {key!r}", path=file, expected=key, actual="missing") from None

    def one_manifest(self) -> None:
        data = self.manifest_input()
        try:
            manifest = _manifest.parse_manifest(data, path="fuzz/manifest.json")
            _decode.decode_state(manifest.state, self.source)
            self.accepted += 1
        except ckstore.CkstoreError:
            pass
        except Exception as exc:
            self._finding("manifest reader", exc, data)

    def one_tensor_file(self) -> None:
        data = self.tensor_input()
        try:
            _safetensors.tensors_from_buffer(bytearray(data), "fuzz/x.safetensors")
            self.accepted += 1
        except ckstore.CkstoreError:
            pass
        except Exception as exc:
            self._finding("tensor-file reader", exc, data)


def run_fuzz(workdir: str, *, inputs: int, seed: int) -> Row:
    row = Row("6 bad files", "fuzz: manifest + tensor-file readers")
    start = time.monotonic()
    fuzzer = _Fuzzer(workdir, seed)
    import sys

    limit = sys.getrecursionlimit()
    for i in range(inputs):
        if i % 2:
            fuzzer.one_manifest()
        else:
            fuzzer.one_tensor_file()
    assert sys.getrecursionlimit() == limit
    row.cycles = inputs
    row.states = inputs
    for message in fuzzer.findings:
        row.violation(message) if message else row.violation("(more of the same)")
    row.seconds = time.monotonic() - start
    row.note = f"{fuzzer.accepted} mutated inputs were still valid and parsed"
    return row


def run_tier(workdir: str, *, crafted: bool, fuzz_inputs: int, seed: int) -> list[Row]:
    rows = []
    if crafted:
        rows.append(run_crafted(workdir))
    if fuzz_inputs:
        rows.append(run_fuzz(workdir, inputs=fuzz_inputs, seed=seed))
    return rows
