"""``ckstore diff`` and ``ckstore plot``: compare two checkpoints tensor by tensor; draw a metric over steps."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import torch

import ckstore
from ckstore.storage import durable

from .progress import Bars

# The ckstore[plot] extra; the message names it so the fix is one command.
PLOT_HINT = "ckstore plot needs matplotlib: pip install 'ckstore[plot]'"


class MissingExtraError(ckstore.CkstoreError, ImportError):
    """An optional dependency a command needs is not installed; the message names the extra to install."""


def require_metric(infos: Sequence[ckstore.CheckpointInfo], metric: str) -> None:
    """A ``--metric`` no checkpoint records is a mistake (a typo), not an empty ranking."""
    if not metric:
        raise ckstore.InvalidArgumentError("--metric must name a metric, got an empty string")
    known = sorted({name for info in infos for name in info.metrics})
    if infos and metric not in known:  # an empty store ranks nothing yet: not a mistake (a cron'd gc on a new run)
        raise ckstore.InvalidArgumentError(
            f"--metric {metric!r}: no checkpoint records it; metrics in this store: {', '.join(known) if known else '(none)'}"
        )


def _hash(data: bytes) -> str:
    try:
        from blake3 import blake3  # a core dependency, as for the store's own file hashes
    except ImportError:
        import hashlib

        return "sha256:" + hashlib.sha256(data).hexdigest()
    return "blake3:" + blake3(data).hexdigest()


def _describe(tensor: torch.Tensor) -> dict[str, Any]:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return {
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "shape": list(tensor.shape),
        "nbytes": len(data),
        "hash": _hash(data),
    }


def diff(store: ckstore.Store, a: int | str, b: int | str, bars: Bars) -> dict[str, Any]:
    """Tensors of checkpoint ``a`` and ``b`` by key: changed (by content hash, dtype or shape), added, removed, unchanged.

    Both checkpoints are verified first: a difference is then a real one, not bit rot.
    """
    info_a, info_b = store.resolve(a), store.resolve(b)
    for info in {info_a.step: info_a, info_b.step: info_b}.values():
        problems = bars.run(f"verify step {info.step}", info.nbytes, store.verify, info.step)
        if problems:
            raise ckstore.IntegrityError(
                f"step {info.step} fails verification ({problems[0].message}); run `ckstore verify` first",
                path=problems[0].path, expected=problems[0].expected, actual=problems[0].actual,
            )
    keys_a, keys_b = store.tensor_keys(info_a.step), store.tensor_keys(info_b.step)
    task = bars.task(f"diff {info_a.step} {info_b.step}", total=len(keys_a) + len(keys_b))
    seen: dict[str, list[dict[str, Any] | None]] = {}
    for side, (info, keys) in enumerate(((info_a, keys_a), (info_b, keys_b))):
        for key in keys:
            seen.setdefault(key, [None, None])[side] = _describe(store.read_tensor(key, step=info.step))
            task.advance()
    out: dict[str, Any] = {"a": info_a.step, "b": info_b.step, "changed": [], "added": [], "removed": [], "unchanged": []}
    for key in sorted(seen):
        left, right = seen[key]
        if left is None:
            out["added"].append({"key": key, **right})
        elif right is None:
            out["removed"].append({"key": key, **left})
        elif left == right:
            out["unchanged"].append(key)
        else:
            out["changed"].append({"key": key, **{field: [left[field], right[field]] for field in left}})
    return out


def diff_text(payload: dict[str, Any], size: Any, escape: Any) -> str:
    rows = [f"step {payload['a']} -> step {payload['b']}"]
    for entry in payload["changed"]:
        shapes = " -> ".join(f"{d}{tuple(s)}" for d, s in zip(entry["dtype"], entry["shape"]))
        rows.append(f"changed  {escape(entry['key'])}  {shapes}  {size(entry['nbytes'][0])} -> {size(entry['nbytes'][1])}  "
                    f"{entry['hash'][0][:19]} -> {entry['hash'][1][:19]}")
    for verb in ("added", "removed"):
        for entry in payload[verb]:
            shape = f"{entry['dtype']}{tuple(entry['shape'])}"
            rows.append(f"{verb:8} {escape(entry['key'])}  {shape}  {size(entry['nbytes'])}  {entry['hash'][:19]}")
    changed_bytes = sum(e["nbytes"][1] for e in payload["changed"])
    rows.append(f"{len(payload['changed'])} changed ({size(changed_bytes)}), {len(payload['added'])} added, "
                f"{len(payload['removed'])} removed, {len(payload['unchanged'])} unchanged")
    return "\n".join(rows)


def plot(store: ckstore.Store, metric: str, mode: str, out: str | os.PathLike[str], *, title: str | None = None) -> dict[str, Any]:
    """A PNG (1000x500 px) of ``metric`` over steps, marking the best, tagged and published checkpoints.

    Every point is a checkpoint the store keeps (retention deleted the others, and their metrics with them).
    """
    infos = store.checkpoints()
    require_metric(infos, metric)
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; a PNG is the output
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtraError(PLOT_HINT) from None
    points = sorted(((i.step, i.metrics[metric], i) for i in infos if metric in i.metrics), key=lambda p: p[0])
    if not points:
        raise ckstore.InvalidArgumentError(f"{store.path}: no checkpoint yet; nothing to plot")
    steps = [p[0] for p in points]
    values = [p[1] for p in points]
    sign = 1 if mode == "min" else -1
    best = min(points, key=lambda p: (sign * p[1], -p[0]))
    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    try:
        ax.plot(steps, values, "-", color="0.6", linewidth=1, zorder=1)
        ax.scatter(steps, values, s=22, color="tab:blue", label="kept checkpoint", zorder=2)
        tagged = [(s, v, i) for s, v, i in points if any(not t.startswith("published.") for t in i.tags)]
        published = [(s, v, i) for s, v, i in points if any(t.startswith("published.") for t in i.tags)]
        if tagged:
            ax.scatter([p[0] for p in tagged], [p[1] for p in tagged], s=90, marker="^", facecolors="none",
                       edgecolors="tab:green", linewidths=1.5, label="tagged", zorder=3)
        if published:
            ax.scatter([p[0] for p in published], [p[1] for p in published], s=160, marker="s", facecolors="none",
                       edgecolors="tab:purple", linewidths=1.5, label="published", zorder=3)
        for step, value, info in tagged + published:
            names = ", ".join(f"published {t.removeprefix('published.')}" if t.startswith("published.") else t for t in info.tags)
            ax.annotate(names, (step, value), textcoords="offset points", xytext=(6, 8), fontsize=8)
        ax.scatter([best[0]], [best[1]], s=220, marker="*", color="tab:orange", label=f"best ({mode})", zorder=4)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.set_title(title or f"{metric} over steps: {store.path.name}")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png")  # into memory: the storage layer writes the file (hooked, fsynced, atomic)
    finally:
        plt.close(fig)
    durable.write_file_atomic(out, png.getvalue(), site="plot")
    return {
        "path": os.fspath(out),
        "metric": metric,
        "mode": mode,
        "points": len(points),
        "best": best[0],
        "tagged": [p[0] for p in tagged],
        "published": [p[0] for p in published],
    }
