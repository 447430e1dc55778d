"""Lightning through ckstore: a ``CheckpointIO`` plugin, a ``ModelCheckpoint`` and ``load_from_checkpoint``.

::

    from ckstore.integrations.lightning import ModelCheckpoint, load_from_checkpoint

    ckpt = ModelCheckpoint("runs/exp1", monitor="val_loss", mode="min", save_top_k=2, save_last=True)
    trainer = pl.Trainer(callbacks=[ckpt])          # the callback installs its CheckpointIO
    trainer.fit(model, ckpt_path="last")            # newest checkpoint that verifies (none: start fresh)
    best = load_from_checkpoint(MyModel, "runs/exp1/best")

**Paths.** Lightning names a checkpoint by a path; here the directory is the
store and the file name is a *name* (a ckstore tag) of one checkpoint:

* ``<store>/epoch=0-step=11.ckpt``: the checkpoint carrying that name (strict:
  one that fails verification raises :class:`ckstore.IntegrityError`);
* ``<store>`` or ``<store>/latest``: the newest checkpoint that verifies;
* ``<store>/best``: the best by the monitored metric that verifies.

``latest`` and ``best`` fall back past a checkpoint that fails verification
(with a :class:`ckstore.CorruptCheckpointWarning`), as :meth:`ckstore.Store.load`
does. A checkpoint is keyed by Lightning's ``global_step``: a second save at
the step just saved (``last.ckpt`` after ``epoch=0-step=11.ckpt``) adds a name
to the same checkpoint instead of writing a copy.

**Retention.** Every name pins its checkpoint, as every tag does. When
Lightning rotates a name out (``remove_checkpoint``), the name is removed and
the store's policy (``keep_best=save_top_k`` by ``monitor``, the newest commit
always) deletes the checkpoint once no name holds it, and only after a newer
checkpoint is durable. So a kill mid-rotation never leaves fewer checkpoints
than the policy promises, which Lightning's delete-after-write can (#1150).

Only ckstore's public API is used, so this module is also an example of what a
user could write. Lightning is imported here and nowhere else in ckstore.
Single process (rank 0 writes); multi-rank sharded strategies bypass
``CheckpointIO`` in Lightning itself and are not covered.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import os
from argparse import Namespace
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

import ckstore

try:
    import lightning.pytorch as pl
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("ckstore.integrations.lightning needs Lightning: pip install 'ckstore[lightning]'") from exc

__all__ = ["CkstoreCheckpointIO", "ModelCheckpoint", "load_checkpoint", "load_from_checkpoint"]

log = logging.getLogger("ckstore.lightning")

#: Path names that select a checkpoint by rank rather than by name (ckstore reserves them as tags).
_NEWEST = "latest"
_BEST = "best"


def _invalid(option: str, value: Any, expected: str) -> ckstore.InvalidArgumentError:
    return ckstore.InvalidArgumentError(f"{option}={value!r}: {expected}")


def _fspath(value: Any, option: str) -> str:
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
        raise _invalid(option, value, "expected a path (str or os.PathLike)")
    text = os.fspath(value)
    if not isinstance(text, str) or not text or "\0" in text:
        raise _invalid(option, value, "expected a non-empty text path")
    return text


def split_path(path: Any) -> tuple[str, str | None]:
    """``(store root, name)`` of a Lightning checkpoint path; name ``None`` means the newest that verifies.

    An existing directory is a store root; anything else is ``<store root>/<name>``.
    """
    text = os.path.realpath(os.path.expanduser(_fspath(path, "path")))
    if os.path.isdir(text):
        return text, None
    root, name = os.path.split(text)
    return root, (None if name == _NEWEST else name)


class CkstoreCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that stores Lightning's checkpoint dict in a :class:`ckstore.Store`.

    ``store``: a :class:`ckstore.Store` (left open by :meth:`teardown`), or its
    path; then the store is opened on first use with ``store_options``
    (``keep_best=``, ``metric=``, ... as for :class:`ckstore.Store`) and closed
    by :meth:`teardown`, which releases the writer lock between ``fit`` calls.

    ``blocking=False`` saves through ckstore's background saves: the call
    returns once the state is copied, writing and commit run in ckstore's
    thread, and a failure is raised by the next save or :meth:`teardown`.
    Lightning's own ``AsyncCheckpointIO`` must not wrap this plugin (it would
    run removals before the save they follow is durable).

    ``classes``: Enum and dataclass types that hyperparameters saved as such
    are re-created as when loading (see docs/lightning.md); a checkpoint's
    class names are never imported.
    """

    def __init__(
        self, store: ckstore.Store | str | os.PathLike[str], *, blocking: bool = True, classes: Iterable[type] = (), **store_options: Any
    ) -> None:
        if not isinstance(blocking, bool):
            raise _invalid("blocking", blocking, "expected True or False")
        self.classes: list[type] = _check_classes(classes)
        if isinstance(store, ckstore.Store):
            if store_options:
                raise _invalid(", ".join(sorted(store_options)), "...", "store options go to ckstore.Store when a path is given, not with a Store")
            self._store: ckstore.Store | None = store
            self._owned = False
            self.root = str(store.path)
        else:
            self.root = os.path.realpath(os.path.expanduser(_fspath(store, "store")))
            self._store = None
            self._owned = True
        self.blocking = blocking
        self._options = dict(store_options)
        if self._owned:
            ckstore.RetentionPolicy(**{k: v for k, v in store_options.items() if k in ("keep_last", "keep_best", "metric", "mode", "keep_every")})
        #: Metrics for the next save, set by :class:`ModelCheckpoint` (the monitored value); consumed by one save.
        self.next_metrics: dict[str, float] = {}
        #: Step of the checkpoint this plugin saved or loaded last: a save of that step again adds a name to it.
        self._current_step: int | None = None
        self._handle: ckstore.AsyncSave | None = None
        self._loaded_step: int | None = None
        #: Names and metrics for a background save that has not committed yet (tagged once it has).
        self._pending_names: dict[str, int] = {}
        self._pending_metrics: dict[str, float] = {}

    # ------------------------------------------------------------ the store

    @property
    def store(self) -> ckstore.Store:
        if self._store is None:
            self._store = ckstore.Store(self.root, **self._options)
        return self._store

    def _name(self, path: Any, *, for_save: bool) -> str | None:
        root, name = split_path(path)
        if root != self.root:
            raise ckstore.InvalidArgumentError(
                f"checkpoint path {os.fspath(path)!r} is not in the store {self.root}: name a checkpoint as <store>/<name> "
                "(Lightning's own ModelCheckpoint saves under the logger's directory: use ckstore's ModelCheckpoint, "
                "or Trainer(enable_checkpointing=False) with this plugin alone)"
            )
        if for_save and name in (None, _BEST):
            raise ckstore.InvalidArgumentError(f"checkpoint path {os.fspath(path)!r}: a save needs a name other than 'latest' or 'best'")
        return name

    def _settle(self) -> None:
        """Wait for the background save in flight and give it the names and metrics that arrived meanwhile."""
        if self._handle is None:
            return
        handle, self._handle = self._handle, None
        self.store.wait()  # raises AsyncSaveError if it failed; the names then go nowhere
        names, self._pending_names = self._pending_names, {}
        metrics, self._pending_metrics = self._pending_metrics, {}
        if metrics:
            self._record(handle.step, metrics)
        for name, step in names.items():
            self.store.tag(step, name)

    def _record(self, step: int, metrics: Mapping[str, float]) -> None:
        info = self.store.resolve(step)
        new = {k: v for k, v in metrics.items() if k not in info.metrics}
        if new:
            self.store.record_metrics(step, new)

    # ------------------------------------------------------------ CheckpointIO

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise _invalid("storage_options", storage_options, "not supported by ckstore's CheckpointIO (the store's options are set when it is opened)")
        if not isinstance(checkpoint, Mapping):
            raise ckstore.InvalidArgumentError(f"checkpoint must be Lightning's checkpoint dict, got {type(checkpoint).__name__}")
        name = self._name(path, for_save=True)
        step = checkpoint.get("global_step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise ckstore.InvalidArgumentError(f"checkpoint for {name!r} has no integer 'global_step' (got {step!r}); ckstore keys checkpoints by it")
        metrics, self.next_metrics = dict(self.next_metrics), {}
        if step == self._current_step:
            # One checkpoint, several names: last.ckpt at the step a top-k save just wrote is the same state.
            if self._handle is not None and not self._handle.done():
                self._pending_names[name] = step
                self._pending_metrics.update(metrics)
                return
            self._settle()
            if metrics:
                self._record(step, metrics)
            self.store.tag(step, name)
            return
        self._settle()
        try:
            result = self.store.save(checkpoint, step=step, metrics=metrics, tags=[name], blocking=self.blocking)
        except ckstore.CheckpointExistsError as exc:
            if self._loaded_step is None or self._loaded_step >= step:
                raise
            # Lightning would write "-v1" files beside the old run's; a ckstore step is one checkpoint.
            raise ckstore.CheckpointExistsError(
                f"{exc}: this run resumed from step {self._loaded_step}, and the run it resumed from already saved step {step}. "
                "Resume from ckpt_path='last', train into a new store (dirpath=), or delete the later steps (ckstore delete)",
                step=step,
            ) from exc
        self._current_step = step
        if not self.blocking:
            self._handle = result
        log.info("saved step %d as %r in %s", step, name, self.root)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Load the checkpoint ``path`` names (see the module docstring). ``weights_only`` is moot: nothing is unpickled."""
        name = self._name(path, for_save=False)
        self._settle()
        checkpoint = load_checkpoint(self.store, name, map_location=map_location, classes=self.classes)
        self._current_step = self._loaded_step = checkpoint.get("global_step")
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        """Remove the name; the checkpoint goes once no name holds it and the policy does not keep it.

        A name that is not there is a no-op, as Lightning's own removal of a missing file is.
        """
        name = self._name(path, for_save=True)
        if self._pending_names.pop(name, None) is not None:
            return
        try:
            self.store.untag(name)
        except ckstore.CheckpointNotFoundError:
            pass

    def teardown(self) -> None:
        """Wait for the background save, apply retention to the names rotated out, and close a store this plugin opened."""
        if self._store is None:
            return
        try:
            self._settle()
            if not self.store.readonly and self.store.policy.prunes and self.store.checkpoints():
                self.store.gc()
        finally:
            if self._owned:
                store, self._store = self._store, None
                store.close()


def load_checkpoint(
    store: ckstore.Store | str | os.PathLike[str], name: str | None = None, *, map_location: Any = None, classes: Iterable[type] = ()
) -> dict[str, Any]:
    """Lightning's checkpoint dict from a store: by name, ``"best"``, or ``None`` for the newest that verifies.

    ``store`` may also be a Lightning-style path (``runs/exp1/last.ckpt``) with ``name`` left ``None``.
    ``classes``: Enum and dataclass types hyperparameters may be re-created as.
    """
    if not isinstance(store, ckstore.Store):
        root, from_path = split_path(store)
        if name is None:
            name = from_path
        with ckstore.Store(root, readonly=True) as opened:
            return load_checkpoint(opened, name, map_location=map_location, classes=classes)
    if name is not None and not isinstance(name, str):
        raise _invalid("name", name, "expected a checkpoint name, 'best', 'latest' or None")
    step = None if name in (None, _NEWEST) else name
    checkpoint = store.load(None, step=step, map_location=map_location, classes=_check_classes(classes))
    if not isinstance(checkpoint, dict) or "global_step" not in checkpoint:
        raise ckstore.InvalidArgumentError(f"{store.path}: checkpoint {name or 'latest'!r} was not saved by Lightning (no 'global_step')")
    log.info("loaded step %s (%s) from %s", checkpoint["global_step"], name or "newest that verifies", store.path)
    return checkpoint


def load_from_checkpoint(
    cls: type[Any],
    path: str | os.PathLike[str],
    *,
    map_location: Any = None,
    strict: bool | None = None,
    classes: Iterable[type] = (),
    **kwargs: Any,
) -> Any:
    """``cls.load_from_checkpoint(path)`` for a checkpoint in a store (``LightningModule`` or ``LightningDataModule``).

    Lightning's own ``load_from_checkpoint`` reads files with ``torch.load``
    and never asks a ``CheckpointIO``; this reads the store (read-only, every
    file verified) and then builds the object exactly as Lightning does:
    hyperparameters from the checkpoint updated with ``kwargs``, then
    ``on_load_checkpoint`` and ``load_state_dict(strict=strict)``. ``classes``:
    Enum and dataclass types the hyperparameters may be re-created as.
    """
    if not isinstance(cls, type) or not issubclass(cls, (pl.LightningModule, pl.LightningDataModule)):
        raise _invalid("cls", cls, "expected a LightningModule or LightningDataModule subclass")
    checkpoint = load_checkpoint(path, map_location=map_location, classes=classes)
    checkpoint.setdefault(cls.CHECKPOINT_HYPER_PARAMS_KEY, {})
    checkpoint[cls.CHECKPOINT_HYPER_PARAMS_KEY].update(kwargs)
    # Lightning's own builder (pinned by ckstore[lightning]); tests/test_lightning.py checks it still behaves.
    from lightning.pytorch.core.saving import _load_state

    if issubclass(cls, pl.LightningDataModule):
        return _load_state(cls, checkpoint, **kwargs)
    model = _load_state(cls, checkpoint, strict=strict, **kwargs)
    state_dict = checkpoint.get("state_dict") or {}
    import torch

    device = next((t.device for t in state_dict.values() if isinstance(t, torch.Tensor)), None)
    return model.to(device) if device is not None else model


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, storing into a :class:`ckstore.Store` at ``dirpath``.

    Same options and the same decisions (when to save, which names, top-k),
    with ckstore's storage underneath: every save is durable and verified,
    names are tags, and ``monitor``/``mode``/``save_top_k`` become the store's
    retention policy (``keep_best``), so the best checkpoints are never deleted
    by a rotation that a kill interrupted. ``trainer.fit(ckpt_path="last")``
    resumes from the newest checkpoint that verifies, ``"best"`` from the best
    that verifies. ``blocking=False`` saves in ckstore's background thread.
    ``classes``: Enum and dataclass types hyperparameters may be re-created as
    on resume, besides those of the model's own ``hparams`` values, which are
    allowed in ``setup``. See docs/lightning.md for the mapping and what differs from Lightning.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        filename: str | None = None,
        monitor: str | None = None,
        verbose: bool = False,
        save_last: bool | str | None = None,
        save_top_k: int = 1,
        save_on_exception: bool = False,
        save_weights_only: bool = False,
        mode: str = "min",
        auto_insert_metric_name: bool = True,
        every_n_train_steps: int | None = None,
        train_time_interval: timedelta | None = None,
        every_n_epochs: int | None = None,
        save_on_train_epoch_end: bool | None = None,
        enable_version_counter: bool = True,
        *,
        blocking: bool = True,
        classes: Iterable[type] = (),
    ) -> None:
        root = os.path.realpath(os.path.expanduser(_fspath(dirpath, "dirpath")))
        _check_options(
            filename=filename,
            monitor=monitor,
            save_last=save_last,
            save_top_k=save_top_k,
            mode=mode,
            every_n_train_steps=every_n_train_steps,
            train_time_interval=train_time_interval,
            every_n_epochs=every_n_epochs,
            flags={
                "verbose": verbose,
                "save_on_exception": save_on_exception,
                "save_weights_only": save_weights_only,
                "auto_insert_metric_name": auto_insert_metric_name,
                "enable_version_counter": enable_version_counter,
                "blocking": blocking,
            },
            save_on_train_epoch_end=save_on_train_epoch_end,
        )
        super().__init__(
            dirpath=root,
            filename=filename,
            monitor=monitor,
            verbose=verbose,
            save_last=save_last,
            save_top_k=save_top_k,
            save_on_exception=save_on_exception,
            save_weights_only=save_weights_only,
            mode=mode,
            auto_insert_metric_name=auto_insert_metric_name,
            every_n_train_steps=every_n_train_steps,
            train_time_interval=train_time_interval,
            every_n_epochs=every_n_epochs,
            save_on_train_epoch_end=save_on_train_epoch_end,
            enable_version_counter=enable_version_counter,
        )
        #: The plugin this callback saves through; installed on the trainer's strategy in ``setup``.
        self.checkpoint_io = CkstoreCheckpointIO(
            root, blocking=blocking, classes=classes, **retention_options(monitor=monitor, mode=mode, save_top_k=save_top_k)
        )
        # ``trainer.fit(ckpt_path="best")`` reads ``best_model_path`` before any callback runs: in a new
        # process it would be empty and Lightning would refuse; point it at the store's best instead.
        if monitor is not None:
            self.best_model_path = os.path.join(root, _BEST)

    # ------------------------------------------------------------ wiring

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        current = trainer.strategy.checkpoint_io
        if current is not self.checkpoint_io:
            if isinstance(current, CkstoreCheckpointIO) and current.root == self.checkpoint_io.root:
                self.checkpoint_io = current  # the user passed the plugin too (plugins=[ckpt.checkpoint_io] or their own)
            elif type(current).__name__ == "TorchCheckpointIO":
                trainer.strategy.checkpoint_io = self.checkpoint_io
            else:
                raise ckstore.InvalidArgumentError(
                    f"Trainer(plugins=...) has checkpoint_io {type(current).__name__} (store {getattr(current, 'root', None)!r}); "
                    f"ckstore's ModelCheckpoint saves through its own CkstoreCheckpointIO for {self.checkpoint_io.root}: drop that plugin"
                )
        # The Enum and dataclass classes of the model's own hyperparameters: objects this process already
        # made, so allowing them imports nothing, and resuming needs no classes= for them.
        found: set[type] = set()
        _classes_in(getattr(pl_module, "hparams", {}), found, 0)
        self.checkpoint_io.classes = list(dict.fromkeys([*self.checkpoint_io.classes, *sorted(found, key=lambda c: (c.__module__, c.__qualname__))]))
        super().setup(trainer, pl_module, stage)

    def _ModelCheckpoint__warn_if_dir_not_empty(self, dirpath: Any) -> None:
        """Silenced: a store holds earlier checkpoints by design, and no name is ever overwritten by a new run's save."""

    # ------------------------------------------------------------ storage

    def file_exists(self, filepath: Any, trainer: pl.Trainer) -> bool:
        io = self.checkpoint_io
        _, name = split_path(filepath)
        if name is None or name == _BEST:
            return True
        exists = name in io._pending_names
        if not exists:
            try:
                io.store.resolve(name)
                exists = True
            except ckstore.CheckpointNotFoundError:
                exists = False
            except ckstore.InvalidArgumentError:
                exists = False  # not a valid name: the save will say so
        return trainer.strategy.reduce_boolean_decision(exists, all=False)

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        # Lightning takes the newest of these by mtime and checks nothing; the store root means
        # "the newest checkpoint that verifies" to CkstoreCheckpointIO, which falls back past a corrupt one.
        try:
            return {self.checkpoint_io.root} if self.checkpoint_io.store.checkpoints() else set()
        except ckstore.CheckpointNotFoundError:
            return set()

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if self.monitor is not None:
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None and math.isfinite(float(value)):
                self.checkpoint_io.next_metrics = {self.monitor: float(value)}
        super()._save_checkpoint(trainer, filepath)

    @staticmethod
    def _link_checkpoint(trainer: pl.Trainer, filepath: str, linkpath: str) -> None:
        # save_last="link": a second name on the same checkpoint (no symlink in the store directory).
        io = trainer.strategy.checkpoint_io
        if trainer.is_global_zero and isinstance(io, CkstoreCheckpointIO) and filepath != linkpath:
            io._settle()
            _, source = split_path(filepath)
            step = io.store.resolve(source).step
            io.store.tag(step, io._name(linkpath, for_save=True))
        trainer.strategy.barrier()


def _check_classes(classes: Any) -> list[type]:
    if isinstance(classes, (str, bytes, type)) or not isinstance(classes, Iterable):
        raise _invalid("classes", classes, "expected a list of Enum or dataclass types")
    out = list(classes)
    for cls in out:
        if not isinstance(cls, type) or not (issubclass(cls, enum.Enum) or dataclasses.is_dataclass(cls)):
            raise _invalid("classes", cls, "expected Enum or dataclass types (only those are re-created from a checkpoint)")
    return out


def _classes_in(value: Any, found: set[type], depth: int) -> None:
    """Add the Enum and dataclass types among ``value``'s values (hyperparameters) to ``found``."""
    if depth > 64:
        return
    if isinstance(value, enum.Enum):
        found.add(type(value))
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        found.add(type(value))
        for field in dataclasses.fields(value):
            _classes_in(getattr(value, field.name, None), found, depth + 1)
    elif isinstance(value, Namespace):
        _classes_in(vars(value), found, depth + 1)
    elif isinstance(value, Mapping):
        for item in value.values():
            _classes_in(item, found, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _classes_in(item, found, depth + 1)


def retention_options(*, monitor: str | None, mode: str, save_top_k: int) -> dict[str, Any]:
    """The :class:`ckstore.Store` policy for ModelCheckpoint's options (see docs/lightning.md)."""
    if save_top_k == -1:
        return {"metric": monitor, "mode": mode} if monitor else {}  # keep everything; "best" still ranks
    options: dict[str, Any] = {"keep_last": 1}
    if monitor is not None:
        options.update(metric=monitor, mode=mode)
        if save_top_k > 0:
            options["keep_best"] = save_top_k
    return options


def _check_options(
    *,
    filename: Any,
    monitor: Any,
    save_last: Any,
    save_top_k: Any,
    mode: Any,
    every_n_train_steps: Any,
    train_time_interval: Any,
    every_n_epochs: Any,
    flags: Mapping[str, Any],
    save_on_train_epoch_end: Any,
) -> None:
    """Refuse a bad option with InvalidArgumentError naming it (Lightning raises untyped errors, or none)."""
    if filename is not None and (not isinstance(filename, str) or not filename or "/" in filename or os.sep in filename):
        raise _invalid("filename", filename, "expected a file-name template without a directory part")
    if monitor is not None and (not isinstance(monitor, str) or not monitor):
        raise _invalid("monitor", monitor, "expected the name of a logged metric or None")
    if save_last not in (None, True, False, "link") or (save_last is not None and not isinstance(save_last, (bool, str))):
        raise _invalid("save_last", save_last, "expected None, True, False or 'link'")
    if isinstance(save_top_k, bool) or not isinstance(save_top_k, int) or save_top_k < -1:
        raise _invalid("save_top_k", save_top_k, "expected an integer >= -1 (-1 keeps all, 0 none)")
    if mode not in ("min", "max"):
        raise _invalid("mode", mode, "expected 'min' or 'max'")
    for option, value in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise _invalid(option, value, "expected a non-negative integer or None")
    if train_time_interval is not None and (not isinstance(train_time_interval, timedelta) or train_time_interval.total_seconds() <= 0):
        raise _invalid("train_time_interval", train_time_interval, "expected a positive datetime.timedelta or None")
    triggers = [n for n, v in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs)) if v] + (
        ["train_time_interval"] if train_time_interval is not None else []
    )
    if len(triggers) > 1:
        raise _invalid(triggers[1], {"every_n_train_steps": every_n_train_steps, "every_n_epochs": every_n_epochs, "train_time_interval": train_time_interval}[triggers[1]], f"cannot be combined with {triggers[0]}")
    if monitor is None and save_top_k not in (-1, 0, 1):
        raise _invalid("save_top_k", save_top_k, "needs monitor= (the metric that ranks the top k)")
    for option, value in flags.items():
        if not isinstance(value, bool):
            raise _invalid(option, value, "expected True or False")
    if save_on_train_epoch_end is not None and not isinstance(save_on_train_epoch_end, bool):
        raise _invalid("save_on_train_epoch_end", save_on_train_epoch_end, "expected True, False or None")
