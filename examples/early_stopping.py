"""Early stopping that survives restarts and restores the best model (the tutorial flow).

    .venv/bin/python examples/early_stopping.py [STORE] [--patience K]

Trains a classifier on scikit-learn's breast-cancer data, evaluates after each
epoch, stops after K evaluations without improvement and loads the best
checkpoint back into the model. The stopper is part of the saved state, so a
run killed in between continues the patience count instead of restarting it.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer
from torch.utils.data import DataLoader, TensorDataset

import ckstore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", nargs="?", default="runs/early-stopping")
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--max-epochs", type=int, default=100)
    args = parser.parse_args()

    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    order = np.random.default_rng(0).permutation(len(x))
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    train = TensorDataset(xt[order[:455]], yt[order[:455]])
    val_x, val_y = xt[order[455:]], yt[order[455:]]

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 256), torch.nn.ReLU(), torch.nn.Linear(256, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    sampler = ckstore.ResumableSampler(len(train), seed=0)
    loader = DataLoader(train, batch_size=25, sampler=sampler)
    stopper = ckstore.EarlyStopping(metric="val_loss", mode="min", patience=args.patience, min_delta=1e-4)
    state = {"model": model, "optimizer": optimizer, "data": sampler, "early_stopping": stopper, "rng": ckstore.RNGState()}

    # keep_best=1 keeps the best evaluated checkpoint whatever comes after it.
    with ckstore.Store(args.store, keep_best=1, keep_last=1, metric="val_loss") as store:
        epoch = ckstore.resume(store, state)
        with ckstore.Checkpointer(store, state, every=None) as ckpt:
            while not stopper.should_stop and epoch < args.max_epochs:
                for xb, yb in sampler.track(loader):
                    loss = torch.nn.functional.cross_entropy(model(xb), yb)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                epoch += 1
                with torch.no_grad():
                    val_loss = torch.nn.functional.cross_entropy(model(val_x), val_y).item()
                stopper.update(val_loss, step=epoch)
                ckpt.step(epoch, metrics={"val_loss": val_loss})  # a step with the store's metric is always saved
                note = "best so far" if stopper.improved else f"{stopper.since_best} without improvement"
                print(f"epoch {epoch}: val_loss {val_loss:.5f}  ({note})")
        info = stopper.restore_best(store, {"model": model})
        print(f"stopped at epoch {epoch}; restored the best model: epoch {info.step}, val_loss {info.metrics['val_loss']:.5f}")


if __name__ == "__main__":
    main()
