"""The AdamW² cap's statistics in the recipes' tracking: capped fraction, median and smallest effective/scheduled lr
ratio over each logging interval, read from the device once per logging step (hf_weyl.recipe.tracking.CapLog)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from test_recipes import GPT2, fresh_accelerate_state, one_thread, run  # noqa: F401  (autouse fixtures)

import hf_weyl
from hf_weyl.recipe import tracking

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")


def count_host_reads(monkeypatch) -> list[str]:
    """The Tensor methods that copy to the host, called from hf_weyl/recipe/tracking.py, in order."""
    ours, reads = tracking.__file__, []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def method(self, *a, **kw):
            if sys._getframe(1).f_code.co_filename == ours:
                reads.append(name)
            return original(self, *a, **kw)

        return method

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    return reads


def test_cap_statistics_over_the_interval_in_one_host_read(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    optimizer = hf_weyl.AdamWeyl(model.parameters(), lr=0.5, tau=0.01)
    cap = tracking.CapLog(optimizer)
    per_step, logged = [], []
    reads = count_host_reads(monkeypatch)
    for step in range(1, 7):
        model(torch.randn(32, 8)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        cap.update()
        cap.update()  # the same step again (e.g. a skipped one): not counted twice
        per_step.append(tracking.cap_summary(optimizer.last_stats).tolist())  # read here, in the test: not counted
        if step % 3 == 0:
            assert len(reads) == (step // 3) - 1
            logged.append(cap.read(lr=0.5))
            assert len(reads) == step // 3
    assert reads == ["tolist", "tolist"]  # one host read per logging step, none in between
    for values, steps in zip(logged, (per_step[:3], per_step[3:])):
        assert values["cap/capped_fraction"] == pytest.approx(sum(s[0] for s in steps) / 3)
        assert values["cap/lr_ratio_median"] == pytest.approx(sum(s[3] for s in steps) / 3)
        assert values["cap/lr_ratio_min"] == pytest.approx(min(s[4] for s in steps))
        assert values["cap/effective_lr_min"] == pytest.approx(0.5 * values["cap/lr_ratio_min"])
        assert 0 < values["cap/lr_ratio_min"] <= values["cap/lr_ratio_median"] <= 1
    assert logged[0]["cap/capped_fraction"] > 0  # lr 0.5 on fresh weights: the cap binds
    assert tracking.CapLog(torch.optim.AdamW(model.parameters())).read(lr=0.5) == {}  # AdamW: nothing


def test_cap_summary_over_the_eligible_tensors_only():
    stats = hf_weyl.CapStats(params=[], lr_ratio=torch.tensor([1.0, 0.5, 0.25, 1.0, 0.125, 1.0]),
                             sigma_weight=torch.zeros(6), sigma_update=torch.zeros(6),
                             capped=torch.tensor([True, True, True, True, False, False]))
    fraction, number, mean, median, low, eligible = tracking.cap_summary(stats).tolist()
    assert fraction == 0.5 and number == 2 and eligible == 4  # 2 of the 4 eligible tensors capped
    assert mean == pytest.approx(2.75 / 4) and median == 0.5 and low == 0.25  # 0.125 is not eligible
    nothing = hf_weyl.CapStats(params=[], lr_ratio=torch.ones(2), sigma_weight=torch.zeros(2),
                               sigma_update=torch.zeros(2), capped=torch.zeros(2, dtype=torch.bool))
    assert tracking.cap_summary(nothing).tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0]


def test_recipe_tracks_the_cap_with_one_host_read_per_logging_step(tmp_path, monkeypatch):
    reads = count_host_reads(monkeypatch)
    out = tmp_path / "gpt2"
    run(GPT2, out, "--max_train_steps", "6", "--logging_steps", "3", "--eval_steps", "6", "--max_eval_batches", "1",
        "--per_device_train_batch_size", "4", "--with_tracking")
    assert reads == ["tolist", "tolist"]
    log = [r for r in json.loads((out / "train_log.json").read_text()) if "train_loss" in r]
    assert [r["step"] for r in log] == [3, 6]
    for r in log:
        assert 0 <= r["cap/capped_fraction"] <= 1
        assert 0 < r["cap/lr_ratio_min"] <= r["cap/lr_ratio_median"] <= 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next((out / "runs").rglob("events.out.tfevents.*"))))
    acc.Reload()
    assert {"cap/capped_fraction", "cap/lr_ratio_median", "cap/lr_ratio_min"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("cap/lr_ratio_median")] == [3, 6]
