"""Tensor files: plain safetensors on disk, strict header parsing, fuzzing that only ever yields IntegrityError."""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import assert_same
from hypothesis import event, given
from hypothesis import strategies as st
from safetensors import safe_open

import ckstore
from ckstore.format.hashing import hash_bytes
from ckstore.engine.read import read_verified
from ckstore.format.safetensors import DTYPE_NAMES, MAX_HEADER_SIZE, _bulk_specs, _entry_specs, parse_header, tensors_from_buffer

DTYPES = sorted(DTYPE_NAMES, key=str)


def _sample(dtype: torch.dtype, shape=(2, 3)) -> torch.Tensor:
    values = torch.arange(1, 1 + torch.Size(shape).numel(), dtype=torch.float32).reshape(shape) / 4
    return values > 1 if dtype == torch.bool else values.to(dtype)


def _tensor_files(info: ckstore.CheckpointInfo) -> list[str]:
    return [os.path.join(info.path, name) for name in info.files]


def test_every_file_opens_with_plain_safetensors(store):
    state = {
        "model": {f"w_{str(dtype).removeprefix('torch.')}": _sample(dtype) for dtype in DTYPES},
        "zero_d": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "view": torch.arange(12.0).reshape(3, 4).t(),
        "opt": {"state": {0: {"exp_avg": torch.ones(5)}}},
    }
    info = store.save(state, step=7)
    loaded = store.load(step=7)
    seen = {}
    for path in _tensor_files(info):
        plain = safetensors.torch.load_file(path)
        with safe_open(path, framework="pt") as fh:
            assert set(fh.keys()) == set(plain)
            for key in fh.keys():
                assert_same(fh.get_tensor(key), plain[key])
        seen.update({(os.path.basename(path), k): v for k, v in plain.items()})
    # Every tensor of the state is in some file, with equal dtype, shape and bytes.
    flat = [loaded["zero_d"], loaded["empty"], loaded["view"], loaded["opt"]["state"][0]["exp_avg"], *loaded["model"].values()]
    assert len(seen) == len(flat)
    assert sorted(map(_signature, seen.values())) == sorted(map(_signature, flat))


def _signature(tensor: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    flat = tensor.clone(memory_format=torch.contiguous_format).reshape(-1)
    return str(tensor.dtype), tuple(tensor.shape), bytes(flat.view(torch.uint8).numpy()) if flat.numel() else b""


@given(
    shapes=st.lists(st.lists(st.integers(0, 5), max_size=3), min_size=1, max_size=6),
    dtype_index=st.lists(st.integers(0, len(DTYPES) - 1), min_size=6, max_size=6),
)
def test_written_files_equal_safetensors_reading(fast_root, shapes, dtype_index):
    root = Path(tempfile.mkdtemp(dir=fast_root))
    state = {f"t{i}": _sample(DTYPES[dtype_index[i]], tuple(shape)) for i, shape in enumerate(shapes)}
    with ckstore.Store(root / "s") as store:
        info = store.save(state, step=0)
    plain = {}
    for path in _tensor_files(info):
        plain.update(safetensors.torch.load_file(path))
    assert sorted(plain) == sorted(state)
    for key, tensor in state.items():
        assert_same(plain[key], tensor, key)


def test_unchanged_part_is_byte_identical_between_checkpoints(store, make_model):
    frozen = make_model(seed=0)
    trained = make_model(seed=1)
    a = store.save({"frozen": frozen, "trained": trained}, step=1)
    with torch.no_grad():
        trained[0].weight.add_(1)
    b = store.save({"frozen": frozen, "trained": trained}, step=2)
    frozen_files = [n for n in a.files if n.startswith("frozen")]
    assert frozen_files
    for name in frozen_files:
        assert a.files[name] == b.files[name]
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes()
    assert any(a.files[n] != b.files[n] for n in a.files if n.startswith("trained"))


# ---------------------------------------------------------------- crafted headers


def _file(header: object, data: bytes = b"", *, raw: bytes | None = None, length: int | None = None) -> bytes:
    body = raw if raw is not None else json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def _ok_entry(begin=0, end=16, dtype="F32", shape=(4,)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


BAD_FILES = {
    "empty": b"",
    "short": b"\x08\x00\x00",
    "huge_length": struct.pack("<Q", 2**63) + b"{}",
    "over_cap": struct.pack("<Q", MAX_HEADER_SIZE + 1) + b"{}" + b" " * 6,
    "past_eof": _file({}, length=1000),
    "not_json": _file(None, raw=b"{not json"),
    "not_utf8": _file(None, raw=b'{"\xff\xfe": 1}'),
    "list_json": _file([1, 2]),
    "string_json": _file("x"),
    "huge_int": _file(None, raw=b'{"a":{"dtype":"F32","shape":[' + b"1" * 5000 + b'],"data_offsets":[0,4]}}', data=b"\0" * 4),
    "deep_json": _file(None, raw=b"[" * 100_000 + b"]" * 100_000),
    "bad_dtype": _file({"a": _ok_entry(dtype="F33")}, b"\0" * 16),
    "dtype_not_string": _file({"a": _ok_entry(dtype=4)}, b"\0" * 16),
    "shape_mismatch": _file({"a": _ok_entry(shape=(5,))}, b"\0" * 16),
    "negative_shape": _file({"a": _ok_entry(shape=(-4,))}, b"\0" * 16),
    "float_shape": _file({"a": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}}, b"\0" * 16),
    "bool_offsets": _file({"a": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, b"\0"),
    "reversed_offsets": _file({"a": _ok_entry(begin=16, end=0)}, b"\0" * 16),
    "overlap": _file({"a": _ok_entry(0, 16), "b": _ok_entry(8, 24)}, b"\0" * 24),
    "gap": _file({"a": _ok_entry(0, 16), "b": _ok_entry(20, 36)}, b"\0" * 36),
    "offset_past_data": _file({"a": _ok_entry(0, 16)}, b"\0" * 8),
    "trailing_data": _file({"a": _ok_entry(0, 16)}, b"\0" * 24),
    "missing_field": _file({"a": {"dtype": "F32", "shape": [4]}}, b"\0" * 16),
    "extra_field": _file({"a": {**_ok_entry(), "x": 1}}, b"\0" * 16),
    "entry_not_dict": _file({"a": [1, 2, 3]}, b"\0" * 16),
    "metadata_not_dict": _file({"__metadata__": ["x"], "a": _ok_entry()}, b"\0" * 16),
    "metadata_non_string": _file({"__metadata__": {"k": 1}, "a": _ok_entry()}, b"\0" * 16),
    "shape_overflow": _file({"a": {"dtype": "F64", "shape": [2**62, 2**62], "data_offsets": [0, 0]}}),
}


@pytest.mark.guarantee("G3")
@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_parse_header_rejects_crafted_files(name):
    data = BAD_FILES[name]
    with pytest.raises(ckstore.IntegrityError) as excinfo:
        specs, start = parse_header(data, len(data), f"/x/{name}.safetensors")
        tensors_from_buffer(bytearray(data), f"/x/{name}.safetensors")
    assert excinfo.value.path == f"/x/{name}.safetensors"


def test_parse_header_accepts_what_safetensors_writes():
    tensors = {"a": torch.arange(4.0), "b": torch.zeros(0, 3, dtype=torch.int8), "c": torch.tensor(True)}
    data = safetensors.torch.save(tensors, metadata={"k": "v"})
    specs, start = parse_header(data, len(data), "x")
    assert set(specs) == set(tensors)
    loaded = tensors_from_buffer(bytearray(data), "x")
    for key in tensors:
        assert_same(loaded[key], tensors[key])


# ---------------------------------------------------------------- fuzzing

_VALID = safetensors.torch.save(
    {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.arange(3, dtype=torch.int16), "e": torch.zeros(0)},
    metadata={"format": "pt"},
)


# What ckstore refuses although safetensors accepts it: the only two ways ckstore's parser is stricter. An entry with
# a field safetensors ignores could be a newer format ckstore would misread; a dtype with no torch dtype (F8_E8M0,
# F4) cannot be loaded into a tensor. Any other disagreement fails the fuzz tests below.
_STRICTER_THAN_SAFETENSORS = ("entry must have exactly dtype, shape, data_offsets", "unknown dtype")


def _ckstore_view(data: bytes) -> dict | ckstore.IntegrityError:
    """What ckstore's parser makes of ``data``: each tensor's dtype name, shape and bytes, or its refusal."""
    try:
        specs, start = parse_header(data, len(data), "fuzz")
        tensors = tensors_from_buffer(bytearray(data), "fuzz")
    except ckstore.IntegrityError as exc:  # anything else escapes and fails the test
        return exc
    assert list(tensors) == list(specs)
    view = {}
    for key, spec in specs.items():
        assert tensors[key].dtype == spec.dtype and tuple(tensors[key].shape) == spec.shape, key
        assert tensors[key].untyped_storage().nbytes() >= spec.end - spec.begin, key
        view[key] = (DTYPE_NAMES[spec.dtype], spec.shape, bytes(data[start + spec.begin : start + spec.end]))
    return view


def _safetensors_view(data: bytes) -> dict | Exception:
    """What safetensors' own parser (the Rust one behind ``safe_open`` and ``safetensors.torch.load``) makes of ``data``."""
    try:
        entries = safetensors.deserialize(data)
    except Exception as exc:  # noqa: BLE001 - its refusal, whatever its type
        return exc
    return {name: (entry["dtype"], tuple(entry["shape"]), bytes(entry["data"])) for name, entry in entries}


def _agrees_with_safetensors(data: bytes) -> None:
    """ckstore accepts what safetensors accepts, with the same names, dtypes, shapes and bytes (so the same offsets),
    and refuses what safetensors refuses, always with IntegrityError; it may refuse more only by a rule in
    ``_STRICTER_THAN_SAFETENSORS``."""
    ours, theirs = _ckstore_view(data), _safetensors_view(data)
    event("accepted by both" if isinstance(ours, dict) and isinstance(theirs, dict) else "refused by ckstore" if isinstance(theirs, dict) else "refused by both" if not isinstance(ours, dict) else "accepted by ckstore only")
    if isinstance(ours, dict):
        assert isinstance(theirs, dict), f"ckstore accepted a file safetensors refuses ({theirs}): {data[:200]!r}"
        assert ours == theirs
        loaded = safetensors.torch.load(data)
        tensors = tensors_from_buffer(bytearray(data), "fuzz")
        for key in ours:
            assert_same(tensors[key], loaded[key], key)
    elif isinstance(theirs, dict):
        assert any(rule in ours.actual for rule in _STRICTER_THAN_SAFETENSORS), f"ckstore refused ({ours.actual}) a file safetensors accepts: {data[:200]!r}"


@pytest.mark.guarantee("G3")
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes_agree_with_safetensors(data):
    _agrees_with_safetensors(data)


@pytest.mark.guarantee("G3")
@given(
    edits=st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.none() | st.integers(0, len(_VALID)),
)
def test_fuzz_mutated_valid_file_agrees_with_safetensors(edits, cut):
    data = bytearray(_VALID)
    for position, value in edits:
        data[position] = value
    if cut is not None:
        data = data[:cut]
    _agrees_with_safetensors(bytes(data))


@pytest.mark.guarantee("G3")
@given(header=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=10),
       extra=st.binary(max_size=40))
def test_fuzz_json_headers_agree_with_safetensors(header, extra):
    _agrees_with_safetensors(_file(None, extra, raw=json.dumps(header).encode()))


_ENTRY_DEFECTS = st.sampled_from(["dtype", "dtype_int", "shape_neg", "shape_bool", "shape_float", "offsets_len", "offsets_bool",
                                   "offsets_neg", "size", "extra_field", "missing_field", "not_dict"])


def _entry(dtype: str, shape: list[int], begin: int, defect: str) -> object:
    itemsize = {"F32": 4, "I8": 1, "BF16": 2, "BOOL": 1, "F8_E4M3": 1, "F8_E8M0": 1, "C64": 8, "F64": 8}[dtype]
    end = begin + itemsize * math.prod(shape)
    entry: dict = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
    if defect == "dtype":
        entry["dtype"] = "F33"
    elif defect == "dtype_int":
        entry["dtype"] = 4
    elif defect == "shape_neg":
        entry["shape"] = [-2]
    elif defect == "shape_bool":
        entry["shape"] = [True, 2]
    elif defect == "shape_float":
        entry["shape"] = [2.0]
    elif defect == "offsets_len":
        entry["data_offsets"] = [begin, end, end]
    elif defect == "offsets_bool":
        entry["data_offsets"] = [False, True] if begin == 0 else [begin, True]
    elif defect == "offsets_neg":
        entry["data_offsets"] = [-1, end]
    elif defect == "size":
        entry["data_offsets"] = [begin, end + 1]
    elif defect == "extra_field":
        entry["x"] = 1
    elif defect == "missing_field":
        del entry["shape"]
    elif defect == "not_dict":
        return [dtype, shape, begin]
    return entry


def _near_valid_file(plan, defect, where, shuffle, metadata, slack, pad) -> bytes:
    """A file whose header lists ``plan``'s tensors (one of them with ``defect``) in any order, over data of the right
    size give or take ``slack``; ``pad``: the header's padding (None: spaces to a multiple of 8, as writers do)."""
    header: dict = {} if metadata is None else {"__metadata__": metadata}
    entries, position = [], 0
    for i, (dtype, shape, nudge) in enumerate(plan):
        begin = max(0, position + nudge)  # a nudge makes a gap or an overlap
        entry = _entry(dtype, shape, begin, defect if i == where else "none")
        entries.append((f"t{i}", entry))
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        position = offsets[1] if offsets and type(offsets[1]) is int else position
    shuffle.shuffle(entries)
    header.update(entries)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8) if pad is None else pad
    size = max(0, position + slack)
    return struct.pack("<Q", len(body)) + body + (bytes(range(251)) * (size // 251 + 1))[:size]


@pytest.mark.guarantee("G3")
@given(
    plan=st.lists(
        st.tuples(st.sampled_from(["F32", "I8", "BF16", "BOOL", "F8_E4M3", "F8_E8M0", "C64", "F64"]),
                  st.sampled_from([[], [0], [2], [1, 2], [3, 0]]), st.sampled_from([0, 0, 0, -1, 1])),
        max_size=5,
    ),
    defect=st.just("none") | _ENTRY_DEFECTS,
    where=st.integers(0, 4),
    shuffle=st.randoms(use_true_random=False),
    metadata=st.sampled_from([None, None, {"k": "v"}, {"k": 1}, ["x"]]),
    slack=st.sampled_from([0, 0, 0, -1, 1]),
    pad=st.sampled_from([None, None, b"", b" ", b"\n", b"\x00"]),
)
def test_fuzz_near_valid_headers_agree_with_safetensors(plan, defect, where, shuffle, metadata, slack, pad):
    """Headers one defect away from valid (random bytes and random JSON are almost never valid, so they cannot show
    that ckstore accepts what it should and reads the same tensors safetensors reads)."""
    _agrees_with_safetensors(_near_valid_file(plan, defect, where, shuffle, metadata, slack, pad))


@given(
    plan=st.lists(
        st.tuples(st.sampled_from(["F32", "I8", "BF16"]), st.sampled_from([[], [0], [2], [1, 2], [3, 0]]), st.sampled_from([0, 0, 0, -1, 1])),
        max_size=5,
    ),
    defect=st.just("none") | _ENTRY_DEFECTS,
    where=st.integers(0, 4),
    shuffle=st.randoms(use_true_random=False),
    metadata=st.sampled_from([None, None, {"k": "v"}, {"k": 1}, ["x"]]),
    slack=st.sampled_from([0, 0, 0, -1, 1]),
)
def test_bulk_header_checks_accept_exactly_what_entry_checks_accept(plan, defect, where, shuffle, metadata, slack):
    """The column-wise checks agree with the entry-by-entry ones on near-valid headers: the same specs, in data order, or a refusal."""
    header: dict = {} if metadata is None else {"__metadata__": metadata}
    entries, position = [], 0
    for i, (dtype, shape, nudge) in enumerate(plan):
        begin = max(0, position + nudge)  # a nudge makes a gap or an overlap
        entry = _entry(dtype, shape, begin, defect if i == where else "none")
        entries.append((f"t{i}", entry))
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        position = offsets[1] if offsets and type(offsets[1]) is int else position
    shuffle.shuffle(entries)  # any order in the header: the data order is what counts
    header.update(entries)
    data_size = max(0, position + slack)

    def bad(reason: str) -> ckstore.IntegrityError:
        return ckstore.IntegrityError(reason, path="x")

    bulk = _bulk_specs(header, data_size)
    try:
        expected = _entry_specs(header, data_size, bad)
    except ckstore.IntegrityError:
        assert bulk is None
        return
    assert bulk is not None
    assert list(bulk.items()) == list(expected.items())
    assert [spec.begin for spec in bulk.values()] == sorted(spec.begin for spec in bulk.values())


def test_parse_header_returns_specs_in_data_order():
    """A header listing its tensors out of data order (other writers do) parses, and comes back in data order."""
    header = {"b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              "z": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}}
    data = _file(header, b"\0" * 12)
    specs, _ = parse_header(data, len(data), "x")
    assert list(specs) == ["a", "z", "b"]
    assert specs["b"].shape == (2,) and specs["b"].dtype == torch.float32


# ---------------------------------------------------------------- verified reads


def test_read_verified_checks_size_hash_and_kind(tmp_path):
    path = tmp_path / "f.safetensors"
    path.write_bytes(_VALID)
    good = hash_bytes(_VALID)
    assert bytes(read_verified(str(path), size=len(_VALID), expected=good)) == _VALID
    with pytest.raises(ckstore.IntegrityError) as excinfo:
        read_verified(str(path), size=len(_VALID) + 1, expected=good)
    assert excinfo.value.expected == len(_VALID) + 1 and excinfo.value.actual == len(_VALID)
    with pytest.raises(ckstore.IntegrityError) as excinfo:
        read_verified(str(path), size=len(_VALID), expected=hash_bytes(b"other"))
    assert excinfo.value.actual == str(good)
    with pytest.raises(ckstore.IntegrityError):
        read_verified(str(tmp_path / "missing"), size=1, expected=good)
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    with pytest.raises(ckstore.IntegrityError):
        read_verified(str(link), size=len(_VALID), expected=good)
    with pytest.raises(ckstore.IntegrityError):
        read_verified(str(tmp_path), size=0, expected=None)
