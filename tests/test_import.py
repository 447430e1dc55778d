"""ckstore.integrations.importers and ``ckstore import``: real torch.save files, a real Lightning .ckpt, a real
Hugging Face checkpoint-N directory and a real DCP directory, each imported, verified, loaded back bitwise, with
the source tree byte-identical afterwards; and pickles that need code execution refused, naming the global."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import assert_same

import ckstore
from ckstore.cli import main
from ckstore.integrations import importers
from ckstore.integrations.importers import UnsafePickleError, import_checkpoint


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under root: content hash and mtime (ns), so a rewrite of identical bytes is caught too."""
    root = Path(root)
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in paths}


def trained(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def fresh():
    torch.manual_seed(99)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)


# ---------------------------------------------------------------- torch.save


def test_torch_save_file_round_trips_and_source_is_untouched(tmp_path, store_path):
    model, opt, sched = trained()
    src = tmp_path / "ckpt_500.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": 3}, src)
    before = tree_digest(src)
    result = import_checkpoint(src, store_path, step=500, name="migrated")
    assert tree_digest(src) == before
    assert result.format == "torch" and result.info.step == 500 and result.info.tags == ("migrated",)
    with ckstore.Store(store_path, readonly=True) as store:
        assert store.verify(500) == []
        assert_same(store.load(step=500), {k: v for k, v in torch.load(src, weights_only=True).items()})
        m2, o2, s2 = fresh()
        store.load({"model": m2, "optimizer": o2, "scheduler": s2}, step="migrated")
    assert_same(m2.state_dict(), model.state_dict())
    assert_same(o2.state_dict(), opt.state_dict())
    assert_same(s2.state_dict(), sched.state_dict())


def test_torch_save_step_comes_from_the_file_or_must_be_given(tmp_path, store_path):
    src = tmp_path / "a.pt"
    torch.save({"w": torch.ones(3), "global_step": 12}, src)
    assert import_checkpoint(src, store_path).info.step == 12
    bare = tmp_path / "b.pt"
    torch.save({"w": torch.ones(3)}, bare)
    with pytest.raises(ckstore.InvalidArgumentError, match="step"):
        import_checkpoint(bare, store_path)
    with ckstore.Store(store_path, readonly=True) as store:
        assert [i.step for i in store.checkpoints()] == [12]  # the refused import committed nothing


class Payload:
    def __init__(self):
        self.x = 1


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize(
    ("value", "offending"), [(Payload(), "test_import.Payload"), (RunsCode(), "system")], ids=["custom-class", "os.system"]
)
def test_pickle_that_needs_code_execution_is_refused(tmp_path, store_path, value, offending):
    src = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "extra": value}, src)
    before = tree_digest(src)
    with pytest.raises(UnsafePickleError) as excinfo:
        import_checkpoint(src, store_path, step=1)
    assert isinstance(excinfo.value, ckstore.CkstoreError)
    assert excinfo.value.path == str(src)
    assert offending in excinfo.value.global_name and str(src) in str(excinfo.value) and offending in str(excinfo.value)
    assert tree_digest(src) == before
    assert not (store_path / "checkpoints").exists() or not os.listdir(store_path / "checkpoints")


def test_a_plain_pickle_file_is_refused_too(tmp_path, store_path):
    src = tmp_path / "plain.pkl"
    src.write_bytes(pickle.dumps({"w": RunsCode()}))
    with pytest.raises(UnsafePickleError, match="system"):
        import_checkpoint(src, store_path, step=1)


def test_not_a_checkpoint_is_a_typed_error(tmp_path, store_path):
    src = tmp_path / "notes.txt"
    src.write_text("hello")
    with pytest.raises(ckstore.CkstoreError, match="notes.txt"):
        import_checkpoint(src, store_path, step=1)
    with pytest.raises(ckstore.CkstoreError, match="missing"):
        import_checkpoint(tmp_path / "missing", store_path, step=1)
    with pytest.raises(ckstore.InvalidArgumentError, match="format"):
        import_checkpoint(src, store_path, step=1, format="keras")


# ---------------------------------------------------------------- Lightning


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory):
    L = pytest.importorskip("lightning")

    class Tiny(L.LightningModule):
        def __init__(self, lr: float = 0.05, width: int = 4):
            super().__init__()
            self.save_hyperparameters()
            self.layer = torch.nn.Linear(width, 1)

        def training_step(self, batch, _):
            loss = self.layer(batch[0]).pow(2).mean()
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}

    root = tmp_path_factory.mktemp("lightning")
    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=2)
    callback = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, monitor="train_loss", save_top_k=1, every_n_train_steps=3)
    trainer = L.Trainer(
        max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[callback], accelerator="cpu"
    )
    module = Tiny()
    trainer.fit(module, data)
    (path,) = root.glob("*.ckpt")
    return path, Tiny, module


def test_lightning_ckpt_round_trips(lightning_ckpt, store_path):
    path, Tiny, trained_module = lightning_ckpt
    before = tree_digest(path.parent)
    result = import_checkpoint(path, store_path, name="pl")
    assert tree_digest(path.parent) == before
    source = torch.load(path, weights_only=True)
    assert result.format == "lightning" and result.info.step == source["global_step"] == 3
    assert set(result.info.metrics) == {"train_loss"}  # the ModelCheckpoint's monitored score at that step
    with ckstore.Store(store_path, readonly=True) as store:
        assert store.verify("pl") == []
        restored = store.load(step="pl")
        assert_same(restored, source)
        module = Tiny()
        store.load({"state_dict": module}, step="pl")
    assert_same(module.state_dict(), trained_module.state_dict())
    assert restored["hyper_parameters"] == {"lr": 0.05, "width": 4}
    from ckstore.integrations import lightning as ck_lightning  # what the Lightning adapter resumes from

    assert_same(ck_lightning.load_checkpoint(store_path, "pl"), source)


# ---------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = (torch.arange(8) + i) % 32
            return {"input_ids": ids, "labels": ids}

    out = tmp_path_factory.mktemp("hf")
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=2, save_steps=2, per_device_train_batch_size=4, report_to=[], logging_steps=1,
        use_cpu=True, disable_tqdm=True, save_strategy="steps",
    )
    transformers.Trainer(model=model, args=args, train_dataset=Data()).train()
    return out / "checkpoint-2", model, transformers


def test_hf_checkpoint_dir_round_trips(hf_checkpoint, store_path):
    src, trained_model, transformers = hf_checkpoint
    import random

    import numpy as np
    from safetensors.torch import load_file

    before = tree_digest(src)
    result = import_checkpoint(src, store_path)
    assert tree_digest(src) == before
    assert result.format == "hf" and result.info.step == 2
    assert "training_args.bin" in result.skipped  # a pickled TrainingArguments: code, not data
    assert set(result.info.metrics) == {"loss"}  # as CkstoreTrainer records them: loss and eval_*
    with ckstore.Store(store_path, readonly=True) as store:
        assert store.verify(2) == []
        restored = store.load(step=2)
        assert_same(restored["model"], load_file(src / "model.safetensors"))
        for key, file in [("optimizer", "optimizer.pt"), ("scheduler", "scheduler.pt")]:
            assert_same(restored[key], torch.load(src / file, weights_only=True))
        assert restored["trainer_state"] == (src / "trainer_state.json").read_text()
        assert restored["hf"]["model"]["config"] == (src / "config.json").read_text()
        # The Trainer's RNG file, as one ckstore.RNGState state per rank: every generator lands where it was.
        with importers.numpy_allowed():
            saved_rng = torch.load(src / "rng_state.pth", weights_only=True)
        (rng,) = restored["rng"]
        ckstore.RNGState().load_state_dict(rng)
        assert random.getstate() == saved_rng["python"]
        assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(np.random.get_state(), saved_rng["numpy"]))
        assert torch.equal(torch.get_rng_state(), saved_rng["cpu"])
        # Into the same objects: a model from the config, and its optimizer, load bitwise; the logits match.
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config.from_dict(json.loads(restored["hf"]["model"]["config"])))
        with pytest.warns(ckstore.StateMismatchWarning):  # lm_head.weight is tied to wte: stored once, as HF does
            store.load({"model": model}, step=2, strict=False)
    ids = torch.arange(8).unsqueeze(0)
    model.eval(), trained_model.eval()
    assert torch.equal(model(ids).logits, trained_model(ids).logits)


# ---------------------------------------------------------------- DCP


def test_dcp_directory_round_trips(tmp_path, store_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    model, opt, _ = trained()
    src = tmp_path / "dcp"
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "extra": {"epoch": 4, "names": ["a", "b"]}, "step": 40}
    with pytest.warns(UserWarning):  # single process, no process group
        dcp.save(state, checkpoint_id=str(src))
    before = tree_digest(src)
    result = import_checkpoint(src, store_path)
    assert tree_digest(src) == before
    assert result.format == "dcp" and result.info.step == 40
    reference = tmp_path / "reference.pt"
    dcp_to_torch_save(src, reference)  # DCP's own reader (a trusted source, written above), for comparison
    with ckstore.Store(store_path, readonly=True) as store:
        assert store.verify(40) == []
        restored = store.load(step=40)
        m2, _, _ = fresh()
        store.load({"model": m2}, step=40)
    assert_same(restored, torch.load(reference, weights_only=True))
    assert_same(m2.state_dict(), model.state_dict())


def test_dcp_metadata_that_needs_code_execution_is_refused(tmp_path, store_path):
    import torch.distributed.checkpoint as dcp

    src = tmp_path / "dcp"
    with pytest.warns(UserWarning):
        dcp.save({"w": torch.ones(2)}, checkpoint_id=str(src))
    (src / ".metadata").write_bytes(pickle.dumps(RunsCode()))
    with pytest.raises(UnsafePickleError, match="system") as excinfo:
        import_checkpoint(src, store_path, step=1)
    assert excinfo.value.path == str(src / ".metadata")


# ---------------------------------------------------------------- the command


def test_cli_import(capsys, tmp_path, store_path):
    model, opt, _ = trained()
    src = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, src)
    code = main(["import", str(src), str(store_path), "--step", "7", "--name", "old", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    payload = json.loads(out)
    assert payload["step"] == 7 and payload["format"] == "torch" and payload["tags"] == ["old"] and payload["skipped"] == []
    assert err == ""  # no progress under --json
    code = main(["import", str(src), str(store_path)])
    out, err = capsys.readouterr()
    assert code == 2 and "--step" in err and "step=" not in err
    evil = tmp_path / "evil.pt"
    torch.save({"x": RunsCode()}, evil)
    code = main(["import", str(evil), str(store_path), "--step", "8", "--json"])
    out, err = capsys.readouterr()
    assert code == 2 and json.loads(out)["error"] == "UnsafePickleError" and "system" in err


def test_an_import_that_cannot_be_stored_commits_nothing(tmp_path, store_path):
    """Atomic like any save: a value ckstore refuses (a set) fails the whole import, and nothing is committed."""
    src = tmp_path / "with_set.pt"
    torch.save({"w": torch.ones(1000), "ids": {1, 2, 3}}, src)
    with pytest.raises(ckstore.StateError, match="ids"):
        import_checkpoint(src, store_path, step=3)
    with ckstore.Store(store_path, readonly=True) as store:
        assert store.checkpoints() == []
    assert not any((store_path / ".staging").iterdir())


@pytest.mark.guarantee("G16")
def test_the_importer_unpickles_only_through_weights_only_or_an_allowlist():
    """The one module that reads pickles (other tools' files; a store never holds one): every torch.load passes
    weights_only=True, nothing calls pickle.load/loads, and each Unpickler subclass overrides find_class."""
    import ast

    tree = ast.parse(Path(importers.__file__).read_text())
    watched = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler")}
    loads = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and isinstance(n.func.value, ast.Name) and (n.func.value.id, n.func.attr) in watched]
    assert loads and all(n.func.value.id == "torch" for n in loads), "only torch.load, never pickle.load/loads/Unpickler(...)"
    for call in loads:
        assert any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                   for k in call.keywords), call.lineno
    unpicklers = [c for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and any(ast.unparse(b) == "pickle.Unpickler" for b in c.bases)]
    assert unpicklers and all(any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in c.body) for c in unpicklers)


def test_numpy_arrays_import_but_object_arrays_are_refused(tmp_path, store_path):
    import numpy as np

    plain = tmp_path / "np.pt"
    torch.save({"w": torch.ones(2), "a": np.arange(5, dtype=np.uint32)}, plain)
    with ckstore.Store(store_path) as store:
        import_checkpoint(plain, store, step=1)
        assert_same(store.load(step=1)["a"], np.arange(5, dtype=np.uint32))
    objects = tmp_path / "obj.pt"
    torch.save({"a": np.array([Payload()], dtype=object)}, objects)
    with pytest.raises(UnsafePickleError):
        import_checkpoint(objects, store_path, step=2)
