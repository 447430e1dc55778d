"""Weights out of a store: a ``from_pretrained``-loadable directory, or one flat safetensors file.

>>> from ckstore.integrations.export import export_hf, export_safetensors
>>> export_hf(store, "best", "exported/gpt2-small")          # config.json + model.safetensors (+ index)
>>> export_safetensors(store, 1200, "weights.safetensors")    # the weights, one file

A ckstore checkpoint is not a Hugging Face directory: its files group tensors by
where they sit in the saved state (``model.transformer.safetensors``), keys
carry the state path (``model/transformer.wte.weight``) and a tied weight is
stored once. Copying such a file into an HF directory "loads" with every weight
missing and freshly initialised. The export reads a checkpoint through
:meth:`ckstore.Store.load` (every file verified) and writes what
``save_pretrained`` writes:

* HF key names: the state dict of the module saved under ``key`` (``"model"``),
  without the ``model/`` prefix;
* tied weights as HF expects: of the keys that share memory, the ones the model
  class declares tied (``_tied_weights_keys``, recorded by :func:`hf_metadata`)
  are left out, e.g. ``lm_head.weight`` of a model with
  ``tie_word_embeddings=True``; ``from_pretrained`` ties them back. Without that
  record the first key of each shared group (in state-dict order) is kept;
* safetensors metadata ``{"format": "pt"}``;
* ``model.safetensors``, or above ``max_shard_size`` shards named
  ``model-00001-of-0000N.safetensors`` and ``model.safetensors.index.json``
  (``metadata.total_size``, ``metadata.total_parameters``, ``weight_map``), split
  in state-dict order as ``huggingface_hub`` splits;
* ``config.json`` (and ``generation_config.json``) when the checkpoint carries
  them: :func:`hf_metadata` stores them, and the Trainer and Accelerate
  integrations call it for every ``PreTrainedModel``.

Not reproduced: transformers' weight-conversion reversal (``revert_weight_conversion``) for the
few architectures whose runtime state dict differs from their file format, quantizer metadata,
PEFT adapter layouts, tokenizer files.

Writes are atomic: everything goes into a temporary sibling directory, each file
is fsynced, the directory is fsynced and renamed into place, and the parent is
fsynced (through :mod:`ckstore`'s durability module, like every store write). An
existing non-empty ``out_dir`` (or existing ``file``) is refused with
:class:`ExportExistsError` unless ``overwrite=True``.

This module needs torch and safetensors only; transformers is not imported.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import torch
from safetensors.torch import save as _safetensors_bytes

import ckstore
from ckstore import CkstoreError, InvalidArgumentError, StateError
from ckstore.storage import durable as _durable  # the one module that may fsync and rename

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "ExportExistsError", "declared_tied_keys", "export_hf", "export_safetensors", "hf_metadata"]

#: ``progress(done_bytes, total_bytes)``, called after each file written (as the importers' callback).
Progress = Callable[[int, int], None]
#: Shards above this many bytes split (each shard is built in memory before it is written).
DEFAULT_MAX_SHARD_SIZE = 5 * 1000**3
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
#: Top-level state key under which :func:`hf_metadata` records go, one per saved module key.
HF_META_KEY = "hf"
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE | re.ASCII)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class ExportExistsError(CkstoreError, FileExistsError):
    """The export destination exists and is not empty; pass ``overwrite=True`` to replace it. ``.path``."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


# ---------------------------------------------------------------- what a checkpoint must carry


def hf_metadata(model: Any) -> dict[str, Any]:
    """What :func:`export_hf` needs besides the weights of a transformers ``PreTrainedModel``, as plain JSON.

    Save it beside the module: ``store.save({"model": model, "hf": {"model": hf_metadata(model)}}, step=...)``.
    ``config`` is the JSON ``save_pretrained`` writes (``architectures`` and
    ``dtype`` set the way it sets them), ``generation_config`` likewise when the
    model can generate, ``tied_weights`` the key patterns the model class
    declares tied, ``ignore_on_save`` its ``_keys_to_ignore_on_save``.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise InvalidArgumentError(f"hf_metadata needs a transformers PreTrainedModel (with .config), got {type(model).__name__}")
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        config.dtype = str(dtype).split(".")[1]
    meta: dict[str, Any] = {"config": config.to_json_string(use_diff=True)}
    generation = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", None)
    if generation is not None and callable(can_generate) and can_generate():
        meta["generation_config"] = generation.to_json_string(use_diff=True)
    meta["tied_weights"] = declared_tied_keys(model)
    meta["ignore_on_save"] = sorted(getattr(model, "_keys_to_ignore_on_save", None) or [])
    return meta


def declared_tied_keys(model: torch.nn.Module) -> list[str]:
    """The key patterns a transformers model class declares tied (``_tied_weights_keys`` of every submodule), sorted."""
    tied: list[str] = []
    for name, module in model.named_modules():
        declared = getattr(module, "_tied_weights_keys", None) or {}
        tied.extend(f"{name}.{k}" if name else k for k in declared)  # a dict (target -> source) or, before v5, a list
    return sorted(set(tied))


# ---------------------------------------------------------------- reading a checkpoint


def _read_weights(store: ckstore.Store, step: int | str, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    if not isinstance(store, ckstore.Store):
        raise InvalidArgumentError(f"export needs a ckstore.Store, got {type(store).__name__}")
    if not isinstance(key, str) or not key:
        raise InvalidArgumentError(f"key must be a non-empty string (the state key holding the module), got {key!r}")
    # A verified load of the whole checkpoint (ckstore reads every file of a checkpoint to verify it).
    state = store.load(None, step=step, map_location="cpu")
    if not isinstance(state, Mapping) or key not in state:
        present = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise StateError(f"checkpoint {step!r} has no {key!r} to export (top-level keys: {present})", key=key)
    weights = state[key]
    is_state_dict = isinstance(weights, Mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items())
    if not is_state_dict or not weights:
        raise StateError(f"checkpoint {step!r}: state[{key!r}] is not a module's state dict (str -> tensor)", key=key)
    meta = None
    record = state.get(HF_META_KEY)
    if isinstance(record, Mapping) and isinstance(record.get(key), Mapping):
        meta = dict(record[key])
    return dict(weights), meta


def _storage_id(tensor: torch.Tensor) -> tuple[Any, int]:
    return (tensor.device, tensor.untyped_storage().data_ptr())


def _untie(weights: dict[str, torch.Tensor], meta: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
    """The state dict ``save_pretrained`` would write: tied duplicates and ignored keys dropped, the rest contiguous.

    Mirrors ``transformers.modeling_utils.remove_tied_weights_from_state_dict``: of each group of keys
    sharing memory, those matching a declared tied pattern go, keeping at least one. Tensors that share
    storage without overlapping (slices of one buffer) are cloned.
    """
    patterns = list(meta.get("tied_weights", [])) if meta else None
    for name in meta.get("ignore_on_save", []) if meta else []:
        weights.pop(name, None)
    groups: dict[tuple[Any, int], list[str]] = {}
    for name, tensor in weights.items():
        groups.setdefault(_storage_id(tensor), []).append(name)
    drop: set[str] = set()
    for names in groups.values():
        if len(names) < 2:
            continue
        spans = {(weights[n].data_ptr(), weights[n].nbytes, tuple(weights[n].shape), weights[n].stride()) for n in names}
        if len(spans) > 1:
            for name in names:  # views of one buffer (disjoint or not): each written on its own
                weights[name] = weights[name].clone()
            continue
        if patterns is None:
            drop.update(names[1:])  # no model class recorded: keep the first key in state-dict order
            continue
        found = 0
        for name in sorted(names):
            if any(re.search(p, name) for p in patterns):
                found += 1
                if found < len(names):
                    drop.add(name)
        if len(names) - len([n for n in names if n in drop]) > 1:
            # Shared but not declared tied: save_pretrained refuses; keep the first and say so in the key set.
            keep = [n for n in names if n not in drop]
            drop.update(keep[1:])
    return {name: t.contiguous() for name, t in weights.items() if name not in drop}


def _parse_size(value: int | str) -> int:
    if isinstance(value, bool):
        raise InvalidArgumentError(f"max_shard_size must be bytes (int) or a size like '5GB', got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    else:
        raise InvalidArgumentError(f"max_shard_size must be bytes (int) or a size like '5GB', got {value!r}")
    if size <= 0:
        raise InvalidArgumentError(f"max_shard_size must be positive, got {value!r}")
    return size


def _shards(weights: Mapping[str, torch.Tensor], max_size: int) -> list[list[str]]:
    """Keys per shard, in state-dict order, as ``huggingface_hub.split_torch_state_dict_into_shards`` splits."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name, tensor in weights.items():
        size = tensor.nbytes
        if size > max_size:
            shards.append([name])  # alone in its own shard, bigger than the limit
            continue
        if current and current_size + size > max_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    if current:
        shards.append(current)
    return shards


# ---------------------------------------------------------------- durable writes


def _write_file(path: str, data: bytes | str) -> None:
    """A new file, written and fsynced; its directory is fsynced once, by the caller, before the rename."""
    with _durable.create(path, site="export") as writer:
        writer.write(data.encode("utf-8") if isinstance(data, str) else data)
        writer.sync()


def _check_destination(path: str, *, overwrite: bool, directory: bool) -> None:
    if not isinstance(overwrite, bool):
        raise InvalidArgumentError(f"overwrite must be True or False, got {overwrite!r}")
    if not os.path.lexists(path):
        return
    if directory and os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path):
        return
    if directory and not (os.path.isdir(path) and not os.path.islink(path)):
        raise ExportExistsError(f"{path}: exists and is not a directory; refusing to export over it", path=path)
    if not directory and (os.path.isdir(path) and not os.path.islink(path)):
        raise ExportExistsError(f"{path}: is a directory; export_safetensors writes a file", path=path)
    if not overwrite:
        what = "a non-empty directory" if directory else "a file"
        raise ExportExistsError(f"{path}: exists and is {what}; pass overwrite=True (--force) to replace it", path=path)


def _install_dir(tmp: str, out_dir: str) -> None:
    """Rename the finished ``tmp`` to ``out_dir``; an old ``out_dir`` is moved aside first and removed after."""
    parent = os.path.dirname(out_dir) or "."
    old = None
    if os.path.lexists(out_dir):
        if os.path.isdir(out_dir) and not os.listdir(out_dir):
            _durable.remove_dir(out_dir, site="export")
        else:
            # A crash between these two renames leaves the previous export at ``old`` and none at
            # ``out_dir``: never a mix of two exports.
            old = os.path.join(parent, f".{os.path.basename(out_dir)}.old-{secrets.token_hex(6)}")
            _durable.rename(out_dir, old, site="export")
    _durable.rename(tmp, out_dir, site="export")
    _durable.sync_dir(parent, site="export_dir")
    if old is not None:
        _durable.remove_tree(old, site="export")


def _check_path(value: Any, what: str) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise InvalidArgumentError(f"{what} must be a path, got {type(value).__name__}")
    path = os.path.abspath(os.fspath(value))
    if "\x00" in path:
        raise InvalidArgumentError(f"{what} holds a NUL byte")
    if not os.path.isdir(os.path.dirname(path)):
        raise InvalidArgumentError(f"{what}: parent directory {os.path.dirname(path)} does not exist")
    return path


# ---------------------------------------------------------------- public API


def export_hf(
    store: ckstore.Store,
    step: int | str,
    out_dir: str | os.PathLike[str],
    *,
    key: str = "model",
    config: Mapping[str, Any] | str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> list[str]:
    """Write checkpoint ``step`` (a number, ``"latest"``, ``"best"`` or a tag) of ``store`` as a ``from_pretrained`` directory.

    ``key``: the top-level state key holding the module. ``config``: a config
    dict or JSON string for a checkpoint that carries none (one that does uses
    its own unless this is given). ``max_shard_size``: bytes or ``"5GB"``-style
    (decimal units, ``"GiB"`` binary), as ``save_pretrained``'s. ``progress``:
    called with ``(bytes written, total bytes)`` after each weight file. Returns
    the names of the files written, sorted. See the module docstring for what
    is written and the atomicity.
    """
    out = _check_path(out_dir, "out_dir")
    limit = _parse_size(max_shard_size)
    _check_destination(out, overwrite=overwrite, directory=True)
    weights, meta = _read_weights(store, step, key)
    config_json = _config_json(config, meta)
    weights = _untie(weights, meta)
    shards = _shards(weights, limit)
    files: dict[str, bytes | str] = {}
    if len(shards) == 1:
        names = {SAFE_WEIGHTS_NAME: shards[0]}
    else:
        names = {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": keys for i, keys in enumerate(shards)}
        index = {
            "metadata": {
                "total_parameters": sum(t.numel() for t in weights.values()),
                "total_size": sum(t.nbytes for t in weights.values()),
            },
            "weight_map": {k: name for name, keys in names.items() for k in keys},
        }
        files[SAFE_WEIGHTS_INDEX_NAME] = json.dumps(index, indent=2, sort_keys=True) + "\n"
    if config_json is not None:
        files[CONFIG_NAME] = config_json
    if meta and isinstance(meta.get("generation_config"), str):
        files[GENERATION_CONFIG_NAME] = meta["generation_config"]
    parent = os.path.dirname(out)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{secrets.token_hex(6)}")
    _durable.make_dir(tmp, site="export")
    try:
        total, done = sum(t.nbytes for t in weights.values()), 0
        for name, keys in names.items():
            # One shard in memory at a time: safetensors builds the file's bytes (header + data) in one buffer.
            _write_file(os.path.join(tmp, name), _safetensors_bytes({k: weights[k] for k in keys}, metadata={"format": "pt"}))
            done += sum(weights[k].nbytes for k in keys)
            if progress is not None:
                progress(done, total)
        for name, text in files.items():
            _write_file(os.path.join(tmp, name), text)
        _durable.sync_dir(tmp, site="export_dir")
        _install_dir(tmp, out)
    except BaseException:
        if os.path.lexists(tmp):
            _durable.remove_tree(tmp, site="export")
        raise
    return sorted([*names, *files])


def export_safetensors(
    store: ckstore.Store,
    step: int | str,
    file: str | os.PathLike[str],
    *,
    key: str = "model",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> str:
    """Write the weights of checkpoint ``step`` as one safetensors file (HF key names, tied duplicates dropped, ``format: pt``).

    Atomic (temporary file, fsync, rename, directory fsync). An existing
    ``file`` is refused (:class:`ExportExistsError`) unless ``overwrite=True``.
    ``progress`` as for :func:`export_hf`. Returns the absolute path written.
    """
    path = _check_path(file, "file")
    _check_destination(path, overwrite=overwrite, directory=False)
    weights, meta = _read_weights(store, step, key)
    weights = _untie(weights, meta)
    _durable.write_file_atomic(path, _safetensors_bytes(weights, metadata={"format": "pt"}), site="export")
    if progress is not None:
        total = sum(t.nbytes for t in weights.values())
        progress(total, total)
    return path


def _config_json(config: Mapping[str, Any] | str | None, meta: Mapping[str, Any] | None) -> str | None:
    if config is None:
        stored = meta.get("config") if meta else None
        return stored if isinstance(stored, str) else None
    if isinstance(config, str):
        try:
            parsed = json.loads(config)
        except ValueError as exc:
            raise InvalidArgumentError(f"config is not valid JSON: {exc}") from None
    elif isinstance(config, Mapping):
        parsed = dict(config)
    else:
        to_dict = getattr(config, "to_json_string", None)
        if callable(to_dict):
            return to_dict(use_diff=True)
        raise InvalidArgumentError(f"config must be a dict, a JSON string or a transformers config, got {type(config).__name__}")
    if not isinstance(parsed, dict) or "model_type" not in parsed:
        raise InvalidArgumentError("config must be a JSON object with a 'model_type' (what from_pretrained reads)")
    if any(isinstance(v, float) and not math.isfinite(v) for v in parsed.values()):
        raise InvalidArgumentError("config holds NaN or infinity, which config.json cannot")
    return json.dumps(parsed, indent=2, sort_keys=True) + "\n"
