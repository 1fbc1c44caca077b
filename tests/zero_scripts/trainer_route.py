"""The HF Trainer route: ``optim="adamw_weyl"`` + a DeepSpeed config (recipes/configs/ds_zero{2,3}.json).

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/zero_scripts/trainer_route.py OUT.json

Trains the same tiny model with each σ mode under ZeRO-2 and with vector_reduce under ZeRO-3: all end
with the same weights (the σ's agree), and differ from plain AdamW (the cap binds). Under CPU optimizer
offload the Trainer adds ``zero_force_ds_cpu_optimizer: false`` for the AdamWeyl it builds, which then ends
where ZeRO-2 without offload did; a config that sets it true is refused when the optimizer is built. An
AdamWeyl passed as ``optimizers=`` (which transformers drops under DeepSpeed) is refused when training starts.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from torch import nn
from transformers import PretrainedConfig, Trainer, TrainingArguments

import hf_weyl  # registers optim="adamw_weyl"
from hf_weyl import unwrap_adamweyl

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = PretrainedConfig(hidden_size=24)  # fills the configs' "auto" bucket sizes
        torch.manual_seed(0)
        self.a = nn.Linear(12, 24, bias=False)
        self.b = nn.Linear(24, 10)
        self.d = nn.Linear(10, 3, bias=False)

    def forward(self, x, labels):
        out = self.d(torch.tanh(self.b(torch.tanh(self.a(x)))))
        return {"loss": ((out - labels) ** 2).mean()}


class Data(torch.utils.data.Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(7)
        self.x, self.y = torch.randn(n, 12, generator=g), torch.randn(n, 3, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def train(config, optim="adamw_weyl", optim_args=None, optimizer_before=None):
    """``optimizer_before(model)``: an optimizer built before the TrainingArguments announce the DeepSpeed config,
    passed as ``Trainer(optimizers=(opt, None))``."""
    model = Net()
    optimizer = optimizer_before(model) if optimizer_before is not None else None
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf_weyl_trainer_"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        optim=optim,
        optim_args=optim_args,
        deepspeed=config,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        seed=0,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=True,  # CPU-only CI: accelerate sets up gloo; on GPUs drop this
    )
    trainer = Trainer(model=model, args=args, train_dataset=Data(), optimizers=(optimizer, None))
    trainer.train()
    params = list(trainer.model_wrapped.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        weights = {n: p.detach().clone() for n, p in params}
    return trainer, weights


def close(a, b, rtol=1e-6, atol=1e-7):
    return all(torch.allclose(a[n], b[n], rtol=rtol, atol=atol) for n in a)


def main():
    out = sys.argv[1]
    results = {}

    def run(name, fn):
        try:
            fn()
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to pytest
            results[name] = traceback.format_exc()

    runs = {}

    def weyl(stage, mode):
        trainer, weights = train(str(CONFIGS / f"ds_zero{stage}.json"), optim_args=f"tau=0.01,sigma_mode={mode}")
        opt = unwrap_adamweyl(trainer.optimizer)
        assert opt is not None, f"the Trainer's optimizer is {type(trainer.optimizer)}, not AdamWeyl"
        assert opt.last_stats is not None and opt.last_stats.engine == "deepspeed_zero", "AdamWeyl's ZeRO path did not run"
        assert all(g["sigma_mode"] == mode for g in opt.param_groups)
        assert any(float(r) < 1 for r in opt.last_stats.lr_ratio), "the cap never bound"
        runs[(stage, mode)] = weights

    run("trainer_zero2_vector_reduce", lambda: weyl(2, "vector_reduce"))
    run("trainer_zero2_gather", lambda: weyl(2, "gather"))
    run("trainer_zero3_vector_reduce", lambda: weyl(3, "vector_reduce"))

    def agree():
        base = runs[(2, "vector_reduce")]
        assert close(runs[(2, "gather")], base), "σ modes disagree under the Trainer"
        assert close(runs[(3, "vector_reduce")], base), "ZeRO-3 disagrees with ZeRO-2"
        _, adamw = train(str(CONFIGS / "ds_zero2.json"), optim="adamw_torch")
        assert not close(adamw, base, rtol=1e-3, atol=1e-5), "AdamWeyl ended where AdamW did: the cap had no effect"

    run("trainer_routes_agree", agree)

    def refuse_offload():  # a user who set zero_force_ds_cpu_optimizer: true is not overridden
        cfg = offload_config()
        cfg["zero_force_ds_cpu_optimizer"] = True
        try:
            train(cfg)
        except ValueError as err:
            assert "zero_force_ds_cpu_optimizer" in str(err), str(err)
            return
        raise AssertionError("optimizer offload with zero_force_ds_cpu_optimizer: true was not refused")

    def offload_config():
        cfg = json.loads((CONFIGS / "ds_zero2.json").read_text())
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        return cfg

    def adamweyl(model):
        return hf_weyl.AdamWeyl(model.parameters(), lr=0.05, tau=0.01)

    def optimizers_dropped(config):  # AdamWeyl passed as optimizers=: transformers would drop it under DeepSpeed
        try:
            train(config, optim="adamw_torch", optimizer_before=adamweyl)
        except ValueError as err:
            assert "drops a passed optimizer" in str(err) and "optim='adamw_weyl'" in str(err), str(err)
            return
        raise AssertionError("Trainer(optimizers=(AdamWeyl, None)) under DeepSpeed trained another optimizer")

    def offload_route(pin_memory):  # optim="adamw_weyl" under CPU offload: the keep line arranged, AdamWeyl steps
        cfg = offload_config()
        cfg["zero_optimization"]["offload_optimizer"]["pin_memory"] = pin_memory
        trainer, weights = train(cfg, optim_args="tau=0.01")
        opt = unwrap_adamweyl(trainer.optimizer)
        assert opt is not None, f"the Trainer's optimizer is {type(trainer.optimizer)}, not AdamWeyl"
        assert opt.last_stats is not None and opt.last_stats.engine == "deepspeed_zero", "AdamWeyl's ZeRO path did not run"
        assert trainer.accelerator.state.deepspeed_plugin.deepspeed_config["zero_force_ds_cpu_optimizer"] is False
        assert close(weights, runs[(2, "vector_reduce")]), "ZeRO-2 with offload ended elsewhere than without"

    run("trainer_optimizers_passed_refused", lambda: optimizers_dropped(str(CONFIGS / "ds_zero2.json")))
    run("trainer_optimizers_passed_offload_refused", lambda: optimizers_dropped(offload_config()))
    run("trainer_zero2_offload", lambda: offload_route(False))
    run("trainer_zero2_offload_pinned", lambda: offload_route(True))
    run("trainer_refuses_offload", refuse_offload)

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        merged = {n: next((r[n] for r in gathered if r.get(n, "ok") != "ok"), "ok") for n in results}
        with open(out, "w") as f:
            json.dump(merged, f, indent=1)


if __name__ == "__main__":
    deepspeed.init_distributed(dist_backend="gloo")
    main()
