"""Exact resume in every combination the recipes support (issue 11, cases 2–4): gradient accumulation ×
an epoch boundary × a truncated evaluation × the final checkpoint, the relaunch of a finished run, and
options changed on resume (applied from the next step and recorded, or refused).

One uninterrupted run per recipe (module-scoped) is the reference for every resume from its checkpoints.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_recipes import (  # noqa: F401  (autouse fixtures)
    GPT2, VIT, fresh_accelerate_state, load_recipe, one_thread, run, same_weights, small_vit_files,
)

# ViT on a local imagefolder of 90 training digits, batches of 16 → 5 batches per epoch; accumulation 2 → 3
# optimizer steps per epoch, the third of one batch (the epoch's end forces the sync). Evaluation every 2 steps on
# 1 of the 3 validation batches (truncated), a checkpoint every 2 steps and at the last: step_2 (inside epoch 0,
# just before its end), step_4 (inside epoch 1), step_6 (an epoch boundary), step_8 (the final checkpoint).
VIT_RUN = ["--max_train_steps", "8", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16",
           "--gradient_accumulation_steps", "2", "--eval_steps", "2", "--max_eval_batches", "1", "--logging_steps", "3",
           "--checkpointing_steps", "2", "--dataloader_num_workers", "0"]
# GPT-2 tiny: accumulation 2, a checkpoint at step 3 of 6 and at the last; the logging interval (2) is cut by it.
GPT2_RUN = ["--max_train_steps", "6", "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "4",
            "--eval_steps", "3", "--max_eval_batches", "1", "--logging_steps", "2", "--checkpointing_steps", "3"]


def _fresh_state() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def vit_files(tmp_path_factory) -> dict[str, str]:
    return small_vit_files(tmp_path_factory.mktemp("vit_data"))


def vit(files: dict[str, str], out: Path, *extra: str) -> dict:
    return load_recipe(VIT).main(["--output_dir", str(out), "--train_dir", files["train_dir"], "--validation_dir",
                                  files["validation_dir"], "--model_name_or_path", files["model"], *VIT_RUN, *extra])


@pytest.fixture(scope="module")
def vit_full(tmp_path_factory, vit_files) -> Path:
    _fresh_state()
    out = tmp_path_factory.mktemp("vit") / "full"
    vit(vit_files, out)
    return out


@pytest.fixture(scope="module")
def gpt2_full(tmp_path_factory) -> Path:
    _fresh_state()
    out = tmp_path_factory.mktemp("gpt2") / "full"
    run(GPT2, out, *GPT2_RUN)
    return out


def _log(out: Path) -> list[dict]:
    return json.loads((out / "train_log.json").read_text())


def test_vit_reference_run_has_the_setting_under_test(vit_full):
    log = _log(vit_full)
    assert [r["step"] for r in log if "train_loss" in r] == [2, 3, 4, 6, 8]  # every 3 steps and at each checkpoint
    assert [r["epoch"] for r in log if "train_loss" in r] == [0, 0, 1, 1, 2]
    assert [r["step"] for r in log if "accuracy" in r] == [2, 4, 6, 8]
    assert sorted(p.name for p in (vit_full / "checkpoints").iterdir()) == ["step_2", "step_4", "step_6", "step_8"]


@pytest.mark.parametrize("step", [2, 4, 6])
def test_vit_resume_equals_uninterrupted(vit_full, vit_files, tmp_path, step):
    """With a truncated evaluation before it, the epoch ends with its short accumulation step in both runs."""
    resumed = tmp_path / "resumed"
    vit(vit_files, resumed, "--resume_from_checkpoint", str(vit_full / "checkpoints" / f"step_{step}"))
    same_weights(vit_full, resumed)
    assert _log(resumed) == _log(vit_full)
    assert json.loads((resumed / "all_results.json").read_text()) == json.loads((vit_full / "all_results.json").read_text())


def test_relaunch_of_a_finished_run_trains_nothing_and_rewrites_the_folder(vit_full, vit_files, tmp_path, capsys):
    out = tmp_path / "relaunched"
    shutil.copytree(vit_full, out)
    for name in ("model.safetensors", "README.md", "all_results.json", "train_log.json"):
        (out / name).unlink()  # e.g. killed while writing the output folder
    results = vit(vit_files, out, "--resume_from_checkpoint", "latest")
    printed = capsys.readouterr().out
    assert f"{out / 'checkpoints' / 'step_8'} is step 8 of --max_train_steps 8: nothing to train" in printed
    assert results["step"] == 8
    same_weights(vit_full, out)
    for name in ("all_results.json", "train_log.json"):
        assert json.loads((out / name).read_text()) == json.loads((vit_full / name).read_text()), name
    card, reference = (out / "README.md").read_text(), (vit_full / "README.md").read_text()
    assert "for 8 optimizer steps" in card and "| optimizer steps | 8 |" in card
    assert card == reference


def test_gpt2_resume_with_accumulation_and_a_cut_logging_interval(gpt2_full, tmp_path):
    resumed = tmp_path / "resumed"
    run(GPT2, resumed, *GPT2_RUN, "--resume_from_checkpoint", str(gpt2_full / "checkpoints" / "step_3"))
    same_weights(gpt2_full, resumed)
    assert _log(resumed) == _log(gpt2_full)
    assert [r["step"] for r in _log(gpt2_full) if "train_loss" in r] == [2, 3, 4, 6]


def test_new_learning_rate_and_tau_on_resume_apply_from_the_next_step(gpt2_full, tmp_path, capsys):
    resumed = tmp_path / "resumed"
    run(GPT2, resumed, *GPT2_RUN, "--learning_rate", "3e-4", "--tau", "0.02",
        "--resume_from_checkpoint", str(gpt2_full / "checkpoints" / "step_3"))
    assert "From step 4: --learning_rate 0.0003 (was 0.0006), --tau 0.02 (was 0.01)" in capsys.readouterr().out
    full, log = {r["step"]: r for r in _log(gpt2_full)}, {r["step"]: r for r in _log(resumed)}
    assert log[4]["hyperparameter_changes"] == {"learning_rate": {"old": 6e-4, "new": 3e-4}, "tau": {"old": 0.01, "new": 0.02}}
    assert log[3] == full[3]  # up to the checkpoint: the first run's values
    for step in (4, 6):  # the cosine schedule, scaled by new/old from step 4 on
        assert log[step]["lr"] == pytest.approx(full[step]["lr"] * 0.5, rel=1e-12)
    optimizer = torch.load(resumed / "checkpoints" / "step_6" / "optimizer.bin", weights_only=False)
    assert {g["tau"] for g in optimizer["param_groups"]} == {0.02}
    card = (resumed / "README.md").read_text()
    assert "| learning rate (peak) | 0.0006 (steps 1–3), 0.0003 (steps 4–6) |" in card
    assert "| tau (τ) | 0.01 (steps 1–3), 0.02 (steps 4–6) |" in card
    # reproduce: the first run's command, then the resume that changed the options
    assert f"--resume_from_checkpoint {resumed / 'checkpoints' / 'step_3'}" in card
    assert card.count("accelerate launch recipes/pretrain_gpt2_openwebtext.py") == 2
    # the new values are what the next resume compares with
    manifest = json.loads((resumed / "checkpoints" / "step_6" / "hf_weyl_checkpoint.json").read_text())
    assert manifest["options"]["learning_rate"] == 3e-4 and manifest["options"]["tau"] == 0.02


@pytest.mark.parametrize("option, value, shown", [
    ("--weight_decay", "0.2", "--weight_decay 0.1"),
    ("--per_device_train_batch_size", "8", "--per_device_train_batch_size 4"),
    ("--max_train_steps", "9", "--max_train_steps 6"),
])
def test_options_that_define_the_run_are_refused_on_resume(gpt2_full, tmp_path, capsys, option, value, shown):
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exc:
        run(GPT2, out, *GPT2_RUN, option, value, "--resume_from_checkpoint", str(gpt2_full / "checkpoints" / "step_3"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"the run was started with {shown}, this launch has {option} {value}" in err
    assert "cannot change on resume" in err and "Traceback" not in err


def test_checkpoint_of_another_recipe_or_model_is_refused(gpt2_full, tmp_path, capsys):
    step_3 = gpt2_full / "checkpoints" / "step_3"
    with pytest.raises(SystemExit) as exc:
        run(VIT, tmp_path / "vit", "--resume_from_checkpoint", str(step_3))
    assert exc.value.code == 2
    assert "was written by pretrain_gpt2_openwebtext.py, not by finetune_vit_imagenet.py" in capsys.readouterr().err
    # same options, another architecture (the manifest's config says 3 layers): refused before load_state
    other = tmp_path / "other" / "step_3"
    shutil.copytree(step_3, other)
    manifest = json.loads((other / "hf_weyl_checkpoint.json").read_text())
    manifest["model_config"]["n_layer"] = 3
    (other / "hf_weyl_checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit):
        run(GPT2, tmp_path / "g", *GPT2_RUN, "--resume_from_checkpoint", str(other))
    assert "holds another model: n_layer 3 (now 2)" in capsys.readouterr().err
    # written by another number of processes
    manifest["model_config"]["n_layer"], manifest["num_processes"] = 2, 2
    (other / "hf_weyl_checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit):
        run(GPT2, tmp_path / "g2", *GPT2_RUN, "--resume_from_checkpoint", str(other))
    assert "was written by 2 processes, this launch has 1" in capsys.readouterr().err


def test_incomplete_checkpoint_is_refused_at_start_up(gpt2_full, tmp_path, capsys):
    partial = tmp_path / "step_3"
    shutil.copytree(gpt2_full / "checkpoints" / "step_3", partial)
    (partial / "optimizer.bin").unlink()
    with pytest.raises(SystemExit) as exc:
        run(GPT2, tmp_path / "o", *GPT2_RUN, "--resume_from_checkpoint", str(partial))
    assert exc.value.code == 2
    assert "is not a complete checkpoint: optimizer.bin is missing" in capsys.readouterr().err


def test_bounded_evaluation_gives_the_training_loader_back():
    """The cause of case 2, at accelerate's level: a ``break`` out of a prepared evaluation loader leaves it the
    active loader, so the training epoch's last batch is not seen as its end (no gradient sync there); evaluating
    ``first_rows`` of the set to its end hands the training loader back."""
    import datasets
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from hf_weyl.recipe.data import first_rows

    train = datasets.Dataset.from_dict({"x": [[1.0, 2.0]] * 5}).with_format("torch")
    evaluation = datasets.Dataset.from_dict({"x": [[1.0, 2.0]] * 6}).with_format("torch")

    def syncs(bounded: bool) -> list[bool]:
        _fresh_state()
        accelerator = Accelerator(gradient_accumulation_steps=2)
        eval_set = first_rows(evaluation, 2) if bounded else evaluation
        model, train_loader, eval_loader = accelerator.prepare(
            torch.nn.Linear(2, 1), DataLoader(train, batch_size=1), DataLoader(eval_set, batch_size=2))
        synced = []
        for i, _ in enumerate(train_loader):
            with accelerator.accumulate(model):
                pass
            synced.append(accelerator.sync_gradients)
            if i == 1:  # an evaluation inside the epoch, on 1 of the 3 evaluation batches
                for j, _ in enumerate(eval_loader):
                    if not bounded and j == 1:
                        break  # the former recipes' evaluation
        return synced

    assert syncs(bounded=True) == [False, True, False, True, True]  # batch 5 of 5 ends the epoch: synced
    assert syncs(bounded=False) == [False, True, False, True, False]  # the end of the epoch is missed
