"""optim="adamw_weyl" through TrainingArguments, HfArgumentParser and Trainer (offline, random GPT-2)."""

import math

import pytest
import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

import hf_weyl
from conftest import make_tiny_gpt2, token_batches
from hf_weyl import AdamWeyl, optimizer_kwargs_from_optim_args
from hf_weyl.integrations.trainer import OPTIM_ARGS


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n=32):
        self.rows = torch.cat(token_batches(n // 4))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def test_registration_is_idempotent_and_listed():
    assert hf_weyl.register_with_transformers()
    assert hf_weyl.register_with_transformers()
    members = [m for m in OptimizerNames if m.value == "adamw_weyl"]
    assert len(members) == 1 and OptimizerNames("adamw_weyl") is members[0]


def test_training_arguments_serialise_and_reload(tmp_path):
    a = args(tmp_path, optim="adamw_weyl", optim_args="tau=0.02,power_iters=2")
    assert a.optim == "adamw_weyl"
    assert a.to_dict()["optim"] == "adamw_weyl"
    assert '"optim": "adamw_weyl"' in a.to_json_string()
    torch.save(a, tmp_path / "training_args.bin")
    again = torch.load(tmp_path / "training_args.bin", weights_only=False)
    assert again.optim == "adamw_weyl" and again.optim_args == "tau=0.02,power_iters=2"


def test_cli_parse(tmp_path):
    parser = HfArgumentParser(TrainingArguments)
    (parsed,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "adamw_weyl", "--optim_args", "tau=0.004,cap_vectors=true"]
    )
    assert parsed.optim == OptimizerNames("adamw_weyl")
    assert parsed.optim_args == "tau=0.004,cap_vectors=true"
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", "adamw_wyel"])


def test_trainer_builds_adamweyl_with_its_groups_and_options(tmp_path):
    model = make_tiny_gpt2()
    a = args(
        tmp_path, optim="adamw_weyl", learning_rate=3e-4, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7,
        weight_decay=0.1, optim_args="tau=0.004,power_iters=2,cap_vectors=true,cold_start_iters=5",
    )
    trainer = Trainer(model=model, args=a)
    opt = trainer.create_optimizer()
    assert isinstance(opt, AdamWeyl)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    for g in opt.param_groups:
        assert g["lr"] == 3e-4 and g["betas"] == (0.8, 0.95) and g["eps"] == 1e-7
        assert g["tau"] == 0.004 and g["power_iters"] == 2 and g["cap_vectors"] is True and g["cold_start_iters"] == 5


def test_every_constructor_option_is_reachable_through_optim_args():
    import inspect

    options = set(inspect.signature(AdamWeyl.__init__).parameters) - {"self", "params", "betas"}
    assert options | {"beta1", "beta2"} == set(OPTIM_ARGS)
    kw = optimizer_kwargs_from_optim_args("tau=0.01,power_iters=3,cap_vectors=no,beta1=0.5,eps=1e-6,lr=1e-3")
    assert kw == {"tau": 0.01, "power_iters": 3, "cap_vectors": False, "beta1": 0.5, "eps": 1e-6, "lr": 1e-3}


@pytest.mark.parametrize(
    "optim_args,match",
    [
        ("tua=0.01", "unknown key 'tua'"),
        ("tau=abc", "cannot parse tau='abc'"),
        ("power_iters=1.5", "cannot parse power_iters"),
        ("cap_vectors=maybe", "cannot parse cap_vectors"),
        ("tau", "malformed entry 'tau'"),
    ],
)
def test_bad_optim_args_list_valid_keys(optim_args, match):
    with pytest.raises(ValueError, match=match) as err:
        optimizer_kwargs_from_optim_args(optim_args)
    assert "power_iters" in str(err.value) and "tau" in str(err.value)


def test_bad_optim_args_fail_before_training_starts(tmp_path):
    trainer = Trainer(model=make_tiny_gpt2(), args=args(tmp_path, optim="adamw_weyl", optim_args="tau=-1"),
                      train_dataset=TokenDataset())
    with pytest.raises(ValueError, match="tau"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_trainer_end_to_end(tmp_path):
    torch.manual_seed(0)
    model = make_tiny_gpt2()
    a = args(tmp_path, optim="adamw_weyl", optim_args="tau=0.01", learning_rate=3e-3, max_steps=12,
             per_device_train_batch_size=4, logging_steps=4, lr_scheduler_type="cosine", warmup_steps=0, seed=0)
    trainer = Trainer(model=model, args=a, train_dataset=TokenDataset())
    result = trainer.train()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      AdamWeyl)
    stats = hf_weyl.unwrap_adamweyl(trainer.optimizer).last_stats
    assert stats is not None and stats.lr_ratio.numel() == len(list(model.parameters()))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert result.global_step == 12
