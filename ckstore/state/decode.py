"""A checkpoint's skeleton and tensors -> the saved state, restored into the caller's objects.

The skeleton has been validated (``_skeleton.check_skeleton``) before it gets
here, so decoding raises no untyped error: whatever still goes wrong is a
:class:`ManifestError` (the checkpoint is malformed: load() falls back) or a
:class:`StateError` (the caller's objects do not fit the checkpoint).
The decoder recurses at most once per JSON container level, and the skeleton
nests at most ``MAX_DEPTH`` levels, so its stack is bounded too. How a target
is matched and filled is the business of ``_targets``.
"""

from __future__ import annotations

import base64
import binascii
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from ..errors import CkstoreError, ManifestError, StateError
from ..format import extra_types as _extra
from ..format.skeleton import MARK, MAX_DEPTH, TORCH_DTYPES, check_skeleton, decode_float
from .encode import Path, format_path, is_stateful
from .targets import Mismatch, incompatible, is_plain, load_into, restore_plain

TensorSource = Callable[[str, str], torch.Tensor]

_ABSENT = object()
_TENSORS = frozenset({torch.Tensor, torch.nn.Parameter})
#: Types of target values that may be plain (restored by assignment); anything else is filled in place.
_MAYBE_PLAIN = frozenset({type(None), bool, int, float, str, bytes, list, tuple, dict, torch.dtype, torch.device})


def _may_be_plain(target: Any) -> bool:
    """A cheap first test (one set lookup for the tensors of a model) before :func:`is_plain`."""
    if type(target) in _MAYBE_PLAIN:
        return True
    if type(target) in _TENSORS:
        return False
    return isinstance(target, np.generic) or _extra.kind_of(target) is not None or type(target) is OrderedDict


class _Decoder:
    def __init__(
        self, source: TensorSource, map_location: Any, *, strict: bool, mismatch: Mismatch, module_states: Mapping[int, Any], classes: Mapping[str, type]
    ) -> None:
        self.source = source
        self.classes = classes
        self.map_location = map_location
        self.strict = strict
        self.mismatch = mismatch
        self.module_states = module_states
        self.cache: dict[tuple[str, str], Any] = {}
        #: (target, value) copies still to make, in the order met; see :meth:`copy_pending`.
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def decode(self, node: Any, target: Any, path: Path) -> Any:
        if isinstance(node, list):
            return self.sequence(node, target, path)
        if not isinstance(node, dict):
            return node
        kind = node.get(MARK)
        if kind is None or kind == "dict" or kind == "odict":
            if target is not None and is_stateful(target):
                return self.into_object(node, target, path)
            return self.mapping(node, target if isinstance(target, Mapping) else None, path)
        if kind == "tensor":
            return self.tensor(node, target, path)
        if kind == "stateful":
            if target is not None and is_stateful(target):
                return self.into_object(node["state"], target, path)
            # A dict target for a saved object (its state_dict()): filled key by key.
            return self.decode(node["state"], target if isinstance(target, Mapping) else None, path)
        if kind in ("tuple", "size"):
            values = self.sequence(node["items"], target, path)
            return tuple(values) if kind == "tuple" else torch.Size(values)
        if kind == "float":
            return decode_float(node)
        if kind == "bytes":
            return base64.b64decode(node["base64"], validate=True)
        if kind == "numpy_scalar":
            value = self.decode(node["value"], None, path)
            return np.dtype(node["dtype"]).type(value)
        if kind == "dtype":
            return TORCH_DTYPES[node["name"]]
        if kind == "device":
            return torch.device(node["name"])
        if kind in _extra.KINDS:
            return _extra.decode(node, format_path(path), lambda child: self.decode(child, None, path), self.classes)
        raise ManifestError(f"{format_path(path)}: unknown encoded value {str(kind)[:40]!r}")  # pragma: no cover - validated

    def sequence(self, items: list[Any], target: Any, path: Path) -> list[Any]:
        if not isinstance(target, (list, tuple)) or len(target) != len(items) or is_plain(target):
            values = []
            for index, item in enumerate(items):
                values.append(self.decode(item, None, path + (index,)))
            return values
        values = []
        for index, item in enumerate(items):
            sub = target[index]
            value = self.decode(item, sub if self._fits(item, sub) else None, path + (index,))
            if _may_be_plain(sub) and is_plain(sub) and self._fits(item, sub):
                self._restore(target, index, sub, value, path + (index,))
            values.append(value)
        return values

    def mapping(self, node: dict[str, Any], target: Mapping[Any, Any] | None, path: Path) -> dict[Any, Any]:
        if node.get(MARK) in ("dict", "odict"):
            pairs = [(self.decode(key, None, path + ("<key>",)), value) for key, value in node["items"]]
        else:
            pairs = node.items()
        out = OrderedDict() if node.get(MARK) == "odict" else {}
        if target is None:
            for key, value in pairs:
                out[key] = self.decode(value, None, path + (key,))
            return out
        get = target.get
        for key, value in pairs:
            sub = get(key, _ABSENT) if _hashable(key) else _ABSENT
            if sub is _ABSENT:
                out[key] = self.decode(value, None, path + (key,))
                continue
            if not _may_be_plain(sub):  # tensors, arrays, objects: filled in place
                out[key] = self.decode(value, sub if self._fits(value, sub) else None, path + (key,))
                continue
            fits = self._fits(value, sub)
            out[key] = decoded = self.decode(value, sub if fits else None, path + (key,))
            if fits and is_plain(sub):
                self._restore(target, key, sub, decoded, path + (key,))
        return out

    def _restore(self, parent: Any, key: Any, current: Any, value: Any, path: Path) -> None:
        why = restore_plain(parent, key, current, value)
        if why is not None:
            self._refuse(path, why)

    def _fits(self, node: Any, target: Any) -> bool:
        """Whether ``target`` may receive ``node``; the plan has already refused (strict) or reported the others."""
        if target is None:
            return True
        if type(target) in _TENSORS:  # the common case, once per tensor of a model
            return type(node) is dict and node.get(MARK) == "tensor" and "numpy" not in node
        return incompatible(node, target) is None

    def into_object(self, node: Any, target: Any, path: Path) -> Any:
        state = self.decode(node, None, path)
        self.copy_pending()  # the targets met before this object are written before it loads, as the state orders them
        load_into(target, state, path, strict=self.strict, mismatch=self.mismatch, module_state=self.module_states.get(id(target)))
        return state

    def tensor(self, node: dict[str, Any], target: Any, path: Path) -> Any:
        ident = (node["file"], node["key"])
        value = self.cache.get(ident)
        if value is None:
            tensor = self.source(*ident)
            device = self._device(node.get("device"), path)
            if device is not None and tensor.device != device:
                try:
                    tensor = tensor.to(device)
                except (RuntimeError, AssertionError, ValueError, TypeError) as exc:  # torch: "not compiled with CUDA", bad index
                    raise self._bad_location(path, f"cannot move the tensor to {device}: {exc}") from None
            value = tensor.numpy() if node.get("numpy") else tensor
            self.cache[ident] = value
        if value is target:
            # The source read the file straight into this tensor's memory,
            # having checked its dtype and shape (``read_tensor_file``).
            return target
        if isinstance(target, torch.Tensor) and isinstance(value, torch.Tensor):
            if self._fits_shape(target.shape, target.dtype, value.shape, value.dtype, path):
                self.pending.append((target, value))
                return target
        elif isinstance(target, np.ndarray) and isinstance(value, np.ndarray):
            if self._fits_shape(target.shape, target.dtype, value.shape, value.dtype, path):
                if not target.flags.writeable:
                    self._refuse(path, "the target NumPy array is read-only")
                else:
                    np.copyto(target, value)
                    return target
        return value

    def _fits_shape(self, shape: Any, dtype: Any, saved_shape: Any, saved_dtype: Any, path: Path) -> bool:
        if tuple(shape) == tuple(saved_shape) and dtype == saved_dtype:
            return True
        self._refuse(path, f"checkpoint holds {saved_dtype} {tuple(saved_shape)}, the object being loaded into has {dtype} {tuple(shape)}")
        return False

    def _refuse(self, path: Path, why: str) -> None:
        if self.strict:
            raise StateError(f"{format_path(path)}: {why}", key=format_path(path))
        self.mismatch.mismatched.append((format_path(path), why))

    def copy_pending(self) -> None:
        """Copy the values met so far into their targets, in order.

        CPU targets take one batched call (torch copies them one after the
        other) instead of a Python call and a ``no_grad`` each; other targets
        are copied one by one, since the batched kernel on a GPU writes all
        at once and targets that overlap would race.
        """
        if not self.pending:
            return
        on_cpu = [(target, value) for target, value in self.pending if target.is_cpu]
        others = [(target, value) for target, value in self.pending if not target.is_cpu]
        self.pending.clear()
        with torch.no_grad():
            if on_cpu:
                torch._foreach_copy_([target for target, _ in on_cpu], [value for _, value in on_cpu])
            for target, value in others:
                target.copy_(value)

    def _bad_location(self, path: Path, reason: str) -> StateError:
        # A StateError, not the ManifestError a malformed skeleton gets: the caller's argument is wrong, so
        # load() must not skip (and note as corrupt) every good checkpoint in turn.
        return StateError(f"{format_path(path)}: map_location={self.map_location!r}: {reason}", key=format_path(path))

    def _device(self, recorded: str | None, path: Path) -> torch.device | None:
        location = self.map_location
        if location is None and recorded is None:  # the common case, once per tensor: a CPU tensor stays put
            return None
        if location is not None:
            try:
                if callable(location):
                    return torch.device(location(recorded or "cpu"))
                if isinstance(location, Mapping):
                    return torch.device(location.get(recorded or "cpu", recorded or "cpu"))
                return torch.device(location)
            except CkstoreError:
                raise
            except Exception as exc:  # noqa: BLE001 - torch.device and the caller's callable raise anything
                raise self._bad_location(path, f"not a device: {type(exc).__name__}: {exc}") from None
        if recorded is None:
            return None
        device = torch.device(recorded)
        if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
            raise StateError(
                f"{format_path(path)}: tensor was saved on {recorded}, which this machine lacks; pass map_location='cpu'",
                key=format_path(path),
            )
        return device


def _hashable(key: Any) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True


def decode_state(
    skeleton: Any,
    source: TensorSource,
    *,
    target: Any = None,
    map_location: Any = None,
    strict: bool = True,
    mismatch: Mismatch | None = None,
    module_states: Mapping[int, Any] | None = None,
    validated: bool = False,
    classes: Mapping[str, type] | None = None,
) -> Any:
    """Rebuild the saved state; what ``target`` holds is restored in place (see ``_targets``).

    ``classes``: the Enum and dataclass types values may be re-created as, by
    stored name (``extra_types.class_table``); nothing is ever imported.
    ``validated``: the skeleton already passed ``check_skeleton`` (a parsed
    manifest's has). Mismatches found while decoding (a tensor of another
    shape) raise when ``strict``, else are added to ``mismatch``.
    """
    if not validated:
        check_skeleton(skeleton, path="state")
    decoder = _Decoder(source, map_location, strict=strict, mismatch=mismatch if mismatch is not None else Mismatch(), module_states=module_states or {}, classes=classes or {})
    try:
        state = decoder.decode(skeleton, target, ())
        decoder.copy_pending()
        return state
    except CkstoreError:
        raise
    except RecursionError:
        # The skeleton nests at most MAX_DEPTH levels, one frame each: the caller's own stack was already deep.
        raise StateError(f"loading needs about {MAX_DEPTH} free stack frames; the caller's stack is too deep") from None
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError, OverflowError, binascii.Error) as exc:
        # Validation should have caught it; a malformed checkpoint is a ManifestError, so load() falls back.
        raise ManifestError(f"malformed state in the manifest: {type(exc).__name__}: {str(exc)[:200]}") from exc

