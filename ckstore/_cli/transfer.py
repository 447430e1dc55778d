"""``ckstore import`` (and, where the export API is installed, ``ckstore export``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ckstore

from .progress import Bars


def tree_size(path: str | os.PathLike[str]) -> int:
    """Bytes under ``path`` (a file or a directory tree), without following links."""
    root = Path(path)
    if root.is_file():
        return root.stat().st_size
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def run_import(args: Any, bars: Bars) -> dict[str, Any]:
    from ckstore.integrations.importers import import_checkpoint

    size = tree_size(args.src) if os.path.exists(args.src) else 0
    with ckstore.Store(args.store, lock_timeout=args.wait, trust_foreign=args.trust_foreign) as store:
        # Read once and written once, then read back by the verification: about three times the source's bytes.
        result = bars.run(
            f"import {Path(args.src).name}", 3 * size or None, import_checkpoint, args.src, store,
            step=args.step, name=args.name, format=args.format, writes=True,
        )
    info = result.info
    return {
        "step": info.step,
        "format": result.format,
        "source": str(result.source),
        "path": str(info.path),
        "tags": list(info.tags),
        "metrics": dict(info.metrics),
        "nbytes": info.nbytes,
        "files": list(result.files),
        "skipped": list(result.skipped),
    }


def run_export(args: Any, bars: Bars) -> dict[str, Any]:
    from ckstore.integrations.export import export_hf, export_safetensors

    target, option = (args.hf, "--hf") if args.hf is not None else (args.safetensors, "--safetensors")
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(parent):  # said here in the command's terms (the API names its out_dir/file argument)
        raise ckstore.InvalidArgumentError(f"{option} {target}: parent directory {parent} does not exist")
    with ckstore.Store(args.store, readonly=True) as store:
        info = store.resolve(args.step)
        # The export loads (verifies) the whole checkpoint, then writes the weights: the files under the
        # module's key ("model.*.safetensors") are about what is written.
        weights = sum(e.size for name, e in info.files.items() if name.startswith(f"{args.key}."))
        total = info.nbytes + weights
        if args.hf is not None:
            files = bars.run(f"export step {info.step}", total, export_hf, store, info.step, args.hf, key=args.key,
                             max_shard_size=args.max_shard_size, overwrite=args.force, writes=True)
            out = os.path.abspath(args.hf)
        else:
            files = [bars.run(f"export step {info.step}", total, export_safetensors, store, info.step, args.safetensors,
                              key=args.key, overwrite=args.force, writes=True)]
            out = files[0]
    return {"step": info.step, "format": "hf" if args.hf is not None else "safetensors", "path": out, "files": files}
