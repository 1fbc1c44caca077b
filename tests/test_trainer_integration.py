"""optim="adamw_weyl" through TrainingArguments, HfArgumentParser and Trainer (offline, random GPT-2)."""

import math

import pytest
import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

import hf_weyl
from conftest import TokenDataset, make_tiny_gpt2, trainer_args
from hf_weyl import AdamWeyl, optimizer_kwargs_from_optim_args
from hf_weyl.integrations.trainer import OPTIM_ARGS, TRAINER_FLAGS, TRAINER_ONLY_ARGS


args = trainer_args


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


def test_every_constructor_option_is_reachable_through_optim_args_or_a_trainer_flag():
    import dataclasses
    import inspect

    options = set(inspect.signature(AdamWeyl.__init__).parameters) - {"self", "params", "betas"}
    assert options | {"beta1", "beta2"} == set(OPTIM_ARGS) - set(TRAINER_ONLY_ARGS) | set(TRAINER_FLAGS)
    assert set(TRAINER_FLAGS.values()) <= {f.name for f in dataclasses.fields(TrainingArguments)}
    kw = optimizer_kwargs_from_optim_args("tau=0.01,power_iters=3,cap_vectors=no,cold_start_iters=2,sigma_mode=gather")
    assert kw == {"tau": 0.01, "power_iters": 3, "cap_vectors": False, "cold_start_iters": 2, "sigma_mode": "gather"}


@pytest.mark.parametrize(
    "optim_args,match",
    [
        ("tua=0.01", "unknown key 'tua'"),
        ("tau=abc", "cannot parse tau='abc'"),
        ("power_iters=1.5", "cannot parse power_iters"),
        ("cap_vectors=maybe", "cannot parse cap_vectors"),
        ("tau", "entry 'tau', which is not key=value"),
        ("tau=0.01,", "entry '', which is not key=value"),
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


# --- optim_args under the Trainer: every key takes effect or is refused (issue 10) ------------------------------


@pytest.mark.parametrize(
    "optim_args,flag",
    [("weight_decay=0.3", "--weight_decay"), ("lr=1e-2", "--learning_rate"), ("eps=1e-6", "--adam_epsilon"),
     ("beta1=0.5", "--adam_beta1"), ("beta2=0.9", "--adam_beta2")],
)
def test_trainer_flags_in_optim_args_are_refused_naming_the_flag(tmp_path, optim_args, flag):
    """weight_decay in optim_args was silently beaten by the Trainer's per-group weight_decay; the other Trainer
    options have one spelling (the TrainingArguments flag), so that training_args.json says what ran."""
    trainer = Trainer(model=make_tiny_gpt2(), args=args(tmp_path, optim="adamw_weyl", optim_args=optim_args))
    with pytest.raises(ValueError, match=flag) as err:
        trainer.create_optimizer()
    assert optim_args.split("=")[0] in str(err.value)


def test_every_optim_args_key_takes_effect_in_a_trainer_run(tmp_path):
    """The accepted keys reach the param groups the steps read, and survive the scheduler; a tiny τ caps."""
    torch.manual_seed(0)
    a = args(tmp_path, optim="adamw_weyl", learning_rate=3e-3, max_steps=2, per_device_train_batch_size=4,
             lr_scheduler_type="cosine", optim_args="tau=0.0005,power_iters=3,cold_start_iters=6,cap_vectors=yes,"
             "sigma_mode=gather")
    trainer = Trainer(model=make_tiny_gpt2(), args=a, train_dataset=TokenDataset())
    trainer.train()
    opt = hf_weyl.unwrap_adamweyl(trainer.optimizer)
    for g in opt.param_groups:
        assert (g["tau"], g["power_iters"], g["cold_start_iters"], g["cap_vectors"], g["sigma_mode"]) == (
            0.0005, 3, 6, True, "gather")
    stats = opt.last_stats
    assert bool(stats.capped.all())  # cap_vectors=yes: the 1-D tensors are capped too
    assert stats.num_capped > 0  # τ = 0.0005 binds at lr 3e-3


@pytest.mark.parametrize("optim_args", ["tau=0.01,", "tau", "tau==1", "tau:0.01", "tau=0.01;power_iters=2", ",tau=1"])
def test_malformed_optim_args_get_our_message_under_the_trainer(tmp_path, optim_args):
    """transformers splits optim_args on ',' and '=' before any handler runs; a string it cannot split used
    to end in a bare 'not enough values to unpack'."""
    trainer = Trainer(model=make_tiny_gpt2(), args=args(tmp_path, optim="adamw_weyl", optim_args=optim_args))
    with pytest.raises(ValueError, match="key=value") as err:
        trainer.create_optimizer()
    assert "tau" in str(err.value) and "power_iters" in str(err.value) and repr(optim_args) in str(err.value)


def test_duplicate_optim_args_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'tau' given twice"):
        optimizer_kwargs_from_optim_args("tau=1,tau=2")
    trainer = Trainer(model=make_tiny_gpt2(), args=args(tmp_path, optim="adamw_weyl", optim_args="tau=0.1,tau=0.2"))
    with pytest.raises(ValueError, match="'tau' given twice"):
        trainer.create_optimizer()


@pytest.mark.parametrize("optim_args", ["tau=nan", "tau=inf", "tau=1e309", "tau=-inf"])
def test_non_finite_optim_args_are_refused(optim_args):
    with pytest.raises(ValueError, match="finite"):
        optimizer_kwargs_from_optim_args(optim_args)


@pytest.mark.parametrize("optim_args", ["lr=1e309", "eps=inf"])
def test_non_finite_trainer_keys_are_refused(optim_args):
    with pytest.raises(ValueError, match="TrainingArguments|finite"):
        optimizer_kwargs_from_optim_args(optim_args)


def test_missing_transformers_internals_fail_closed_naming_the_version(monkeypatch):
    import transformers
    from transformers import trainer_optimizer

    monkeypatch.delattr(trainer_optimizer, "_OPTIMIZER_HANDLERS")
    with pytest.raises(RuntimeError, match=f"transformers {transformers.__version__}.*_OPTIMIZER_HANDLERS"):
        hf_weyl.register_with_transformers()


@pytest.mark.parametrize("steps, tau", [(100, 0.03), (1000, 0.03), (1200, 0.025), (2400, 0.0125), (3000, 0.01), (100_000, 0.01)])
def test_tau_for_steps_is_the_documented_rule(steps, tau):
    assert hf_weyl.tau_for_steps(steps) == pytest.approx(tau)


@pytest.mark.parametrize("steps", [0, -1, 2.5, True, "100"])
def test_tau_for_steps_refuses_what_is_not_a_step_count(steps):
    with pytest.raises(ValueError, match="num_training_steps must be an integer >= 1"):
        hf_weyl.tau_for_steps(steps)


def test_tau_auto_derives_tau_from_max_steps(tmp_path):
    trainer = Trainer(model=make_tiny_gpt2(), args=args(tmp_path, optim="adamw_weyl", optim_args="tau=auto", max_steps=2400))
    opt = trainer.create_optimizer()
    assert all(g["tau"] == pytest.approx(0.0125) for g in opt.param_groups)


# tau=auto in epoch-based runs (the total from the Trainer) and its refusal: tests/test_trainer_callback.py
