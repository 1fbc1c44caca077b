"""What optim="adamw_weyl" adds to a Trainer run (issue 21): tau=auto from the Trainer's step count in epoch-based
runs, and the cap's statistics in the Trainer's logs, read once per logging step (offline, random GPT-2)."""

import logging
import sys

import pytest
import torch
from transformers import Trainer, TrainerCallback

import hf_weyl
from conftest import TokenDataset, make_tiny_gpt2, token_batches, trainer_args
from hf_weyl.integrations import trainer_callback
from hf_weyl.integrations.trainer import TAU_AUTO_PLACEHOLDER, trainer_options_from_optim_args
from hf_weyl.integrations.trainer_callback import CAP_LOG_KEYS, WeylTrainerCallback


def args(tmp_path, **kw):
    return trainer_args(tmp_path, **{"optim": "adamw_weyl", "per_device_train_batch_size": 4, "learning_rate": 3e-2,
                                     **kw})


class TokenStream(torch.utils.data.IterableDataset):
    def __iter__(self):
        for row in torch.cat(token_batches(8)):
            yield {"input_ids": row, "labels": row}


class Record(TrainerCallback):
    """The param groups' τ when the first optimizer step is about to run, and every logs dict."""

    def __init__(self, stop_at=None):
        self.first_step_tau, self.logs, self.stop_at = None, [], stop_at

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step == 0 and hf_weyl.unwrap_adamweyl(optimizer) is not None:
            self.first_step_tau = [g["tau"] for g in hf_weyl.unwrap_adamweyl(optimizer).param_groups]

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop_at is not None and state.global_step >= self.stop_at:
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


# --- tau=auto ----------------------------------------------------------------------------------------------------


def test_tau_auto_in_an_epoch_based_run_is_set_from_the_trainers_step_count_before_step_1(tmp_path, caplog):
    """32 rows, batch 4, accumulation 2, 2 epochs: 8 optimizer steps; τ = tau_for_steps(8) at the first step."""
    record = Record()
    trainer = Trainer(model=make_tiny_gpt2(), args=args(tmp_path, optim_args="tau=auto", num_train_epochs=2,
                                                       gradient_accumulation_steps=2),
                      train_dataset=TokenDataset(), callbacks=[record])
    with caplog.at_level(logging.INFO):
        trainer.train()
    total = trainer.state.max_steps
    assert total == 8 == trainer.state.global_step
    tau = hf_weyl.tau_for_steps(total)
    assert tau != TAU_AUTO_PLACEHOLDER
    assert record.first_step_tau == [tau, tau]
    groups = hf_weyl.unwrap_adamweyl(trainer.optimizer).param_groups
    assert all(g["tau"] == tau for g in groups)  # what optimizer.pt saves
    lines = [r.getMessage() for r in caplog.records if "tau=auto" in r.getMessage()]
    assert lines == [f"hf_weyl: tau=auto -> τ={tau:.4g} for 8 optimizer steps"]
    assert {"weyl/tau": tau, "weyl/tau_auto_steps": 8, "step": 0} in trainer.state.log_history  # trainer_state.json


def test_tau_auto_with_max_steps_is_unchanged_and_logged(tmp_path, caplog):
    record = Record(stop_at=1)
    trainer = Trainer(model=make_tiny_gpt2(), args=args(tmp_path, optim_args="tau=auto", max_steps=2400),
                      train_dataset=TokenDataset(), callbacks=[record])
    assert all(g["tau"] == pytest.approx(0.0125) for g in trainer.create_optimizer().param_groups)  # at construction
    with caplog.at_level(logging.INFO):
        trainer.train()
    assert record.first_step_tau == [pytest.approx(0.0125)] * 2
    assert [r.getMessage() for r in caplog.records if "tau=auto" in r.getMessage()] == [
        "hf_weyl: tau=auto -> τ=0.0125 for 2400 optimizer steps"]
    assert {"weyl/tau": 0.0125, "weyl/tau_auto_steps": 2400, "step": 0} in trainer.state.log_history


def test_tau_number_is_left_alone(tmp_path, caplog):
    record = Record(stop_at=1)
    trainer = Trainer(model=make_tiny_gpt2(), args=args(tmp_path, optim_args="tau=0.004", num_train_epochs=1),
                      train_dataset=TokenDataset(), callbacks=[record])
    with caplog.at_level(logging.INFO):
        trainer.train()
    assert record.first_step_tau == [0.004, 0.004]
    assert not [r for r in caplog.records if "tau=auto" in r.getMessage()]
    assert not [h for h in trainer.state.log_history if "weyl/tau" in h]


def test_tau_auto_with_an_iterable_dataset_and_no_max_steps_is_refused_naming_max_steps(tmp_path):
    """The total is unknown: transformers refuses it for every optimizer when the Trainer is built."""
    with pytest.raises(ValueError, match="max_steps") as err:
        Trainer(model=make_tiny_gpt2(), args=args(tmp_path, optim_args="tau=auto"), train_dataset=TokenStream())
    assert "\n" not in str(err.value)


def test_tau_auto_without_a_known_total_is_refused_by_the_callback_naming_the_flag(tmp_path):
    """Where the Trainer reaches on_train_begin without a total, the callback refuses before the first step."""
    trainer = Trainer(model=make_tiny_gpt2(), args=args(tmp_path, optim_args="tau=auto"))
    opt = trainer.create_optimizer()
    assert all(g["tau"] == TAU_AUTO_PLACEHOLDER for g in opt.param_groups)  # until training starts
    trainer.state.max_steps = 0
    with pytest.raises(ValueError, match=r"tau=auto .* does not know .*pass --max_steps") as err:
        WeylTrainerCallback().on_train_begin(trainer.args, trainer.state, trainer.control, optimizer=opt)
    assert "\n" not in str(err.value)


# --- the cap's statistics in the Trainer's logs --------------------------------------------------------------------


def test_cap_statistics_are_in_every_training_log_with_sane_values(tmp_path):
    record = Record()
    trainer = Trainer(model=make_tiny_gpt2(), args=args(tmp_path, max_steps=4, logging_steps=1, optim_args="tau=0.01"),
                      train_dataset=TokenDataset(), callbacks=[record])
    trainer.train()
    train_logs = [log for log in record.logs if "loss" in log]
    assert len(train_logs) == 4
    for log in train_logs:
        assert set(CAP_LOG_KEYS) <= set(log)
        assert 0.0 <= log["weyl/capped_fraction"] <= 1.0
        assert 0.0 < log["weyl/lr_ratio_min"] <= log["weyl/lr_ratio_median"] <= 1.0
    assert train_logs[0]["weyl/capped_fraction"] > 0  # lr 3e-2 at step 1: the cap binds
    history = [h for h in trainer.state.log_history if "loss" in h]  # what trainer_state.json saves
    assert [{k: h[k] for k in CAP_LOG_KEYS} for h in history] == [
        {k: log[k] for k in CAP_LOG_KEYS} for log in train_logs]
    assert not any(k in log for log in record.logs if "loss" not in log for k in CAP_LOG_KEYS)  # not in train_runtime


def test_cap_statistics_reach_the_reporters(tmp_path, monkeypatch):
    """Our callback runs before the reporting ones: TensorBoard gets the keys."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers.integrations import TensorBoardCallback

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    a = args(tmp_path, max_steps=2, logging_steps=1, report_to=["tensorboard"])
    trainer = Trainer(model=make_tiny_gpt2(), args=a, train_dataset=TokenDataset())
    names = [type(cb) for cb in trainer.callback_handler.callbacks]
    assert names.index(WeylTrainerCallback) < names.index(TensorBoardCallback)
    trainer.train()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {f"train/{k}" for k in CAP_LOG_KEYS} <= set(scalars), scalars
    assert [e.step for e in events.Scalars("train/weyl/capped_fraction")] == [1, 2]


def test_log_cap_false_turns_them_off_and_is_not_an_adamweyl_option(tmp_path):
    assert hf_weyl.optimizer_kwargs_from_optim_args("tau=0.01,log_cap=false") == {"tau": 0.01}
    assert trainer_options_from_optim_args("log_cap=no") == {"log_cap": False, "tau_auto": False}
    record = Record()
    a = args(tmp_path, max_steps=2, logging_steps=1, optim_args="log_cap=false")
    trainer = Trainer(model=make_tiny_gpt2(), args=a, train_dataset=TokenDataset(), callbacks=[record])
    trainer.train()
    assert [log for log in record.logs if "loss" in log]
    assert not any(k in log for log in record.logs for k in CAP_LOG_KEYS)
    with pytest.raises(ValueError, match="cannot parse log_cap"):
        hf_weyl.optimizer_kwargs_from_optim_args("log_cap=maybe")


def test_other_optimizers_get_no_cap_statistics(tmp_path):
    record = Record()
    trainer = Trainer(model=make_tiny_gpt2(), args=args(tmp_path, optim="adamw_torch", max_steps=2, logging_steps=1),
                      train_dataset=TokenDataset(), callbacks=[record])
    trainer.train()
    assert record.logs and not any(k in log for log in record.logs for k in CAP_LOG_KEYS)


def test_cap_statistics_are_read_from_the_device_once_per_logging_step(tmp_path, monkeypatch):
    """6 steps, a log every 2: three host reads by the callback (none at the other steps), and the values are the
    means / minimum of the steps since the previous log."""
    ours = trainer_callback.__file__
    reads = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def method(self, *a, **kw):
            if sys._getframe(1).f_code.co_filename == ours:
                reads.append((name, current_step[0]))
            return original(self, *a, **kw)

        return method

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    current_step = [0]
    per_step = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            current_step[0] = state.global_step
            stats = hf_weyl.unwrap_adamweyl(optimizer).last_stats
            per_step.append(trainer_callback.cap_summary(stats).tolist())

    record = Record()
    trainer = Trainer(model=make_tiny_gpt2(), args=args(tmp_path, max_steps=6, logging_steps=2),
                      train_dataset=TokenDataset(), callbacks=[Steps(), record])
    trainer.train()
    assert reads == [("tolist", 2), ("tolist", 4), ("tolist", 6)]
    logs = [log for log in record.logs if "loss" in log]
    assert len(logs) == 3
    for log, (a, b) in zip(logs, zip(per_step[0::2], per_step[1::2])):
        assert log["weyl/capped_fraction"] == pytest.approx((a[0] + b[0]) / 2)
        assert log["weyl/lr_ratio_median"] == pytest.approx((a[1] + b[1]) / 2)
        assert log["weyl/lr_ratio_min"] == pytest.approx(min(a[2], b[2]))


def test_cap_summary_over_the_eligible_tensors_only():
    stats = hf_weyl.CapStats(params=[], lr_ratio=torch.tensor([1.0, 0.5, 0.25, 1.0, 1.0, 1.0]),
                             sigma_weight=torch.zeros(6), sigma_update=torch.zeros(6),
                             capped=torch.tensor([True, True, True, True, False, False]))
    fraction, median, low = trainer_callback.cap_summary(stats).tolist()
    assert fraction == pytest.approx(stats.capped_fraction) == 0.5
    assert low == 0.25 and median == 0.5  # of the 4 eligible (torch's median: the lower middle value); of all 6: 1.0
    nothing = hf_weyl.CapStats(params=[], lr_ratio=torch.ones(2), sigma_weight=torch.zeros(2),
                               sigma_update=torch.zeros(2), capped=torch.zeros(2, dtype=torch.bool))
    assert trainer_callback.cap_summary(nothing).tolist() == [0.0, 1.0, 1.0]
