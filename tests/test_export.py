"""export_hf / export_safetensors: what save_pretrained writes, loadable by from_pretrained with identical logits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

import ckstore
from ckstore.integrations.export import ExportExistsError, export_hf, export_safetensors, hf_metadata

pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"

from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, TrainingArguments  # noqa: E402

from ckstore.integrations.hf import CkstoreTrainer  # noqa: E402


class _Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _model(tie: bool = True) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=16, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny GPT-2 trained 3 steps by CkstoreTrainer; its store and the trained model."""
    out = tmp_path_factory.mktemp("trained")
    args = TrainingArguments(str(out), per_device_train_batch_size=4, max_steps=3, save_steps=3, seed=0, report_to=[], use_cpu=True, disable_tqdm=True, learning_rate=1e-2)
    trainer = CkstoreTrainer(model=_model(), args=args, train_dataset=_Tokens())
    trainer.train()
    return out / "ckstore", trainer.model.eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(ids).logits


def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_export_loads_with_from_pretrained_and_gives_identical_logits(trained, tmp_path) -> None:
    store_path, model = trained
    with ckstore.Store(store_path, readonly=True) as store:
        files = export_hf(store, "latest", tmp_path / "hf")
    assert files == ["config.json", "generation_config.json", "model.safetensors"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(loaded) is GPT2LMHeadModel
    assert torch.equal(_logits(loaded), _logits(model))
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # tied again by from_pretrained


def test_export_writes_what_save_pretrained_writes(trained, tmp_path) -> None:
    store_path, model = trained
    with ckstore.Store(store_path, readonly=True) as store:
        export_hf(store, 3, tmp_path / "ours")
    model.save_pretrained(tmp_path / "theirs")
    ours, ours_meta = _tensors(tmp_path / "ours" / "model.safetensors")
    theirs, theirs_meta = _tensors(tmp_path / "theirs" / "model.safetensors")
    assert ours_meta == theirs_meta == {"format": "pt"}
    assert sorted(ours) == sorted(theirs)  # HF names, no model/ prefix, lm_head.weight left out as save_pretrained does
    assert "lm_head.weight" not in ours and not any(k.startswith("model/") for k in ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "ours" / name).read_text()) == json.loads((tmp_path / "theirs" / name).read_text()), name
    # Not a copy of a store file: no exported file has the bytes of one.
    store_files = {p.read_bytes() for p in store_path.rglob("*.safetensors")}
    assert (tmp_path / "ours" / "model.safetensors").read_bytes() not in store_files


def test_sharded_export_matches_save_pretrained_and_loads(trained, tmp_path) -> None:
    store_path, model = trained
    with ckstore.Store(store_path, readonly=True) as store:
        calls: list[tuple[int, int]] = []
        files = export_hf(store, 3, tmp_path / "ours", max_shard_size="20KB", progress=lambda done, total: calls.append((done, total)))
    model.save_pretrained(tmp_path / "theirs", max_shard_size="20KB")
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert index == json.loads((tmp_path / "theirs" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(calls) == len(shards) and calls[-1][0] == calls[-1][1] == index["metadata"]["total_size"]
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert len(shards) > 2 and files == sorted(["config.json", "generation_config.json", "model.safetensors.index.json", *shards])
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == sorted(p.name for p in (tmp_path / "theirs").iterdir())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert torch.equal(_logits(loaded), _logits(model))


def test_untied_model_keeps_lm_head(tmp_path) -> None:
    model = _model(tie=False)
    with ckstore.Store(tmp_path / "store") as store:
        store.save({"model": model, "hf": {"model": hf_metadata(model)}}, step=1)
        export_hf(store, 1, tmp_path / "hf")
    weights, _ = _tensors(tmp_path / "hf" / "model.safetensors")
    assert "lm_head.weight" in weights
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")), _logits(model))


def test_export_safetensors_is_one_flat_file(trained, tmp_path) -> None:
    store_path, model = trained
    with ckstore.Store(store_path, readonly=True) as store:
        path = export_safetensors(store, "latest", tmp_path / "weights.safetensors")
    weights, meta = _tensors(Path(path))
    assert meta == {"format": "pt"} and "lm_head.weight" not in weights
    fresh = _model()
    result = fresh.load_state_dict(load_file(path), strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys  # tied: the same tensor as wte
    assert torch.equal(_logits(fresh), _logits(model))


def test_plain_module_without_config(tmp_path) -> None:
    module = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    module[1].weight = module[0].weight  # shared, not declared tied: the first key in state-dict order stays
    with ckstore.Store(tmp_path / "store") as store:
        store.save({"model": module}, step=5)
        assert export_hf(store, 5, tmp_path / "hf") == ["model.safetensors"]
        weights, _ = _tensors(tmp_path / "hf" / "model.safetensors")
        assert sorted(weights) == ["0.bias", "0.weight", "1.bias"]
        export_hf(store, 5, tmp_path / "with-config", config={"model_type": "gpt2", "n_embd": 3})
        assert json.loads((tmp_path / "with-config" / "config.json").read_text())["n_embd"] == 3
        with pytest.raises(ckstore.InvalidArgumentError, match="model_type"):
            export_hf(store, 5, tmp_path / "bad", config={"n_embd": 3})
        with pytest.raises(ckstore.StateError, match="'weights'"):
            export_hf(store, 5, tmp_path / "bad", key="weights")
    assert not (tmp_path / "bad").exists()


def test_existing_destination_needs_overwrite(trained, tmp_path) -> None:
    store_path, _ = trained
    out = tmp_path / "hf"
    out.mkdir()  # an empty directory is fine
    with ckstore.Store(store_path, readonly=True) as store:
        export_hf(store, 3, out)
        before = (out / "model.safetensors").stat().st_ino
        with pytest.raises(ExportExistsError) as caught:
            export_hf(store, 3, out)
        assert isinstance(caught.value, ckstore.CkstoreError) and isinstance(caught.value, FileExistsError)
        assert caught.value.path == str(out)
        export_hf(store, 3, out, overwrite=True)
        assert (out / "model.safetensors").stat().st_ino != before
        target = tmp_path / "w.safetensors"
        target.write_bytes(b"x")
        with pytest.raises(ExportExistsError):
            export_safetensors(store, 3, target)
        export_safetensors(store, 3, target, overwrite=True)
        assert target.stat().st_size > 1
        with pytest.raises(ckstore.CheckpointNotFoundError):
            export_hf(store, 99, tmp_path / "missing")
        with pytest.raises(ckstore.InvalidArgumentError, match="max_shard_size"):
            export_hf(store, 3, tmp_path / "x", max_shard_size="lots")
    # Nothing half-written is left beside the exports (temporary directories and files are renamed or removed).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "w.safetensors"]


@pytest.mark.guarantee("G3")
def test_corrupt_checkpoint_is_not_exported(tmp_path) -> None:
    model = _model()
    with ckstore.Store(tmp_path / "store") as store:
        info = store.save({"model": model, "hf": {"model": hf_metadata(model)}}, step=1)
        victim = next(info.path.glob("model*.safetensors"))
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        victim.write_bytes(bytes(raw))
        with pytest.raises(ckstore.IntegrityError):
            export_hf(store, 1, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@settings(deadline=None)
@given(sizes=st.lists(st.integers(1, 16), min_size=1, max_size=30), limit=st.integers(1, 48).map(lambda n: 4 * n))
@example(sizes=[1, 1], limit=8)  # a shard exactly at the limit stays one shard
def test_shards_split_as_huggingface_hub_splits(sizes, limit) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards

    from ckstore.integrations.export import _shards

    weights = {f"w{i}": torch.zeros(n) for i, n in enumerate(sizes)}
    theirs = split_torch_state_dict_into_shards(weights, max_shard_size=limit)
    assert _shards(weights, limit) == list(theirs.filename_to_tensors.values())
