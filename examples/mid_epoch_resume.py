"""Mid-epoch resume with a plain DataLoader and worker processes: the data order is the uninterrupted one.

    .venv/bin/python examples/mid_epoch_resume.py [STORE] [--workers N]

Reads 3 epochs of a shuffled dataset through ``ckstore.ResumableSampler``. A
first run is stopped by a real SIGTERM in the middle of epoch 2 (it saves the
step it finished and exits 143); a second run resumes from the store. The
batches both runs saw together are compared with one uninterrupted pass: the
rest of epoch 2 and all of epoch 3 line up exactly.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys

import torch
from torch.utils.data import DataLoader

import ckstore

EPOCHS, LENGTH, BATCH = 3, 50, 8


def read(store_path: str, workers: int, stop_at: int | None = None) -> list[list[int]]:
    """Read the data as a training loop would; raise SIGTERM at ``stop_at`` batches."""
    sampler = ckstore.ResumableSampler(LENGTH, seed=42, shuffle=True)
    loader = DataLoader(list(range(LENGTH)), batch_size=BATCH, sampler=sampler, num_workers=workers)
    seen = torch.full((EPOCHS * 7, BATCH), -1)  # the batches, kept in the state so both runs add up
    state = {"data": sampler, "seen": seen}
    with ckstore.Store(store_path) as store:
        step = ckstore.resume(store, state)
        with ckstore.Checkpointer(store, state, every=5, at_exit=True) as ckpt:
            for epoch in range(sampler.epoch, EPOCHS):
                for batch in sampler.track(loader):
                    seen[step, : len(batch)] = batch
                    step += 1
                    if step == stop_at:
                        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would
                    ckpt.step(step)
    return [[i for i in row.tolist() if i >= 0] for row in seen[:step]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", nargs="?", default="runs/mid-epoch")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    for path in (args.store, args.store + "-uninterrupted"):
        shutil.rmtree(path, ignore_errors=True)

    try:
        read(args.store, args.workers, stop_at=10)  # epoch 2 (7 batches per epoch), batch 3
    except SystemExit as exc:
        print(f"first run stopped by SIGTERM mid-epoch: exit status {exc.code}")
    resumed = read(args.store, args.workers)
    reference = read(args.store + "-uninterrupted", args.workers)
    same = resumed == reference
    print(f"{len(resumed)} batches over {EPOCHS} epochs; same order as the uninterrupted run: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
