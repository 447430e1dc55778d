"""The state skeleton's schema: what a manifest's ``"state"`` may hold, and its limits.

The skeleton is the JSON form of a saved state (see ``_state``): plain JSON
values, plus tagged objects ``{"$ck": kind, ...}`` for what JSON lacks. A
manifest can be crafted (a downloaded store) or written by a buggy tool, and
its checksum only proves that nobody changed it since it was written. So
:func:`check_skeleton` validates the whole skeleton once, iteratively, before
anything decodes it: every tagged node has exactly its fields, of the right
types and ranges; names are looked up in fixed tables; nesting and size are
bounded. Whatever it accepts, the decoder can rebuild without an untyped
error; whatever it refuses is a :class:`ManifestError`, so ``load()`` skips
the checkpoint and falls back to an older one, and ``verify()`` reports it.

Limits, the same on both sides (the encoder refuses a state that would
exceed them, so a save never commits a checkpoint that cannot be loaded):

* :data:`MAX_DEPTH` JSON containers (objects and arrays) nested in each
  other. The decoder recurses once per container level at most, so this
  also bounds its stack: the audit's crafted manifest nested just past what
  Python's recursion limit allowed, and its RecursionError stopped ``load()``.
* :data:`MAX_VALUES` JSON values in all (every object, array, string,
  number, true/false/null): the decoder builds about one Python object per
  value, so this bounds its memory whatever the manifest's size.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..errors import ManifestError
from . import extra_types as _extra

MARK = "$ck"
#: Deepest nesting of JSON containers in a skeleton (the state's root object is level 1).
MAX_DEPTH = 256
#: Most JSON values in a skeleton. A large model's skeleton holds a few values per tensor.
MAX_VALUES = 1 << 24

#: Every torch dtype by the name the encoder writes (``str(dtype)`` less ``torch.``). A fixed
#: table: ``getattr(torch, name)`` on a crafted name runs torch's lazy imports (``torch.onnx``).
TORCH_DTYPES: dict[str, torch.dtype] = {
    str(value).removeprefix("torch."): value for value in list(vars(torch).values()) if isinstance(value, torch.dtype)
}

#: NumPy scalar dtypes a skeleton may name (``dtype.str`` on a little-endian host), and the
#: JSON value each holds. Others (longdouble, complex, datetime, object) are refused on save.
_NUMPY_FIXED = {
    "|b1": "bool",
    **{code: "int" for code in ("|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8")},
    **{code: "float" for code in ("<f2", "<f4", "<f8")},
}
_NUMPY_TEXT = re.compile(r"<U[0-9]{1,9}|\|S[0-9]{1,9}")
_INT_RANGES = {code: (int(np.iinfo(code).min), int(np.iinfo(code).max)) for code, kind in _NUMPY_FIXED.items() if kind == "int"}
_DEVICE = re.compile(r"([a-z][a-z0-9_]{0,31})(?::[0-9]{1,4})?")
#: Device types torch parses (``torch.device`` raises on any other); checked here so verify() agrees with load().
_DEVICE_TYPES = frozenset(
    {"cpu", "cuda", "mps", "xpu", "meta", "hpu", "xla", "mtia", "maia", "ipu", "ve", "lazy", "vulkan", "fpga", "mkldnn",
     "opengl", "opencl", "ideep", "hip", "privateuseone", torch._C._get_privateuse1_backend_name()}
)  # fmt: skip
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_INT64_MAX = (1 << 63) - 1
_SCALARS = (str, int, float, bool, type(None))

_TENSOR_FIELDS = {MARK, "file", "key", "numpy", "device"}
_ITEMS_FIELDS = {MARK, "items"}


def numpy_scalar_dtype(code: str) -> str | None:
    """What JSON value a NumPy scalar of dtype ``code`` is stored as ("bool", "int", "float", "text"), or None if unsupported."""
    kind = _NUMPY_FIXED.get(code)
    if kind is not None:
        return kind
    return "text" if _NUMPY_TEXT.fullmatch(code) else None


def device_name_ok(name: object) -> bool:
    match = _DEVICE.fullmatch(name) if isinstance(name, str) else None
    return match is not None and match.group(1) in _DEVICE_TYPES


def check_skeleton(skeleton: Any, *, path: str = "manifest.json") -> int:
    """Validate a whole skeleton (see the module docstring); return its number of JSON values.

    Iterative, so a skeleton nested 100,000 deep costs a loop, not the stack.
    Raises :class:`ManifestError` naming ``path`` and what is wrong.
    """
    # Each entry: the value, its depth (containers enclosing it) and whether it is a dict key.
    stack: list[tuple[Any, int, bool]] = [(skeleton, 0, False)]
    count = 0
    limit = MAX_VALUES
    while stack:
        node, depth, is_key = stack.pop()
        count += 1
        if count > limit:
            raise _bad(path, f"the state holds more than {limit} JSON values")
        if type(node) in (str, int, bool) or node is None:
            continue
        if type(node) is float:
            if not math.isfinite(node):  # pragma: no cover - the JSON parser refuses NaN and Infinity
                raise _bad(path, "non-finite number in the state")
            continue
        if depth >= MAX_DEPTH:
            raise _bad(path, f"the state nests deeper than {MAX_DEPTH} levels")
        inner = depth + 1
        if type(node) is list:
            if is_key:
                raise _bad(path, "a dict key is a list")
            stack.extend((item, inner, False) for item in node)
            continue
        if type(node) is not dict:
            raise _bad(path, f"unexpected JSON value of type {type(node).__name__}")
        kind = node.get(MARK)
        if kind is None:
            if is_key:
                raise _bad(path, "a dict key is an object")
            stack.extend((value, inner, False) for value in node.values())
            continue
        count += _check_tagged(node, kind, inner, is_key, stack, path)
    return count


def _check_tagged(node: dict[str, Any], kind: Any, inner: int, is_key: bool, stack: list[tuple[Any, int, bool]], path: str) -> int:
    """Validate one tagged node; push its children; return how many values it holds besides itself and its children."""
    fields = node.keys()
    if kind == "tensor" and not is_key:
        if not fields <= _TENSOR_FIELDS or type(node.get("file")) is not str or type(node.get("key")) is not str:
            raise _bad(path, "a tensor reference must have a string 'file' and 'key' and nothing unknown")
        if "numpy" in node and node["numpy"] is not True:
            raise _bad(path, "a tensor reference's 'numpy' must be true")
        if "device" in node and not device_name_ok(node["device"]):
            raise _bad(path, f"invalid device name {str(node['device'])[:40]!r}")
        return len(node)
    if kind in ("tuple", "size", "dict", "odict"):
        items = node.get("items")
        if fields != _ITEMS_FIELDS or type(items) is not list:
            raise _bad(path, f"a {kind} node must have exactly an 'items' list")
        if inner + (2 if kind in ("dict", "odict") else 1) > MAX_DEPTH:
            raise _bad(path, f"the state nests deeper than {MAX_DEPTH} levels")
        if kind == "size":
            if is_key or not all(type(n) is int and 0 <= n <= _INT64_MAX for n in items):
                raise _bad(path, "a torch.Size must hold integers in 0..2**63-1")
            return 2 + len(items)
        if kind == "tuple":
            stack.extend((item, inner + 1, is_key) for item in items)
            return 2
        if is_key:
            raise _bad(path, "a dict key is a dict")  # an odict too
        for pair in items:
            if type(pair) is not list or len(pair) != 2:
                raise _bad(path, "a dict item must be a [key, value] pair")
            stack.append((pair[0], inner + 2, True))
            stack.append((pair[1], inner + 2, False))
        return 2 + len(items)
    if kind == "stateful" and not is_key:
        if fields != {MARK, "class", "state"} or type(node["class"]) is not str:
            raise _bad(path, "a stateful node must have exactly a string 'class' and a 'state'")
        stack.append((node["state"], inner, False))
        return 2
    if kind == "float":
        _check_float(node, path)
        return len(node)
    if kind == "bytes" and not is_key:
        data = node.get("base64")
        if fields != {MARK, "base64"} or type(data) is not str or _BASE64.fullmatch(data) is None:
            raise _bad(path, "a bytes node must have exactly a valid 'base64' string")
        return 2
    if kind == "numpy_scalar":
        return 2 if _check_numpy_scalar(node, inner, is_key, stack, path) else 3
    if kind == "dtype" and not is_key:
        if fields != {MARK, "name"} or node["name"] not in TORCH_DTYPES:
            raise _bad(path, f"unknown torch dtype {str(node.get('name'))[:40]!r}")
        return 2
    if kind == "device" and not is_key:
        if fields != {MARK, "name"} or not device_name_ok(node["name"]):
            raise _bad(path, f"invalid device name {str(node.get('name'))[:40]!r}")
        return 2
    if type(kind) is str and kind in _extra.KINDS:  # paths, dates, enums, ...: extra_types' table (a dict "kind" is unhashable)
        child = _extra.check_node(node, kind, is_key, lambda reason: _bad(path, reason))
        if child is None:
            return len(node)
        stack.append((child, inner, False))
        return len(node) - 1
    where = "a dict key" if is_key else "the state"
    raise _bad(path, f"{where} holds an unknown tagged value {str(kind)[:40]!r}")


def decode_float(node: dict[str, Any]) -> float:
    """The float of a (validated) ``{"$ck": "float"}`` node: inf, -inf, or a NaN with its exact bits."""
    bits = node.get("bits")
    if bits is None:
        return float(node["value"])
    return struct.unpack("<d", bytes.fromhex(bits))[0]


def _check_float(node: dict[str, Any], path: str) -> None:
    value = node.get("value")
    bits = node.get("bits")
    if not node.keys() <= {MARK, "value", "bits"} or value not in ("inf", "-inf", "nan") or ("bits" in node and value != "nan"):
        raise _bad(path, "a float node must be 'inf', '-inf' or 'nan' (with optional 'bits')")
    if "bits" in node and (type(bits) is not str or _HEX16.fullmatch(bits) is None or not math.isnan(struct.unpack("<d", bytes.fromhex(bits))[0])):
        raise _bad(path, f"malformed NaN bits {str(bits)[:40]!r}")


def _check_numpy_scalar(node: dict[str, Any], inner: int, is_key: bool, stack: list[tuple[Any, int, bool]], path: str) -> bool:
    """Validate a NumPy scalar node; True if its value is a tagged node, pushed to be checked (and counted) in turn."""
    code = node.get("dtype")
    kind = numpy_scalar_dtype(code) if type(code) is str else None
    if node.keys() != {MARK, "dtype", "value"} or kind is None:
        raise _bad(path, f"unsupported NumPy scalar dtype {str(code)[:40]!r}")
    value = node["value"]
    if kind == "bool":
        ok = type(value) is bool
    elif kind == "int":
        low, high = _INT_RANGES[code]
        ok = type(value) is int and low <= value <= high
    elif kind == "float":
        ok = type(value) in (int, float) or (type(value) is dict and value.get(MARK) == "float")
    elif code.startswith("<U"):
        ok = type(value) is str
    else:
        ok = type(value) is dict and value.get(MARK) == "bytes" and not is_key
    if not ok:
        raise _bad(path, f"a NumPy {code} scalar holds {str(value)[:40]!r}")
    if type(value) is dict:
        stack.append((value, inner, is_key))
        return True
    return False


def _bad(path: str, reason: str) -> ManifestError:
    return ManifestError(f"{path}: malformed state: {reason}", path=path)


def tensor_refs(skeleton: Any) -> Iterator[tuple[str, str]]:
    """Every (file, key) the skeleton refers to."""
    stack = [skeleton]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if node.get(MARK) == "tensor":
                yield node.get("file"), node.get("key")
            else:
                stack.extend(node.values())
