"""Tensor files: plain safetensors on disk, strict header parsing, fuzzing that only ever yields IntegrityError."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import assert_same
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open

import ckstore
from ckstore._hashing import hash_bytes
from ckstore._tensorfile import DTYPE_NAMES, MAX_HEADER_SIZE, parse_header, read_verified, tensors_from_buffer

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


def _parse_everything(data: bytes) -> None:
    parse_header(data, len(data), "fuzz")
    tensors_from_buffer(bytearray(data), "fuzz")


@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes_only_integrity_error(data):
    try:
        _parse_everything(data)
    except ckstore.IntegrityError:
        pass


@given(
    edits=st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.none() | st.integers(0, len(_VALID)),
)
def test_fuzz_mutated_valid_file_only_integrity_error(edits, cut):
    data = bytearray(_VALID)
    for position, value in edits:
        data[position] = value
    if cut is not None:
        data = data[:cut]
    try:
        _parse_everything(bytes(data))
    except ckstore.IntegrityError:
        pass


@given(header=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=10),
       extra=st.binary(max_size=40))
def test_fuzz_json_headers_only_integrity_error(header, extra):
    raw = json.dumps(header).encode()
    try:
        _parse_everything(_file(None, extra, raw=raw))
    except ckstore.IntegrityError:
        pass


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
