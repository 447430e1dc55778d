"""A DVC publish of one checkpoint: the model merged into model.safetensors, the files as saved, weights only.

``python -m benchmarks.dvc_publish_weights`` saves an 8 x Linear(2048, 2048) model (128 MiB of float32) with
Adam's state (384 MiB a checkpoint) twice: as ``{"model": ..., "optimizer": ...}``, whose publish merges the
model's tensors into one ``model.safetensors`` at the stable path, and as ``{"net": ..., "optimizer": ...}``,
published with its files as saved. Each publish goes into a fresh git + DVC repository with a fresh local
remote (no DVC dedup between runs), ``wait=True``: materialize, merge, ``dvc add``, ``dvc push``, commit,
tag. The first run warms up the imports. Hermetic DVC/git settings as in ``tests/test_dvc.py``; scratch under
the system temp directory, removed after.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import ckstore

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_dvc import hermetic_env, make_repo  # noqa: E402  (the tests' hermetic repository set-up)


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="ckstore-bench-dvc-"))
    os.environ.update(hermetic_env(base))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(8)])
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 2048)).sum().backward()
    opt.step()
    runs = (
        ("warm-up (model merged)", 1, {}),
        ("model merged", 1, {}),
        ("files as saved ('net')", 2, {}),
        ("weights_only", 1, {"weights_only": True}),
        ("model merged", 1, {}),
        ("files as saved ('net')", 2, {}),
    )
    try:
        with ckstore.Store(base / "run") as store:
            store.save({"model": model, "optimizer": opt}, step=1)
            store.save({"net": model, "optimizer": opt}, step=2)
            for k, (label, step, options) in enumerate(runs):
                repo, _ = make_repo(base / f"r{k}", dict(os.environ))
                start = time.perf_counter()
                store.publish(step, name="best", repo=repo, wait=True, **options).result()
                took = time.perf_counter() - start
                top = repo / "models" / "best" / "checkpoints"
                size = sum(p.stat().st_size for p in top.rglob("*") if p.is_file()) / 2**20
                print(f"{label:24s} {took:6.2f} s  {size:7.1f} MiB published", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
