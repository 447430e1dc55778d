"""The values beyond plain JSON a state may hold (ckstore.format.extra_types): paths, Namespace, dates, Enum members,
OrderedDict, dataclasses. Each round-trips exactly, without pickle; Enum and dataclass classes are re-created only from
classes the caller passes, never imported by the name a checkpoint holds."""

from __future__ import annotations

import dataclasses
import enum
import json
import subprocess
import sys
import textwrap
from argparse import Namespace
from collections import OrderedDict
from datetime import date, datetime, timedelta, timezone
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ckstore
from ckstore.format.skeleton import check_skeleton
from conftest import PYTHON, REPO_ROOT, subprocess_env


class Color(enum.Enum):
    RED = "red"
    BLUE = (2, 3)


class Level(enum.IntEnum):
    LOW = 1


class Perm(enum.Flag):
    R = 4
    W = 2


@dataclasses.dataclass(frozen=True)
class Cfg:
    depth: int
    name: str = "x"
    tags: tuple = ()
    computed: int = dataclasses.field(default=0, init=False)


CLASSES = [Color, Level, Perm, Cfg]


def _values() -> dict:
    return {
        "path": Path("/data/run 1/ö.txt"),
        "pure": PurePosixPath("a/b"),
        "win": PureWindowsPath(r"C:\data\x"),
        "ns": Namespace(lr=0.1, out=Path("o"), nested=Namespace(a=[1, 2])),
        "day": date(1, 1, 1),
        "naive": datetime(2026, 12, 2, 9, 30, 1, 5),
        "utc": datetime(2026, 12, 2, tzinfo=timezone.utc),
        "named": datetime(2026, 3, 29, 1, 30, tzinfo=timezone(timedelta(hours=-3, minutes=-30), "NST"), fold=1),
        "span": timedelta(days=-2, seconds=5, microseconds=7),
        "color": Color.BLUE,
        "level": Level.LOW,
        "flags": Perm.R | Perm.W,
        "odict": OrderedDict([("z", 1), ("a", OrderedDict([("y", torch.ones(2)), ("b", None)]))]),
        "sorted_odict": OrderedDict([("a", 1), ("b", 2)]),
        "cfg": Cfg(3, "y", (Color.RED, date(2000, 2, 29))),
        "mixed": [Cfg(1), {"when": timedelta(0)}, (Path("."),)],
    }


def _assert_exact(actual, expected, path="state"):
    assert type(actual) is type(expected), f"{path}: {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), path
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{path}: key order {list(actual)} != {list(expected)}"
        for key in expected:
            _assert_exact(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_exact(a, e, f"{path}[{i}]")
    elif isinstance(expected, Namespace):
        _assert_exact(vars(actual), vars(expected), f"{path}.vars")
    elif dataclasses.is_dataclass(expected):
        _assert_exact(dataclasses.asdict(actual), dataclasses.asdict(expected), f"{path}.fields")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"
        if isinstance(expected, datetime):
            assert (actual.tzinfo, actual.fold, actual.tzname()) == (expected.tzinfo, expected.fold, expected.tzname()), path


def test_every_type_round_trips_exactly(store):
    values = _values()
    store.save(values, step=1)
    _assert_exact(store.load(step=1, classes=CLASSES), values)
    assert store.verify() == []


def test_values_restore_into_a_target_by_assignment(store):
    values = _values()
    store.save(values, step=1)
    target = {key: None for key in values}
    target.update(path=Path("old"), color=Color.RED, level=Level.LOW, cfg=Cfg(0), day=date(1999, 1, 1))
    store.load(target, step=1, classes=CLASSES)
    _assert_exact(target, values)


def test_a_class_not_passed_is_refused_with_the_key_and_no_fallback(store):
    store.save({"a": 1}, step=1)
    store.save({"hp": {"cfg": Cfg(2)}}, step=2)
    with pytest.raises(ckstore.StateError, match=r"state\['hp'\]\['cfg'\].*test_extra_types:Cfg.*classes=\[Cfg\]") as caught:
        store.load()  # the newest: refused at once, not skipped in favour of step 1
    assert caught.value.key == "state['hp']['cfg']"
    with pytest.raises(ckstore.StateError, match="Enum member"):
        store.save({"c": Color.RED}, step=3)
        store.load(step=3, classes=[Cfg])
    assert store.verify() == []  # a refusal says nothing about the checkpoint
    assert store.load(step=2, classes=[Cfg])["hp"]["cfg"] == Cfg(2)


def test_checkpoint_class_names_are_never_imported(tmp_path):
    """A class name in a checkpoint is looked up among the classes passed, never imported: loading runs no code from it."""
    (tmp_path / "planted.py").write_text(
        textwrap.dedent(
            """
            import enum, pathlib
            pathlib.Path(__file__).with_name("IMPORTED").write_text("code ran")
            class Evil(enum.Enum):
                X = 1
            """
        )
    )
    script = textwrap.dedent(
        """
        import sys, json, ckstore
        sys.path.insert(0, sys.argv[1])
        if sys.argv[2] == "save":
            import planted
            with ckstore.Store(sys.argv[1] + "/s") as store:
                store.save({"x": planted.Evil.X}, step=1)
        else:
            with ckstore.Store(sys.argv[1] + "/s", readonly=True) as store:
                try:
                    store.load(step=1)
                except ckstore.StateError as exc:
                    print(json.dumps({"error": str(exc), "imported": "planted" in sys.modules}))
        """
    )
    run = lambda mode: subprocess.run([PYTHON, "-c", script, str(tmp_path), mode], env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True)  # noqa: E731
    run("save")
    (tmp_path / "IMPORTED").unlink()
    result = json.loads(run("load").stdout)
    assert "planted:Evil" in result["error"] and result["imported"] is False
    assert not (tmp_path / "IMPORTED").exists()


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (datetime(2026, 1, 1, tzinfo=__import__("zoneinfo").ZoneInfo("Europe/Berlin")), "fixed offsets"),
        (type("MyPath", (type(Path()),), {})("x"), "pathlib subclass"),
        ({1, 2}, "cannot store a value of type builtins.set"),
    ],
)
def test_unsupported_values_are_refused_on_save_naming_the_key(store, value, match):
    with pytest.raises(ckstore.StateError, match=match) as caught:
        store.save({"hp": {"v": value}}, step=1)
    assert caught.value.key == "state['hp']['v']"
    assert store.checkpoints() == []


@pytest.mark.parametrize("classes", [[int], "Color", [Color, object], Color])
def test_classes_must_be_enum_or_dataclass_types(store, classes):
    store.save({"a": 1}, step=1)
    with pytest.raises(ckstore.InvalidArgumentError, match="classes"):
        store.load(step=1, classes=classes)


def test_a_module_state_keeps_the_dict_form_and_a_saved_state_dict_loads_as_ordered(store):
    model = torch.nn.Linear(2, 2)
    store.save({"m": model, "sd": model.state_dict()}, step=1)
    manifest = json.loads((store.resolve(1).path / "manifest.json").read_text())
    assert "odict" not in json.dumps(manifest["state"]["m"])  # readable by earlier versions, as before
    assert manifest["state"]["sd"]["$ck"] == "odict"
    loaded = store.load(step=1)
    assert type(loaded["sd"]) is OrderedDict and list(loaded["sd"]) == ["weight", "bias"]
    other = torch.nn.Linear(2, 2)
    store.load({"sd": other}, step=1)  # a module loads a checkpoint saved from its state_dict()
    assert torch.equal(other.weight, model.weight)


@given(
    when=st.datetimes(timezones=st.none() | st.timezones().filter(lambda tz: type(tz) is timezone) | st.builds(timezone, st.timedeltas(min_value=timedelta(hours=-23), max_value=timedelta(hours=23)))),
    span=st.timedeltas(),
    day=st.dates(),
)
def test_dates_round_trip_property(tmp_path_factory, when, span, day):
    with ckstore.Store(tmp_path_factory.mktemp("s")) as store:
        store.save({"when": when, "span": span, "day": day}, step=1)
        _assert_exact(store.load(step=1), {"when": when, "span": span, "day": day})


@pytest.mark.parametrize(
    "node",
    [
        {"$ck": "path", "class": "os.system", "value": "x"},
        {"$ck": "path", "class": "PosixPath", "value": 3},
        {"$ck": "path", "class": {}, "value": "x"},
        {"$ck": {}, "value": "x"},
        {"$ck": ["date"], "value": "2020-01-01"},
        {"$ck": "enum", "class": {}, "value": 1},
        {"$ck": "datetime", "value": {}},
        {"$ck": "date", "value": []},
        {"$ck": "date", "value": "2020-13-01"},
        {"$ck": "date", "value": "2020-1-1"},
        {"$ck": "datetime", "value": "2020-01-01T00:00:00+01:00"},
        {"$ck": "datetime", "value": "2020-01-01T00:00:00.000000", "offset": 86_400_000_000},
        {"$ck": "datetime", "value": "2020-01-01T00:00:00.000000", "tzname": "X"},
        {"$ck": "datetime", "value": "2020-01-01T00:00:00.000000", "fold": 0},
        {"$ck": "timedelta", "days": 0, "seconds": 86_400, "microseconds": 0},
        {"$ck": "timedelta", "days": 10**10, "seconds": 0, "microseconds": 0},
        {"$ck": "enum", "class": "os; import x", "value": 1},
        {"$ck": "enum", "class": "mod:Cls"},
        {"$ck": "dataclass", "class": "mod:Cls", "fields": [1]},
        {"$ck": "namespace", "attrs": {"$ck": "odict", "items": []}},
        {"$ck": "dict", "items": [[{"$ck": "date", "value": "2020-01-01"}, 1]]},
    ],
)
def test_malformed_nodes_are_manifest_errors(node):
    with pytest.raises(ckstore.ManifestError, match="malformed state"):
        check_skeleton({"v": node})


def test_namespace_with_non_string_keys_is_a_manifest_error(store):
    # Valid to the schema (a dict node), wrong for a Namespace: the decoder says so with a ManifestError.
    from ckstore.state.decode import decode_state

    with pytest.raises(ckstore.ManifestError, match="keyed by strings"):
        decode_state({"$ck": "namespace", "attrs": {"$ck": "dict", "items": [[1, 2]]}}, lambda f, k: None)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["$ck", "items", "value", "class", "x"]), inner, max_size=3),
    max_leaves=8,
)
_FIELDS = ["class", "value", "attrs", "fields", "offset", "tzname", "fold", "days", "seconds", "microseconds", "items"]
_GOOD = {"class": "PosixPath", "value": "2020-01-01", "days": 1, "seconds": 2, "microseconds": 3, "offset": 3_600_000_000, "attrs": {}, "fields": {}}


@given(
    kind=st.sampled_from(["path", "namespace", "date", "datetime", "timedelta", "enum", "dataclass", "odict"]) | _json,
    fields=st.dictionaries(st.sampled_from(_FIELDS), _json | st.sampled_from(list(_GOOD.values())), max_size=4),
)
def test_crafted_nodes_give_only_typed_errors(kind, fields):
    """Whatever a crafted manifest puts in these nodes: check_skeleton accepts it or raises ManifestError, and decoding
    what it accepts raises nothing untyped (the manifest fuzz of fault_injection found a TypeError here once)."""
    from ckstore.state.decode import decode_state

    skeleton = {"v": {"$ck": kind, **fields}}
    try:
        check_skeleton(skeleton)
    except ckstore.ManifestError:
        return
    try:
        decode_state(skeleton, lambda file, key: torch.zeros(1), classes={"mod:Cls": Color})
    except ckstore.CkstoreError:
        pass
