"""Multi-rank save throughput through ``StoreWriter``: 1, 2 and 4 ranks against the same run's disk write limit.

    python -m benchmarks.distributed_save [--total-mb 256] [--worlds 1 2 4] [--dir PATH] [--json]

A fixed total state (``--total-mb`` of float32 tensors, split evenly over the
ranks, each rank owning its part as in FSDP) is saved with ``dcp.save`` on a
gloo group (ranks forked from one interpreter), then with ``dcp.async_save``.
Reported per world size:

* ``save_s`` and ``aggregate_mb_s``: the coordinator's ``dcp.save`` wall time, and the total bytes over it;
* ``disk_mb_s``: the same bytes written and fsynced by one plain process into the same directory just before
  (the run's disk write limit, one stream);
* ``last_durable_to_commit_s``: from the last rank's shard being fsynced (its ``write_data`` returned) to the
  coordinator's ``finish`` returning (the commit: manifest, rename, directory fsyncs; no tags or retention here);
* ``async_stall_s``: how long ``dcp.async_save`` blocked each rank (staging the state into host memory).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from datetime import timedelta

import torch

torch.set_num_threads(1)  # before forking ranks

import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402

import ckstore  # noqa: E402
from ckstore.distributed import StoreWriter  # noqa: E402


class TimedWriter(StoreWriter):
    written_at = 0.0

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)  # files are written and fsynced when this returns
        self.written_at = time.time()
        return future

    def finish(self, metadata, results):
        super().finish(metadata, results)  # the commit, then tags and retention (none here)
        self.committed_at = time.time()


def _rank(rank: int, world: int, port: int, root: str, total: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    per_rank = total // world // 4
    tensors = 8
    state = {f"r{rank}.t{i}": torch.full((per_rank // tensors,), float(rank * 100 + i)) for i in range(tensors)}
    with ckstore.Store(os.path.join(root, "store")) as store:
        dist.barrier()
        writer = TimedWriter(store, step=1)
        started = time.time()
        dcp.save(state, storage_writer=writer)
        save_s = time.time() - started
        committed = getattr(writer, "committed_at", None)
        dist.barrier()
        async_writer = TimedWriter(store, step=2)
        started = time.perf_counter()
        future = dcp.async_save(state, storage_writer=async_writer)
        stall = time.perf_counter() - started
        future.result()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "written_at": writer.written_at, "save_s": save_s, "committed_at": committed, "async_stall_s": stall}, f)
    dist.barrier()
    dist.destroy_process_group()


def disk_limit(directory: str, total: int) -> float:
    """One process writing ``total`` bytes in 16 MiB pieces and fsyncing: MB/s."""
    path = os.path.join(directory, "disk-probe")
    block = b"\x5a" * (16 << 20)
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        left = total
        while left > 0:
            left -= os.write(fd, block[: min(len(block), left)])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - started
    os.unlink(path)
    return total / seconds / 1e6


def measure(world: int, total: int, base: str) -> dict:
    root = tempfile.mkdtemp(prefix=f"w{world}-", dir=base)
    out = os.path.join(root, "out")
    os.makedirs(out)
    disk = disk_limit(root, total)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pids = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _rank(rank, world, port, root, total, out)
            except BaseException as exc:
                print(f"rank {rank}: {exc!r}", file=sys.stderr)
                code = 1
            os._exit(code)
        pids.append(pid)
    codes = [os.waitpid(pid, 0)[1] for pid in pids]
    if any(codes):
        raise SystemExit(f"a rank failed: {codes}")
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]
    shutil.rmtree(root)
    coordinator = ranks[0]
    return {
        "world": world,
        "total_mb": round(total / 1e6, 1),
        "save_s": round(coordinator["save_s"], 3),
        "aggregate_mb_s": round(total / coordinator["save_s"] / 1e6, 1),
        "disk_mb_s": round(disk, 1),
        "last_durable_to_commit_s": round(coordinator["committed_at"] - max(r["written_at"] for r in ranks), 4),
        "async_stall_s": [round(r["async_stall_s"], 3) for r in ranks],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-mb", type=int, default=256)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--dir", default=None, help="where the stores go (default: a temporary directory)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="ckstore-dist-bench-", dir=args.dir)
    try:
        rows = [measure(w, args.total_mb << 20, base) for w in args.worlds]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for row in rows:
            print(", ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
