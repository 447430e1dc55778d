"""CkstoreTrainer: a tiny GPT-2 Trainer run SIGKILLed mid-run and resumed equals the uninterrupted run.

Every run is a real subprocess (the same script), killed with a real SIGKILL while it waits at a known
step, after its last checkpoint committed and before the next one. The script prints JSON lines: the loss
of every step, and at each save step of the uninterrupted run (and at the start of a resumed one) a digest
of the model parameters and optimizer state, the scheduler's LR, the global step and the epoch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import ckstore

pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"

from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments  # noqa: E402

from ckstore.integrations.export import export_hf  # noqa: E402
from ckstore.integrations.hf import BEST_TAG, CkstoreTrainer, retention_from_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys, time
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments, TrainerCallback, set_seed
    from transformers import Trainer
    from ckstore.integrations.hf import CkstoreTrainer

    out, resume, pause_at, native = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4] == "native"
    background = sys.argv[5] == "background"

    class Tokens(torch.utils.data.Dataset):
        def __init__(self):
            self.x = torch.randint(0, 128, (40, 16), generator=torch.Generator().manual_seed(0))
        def __len__(self):
            return len(self.x)
        def __getitem__(self, i):
            return {"input_ids": self.x[i], "labels": self.x[i]}

    def emit(event):
        # One write(2) per line: two ranks share torchrun's stdout, and a pipe keeps a write this small whole.
        os.write(1, ("@@" + json.dumps(event) + "\\n").encode())

    def digest(tensors):
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def report(event, state, model, optimizer, scheduler):
        if int(os.environ.get("RANK", "0")) != 0:
            return
        opt_tensors = [v for s in optimizer.state.values() for _, v in sorted(s.items())]
        emit({"event": event, "step": state.global_step, "epoch": state.epoch, "lr": scheduler.get_last_lr(),
              "params": digest(model.parameters()), "optimizer": digest(opt_tensors), "opt_entries": len(optimizer.state)})

    class Probe(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if "loss" in logs and args.process_index == 0:  # the loss is averaged over ranks: one line
                emit({"event": "loss", "step": state.global_step, "loss": logs["loss"]})
        def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
            if resume:
                report("resumed", state, model, optimizer, lr_scheduler)
            else:
                torch.manual_seed(100 + args.process_index)  # each rank its own dropout masks: a swapped RNG shows
        def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
            if state.global_step % args.save_steps == 0:
                report("saving", state, model, optimizer, lr_scheduler)
            if state.global_step == pause_at:
                if background:
                    trainer.store.wait()  # the kill comes after the last save committed (as the test expects)
                emit({"event": "paused", "step": state.global_step, "pid": os.getpid()})
                time.sleep(600)  # the test SIGKILLs us here

    set_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=16, tie_word_embeddings=True,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)  # dropout on: the RNG state matters
    args = TrainingArguments(out, per_device_train_batch_size=4, num_train_epochs=2, logging_steps=1, save_steps=4,
                             save_total_limit=2, seed=0, report_to=[], use_cpu=True, lr_scheduler_type="linear",
                             warmup_steps=2, disable_tqdm=True)
    extra = {} if native else {"background": background}
    trainer = (Trainer if native else CkstoreTrainer)(model=model, args=args, train_dataset=Tokens(), callbacks=[Probe()], **extra)
    trainer.train(resume_from_checkpoint=True if resume else None)
    report("final", trainer.state, trainer.model, trainer.optimizer, trainer.lr_scheduler)
    """
)


def _run(
    script: Path, out: Path, *, resume: bool, pause_at: int = 0, native: bool = False, background: bool = False, ranks: int = 1
) -> list[dict]:
    """Run the script (under torchrun with ``ranks`` > 1); with ``pause_at`` SIGKILL every rank once all wait at that step.

    Returns the script's JSON events.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "default"}
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    proc = subprocess.Popen(
        [*launcher, str(script), str(out), "1" if resume else "0", str(pause_at), "native" if native else "ckstore",
         "background" if background else "blocking"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    events, paused = [], []
    try:
        for line in proc.stdout:
            at = line.find("@@")  # the Trainer's own prints are buffered: a flush may end mid-line, before ours
            if at >= 0:
                events.append(json.loads(line[at + 2 :]))
                if events[-1]["event"] == "paused":
                    paused.append(events[-1]["pid"])
                    if len(paused) == ranks:
                        for pid in paused:  # the training processes themselves (torchrun puts each in its own session)
                            os.kill(pid, signal.SIGKILL)
                        break
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    proc.stderr.close()
    proc.stdout.close()
    if pause_at and ranks == 1:
        assert proc.returncode == -signal.SIGKILL, stderr
    elif pause_at:
        assert proc.returncode != 0 and len(paused) == ranks, stderr  # torchrun reports its killed workers
    else:
        assert proc.returncode == 0, stderr
    events.append({"event": "stderr", "text": stderr})
    return events


def _losses(events: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events if e["event"] == "loss"}


def _one(events: list[dict], kind: str, step: int | None = None) -> dict:
    found = [e for e in events if e["event"] == kind and (step is None or e["step"] == step)]
    assert len(found) == 1, (kind, step, events)
    return found[0]


def _same_state(resumed: dict, reference: dict) -> None:
    for field in ("step", "epoch", "lr", "params", "optimizer", "opt_entries"):
        assert resumed[field] == reference[field], (field, resumed, reference)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted run (blocking saves), and a run with background saves SIGKILLed at step 10 (4 and 8 committed)."""
    base = tmp_path_factory.mktemp("hf")
    script = base / "train.py"
    script.write_text(SCRIPT)
    reference = _run(script, base / "reference", resume=False)
    killed = _run(script, base / "killed", resume=False, pause_at=10, background=True)
    return {"script": script, "base": base, "reference": reference, "killed": killed}


@pytest.mark.guarantee("G18")
def test_sigkill_and_resume_equals_uninterrupted_run(runs, tmp_path) -> None:
    reference = runs["reference"]
    out = tmp_path / "run"
    shutil.copytree(runs["base"] / "killed", out)
    with ckstore.Store(out / "ckstore", readonly=True) as store:
        assert [c.step for c in store.checkpoints()] == [4, 8]
    resumed = _run(runs["script"], out, resume=True)
    # Global step, epoch, scheduler LR, parameters and optimizer state at the resume are those of step 8.
    _same_state(_one(resumed, "resumed"), _one(reference, "saving", 8))
    assert _one(resumed, "resumed")["epoch"] == pytest.approx(0.8)
    # The loss of every step after the resume equals the uninterrupted run's, bit for bit.
    ref_losses, killed_losses, resumed_losses = _losses(reference), _losses(runs["killed"]), _losses(resumed)
    assert sorted(resumed_losses) == list(range(9, 21))
    assert resumed_losses == {s: ref_losses[s] for s in range(9, 21)}
    assert killed_losses == {s: ref_losses[s] for s in range(1, 10)}  # the killed run was the same run until the kill
    _same_state(_one(resumed, "final"), _one(reference, "final"))
    with ckstore.Store(out / "ckstore", readonly=True) as store:
        assert [c.step for c in store.checkpoints()] == [16, 20]  # save_total_limit=2 is keep_last=2
        assert not store.verify()


@pytest.mark.guarantee("G4", "G18")
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(runs, tmp_path) -> None:
    reference = runs["reference"]
    out = tmp_path / "run"
    shutil.copytree(runs["base"] / "killed", out)
    newest = out / "ckstore" / "checkpoints" / "step-00000008"
    victim = newest / "model.transformer.safetensors"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit inside a weight
    victim.write_bytes(bytes(raw))
    resumed = _run(runs["script"], out, resume=True)
    assert "CorruptCheckpointWarning" in _one(resumed, "stderr")["text"]
    _same_state(_one(resumed, "resumed"), _one(reference, "saving", 4))
    ref_losses = _losses(reference)
    assert _losses(resumed) == {s: ref_losses[s] for s in range(5, 21)}
    _same_state(_one(resumed, "final"), _one(reference, "final"))
    with ckstore.Store(out / "ckstore", readonly=True) as store:
        assert [c.step for c in store.checkpoints()] == [16, 20]
        assert any(e.step == 8 for e in store.quarantine())  # the corrupt step 8, moved aside when step 8 was saved again


def test_imported_trainer_checkpoint_resumes_through_ckstore(runs, tmp_path) -> None:
    """A plain Trainer's checkpoint-8 (its own files), imported with ckstore import, resumes in CkstoreTrainer."""
    from ckstore.integrations.importers import import_checkpoint

    reference = runs["reference"]
    out = tmp_path / "run"
    native = _run(runs["script"], out, resume=False, pause_at=10, native=True)
    ref_losses = _losses(reference)
    assert _losses(native) == {s: ref_losses[s] for s in range(1, 10)}  # saving through ckstore changes no step
    with ckstore.Store(out / "ckstore") as store:
        assert import_checkpoint(out / "checkpoint-8", store).info.step == 8
        export_hf(store, 8, tmp_path / "exported")  # the imported checkpoint exports as the Trainer wrote it
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "exported" / name).read_text()) == json.loads((out / "checkpoint-8" / name).read_text())
    assert (tmp_path / "exported" / "model.safetensors").read_bytes() == (out / "checkpoint-8" / "model.safetensors").read_bytes()
    resumed = _run(runs["script"], out, resume=True)
    _same_state(_one(resumed, "resumed"), _one(reference, "saving", 8))
    assert _losses(resumed) == {s: ref_losses[s] for s in range(9, 21)}
    _same_state(_one(resumed, "final"), _one(reference, "final"))


@pytest.mark.guarantee("G18")
def test_two_ranks_sigkilled_resume_with_each_rank_rng(runs, tmp_path) -> None:
    """DDP on CPU (gloo): rank 0 writes, each rank's RNG is gathered and restored to that rank."""
    script = runs["script"]
    reference = _run(script, tmp_path / "reference", resume=False, ranks=2)
    out = tmp_path / "run"
    killed = _run(script, out, resume=False, pause_at=6, ranks=2)  # 2 x 4 samples a step: 5 steps an epoch
    with ckstore.Store(out / "ckstore", readonly=True) as store:
        assert [c.step for c in store.checkpoints()] == [4]
        assert len(store.load(None, step=4)["rng"]) == 2
    resumed = _run(script, out, resume=True, ranks=2)
    logs = "\n".join(_one(run, "stderr")["text"][-4000:] for run in (reference, killed, resumed))  # for a failure's report
    _same_state(_one(resumed, "resumed"), _one(reference, "saving", 4))
    ref_losses = _losses(reference)
    assert _losses(killed) == {s: ref_losses[s] for s in range(1, 6)}, logs  # step 6 is logged after the pause
    assert _losses(resumed) == {s: ref_losses[s] for s in range(5, 11)}, logs
    _same_state(_one(resumed, "final"), _one(reference, "final"))


# ---------------------------------------------------------------- in-process: best, retention, arguments


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 24, seed: int = 0) -> None:
        self.x = torch.randint(0, 128, (n, 16), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _model(tie: bool = True) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=16, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def _args(out: Path, **kwargs) -> TrainingArguments:
    base = dict(per_device_train_batch_size=4, max_steps=12, logging_steps=1, save_steps=2, seed=0, report_to=[], use_cpu=True, disable_tqdm=True)
    return TrainingArguments(str(out), **{**base, **kwargs})


@pytest.mark.guarantee("G10")
def test_best_survives_save_total_limit_and_is_loaded_at_end(tmp_path) -> None:
    # greater_is_better on the eval loss makes an early checkpoint the best, so keep_last=1 alone would delete it.
    args = _args(
        tmp_path, eval_strategy="steps", eval_steps=2, save_total_limit=1, load_best_model_at_end=True,
        metric_for_best_model="loss", greater_is_better=True, learning_rate=5e-3,
    )  # fmt: skip
    trainer = CkstoreTrainer(model=_model(), args=args, train_dataset=_Tokens(), eval_dataset=_Tokens(8, seed=1))
    trainer.train()
    best = trainer.state.best_global_step
    with ckstore.Store(tmp_path / "ckstore", readonly=True) as store:
        steps = [c.step for c in store.checkpoints()]
        assert best != 12 and steps == [best, 12]  # the best and the last: what the Trainer keeps with save_total_limit=1
        assert store.resolve(BEST_TAG).step == best and store.best().step == best
        assert store.resolve(best).metrics["eval_loss"] == pytest.approx(trainer.state.best_metric)
        weights = store.load(None, step=best)["model"]
    assert trainer.state.best_model_checkpoint == str(tmp_path / "ckstore" / "checkpoints" / f"step-{best:08d}")
    for name, tensor in trainer.model.state_dict().items():  # load_best_model_at_end loaded the best from the store
        assert torch.equal(tensor, weights[name]), name
    assert not list(tmp_path.glob("checkpoint-*"))  # nothing written the Trainer's way


def test_load_best_falls_back_past_a_corrupt_best(tmp_path) -> None:
    args = _args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, learning_rate=5e-3)
    trainer = CkstoreTrainer(model=_model(), args=args, train_dataset=_Tokens(), eval_dataset=_Tokens(8, seed=1))
    trainer.train()
    best = trainer.state.best_global_step
    with ckstore.Store(tmp_path / "ckstore", readonly=True) as store:
        ranked = sorted(store.checkpoints(), key=lambda c: c.metrics["eval_loss"])
        assert ranked[0].step == best
        victim = next(ranked[0].path.glob("model*.safetensors"))
        runner_up = store.load(None, step=ranked[1].step)["model"]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
    with pytest.warns(ckstore.CorruptCheckpointWarning, match=f"step {best}"):
        trainer._load_best_model()  # what load_best_model_at_end runs at the end of train()
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, runner_up[name]), name
    trainer._close_owned_store()


def test_retention_comes_from_training_arguments(tmp_path) -> None:
    args = _args(tmp_path, save_total_limit=3, eval_strategy="steps", load_best_model_at_end=True, metric_for_best_model="accuracy")
    assert retention_from_args(args) == {"keep_last": 3, "keep_best": 1, "metric": "eval_accuracy", "mode": "max"}
    assert retention_from_args(_args(tmp_path)) == {"keep_last": None}
    with pytest.raises(ckstore.InvalidArgumentError, match="keep_last"):
        CkstoreTrainer(model=_model(), args=_args(tmp_path), train_dataset=_Tokens(), store_options={"keep_last": 1})
    with ckstore.Store(tmp_path / "s", keep_last=3) as wrong:  # no keep_best: the best could be deleted
        with pytest.raises(ckstore.InvalidArgumentError, match="keep_best"):
            CkstoreTrainer(model=_model(), args=args, train_dataset=_Tokens(), eval_dataset=_Tokens(4), store=wrong)


def test_resume_arguments_and_empty_store(tmp_path) -> None:
    trainer = CkstoreTrainer(model=_model(), args=_args(tmp_path, max_steps=2), train_dataset=_Tokens())
    assert trainer.checkpoint_steps() == [] and not tmp_path.joinpath("ckstore").exists()  # looking creates nothing
    with pytest.raises(ckstore.CheckpointNotFoundError):
        trainer.train(resume_from_checkpoint=True)  # as the Trainer: True with nothing to resume from is an error
    trainer.train(resume_from_checkpoint=bool(trainer.checkpoint_steps()))
    assert trainer.checkpoint_steps() == [2]
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(ckstore.InvalidArgumentError, match="directory"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    with pytest.raises(ckstore.InvalidArgumentError):
        trainer.train(resume_from_checkpoint=2.5)


def test_model_only_checkpoint_cannot_be_resumed(tmp_path) -> None:
    trainer = CkstoreTrainer(model=_model(), args=_args(tmp_path, max_steps=2, save_only_model=True), train_dataset=_Tokens())
    trainer.train()
    with ckstore.Store(tmp_path / "ckstore", readonly=True) as store:
        assert set(store.load(None, step=2)) == {"model", "hf", "trainer_state"}
    again = CkstoreTrainer(model=_model(), args=_args(tmp_path, max_steps=4, save_only_model=True), train_dataset=_Tokens())
    with pytest.raises(ckstore.StateError, match="optimizer"):
        again.train(resume_from_checkpoint=True)


def test_background_saves_commit_before_train_returns(tmp_path) -> None:
    trainer = CkstoreTrainer(model=_model(), args=_args(tmp_path, max_steps=4), train_dataset=_Tokens(), background=True)
    trainer.train()
    with ckstore.Store(tmp_path / "ckstore", readonly=True) as store:
        assert [c.step for c in store.checkpoints()] == [2, 4]
        assert not store.verify()
        state = json.loads(store.load(None, step=4)["trainer_state"])
    assert state["global_step"] == 4


def test_second_save_at_one_step_adds_metrics_not_a_checkpoint(tmp_path) -> None:
    trainer = CkstoreTrainer(model=_model(), args=_args(tmp_path, max_steps=2), train_dataset=_Tokens())
    trainer.train()
    # The Trainer may ask for a save twice at one global step (a step and an epoch boundary); the first save
    # stands (a committed checkpoint is never rewritten) and metrics logged since are recorded for it.
    trainer.state.log_history.append({"eval_loss": 1.5, "step": 2})
    trainer._save_checkpoint(trainer.model, None)
    trainer._close_owned_store()
    with ckstore.Store(tmp_path / "ckstore", readonly=True) as store:
        assert [c.step for c in store.checkpoints()] == [2]
        assert store.resolve(2).metrics["eval_loss"] == 1.5


def test_import_ckstore_imports_no_framework() -> None:
    code = "import sys, ckstore, ckstore.integrations, ckstore.integrations.export; print(sorted(m for m in ('transformers', 'accelerate') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert out.stdout.strip() == "[]"


warnings.filterwarnings("ignore", message=".*set_vital.*")
