"""Bounded memory: peak RSS of a real process while it saves and loads (a bound check, not a timing)."""

from __future__ import annotations

import json
import sys

import pytest

_MEASURE = r"""
import gc, json, resource, sys, torch, ckstore

MiB = 1 << 20
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

# 256 MiB in tensors of mixed sizes, filled in place (no temporaries).
sizes = [64 * MiB, 32 * MiB, 32 * MiB] + [16 * MiB] * 6 + [MiB // 4] * 128
state = {"model": {f"p{i}": torch.empty(n // 4).fill_(i) for i, n in enumerate(sizes)}}
nbytes = sum(sizes)
store = ckstore.Store(sys.argv[1])
store.save({"warm": torch.ones(10)}, step=0)  # imports, threads and buffers exist before the baseline
gc.collect()
out = {"state": nbytes}
base = peak()
store.save(state, step=1)
out["sync_save"] = peak() - base

base = peak()
for step in (2, 3, 4):
    store.save(state, step=step, blocking=False)
store.wait()
out["async_saves"] = peak() - base
out["staging_allocations"] = store._host_copy.allocations

# Targets are touched (zeroed) first, so their pages count in the baseline.
targets = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}}
gc.collect()
base = peak()
store.load(targets, step=1)
out["load_into"] = peak() - base
assert all(torch.equal(targets["model"][k], v) for k, v in state["model"].items())
store.close()
print(json.dumps(out))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB only on Linux")
def test_peak_memory_of_saves_and_loads_is_the_state_plus_a_small_constant(run_python, tmp_path):
    proc = run_python(_MEASURE, str(tmp_path / "store"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    constant = 96 << 20  # the write pipeline's 3 x 16 MiB chunk buffers plus headroom
    # A sync save adds no copy of the state, only the pipeline's buffers.
    assert out["sync_save"] <= constant, out
    # Loading into existing tensors reads into their memory: no second copy.
    assert out["load_into"] <= constant, out
    # Async saves copy the state once into staging allocated once, not per save.
    assert out["staging_allocations"] == 1, out
    assert out["async_saves"] <= out["state"] + constant, out
