"""Values beyond plain JSON that a state may hold, each stored as a tagged object with explicit fields.

Hyperparameters and configs hold paths, dates, enums and dataclasses
(Lightning's ``save_hyperparameters()``, a parsed ``argparse.Namespace``). They
are stored as JSON, never pickled. The whole table:

=============================  ==============================================================  =========
value                          skeleton node                                                   decoded
=============================  ==============================================================  =========
``collections.OrderedDict``    ``{"$ck": "odict", "items": [[key, value], ...]}``               OrderedDict, in order
``pathlib`` paths              ``{"$ck": "path", "class": "PosixPath", "value": "a/b"}``        that class
``argparse.Namespace``         ``{"$ck": "namespace", "attrs": {...}}``                        Namespace
``datetime.date``              ``{"$ck": "date", "value": "2026-12-02"}``                      date
``datetime.datetime``          ``{"$ck": "datetime", "value": "<naive ISO>"[, "offset": µs,    datetime, same tzinfo
                               "tzname": "...", "fold": 1]}``                                 and fold
``datetime.timedelta``         ``{"$ck": "timedelta", "days": d, "seconds": s, "microseconds"  timedelta
                               : us}``
``enum.Enum`` member           ``{"$ck": "enum", "class": "pkg.mod:Color", "value": ...}``     ``cls(value)``
dataclass instance             ``{"$ck": "dataclass", "class": "pkg.mod:Cfg", "fields": {}}``   ``cls(**fields)``
=============================  ==============================================================  =========

(``odict`` shares the ``dict`` node's checks and code in ``skeleton`` and ``decode``;
the rest is here.) A datetime's tzinfo must be ``None`` or a fixed offset
(``datetime.timezone``); a zone such as ``ZoneInfo("Europe/Berlin")`` is refused
on save, since its rules are not part of the value.

**Enums and dataclasses run no code from a checkpoint.** The node names the
class (``module:qualname``), and loading re-creates the value only from a
class the caller passed (``Store.load(..., classes=[Color, Cfg])``): the name
is looked up in that table, never imported. Any other class name raises
:class:`StateError` naming the key and the class to pass, at once (it is the
caller's choice, not a corrupt checkpoint, so ``load()`` does not fall back).

Like every skeleton node, each is validated by :func:`check_node` before
anything decodes it (``ckstore.format.skeleton``), so a crafted manifest gives
a :class:`ManifestError`, never an untyped error.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import pathlib
import re
from argparse import Namespace
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..errors import InvalidArgumentError, ManifestError, StateError

MARK = "$ck"
#: The tagged kinds this module encodes and decodes (``odict`` is handled with ``dict``).
KINDS = frozenset({"path", "namespace", "date", "datetime", "timedelta", "enum", "dataclass"})
#: Path classes by the name stored; a fixed table, so a crafted name is refused, not looked up.
PATH_CLASSES: dict[str, type[pathlib.PurePath]] = {
    cls.__name__: cls for cls in (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath)
}
#: Base types of the values in the table, for a quick "is this one of them" test.
BASES = (pathlib.PurePath, Namespace, dt.date, dt.timedelta, enum.Enum)
_CLASS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,255}:[A-Za-z_<][A-Za-z0-9_.<>]{0,255}", re.ASCII)
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", re.ASCII)
_DATETIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{6})?", re.ASCII)
_DAY_US = 86_400_000_000


def class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def is_dataclass_instance(value: Any) -> bool:
    return hasattr(type(value), "__dataclass_fields__") and not isinstance(value, type)


def kind_of(value: Any) -> str | None:
    """The table's kind for ``value``, or None if it is not one of the table's types."""
    if isinstance(value, enum.Enum):
        return "enum"
    if isinstance(value, pathlib.PurePath):
        return "path"
    if isinstance(value, dt.datetime):
        return "datetime"
    if isinstance(value, dt.date):
        return "date"
    if isinstance(value, dt.timedelta):
        return "timedelta"
    if isinstance(value, Namespace):
        return "namespace"
    if is_dataclass_instance(value):
        return "dataclass"
    return None


def class_table(classes: Iterable[type] | None) -> dict[str, type]:
    """``classes`` (Enum and dataclass types a load may re-create) keyed by the name a node stores."""
    if classes is None:
        return {}
    if isinstance(classes, (str, bytes, type)) or not isinstance(classes, Iterable):
        raise InvalidArgumentError(f"classes must be a list of Enum or dataclass types, got {classes!r}")
    table = {}
    for cls in classes:
        if not isinstance(cls, type) or not (issubclass(cls, enum.Enum) or dataclasses.is_dataclass(cls)):
            raise InvalidArgumentError(f"classes: {cls!r} is not an Enum or dataclass type (only those are re-created from a checkpoint)")
        table[class_name(cls)] = cls
    return table


# ---------------------------------------------------------------- encoding


def encode(value: Any, kind: str, where: str, child: Callable[[Any], Any]) -> dict[str, Any]:
    """The node for ``value`` of table kind ``kind``; ``child`` encodes a nested value; StateError naming ``where``."""
    cls = type(value)
    if kind == "path":
        if PATH_CLASSES.get(cls.__name__) is not cls:
            raise _refused(where, f"a {class_name(cls)} (a pathlib subclass) cannot be stored; convert it to pathlib.Path")
        return {MARK: "path", "class": cls.__name__, "value": str(value)}
    if kind == "namespace":
        return {MARK: "namespace", "attrs": child(dict(vars(value)))}
    if kind == "date":
        return {MARK: "date", "value": value.isoformat()}
    if kind == "datetime":
        return _encode_datetime(value, where)
    if kind == "timedelta":
        return {MARK: "timedelta", "days": value.days, "seconds": value.seconds, "microseconds": value.microseconds}
    name = class_name(cls)
    if _CLASS_NAME.fullmatch(name) is None:
        raise _refused(where, f"the class name {name!r} cannot be stored")
    if kind == "enum":
        return {MARK: "enum", "class": name, "value": child(value.value)}
    fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.init}
    return {MARK: "dataclass", "class": name, "fields": child(fields)}


def _encode_datetime(value: dt.datetime, where: str) -> dict[str, Any]:
    node: dict[str, Any] = {MARK: "datetime", "value": value.replace(tzinfo=None, fold=0).isoformat(timespec="microseconds")}
    tz = value.tzinfo
    if tz is not None:
        if type(tz) is not dt.timezone:
            raise _refused(
                where, f"a datetime with tzinfo {tz!r} cannot be stored (only fixed offsets are): use .astimezone(datetime.timezone.utc)"
            )
        args = tz.__getinitargs__()
        node["offset"] = (args[0] // dt.timedelta(microseconds=1))
        if len(args) > 1:
            node["tzname"] = args[1]
    if value.fold:
        node["fold"] = 1
    return node


def _refused(where: str, reason: str) -> StateError:
    return StateError(f"{where}: {reason}", key=where)


# ---------------------------------------------------------------- validation


def check_node(node: dict[str, Any], kind: str, is_key: bool, bad: Callable[[str], ManifestError]) -> Any:
    """Validate a node of a table kind; return its child node to check in turn (or None); raise ``bad(reason)``."""
    fields = node.keys()
    if is_key:
        raise bad(f"a dict key is a {kind}")
    if kind == "path":
        name, value = node.get("class"), node.get("value")
        if fields != {MARK, "class", "value"} or type(name) is not str or name not in PATH_CLASSES or type(value) is not str or "\0" in value:
            raise bad("a path node must have exactly a known 'class' and a string 'value'")
        return None
    if kind == "date":
        if fields != {MARK, "value"} or type(node["value"]) is not str or _DATE.fullmatch(node["value"]) is None:
            raise bad("a date node must have exactly a 'value' YYYY-MM-DD")
        _parse(dt.date.fromisoformat, node["value"], bad)
        return None
    if kind == "datetime":
        _check_datetime(node, bad)
        return None
    if kind == "timedelta":
        days, seconds, micro = node.get("days"), node.get("seconds"), node.get("microseconds")
        if (
            fields != {MARK, "days", "seconds", "microseconds"}
            or not all(type(n) is int for n in (days, seconds, micro))
            or not (abs(days) <= 999_999_999 and 0 <= seconds < 86_400 and 0 <= micro < 1_000_000)
        ):
            raise bad("a timedelta node must have exactly normalized integer 'days', 'seconds' and 'microseconds'")
        return None
    child = {"namespace": "attrs", "enum": "value", "dataclass": "fields"}[kind]
    expected = {MARK, child} if kind == "namespace" else {MARK, "class", child}
    if fields != expected or (kind != "namespace" and (type(node["class"]) is not str or _CLASS_NAME.fullmatch(node["class"]) is None)):
        raise bad(f"a {kind} node must have exactly {sorted(expected - {MARK})}, and a class named module:qualname")
    if kind != "enum" and not (type(node[child]) is dict and node[child].get(MARK) in (None, "dict")):
        raise bad(f"a {kind} node's {child!r} must be a dict")
    return node[child]


def _check_datetime(node: dict[str, Any], bad: Callable[[str], ManifestError]) -> None:
    value, offset, name = node.get("value"), node.get("offset"), node.get("tzname")
    if not node.keys() <= {MARK, "value", "offset", "tzname", "fold"} or type(value) is not str or _DATETIME.fullmatch(value) is None:
        raise bad("a datetime node must have a naive ISO 'value' and only 'offset', 'tzname' and 'fold' besides")
    _parse(dt.datetime.fromisoformat, value, bad)
    if "offset" in node and (type(offset) is not int or not -_DAY_US < offset < _DAY_US):
        raise bad("a datetime's 'offset' must be an integer number of microseconds within a day")
    if "tzname" in node and ("offset" not in node or type(name) is not str):
        raise bad("a datetime's 'tzname' must be a string, and only with an 'offset'")
    if "fold" in node and node["fold"] != 1:
        raise bad("a datetime's 'fold' must be 1 (it is left out when 0)")


def _parse(parse: Callable[[str], Any], text: str, bad: Callable[[str], ManifestError]) -> Any:
    try:
        return parse(text)
    except ValueError:
        raise bad(f"not a valid date or time: {text[:40]!r}") from None


# ---------------------------------------------------------------- decoding


def decode(node: dict[str, Any], where: str, child: Callable[[Any], Any], classes: Mapping[str, type]) -> Any:
    """The value of a validated node; ``child`` decodes its nested node; StateError (caller's side) or ManifestError."""
    kind = node[MARK]
    if kind == "path":
        cls = PATH_CLASSES[node["class"]]
        try:
            return cls(node["value"])
        except (NotImplementedError, OSError) as exc:  # a WindowsPath on Linux, a PosixPath on Windows
            raise StateError(f"{where}: a {cls.__name__} cannot be made on this system ({exc}); it loads as a Pure path nowhere else", key=where) from None
    if kind == "date":
        return dt.date.fromisoformat(node["value"])
    if kind == "datetime":
        value = dt.datetime.fromisoformat(node["value"])
        if "offset" in node:
            offset = dt.timedelta(microseconds=node["offset"])
            value = value.replace(tzinfo=dt.timezone(offset, node["tzname"]) if "tzname" in node else dt.timezone(offset))
        return value.replace(fold=1) if node.get("fold") else value
    if kind == "timedelta":
        return dt.timedelta(days=node["days"], seconds=node["seconds"], microseconds=node["microseconds"])
    if kind == "namespace":
        return Namespace(**_string_keys(child(node["attrs"]), where))
    name = node["class"]
    cls = classes.get(name)
    wanted = enum.Enum if kind == "enum" else None
    if cls is None or (wanted is not None and not issubclass(cls, wanted)) or (wanted is None and not dataclasses.is_dataclass(cls)):
        qualname = name.split(":", 1)[1]
        raise StateError(
            f"{where}: holds {'an Enum member' if kind == 'enum' else 'a dataclass'} of {name}; a checkpoint names classes but "
            f"never imports them: pass classes=[{qualname}] to load it",
            key=where,
        )
    if kind == "enum":
        value = child(node["value"])
        try:
            return cls(value)
        except ValueError:
            raise StateError(f"{where}: {name} has no member with value {value!r} (the class changed since the save?)", key=where) from None
    fields = _string_keys(child(node["fields"]), where)
    try:
        return cls(**fields)
    except TypeError as exc:
        raise StateError(f"{where}: {name} cannot be made from the saved fields {sorted(fields)}: {exc}", key=where) from None


def _string_keys(mapping: Any, where: str) -> dict[str, Any]:
    if not isinstance(mapping, dict) or not all(isinstance(k, str) for k in mapping):
        raise ManifestError(f"{where}: malformed state: attributes and fields must be keyed by strings")
    return mapping
