"""ckstore: crash-safe, verified checkpoints for PyTorch training.

>>> with ckstore.Store("runs/exp1", keep_last=3, keep_best=2, metric="val_loss") as store:
...     store.save({"model": model, "optimizer": opt}, step=100, metrics={"val_loss": 0.3})
...     store.load({"model": model, "optimizer": opt})

Every public name is re-exported here; the subpackages (format, storage, engine, checkpoint, state, training, integrations) are internal.
"""

from __future__ import annotations

from .errors import (
    AsyncSaveError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CkstoreError,
    CommittedWithErrorsError,
    DistributedError,
    DvcError,
    IntegrityError,
    InvalidArgumentError,
    LockUnsupportedError,
    ManifestError,
    ReadOnlyStoreError,
    StateError,
    StorageError,
    StoreLockedError,
    UnsafeStoreError,
)
from .checkpoint.background import AsyncSave
from .training.data import ResumableSampler
from .training.loop import Checkpointer, EarlyStopping, checkpoint_interval, resume
from .checkpoint.retention import RetentionPolicy, select_kept
from .training.rng import RNGState
from .checkpoint.catalog import CheckpointInfo, CorruptCheckpointWarning, CorruptStoreFileWarning, Problem
from .store import Store
from .state.targets import StateMismatchWarning

__version__ = "0.1.0"

__all__ = [
    "AsyncSave",
    "AsyncSaveError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointReadError",
    "Checkpointer",
    "CkstoreError",
    "CommittedWithErrorsError",
    "CorruptCheckpointWarning",
    "CorruptStoreFileWarning",
    "DistributedError",
    "DvcError",
    "EarlyStopping",
    "IntegrityError",
    "InvalidArgumentError",
    "LockUnsupportedError",
    "ManifestError",
    "Problem",
    "RNGState",
    "ReadOnlyStoreError",
    "ResumableSampler",
    "RetentionPolicy",
    "StateError",
    "StateMismatchWarning",
    "StorageError",
    "Store",
    "StoreLockedError",
    "UnsafeStoreError",
    "__version__",
    "checkpoint_interval",
    "resume",
    "select_kept",
]
