"""ckstore on ``torch.distributed``: many ranks save one checkpoint, committed once, by one coordinator.

* :class:`StoreWriter` / :class:`StoreReader`: a storage pair for
  ``torch.distributed.checkpoint`` (``dcp.save``, ``dcp.async_save``,
  ``dcp.load``); DCP's planners reshard on load (N to M ranks, N to 1).
* :func:`checkpoint_group`: a gloo group with a short timeout for the save's
  collectives, so survivors of a dead rank fail fast instead of hanging.

The commit is the store's own (``ckstore.distributed.coordinator``); see
docs/distributed.md.
"""

from __future__ import annotations

from .coordinator import DEFAULT_TIMEOUT_S, checkpoint_group
from .dcp import StoreReader, StoreWriter

__all__ = ["DEFAULT_TIMEOUT_S", "StoreReader", "StoreWriter", "checkpoint_group"]
