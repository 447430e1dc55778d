"""ckstore on ``torch.distributed``: many ranks save one checkpoint, committed once, by one coordinator.

* :class:`StoreWriter` / :class:`StoreReader`: a storage pair for
  ``torch.distributed.checkpoint`` (``dcp.save``, ``dcp.async_save``,
  ``dcp.load``); DCP's planners reshard on load (N to M ranks, N to 1).
* :func:`checkpoint_group`: a gloo group with a short timeout for the save's
  collectives, so survivors of a dead rank fail fast instead of hanging.
* ``Store(path, process_group=group)`` (``ckstore.distributed.ranks``, found by
  Store through an entry point): ``save`` and ``load`` as collectives.
* :func:`per_rank`: values that differ per rank, stored under their rank.
* :class:`ValueSavePlanner` / :class:`ValueLoadPlanner`: DCP's default
  planners with non-tensor values as JSON (``ckstore.distributed.values``).

The commit is the store's own (``ckstore.distributed.coordinator``); see
docs/distributed.md.
"""

from __future__ import annotations

from .coordinator import DEFAULT_TIMEOUT_S, checkpoint_group
from .dcp import StoreReader, StoreWriter
from .training import per_rank
from .values import ValueLoadPlanner, ValueSavePlanner

__all__ = ["DEFAULT_TIMEOUT_S", "StoreReader", "StoreWriter", "ValueLoadPlanner", "ValueSavePlanner", "checkpoint_group", "per_rank"]
