"""manifest.json: canonical print/parse round trip, tamper detection, version and path-safety checks."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ckstore
from ckstore.format.hashing import HashInfo, hash_bytes
from ckstore.format.chunks import ChunkedHash, chunk_count
from ckstore.format.manifest import FileEntry, Manifest, check_metrics, parse_manifest

file_names = st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9_~#-]{0,20}(\.[A-Za-z0-9_~#-]{1,12}){0,2}\Z").filter(lambda n: n != "manifest.json")
hashes = st.builds(HashInfo, st.sampled_from(["blake3", "sha256"]), st.text("0123456789abcdef", min_size=64, max_size=64))
finite = st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | finite | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6).filter(lambda k: k != "$ck"), c, max_size=3),
    max_leaves=10,
)


@st.composite
def chunked_entries(draw):
    """A format-2 entry: a chunk table of the right length, and the root over it as the hash."""
    chunk_size = 1 << draw(st.integers(20, 24))
    size = draw(st.integers(0, 40 * chunk_size))
    digests = tuple(draw(st.binary(min_size=32, max_size=32)) for _ in range(chunk_count(size, chunk_size)))
    table = ChunkedHash(draw(st.sampled_from(["blake3", "sha256"])), size, chunk_size, digests)
    return FileEntry(size, table.root, table)


@st.composite
def manifests(draw):
    version = draw(st.sampled_from([1, 2]))
    entries = st.builds(FileEntry, st.integers(0, 2**50), hashes) if version == 1 else chunked_entries()
    files = draw(st.dictionaries(file_names, entries, max_size=4))
    state = draw(json_values)
    if files and draw(st.booleans()):
        name = draw(st.sampled_from(sorted(files)))
        state = {"model": state, "w": {"$ck": "tensor", "file": name, "key": "w"}}
    return Manifest(
        step=draw(st.integers(0, 2**63 - 1)),
        created=draw(st.floats(0, 4e9)),
        files=files,
        state=state,
        metrics=draw(st.dictionaries(st.text(min_size=1, max_size=8), st.integers(-(10**6), 10**6) | finite, max_size=3)),
        retention=draw(st.none() | st.fixed_dictionaries({"metric": st.text(min_size=1, max_size=8), "mode": st.sampled_from(["min", "max"])})),
        format_version=version,
    )


def _signed(raw: dict) -> bytes:
    """Canonical bytes of ``raw`` with a correct checksum: tampering that a checksum alone would not catch."""
    body = {k: v for k, v in raw.items() if k != "checksum"}
    canonical = lambda obj: json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()  # noqa: E731
    body["checksum"] = str(hash_bytes(canonical(body)))
    return canonical(body)


def _valid_raw() -> dict:
    manifest = Manifest(
        step=12,
        created=1764100000.25,
        files={"model.fc.safetensors": FileEntry(4216, hash_bytes(b"x"))},
        state={"model": {"$ck": "tensor", "file": "model.fc.safetensors", "key": "w"}, "lr": 1e-05, "note": "é"},
        metrics={"val_loss": 0.3125, "acc": 1e-05},
        retention={"metric": "val_loss", "mode": "min"},
        format_version=1,  # a format-1 manifest (still read); format 2 is covered by test_checksummed's second document
    )
    return json.loads(manifest.to_json())


@given(manifest=manifests())
def test_print_parse_round_trip_is_identity(manifest):
    data = manifest.to_json()
    parsed = parse_manifest(data)
    assert parsed == manifest
    assert parsed.to_json() == data


@given(manifest=manifests())
def test_manifest_json_is_canonical(manifest):
    data = manifest.to_json()
    raw = json.loads(data, parse_constant=lambda name: pytest.fail(f"manifest holds {name}"))
    assert data == json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    assert raw["format"] == "ckstore.checkpoint" and raw["format_version"] == manifest.format_version
    assert raw["checksum"].split(":")[0] in ("blake3", "sha256")


def test_truncation_and_garbage_are_refused():
    data = _signed(_valid_raw())
    for cut in range(0, len(data), 7):
        with pytest.raises((ckstore.ManifestError, ckstore.IntegrityError)):
            parse_manifest(data[:cut])
    for junk in (b"", b"\x00" * 64, b"\xff\xfe", b"[]", b"null", b'"x"', b"{}", b"NaN", data + b" ", b" " + data, data + b"\n"):
        with pytest.raises((ckstore.ManifestError, ckstore.IntegrityError)):
            parse_manifest(junk)


@pytest.mark.parametrize("version", [0, 3, 99, "1", 1.0, None, True])
def test_unknown_format_version_is_refused(version):
    raw = _valid_raw()
    raw["format_version"] = version
    with pytest.raises(ckstore.ManifestError, match="format_version"):
        parse_manifest(_signed(raw))


@pytest.mark.parametrize(
    "name",
    ["../x", "../../etc/passwd", "/etc/passwd", "a/b", "..", ".", "", ".hidden", "manifest.json", "x\x00y", "a\\b", "-rf", "x" * 300, "a..b", "a.safetensors\n"],
)
def test_unsafe_file_names_are_refused(name):
    raw = _valid_raw()
    raw["files"] = {name: {"hash": str(hash_bytes(b"x")), "size": 1}}
    raw["state"] = {"w": {"$ck": "tensor", "file": name, "key": "w"}}
    with pytest.raises(ckstore.ManifestError, match="file name"):
        parse_manifest(_signed(raw))


@pytest.mark.parametrize(
    "field, value",
    [
        ("step", -1),
        ("step", 1.5),
        ("step", True),
        ("created", "yesterday"),
        ("created", 10**400),
        ("metrics", {"loss": "low"}),
        ("metrics", {"loss": 10**400}),
        ("metrics", []),
        ("retention", {"metric": "x", "mode": "median"}),
        ("files", []),
        ("files", {"a.safetensors": {"hash": "md5:00", "size": 1}}),
        ("files", {"a.safetensors": {"hash": str(hash_bytes(b"")) + "\n", "size": 1}}),
        ("files", {"a.safetensors": {"hash": str(hash_bytes(b"")), "size": -1}}),
        ("state", {"w": {"$ck": "tensor", "file": "other.safetensors", "key": "w"}}),
        ("extra", 1),
    ],
)
def test_malformed_fields_are_refused(field, value):
    raw = _valid_raw()
    raw[field] = value
    with pytest.raises(ckstore.ManifestError):
        parse_manifest(_signed(raw))


def test_missing_fields_and_checksum_are_refused():
    for field in ("step", "files", "checksum", "state", "created"):
        raw = _valid_raw()
        del raw[field]
        data = json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() if field == "checksum" else _signed(raw)
        with pytest.raises(ckstore.ManifestError):
            parse_manifest(data)


def test_lone_surrogate_escape_is_a_manifest_error():
    raw = _valid_raw()
    data = _signed(raw).replace(b'"note":"\xc3\xa9"', b'"note":"\\ud800"')
    with pytest.raises(ckstore.ManifestError):
        parse_manifest(data)


@pytest.mark.parametrize("bad", [{"m": float("nan")}, {"m": float("inf")}, {"m": -float("inf")}, {"m": 10**400}, {"m": "1"}, {"m": True},
                                 {"": 1.0}, {1: 1.0}, {"m": torch.ones(2)}, {"\ud800": 1.0}, [("m", 1.0)]])
def test_check_metrics_refuses_bad_values(bad):
    with pytest.raises(ckstore.InvalidArgumentError):
        check_metrics(bad)


def test_check_metrics_accepts_scalars():
    import numpy as np

    assert check_metrics({"a": torch.tensor(0.5), "b": np.float32(0.25), "c": 3}) == {"a": 0.5, "b": 0.25, "c": 3}


# ---------------------------------------------------------------- in a store


def test_manifest_listing_paths_outside_the_checkpoint_is_refused_by_the_store(store, tmp_path):
    info = store.save({"w": torch.ones(3)}, step=1)
    secret = tmp_path / "secret.safetensors"
    shutil.copy(info.path / next(iter(info.files)), secret)
    raw = json.loads((info.path / "manifest.json").read_bytes())
    name = next(iter(raw["files"]))
    evil = os.path.relpath(secret, info.path)
    raw["files"] = {evil: raw["files"][name]}
    raw["state"]["w"]["file"] = evil
    os.chmod(info.path / "manifest.json", 0o644)
    (info.path / "manifest.json").write_bytes(_signed(raw))
    with pytest.raises(ckstore.ManifestError):
        store.load(step=1)
    problems = store.verify(1)
    assert problems and "unsafe" in problems[0].message


def test_symlinked_tensor_file_is_refused(store):
    info = store.save({"w": torch.ones(3)}, step=1)
    name = next(iter(info.files))
    real = info.path.parent.parent / "elsewhere.safetensors"
    os.replace(info.path / name, real)
    os.symlink(real, info.path / name)  # same bytes, but through a link
    with pytest.raises(ckstore.IntegrityError) as excinfo:
        store.load(step=1)
    assert excinfo.value.path == str(info.path / name)
    assert [p.path for p in store.verify(1)] == [str(info.path / name)]


def test_symlinked_manifest_is_refused(store):
    info = store.save({"w": torch.ones(3)}, step=1)
    real = info.path.parent.parent / "elsewhere.json"
    os.replace(info.path / "manifest.json", real)
    os.symlink(real, info.path / "manifest.json")
    with pytest.raises((ckstore.ManifestError, ckstore.IntegrityError)):
        store.load(step=1)
    assert store.verify(1)


def test_manifest_of_unknown_version_in_a_store(store):
    info = store.save({"w": torch.ones(3)}, step=1)
    store.save({"w": torch.zeros(3)}, step=2)
    path = store.path / "checkpoints" / "step-00000002" / "manifest.json"
    raw = json.loads(path.read_bytes())
    raw["format_version"] = 3
    path.write_bytes(_signed(raw))
    with pytest.raises(ckstore.ManifestError, match="format_version"):
        store.load(step=2)
    with pytest.warns(ckstore.CorruptCheckpointWarning):
        loaded = store.load()
    assert torch.equal(loaded["w"], torch.ones(3))
    assert info.path.exists() and path.exists()  # nothing deleted


def test_checksummed_files_share_one_canonical_json():
    """manifest.json, tags.json and metrics.json are encoded by format/canonical.py only (two copies had drifted:
    one escaped non-ASCII text, the other did not). Non-ASCII metric names stay raw UTF-8 in both files that hold them."""
    import ast
    from pathlib import Path

    import ckstore
    from ckstore.checkpoint.metrics_log import Recorded, dump_metrics, parse_metrics
    from ckstore.format.canonical import canonical_json

    assert canonical_json({"b": 1, "é": [1.5, None]}) == '{"b":1,"é":[1.5,null]}'.encode()
    data = dump_metrics({3: Recorded(1.0, {"précision": 0.5})})
    assert "précision".encode() in data and parse_metrics(data)[3].metrics == {"précision": 0.5}
    package = Path(ckstore.__file__).parent
    sorted_dumps = []
    core = [m for m in package.rglob("*.py") if m.relative_to(package).parts[0] in ("format", "storage", "engine", "state", "checkpoint", "store.py")]
    for module in core:
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "dumps" and any(k.arg == "sort_keys" for k in node.keywords):
                sorted_dumps.append(module.relative_to(package).as_posix())
    # The quarantine's note is plain readable JSON, not a checksummed file.
    assert sorted(set(sorted_dumps) - {"checkpoint/quarantine.py"}) == ["format/canonical.py"]
