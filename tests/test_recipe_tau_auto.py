"""``--tau auto`` in the recipes: τ from the run's total optimizer steps (``--max_train_steps``, or epochs × steps per
epoch), set before the first step, logged once, recorded in the card, the results, the trackers and the checkpoint
manifest; a resume compares ``auto`` with ``auto`` and must choose the same τ; refused only where the total is unknown."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_recipe_startup import fails_at_start_up
from test_recipes import (  # noqa: F401  (autouse fixtures)
    GPT2, VIT, fresh_accelerate_state, load_recipe, one_thread, run, same_weights, small_vit_files,
)

import hf_weyl
from hf_weyl.recipe import run as recipe_run

# GPT-2 tiny, 4 steps, a checkpoint at step 2 and at the last
GPT2_RUN = ["--max_train_steps", "4", "--per_device_train_batch_size", "4", "--eval_steps", "4", "--max_eval_batches", "1",
            "--logging_steps", "2", "--checkpointing_steps", "2"]
MANIFEST = "hf_weyl_checkpoint.json"


def _fresh_state() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def auto_full(tmp_path_factory) -> Path:
    _fresh_state()
    out = tmp_path_factory.mktemp("gpt2_auto") / "full"
    run(GPT2, out, *GPT2_RUN, "--tau", "auto", "--with_tracking")
    return out


def _manifest(checkpoint: Path) -> dict:
    return json.loads((checkpoint / MANIFEST).read_text())


def _taus(checkpoint: Path) -> set[float]:
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=False)
    return {g["tau"] for g in optimizer["param_groups"]}


def test_tau_auto_from_max_train_steps_is_recorded_everywhere(auto_full):
    tau = hf_weyl.tau_for_steps(4)
    assert _taus(auto_full / "checkpoints" / "step_2") == {tau}  # the optimizer's τ from the first step on
    manifest = _manifest(auto_full / "checkpoints" / "step_2")
    assert manifest["options"]["tau"] == "auto"  # what a resume compares
    assert manifest["tau_auto"] == {"tau": tau, "optimizer_steps": 4}
    results = json.loads((auto_full / "all_results.json").read_text())
    assert results["tau"] == tau and results["tau_auto_steps"] == 4
    assert f"| tau (τ) | {tau:.4g} (--tau auto, for 4 optimizer steps) |" in (auto_full / "README.md").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next((auto_full / "runs").rglob("events.out.tfevents.*"))))
    acc.Reload()
    assert [e.value for e in acc.Scalars("tau")] == [pytest.approx(tau)]
    assert [e.value for e in acc.Scalars("tau_auto_steps")] == [4]


def test_tau_auto_counts_epochs_and_is_set_before_the_first_step(tmp_path, capsys, monkeypatch):
    """ViT on 90 images, batches of 32 (drop_last: 2 per epoch), 3 epochs: τ from 6 steps, logged in one line."""
    files = small_vit_files(tmp_path / "data")
    asked = []

    def rule(steps):
        asked.append(steps)
        return 0.0123

    monkeypatch.setattr(recipe_run, "tau_for_steps", rule)
    out = tmp_path / "vit"
    results = load_recipe(VIT).main([
        "--output_dir", str(out), "--train_dir", files["train_dir"], "--validation_dir", files["validation_dir"],
        "--model_name_or_path", files["model"], "--num_train_epochs", "3", "--per_device_train_batch_size", "32",
        "--dataloader_num_workers", "0", "--max_eval_batches", "1", "--checkpointing_steps", "3", "--tau", "auto"])
    assert asked == [6] and results["step"] == 6
    printed = capsys.readouterr().out
    assert printed.count("tau=auto ->") == 1 and "tau=auto -> τ=0.0123 for 6 optimizer steps" in printed
    assert _taus(out / "checkpoints" / "step_3") == {0.0123}
    assert "| tau (τ) | 0.0123 (--tau auto, for 6 optimizer steps) |" in (out / "README.md").read_text()


def test_resume_with_tau_auto_continues_the_same_run(auto_full, tmp_path, capsys):
    resumed = tmp_path / "resumed"
    run(GPT2, resumed, *GPT2_RUN, "--tau", "auto", "--with_tracking",
        "--resume_from_checkpoint", str(auto_full / "checkpoints" / "step_2"))
    printed = capsys.readouterr().out
    assert f"tau=auto -> τ={hf_weyl.tau_for_steps(4):.4g} for 4 optimizer steps" in printed and "From step" not in printed
    same_weights(auto_full, resumed)
    assert json.loads((resumed / "train_log.json").read_text()) == json.loads((auto_full / "train_log.json").read_text())
    assert _manifest(resumed / "checkpoints" / "step_4")["tau_auto"] == _manifest(auto_full / "checkpoints" / "step_4")["tau_auto"]


def test_resume_with_tau_auto_that_chooses_another_tau_is_refused(auto_full, tmp_path, capsys):
    checkpoint = tmp_path / "step_2"
    shutil.copytree(auto_full / "checkpoints" / "step_2", checkpoint)
    manifest = _manifest(checkpoint)
    manifest["tau_auto"] = {"tau": 0.011, "optimizer_steps": 2727}  # as if the run had been longer
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))
    line = fails_at_start_up(GPT2, ["--preset", "tiny", "--output_dir", str(tmp_path / "o"), *GPT2_RUN, "--tau", "auto",
                                    "--resume_from_checkpoint", str(checkpoint)], capsys)
    assert "its run chose --tau auto -> τ=0.011 for 2727 optimizer steps, this launch counts 4 steps" in line


def test_tau_between_a_number_and_auto_on_resume_is_a_change_of_tau(auto_full, tmp_path, capsys):
    tau = hf_weyl.tau_for_steps(4)
    out = tmp_path / "to_number"
    run(GPT2, out, *GPT2_RUN, "--tau", "0.02", "--resume_from_checkpoint", str(auto_full / "checkpoints" / "step_2"))
    assert f"From step 3: --tau 0.02 (was {tau})" in capsys.readouterr().out
    assert _taus(out / "checkpoints" / "step_4") == {0.02}
    assert f"| tau (τ) | {tau} (steps 1–2), 0.02 (steps 3–4) |" in (out / "README.md").read_text()
    # a checkpoint of a run with a number (here: the same checkpoint, its options saying 0.01), resumed with auto
    checkpoint = tmp_path / "step_2"
    shutil.copytree(auto_full / "checkpoints" / "step_2", checkpoint)
    manifest = _manifest(checkpoint)
    manifest["options"]["tau"] = 0.01
    del manifest["tau_auto"]
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))
    _fresh_state()
    out = tmp_path / "to_auto"
    run(GPT2, out, *GPT2_RUN, "--tau", "auto", "--resume_from_checkpoint", str(checkpoint))
    assert f"From step 3: --tau {tau} (was 0.01)" in capsys.readouterr().out
    assert _taus(out / "checkpoints" / "step_4") == {tau}


def test_tau_auto_without_a_known_total_is_refused_naming_the_flag(tmp_path, capsys, monkeypatch):
    line = fails_at_start_up(GPT2, ["--output_dir", str(tmp_path), "--streaming", "--num_train_epochs", "1",
                                    "--tau", "auto"], capsys, monkeypatch)
    assert "--tau auto takes τ from the run's total optimizer steps" in line and "give --max_train_steps" in line
    line = fails_at_start_up(GPT2, ["--preset", "tiny", "--output_dir", str(tmp_path), "--tau", "fast"], capsys, monkeypatch)
    assert "argument --tau: expected a number or 'auto', got 'fast'" in line
