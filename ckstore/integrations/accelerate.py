"""Accelerate's ``save_state``/``load_state`` through ckstore.

>>> from ckstore.integrations.accelerate import save_state, load_state
>>> model, opt, sched, loader = accelerator.prepare(model, opt, sched, loader)
>>> accelerator.register_for_checkpointing(ema)
>>> step = load_state(accelerator, store) if store.checkpoints() else 0   # newest that verifies
>>> ...
>>> save_state(accelerator, store, step=step, metrics={"loss": loss})

One checkpoint holds what ``Accelerator.save_state`` writes as separate pickles
and safetensors files, as tensors plus JSON: every prepared model (unwrapped,
under ``model``, ``model_1``, ...; with its config for a transformers model, so
:func:`ckstore.integrations.export.export_hf` can export it), optimizer
(``optimizer``, ``optimizer_1``, ...), scheduler (``scheduler``, ...), the grad
scaler, every prepared stateful data loader (``dataloader``, ...; with
``DataLoaderConfiguration(use_stateful_dataloader=True)``), each object given to
``register_for_checkpointing`` (``custom_0``, ...; each needs a ckstore-storable
``state_dict()``), ``accelerator.step`` and the RNG state of every process
(:class:`ckstore.RNGState`, gathered to the main process).

A thin wrapper, not accelerate's hooks: ``register_save_state_pre_hook`` sees
only the models' weights, so optimizer, scheduler, RNG and custom objects would
still go through accelerate's pickled files.

Only the main process writes (the store's single writer); every process reads
the same checkpoint on load and takes its own RNG state. FSDP, DeepSpeed and
Megatron-LM shard their state across processes and are refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

import ckstore
from ckstore import InvalidArgumentError, RNGState, StateError, Store

from .export import HF_META_KEY, hf_metadata

try:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("ckstore.integrations.accelerate needs accelerate: pip install accelerate") from exc

__all__ = ["load_state", "save_state"]

_SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def _key(base: str, index: int) -> str:
    return base if index == 0 else f"{base}_{index}"


def _objects(accelerator: Accelerator) -> dict[str, Any]:
    """The live objects of a checkpoint, keyed as they are stored (the same dict restores them in place)."""
    if not isinstance(accelerator, Accelerator):
        raise InvalidArgumentError(f"needs an accelerate.Accelerator, got {type(accelerator).__name__}")
    kind = accelerator.distributed_type
    if any(kind == getattr(DistributedType, name, None) for name in _SHARDED):
        raise InvalidArgumentError(
            f"ckstore's accelerate integration does not support {kind}: its state is sharded across processes"
        )
    # accelerate keeps what prepare() returned in these lists; its own save_state reads the same ones.
    objects: dict[str, Any] = {}
    for i, model in enumerate(accelerator._models):
        objects[_key("model", i)] = accelerator.unwrap_model(model)
    for i, optimizer in enumerate(accelerator._optimizers):
        objects[_key("optimizer", i)] = optimizer
    for i, scheduler in enumerate(accelerator._schedulers):
        objects[_key("scheduler", i)] = scheduler
    for i, loader in enumerate(d for d in accelerator._dataloaders if getattr(d, "use_stateful_dataloader", False)):
        objects[_key("dataloader", i)] = loader
    if accelerator.scaler is not None:
        objects["scaler"] = accelerator.scaler
    for i, obj in enumerate(accelerator._custom_objects):
        objects[f"custom_{i}"] = obj
    return objects


def save_state(
    accelerator: Accelerator,
    store: Store,
    step: int,
    *,
    metrics: Mapping[str, Any] | None = None,
    tags: Iterable[str] = (),
    blocking: bool = True,
) -> ckstore.CheckpointInfo | ckstore.AsyncSave | None:
    """Save the accelerator's state as checkpoint ``step`` of ``store``.

    Returns what :meth:`Store.save` returns on the main process, None elsewhere.

    Call it on every process (the RNG states are gathered); only the main
    process writes. With ``blocking=True`` every process returns once the
    checkpoint is durable.
    """
    if not isinstance(store, Store):
        raise InvalidArgumentError(f"save_state needs a ckstore.Store, got {type(store).__name__}")
    state: dict[str, Any] = _objects(accelerator)
    meta = {key: hf_metadata(obj) for key, obj in state.items() if key.startswith("model") and _is_hf(obj)}
    if meta:
        state[HF_META_KEY] = meta
    state["rng"] = _gathered_rng(accelerator)
    state["accelerator_step"] = int(accelerator.step)
    state["step"] = step
    result = None
    if accelerator.is_main_process:
        result = store.save(state, step=step, metrics=metrics, tags=tags, blocking=blocking)
    if blocking:
        accelerator.wait_for_everyone()
    return result


def load_state(accelerator: Accelerator, store: Store, step: int | str | None = None, *, strict: bool = True) -> int:
    """Restore the accelerator's state from ``store`` in place; returns the step loaded.

    ``step``: a number, ``"latest"``, ``"best"``, a tag, or None for the newest
    checkpoint that verifies (a corrupt newer one is skipped with a
    :class:`ckstore.CorruptCheckpointWarning`). The prepared objects and the
    registered ones must match the checkpoint (else :class:`ckstore.StateError`
    naming each key, before anything is restored); ``strict=False`` restores
    what matches. Each process restores its own RNG state.
    """
    if not isinstance(store, Store):
        raise InvalidArgumentError(f"load_state needs a ckstore.Store, got {type(store).__name__}")
    targets = _objects(accelerator)
    loaded = store.load(targets, step=step, strict=strict)
    rng = loaded.get("rng")
    rank = accelerator.process_index
    if not isinstance(rng, list) or rank >= len(rng):
        saved = len(rng) if isinstance(rng, list) else 0
        raise StateError(f"checkpoint holds no RNG state for process {rank} (saved with {saved} processes)", key="rng")
    RNGState().load_state_dict(rng[rank])
    if isinstance(loaded.get("accelerator_step"), int):
        accelerator.step = loaded["accelerator_step"]
    saved_step = loaded.get("step")
    if not isinstance(saved_step, int):
        raise StateError("checkpoint holds no 'step'; it was not written by ckstore.integrations.accelerate.save_state", key="step")
    return saved_step


def _is_hf(module: Any) -> bool:
    config = getattr(module, "config", None)
    return config is not None and hasattr(config, "to_json_string")


def _gathered_rng(accelerator: Accelerator) -> list[dict[str, Any]]:
    mine = RNGState().state_dict()
    if accelerator.num_processes <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [mine]
    gathered: list[Any] = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, mine)  # in memory between processes; stored as tensors + JSON
    return gathered
