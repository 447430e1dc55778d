"""The GPU paths: device-to-host staging for background saves, CUDA RNG state, loads onto the device.

These need a CUDA device. CI machines have none, so here they are skipped;
they are run on a lent GPU machine (``pytest -m cuda``) and the README says
when they last ran and where.
"""

from __future__ import annotations

import os

import pytest
import torch

import ckstore
from conftest import assert_same

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine with -m cuda)"),
]


def cpu_copy(state):
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def test_background_save_of_gpu_tensors_holds_the_values_at_the_call(tmp_path):
    torch.manual_seed(0)
    state = {f"w{i}": torch.randn(1 << 20, device="cuda") for i in range(32)}  # 128 MiB
    state["host"] = torch.arange(1000, dtype=torch.int64)  # a CPU tensor beside them
    expected = cpu_copy(state)
    with ckstore.Store(tmp_path / "s") as store:
        handle = store.save({"model": state}, step=1, blocking=False)
        # Modify everything at once, on the GPU's stream and on the host: none of it may reach the checkpoint.
        for key, tensor in state.items():
            tensor.mul_(-3).add_(1) if tensor.is_floating_point() else tensor.add_(7)
        info = handle.result()
        assert info.step == 1
        assert store._host_copy.pinned, "staging for GPU tensors must be pinned host memory"
        loaded = store.load(step=1, map_location="cpu")
    assert_same(loaded["model"], expected)


def test_staging_is_allocated_once_across_gpu_saves(tmp_path):
    state = {"w": torch.randn(1 << 22, device="cuda"), "b": torch.randn(4096, device="cuda")}
    with ckstore.Store(tmp_path / "s") as store:
        for step in range(1, 5):
            state["w"].add_(1)
            expected = cpu_copy(state)
            store.save({"model": state}, step=step, blocking=False).result()
            assert_same(store.load(step=step, map_location="cpu")["model"], expected)
        assert store._host_copy.allocations == 1


def test_sync_save_and_load_keep_device_and_bits(tmp_path):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(16, 64, device="cuda")).square().mean().backward()
    optimizer.step()
    with ckstore.Store(tmp_path / "s") as store:
        store.save({"model": model, "optimizer": optimizer}, step=1)
        restored = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
        restored_opt = torch.optim.Adam(restored.parameters(), lr=1e-3)
        store.load({"model": restored, "optimizer": restored_opt}, step=1)
        plain = store.load(step=1)
        on_cpu = store.load(step=1, map_location="cpu")
    assert_same(cpu_copy(restored.state_dict()), cpu_copy(model.state_dict()))
    assert_same(restored_opt.state_dict()["state"], optimizer.state_dict()["state"])
    assert plain["model"]["0.weight"].device.type == "cuda"  # the device recorded at save time
    assert on_cpu["model"]["0.weight"].device.type == "cpu"
    assert torch.equal(on_cpu["model"]["0.weight"], model[0].weight.detach().cpu())


def test_rng_state_continues_the_cuda_generator(tmp_path):
    torch.cuda.manual_seed_all(7)
    torch.rand(3, device="cuda")
    rng = ckstore.RNGState()
    with ckstore.Store(tmp_path / "s") as store:
        store.save({"rng": rng}, step=1)
        expected = torch.rand(5, device="cuda").cpu()
        torch.cuda.manual_seed_all(99)
        store.load({"rng": rng}, step=1)
    assert torch.equal(torch.rand(5, device="cuda").cpu(), expected)


def _train(model, optimizer, steps, start, seed_data=3):
    g = torch.Generator().manual_seed(seed_data)
    xs = torch.randn(64, 32, 32, generator=g)
    ys = torch.randn(64, 32, 1, generator=g)
    for step in range(start, start + steps):
        x, y = xs[step % 64].cuda(), ys[step % 64].cuda()
        optimizer.zero_grad(set_to_none=True)
        loss = (model(x) - y).square().mean()
        loss.backward()
        optimizer.step()


def _make(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Dropout(0.3), torch.nn.GELU(), torch.nn.Linear(64, 1)).cuda()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


@pytest.mark.guarantee("G18")
def test_resume_on_gpu_is_bitwise_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        torch.cuda.manual_seed_all(11)
        straight, straight_opt = _make(0)
        _train(straight, straight_opt, 40, 0)

        torch.cuda.manual_seed_all(11)
        first, first_opt = _make(0)
        _train(first, first_opt, 20, 0)
        with ckstore.Store(tmp_path / "s") as store:
            store.save({"model": first, "optimizer": first_opt, "rng": ckstore.RNGState()}, step=20, blocking=False)
            _train(first, first_opt, 3, 20)  # work after the save must not matter
            store.wait()
            torch.cuda.manual_seed_all(12345)  # the resumed process starts from other generator states
            resumed, resumed_opt = _make(1)
            store.load({"model": resumed, "optimizer": resumed_opt, "rng": ckstore.RNGState()})
        _train(resumed, resumed_opt, 20, 20)
    finally:
        torch.use_deterministic_algorithms(False)
    assert_same(cpu_copy(resumed.state_dict()), cpu_copy(straight.state_dict()))
    assert_same(resumed_opt.state_dict()["state"], straight_opt.state_dict()["state"])


@pytest.mark.guarantee("G3")
def test_corrupt_file_is_refused_before_it_reaches_the_gpu(tmp_path):
    state = {"w": torch.randn(1 << 16, device="cuda")}
    with ckstore.Store(tmp_path / "s") as store:
        info = store.save({"model": state}, step=1)
        victim = next(p for p in info.path.iterdir() if p.suffix == ".safetensors")
        with open(victim, "r+b") as fh:
            fh.seek(os.path.getsize(victim) - 5)
            byte = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(ckstore.IntegrityError) as raised:
            store.load(step=1)
    assert victim.name in str(raised.value)


@pytest.mark.guarantee("G4")
def test_load_into_a_gpu_model_falls_back_past_a_corrupt_newest(tmp_path):
    torch.manual_seed(2)
    model = torch.nn.Linear(256, 256).cuda()
    with ckstore.Store(tmp_path / "s") as store:
        store.save({"model": model}, step=1)
        good = cpu_copy(model.state_dict())
        with torch.no_grad():
            model.weight.add_(1)
        info = store.save({"model": model}, step=2)
        victim = next(p for p in info.path.iterdir() if p.suffix == ".safetensors")
        with open(victim, "r+b") as fh:
            fh.seek(-3, os.SEEK_END)
            byte = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([byte[0] ^ 0x01]))
        target = torch.nn.Linear(256, 256).cuda()
        with pytest.raises(ckstore.IntegrityError):
            store.load({"model": target}, step=2)
        with pytest.warns(ckstore.CorruptCheckpointWarning):
            store.load({"model": target})  # newest that verifies: step 1, read straight into the GPU tensors
    assert_same(cpu_copy(target.state_dict()), good)


def test_sync_save_of_gpu_views_and_many_small_tensors(tmp_path):
    torch.manual_seed(3)
    base = torch.randn(64, 32, device="cuda")
    state = {
        "transposed": base.t(),
        "strided": base[::2, 1:5],
        "conj": torch.randn(8, dtype=torch.complex64, device="cuda").conj(),
        "host": torch.arange(10),
        **{f"small{i:04d}": torch.full((i % 7 + 1,), float(i), device="cuda") for i in range(2000)},
    }
    expected = {k: v.resolve_conj().to("cpu", copy=True).contiguous() for k, v in state.items()}
    with ckstore.Store(tmp_path / "s") as store:
        store.save({"model": state}, step=1)  # blocking: the batched device-to-host path
        base.zero_()
        loaded = store.load(step=1, map_location="cpu")
    assert_same(loaded["model"], expected)


def test_saves_and_loads_are_ordered_on_the_callers_stream(tmp_path):
    """Work queued on a side stream before save/load is seen by their copies (they run on the current stream)."""
    side = torch.cuda.Stream()
    n = 1 << 26  # 256 MiB: the GPU is still working through the additions when save() is called
    w = torch.zeros(n, device="cuda")
    torch.cuda.synchronize()
    with ckstore.Store(tmp_path / "s") as store:
        with torch.cuda.stream(side):
            for _ in range(200):
                w.add_(1)
            background = store.save({"w": w}, step=1, blocking=False)  # staged after the 200 additions
            for _ in range(200):
                w.add_(1)
            store.save({"w": w}, step=2)  # sync: likewise after all 400
        background.result()
        assert torch.equal(store.load(step=1, map_location="cpu")["w"], torch.full((n,), 200.0))
        assert torch.equal(store.load(step=2, map_location="cpu")["w"], torch.full((n,), 400.0))
        target = torch.zeros(n, device="cuda")
        with torch.cuda.stream(side):
            store.load({"w": target}, step=1)
            target.add_(1)  # on the same stream, after the host-to-device copy
        torch.cuda.synchronize()
    assert torch.equal(target.cpu(), torch.full((n,), 201.0))


# ---------------------------------------------------------------- Store(process_group=) on NCCL


@pytest.mark.guarantee("G18", "G20")
@pytest.mark.parametrize("world", [1, 2])
def test_nccl_ranks_save_the_same_step_on_a_sigterm_and_resume_bitwise(tmp_path, world):
    """tests/test_distributed_store.py's loop test with FSDP2 on the GPUs: NCCL for training, the checkpoint group on gloo.

    NCCL puts each rank on its own GPU, so 2 ranks need 2 devices; 1 rank still runs the CUDA tensors through
    StoreWriter/StoreReader and the step-boundary all-reduce.
    """
    import torch.distributed as dist

    if not dist.is_nccl_available() or torch.cuda.device_count() < world:
        pytest.skip(f"needs NCCL and {world} CUDA devices (one rank a GPU)")
    from test_distributed_store import check_the_loop_on_ranks

    check_the_loop_on_ranks(tmp_path, world, device="cuda")

