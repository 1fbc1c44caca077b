"""The short training runs of ``scripts/gpu_check.sh``, on the GPU when there is one, else on the CPU.

    python scripts/gpu_check.py trainer                  # HF Trainer, optim="adamw_weyl", a few steps, cap binding
    torchrun --nproc_per_node 1 scripts/gpu_check.py zero2   # deepspeed.initialize, ZeRO-2, world size 1 (NCCL on GPU)
    torchrun --nproc_per_node 1 scripts/gpu_check.py fsdp2   # fully_shard on a 1-rank mesh

Each prints one line ``<run>: ok ...`` (exit 0) or raises. A tiny random GPT-2, nothing downloaded.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import hf_weyl
from hf_weyl import AdamWeyl, unwrap_adamweyl

STEPS, LR, TAU = 6, 3e-2, 0.01
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model.loss_type = "ForCausalLM"
    return model


def batches(n: int = STEPS, batch: int = 8, seq: int = 32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 97, (batch, seq), generator=gen) for _ in range(n)]


def check(opt, engine: str) -> str:
    weyl = unwrap_adamweyl(opt)
    assert weyl is not None, f"the optimizer that stepped is {type(opt).__name__}, not AdamWeyl"
    stats = weyl.last_stats
    assert stats is not None and stats.engine.startswith(engine), f"AdamWeyl's {engine} path did not run"
    capped, low = stats.num_capped, float(stats.lr_ratio.min())
    assert capped > 0, "the cap never bound"
    return f"{capped} tensors capped at the last step, smallest lr ratio {low:.3f}"


def run_trainer() -> str:
    from transformers import Trainer, TrainingArguments

    class Data(torch.utils.data.Dataset):
        rows = torch.cat(batches())

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return {"input_ids": self.rows[i], "labels": self.rows[i]}

    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="hf_weyl_gpu_check_"), optim="adamw_weyl",
                             optim_args=f"tau={TAU}", learning_rate=LR, max_steps=STEPS, per_device_train_batch_size=8,
                             report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=STEPS,
                             use_cpu=DEVICE == "cpu", dataloader_pin_memory=DEVICE != "cpu")
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=Data())
    trainer.train()
    return check(trainer.optimizer, "single_device")


def run_zero2() -> str:
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if DEVICE == "cuda" else "gloo")
    model = tiny_gpt2()
    opt = AdamWeyl(model.parameters(), lr=LR, tau=TAU)
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
              "bf16": {"enabled": DEVICE == "cuda"}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    for batch in batches():
        batch = batch.to(engine.device)
        engine.backward(engine(input_ids=batch, labels=batch).loss)
        engine.step()
    return check(engine.optimizer, "deepspeed_zero")


def run_fsdp2() -> str:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo")
    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    mesh = init_device_mesh(DEVICE, (dist.get_world_size(),))
    model = tiny_gpt2().to(DEVICE)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = AdamWeyl(model.parameters(), lr=LR, tau=TAU)
    for batch in batches():
        batch = batch.to(DEVICE)
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    result = check(opt, "fsdp2")
    dist.destroy_process_group()
    return result


RUNS = {"trainer": run_trainer, "zero2": run_zero2, "fsdp2": run_fsdp2}


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in RUNS:
        sys.exit(f"usage: python scripts/gpu_check.py {{{','.join(RUNS)}}}")
    start = time.perf_counter()
    detail = RUNS[sys.argv[1]]()
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{sys.argv[1]}: ok on {DEVICE} ({torch.cuda.get_device_name() if DEVICE == 'cuda' else 'no GPU'}), "
              f"{STEPS} steps in {time.perf_counter() - start:.1f} s; {detail}; hf_weyl {hf_weyl.__version__}")


if __name__ == "__main__":
    main()
