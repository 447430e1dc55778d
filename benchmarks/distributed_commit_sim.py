"""How the multi-rank commit scales with the number of ranks: a simulation of the coordinator's side.

    python -m benchmarks.distributed_commit_sim [--ranks 1000 10000] [--tensors 4] [--json]

No process group is started. For R ranks holding T tensors each, sharded
FSDP-style (every tensor split in R row chunks, one per rank), the script

* writes one small shard file per rank into a real staging directory of a
  real store (what the ranks would have written; not fsynced: the ranks'
  writes are not what is measured),
* builds the WriteResults each rank's ``StoreWriter.write_data`` returns and
  DCP's global ``Metadata``, and measures what DCP's collectives would carry
  (DCP pickles plans and results through ``gather_object``, so the pickled
  size is the payload),
* runs the real ``StoreWriter.finish`` on the coordinator (metadata to JSON,
  manifest, the commit) while counting its durable operations, then parses
  the committed manifest back with ``StoreReader.read_metadata``.

Metadata grows with R x T chunks; the per-chunk figures let a reader scale
to their own model (a 7B-parameter model under FSDP with Adam holds ~900
tensors per rank: parameters and two moments).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import tempfile
import time

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties, TensorStorageMetadata
from torch.distributed.checkpoint.storage import WriteResult

import ckstore
from ckstore.distributed import StoreReader, StoreWriter
from ckstore.distributed import coordinator
from ckstore.distributed.metadata_json import ChunkStorage
from ckstore.format.manifest import FileEntry, MAX_MANIFEST_BYTES
from ckstore.storage import durable

ROWS_PER_RANK = 4
COLS = 16


def simulate(ranks: int, tensors: int, root: str) -> dict:
    store = ckstore.Store(os.path.join(root, f"store-{ranks}"))
    writer = StoreWriter(store, step=1)
    writer.set_up_storage_writer(True, rank=0)
    name = coordinator.open_staging(store, 1)
    writer._staging = name  # what prepare_global_plan does on the coordinator
    staging = os.path.join(store._staging_dir, name)
    fake_hash = "blake3:" + "ab" * 32
    chunk_len = ROWS_PER_RANK * COLS * 4
    results: list[list[WriteResult]] = []
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
        rank_results[0] = WriteResult(index=rank_results[0].index, size_in_bytes=chunk_len, storage_data=(rank_results[0].storage_data, FileEntry(size, ckstore.format.hashing.HashInfo.parse(fake_hash))))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--tensors", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckstore-sim-") as root:
        rows = [simulate(r, args.tensors, root) for r in args.ranks]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    for row in rows:
        print(", ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
