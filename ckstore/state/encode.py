"""Nested training state <-> a JSON skeleton plus tensors grouped into files.

Saving walks the state once. Tensors (and NumPy arrays) go to tensor files;
everything else becomes JSON in the manifest. JSON has no tuples, no non-string
keys, no NaN and no bytes, so those are written as small tagged objects
(``{"$ck": "tuple", "items": [...]}`` and so on); a plain dict whose keys are
strings in sorted order stays a plain JSON object, so the manifest reads
naturally (any other dict is a ``{"$ck": "dict", "items": [[key, value], ...]}``
so that key order survives canonical JSON's sorted keys). Objects
with ``state_dict()``/``load_state_dict()`` are stored as their state dict and
restored in place. Nothing is pickled, on save or on load. This module
encodes; the skeleton's schema and limits are in ``_skeleton`` (the encoder
refuses what the reader would), decoding is in ``_decode`` and matching the
objects a load restores into is in ``_targets``.

Tensors are grouped into files by where they sit in the state: the top-level
key plus the first dotted component of the next key (``model.encoder``,
``model.embed``, ``optimizer.state``), so that a part of the model that did not
change produces a byte-identical file from one checkpoint to the next. Large
groups are split into shards of at most :data:`MAX_FILE_BYTES`.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import functools
import math
import re
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import loaders as _loaders
from ..format import extra_types as _extra
from ..format import skeleton as _skeleton
from ..errors import ManifestError, StateError
from ..format.skeleton import MARK, numpy_scalar_dtype
from ..engine.write import check_tensor, prepare_tensor
from ..format.safetensors import DTYPE_NAMES

MAX_FILE_BYTES = 1 << 30
#: The most JSON container levels one encoded value opens before its children ("dict": object, items, pair).
_LEVELS_PER_VALUE = 3
#: An upper bound on the JSON values one encoded value or tensor reference adds besides its children.
_VALUES_PER_NODE = 7
#: JSON readers refuse integers of more than 4300 digits (CVE-2020-10735); stay well below.
_MAX_INT_BITS = 12_000
_EXACT_KEYS = {str, int}
_STR = {str}
_STRIDED = torch.strided

Path = tuple[Any, ...]


def format_path(path: Path) -> str:
    return f"state[{']['.join(map(repr, path))}]" if path else "state"


def is_stateful(value: object) -> bool:
    return (
        not isinstance(value, (torch.Tensor, Mapping, type))
        and callable(getattr(value, "state_dict", None))
        and callable(getattr(value, "load_state_dict", None))
    )


@dataclass
class TensorRef:
    file: str
    key: str


@dataclass
class Encoded:
    """A state split for storage: the JSON skeleton and the tensors of each file, in order."""

    skeleton: Any
    files: dict[str, list[tuple[str, torch.Tensor]]] = field(default_factory=dict)
    #: dtype and shape of every tensor, in file order (the order ``files`` lists them)
    specs: list[tuple[torch.dtype, torch.Size]] = field(default_factory=list)
    #: some tensor lives off the host (the staging copy then uses pinned memory)
    on_device: bool = False

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor, in file order."""
        return [tensor for entries in self.files.values() for _, tensor in entries]

    def rebind(self, tensors: list[torch.Tensor]) -> None:
        """Replace every tensor, in file order, by the one at the same position of ``tensors`` (a staged copy)."""
        files, start = {}, 0
        for name, entries in self.files.items():
            end = start + len(entries)
            files[name] = list(zip([key for key, _ in entries], tensors[start:end]))
            start = end
        self.files = files


class _Encoder:
    def __init__(self, prepare: Callable[[torch.Tensor, str], torch.Tensor] | None) -> None:
        # None: tensors are only validated here, because the caller copies
        # them (into staging memory) right after the walk; see _plain_dict_validated.
        self.prepare = prepare
        # Shared tensors are stored once. A tensor's identity includes its
        # storage address, so the walk keys members by ``data_ptr()`` first and
        # compares full identities (see _identity) only when two addresses meet:
        # the identity costs six attribute reads a tensor, the address one.
        self.by_address: dict[int, int] = {}  # address -> the first member there
        self.also_at: dict[int, list[int]] = {}  # address -> later members there
        # A tensor made on the fly (a state_dict() that returns fresh
        # non-contiguous views) would be freed once encoded, and the allocator
        # could hand its address to the next fresh tensor of the same shape,
        # which would then be mistaken for a shared one and silently saved as
        # the first one's data. Every encoded tensor is held until the end
        # (in ``tensors``, or ``originals`` when prepare made a new one), which
        # keeps addresses unique.
        self.originals: dict[int, torch.Tensor] = {}  # member -> the tensor met, where prepare returned another
        self.paths: list[Path] = []  # of each member, in the order met
        self.tensors: list[torch.Tensor] = []  # the prepared tensor of each member
        self.specs: list[tuple[torch.dtype, torch.Size]] = []  # dtype and shape of each member
        self.refs: list[dict[str, Any]] = []  # each member's node in the skeleton
        self.exact_paths = True  # every key so far an exact str or int (see _cached_layout)
        self.on_device = False  # some tensor lives off the host (a GPU)
        self.active: set[int] = set()
        # JSON containers enclosing the value being encoded, and values encoded:
        # a state is refused where the decoder would refuse its skeleton
        # (``_skeleton``), so no save commits a checkpoint that cannot be loaded.
        self.depth = 0
        self.encoded = 0

    def encode(self, value: Any, path: Path) -> Any:
        self.encoded += 1
        if self.depth > _skeleton.MAX_DEPTH - _LEVELS_PER_VALUE:
            raise StateError(
                f"{format_path(path[:5])}...: state nests deeper than the {_skeleton.MAX_DEPTH} levels a checkpoint may hold",
                key=format_path(path),
            )
        if isinstance(value, torch.Tensor):
            return self.tensor(value, path, numpy=False)
        if isinstance(value, np.ndarray):
            return self.tensor(torch.from_numpy(_storable_array(value, path)), path, numpy=True)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, enum.Enum):  # before str and int: a StrEnum or IntEnum member keeps its class
            return self.extra(value, "enum", path)
        if isinstance(value, str):
            return _check_text(value, path)
        if isinstance(value, np.generic):
            kind = numpy_scalar_dtype(value.dtype.str)
            if kind is None:
                raise StateError(
                    f"{format_path(path)}: a NumPy {type(value).__name__} scalar cannot be stored (no portable form); "
                    "convert it to a Python number, or to a supported NumPy type",
                    key=format_path(path),
                )
            with self._entered(value, path, 1):
                return {MARK: "numpy_scalar", "dtype": value.dtype.str, "value": self.encode(value.item(), path)}
        if isinstance(value, int):
            if value.bit_length() > _MAX_INT_BITS:
                raise StateError(f"{format_path(path)}: integer of {value.bit_length()} bits is too large to store", key=format_path(path))
            return int(value)
        if isinstance(value, float):
            return _encode_float(float(value))
        if isinstance(value, (bytes, bytearray)):
            return {MARK: "bytes", "base64": base64.b64encode(bytes(value)).decode("ascii")}
        if isinstance(value, torch.dtype):
            return {MARK: "dtype", "name": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {MARK: "device", "name": str(value)}
        if is_stateful(value):
            with self._entered(value, path, 1):
                state = _loaders.state_to_save(value, format_path(path))
                if type(state) is OrderedDict:
                    # A module's state_dict() is an OrderedDict; loading puts it back into the object,
                    # so it is stored as a dict, as before "odict" existed (older readers load it).
                    state = dict(state)
                return {MARK: "stateful", "class": type(value).__qualname__, "state": self.encode(state, path)}
        if isinstance(value, Mapping):
            key_types = set(map(type, value))
            if self.exact_paths and not key_types <= _EXACT_KEYS:
                self.exact_paths = False
            # Canonical JSON sorts object keys, so only a dict whose keys are
            # already sorted may become a plain object; any other order is
            # kept by the item list below (a round trip preserves key order).
            keys = list(value)
            strings = key_types <= _STR or all(isinstance(k, str) for k in keys)
            ordered = type(value) is OrderedDict  # loads as an OrderedDict again ("odict")
            if strings and not ordered and MARK not in value and keys == sorted(keys):
                with self._entered(value, path, 1):
                    return self.plain_dict(value, path)
            with self._entered(value, path, 3):
                items = []
                for k, v in value.items():
                    items.append([self.key(k, path), self.encode(v, path + (k,))])
                return {MARK: "odict" if ordered else "dict", "items": items}
        if isinstance(value, (list, tuple)):
            with self._entered(value, path, 1 if type(value) is list else 2):
                items = [self.encode(v, path + (i,)) for i, v in enumerate(value)]
            if isinstance(value, torch.Size):
                return {MARK: "size", "items": items}
            return items if isinstance(value, list) else {MARK: "tuple", "items": items}
        kind = _extra.kind_of(value)
        if kind is not None:
            return self.extra(value, kind, path)
        refusal = _loaders.loader_refusal(value)
        if refusal is not None:
            raise StateError(f"{format_path(path)}: {refusal}", key=format_path(path))
        raise StateError(
            f"{format_path(path)}: cannot store a value of type {type(value).__module__}.{type(value).__qualname__}; "
            "supported: tensors, NumPy arrays, dict/list/tuple, int/float/bool/str/bytes/None, "
            "pathlib paths, argparse.Namespace, date/datetime/timedelta, Enum members, dataclasses, "
            "and objects with state_dict()/load_state_dict()",
            key=format_path(path),
        )

    def extra(self, value: Any, kind: str, path: Path) -> dict[str, Any]:
        """A value of ``ckstore.format.extra_types``' table (paths, dates, enums, dataclasses, ...)."""
        with self._entered(value, path, 1):
            return _extra.encode(value, kind, format_path(path), lambda child: self.encode(child, path))

    def plain_dict(self, value: Mapping[str, Any], path: Path) -> dict[str, Any]:
        """A dict with sorted string keys, as a JSON object; its tensors (the bulk of a model) encoded inline."""
        _check_keys(value, path)
        if self.prepare is None:
            return self._plain_dict_validated(value, path)
        out = {}
        prefix = format_path(path)
        for k, v in value.items():
            if type(v) is torch.Tensor:
                out[k] = self.tensor(v, path + (k,), numpy=False, label=f"{prefix}[{k!r}]")
            else:
                out[k] = self.encode(v, path + (k,))
        return out

    def _plain_dict_validated(self, value: Mapping[str, Any], path: Path) -> dict[str, Any]:
        """:meth:`plain_dict` when tensors are only validated (a background save, which copies them next).

        The hot loop of a background save's stall: walking a model of 10,000
        small tensors cost more than copying them. So the common case is
        inlined and reads only what the copy and the file need: layout and
        dtype to validate, the address for sharing, shape and device. A tensor
        at an address already seen, or one that fails validation, takes the
        general path, which finds shared tensors and raises the precise errors.
        """
        out = {}
        by_address, names, node = self.by_address, DTYPE_NAMES, MARK
        add_path, add_tensor, add_spec, add_ref = self.paths.append, self.tensors.append, self.specs.append, self.refs.append
        for k, v in value.items():
            if type(v) is not torch.Tensor:
                out[k] = self.encode(v, path + (k,))
                continue
            dtype = v.dtype
            if v.layout is _STRIDED and dtype in names and (address := v.data_ptr()) not in by_address:
                if v.is_cpu:
                    ref = {node: "tensor"}
                elif not v.is_meta:
                    ref = {node: "tensor", "device": str(v.device)}
                    self.on_device = True
                else:
                    out[k] = self.tensor(v, path + (k,), numpy=False)  # refused there
                    continue
                by_address[address] = len(self.refs)
                add_path(path + (k,))
                add_tensor(v)
                add_spec((dtype, v.shape))
                add_ref(ref)
                out[k] = ref
            else:
                out[k] = self.tensor(v, path + (k,), numpy=False)
        return out

    def key(self, key: Any, path: Path) -> Any:
        if _storable_key(key):
            return self.encode(key, path + ("<key>",))
        raise StateError(f"{format_path(path)}: dict key {key!r} of type {type(key).__name__} cannot be stored", key=format_path(path))

    @contextlib.contextmanager
    def _entered(self, value: object, path: Path, levels: int) -> Iterator[None]:
        """Inside ``value``, whose node opens ``levels`` JSON containers around its children."""
        if id(value) in self.active:
            raise StateError(f"{format_path(path)}: the state contains itself (a reference cycle)", key=format_path(path))
        self.active.add(id(value))
        self.depth += levels
        try:
            yield
        finally:
            self.depth -= levels
            self.active.discard(id(value))

    def tensor(self, tensor: torch.Tensor, path: Path, *, numpy: bool, label: str | None = None) -> dict[str, Any]:
        address = tensor.data_ptr() if tensor.layout is _STRIDED else id(tensor)
        if address in self.by_address:
            ref = self._shared(address, tensor, numpy)
            if ref is not None:
                return ref
        ref = {MARK: "tensor"}
        if numpy:
            ref["numpy"] = True
        if not tensor.is_cpu:
            ref["device"] = str(tensor.device)
            self.on_device = True
        prepared = (self.prepare or check_tensor)(tensor, label or format_path(path))
        index = len(self.refs)
        if address in self.by_address:
            self.also_at.setdefault(address, []).append(index)
        else:
            self.by_address[address] = index
        if prepared is not tensor:
            self.originals[index] = tensor
        self.paths.append(path)
        self.tensors.append(prepared)
        self.specs.append((prepared.dtype, prepared.shape))
        self.refs.append(ref)
        return ref

    def finish(self, skeleton: Any) -> Encoded:
        layout, specs = _cached_layout(self.paths, self.tensors, self.specs, exact=self.exact_paths)
        encoded = Encoded(skeleton, specs=specs, on_device=self.on_device)
        tensor_at, ref_at = self.tensors.__getitem__, self.refs.__getitem__
        for name, indices, keys in layout:
            for ref, key in zip(map(ref_at, indices), keys):
                ref["file"] = name
                ref["key"] = key
            encoded.files[name] = list(zip(keys, map(tensor_at, indices)))
        return encoded

    def _shared(self, address: int, tensor: torch.Tensor, numpy: bool) -> dict[str, Any] | None:
        """The node of an already-encoded tensor at ``address`` that is the same tensor as ``tensor``, if any."""
        identity = _identity(tensor, numpy)
        for index in (self.by_address[address], *self.also_at.get(address, ())):
            ref = self.refs[index]
            other = self.originals.get(index)
            if _identity(self.tensors[index] if other is None else other, bool(ref.get("numpy"))) == identity:
                return ref
        return None


def _identity(tensor: torch.Tensor, numpy: bool) -> tuple:
    """What makes two tensor references the same stored tensor.

    ``data_ptr()`` is the storage address plus ``storage_offset`` elements of
    ``dtype``, both also in the key: the same identity as the storage address,
    without building a storage object for every tensor. An empty tensor, and
    one with no strided storage, is only ever itself.
    """
    if tensor.layout is _STRIDED:
        address = tensor.data_ptr() if tensor.numel() else id(tensor)
        return (address, tensor.device, tensor.dtype, tensor.storage_offset(), tensor.shape, tensor.stride(), numpy)
    return (id(tensor), tensor.device, tensor.dtype, 0, tensor.shape, (), numpy)


def _check_keys(value: Mapping[str, Any], path: Path) -> None:
    """:func:`_check_text` for every key of a dict, in one encode when they are all fine."""
    try:
        "".join(value).encode("utf-8")
    except UnicodeEncodeError:
        for key in value:
            _check_text(key, path)


#: A state with more groups than this pools its small ones (see _pool_small_groups).
MAX_GROUPS = 64
SMALL_GROUP_BYTES = 4 << 20

#: Each file's name, its tensors (indices into the members) and their keys, in order.
Layout = list[tuple[str, tuple[int, ...], tuple[str, ...]]]

Specs = list[tuple[torch.dtype, torch.Size]]

_last_layout: tuple[list[Path], Specs, Layout, Specs] | None = None


def _cached_layout(paths: list[Path], tensors: list[torch.Tensor], specs: Specs, *, exact: bool) -> tuple[Layout, Specs]:
    """:func:`_layout` of the members, and their specs in file order; the previous result for the same paths and specs.

    A training run saves the same structure every time, and grouping, pooling
    and naming thousands of tensors again costs tens of milliseconds a save.
    The layout is a function of each tensor's path (through ``str`` and
    ``repr`` of its keys) and size, so equal paths give the same layout only
    when every key is an exact ``str`` or ``int``: ``1``, ``1.0`` and ``True``
    are equal but print differently, so other states are laid out afresh.
    The specs come back as the same list object on a hit, which lets the
    staging area see at a glance that its views still fit.
    """
    global _last_layout
    last = _last_layout
    if exact and last is not None and last[0] == paths and last[1] == specs:
        return last[2], last[3]
    layout = _layout(paths, [t.nbytes for t in tensors])
    ordered = [specs[index] for _, indices, _ in layout for index in indices]
    if exact:
        _last_layout = (paths, specs, layout, ordered)
    return layout, ordered


def _layout(paths: list[Path], sizes: list[int]) -> Layout:
    """Tensors grouped into files by where they sit in the state; large groups are split into shards."""
    groups: dict[str, list[int]] = {}
    for index, path in enumerate(paths):
        groups.setdefault(_group_name(path), []).append(index)
    layout: Layout = []
    used_names: set[str] = set()
    for group, indices in _pool_small_groups(groups, paths, sizes).items():
        shards: list[list[int]] = [[]]
        size = 0
        for index in indices:
            nbytes = sizes[index]
            if shards[-1] and size + nbytes > MAX_FILE_BYTES:
                shards.append([])
                size = 0
            shards[-1].append(index)
            size += nbytes
        for number, shard in enumerate(shards):
            stem = group if len(shards) == 1 else f"{group}-{number:05d}"
            name = _unique(f"{stem}.safetensors", used_names)
            keys: set[str] = set()
            layout.append((name, tuple(shard), tuple(_unique_key("/".join(map(str, paths[index])) or "tensor", keys) for index in shard)))
    return layout


def _pool_small_groups(groups: dict[str, list[int]], paths: list[Path], sizes: list[int]) -> dict[str, list[int]]:
    """Merge groups under :data:`SMALL_GROUP_BYTES` into one group per top-level key.

    Every file costs a create, an fsync and a directory entry: a model whose
    top-level modules are thousands of tiny layers would otherwise become
    thousands of files, and a save would be bound by fsync latency rather than
    by the disk's bandwidth. States with few groups keep one file per group.
    """
    if len(groups) <= MAX_GROUPS:
        return groups
    pooled: dict[str, list[int]] = {}
    for group, indices in groups.items():
        if sum(sizes[index] for index in indices) >= SMALL_GROUP_BYTES:
            pooled.setdefault(group, []).extend(indices)
            continue
        path = paths[indices[0]]
        top = _group_name(path[:1]) if len(path) > 1 else "state"
        pooled.setdefault(f"{top}.small", []).extend(indices)
    return pooled


def _encode_float(value: float) -> Any:
    if math.isfinite(value):
        return value
    if not math.isnan(value):
        return {MARK: "float", "value": "inf" if value > 0 else "-inf"}
    node: dict[str, Any] = {MARK: "float", "value": "nan"}
    bits = struct.pack("<d", value)
    if bits != _NAN_BITS:
        # A NaN's sign and payload survive a resume bit for bit (a float32
        # -nan passes through here as a double on its way to the manifest).
        node["bits"] = bits.hex()
    return node


_NAN_BITS = struct.pack("<d", math.nan)


def _storable_array(value: np.ndarray, path: Path) -> np.ndarray:
    """``value`` as a C-contiguous array torch can wrap, or a StateError naming the key and why not."""
    dtype = value.dtype
    why = None
    if dtype.byteorder == ">":
        why = f"big-endian arrays ({dtype.str}) are not stored; convert with a.astype(a.dtype.newbyteorder('='))"
    elif dtype.type in (np.longdouble, np.clongdouble) and dtype.itemsize > 8 * (2 if dtype.kind == "c" else 1):
        why = f"NumPy {dtype.type.__name__} has no portable on-disk form; convert to float64 or complex128"
    elif dtype.hasobject or dtype.kind not in "biufc":
        why = f"NumPy arrays of dtype {dtype} are not supported"
    if why is not None:
        raise StateError(f"{format_path(path)}: {why}", key=format_path(path))
    # Not np.ascontiguousarray: it turns a 0-d array into a 1-d one.
    return value if value.flags.c_contiguous else value.copy(order="C")


def _storable_key(key: Any) -> bool:
    """A dict key the decoder can rebuild: None, bool, str, int, float, or a tuple of these (not a tensor, not a Size)."""
    stack = [key]
    while stack:
        item = stack.pop()
        if type(item) is tuple:
            stack.extend(item)
        elif not (item is None or isinstance(item, (bool, str, int, float))) or isinstance(item, (torch.Tensor, np.ndarray)):
            return False
    return True


def _check_text(text: str, path: Path) -> str:
    """Refuse strings that UTF-8 cannot encode (lone surrogates): the manifest could not be written."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise StateError(f"{format_path(path)}: string {text[:40]!r} holds a lone surrogate and cannot be stored as UTF-8", key=format_path(path)) from None
    return text


_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
_DOTS = re.compile(r"\.{2,}")


def _group_name(path: Path) -> str:
    """A file stem from the state path that manifests accept (``_manifest.check_file_name``).

    Keys may hold anything; the stem keeps letters, digits, ``_``, ``-`` and
    single inner dots, and starts with a letter, digit or ``_``, so a key such
    as ``"-x"``, ``".hidden"`` or ``"a..b"`` never yields a name the reader refuses.
    """
    if not path:
        return "state"
    second = path[1] if len(path) > 1 else None
    return _stem(str(path[0]), second.split(".", 1)[0] if isinstance(second, str) else None)


@functools.lru_cache(maxsize=1 << 16)
def _stem(head: str, first: str | None) -> str:
    """The cleaned stem of ``head`` and the first dotted component of the next key.

    Memoized (on strings, so equal-but-different keys such as ``1`` and
    ``True`` never share an entry): a save walks thousands of tensors whose
    groups repeat from one save to the next, and two regexes per tensor add up.
    """
    if first is not None:
        head += "." + first
    return _DOTS.sub(".", _SAFE.sub("_", head))[:120].strip(".-") or "state"


def _unique(name: str, used: set[str]) -> str:
    candidate, n = name, 1
    while candidate in used or candidate == "manifest.json":
        stem, _, ext = name.rpartition(".")
        candidate = f"{stem}~{n}.{ext}"
        n += 1
    used.add(candidate)
    return candidate


def _unique_key(key: str, used: set[str]) -> str:
    candidate, n = key, 1
    while candidate in used or candidate == "__metadata__":
        candidate = f"{key}#{n}"
        n += 1
    used.add(candidate)
    return candidate


def encode_state(state: Any, *, prepare: Callable[[torch.Tensor, str], torch.Tensor] | None = prepare_tensor) -> Encoded:
    """Split ``state`` into a JSON skeleton and tensor files. Raises StateError naming the key path.

    ``prepare`` turns each tensor into what is written (``prepare_tensor``:
    detached, contiguous, on the CPU). With None the tensors are only
    validated and kept as they are: for a caller that copies them at once.
    """
    encoder = _Encoder(prepare)
    try:
        skeleton = encoder.encode(state, ())
    except RecursionError:  # the caller's stack was already deep: the state itself nests at most MAX_DEPTH levels
        raise StateError("the caller's stack is too deep to walk the state", key="state") from None
    if _VALUES_PER_NODE * (encoder.encoded + len(encoder.refs)) > _skeleton.MAX_VALUES:
        # Rarely reached (a skeleton of millions of values): count exactly, as the reader will.
        try:
            _skeleton.check_skeleton(skeleton, path="state")
        except ManifestError:
            raise StateError(
                f"the state holds more than the {_skeleton.MAX_VALUES} values a checkpoint's skeleton may hold; "
                "store long lists of numbers as a tensor or a NumPy array",
                key="state",
            ) from None
    return encoder.finish(skeleton)
