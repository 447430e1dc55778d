"""Matching the object a caller loads into (the *target*) against a checkpoint's skeleton.

``store.load(state)`` restores in place what ``state`` holds. Loads are
strict: before any byte is read, :func:`plan_load` walks the target and the
skeleton together and lists every disagreement, and a strict load raises one
:class:`StateError` naming all of them. The rules:

* **The target names what to restore.** Every key of a dict in the target
  must be in the checkpoint (else *missing*). The checkpoint may hold more:
  loading ``{"model": model}`` from a full training checkpoint is normal, and
  load() still returns everything.
* **State dicts match both ways,** as ``load_state_dict(strict=True)``
  demands: a module's keys against what was saved from it, and likewise when
  a dict target meets a checkpoint saved from an object or the reverse
  (saved ``model.state_dict()``, loaded into ``model``: the tutorials'
  pattern). A key only in the checkpoint is *unexpected* there.
* **Kinds must agree** (*of another kind*): a tensor for a tensor, a NumPy
  array for an array, a dict or saved state for an object with
  ``load_state_dict``, a list for a list, a number for a number, and so on.
  ``None`` in the target is a placeholder that takes whatever was saved.
* **Plain values are restored into the caller's containers.** Where the
  target holds a number, string, bool, bytes, ``None``, or a list, tuple or
  dict built only of these, the saved value replaces it (a list's contents
  are replaced in place; a dict gets its saved keys), so ``state["epoch"]``
  is right after ``resume()``. Inside a tuple nothing can be replaced: a
  plain value there that differs from the saved one is refused (found while
  decoding, so objects before it in the state may already be restored).

With ``strict=False`` the load restores what matches and reports the rest
with one :class:`StateMismatchWarning`, whose ``missing``, ``unexpected`` and
``mismatched`` attributes list the key paths (as ``load_state_dict`` returns
its missing and unexpected keys).

The walk also maps each tensor of the target that a stored tensor will
overwrite, so the file is read straight into its memory (see
``read_tensor_file``); :func:`drop_overlapping` removes those that share memory.
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import loaders as _loaders
from ..errors import StateError
from ..format import extra_types as _extra
from ..format.skeleton import MARK, decode_float, numpy_scalar_dtype
from .encode import Path, format_path, is_stateful

#: How many key paths of each sort a message names before it says "and N more".
_SHOWN = 8


class StateMismatchWarning(UserWarning):
    """A ``strict=False`` load restored only part of the target; the attributes list the rest by key path."""

    def __init__(self, message: str, *, missing: tuple[str, ...] = (), unexpected: tuple[str, ...] = (), mismatched: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


@dataclass
class Mismatch:
    """Every disagreement found between a target and a checkpoint, by key path."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    #: (key path, why) for values of another kind, shape or dtype
    mismatched: list[tuple[str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        parts = []
        for label, paths in (("missing from the checkpoint", self.missing), ("unexpected (in the checkpoint, not in the target)", self.unexpected)):
            if paths:
                parts.append(f"{label}: {_listing(paths)}")
        if self.mismatched:
            shown = "; ".join(f"{path}: {why}" for path, why in self.mismatched[:_SHOWN])
            more = f"; and {len(self.mismatched) - _SHOWN} more" if len(self.mismatched) > _SHOWN else ""
            parts.append(f"of another kind: {shown}{more}")
        return "; ".join(parts)

    def first_key(self) -> str | None:
        for paths in (self.missing, self.unexpected, [path for path, _ in self.mismatched]):
            if paths:
                return paths[0]
        return None

    def error(self, where: str) -> StateError:
        return StateError(
            f"{where}: the state does not match the checkpoint: {self.describe()}. "
            "Pass strict=False to restore what matches and be warned about the rest.",
            key=self.first_key(),
        )

    def warn(self, where: str, stacklevel: int) -> None:
        warning = StateMismatchWarning(
            f"{where}: restored only what matches: {self.describe()}",
            missing=tuple(self.missing),
            unexpected=tuple(self.unexpected),
            mismatched=tuple(path for path, _ in self.mismatched),
        )
        warnings.warn(warning, stacklevel=stacklevel + 1)


def _listing(paths: list[str]) -> str:
    more = f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else ""
    return ", ".join(paths[:_SHOWN]) + more


# ---------------------------------------------------------------- kinds

#: Values restored by assignment; the table of ``extra_types`` (paths, dates, enums, dataclasses, ...) among them.
_LEAF_KINDS = frozenset({"none", "bool", "number", "str", "bytes", "dtype", "device"} | _extra.KINDS)
#: What each target kind accepts from the checkpoint.
_ACCEPTS = {
    "bool": {"bool", "none"},
    "number": {"number", "none"},
    "str": {"str", "none"},
    "bytes": {"bytes", "none"},
    "dtype": {"dtype", "none"},
    "device": {"device", "none"},
    "list": {"list", "none"},
    "dict": {"dict", "state", "none"},
    "object": {"dict", "state"},
    "tensor": {"tensor"},
    "array": {"array"},
    "unknown": set(),
    **{kind: {kind, "none"} for kind in _extra.KINDS},
}
_NODE_WORDS = {
    "none": "None",
    "bool": "a bool",
    "number": "a number",
    "str": "a string",
    "bytes": "bytes",
    "dtype": "a dtype",
    "device": "a device",
    "list": "a list",
    "dict": "a dict",
    "state": "the state of an object",
    "tensor": "a tensor",
    "array": "a NumPy array",
    **{kind: f"a {kind}" for kind in _extra.KINDS},
}
_NUMPY_KINDS = {"bool": "bool", "int": "number", "float": "number", "text": "str"}


def node_kind(node: Any) -> str:
    """The kind of value a (validated) skeleton node decodes to."""
    if node is None:
        return "none"
    if isinstance(node, bool):
        return "bool"
    if isinstance(node, (int, float)):
        return "number"
    if isinstance(node, str):
        return "str"
    if isinstance(node, list):
        return "list"
    kind = node.get(MARK)
    if kind is None or kind == "dict" or kind == "odict":
        return "dict"
    if kind == "tensor":
        return "array" if node.get("numpy") else "tensor"
    if kind == "stateful":
        return "state"
    if kind in ("tuple", "size"):
        return "list"
    if kind == "float":
        return "number"
    if kind == "numpy_scalar":
        code = node["dtype"]
        return "bytes" if code.startswith("|S") else _NUMPY_KINDS[numpy_scalar_dtype(code) or "int"]
    return kind  # bytes, dtype, device, and the kinds of extra_types


def target_kind(target: Any) -> str:
    if target is None:
        return "none"
    if isinstance(target, enum.Enum):  # before number and str: an IntEnum or StrEnum member restores as its class
        return "enum"
    if isinstance(target, (bool, np.bool_)):
        return "bool"
    if isinstance(target, (int, float, np.integer, np.floating)):
        return "number"
    if isinstance(target, str):
        return "str"
    if isinstance(target, (bytes, np.bytes_)):
        return "bytes"
    if isinstance(target, torch.Tensor):
        return "tensor"
    if isinstance(target, np.ndarray):
        return "array"
    if isinstance(target, torch.dtype):
        return "dtype"
    if isinstance(target, torch.device):
        return "device"
    extra = _extra.kind_of(target)
    if extra is not None:
        return extra
    if is_stateful(target):
        return "object"
    if isinstance(target, Mapping):
        return "dict"
    if isinstance(target, (list, tuple)):
        return "list"
    return "unknown"


def incompatible(node: Any, target: Any) -> str | None:
    """Why ``node`` cannot be restored into ``target``, or None if it can (the shapes of tensors are checked later)."""
    wanted = target_kind(target)
    if wanted == "none":
        return None
    found = node_kind(node)
    if found in _ACCEPTS[wanted]:
        return None
    if wanted == "unknown":
        refusal = _loaders.loader_refusal(target)
        if refusal is not None:
            return refusal
        return f"cannot restore into a {type(target).__module__}.{type(target).__qualname__} (it has no load_state_dict)"
    return f"the checkpoint holds {_NODE_WORDS.get(found, found)}, the target a {type(target).__qualname__}"


def is_plain(value: Any) -> bool:
    """A value built only of None, bools, numbers, strings, bytes, dtypes, devices, lists, tuples and dicts."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = target_kind(item)
        if kind in _LEAF_KINDS:
            continue
        if kind == "list":
            stack.extend(item)
        elif kind == "dict" and isinstance(item, dict):
            stack.extend(item.values())
        else:
            return False
    return True


def node_entries(node: Any) -> dict[Any, Any] | None:
    """The (key -> child node) entries of a dict node or of an object's saved state; None if it is neither."""
    if isinstance(node, dict):
        kind = node.get(MARK)
        if kind is None:
            return node
        if kind == "stateful":
            return node_entries(node["state"])
        if kind == "dict" or kind == "odict":
            return {decode_key(key): value for key, value in node["items"]}
    return None


def decode_key(node: Any) -> Any:
    """A dict key node (validated: scalars, tagged floats, tuples and NumPy scalars of them) as the key."""
    if not isinstance(node, dict):
        return node
    kind = node[MARK]
    if kind == "float":
        return decode_float(node)
    if kind == "tuple":
        return tuple(decode_key(item) for item in node["items"])
    return np.dtype(node["dtype"]).type(decode_key(node["value"]))  # numpy_scalar


# ---------------------------------------------------------------- the plan


@dataclass
class LoadPlan:
    #: file -> stored key -> the tensor of the target the file is read straight into
    reads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    mismatch: Mismatch = field(default_factory=Mismatch)
    #: id(module) -> its state_dict(), taken once while planning and reused to load it
    module_states: dict[int, Mapping[str, Any]] = field(default_factory=dict)


def plan_load(skeleton: Any, target: Any, *, direct: bool) -> LoadPlan:
    """Compare ``target`` with ``skeleton``; with ``direct``, map the tensors that files can be read straight into."""
    plan = LoadPlan()
    if target is not None:
        _Planner(plan, direct).visit(skeleton, target, ())
        if direct:
            drop_overlapping(plan.reads)
    return plan


class _Planner:
    def __init__(self, plan: LoadPlan, direct: bool) -> None:
        self.plan = plan
        self.direct = direct

    def visit(self, node: Any, target: Any, path: Path) -> None:
        why = incompatible(node, target)
        if why is not None:
            self.plan.mismatch.mismatched.append((format_path(path), why))
            return
        kind = target_kind(target)
        if kind == "tensor":
            if self.direct:
                _collect_tensor(node, target, self.plan.reads)
        elif kind == "object":
            self.visit_object(node, target, path)
        elif kind == "dict":
            entries = node_entries(node)
            if entries is not None:
                self.match_keys(entries, target, path, both_ways=node_kind(node) == "state")
        elif kind == "list" and not is_plain(target):
            items = node["items"] if isinstance(node, dict) else node
            if len(items) != len(target):
                self.plan.mismatch.mismatched.append((format_path(path), f"the checkpoint holds {len(items)} items, the target {len(target)}"))
                return
            for index, (item, sub) in enumerate(zip(items, target)):
                self.visit(item, sub, path + (index,))

    def visit_object(self, node: Any, target: Any, path: Path) -> None:
        refusal = _loaders.loader_refusal(target)
        if refusal is not None:
            self.plan.mismatch.mismatched.append((format_path(path), refusal))
            return
        if isinstance(target, torch.nn.Module):
            entries = node_entries(node)
            state = target.state_dict()
            self.plan.module_states[id(target)] = state
            if entries is not None:
                self.match_keys(entries, state, path, both_ways=True)

    def match_keys(self, entries: Mapping[Any, Any], target: Mapping[Any, Any], path: Path, *, both_ways: bool) -> None:
        mismatch = self.plan.mismatch
        for key, sub in target.items():
            if key in entries:
                self.visit(entries[key], sub, path + (key,))
            else:
                mismatch.missing.append(format_path(path + (key,)))
        if both_ways:
            mismatch.unexpected.extend(format_path(path + (key,)) for key in entries if key not in target)


def _collect_tensor(node: dict[str, Any], target: torch.Tensor, out: dict[str, dict[str, torch.Tensor]]) -> None:
    """Map one tensor node to ``target`` if the file's bytes can go there.

    A tensor that does not require grad is mapped as itself, so the tensor
    read into it is that very object and decoding knows it has nothing to
    copy (``_Decoder.tensor``); one that requires grad is mapped detached, as
    its memory can only be written without autograd. A tensor saved on a
    device is read into a target on that same device; a CPU target for it
    would be moved to the device and back. The first target met for a
    tensor saved once but referenced twice gets the read.
    """
    device = node.get("device")
    if target.is_cpu if device is None else str(target.device) == device:
        keyed = out.get(node["file"])
        if keyed is None:
            keyed = out[node["file"]] = {}
        if node["key"] not in keyed:
            keyed[node["key"]] = target.detach() if target.requires_grad else target


def drop_overlapping(targets: dict[str, dict[str, torch.Tensor]]) -> None:
    """Read no tensor straight into memory that another target shares.

    Two stored tensors read into one memory race each other and their hash
    checks, which run in the background on that memory after the read; and
    the file order, not the state's, would pick the value that stays. Such
    targets are read into fresh tensors instead and copied in while
    decoding, in the state's order, once every file has verified. Addresses
    are compared across devices too (CUDA's are unified with the host's);
    a false match only costs a copy.
    """
    spans = []
    append = spans.append
    for file, keyed in targets.items():
        for key, tensor in keyed.items():
            start = tensor.data_ptr()
            if tensor.is_contiguous():
                end = start + tensor.nbytes
            else:
                end = start + tensor.element_size() * (1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride())))
            if end > start:
                append((start, end, file, key))
    spans.sort()
    if all(before[1] <= after[0] for before, after in zip(spans, spans[1:])):
        return  # sorted by start, each ends before the next begins: no two meet
    shared: list[tuple[str, str]] = []
    cluster: list[tuple[str, str]] = []
    end = 0
    for start, span_end, file, key in spans:
        if start >= end:
            if len(cluster) > 1:
                shared.extend(cluster)
            cluster, end = [], 0
        cluster.append((file, key))
        end = max(end, span_end)
    if len(cluster) > 1:
        shared.extend(cluster)
    for file, key in shared:
        del targets[file][key]


# ---------------------------------------------------------------- restoring


def restore_plain(parent: Any, key: Any, current: Any, value: Any) -> str | None:
    """Put the saved plain ``value`` where the target held ``current`` (``parent[key]``), in place where it can.

    Returns why it could not: the parent is immutable (a tuple) and the
    value differs from what it holds (an equal value needs no restoring, so
    a state with ``(model, 0)`` in it still loads into itself).
    """
    if type(current) is list and isinstance(value, (list, tuple)):
        current[:] = value
    elif type(current) is dict and isinstance(value, Mapping):
        for k, v in value.items():  # its own keys were restored one by one on the way down
            if k not in current:
                current[k] = v
    elif isinstance(parent, (MutableMapping, list)):
        parent[key] = value
    elif not _same_plain(current, value):
        return f"a plain value inside a {type(parent).__name__} cannot be restored in place (use a list or dict)"
    return None


def _same_plain(a: Any, b: Any) -> bool:
    """Equal plain values; NaN equals NaN and 0.0 differs from -0.0, as in a bitwise resume."""
    if type(a) is not type(b):
        return False
    try:
        if a == b and repr(a) == repr(b):
            return True
    except Exception:  # noqa: BLE001 - an odd __eq__ only means "not provably the same"
        return False
    return repr(a) == repr(b)


def load_into(target: Any, state: Any, path: Path, *, strict: bool, mismatch: Mismatch, module_state: Mapping[str, Any] | None) -> None:
    """``target.load_state_dict(state)``, refusing (strict) or skipping and reporting tensors of another shape or dtype."""
    if _loaders.is_stateful_loader(target):
        _guarded(lambda: _loaders.restore_loader(target, state, format_path(path)), target, path, strict, mismatch)
        return
    if not isinstance(target, torch.nn.Module) or not isinstance(state, Mapping):
        _guarded(lambda: target.load_state_dict(state), target, path, strict, mismatch)
        return
    current = module_state if module_state is not None else target.state_dict()
    fitting = {}
    for key, value in state.items():
        mine = current.get(key)
        if isinstance(mine, torch.Tensor) and isinstance(value, torch.Tensor) and (mine.shape != value.shape or mine.dtype != value.dtype):
            why = f"checkpoint holds {value.dtype} {tuple(value.shape)}, the object being loaded into has {mine.dtype} {tuple(mine.shape)}"
            if strict:
                raise StateError(f"{format_path(path + (key,))}: {why}", key=format_path(path + (key,)))
            mismatch.mismatched.append((format_path(path + (key,)), why))
        elif key in current or strict:
            fitting[key] = value
    if strict:
        _guarded(lambda: target.load_state_dict(fitting), target, path, strict, mismatch)
    else:
        _guarded(lambda: target.load_state_dict(fitting, strict=False), target, path, strict, mismatch)


def _guarded(call: Any, target: Any, path: Path, strict: bool, mismatch: Mismatch) -> None:
    try:
        call()
    except StateError as exc:
        if strict:
            raise
        mismatch.mismatched.append((format_path(path), f"its load_state_dict refused the saved state: {exc}"))
    except Exception as exc:
        why = f"{type(target).__name__}.load_state_dict failed: {exc}"
        if strict:
            raise StateError(f"{format_path(path)}: {why}", key=format_path(path)) from exc
        mismatch.mismatched.append((format_path(path), why))
