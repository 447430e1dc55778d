"""What is written about committed checkpoints without touching them: tags (``tags.json``) and recorded metrics (``metrics.json``).

Both need only the short metadata lock (``ckstore.storage.metadata_lock``),
never the writer lock: a shell may tag, publish or record an evaluation
while a training process holds the store, and that process's retention
honours what they wrote. A committed checkpoint's own files never change.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from ..errors import CheckpointNotFoundError, InvalidArgumentError
from ..format.tags import TagEntry
from .catalog import Catalog, CheckpointInfo
from .commit import Committer, guarded
from .metrics_log import Recorded


class Annotations:
    """Tags and recorded metrics of one store; the caller has checked the arguments and that the store is writable."""

    def __init__(self, catalog: Catalog, committer: Committer, meta: Any) -> None:
        self.catalog = catalog
        self.committer = committer
        self.meta = meta

    def record_metrics(self, step: int, metrics: dict[str, float]) -> CheckpointInfo:
        """Add ``metrics`` to committed ``step`` in ``metrics.json``; a metric it already has with another value is refused."""
        catalog = self.catalog
        with self.meta.held():
            info = catalog.resolve_step(step)
            clash = sorted(k for k, v in metrics.items() if k in info.metrics and info.metrics[k] != v)
            if clash:
                raise InvalidArgumentError(
                    f"step {step} already has {', '.join(f'{k}={info.metrics[k]!r}' for k in clash)}; recorded metrics never change"
                )
            recorded = catalog.read_metrics_log()  # unreadable: refuse rather than drop what others recorded
            previous = recorded.get(step)
            kept = dict(previous.metrics) if previous is not None and previous.created == info.created else {}
            recorded[step] = Recorded(info.created, {**kept, **metrics})
            live = {s: r for s, r in recorded.items() if s == step or catalog.exists(s)}
            guarded(catalog.root, lambda: self.committer.write_metrics(live), what=f"recording metrics of step {step}")
            return catalog.resolve_step(step)

    def tag(self, step: int, name: str) -> CheckpointInfo:
        """Point tag ``name`` at ``step`` (moving it if it named another checkpoint)."""
        catalog = self.catalog
        with self.meta.held():
            if not catalog.exists(step):
                raise CheckpointNotFoundError(f"{catalog.root}: no checkpoint at step {step}", step=step)
            catalog.resolve_step(step)  # a malformed one (manifest.json a directory) is refused before the tag is written
            tags = catalog.read_tags()
            tags[name] = TagEntry(step, time.time())
            guarded(catalog.root, lambda: self.committer.write_tags(tags), what=f"tag {name!r}")
            return catalog.resolve_step(step)

    def tag_new(self, step: int, names: list[str]) -> None:
        """Tag a checkpoint a save just committed with each of ``names``."""
        with self.meta.held():
            current = self.catalog.read_tags()
            now = time.time()
            for name in names:
                current[name] = TagEntry(step, now)
            guarded(self.catalog.root, lambda: self.committer.write_tags(current), what="tagging the new checkpoint")

    def untag(self, name: str) -> None:
        """Remove tag ``name``; CheckpointNotFoundError if no checkpoint carries it."""
        with self.meta.held():
            tags = self.catalog.read_tags()
            if name not in tags:
                raise CheckpointNotFoundError(f"{self.catalog.root}: no checkpoint is tagged {name!r}", step=name)
            del tags[name]
            guarded(self.catalog.root, lambda: self.committer.write_tags(tags), what=f"untag {name!r}")

    def untag_step(self, step: int, tags: Mapping[str, TagEntry]) -> None:
        """Drop every tag of ``step`` from ``tags`` (read by the caller under the metadata lock it holds)."""
        if any(e.step == step for e in tags.values()):
            guarded(self.catalog.root, lambda: self.committer.write_tags({t: e for t, e in tags.items() if e.step != step}), what="untagging")
