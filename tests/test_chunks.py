"""Manifest format 2: chunk tables, their root, ranged verification, format-1 checkpoints, fork safety."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys

import blake3
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckstore
from ckstore.engine import chunkverify
from ckstore.format import chunks as _chunks
from ckstore.format.chunks import ChunkedHash, check_chunk_size
from ckstore.format.manifest import parse_manifest
from conftest import REPO_ROOT

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "format1_store"
MiB = 1 << 20


def _manifest(store: ckstore.Store, step: int) -> dict:
    return json.loads((store.path / "checkpoints" / f"step-{step:08d}" / "manifest.json").read_bytes())


def _file(store: ckstore.Store, step: int, name: str) -> str:
    return str(store.path / "checkpoints" / f"step-{step:08d}" / name)


def _flip(path: str, at: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0x01]))


def test_saves_write_format_2_with_a_chunk_table_and_the_documented_root(tmp_path):
    with ckstore.Store(tmp_path / "s") as store:
        store.save({"w": torch.arange(700_000, dtype=torch.float32), "b": torch.ones(3)}, step=1)
        raw = _manifest(store, 1)
    assert raw["format_version"] == 2
    for name, entry in raw["files"].items():
        data = open(_file(store, 1, name), "rb").read()
        size, chunk_size = entry["size"], entry["chunk_size"]
        assert chunk_size == _chunks.DEFAULT_CHUNK_SIZE and size == len(data)
        # Independent of ckstore's code: the definition in format/chunks.py, spelled out.
        digests = [blake3.blake3(data[i : i + chunk_size]).digest() for i in range(0, size, chunk_size)]
        assert entry["chunks"] == [d.hex() for d in digests]
        root = blake3.blake3(b"ckstore.chunks.v2\0" + struct.pack("<QQ", size, chunk_size) + b"".join(digests)).hexdigest()
        assert entry["hash"] == f"blake3:{root}"
    assert len(raw["files"]["w.safetensors"]["chunks"]) == 3  # 2.8 MB in 1 MiB chunks


@pytest.mark.parametrize("bad", [0, 1, 3 * MiB, MiB + 1, MiB // 2, 32 * MiB, -MiB, 2.0 * MiB, True, "1048576"])
def test_chunk_size_must_be_a_power_of_two_in_range(bad):
    with pytest.raises(ckstore.ManifestError, match="chunk_size"):
        check_chunk_size(bad)


def test_format_1_fixture_loads_and_verifies(tmp_path):
    """A store written by the format-1 code (tests/fixtures/format1_store) still loads, verifies, reads one tensor."""
    root = tmp_path / "old"
    shutil.copytree(FIXTURE, root)
    with ckstore.Store(root, readonly=True) as store:
        assert store.verify() == []
        assert [i.format_version for i in store.checkpoints()] == [1, 1]
        state = store.load()
        assert state["step"] == 2 and torch.equal(state["model"]["w"], torch.arange(3000, dtype=torch.float32).reshape(60, 50) * 2)
        assert torch.equal(store.read_tensor("model/w", step=1, verify=True), torch.arange(3000, dtype=torch.float32).reshape(60, 50))
    name = "model.w.safetensors"
    _flip(str(root / "checkpoints" / "step-00000002" / name), 3000)
    with ckstore.Store(root, readonly=True) as store:
        assert any(name in p.path for p in store.verify(2))
        with pytest.raises(ckstore.IntegrityError):
            store.load(step=2)
        with pytest.raises(ckstore.IntegrityError):
            store.read_tensor("model/w", step=2, verify=True)


def test_a_new_save_after_a_format_1_checkpoint_is_format_2(tmp_path):
    """Incremental saves link only files whose root matches: a format-1 file is rewritten, never mixed in."""
    root = tmp_path / "old"
    shutil.copytree(FIXTURE, root)
    with ckstore.Store(root, metric="loss") as store:
        state = store.load()
        store.save(state, step=3, metrics={"loss": 0.1})
        assert _manifest(store, 3)["format_version"] == 2
        assert store.verify() == []
        assert torch.equal(store.load(step=3)["model"]["w"], state["model"]["w"])


def test_cli_verify_reports_each_checkpoints_format(tmp_path):
    root = tmp_path / "mixed"
    shutil.copytree(FIXTURE, root)
    with ckstore.Store(root, metric="loss") as store:
        store.save({"w": torch.ones(4)}, step=3, metrics={"loss": 0.1})
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-m", "ckstore", "verify", str(root), "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["formats"] == {"1": 1, "2": 1, "3": 2}
    out = subprocess.run([sys.executable, "-m", "ckstore", "verify", str(root)], capture_output=True, text=True, env=env, timeout=120)
    assert "format 1: steps 1, 2\n" in out.stdout and out.stdout.endswith("format 2: step 3\n")


def _one_file_state() -> dict[str, torch.Tensor]:
    """Grouped into one file (model.enc.safetensors): the keys share their first dotted component."""
    return {"enc.a": torch.arange(MiB // 2, dtype=torch.float32), "enc.b": torch.full((MiB // 2,), 2.0), "enc.c": torch.full((MiB // 2,), 3.0)}


@pytest.fixture
def one_file(tmp_path):
    """Three 2 MiB tensors in ONE file: ranged reads of it touch some chunks and not others."""
    store = ckstore.Store(tmp_path / "one")
    store.save({"model": _one_file_state()}, step=1)
    raw = _manifest(store, 1)
    (name,) = [n for n in raw["files"]]
    yield store, name, raw["files"][name]
    store.close()


def _data_offset(path: str) -> int:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
    return 8 + n


def test_ranged_verified_read_hashes_only_the_chunks_it_touches(one_file, monkeypatch):
    store, name, entry = one_file
    assert entry["size"] > 6 * MiB and len(entry["chunks"]) == 7
    hashed: list[int] = []
    real = chunkverify.hash_chunk
    monkeypatch.setattr(chunkverify, "hash_chunk", lambda algo, *segs: hashed.append(sum(map(len, segs))) or real(algo, *segs))
    keys = store.tensor_keys(1)
    key_c = next(k for k in keys if k.endswith("c"))
    tensor = store.read_tensor(key_c, verify=True)
    assert torch.equal(tensor, torch.full((MiB // 2,), 3.0))
    # The header's chunk and the two or three of the 2 MiB tensor: at most 4 of 7 chunks, not the file.
    assert 2 * MiB <= sum(hashed) <= 4 * MiB, hashed


def test_a_flip_outside_the_range_is_not_read_and_inside_is_caught(one_file):
    store, name, entry = one_file
    path = _file(store, 1, name)
    start = _data_offset(path)
    keys = store.tensor_keys(1)
    key_a, key_c = (next(k for k in keys if k.endswith(s)) for s in "ac")
    _flip(path, start + 4 * MiB + 100)  # inside c's bytes (c spans data bytes 4..6 MiB)
    assert torch.equal(store.read_tensor(key_a, verify=True), torch.arange(MiB // 2, dtype=torch.float32))
    with pytest.raises(ckstore.IntegrityError, match="chunk"):
        store.read_tensor(key_c, verify=True)
    with pytest.raises(ckstore.IntegrityError, match="chunk"):
        store.load(step=1)
    problems = store.verify(1)
    assert len(problems) == 1 and "chunk" in problems[0].message


def test_a_flipped_header_byte_is_caught_by_a_ranged_read(one_file):
    store, name, _ = one_file
    path = _file(store, 1, name)
    _flip(path, 20)  # inside the header's JSON: the header's chunk is verified before it is parsed
    key_c = next(k for k in store.tensor_keys(1) if k.endswith("c"))
    with pytest.raises(ckstore.IntegrityError):
        store.read_tensor(key_c, verify=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_byte_flip_is_caught_by_a_full_load_and_by_a_ranged_read_that_covers_it(tmp_path_factory, data):
    """The property of issue 13: a flip anywhere fails a full load; a ranged read fails whenever the flip lies in its range."""
    base = tmp_path_factory.mktemp("flip")
    with ckstore.Store(base / "s") as store:
        store.save({"model": _one_file_state(), "opt": {"lr": 0.1, "t": torch.arange(10)}}, step=1)
        raw = _manifest(store, 1)
    name = data.draw(st.sampled_from(sorted(raw["files"])), label="file")
    size = raw["files"][name]["size"]
    at = data.draw(st.integers(0, size - 1), label="offset")
    path = str(base / "s" / "checkpoints" / "step-00000001" / name)
    with open(path, "rb") as fh:
        pristine = fh.read()
    table = parse_manifest(open(str(base / "s" / "checkpoints" / "step-00000001" / "manifest.json"), "rb").read()).files[name].chunks
    assert table is not None
    _flip(path, at)
    with ckstore.Store(base / "s", readonly=True) as store:
        with pytest.raises(ckstore.CkstoreError):
            store.load(step=1)
        assert store.verify(1)
        # A ranged read of bytes lo..hi: refused when the flip lies inside, accepted (and right) otherwise.
        lo = data.draw(st.integers(0, size - 1), label="lo")
        hi = data.draw(st.integers(lo + 1, size), label="hi")
        fd = os.open(path, os.O_RDONLY)
        try:
            if lo <= at < hi:
                with pytest.raises(ckstore.IntegrityError):
                    chunkverify.read_range(fd, table, lo, hi, path)
            else:
                touched = table.span(lo, hi)
                if not any(table.bounds(i)[0] <= at < table.bounds(i)[1] for i in touched):
                    got, first = chunkverify.read_range(fd, table, lo, hi, path)
                    assert bytes(got[lo - first : hi - first]) == pristine[lo:hi]
                else:  # the flip is outside the range but inside a chunk the range shares: refused, never wrong bytes
                    with pytest.raises(ckstore.IntegrityError):
                        chunkverify.read_range(fd, table, lo, hi, path)
        finally:
            os.close(fd)


def test_root_is_domain_separated_and_binds_size_and_chunk_size():
    digests = (b"\x01" * 32, b"\x02" * 32)
    a = ChunkedHash("blake3", 2 * MiB, MiB, digests).root
    assert a != ChunkedHash("blake3", 2 * MiB - 1, MiB, digests).root
    assert a != ChunkedHash("blake3", 2 * MiB, 2 * MiB, digests).root
    assert a.hexdigest != blake3.blake3(b"".join(digests)).hexdigest()


def test_hashing_in_a_forked_child_works(tmp_path):
    """Saving and verified loading in a child forked after the parent's hash threads ran (no Rayon, no inherited dead threads)."""
    with ckstore.Store(tmp_path / "p") as store:
        store.save({"w": torch.randn(3 * MiB // 4)}, step=1)
        assert store.verify() == []
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(60)  # a hang (a lock or pool inherited in a bad state) is a failure, not a stuck suite
            with ckstore.Store(tmp_path / "p") as child:
                child.save({"w": torch.randn(3 * MiB // 4)}, step=2)
                code = 0 if child.verify() == [] and child.load(step=2)["w"].numel() == 3 * MiB // 4 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_manifest_cache_counts_the_chunk_tables_summaries_keep():
    """A summary of a format-2 manifest keeps its chunk tables (~1,000 digests per GiB): the cache's budget must count them."""
    from ckstore.checkpoint.manifest_cache import ManifestCache
    from ckstore.format.manifest import FileEntry, Manifest

    def big(step: int) -> Manifest:
        table = ChunkedHash("blake3", 10_000 * MiB, MiB, tuple(bytes([i % 256]) * 32 for i in range(10_000)))
        return Manifest(step=step, created=float(step), files={"w.safetensors": FileEntry(table.size, table.root, table)})

    size = len(big(1).to_json())  # ~670 kB of JSON: ~5.4 MB estimated parsed
    cache = ManifestCache(budget=8 * size + 400_000)
    cache.put("a", (1, 1, 1), big(1), size=size)
    cache.put("b", (2, 2, 2), big(2), size=size)
    # b stays whole; a is demoted to a summary, whose 10,000 digests (~0.8 MB in memory) do not fit what is left.
    assert [m.step for m in cache.entries()] == [2]


def test_distributed_verified_steps_checks_format_2_files_against_their_chunks(tmp_path):
    """Each rank's share of the verification (distributed.training.verified_steps) checks chunk tables, not a whole-file hash."""
    from ckstore.distributed.training import verified_steps

    with ckstore.Store(tmp_path / "s") as store:
        for step in (1, 2):
            store.save({"w": torch.full((300_000,), float(step)), "b": torch.ones(3)}, step=step)
        assert verified_steps(store, rank=0, world=1) == [2, 1]
        _flip(_file(store, 2, "w.safetensors"), 1000)
        assert verified_steps(store, rank=0, world=1) == [1]


# -- the chunk size grows with the save, so chunk tables never push a manifest past the reader's cap


def _manifest_of(store_path, step):
    with open(os.path.join(store_path, "checkpoints", f"step-{step:08d}", "manifest.json"), "rb") as fh:
        return json.loads(fh.read())


def test_chunk_tables_of_a_large_state_fit_the_manifest_cap():
    # 67 bytes of manifest a chunk (a quoted 64-hex digest and a comma). With 1 MiB chunks for every
    # save, a 2 TiB state needed 2 M chunks, 134 MB of chunk tables: past the 64 MiB cap, so it could
    # never be saved; the rule keeps every save up to 14 TiB within it.
    from ckstore.format.manifest import MAX_MANIFEST_BYTES

    for total in (0, 1, 1 << 30, 256 << 30, (256 << 30) + 1, 847 * 10**9, 2 << 40, 4 << 40):
        size = _chunks.chunk_size_for(total)
        assert check_chunk_size(size) == size
        assert 67 * _chunks.chunk_count(total, size) <= MAX_MANIFEST_BYTES // 3, (total, size)  # 17.6 MB at most
    size = _chunks.chunk_size_for(14 << 40)
    assert 67 * _chunks.chunk_count(14 << 40, size) < MAX_MANIFEST_BYTES
    # Small and medium saves keep 1 MiB chunks: a ranged read hashes about 1 MiB a range end.
    assert _chunks.chunk_size_for(256 << 30) == 1 << 20
    assert _chunks.chunk_size_for(1 << 40) == 4 << 20


def test_a_save_past_the_chunk_budget_is_written_with_larger_chunks_and_verifies(tmp_path, monkeypatch):
    monkeypatch.setattr(_chunks, "CHUNK_BUDGET", 8)  # 64 MiB of state: 8 MiB chunks
    g = torch.Generator().manual_seed(3)
    state = {"a": torch.randn(8 << 20, generator=g), "b": torch.randn(8 << 20, generator=g)}  # 2 x 32 MiB
    store = ckstore.Store(tmp_path / "s")
    store.save(state, step=1)
    files = _manifest_of(tmp_path / "s", 1)["files"]
    assert {entry["chunk_size"] for entry in files.values()} == {8 << 20}, {k: e["chunk_size"] for k, e in files.items()}
    assert store.verify() == []
    loaded = store.load(step=1)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert torch.equal(store.read_tensor("b", step=1, verify=True), state["b"])
    # A flipped byte deep in a file is found by verify, by a load and by a ranged read over it.
    name = next(n for n in files if files[n]["size"] > 16 << 20)
    path = os.path.join(tmp_path / "s", "checkpoints", "step-00000001", name)
    with open(path, "r+b") as fh:
        fh.seek(20 << 20)
        byte = fh.read(1)
        fh.seek(20 << 20)
        fh.write(bytes([byte[0] ^ 1]))
    assert store.verify()
    with pytest.raises(ckstore.IntegrityError):
        store.load(step=1)


def test_a_dcp_save_past_the_chunk_budget_uses_larger_chunks(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    from ckstore.distributed import StoreReader, StoreWriter

    monkeypatch.setattr(_chunks, "CHUNK_BUDGET", 8)
    state = {"w": torch.arange(16 << 20, dtype=torch.float32)}  # 64 MiB: 8 MiB chunks
    store = ckstore.Store(tmp_path / "s")
    dcp.save(state, storage_writer=StoreWriter(store, step=1))
    files = _manifest_of(tmp_path / "s", 1)["files"]
    assert {entry["chunk_size"] for entry in files.values()} == {8 << 20}
    assert store.verify() == []
    back = {"w": torch.zeros(16 << 20)}
    dcp.load(back, storage_reader=StoreReader(store, step=1))
    assert torch.equal(back["w"], state["w"])


def test_a_chunk_of_more_tensors_than_one_preadv_takes_loads_and_catches_a_flip(tmp_path):
    # The hash threads read each chunk with preadv into its tensors: 3,000 tensors of 8 bytes share
    # one 1 MiB chunk, more than IOV_MAX (1,024) buffers, so the read is split; a flip in any is caught.
    state = {f"t{i:04d}": torch.full((2,), float(i)) for i in range(3000)}
    store = ckstore.Store(tmp_path / "s")
    store.save(state, step=1)
    target = {k: torch.zeros(2) for k in state}
    store.load(target, step=1)
    assert all(torch.equal(target[k], state[k]) for k in state)
    directory = tmp_path / "s" / "checkpoints" / "step-00000001"
    (name,) = [p.name for p in directory.iterdir() if p.name.endswith(".safetensors")]
    path = directory / name
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # inside the last tensors' bytes
    path.write_bytes(bytes(data))
    with pytest.raises(ckstore.IntegrityError, match="chunk 0"):
        store.load({k: torch.zeros(2) for k in state}, step=1)
