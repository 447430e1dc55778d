"""The fast write and read paths: O_DIRECT with fallback, few writes, overlapped hashing, reads into existing tensors, lazy reads."""

from __future__ import annotations

import errno
import hashlib
import os
import warnings

import pytest
import safetensors.torch
import torch
from conftest import assert_same, flip_byte

import ckstore
from ckstore.storage import durable as _durable
from ckstore.format.chunks import ChunkedHash
from ckstore.format.hashing import hash_bytes
from ckstore.engine.read import read_one_tensor, read_tensor_file
from ckstore.checkpoint.commit import finish_files
from ckstore.engine.write import WritePipeline
from ckstore.format.safetensors import DTYPE_NAMES


def _record(events):
    def hook(op, phase, path, info):
        if phase == "before":
            events.append((op, info.get("site"), path, len(info["data"]) if "data" in info else None))

    return hook


@pytest.mark.parametrize("directory", ["tmp", "shm"])
def test_direct_writer_writes_aligned_blocks_and_falls_back_for_the_tail(tmp_path, directory):
    if directory == "shm":
        if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
            pytest.skip("no writable /dev/shm (tmpfs) on this machine")
        base = os.path.join("/dev/shm", f"ckstore-test-{os.getpid()}")
        os.makedirs(base, exist_ok=True)
    else:
        base = str(tmp_path)
    path = os.path.join(base, "f")
    try:
        import mmap

        block = mmap.mmap(-1, 3 * _durable.DIRECT_ALIGN)
        block.write(os.urandom(len(block)))
        with _durable.FileWriter(path, direct=True) as writer:
            was_direct = writer.direct
            writer.write(memoryview(block))  # aligned address, length and offset
            assert writer.direct == was_direct
            writer.write(b"tail!")  # unaligned: buffered from here on
            assert writer.direct is False
            writer.write(memoryview(block)[:100])
            writer.sync()
        with open(path, "rb") as fh:
            assert fh.read() == bytes(block) + b"tail!" + bytes(block)[:100]
    finally:
        if directory == "shm":
            for name in os.listdir(base):
                os.unlink(os.path.join(base, name))
            os.rmdir(base)


def test_a_direct_write_the_kernel_refuses_is_retried_buffered(tmp_path):
    calls = []
    real_write = os.write

    def refuse_direct(fd, data):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            calls.append("refused")
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    import mmap

    block = mmap.mmap(-1, _durable.DIRECT_ALIGN)
    block.write(b"x" * len(block))
    path = tmp_path / "f"
    os.write = refuse_direct
    try:
        with _durable.FileWriter(path, direct=True) as writer:
            was_direct = writer.direct
            writer.write(memoryview(block))
            assert writer.direct is False
            writer.sync()
    finally:
        os.write = real_write
    assert path.read_bytes() == bytes(block)
    assert calls == (["refused"] if was_direct else [])


def test_written_files_are_plain_safetensors_and_the_hash_covers_every_byte(tmp_path):
    entries = [
        ("big", torch.randn(700, 1000)),  # crosses several chunks
        ("bf16", torch.randn(33).bfloat16()),
        ("empty", torch.empty(0, 3)),
        ("scalar", torch.tensor(3, dtype=torch.int64)),
        ("odd", torch.arange(7, dtype=torch.int8)),
    ]
    pipeline = WritePipeline(chunk=1 << 20, depth=2)
    try:
        written = pipeline.write_files([(str(tmp_path / "a.safetensors"), entries), (str(tmp_path / "b.safetensors"), entries[1:])], algo="sha256", finish=finish_files)
        hashed = pipeline.digest_files([entries, entries[1:]], algo="sha256")
    finally:
        pipeline.close()
    assert written == hashed
    for name, result, expected in (("a.safetensors", written[0], entries), ("b.safetensors", written[1], entries[1:])):
        data = (tmp_path / name).read_bytes()
        assert result.size == len(data)
        # Format 2: the hash is the root over 1 MiB chunks of exactly the bytes on disk.
        table = ChunkedHash("sha256", len(data), 1 << 20, tuple(hashlib.sha256(data[i : i + (1 << 20)]).digest() for i in range(0, len(data), 1 << 20)))
        assert result.chunks == table and result.hash == table.root
        loaded = safetensors.torch.load_file(str(tmp_path / name))
        assert_same({k: loaded[k] for k, _ in expected}, dict(expected))


def test_ten_thousand_small_tensors_take_a_handful_of_writes(store):
    state = {"model": {f"layer{i}.w": torch.full((16,), float(i)) for i in range(10_000)}}
    events = []
    with _durable.hooked(_record(events)):
        store.save(state, step=1)
    writes = [e for e in events if e[0] == "write" and e[1] == "tensor_file"]
    files = {e[2] for e in writes}
    assert len(files) <= 2, files  # the tiny groups were pooled
    assert len(writes) <= 2 * len(files) + 2
    fsyncs = [e for e in events if e[0] == "fsync" and e[1] in ("tensor_file", "manifest")]
    assert len(fsyncs) == len(files) + 1  # each tensor file and the manifest, once
    assert_same(store.load(step=1), state)


@pytest.mark.guarantee("G1")
def test_every_fsync_happens_before_the_manifest_and_the_commit(store):
    state = {f"part{i}": torch.randn(300_000) for i in range(4)}
    events = []
    with _durable.hooked(_record(events)):
        store.save(state, step=1)
    ops = [(op, site) for op, site, _, _ in events]
    manifest = ops.index(("create", "manifest"))
    tensor_fsyncs = [i for i, e in enumerate(ops) if e == ("fsync", "tensor_file")]
    tensor_closes = [i for i, e in enumerate(ops) if e == ("close", "tensor_file")]
    assert len(tensor_fsyncs) == 4 and max(tensor_fsyncs) < manifest and max(tensor_closes) < manifest
    assert ops.index(("fsync_dir", "staging_dir")) < ops.index(("rename", "commit")) < ops.index(("fsync_dir", "checkpoints_dir"))


@pytest.mark.guarantee("G14")
def test_a_failed_write_aborts_cleanly_and_the_next_save_works(store):
    state = {f"part{i}": torch.randn(600_000) for i in range(3)}
    store.save(state, step=1)
    count = [0]

    def fail_third_write(op, phase, path, info):
        if op == "write" and phase == "before" and info["site"] == "tensor_file":
            count[0] += 1
            if count[0] == 3:
                raise OSError(errno.ENOSPC, "injected ENOSPC", path)

    with _durable.hooked(fail_third_write), pytest.raises(ckstore.StorageError) as caught:
        store.save(state, step=2)
    assert caught.value.errno == errno.ENOSPC
    assert os.listdir(store.path / ".staging") == []
    assert [i.step for i in store.checkpoints()] == [1]
    store.save(state, step=2)
    assert store.verify() == []
    assert_same(store.load(step=2), state)


def test_sha256_fallback_round_trips(store_path):
    state = {"w": torch.randn(1000), "b": torch.arange(5)}
    with ckstore.Store(store_path, hash_algorithm="sha256") as store:
        store.save(state, step=1)
        assert str(store.resolve(1).files["w.safetensors"].hash).startswith("sha256:")
        assert_same(store.load(step=1), state)


def test_direct_io_can_be_turned_off(store_path):
    with ckstore.Store(store_path, direct_io=False) as store:
        store.save({"w": torch.randn(100_000)}, step=1)
        assert store._committer.pipeline.direct is False
        assert store.verify() == []


# ---------------------------------------------------------------- loads


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 3))


def test_loading_into_a_model_reads_straight_into_its_parameters(store):
    source = _model(0)
    store.save({"model": source, "note": "x"}, step=1)
    target = _model(1)
    pointers = {k: v.data_ptr() for k, v in target.state_dict().items()}
    store.load({"model": target}, step=1)
    assert {k: v.data_ptr() for k, v in target.state_dict().items()} == pointers
    assert_same(target.state_dict(), source.state_dict())


@pytest.mark.guarantee("G4")
def test_a_corrupt_checkpoint_read_into_a_model_is_refused_and_the_fallback_restores_it(store):
    old, new = _model(0), _model(1)
    store.save({"model": old}, step=1)
    store.save({"model": new}, step=2)
    flip_byte(store.resolve(2).path / "model.0.safetensors", 200)
    target = _model(2)
    with pytest.raises(ckstore.IntegrityError):
        store.load({"model": target}, step=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store.load({"model": target})  # newest that verifies: step 1
    assert any(issubclass(w.category, ckstore.CorruptCheckpointWarning) for w in caught)
    assert_same(target.state_dict(), old.state_dict())


def test_targets_that_do_not_fit_are_refused_and_mismatched_devices_use_the_slow_path(store):
    store.save({"w": torch.randn(4, 4), "v": torch.randn(3)}, step=1)
    with pytest.raises(ckstore.StateError):
        store.load({"w": torch.zeros(5, 4), "v": torch.zeros(3)}, step=1)
    non_contiguous = torch.zeros(4, 4).t()
    out = store.load({"w": non_contiguous, "v": torch.zeros(3)}, step=1)
    assert out["w"] is non_contiguous
    assert torch.equal(non_contiguous, store.load(step=1)["w"])


def test_read_tensor_file_with_targets_and_batched_small_tensors(tmp_path):
    entries = [(f"t{i}", torch.full((i % 7 + 1,), float(i))) for i in range(3000)] + [("big", torch.randn(5_000_000))]
    pipeline = WritePipeline(chunk=1 << 20, depth=2)
    try:
        (written,) = pipeline.write_files([(str(tmp_path / "f.safetensors"), entries)], algo="blake3", finish=finish_files)
    finally:
        pipeline.close()
    targets = {"big": torch.empty(5_000_000), "t5": torch.empty(6)}
    out = read_tensor_file(str(tmp_path / "f.safetensors"), size=written.size, expected=written.chunks, targets=targets)
    assert out["big"] is targets["big"] and out["t5"] is targets["t5"]
    assert_same({k: out[k] for k, _ in entries}, dict(entries))
    with pytest.raises(ckstore.IntegrityError):
        read_tensor_file(str(tmp_path / "f.safetensors"), size=written.size + 1, expected=written.chunks)


def _every_dtype() -> list[tuple[str, torch.Tensor]]:
    entries = []
    for i, dtype in enumerate(sorted(DTYPE_NAMES, key=str)):
        values = torch.arange(1, 13, dtype=torch.float32).reshape(3, 4) / 4 - 1
        entries.append((f"m{i}", values > 0 if dtype == torch.bool else values.to(dtype)))
        entries.append((f"s{i}", values[1, 1].to(dtype) if dtype != torch.bool else torch.tensor(True)))
    return entries


@pytest.mark.parametrize("short_reads", [False, True])
def test_targets_of_every_dtype_and_shape_are_read_in_place(tmp_path, monkeypatch, short_reads):
    """Typed buffers (NumPy views where NumPy has the dtype, bytes otherwise), 0-d tensors, odd strides of size-1 dims, short reads."""
    entries = _every_dtype() + [("odd_stride", torch.arange(3.0).reshape(3, 1))]
    pipeline = WritePipeline(chunk=1 << 20, depth=2)
    try:
        (written,) = pipeline.write_files([(str(tmp_path / "f.safetensors"), entries)], algo="blake3", finish=finish_files)
    finally:
        pipeline.close()
    targets = {key: torch.zeros_like(tensor) for key, tensor in entries}
    targets["odd_stride"] = torch.zeros(3, 2)[:, :1].contiguous().as_strided((3, 1), (1, 7))  # contiguous, stride 7 on a size-1 dim
    assert targets["odd_stride"].is_contiguous() and targets["odd_stride"].stride() == (1, 7)
    if short_reads:
        preadv = os.preadv

        def half(fd, buffers, offset):  # the kernel may return less than asked: at most half of the first buffer
            first = memoryview(buffers[0]).cast("B")
            return preadv(fd, [first[: max(1, len(first) // 2)]], offset)

        monkeypatch.setattr(os, "preadv", half)
    out = read_tensor_file(str(tmp_path / "f.safetensors"), size=written.size, expected=written.chunks, targets=targets)
    for key, tensor in entries:
        assert out[key] is targets[key], key
        assert_same(out[key], tensor)


def test_read_tensor_reads_one_tensor_and_says_what_it_verified(store):
    layer = {"l.a": torch.randn(1000), "l.b": torch.randn(2000)}
    state = {"model": layer, "opt": {"m": torch.randn(10)}}
    store.save(state, step=1)
    assert store.tensor_keys(1) == ["model/l.a", "model/l.b", "opt/m"]
    assert torch.equal(store.read_tensor("model/l.b", step=1), layer["l.b"])
    assert torch.equal(store.read_tensor("opt/m"), state["opt"]["m"])  # latest by default
    path = store.resolve(1).path / "model.l.safetensors"
    # Corrupt the bytes of *another* tensor of the same file (the last one,
    # l.b): the lazy read does not see them, the verified read hashes the
    # whole file and does.
    with open(path, "r+b") as fh:
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\x00\x00\x80\x7f")
    assert torch.equal(store.read_tensor("model/l.a", step=1), layer["l.a"])
    with pytest.raises(ckstore.IntegrityError):
        store.read_tensor("model/l.a", step=1, verify=True)
    with pytest.raises(ckstore.InvalidArgumentError):
        store.read_tensor("model/zzz", step=1)
    with pytest.raises(ckstore.InvalidArgumentError):
        store.read_tensor(3, step=1)  # type: ignore[arg-type]


def test_read_one_tensor_checks_size_and_header(tmp_path):
    path = tmp_path / "f.safetensors"
    safetensors.torch.save_file({"x": torch.arange(10.0), "y": torch.ones(3)}, str(path))
    size = path.stat().st_size
    assert torch.equal(read_one_tensor(str(path), "y", size=size), torch.ones(3))
    with pytest.raises(ckstore.IntegrityError):
        read_one_tensor(str(path), "y", size=size + 8)
    flip_byte(path, 3)  # the header length
    with pytest.raises(ckstore.IntegrityError):
        read_one_tensor(str(path), "y", size=size)


def _craft(path, header: dict, data: bytes) -> int:
    import json
    import struct

    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    blob = struct.pack("<Q", len(raw)) + raw + data
    path.write_bytes(blob)
    return len(blob)


def test_lazy_read_checks_its_own_entry_and_the_verified_read_checks_all(tmp_path):
    import struct

    path = tmp_path / "f.safetensors"
    data = struct.pack("<4f", 1, 2, 3, 4)
    good = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "y": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    # Another entry is malformed: the lazy read of "x" is unaffected, a full check refuses the file.
    size = _craft(path, {**good, "y": {"dtype": "F32", "shape": [3], "data_offsets": [8, 16]}}, data)
    assert torch.equal(read_one_tensor(str(path), "x", size=size), torch.tensor([1.0, 2.0]))
    with pytest.raises(ckstore.IntegrityError, match="does not hold"):
        read_tensor_file(str(path), size=size, expected=None)
    # The entry itself is checked: a range past the end of the file, a shape that does not fit.
    size = _craft(path, {**good, "x": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}, data)
    with pytest.raises(ckstore.IntegrityError, match="inside the file"):
        read_one_tensor(str(path), "x", size=size)
    size = _craft(path, {**good, "x": {"dtype": "F64", "shape": [2], "data_offsets": [0, 8]}}, data)
    with pytest.raises(ckstore.IntegrityError):
        read_one_tensor(str(path), "x", size=size)
    with pytest.raises(ckstore.IntegrityError, match="no tensor"):
        read_one_tensor(str(path), "__metadata__", size=size)
    path.write_bytes(struct.pack("<Q", 8) + b"not json" + data)
    with pytest.raises(ckstore.IntegrityError, match="not JSON"):
        read_one_tensor(str(path), "x", size=path.stat().st_size)
