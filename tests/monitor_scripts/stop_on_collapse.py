"""Two CPU ranks (torchrun, gloo, DDP through the Trainer): ``WeylMonitorCallback(stop_on_collapse=True)``
sees a collapse on rank 0 at step FLAG_STEP; every rank must stop after that same step.

Each rank writes ``<out>/rank<r>.json`` with the step it stopped at. Usage: torchrun --nproc_per_node 2 THIS OUT
"""

import json
import os
import sys
from dataclasses import dataclass

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import hf_weyl  # noqa: F401  (optim="adamw_weyl")
from hf_weyl.monitor import CollapseAlert, CollapseDetector, WeylMonitorCallback

FLAG_STEP, MAX_STEPS = 2, 30


@dataclass
class FlagAt(CollapseDetector):
    """The real detector's bookkeeping, plus an alert at ``FLAG_STEP`` (the detector itself is tested on real
    collapsing runs in test_monitor_collapse.py; here the cross-rank stop is under test)."""

    def update(self, metrics, step):
        new = super().update(metrics, step)
        if step == FLAG_STEP:
            new = [*new, CollapseAlert(step, 0, 0.0, 1.0, 10.0, 1.0, 1.0)]
            self.alerts.extend(new[-1:])
        return new


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        self.rows = torch.randint(0, 97, (256, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def main(out: str) -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=4))
    args = TrainingArguments(
        out, optim="adamw_weyl", max_steps=MAX_STEPS, per_device_train_batch_size=4, use_cpu=True, ddp_backend="gloo",
        report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1,
    )
    callback = WeylMonitorCallback(interval=1, stop_on_collapse=True, detector=FlagAt(), write_jsonl=False)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])
    trainer.train()
    rank = int(os.environ.get("RANK", 0))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world": int(os.environ["WORLD_SIZE"]), "step": trainer.state.global_step}, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # The results are written. Interpreter teardown after a gloo DDP run sometimes aborts a rank ("terminate called
    # without an active exception", exit -6: a C++ thread destroyed while joinable; about 1 run in 5 on torch 2.13
    # + transformers 5.23, before hf_weyl's changes too): skip it.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
