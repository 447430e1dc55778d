"""One Trainer checkpoint save: the Trainer's own, the Trainer's own plus an fsync of each file, and CkstoreTrainer's.

``python -m benchmarks.hf_trainer_save DIR`` trains an 82M-parameter GPT-2 (6 layers, from a config, no
download) one step on CPU and times ``Trainer._save_checkpoint`` three times for each (about 0.9 GB a
checkpoint: weights, AdamW state, scheduler, RNG, trainer state). The Trainer's own save is not durable when it
returns; fsyncing its files afterwards is what it would take to make it so. CkstoreTrainer's time includes the
fsyncs, the commit rename and retention. DIR should be on the disk that matters; it is left with the checkpoints.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from ckstore.integrations.hf import CkstoreTrainer  # noqa: E402


class _Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        x = torch.randint(0, 50257, (32,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": x, "labels": x}


def _fsync_tree(root: str) -> None:
    for parent, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(parent, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def run(cls: type, out: str, *, fsync: bool) -> list[float]:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=6, bos_token_id=0, eos_token_id=0))
    args = TrainingArguments(out, per_device_train_batch_size=2, max_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = cls(model=model, args=args, train_dataset=_Tokens())
    trainer.train()
    times = []
    for step in (1, 2, 3):
        trainer.state.global_step = step
        os.sync()  # nothing of the previous case's write-back is paid here
        started = time.perf_counter()
        trainer._save_checkpoint(trainer.model, None)
        if fsync:
            _fsync_tree(os.path.join(out, f"checkpoint-{step}"))
        times.append(time.perf_counter() - started)
    if isinstance(trainer, CkstoreTrainer):
        trainer.store.close()
    return times


def main(argv: list[str]) -> None:
    base = argv[0] if argv else "."
    for name, cls, fsync in (("Trainer", Trainer, False), ("Trainer + fsync", Trainer, True), ("CkstoreTrainer", CkstoreTrainer, False)):
        times = run(cls, tempfile.mkdtemp(dir=base), fsync=fsync)
        print(f"{name:16s} " + " ".join(f"{t:.2f}s" for t in times), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
