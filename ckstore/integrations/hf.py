"""Hugging Face ``Trainer`` checkpoints through ckstore: durable, verified, retention that never drops the best.

>>> from ckstore.integrations.hf import CkstoreTrainer
>>> trainer = CkstoreTrainer(model=model, args=args, train_dataset=ds)   # store at <output_dir>/ckstore
>>> trainer.train(resume_from_checkpoint=True)   # newest checkpoint that verifies

**The seam.** A ``Trainer`` subclass (or :class:`CkstoreTrainerMixin` in front of
another ``Trainer`` subclass, e.g. TRL's) overrides the Trainer's own checkpoint
methods and nothing else of the loop: ``_save_checkpoint`` writes one ckstore
checkpoint per save, and the resume path (``_load_from_checkpoint``,
``_load_optimizer_and_scheduler``, ``_load_scaler``, ``_load_rng_state``,
``_load_best_model``) restores from that checkpoint. The Trainer itself still
decides when to save, evaluates, tracks the best metric, fast-forwards the data
loader (``skip_first_batches`` from the global step) and restores the RNG at the
moment it always does, so a resumed run follows the same code path as a resume
from a ``checkpoint-N`` directory. A callback cannot do this: ``on_save`` runs
after the Trainer has written (and rotated) its directories and cannot change
what a resume reads.

The Trainer's resume reads ``trainer_state.json`` from a directory in two places
of ``train()``; :meth:`CkstoreTrainerMixin.train` loads the checkpoint (verified,
falling back past a corrupt one), writes that one file into a private temporary
directory, passes the directory as ``resume_from_checkpoint`` and removes it when
``train()`` returns. Every other byte comes from the loaded checkpoint.

**A checkpoint holds** ``model`` (the unwrapped module's state dict), ``hf``
(config JSON and tied-weight keys, for :func:`ckstore.integrations.export.export_hf`),
``trainer_state`` (the JSON ``trainer_state.json`` would hold: global step,
epoch, log history, best metric, stateful callbacks), and unless
``save_only_model``: ``optimizer``, ``scheduler``, ``scaler`` (mixed precision
only) and ``rng``, one :class:`ckstore.RNGState` per rank, gathered to rank 0.
Metrics: the ``eval_*`` values and the training ``loss`` logged at that step.

**Retention** comes from the ``TrainingArguments``: ``save_total_limit`` is
``keep_last``; ``metric_for_best_model`` (set by ``load_best_model_at_end``) is
``keep_best=1`` on ``eval_<metric>`` with ``greater_is_better``'s mode, and the
Trainer's own best step (``state.best_global_step``, which on ties keeps the
older step where ckstore ranks the newer first) carries the tag ``hf-best``,
which retention never deletes. See docs/huggingface.md for what differs from
the Trainer's own checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch

import ckstore
from ckstore import InvalidArgumentError, RNGState, StateError, Store
from ckstore.storage import durable as _durable

from .export import HF_META_KEY, declared_tied_keys, hf_metadata

try:
    from transformers import Trainer
    from transformers.trainer_callback import ExportableState
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("ckstore.integrations.hf needs transformers: pip install 'ckstore[hf]'") from exc

__all__ = ["BEST_TAG", "CkstoreTrainer", "CkstoreTrainerMixin", "retention_from_args"]

#: The tag on the Trainer's best checkpoint (``state.best_global_step``): pinned against retention.
BEST_TAG = "hf-best"
TRAINER_STATE_NAME = "trainer_state.json"
#: ``Store`` options that come from ``TrainingArguments`` and may not be given in ``store_options``.
_FROM_ARGS = ("keep_last", "keep_best", "metric", "mode")


def retention_from_args(args: Any) -> dict[str, Any]:
    """The :class:`ckstore.Store` retention options equivalent to a ``TrainingArguments``' checkpoint rotation."""
    options: dict[str, Any] = {"keep_last": args.save_total_limit}
    metric = args.metric_for_best_model
    if metric is not None:
        options.update(
            keep_best=1,
            metric=metric if metric.startswith("eval_") else f"eval_{metric}",
            mode="max" if args.greater_is_better else "min",
        )
    return options


@dataclasses.dataclass
class _Resume:
    directory: str  # holds trainer_state.json only; what the Trainer passes to the overridden loaders
    payload: dict[str, Any]
    step: int


class CkstoreTrainerMixin:
    """Routes a ``transformers.Trainer``'s checkpoints through a :class:`ckstore.Store`; put it before ``Trainer`` in the bases.

    ``store``: a path (default ``<output_dir>/ckstore``), opened with the
    retention of :func:`retention_from_args` plus ``store_options`` (``lock_timeout``,
    ``incremental``, ``keep_every``, ...); or an open :class:`ckstore.Store`, whose
    retention must then keep what the arguments ask (else InvalidArgumentError).
    ``background=True`` saves with ``blocking=False``: training resumes once the
    state is copied; ``train()`` waits for the last save before it returns.

    ``train(resume_from_checkpoint=...)`` takes ``True`` (the newest checkpoint
    that verifies; a corrupt newer one is skipped with a
    :class:`ckstore.CorruptCheckpointWarning`), a step number, ``"best"`` or a tag.
    """

    def __init__(
        self,
        *args: Any,
        store: Store | str | os.PathLike[str] | None = None,
        store_options: Mapping[str, Any] | None = None,
        background: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        targs = self.args
        for name, refused in (
            ("DeepSpeed", getattr(self, "is_deepspeed_enabled", False)),
            ("FSDP", getattr(self, "is_fsdp_enabled", False)),
            ("push_to_hub", targs.push_to_hub),
            ("save_on_each_node", targs.save_on_each_node),
        ):
            if refused:
                raise InvalidArgumentError(
                    f"CkstoreTrainer does not support {name}: its checkpoints are written by one rank into one store"
                )
        options = dict(store_options or {})
        clash = sorted(set(options) & set(_FROM_ARGS))
        if clash:
            raise InvalidArgumentError(
                f"store_options {clash} come from TrainingArguments (save_total_limit, metric_for_best_model, greater_is_better)"
            )
        if not isinstance(background, bool):
            raise InvalidArgumentError(f"background must be True or False, got {background!r}")
        self._ck_background = background
        self._ck_resume: _Resume | None = None
        self._ck_saved: set[int] = set()
        if isinstance(store, Store):
            if options:
                raise InvalidArgumentError("store_options apply only when CkstoreTrainer opens the store from a path")
            _check_policy(store, retention_from_args(targs))
            self._ck_path, self._ck_options, self._ck_store, self._ck_owned = str(store.path), {}, store, False
        else:
            path = os.path.join(targs.output_dir, "ckstore") if store is None else store
            if not isinstance(path, (str, os.PathLike)):
                raise InvalidArgumentError(f"store must be a ckstore.Store, a path or None, got {type(store).__name__}")
            self._ck_path = os.fspath(path)
            self._ck_options = {**retention_from_args(targs), **options}
            self._ck_store, self._ck_owned = None, True

    # ------------------------------------------------------------ the store

    @property
    def store(self) -> Store:
        """The store this trainer writes (rank 0) or reads (other ranks); opened on first use."""
        if self._ck_store is None:
            if self.args.should_save:
                self._ck_store = Store(self._ck_path, **self._ck_options)
            else:
                self._ck_store = Store(self._ck_path, readonly=True)
        return self._ck_store

    def checkpoint_steps(self) -> list[int]:
        """Steps of the store's committed checkpoints, ascending; ``[]`` before the first save (on every rank).

        ``transformers.trainer_utils.get_last_checkpoint`` looks for ``checkpoint-N`` directories and finds none
        in a store; scripts that resume only when there is something to resume from use
        ``trainer.train(resume_from_checkpoint=bool(trainer.checkpoint_steps()))``.
        """
        unborn = not os.path.isdir(os.path.join(self._ck_path, "checkpoints"))
        if self._ck_store is None and not self.args.should_save and unborn:
            return []  # a reading rank before rank 0's first save: there is no store to open yet
        return [info.step for info in self.store.checkpoints()]

    def _close_owned_store(self) -> None:
        if self._ck_owned and self._ck_store is not None:
            store, self._ck_store = self._ck_store, None
            store.close()

    # ------------------------------------------------------------ train / resume

    def train(
        self,
        resume_from_checkpoint: bool | int | str | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        if trial is not None or self.hp_search_backend is not None:
            raise InvalidArgumentError("CkstoreTrainer does not support hyperparameter search (each trial would need its own store)")
        try:
            if resume_from_checkpoint is None or resume_from_checkpoint is False:
                return super().train(None, trial, ignore_keys_for_eval, **kwargs)
            with _durable.scratch_dir(prefix="ckstore-resume-") as scratch:
                self._ck_resume = self._load_for_resume(resume_from_checkpoint, scratch)
                try:
                    return super().train(scratch, trial, ignore_keys_for_eval, **kwargs)
                finally:
                    self._ck_resume = None
        finally:
            if self._ck_store is not None and self.args.should_save:
                self._ck_store.wait()  # a background save in flight is durable (or raises) before train() returns
            self._close_owned_store()

    def _load_for_resume(self, which: bool | int | str, directory: str) -> _Resume:
        if which is True:
            step: int | str | None = None
        elif isinstance(which, int) and not isinstance(which, bool):
            step = which
        elif isinstance(which, str) and not os.path.isdir(which):
            step = which  # "latest", "best" or a tag
        elif isinstance(which, (str, os.PathLike)):
            raise InvalidArgumentError(
                f"resume_from_checkpoint={os.fspath(which)!r} is a directory; CkstoreTrainer resumes from its store "
                "(True, a step, 'best' or a tag); bring a Trainer checkpoint-N in with `ckstore import DIR STORE` first"
            )
        else:
            raise InvalidArgumentError(f"resume_from_checkpoint must be True, a step, 'best' or a tag, got {which!r}")
        # map_location="cpu": every rank reads the same files; tensors go to their device as the Trainer's own
        # loaders put them (load_state_dict copies into the parameters, the optimizer casts to theirs).
        payload = self.store.load(None, step=step, map_location="cpu")
        saved = payload.get("trainer_state") if isinstance(payload, Mapping) else None
        if not isinstance(saved, str):
            raise StateError(
                f"{self.store.path}: checkpoint {which!r} holds no trainer_state; it is not a Trainer checkpoint", key="trainer_state"
            )
        trainer_state = json.loads(saved)
        # The best path recorded at save time may have moved with the store: point it at the checkpoint now.
        trainer_state["best_model_checkpoint"] = self._best_path(trainer_state.get("best_global_step"))
        text = json.dumps(trainer_state, indent=2, sort_keys=True) + "\n"  # scratch for Trainer to read, removed after train()
        _durable.write_file_atomic(os.path.join(directory, TRAINER_STATE_NAME), text.encode(), site="hf_resume_state", durable=False)
        return _Resume(directory, dict(payload), int(trainer_state["global_step"]))

    def _resumed(self, checkpoint: str | None) -> _Resume | None:
        if checkpoint is None:
            return None
        if self._ck_resume is None or os.fspath(checkpoint) != self._ck_resume.directory:
            raise InvalidArgumentError(f"CkstoreTrainer loads checkpoints from its store, not from {checkpoint!r}")
        return self._ck_resume

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        resume = self._resumed(resume_from_checkpoint)
        _load_module(model if model is not None else self.model, resume.payload.get("model"), resume.step)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        resume = self._resumed(checkpoint)
        if resume is None:
            return
        for key, target in (("optimizer", self.optimizer), ("scheduler", self.lr_scheduler)):
            if key not in resume.payload:
                raise StateError(
                    f"checkpoint step {resume.step} holds no {key} state (saved with save_only_model=True?); "
                    "it can be loaded for evaluation, not resumed",
                    key=key,
                )
            target.load_state_dict(resume.payload[key])

    def _load_scaler(self, checkpoint: str | None) -> None:
        resume = self._resumed(checkpoint)
        scaler = getattr(self.accelerator, "scaler", None)
        if resume is not None and scaler is not None and "scaler" in resume.payload:
            scaler.load_state_dict(resume.payload["scaler"])

    def _load_rng_state(self, checkpoint: str | None) -> None:
        resume = self._resumed(checkpoint)
        if resume is None:
            return
        states = resume.payload.get("rng")
        rank = self.args.process_index if self.args.world_size > 1 else 0
        if not isinstance(states, list) or rank >= len(states):
            saved = len(states) if isinstance(states, list) else 0
            warnings.warn(
                f"checkpoint step {resume.step} holds RNG state for {saved} rank(s), none for rank {rank}: "
                "this rank's random numbers will not match the interrupted run",
                stacklevel=2,
            )
            return
        RNGState().load_state_dict(states[rank])

    def _load_best_model(self) -> None:
        step = self.state.best_global_step
        model = self.model
        try:
            payload = self.store.load(None, step=step, map_location="cpu")
        except (ckstore.IntegrityError, ckstore.CheckpointNotFoundError, ckstore.ManifestError) as exc:
            warnings.warn(
                f"best checkpoint step {step} failed to load ({exc}); loading the best that verifies by the store's metric",
                ckstore.CorruptCheckpointWarning,
                stacklevel=2,
            )
            payload = self.store.load(None, step="best", map_location="cpu")
        _load_module(model, payload.get("model"), step)

    # ------------------------------------------------------------ save

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        if trial is not None or self.hp_search_backend is not None:
            raise InvalidArgumentError("CkstoreTrainer does not support hyperparameter search")
        self.store_flos()
        step = self.state.global_step
        rng = None if self.args.save_only_model else _gathered_rng(self.args.world_size)
        if self.args.should_save:
            if step in self._ck_saved:
                # The Trainer asked twice for one step (e.g. a step and an epoch boundary): the first save stands;
                # metrics logged in between are added to it (ckstore never rewrites a committed checkpoint).
                self._record_new_metrics(step)
            else:
                self._ck_saved.add(step)
                best = self.state.best_global_step
                tags = (BEST_TAG,) if best == step else ()
                state, metrics = self._checkpoint_state(rng), self._metrics_at(step)
                self.store.save(state, step=step, metrics=metrics, tags=tags, blocking=not self._ck_background)
                if best and best != step:
                    self._pin_best(best)
        self._barrier()
        self.state.best_model_checkpoint = self._best_path(self.state.best_global_step)

    def _checkpoint_state(self, rng: list[dict[str, Any]] | None) -> dict[str, Any]:
        # Stateful callbacks as Trainer._save_checkpoint records them, then the trainer state as its JSON.
        for cb in [cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)]:
            name = cb.__class__.__name__
            if isinstance(self.state.stateful_callbacks[name], list):
                self.state.stateful_callbacks[name].append(cb.state())
            else:
                self.state.stateful_callbacks[name] = cb.state()
        module = self.accelerator.unwrap_model(self.model)
        state: dict[str, Any] = {"model": module}
        if hasattr(module, "config") and hasattr(module.config, "to_json_string"):
            state[HF_META_KEY] = {"model": hf_metadata(module)}
        if not self.args.save_only_model:
            state["optimizer"] = self.optimizer
            state["scheduler"] = self.lr_scheduler
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:
                state["scaler"] = scaler
            state["rng"] = rng
        state["trainer_state"] = json.dumps(dataclasses.asdict(self.state), indent=2, sort_keys=True) + "\n"
        return state

    def _metrics_at(self, step: int) -> dict[str, float]:
        """The eval metrics and training loss logged at ``step`` (finite numbers only), for ranking and ``ckstore ls``."""
        metrics: dict[str, float] = {}
        for entry in reversed(self.state.log_history):
            if entry.get("step") != step:
                break
            for name, value in entry.items():
                wanted = name.startswith("eval_") or name == "loss"
                if wanted and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    metrics.setdefault(name, float(value))
        return metrics

    def _record_new_metrics(self, step: int) -> None:
        self.store.wait()
        known = self.store.resolve(step).metrics
        new = {k: v for k, v in self._metrics_at(step).items() if k not in known}
        if new:
            self.store.record_metrics(step, new)
        if self.state.best_global_step == step:
            self._pin_best(step)

    def _pin_best(self, step: int) -> None:
        try:
            info = self.store.resolve(BEST_TAG)
        except ckstore.CheckpointNotFoundError:
            info = None
        if info is None or info.step != step:
            self.store.wait()  # the tag goes on a committed checkpoint
            try:
                self.store.tag(step, BEST_TAG)
            except ckstore.CheckpointNotFoundError:
                pass  # the best step was evaluated but never saved (eval_steps finer than save_steps)

    def _best_path(self, best_step: Any) -> str | None:
        if not isinstance(best_step, int) or isinstance(best_step, bool) or best_step <= 0:
            return None
        try:
            return str(self.store.resolve(best_step).path)
        except ckstore.CheckpointNotFoundError:
            return None

    def _barrier(self) -> None:
        if self.args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            if self.args.should_save:
                self.store.wait()  # committed before any rank looks for it
            torch.distributed.barrier()


class CkstoreTrainer(CkstoreTrainerMixin, Trainer):
    """``transformers.Trainer`` whose checkpoints go through ckstore (see :class:`CkstoreTrainerMixin`)."""


def _check_policy(store: Store, wanted: Mapping[str, Any]) -> None:
    policy = store.policy
    if wanted.get("keep_last") is not None and policy.keep_last != wanted["keep_last"]:
        raise InvalidArgumentError(f"store keeps keep_last={policy.keep_last}, but save_total_limit={wanted['keep_last']}")
    if "metric" in wanted:
        if not policy.keep_best or policy.metric != wanted["metric"] or policy.mode != wanted["mode"]:
            raise InvalidArgumentError(
                f"metric_for_best_model needs a store with keep_best>=1, metric={wanted['metric']!r}, mode={wanted['mode']!r}; "
                f"this one has keep_best={policy.keep_best}, metric={policy.metric!r}, mode={policy.mode!r}"
            )


def _load_module(module: torch.nn.Module, weights: Any, step: int) -> None:
    if not isinstance(weights, Mapping):
        raise StateError(f"checkpoint step {step} holds no model state dict", key="model")
    result = module.load_state_dict(weights, strict=False)
    # A tied weight save_pretrained left out (a checkpoint-N brought in by ckstore import) is the same parameter as its source.
    tied = declared_tied_keys(module)
    missing = [k for k in result.missing_keys if not any(re.search(p, k) for p in tied)]
    if missing or result.unexpected_keys:
        raise StateError(
            f"checkpoint step {step} does not fit the model: "
            f"missing {sorted(missing)}, unexpected {sorted(result.unexpected_keys)}",
            key="model",
        )


def _gathered_rng(world_size: int) -> list[dict[str, Any]]:
    """Every rank's RNG state, rank order; the same list on every rank (only rank 0 saves it)."""
    mine = RNGState().state_dict()
    if world_size <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [mine]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, mine)  # in memory between ranks; what is stored is tensors + JSON
    return gathered
