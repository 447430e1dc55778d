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
