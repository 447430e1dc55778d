"""Save and load benchmarks of ckstore against the disk's limits and against peers, in one process.

``python -m benchmarks`` (``make bench``) builds two states, a 1 GiB state of
mixed tensor sizes and 10,000 small tensors (also 1 GiB), and for each runs,
interleaved over ``--reps`` repetitions (so a noisy neighbour hits every case
alike):

* probes: the write limit (O_DIRECT aligned 16 MiB writes + fsync), a raw read
  of the same bytes into existing memory (cold after ``drop_caches`` when
  root, and warm), a single-thread memcpy of the state into existing buffers;
* saves: ``torch.save`` + fsync, safetensors ``save_file`` + fsync, DCP
  ``save`` and ``async_save`` (stall and total), ckstore sync (with and
  without hashing) and ``blocking=False`` (stall and background total);
* loads into existing tensors: ckstore, ``torch.load`` (weights only),
  safetensors ``load_file`` + ``copy_``; one tensor read lazily (ckstore
  ``read_tensor`` and safetensors ``safe_open``), cold.

It prints the median of each case and its ratio to the probe measured in the
same run, next to the targets of issue 6. ``--quick`` runs small states once,
for a fast check. Peers that write pickles do so here only, never in the
library. Files go to ``.bench/`` (or ``--dir``) and are removed as it goes.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import mmap
import os
import platform
import queue
import shutil
import statistics
import sys
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

import ckstore
from ckstore.engine import write as _write
from ckstore.engine.hashpool import usable_cores

MiB = 1 << 20
GiB = 1 << 30
CHUNK = 16 * MiB
#: The stall's reference: a memcpy of the state into existing host buffers
#: (one thread), or on a GPU the device-to-host copy into existing pinned memory.
MEMCPY = "memcpy into existing buffers (1 thread)"
WRITE_LIMIT = "write limit (O_DIRECT 16 MiB + fsync)"
COPYING_LIMIT = "write limit through aligned buffers (copy + O_DIRECT)"
#: Pause after the ``sync`` that precedes every timed case (see ``Bench.settle``).
SETTLE_S = 0.3

# ---------------------------------------------------------------- machine


def machine_line(directory: str) -> str:
    cpu = "unknown cpu"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    fs = "?"
    with contextlib.suppress(OSError):
        best = ""
        real = os.path.realpath(directory)
        for line in open("/proc/mounts"):
            parts = line.split()
            if len(parts) > 2 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")) and len(parts[1]) >= len(best):
                best, fs = parts[1], f"{parts[2]} on {parts[0]}"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {fs}, Linux {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, ckstore {ckstore.__version__}"
    )


def can_drop_caches() -> bool:
    return os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3\n")


# ---------------------------------------------------------------- states


def mixed_state(total: int) -> dict[str, Any]:
    """Tensors from 64 MiB down to 256 KiB (fp32, some bf16 and int64), ``total`` bytes."""
    scale = total / GiB
    plan = [(64 * MiB, 8), (16 * MiB, 16), (4 * MiB, 32), (1 * MiB, 64), (256 * 1024, 256)]
    layers: dict[str, torch.Tensor] = {}
    i = 0
    for size, count in plan:
        for _ in range(max(1, int(count * scale))):
            dtype = torch.bfloat16 if i % 5 == 3 else (torch.int64 if i % 17 == 5 else torch.float32)
            numel = size // torch.empty((), dtype=dtype).element_size()
            layers[f"layer{i:04d}.weight"] = _filled(numel, dtype, i)
            i += 1
    return {"model": layers}


def mixed_small_state(total: int, small: int = 2381) -> dict[str, Any]:
    """Large tensors (64/16/4 MiB) among thousands of 4 KiB ones, as in a transformer's optimizer state: ``total`` bytes."""
    scale = total / GiB
    plan = [(64 * MiB, 10), (16 * MiB, 16), (4 * MiB, 30), (4096, small)]
    layers: dict[str, torch.Tensor] = {}
    i = 0
    for size, count in plan:
        for _ in range(max(1, int(count * scale)) if size > 4096 else count):
            layers[f"p{i:05d}"] = _filled(size // 4, torch.float32, i)
            i += 1
    return {"model": layers}


def small_state(count: int, total: int) -> dict[str, Any]:
    """``count`` float32 tensors of varied small sizes adding up to about ``total`` bytes."""
    mean = total // count // 4
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(mean // 2, mean * 3 // 2, (count,), generator=g).tolist()
    return {"model": {f"t{i:05d}": _filled(n, torch.float32, i) for i, n in enumerate(sizes)}}


def _filled(numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    t = torch.empty(numel, dtype=torch.float32).uniform_(-1, 1) if dtype != torch.int64 else torch.randint(0, 1 << 30, (numel,))
    return t.to(dtype) if t.dtype != dtype else t


def flat(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return dict(state["model"])


def nbytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in flat(state).values())


# ---------------------------------------------------------------- probes and peers


class Bench:
    def __init__(self, directory: str, state: dict[str, Any], label: str) -> None:
        self.dir = directory
        self.state = state
        self.label = label
        self.tensors = flat(state)
        self.size = nbytes(state)
        self.cold = can_drop_caches()
        self.times: dict[str, list[float]] = defaultdict(list)
        self.cpu: dict[str, list[float]] = defaultdict(list)  # process CPU seconds (all threads) of each ckstore case
        self.notes: list[str] = []
        # Probe buffers and targets, allocated and touched once (existing memory).
        self.block = mmap.mmap(-1, CHUNK)
        self.block.write(os.urandom(MiB) * (CHUNK // MiB))
        self.read_buffer = torch.zeros(self.size, dtype=torch.uint8)
        self.device = next(iter(self.tensors.values())).device
        self.copy_targets = {k: torch.zeros_like(v) for k, v in self.tensors.items()}
        # On a GPU the stall's floor is a device-to-host copy into existing pinned memory.
        self.host_targets = (
            {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in self.tensors.items()} if self.device.type == "cuda" else None
        )
        self.load_targets = {"model": {k: torch.zeros_like(v) for k, v in self.tensors.items()}}
        self.store = ckstore.Store(os.path.join(directory, "ckstore"))
        self.nohash = ckstore.Store(os.path.join(directory, "ckstore-nohash"))
        self.step = 0
        # Steady state of a training run: the staging area and the write
        # pipeline exist before the first timed save (sized once, then reused).
        self.step += 1
        self.store.save(self.state, step=self.step, blocking=False)
        self.store.wait()
        self.store.delete(self.step)
        self.files: dict[str, str] = {}

    def close(self) -> None:
        self.store.close()
        self.nohash.close()

    def record(self, name: str, seconds: float) -> None:
        self.times[name].append(seconds)

    def settle(self) -> None:
        """Start every timed case from the same quiet disk.

        Without this a case pays for its predecessor: the journal commit of
        the 1 GiB of files the previous case deleted, or the write-back of
        its page cache, lands in the next case's first fsync. Every case,
        probe and peers included, gets the same treatment.
        """
        gc.collect()
        os.sync()
        time.sleep(SETTLE_S)

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        self.settle()
        cpu = time.process_time()
        start = time.perf_counter()
        out = fn()
        self.record(name, time.perf_counter() - start)
        if "ckstore" in name:
            self.cpu[name].append(time.process_time() - cpu)
        return out

    # -- probes

    def write_probe(self) -> None:
        path = os.path.join(self.dir, "probe.bin")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

        def run() -> None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_DIRECT", 0), 0o644)
            try:
                left = self.size - self.size % 4096
                view = memoryview(self.block)
                while left:
                    n = min(left, CHUNK)
                    os.write(fd, view[:n])
                    left -= n
                os.fsync(fd)
            finally:
                os.close(fd)
            dfd = os.open(self.dir, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)

        self.timed(WRITE_LIMIT, run)
        self.files["probe"] = path

    def write_probe_copying(self) -> None:
        """The floor of an O_DIRECT writer of tensors: copy the state through three aligned 16 MiB buffers while a second thread writes them.

        Tensor memory is never page-aligned (torch's CPU allocator aligns to 64 bytes), so
        an O_DIRECT writer must copy every byte into aligned buffers while it writes: no
        header, no hashing, no files but one. ckstore's save minus this is its own cost.
        """
        path = os.path.join(self.dir, "probe-copying.bin")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        slots = [np.frombuffer(mmap.mmap(-1, CHUNK), dtype=np.uint8) for _ in range(3)]

        def run() -> None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_DIRECT", 0), 0o644)
            free: queue.SimpleQueue = queue.SimpleQueue()
            full: queue.SimpleQueue = queue.SimpleQueue()
            for slot in slots:
                free.put(slot)

            def write() -> None:
                while (item := full.get()) is not None:
                    slot, n = item
                    os.write(fd, memoryview(slot)[:n])
                    free.put(slot)

            writer = threading.Thread(target=write, daemon=True)
            writer.start()
            try:
                slot, fill = free.get(), 0
                for src in self.tensors.values():
                    data = src.reshape(-1).view(torch.uint8).numpy()
                    pos = 0
                    while pos < len(data):
                        n = min(len(data) - pos, CHUNK - fill)
                        np.copyto(slot[fill : fill + n], data[pos : pos + n])
                        fill, pos = fill + n, pos + n
                        if fill == CHUNK:
                            full.put((slot, fill))
                            slot, fill = free.get(), 0
                if fill >= 4096:
                    full.put((slot, fill - fill % 4096))  # the unaligned tail is left out, as in the plain probe
                full.put(None)
                writer.join()
                os.fsync(fd)
            finally:
                full.put(None)
                os.close(fd)

        if self.device.type == "cpu":
            self.timed(COPYING_LIMIT, run)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def raw_read(self) -> None:
        """Read the probe file (as many bytes as the state) into existing memory, 16 MiB per call."""
        fd = os.open(self.files["probe"], os.O_RDONLY)
        try:
            view = memoryview(self.read_buffer.numpy())
            size = os.fstat(fd).st_size
            done = 0
            while done < size:
                done += os.preadv(fd, [view[done : min(size, done + CHUNK)]], done)
        finally:
            os.close(fd)

    def memcpy_probe(self) -> None:
        if self.host_targets is not None:

            def d2h() -> None:
                for key, src in self.tensors.items():
                    self.host_targets[key].copy_(src, non_blocking=True)
                torch.cuda.synchronize()

            self.timed(MEMCPY, d2h)
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:

            def run() -> None:
                for key, src in self.tensors.items():
                    self.copy_targets[key].copy_(src)

            self.timed(MEMCPY, run)
        finally:
            torch.set_num_threads(threads)

    # -- peers

    def peer(self, case: Callable[[], None]) -> None:
        """Run a peer's case; a peer that fails here (a torch build without DCP, say) is reported, not fatal."""
        try:
            case()
        except Exception as exc:  # noqa: BLE001 - the report names it
            note = f"{case.__name__} failed: {type(exc).__name__}: {str(exc)[:200]}"
            if note not in self.notes:
                self.notes.append(note)

    def torch_save(self) -> None:
        path = os.path.join(self.dir, "torch.pt")

        def run() -> None:
            with open(path, "wb") as fh:
                torch.save(self.tensors, fh)
                fh.flush()
                os.fsync(fh.fileno())

        self.timed("torch.save + fsync", run)
        self.files["torch"] = path

    def safetensors_save(self) -> None:
        import safetensors.torch

        path = os.path.join(self.dir, "st.safetensors")

        def run() -> None:
            safetensors.torch.save_file(self.tensors, path)
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

        self.timed("safetensors save_file + fsync", run)
        self.files["safetensors"] = path

    def dcp_save(self) -> None:
        import torch.distributed.checkpoint as dcp

        path = os.path.join(self.dir, "dcp")
        shutil.rmtree(path, ignore_errors=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.timed("DCP save", lambda: dcp.save(self.tensors, checkpoint_id=path))
        shutil.rmtree(path, ignore_errors=True)

    def dcp_async_save(self) -> None:
        import torch.distributed.checkpoint as dcp

        path = os.path.join(self.dir, "dcp-async")
        shutil.rmtree(path, ignore_errors=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.settle()
            start = time.perf_counter()
            future = dcp.async_save(self.tensors, checkpoint_id=path)
            stall = time.perf_counter() - start
            future.result()
            total = time.perf_counter() - start
        self.record("DCP async_save stall", stall)
        self.record("DCP async_save total", total)
        shutil.rmtree(path, ignore_errors=True)

    # -- ckstore

    def _drop_old(self, store: ckstore.Store) -> None:
        for info in store.checkpoints():
            store.delete(info.step)

    def ckstore_sync(self) -> None:
        self._drop_old(self.store)
        self.step += 1
        self.timed("ckstore save (sync)", lambda: self.store.save(self.state, step=self.step))
        self.files["ckstore_step"] = str(self.step)

    def ckstore_nohash(self) -> None:
        self._drop_old(self.nohash)
        self.step += 1
        real = _write.hash_chunk
        _write.hash_chunk = lambda algo, *segments: bytes(32)  # measurement only: these checkpoints never verify
        try:
            self.timed("ckstore save (sync, hashing off)", lambda: self.nohash.save(self.state, step=self.step))
        finally:
            _write.hash_chunk = real
        self._drop_old(self.nohash)

    def ckstore_async(self) -> None:
        step = self.step + 1
        self.step = step
        self.settle()
        start = time.perf_counter()
        handle = self.store.save(self.state, step=step, blocking=False)
        stall = time.perf_counter() - start
        handle.result()
        total = time.perf_counter() - start
        self.record("ckstore save(blocking=False) stall", stall)
        self.record("ckstore background save total", total)
        self.store.delete(step)

    # -- loads

    def load_cases(self) -> None:
        import safetensors
        import safetensors.torch

        step = int(self.files["ckstore_step"])

        def torch_load() -> None:
            loaded = torch.load(self.files["torch"], weights_only=True)
            for key, tensor in loaded.items():
                self.copy_targets[key].copy_(tensor)

        def st_load() -> None:
            loaded = safetensors.torch.load_file(self.files["safetensors"])
            for key, tensor in loaded.items():
                self.copy_targets[key].copy_(tensor)

        loaders: list[tuple[str, Callable[[], Any]]] = [
            ("raw read", self.raw_read),
            ("ckstore load into model", lambda: self.store.load(self.load_targets, step=step)),
            ("ckstore load into model, verify=False", lambda: self.store.load(self.load_targets, step=step, verify=False)),
        ]
        if "torch" in self.files:
            loaders.append(("torch.load + copy_", torch_load))
        if "safetensors" in self.files:
            loaders.append(("safetensors load_file + copy_", st_load))
        for cold in [True, False] if self.cold else [False]:
            for name, fn in loaders:
                if cold:
                    drop_caches()
                else:
                    fn()  # warm: the same read just before, so its files are in the page cache
                self.timed(f"{name} {'cold' if cold else 'warm'}", fn)
        # One tensor of about 1 MiB from the middle of the checkpoint.
        keys = list(self.tensors)
        key = next((k for k in keys[len(keys) // 2 :] if self.tensors[k].numel() * self.tensors[k].element_size() <= MiB), keys[len(keys) // 2])
        if self.cold:
            drop_caches()
        self.timed(f"ckstore read_tensor one {_human(self.tensors[key])} tensor {'cold' if self.cold else 'warm'}",
                   lambda: self.store.read_tensor(f"model/{key}", step=step))
        if self.cold:
            drop_caches()

        def st_one() -> None:
            with safetensors.safe_open(self.files["safetensors"], framework="pt") as fh:
                fh.get_tensor(key)

        if "safetensors" in self.files:
            self.timed(f"safetensors safe_open one tensor {'cold' if self.cold else 'warm'}", st_one)
        self.one_tensor_verified()

    def one_tensor_verified(self) -> None:
        """``read_tensor(verify=True)`` of a 256 KiB tensor from a file of about 1 GiB (format 2 hashes only its chunks).

        The state's tensors are saved once more with keys that group them into one file (no copy of the tensors).
        """
        small = [k for k, t in self.tensors.items() if t.numel() * t.element_size() == 256 * 1024]
        if not small or self.size < 512 * MiB:
            return
        key = small[len(small) // 2]
        one = {"model": {f"all.{k}": t for k, t in self.tensors.items()}}
        self.step += 1
        step = self.step
        self.store.save(one, step=step)
        files = self.store.checkpoints()[-1].files
        biggest = max(files.values(), key=lambda e: e.size).size
        note = f"one-tensor verified read: 256 KiB tensor from a file of {biggest / GiB:.2f} GiB"
        if note not in self.notes:
            self.notes.append(note)
        read = lambda: self.store.read_tensor(f"model/all.{key}", step=step, verify=True)  # noqa: E731
        read()
        self.timed("ckstore read_tensor(verify=True) one 256 KiB tensor of a 1 GiB file warm", read)
        if self.cold:
            drop_caches()
            self.timed("ckstore read_tensor(verify=True) one 256 KiB tensor of a 1 GiB file cold", read)
        self.store.delete(step)

    def cleanup_rep(self) -> None:
        for name in ("probe", "torch", "safetensors"):
            with contextlib.suppress(KeyError, FileNotFoundError):
                os.unlink(self.files.pop(name))
        self._drop_old(self.store)


def _human(tensor: torch.Tensor) -> str:
    n = tensor.numel() * tensor.element_size()
    return f"{n / MiB:.2g} MiB" if n >= MiB else f"{n / 1024:.0f} KiB"


# ---------------------------------------------------------------- report

#: Issue 13's targets. A warm verified load may take 1.3x a raw read on fewer than 8 cores, 1.1x on 8 or more.
_WARM_VERIFIED = 1.1 if usable_cores() >= 8 else 1.3

TARGETS = {
    # case: (reference case, target ratio for the mixed states, for the small state; None: no target)
    "ckstore save (sync)": (WRITE_LIMIT, 1.15, 1.5),
    "ckstore save(blocking=False) stall": (MEMCPY, 1.2, 1.2),
    "ckstore background save total": ("ckstore save (sync)", 1.2, 1.2),
    "ckstore load into model cold": ("raw read cold", 1.1, 1.1),
    "ckstore load into model warm": ("raw read warm", _WARM_VERIFIED, _WARM_VERIFIED),
    "ckstore load into model, verify=False warm": ("raw read warm", None, 1.5),
}


def reference_for(case: str) -> str | None:
    if case in TARGETS:
        return TARGETS[case][0]
    if "stall" in case:
        return MEMCPY
    if case.endswith("cold") and "one" not in case:
        return "raw read cold"
    if case.endswith("warm") and "one" not in case:
        return "raw read warm"
    if "save" in case or "async_save" in case:
        return "write limit (O_DIRECT 16 MiB + fsync)"
    return None


def paired_ratio(times: Mapping[str, list[float]], case: str, ref: str) -> float:
    """The median over repetitions of ``case / ref`` measured in the same repetition.

    The disk's speed drifts by 2x within minutes here; a ratio of two medians
    pairs a case with probes taken minutes apart, a per-repetition ratio with
    the probe taken seconds before it.
    """
    a, b = times[case], times[ref]
    if len(a) != len(b):
        return statistics.median(a) / statistics.median(b)
    return statistics.median(x / y for x, y in zip(a, b))


def report(bench: Bench, small: bool) -> dict[str, Any]:
    med = {case: statistics.median(values) for case, values in bench.times.items()}
    print(f"\n## {bench.label}: {bench.size / GiB:.2f} GiB in {len(bench.tensors):,} tensors, {len(bench.times['ckstore save (sync)'])} repetitions")
    print("| case | median s | GB/s | ratio | vs | target |")
    print("|---|---:|---:|---:|---|---|")
    for case, seconds in med.items():
        ref = reference_for(case)
        ratio = paired_ratio(bench.times, case, ref) if ref and ref in med and ref != case else None
        target = ""
        if case in TARGETS and ratio is not None and TARGETS[case][2 if small else 1] is not None:
            limit = TARGETS[case][2 if small else 1]
            target = f"<= {limit}x: {'ok' if ratio <= limit else 'MISSED'}"
        if "one" in case and "ckstore" in case:
            target = f"<= 50 ms: {'ok' if seconds <= 0.05 else 'MISSED'}"
        if "verify=True" in case and case.endswith("warm"):
            target = f"<= 5 ms: {'ok' if seconds <= 0.005 else 'MISSED'}"
        rate = f"{bench.size / seconds / 1e9:.2f}" if "one" not in case else ""
        print(f"| {case} | {seconds:.3f} | {rate} | {f'{ratio:.2f}x' if ratio is not None else ''} | {ref if ratio is not None else ''} | {target} |")
    sync, nohash = med.get("ckstore save (sync)"), med.get("ckstore save (sync, hashing off)")
    extra = {}
    if sync and COPYING_LIMIT in med:
        print(
            f"\nckstore sync save vs the write limit through aligned buffers: "
            f"{paired_ratio(bench.times, 'ckstore save (sync)', COPYING_LIMIT):.2f}x (that limit is "
            f"{paired_ratio(bench.times, COPYING_LIMIT, WRITE_LIMIT):.2f}x the plain write limit)"
        )
    if sync and nohash:
        overhead = paired_ratio(bench.times, "ckstore save (sync)", "ckstore save (sync, hashing off)") - 1
        limit = 0.25 if small else 0.10
        extra["hash_overhead"] = overhead
        print(f"\nhashing adds {overhead * 100:+.0f}% to a sync save (target <= {limit * 100:.0f}%: {'ok' if overhead <= limit else 'MISSED'})")
    peers = [c for c in med if c in ("torch.save + fsync", "safetensors save_file + fsync", "DCP save")]
    if sync and peers:
        best = min(peers, key=med.get)
        print(f"ckstore sync save vs fastest peer ({best}): {sync / med[best]:.2f}x ({'faster than every peer' if sync < med[best] else 'NOT faster than every peer'})")
    cpu = {case: statistics.median(v) / (bench.size / 1e9) for case, v in bench.cpu.items() if "one" not in case}
    if cpu:
        print("\nCPU seconds per GB (process, all threads): " + "; ".join(f"{case} {v:.2f}" for case, v in cpu.items()))
        extra["cpu_s_per_gb"] = cpu
    if not bench.cold:
        print("(not root: cold-cache cases skipped; loads are warm only)")
    for note in bench.notes:
        print(f"note: {note}")
    if bench.device.type == "cuda":
        print(f"(on {bench.device}: the '{MEMCPY}' row is the device-to-host copy into existing pinned host memory)")
    return {"label": bench.label, "bytes": bench.size, "tensors": len(bench.tensors), "times": dict(bench.times), "medians": med, **extra}


# ---------------------------------------------------------------- main


def run_state(directory: str, label: str, state: dict[str, Any], reps: int, small: bool, device: str = "cpu") -> dict[str, Any]:
    if device != "cpu":
        state = {"model": {k: v.to(device) for k, v in state["model"].items()}}
        label += f" on {device}"
    path = os.path.join(directory, label.split()[0])
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    bench = Bench(path, state, label)
    try:
        for rep in range(reps):
            print(f"  {label}: repetition {rep + 1}/{reps}", file=sys.stderr, flush=True)
            bench.write_probe()
            bench.write_probe_copying()
            bench.memcpy_probe()
            bench.peer(bench.torch_save)
            bench.ckstore_sync()
            bench.peer(bench.safetensors_save)
            bench.ckstore_nohash()
            bench.peer(bench.dcp_save)
            bench.ckstore_async()
            bench.peer(bench.dcp_async_save)
            bench.load_cases()
            bench.cleanup_rep()
        return report(bench, small)
    finally:
        bench.close()
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small states (128 MiB, 2,000 small tensors), one repetition")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per case (default 3; 1 with --quick)")
    parser.add_argument("--size-mib", type=int, default=None, help="bytes of each state in MiB (default 1024; 128 with --quick)")
    parser.add_argument("--small-count", type=int, default=None, help="tensors in the small-tensor state (default 10000; 2000 with --quick)")
    parser.add_argument(
        "--only", choices=["mixed", "mixed4k", "small"], help="run one state only (mixed4k: large tensors among 2,381 tensors of 4 KiB)"
    )
    parser.add_argument("--dir", default=".bench", help="scratch directory on the filesystem to measure (default .bench)")
    parser.add_argument("--json", help="also write every measurement to this JSON file")
    parser.add_argument(
        "--device", default="cpu", help="where the state lives (cuda: saves start with a device-to-host copy; the stall's reference is that copy into pinned memory)"
    )
    args = parser.parse_args(argv)
    reps = args.reps or (1 if args.quick else 3)
    size = (args.size_mib or (128 if args.quick else 1024)) * MiB
    count = args.small_count or (2000 if args.quick else 10_000)
    os.makedirs(args.dir, exist_ok=True)
    directory = os.path.abspath(args.dir)
    line = machine_line(directory)
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device here")
        line += f", {torch.cuda.get_device_name()}"
    print(f"machine: {line}")
    print(f"threads: torch intra-op {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f} at start (other jobs make numbers noisy)")
    results = []
    started = time.perf_counter()
    if args.only in (None, "mixed"):
        results.append(run_state(directory, "mixed sizes", mixed_state(size), reps, small=False, device=args.device))
    if args.only in (None, "mixed4k"):
        results.append(run_state(directory, "mixed4k (large tensors among 2,381 of 4 KiB)", mixed_small_state(size), reps, small=False, device=args.device))
    if args.only in (None, "small"):
        results.append(run_state(directory, f"{count:,} small tensors", small_state(count, size), reps, small=True, device=args.device))
    print(f"\n{time.perf_counter() - started:.0f} s in all; load average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": line, "results": results}, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
