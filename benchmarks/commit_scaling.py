"""How a multi-rank commit scales with the number of ranks: a simulation with ckstore's real manifest and commit code.

    python -m benchmarks.commit_scaling [--ranks 1 8 1000 10000] [--json out.json]
    python -m benchmarks.commit_scaling --coordinator [--ranks 1000 10000] [--tensors 4] [--json out.json]

Two sections; no process group is started in either.

**Real model shapes** (the default). For a 70B and a 1B Llama-shaped model with Adam, FSDP2-sharded (every parameter and both Adam moments are
``Shard(0)`` DTensors over all N ranks, fp32: 12 bytes per parameter; the per-parameter ``step`` counters are
replicated, and DCP writes them once), it computes for each rank count:

* **files**: the layout of the distributed save (one ``rank-<r>.safetensors`` per rank in one staging
  directory, plus ``manifest.json``): files per directory, what each rank writes;
* **manifest**: two metadata designs, built as real :class:`ckstore.format.manifest.Manifest` objects with
  synthetic BLAKE3 hashes, encoded with ``to_json`` and parsed with ``parse_manifest`` (the reader's full
  validation: checksum, canonical form, skeleton):

  - *per-chunk* (the DCP ``Metadata`` carried as JSON, one ``storage`` entry with offset, length and hash per
    saved chunk: O(tensors x ranks));
  - *compact* (per-rank file list + one entry per logical tensor with its sharding, chunks implied by the
    even ``Shard(0)`` split: O(tensors + ranks)).

  A manifest whose estimate exceeds ``MAX_MANIFEST_BYTES`` is not built: its size is extrapolated from the
  per-chunk bytes measured on the largest one built, and it is marked as refused by the reader's cap.
  Both are built as format 1 (one hash per file), as when these figures were first taken; format 2, what
  saves write since 2026-12, adds to every file entry a table of one digest per MiB of the file, whatever
  the design: its digest count and bytes (bytes per digest measured on a real format-2 manifest) are a
  column of their own;
* **gather**: bytes each rank sends to the coordinator (its pickled write results, as
  ``gather_object`` sends them) and a latency model, flat (the root receives N-1 messages one after another)
  and binomial tree (log2 N rounds); the root's link carries all bytes either way. Coordinator unpickling is
  measured on one rank's record and scaled by N;
* **fsync**: the coordinator's fsyncs per commit, per protocol step (docs/guarantees.md), and all ranks'
  total;
* **directory ops**: creating, listing and renaming a staging directory of N+1 empty files, measured on this
  machine's disk;
* **verify**: manifest parse plus hashing the data, by the coordinator alone or by every rank its own share
  (BLAKE3 speed measured here, one thread).

Everything here is a model except what is marked measured; the assumptions are printed with the table.

**The real coordinator** (``--coordinator``). For R ranks holding T tensors each, sharded FSDP-style (every
tensor split in R row chunks, one per rank), it

* writes one small shard file per rank into a real staging directory of a real store in the system's
  temporary directory (what the ranks would have written; not fsynced: the ranks' writes are not what is
  measured),
* builds the WriteResults each rank's ``StoreWriter.write_data`` returns and DCP's global ``Metadata``, and
  measures what DCP's collectives would carry (DCP pickles plans and results through ``gather_object``, so
  the pickled size is the payload),
* gives each rank file's entry its real format-2 chunk table (one chunk: the files are small),
* runs the real ``StoreWriter.finish`` on the coordinator (metadata to JSON, manifest, the commit) while
  counting its durable operations, then parses the committed manifest back with ``StoreReader.read_metadata``.

Metadata grows with R x T chunks; the per-chunk figures let a reader scale to their own model (a
7B-parameter model under FSDP with Adam holds ~900 tensors per rank: parameters and two moments).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import platform
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from ckstore.format.chunks import DEFAULT_CHUNK_SIZE, ChunkedHash, ChunkStreamHasher, chunk_count
from ckstore.format.hashing import HashInfo, hash_bytes
from ckstore.format.manifest import MAX_MANIFEST_BYTES, MAX_MANIFEST_NODES, FileEntry, Manifest, count_nodes, parse_manifest

#: Latency of one message (gloo over TCP in one data centre) and the coordinator link's bytes per second (100 GbE).
ALPHA_S = 30e-6
BETA_BYTES_PER_S = 12.5e9
#: Bytes per parameter in the state: fp32 parameter + Adam exp_avg + exp_avg_sq.
BYTES_PER_PARAM = 12
#: Mixed directory ops are measured up to this many files (more would load the shared 2-core VM).
MAX_DIR_FILES = 10_001


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    hidden: int
    ffn: int
    kv: int
    vocab: int
    tied: bool

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, f, kv = self.hidden, self.ffn, self.kv
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (f, h)),
                (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        out.append(("model.norm.weight", (h,)))
        if not self.tied:
            out.append(("lm_head.weight", (self.vocab, h)))
        return out


MODELS = {
    "70B": Model("70B (Llama-3-70B shape)", layers=80, hidden=8192, ffn=28672, kv=1024, vocab=128256, tied=False),
    "1B": Model("1B (Llama-3.2-1B shape)", layers=16, hidden=2048, ffn=8192, kv=512, vocab=128256, tied=True),
}


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _shard_rows(rows: int, ranks: int, rank: int) -> int:
    """Rows of a Shard(0) DTensor on ``rank``: torch.chunk semantics (ceil-sized chunks, the last ones short or empty)."""
    per = -(-rows // ranks)
    return max(0, min(per, rows - rank * per))


def _fake_hash(rng: Any = None) -> HashInfo:
    return HashInfo("blake3", secrets.token_hex(32))


def _chunk_entry(shape: tuple[int, ...], ranks: int, rank: int, offset: int) -> tuple[dict[str, Any], int]:
    rows = _shard_rows(shape[0], ranks, rank)
    start = min(shape[0], rank * -(-shape[0] // ranks))
    sizes = [rows, *shape[1:]]
    length = rows * (_numel(shape) // shape[0]) * 4
    entry = {
        "offsets": [start] + [0] * (len(shape) - 1),
        "sizes": sizes,
        "storage": {"file": f"rank-{rank:05d}.safetensors", "offset": offset, "length": length, "hash": str(_fake_hash()), "dtype": "F32"},
    }
    return entry, length


def _rank_records(model: Model, ranks: int, rank: int) -> tuple[list[tuple[str, dict[str, Any]]], int]:
    """One rank's write results: (tensor key, chunk entry) for its shard of each parameter and both Adam moments."""
    records, offset = [], 0
    for fqn, shape in model.tensors():
        for key in (fqn, f"optim.state.{fqn}.exp_avg", f"optim.state.{fqn}.exp_avg_sq"):
            entry, length = _chunk_entry(shape, ranks, rank, offset)
            records.append((key, entry))
            offset += length
    return records, offset


def _tensor_meta(shape: tuple[int, ...]) -> dict[str, Any]:
    return {"dtype": "float32", "layout": "strided", "requires_grad": False, "memory_format": "contiguous_format", "pin_memory": False, "size": list(shape)}


def per_chunk_manifest(model: Model, ranks: int) -> Manifest:
    tensors: dict[str, Any] = {}
    files: dict[str, FileEntry] = {}
    for rank in range(ranks):
        records, nbytes = _rank_records(model, ranks, rank)
        files[f"rank-{rank:05d}.safetensors"] = FileEntry(nbytes, _fake_hash())
        shapes = {key: shape for fqn, shape in model.tensors() for key in (fqn, f"optim.state.{fqn}.exp_avg", f"optim.state.{fqn}.exp_avg_sq")}
        for key, entry in records:
            tensors.setdefault(key, {**_tensor_meta(shapes[key]), "chunks": []})["chunks"].append(entry)
    state = {"dcp": {"format": "ckstore.dcp-metadata", "format_version": 1, "version": "1.0.0", "tensors": tensors}}
    return Manifest(step=1000, created=1764670000.0, files=files, state=state, format_version=1)


def compact_manifest(model: Model, ranks: int) -> Manifest:
    files = {f"rank-{rank:05d}.safetensors": FileEntry(_rank_file_bytes(model, ranks, rank), _fake_hash()) for rank in range(ranks)}
    tensors = {
        key: {**_tensor_meta(shape), "placement": {"shard": 0, "ranks": ranks}}
        for fqn, shape in model.tensors()
        for key in (fqn, f"optim.state.{fqn}.exp_avg", f"optim.state.{fqn}.exp_avg_sq")
    }
    return Manifest(step=1000, created=1764670000.0, files=files, state={"sharded": {"tensors": tensors}}, format_version=1)


def _rank_file_bytes(model: Model, ranks: int, rank: int) -> int:
    """Bytes of ``rank``'s file: its Shard(0) rows of every parameter and both Adam moments, fp32."""
    return sum(_shard_rows(shape[0], ranks, rank) * (_numel(shape) // shape[0]) * 4 * 3 for _, shape in model.tensors())


def format2_bytes_per_digest() -> float:
    """Manifest bytes one chunk digest adds in format 2 (measured: a real format-2 manifest of 1 and of 1,001 chunks)."""

    def size(chunks: int) -> int:
        digests = tuple(secrets.token_bytes(32) for _ in range(chunks))
        table = ChunkedHash("blake3", chunks * DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_SIZE, digests)
        return len(Manifest(step=1, created=1764670000.0, files={"f": FileEntry(table.size, table.root, table)}, state={}).to_json())

    return (size(1001) - size(1)) / 1000


def format2_chunk_tables(model: Model, ranks: int, per_digest: float) -> dict[str, Any]:
    """What format 2's chunk tables (one digest per MiB of each file) add to either design's manifest."""
    digests = sum(chunk_count(_rank_file_bytes(model, ranks, rank), DEFAULT_CHUNK_SIZE) for rank in range(ranks))
    return {"digests": digests, "bytes": int(digests * per_digest), "chunk_size": DEFAULT_CHUNK_SIZE}


def _time(fn: Any, repeat: int = 3) -> float:
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_manifest(build: Any, model: Model, ranks: int, per_unit: dict[str, float] | None, units: int) -> dict[str, Any]:
    """Build, encode and parse the manifest if it fits the reader's caps; otherwise extrapolate from ``per_unit``."""
    if per_unit is not None:
        estimate = per_unit["bytes"] * units
        if estimate > MAX_MANIFEST_BYTES:
            return {
                "bytes": int(estimate),
                "nodes": int(per_unit["nodes"] * units),
                "encode_s": per_unit["encode_s"] * units,
                "parse_s": per_unit["parse_s"] * units,
                "built": False,
                "refused": True,
            }
    manifest = build(model, ranks)
    data = manifest.to_json()
    encode_s = _time(manifest.to_json, repeat=1 if len(data) > 8 << 20 else 3)
    parse_s = _time(lambda: parse_manifest(data), repeat=1 if len(data) > 8 << 20 else 3)
    nodes = count_nodes(data)
    return {
        "bytes": len(data),
        "nodes": nodes,
        "encode_s": encode_s,
        "parse_s": parse_s,
        "built": True,
        "refused": len(data) > MAX_MANIFEST_BYTES or nodes > MAX_MANIFEST_NODES,
    }


def gather_model(record_bytes: int, ranks: int, unpickle_s: float) -> dict[str, Any]:
    senders = ranks - 1
    wire = BETA_BYTES_PER_S and (senders * record_bytes) / BETA_BYTES_PER_S
    return {
        "record_bytes": record_bytes,
        "root_bytes": senders * record_bytes,
        "flat_s": senders * ALPHA_S + wire + ranks * unpickle_s,
        "tree_s": math.ceil(math.log2(ranks)) * ALPHA_S + wire + ranks * unpickle_s if ranks > 1 else 0.0,
        "unpickle_s": ranks * unpickle_s,
    }


def measure_dir_ops(files: int, root: str) -> dict[str, float]:
    """Create ``files`` empty files in one new directory, fsync it, list it, rename it: this disk, measured."""
    base = tempfile.mkdtemp(prefix="ckstore-dirops-", dir=root)
    try:
        staging = os.path.join(base, "step.staging")
        os.mkdir(staging)
        t = time.perf_counter()
        for rank in range(files):
            os.close(os.open(os.path.join(staging, f"rank-{rank:05d}.safetensors"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        create_s = time.perf_counter() - t
        t = time.perf_counter()
        fd = os.open(staging, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        fsync_s = time.perf_counter() - t
        t = time.perf_counter()
        listed = len(os.listdir(staging))
        list_s = time.perf_counter() - t
        assert listed == files
        t = time.perf_counter()
        os.rename(staging, os.path.join(base, "step-00001000"))
        fd = os.open(base, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        rename_s = time.perf_counter() - t
        return {"create_s": create_s, "dir_fsync_s": fsync_s, "list_s": list_s, "rename_fsync_s": rename_s}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def hash_speed() -> float:
    data = os.urandom(64 << 20)
    seconds = _time(lambda: hash_bytes(data, "blake3"), repeat=2)
    return len(data) / seconds


#: Coordinator fsyncs per protocol step (docs/guarantees.md, "Commit protocol"), for a save with one tag and
#: retention deleting one checkpoint. Each is one call whatever the number of ranks.
FSYNC_STEPS = [
    ("3. its own rank file", 1),
    ("4. manifest.json", 1),
    ("5. staging directory", 1),
    ("7. checkpoints/ and .staging/", 2),
    ("8. tags.json + store root", 2),
    ("9. retention: .trash/ after each rename", 1),
]


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=os.path.dirname(__file__))
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(ranks_list: list[int], root: str) -> dict[str, Any]:
    speed = hash_speed()
    per_digest = format2_bytes_per_digest()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": _git_commit(),
        "machine": f"{os.cpu_count()}-core VM, {platform.python_implementation()} {platform.python_version()}",
        "assumptions": {
            "alpha_s": ALPHA_S,
            "beta_bytes_per_s": BETA_BYTES_PER_S,
            "bytes_per_param": BYTES_PER_PARAM,
            "blake3_bytes_per_s_one_thread": speed,
            "max_manifest_bytes": MAX_MANIFEST_BYTES,
            "max_manifest_nodes": MAX_MANIFEST_NODES,
            "format2_bytes_per_digest": per_digest,
        },
        "fsync_steps": FSYNC_STEPS,
        "dir_ops": {},
        "rows": [],
    }
    for n in sorted(set(ranks_list)):
        if n + 1 <= MAX_DIR_FILES:
            results["dir_ops"][n + 1] = measure_dir_ops(n + 1, root)
    for key, model in MODELS.items():
        params = sum(_numel(s) for _, s in model.tensors())
        per_chunk_unit = compact_unit = None
        for n in sorted(set(ranks_list)):
            records, rank_bytes = _rank_records(model, n, 0)
            record = pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL)
            unpickle_s = _time(lambda: pickle.loads(record))
            chunks = len(records) * n
            per_chunk = measure_manifest(per_chunk_manifest, model, n, per_chunk_unit, chunks)
            if per_chunk["built"]:
                per_chunk_unit = {k: per_chunk[k] / chunks for k in ("bytes", "nodes", "encode_s", "parse_s")}
            compact = measure_manifest(compact_manifest, model, n, compact_unit, n)
            total_bytes = params * BYTES_PER_PARAM
            coordinator_fsyncs = sum(count for _, count in FSYNC_STEPS)
            results["rows"].append(
                {
                    "model": key,
                    "params": params,
                    "state_bytes": total_bytes,
                    "ranks": n,
                    "rank0_bytes": rank_bytes,
                    "files_in_dir": n + 1,
                    "chunks": chunks,
                    "per_chunk_manifest": per_chunk,
                    "compact_manifest": compact,
                    "format2_chunk_tables": format2_chunk_tables(model, n, per_digest),
                    "gather": gather_model(len(record), n, unpickle_s),
                    "coordinator_fsyncs": coordinator_fsyncs,
                    "all_ranks_fsyncs": coordinator_fsyncs + (n - 1),
                    "verify_coordinator_s": total_bytes / speed,
                    "verify_per_rank_s": rank_bytes / speed,
                }
            )
    return results


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"


def _secs(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    if s < 600:
        return f"{s:.3g} s"
    return f"{s / 60:.3g} min"


def report(results: dict[str, Any]) -> str:
    a = results["assumptions"]
    lines = [
        f"commit scaling, {results['date']}, commit {results['commit']}, {results['machine']}",
        f"model: alpha={a['alpha_s'] * 1e6:.0f} µs/message, beta=1/({a['beta_bytes_per_s'] / 1e9:g} GB/s); "
        f"BLAKE3 measured {a['blake3_bytes_per_s_one_thread'] / 1e9:.2f} GB/s one thread; manifest cap {_size(a['max_manifest_bytes'])}",
        "",
        "manifests built as format 1 (one hash per file); format 2 adds a chunk table to every file entry: "
        f"{a['format2_bytes_per_digest']:.1f} B per 1 MiB digest, measured (last column)",
        "",
        "| model | ranks | state / rank 0 | files in staging dir | chunks | per-chunk manifest (parse) | compact manifest (parse) "
        "| gather: per rank, at root | gather flat / tree (incl. unpickle) | coordinator fsyncs (all ranks) | verify: coordinator alone / per rank "
        "| format 2 chunk tables: digests, + manifest bytes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        pc, cm, g = r["per_chunk_manifest"], r["compact_manifest"], r["gather"]
        pc_text = f"{_size(pc['bytes'])} ({_secs(pc['parse_s'])})" + ("" if pc["built"] else " est.") + (" REFUSED by cap" if pc["refused"] else "")
        cm_text = f"{_size(cm['bytes'])} ({_secs(cm['parse_s'])})" + ("" if cm["built"] else " est.") + (" REFUSED by cap" if cm["refused"] else "")
        lines.append(
            f"| {r['model']} | {r['ranks']:,} | {_size(r['state_bytes'])} / {_size(r['rank0_bytes'])} | {r['files_in_dir']:,} | {r['chunks']:,} "
            f"| {pc_text} | {cm_text} | {_size(g['record_bytes'])}, {_size(g['root_bytes'])} | {_secs(g['flat_s'])} / {_secs(g['tree_s'])} "
            f"| {r['coordinator_fsyncs']} ({r['all_ranks_fsyncs']:,}) | {_secs(r['verify_coordinator_s'])} / {_secs(r['verify_per_rank_s'])} "
            f"| {r['format2_chunk_tables']['digests']:,}, +{_size(r['format2_chunk_tables']['bytes'])} |"
        )
    lines += ["", "coordinator fsyncs per protocol step: " + ", ".join(f"{step}: {n}" for step, n in results["fsync_steps"])]
    lines += ["", "| files in one directory (this disk) | create | dir fsync | list | rename + fsync parent |", "|---|---|---|---|---|"]
    for files, d in results["dir_ops"].items():
        lines.append(f"| {int(files):,} | {_secs(d['create_s'])} | {_secs(d['dir_fsync_s'])} | {_secs(d['list_s'])} | {_secs(d['rename_fsync_s'])} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the real coordinator (--coordinator)

#: Rows of each simulated rank's chunk of a tensor, and the tensor's columns (fp32).
ROWS_PER_RANK = 4
COLS = 16


def simulate_coordinator(ranks: int, tensors: int, root: str) -> dict[str, Any]:
    """``StoreWriter.finish`` on the results ``ranks`` simulated ranks of ``tensors`` row-sharded tensors return."""
    # torch and the distributed package only here: the model section needs neither.
    import torch
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties, TensorStorageMetadata
    from torch.distributed.checkpoint.storage import WriteResult

    import ckstore
    from ckstore.distributed import StoreReader, StoreWriter, coordinator
    from ckstore.distributed.metadata_json import ChunkStorage
    from ckstore.storage import durable

    store = ckstore.Store(os.path.join(root, f"store-{ranks}"))
    writer = StoreWriter(store, step=1)
    writer.set_up_storage_writer(True, rank=0)
    name = coordinator.open_staging(store, 1)
    writer._staging = name  # what prepare_global_plan does on the coordinator
    staging = os.path.join(store._staging_dir, name)
    fake_hash = "blake3:" + "ab" * 32
    chunk_len = ROWS_PER_RANK * COLS * 4
    results: list[list[Any]] = []
    started = time.perf_counter()
    for rank in range(ranks):
        file = f"rank-{rank:05d}.safetensors"
        size = 64 + tensors * chunk_len
        with open(os.path.join(staging, file), "wb") as f:  # the rank's shard file (content is not what is measured)
            f.truncate(size)
        rank_results = []
        for t in range(tensors):
            index = MetadataIndex(f"layers.{t}.weight", torch.Size([rank * ROWS_PER_RANK, 0]))
            chunk = ChunkStorage(file, 64 + t * chunk_len, chunk_len, fake_hash, "F32")
            rank_results.append(WriteResult(index=index, size_in_bytes=chunk_len, storage_data=chunk))
        # Manifest format 2: the file entry carries the chunk table of the file's bytes (zeros here), as write_data's does.
        table = zero_table(size)
        entry = FileEntry(size, table.root, table)
        rank_results[0] = WriteResult(index=rank_results[0].index, size_in_bytes=chunk_len, storage_data=(rank_results[0].storage_data, entry))
        results.append(rank_results)
    files_s = time.perf_counter() - started
    state = {
        f"layers.{t}.weight": TensorStorageMetadata(
            properties=TensorProperties(dtype=torch.float32),
            size=torch.Size([ranks * ROWS_PER_RANK, COLS]),
            chunks=[ChunkStorageMetadata(offsets=torch.Size([r * ROWS_PER_RANK, 0]), sizes=torch.Size([ROWS_PER_RANK, COLS])) for r in range(ranks)],
        )
        for t in range(tensors)
    }
    metadata = Metadata(state_dict_metadata=state, planner_data={k: (k,) for k in state})
    # What DCP's gather_object would carry to the coordinator (pickle is how torch's object collectives ship data).
    per_rank_results = len(pickle.dumps(results[-1]))
    ops: dict[str, int] = {}

    def count(op: str, phase: str, path: str, info: dict) -> None:
        if phase == "before":
            ops[op] = ops.get(op, 0) + 1

    started = time.perf_counter()
    with durable.hooked(count):
        writer.finish(metadata, results)
    finish_s = time.perf_counter() - started
    step_dir = os.path.join(store._ckpt_dir, "step-00000001")
    manifest_bytes = os.path.getsize(os.path.join(step_dir, "manifest.json"))
    started = time.perf_counter()
    StoreReader(store, step=1).read_metadata()
    parse_s = time.perf_counter() - started
    entries = len(os.listdir(step_dir))
    store.close()
    chunks = ranks * tensors
    return {
        "ranks": ranks,
        "tensors_per_rank": tensors,
        "chunks": chunks,
        "gather_bytes_per_rank": per_rank_results,
        "gather_bytes_total": per_rank_results * ranks,
        "manifest_bytes": manifest_bytes,
        "manifest_bytes_per_chunk": round(manifest_bytes / chunks, 1),
        "manifest_limit_chunks": int(MAX_MANIFEST_BYTES / (manifest_bytes / chunks)),
        "coordinator_fsyncs": ops.get("fsync", 0) + ops.get("fsync_dir", 0),
        "coordinator_ops": ops,
        "entries_in_checkpoint_dir": entries,
        "finish_s": round(finish_s, 3),
        "finish_us_per_chunk": round(finish_s / chunks * 1e6, 2),
        "read_metadata_s": round(parse_s, 3),
        "setup_files_s": round(files_s, 3),
    }


def zero_table(size: int) -> ChunkedHash:
    """The format-2 chunk table of ``size`` zero bytes (what a truncated-to-size shard file holds)."""
    hasher = ChunkStreamHasher("blake3", DEFAULT_CHUNK_SIZE)
    hasher.update(bytes(size))
    return hasher.table()


def run_coordinator(ranks_list: list[int], tensors: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ckstore-sim-") as root:
        rows = [simulate_coordinator(n, tensors, root) for n in ranks_list]
    return {"date": time.strftime("%Y-%m-%d"), "commit": _git_commit(), "machine": f"{os.cpu_count()}-core VM", "rows": rows}


def report_coordinator(results: dict[str, Any]) -> str:
    """Every measured figure, one line each, one column per rank count."""
    rows = results["rows"]
    lines = [
        f"real coordinator (StoreWriter.finish), {results['date']}, commit {results['commit']}, {results['machine']}",
        "",
        "| | " + " | ".join(f"{r['ranks']:,} ranks x {r['tensors_per_rank']} tensors" for r in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for key in rows[0] if rows else ():
        if key not in ("ranks", "tensors_per_rank"):
            lines.append(f"| {key} | " + " | ".join(str(r[key]) for r in rows) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.commit_scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", help="rank counts (default: 1 8 1000 10000; with --coordinator 1000 10000)")
    parser.add_argument(
        "--coordinator", action="store_true", help="run the real coordinator's StoreWriter.finish on simulated ranks' results, not the model shapes"
    )
    parser.add_argument("--tensors", type=int, default=4, help="with --coordinator: row-sharded tensors per rank (default 4)")
    parser.add_argument("--dir", default=".bench", help="where the directory operations are measured (default .bench/)")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    ranks = args.ranks or ([1000, 10000] if args.coordinator else [1, 8, 1000, 10000])
    if any(n < 1 for n in ranks) or args.tensors < 1:
        parser.error("--ranks and --tensors must be positive")
    if args.coordinator:
        results = run_coordinator(ranks, args.tensors)
        print(report_coordinator(results))
    else:
        os.makedirs(args.dir, exist_ok=True)
        results = run(ranks, args.dir)
        print(report(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
