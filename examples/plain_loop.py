"""Wrap an existing training loop: resume, periodic checkpoints, save on SIGTERM/SIGUSR1/SIGINT.

    .venv/bin/python examples/plain_loop.py [STORE] [--steps N]

Run it, press Ctrl-C (or ``kill -TERM <pid>``) mid-run: it finishes the step,
saves it and exits with status 130 (143 for SIGTERM). Run it again: it
continues from that step. The loop itself is unchanged apart from the marked
lines.
"""

from __future__ import annotations

import argparse
import logging

import torch

import ckstore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", nargs="?", default="runs/plain-loop")
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    true_w = torch.randn(8, 1)

    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "rng": ckstore.RNGState()}  # + ckstore
    with ckstore.Store(args.store, keep_last=3) as store:  # + ckstore
        step = ckstore.resume(store, state)  # + ckstore: 0 on the first run
        with ckstore.Checkpointer(store, state, every="auto", at_exit=True) as ckpt:  # + ckstore
            while step < args.steps:
                x = torch.randn(64, 8)  # drawn from torch's global RNG, which RNGState restores
                loss = torch.nn.functional.mse_loss(model(x), x @ true_w)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                ckpt.step(step, metrics={"loss": loss.item()})  # + ckstore
                if step % 500 == 0:
                    print(f"step {step}: loss {loss.item():.5f}")
        print(f"done at step {step}; kept: {[i.step for i in store.checkpoints()]}")


if __name__ == "__main__":
    main()
