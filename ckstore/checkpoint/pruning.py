"""Applying retention to a store: the one function both ``gc(dry_run=True)`` and a real run go through.

What to keep is decided by :func:`ckstore.checkpoint.retention.plan_deletions`
(pure); this module adds what needs the disk: it holds the metadata lock from
reading the tags through the deletions (so a tag added meanwhile by another
process is honoured, see ``ckstore.storage.metadata_lock``), refuses to decide
on an unreadable ``tags.json`` or ``metrics.json``, and verifies each slot
holder first. A dry run stops right before the first deletion, so it lists
exactly what the real run would delete.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Set
from typing import Any

from ..errors import IntegrityError, ManifestError
from .catalog import Catalog, CheckpointInfo, CorruptCheckpointWarning, CorruptStoreFileWarning
from .retention import RetentionPolicy, commit_order, plan_deletions, rank_best


def apply_retention(
    catalog: Catalog,
    meta: Any,
    policy: RetentionPolicy,
    *,
    delete: Callable[[int], None],
    protect: int | None = None,
    pinned: Set[int] = frozenset(),
    dry_run: bool = False,
) -> list[int]:
    """Delete (with ``delete``) what ``policy`` does not keep; return those steps. Never ``protect`` nor ``pinned``.

    ``protect`` is the checkpoint a save just committed; ``pinned`` the ones a
    publish of this process is reading. With ``dry_run`` nothing is deleted.
    """
    if not policy.prunes:
        return []
    with meta.held():
        try:
            catalog.read_tags()
            if policy.keep_best is not None:
                catalog.read_metrics_log()
        except (ManifestError, IntegrityError) as exc:
            # Which checkpoints are pinned (or best) is unknown: deleting now could drop a kept one.
            warnings.warn(f"retention skipped: {exc}", CorruptStoreFileWarning, stacklevel=4)
            return []
        infos = catalog.listing(warn=False)
        protected = ({protect} if protect is not None else set()) | set(pinned)
        catalog.verified.update((info.step, info.created) for info in infos if info.step == protect)  # just written
        doomed = _slots_verified(catalog, infos, policy, protected)
        if not dry_run:
            for step in doomed:
                delete(step)
    return doomed


def _slots_verified(catalog: Catalog, infos: list[CheckpointInfo], policy: RetentionPolicy, protected: set[int]) -> list[int]:
    """The deletions of ``policy``, once every checkpoint that holds a keep_last or keep_best slot has verified.

    A corrupt checkpoint holds no slot, but a fresh Store that saves
    without loading first knows of no corruption: bit rot in the newest
    step took a slot and retention deleted the older one, the only one
    that verified. So before deleting, each slot holder this object has
    not yet verified (or committed) is verified, once per object; one that
    fails is noted corrupt (never deleted, no slot) and the slots are
    ranked again. Checkpoints kept by keep_every or a tag push nothing out,
    so they are not read.
    """
    while True:
        corrupt = {info.step for info in infos if catalog.corrupt.get(info.step) == info.created}
        doomed = plan_deletions(infos, policy, protect=protected, corrupt=corrupt)
        if not doomed:
            return doomed
        sound = [info for info in infos if info.step not in corrupt]
        holders: list[CheckpointInfo] = commit_order(sound)[-policy.keep_last :] if policy.keep_last else []  # type: ignore[assignment]
        if policy.keep_best and policy.metric is not None:
            holders += rank_best(sound, policy.metric, policy.mode)[: policy.keep_best]  # type: ignore[arg-type]
        unchecked = {info.step: info for info in holders if info.step not in protected and catalog.verified.get(info.step) != info.created}
        if not unchecked:
            return doomed
        found = False
        for step, info in sorted(unchecked.items()):
            problems = catalog.verify_dir(step, info.path.name)
            if problems:
                catalog.corrupt[step] = info.created
                found = True
                warnings.warn(
                    f"checkpoint step {step} failed verification ({problems[0].message}); retention gives it no slot and keeps it",
                    CorruptCheckpointWarning,
                    stacklevel=6,
                )
            else:
                catalog.verified[step] = info.created
        if not found:
            return doomed
