"""Non-tensor values of a DCP state as ckstore JSON, never pickle; and the planners that read and write them.

DCP hands every leaf of a state dict that is not a tensor (an epoch counter,
a learning-rate schedule's dict, an optimizer's ``param_groups``, a NumPy
RNG key) to the storage layer as a ``BYTE_IO`` item, which its default
planner fills with ``torch.save`` (a pickle) and reads back with
``torch.load(weights_only=False)``, running whatever the pickle names.
ckstore writes each such value with the encoding ``Store.save`` gives its
state (``ckstore.state.encode``: JSON plus tagged objects for tuples,
bytes, dates, paths, enums and dataclasses), as one canonical JSON document::

    {"format": "ckstore.dcp-value", "format_version": 1,
     "value": <the encoded skeleton>,
     "tensors": {"<file>": {"<key>": {"dtype": "U32", "shape": [624], "base64": "..."}}}}

``tensors`` holds the small tensors and NumPy arrays found inside a value
(a NumPy RNG state's key): DCP treats a dict leaf that is an array as an
opaque value, so it arrives here, and is kept bit for bit as base64. A value
the encoding cannot hold raises :class:`StateError` naming the DCP key
(``optim.param_groups``), before anything is written when the
:class:`ValueSavePlanner` plans the save.

The chunk's entry in the checkpoint's metadata says ``"encoding": "ckstore-json"``
(``ckstore.distributed.metadata_json``), and ``StoreReader`` decodes it and
hands the value to the planner: :meth:`ValueLoadPlanner.load_value`, or
for DCP's own ``DefaultLoadPlanner`` the same assignment its
``load_bytes`` makes, without the unpickling. A planner that overrides
``load_bytes`` (it expects pickle) and has no ``load_value`` gets a
:class:`StateError` naming the key.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem, SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint._traverse import set_element

from ..errors import CkstoreError, ManifestError, StateError
from ..format.canonical import canonical_json, refuse_constant
from ..format.extra_types import class_table
from ..format.safetensors import DTYPE_NAMES, DTYPES_BY_NAME, tensor_bytes
from ..state.decode import decode_state
from ..state.encode import encode_state

FORMAT = "ckstore.dcp-value"
FORMAT_VERSION = 1
#: The ``encoding`` a bytes item's metadata names when its bytes are :func:`encode_value`'s document.
ENCODING = "ckstore-json"


def encode_value(value: Any, fqn: str) -> bytes:
    """``value`` (a DCP bytes item at key ``fqn``) as canonical JSON bytes; StateError naming ``fqn`` if it cannot be stored."""
    try:
        encoded = encode_state(value)
    except StateError as exc:
        # The encoder names paths inside the value ("state['a']"); the caller knows the value by its DCP key.
        message = str(exc)
        message = fqn + message[len("state"):] if message.startswith("state") else f"{fqn}: {message}"
        raise StateError(f"{message} (a non-tensor value of a DCP state is stored as JSON, never pickle)", key=fqn) from None
    tensors: dict[str, dict[str, Any]] = {}
    for file, entries in encoded.files.items():
        for key, tensor in entries:
            tensors.setdefault(file, {})[key] = {
                "base64": base64.b64encode(tensor_bytes(tensor)).decode("ascii"),
                "dtype": DTYPE_NAMES[tensor.dtype],
                "shape": list(tensor.shape),
            }
    return canonical_json({"format": FORMAT, "format_version": FORMAT_VERSION, "tensors": tensors, "value": encoded.skeleton})


def decode_value(data: bytes | bytearray, fqn: str, *, classes: Mapping[str, type] | None = None) -> Any:
    """The value :func:`encode_value` stored; ManifestError if the bytes are not such a document (they were hash-checked)."""

    def bad(reason: str) -> ManifestError:
        return ManifestError(f"{fqn}: stored value: {reason}", path=fqn)

    try:
        doc = json.loads(bytes(data), parse_constant=refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise bad(f"not JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad(f"not a {FORMAT} document")
    if doc.get("format_version") != FORMAT_VERSION:
        raise bad(f"unsupported format_version {doc.get('format_version')!r}; this ckstore reads {FORMAT_VERSION}")
    if set(doc) != {"format", "format_version", "tensors", "value"} or not isinstance(doc["tensors"], dict):
        raise bad(f"unexpected fields {sorted(doc)[:6]}")
    tensors: dict[tuple[str, str], torch.Tensor] = {}
    for file, entries in doc["tensors"].items():
        if not isinstance(entries, dict):
            raise bad(f"tensors of {file!r} must be an object")
        for key, entry in entries.items():
            tensors[(file, key)] = _tensor(entry, bad)

    def source(file: str, key: str) -> torch.Tensor:
        found = tensors.get((file, key))
        if found is None:
            raise bad(f"the value refers to a tensor {file}/{key} it does not hold")
        return found

    try:
        return decode_state(doc["value"], source, classes=classes or {})
    except StateError as exc:
        raise StateError(f"{fqn}: {exc}", key=fqn) from None
    except CkstoreError:
        raise


def _tensor(entry: Any, bad: Any) -> torch.Tensor:
    if not isinstance(entry, dict) or set(entry) != {"base64", "dtype", "shape"}:
        raise bad("a tensor must have exactly base64, dtype, shape")
    dtype = DTYPES_BY_NAME.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    shape = entry["shape"]
    if dtype is None or not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise bad("a tensor has an unknown dtype or a malformed shape")
    try:
        raw = base64.b64decode(entry["base64"], validate=True) if isinstance(entry["base64"], str) else None
    except (binascii.Error, ValueError):
        raw = None
    if raw is None or len(raw) != math.prod(shape) * dtype.itemsize:
        raise bad(f"a tensor's bytes do not hold {shape} of {entry['dtype']}")
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)


def value_bytes(planner: SavePlanner, item: WriteItem) -> bytes:
    """The stored bytes of bytes item ``item``: its value, looked up in the planner's state, as JSON."""
    lookup = getattr(planner, "lookup_object", None)
    if lookup is None:
        raise StateError(
            f"{item.index.fqn}: the planner {type(planner).__name__} has no lookup_object(); ckstore stores non-tensor values "
            "as JSON and needs the value itself, not the planner's pickle (use DCP's DefaultSavePlanner or a subclass)",
            key=item.index.fqn,
        )
    return encode_value(lookup(item.index), item.index.fqn)


class ValueSavePlanner(DefaultSavePlanner):
    """DCP's default save planner, checking while it plans that every non-tensor value can be stored as JSON.

    A value that cannot (an arbitrary object) raises StateError naming its key
    on the rank that holds it, before the coordinator opens the staging
    directory: nothing is written.
    """

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                value_bytes(self, item)
        return plan


def assign_value(planner: DefaultLoadPlanner, item: ReadItem, value: Any) -> None:
    """Put a decoded value where ``DefaultLoadPlanner.load_bytes`` puts what it unpickles."""
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[item.dest_index.fqn], value)
    else:
        planner.state_dict[item.dest_index.fqn] = value


class ValueLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner that takes decoded values (:meth:`load_value`) and knows the classes they may be.

    ``classes``: Enum and dataclass types a stored value may be re-created as,
    as for ``Store.load(classes=...)``; nothing is ever imported by name.
    """

    def __init__(self, *args: Any, classes: Iterable[type] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.value_classes = class_table(classes)

    def load_value(self, read_item: ReadItem, value: Any) -> None:
        assign_value(self, read_item, value)

    def create_local_plan(self) -> LoadPlan:
        try:
            return super().create_local_plan()
        except RuntimeError as exc:
            # DCP's one untyped refusal of a state that does not fit: a key the checkpoint lacks.
            text = str(exc)
            if not text.startswith(_MISSING):
                raise
            key = text[len(_MISSING):].strip().rstrip(".")
            raise StateError(f"{key}: the checkpoint has no such key (load with strict=False to restore the rest)", key=key) from None


_MISSING = "Missing key in checkpoint state_dict:"


def deliver_value(planner: Any, item: ReadItem, data: bytes | bytearray) -> None:
    """Decode a stored value and hand it to ``planner`` (see the module docstring)."""
    value = decode_value(data, item.storage_index.fqn, classes=getattr(planner, "value_classes", None))
    load_value = getattr(planner, "load_value", None)
    if load_value is not None:
        load_value(item, value)
    elif isinstance(planner, DefaultLoadPlanner) and type(planner).load_bytes is DefaultLoadPlanner.load_bytes:
        assign_value(planner, item, value)
    else:
        raise StateError(
            f"{item.storage_index.fqn}: this value is stored as JSON, and the planner {type(planner).__name__} reads values "
            "through its own load_bytes (which expects pickle); give it a load_value(read_item, value) method, "
            "or use ckstore.distributed.ValueLoadPlanner",
            key=item.storage_index.fqn,
        )


__all__ = ["ENCODING", "ValueLoadPlanner", "ValueSavePlanner", "decode_value", "encode_value"]
