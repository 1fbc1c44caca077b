"""The recipes end to end on their offline ``--preset tiny``: Hub-ready folder and card, exact resume,
start-up errors, and a 2-process CPU launch."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
GPT2 = "pretrain_gpt2_openwebtext"
VIT = "finetune_vit_imagenet"


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is as fast on an idle machine and much faster on a busy one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process recipe run starts from a clean accelerate singleton state."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run(name: str, out: Path, *extra: str) -> dict:
    return load_recipe(name).main(["--preset", "tiny", "--output_dir", str(out), *extra])


def small_vit_files(root: Path, train_per_class: int = 9, validation_per_class: int = 4) -> dict[str, str]:
    """A small imagefolder (the tiny preset's digits, ``train_per_class``/``validation_per_class`` per class) and a
    tiny ViT saved as a local model folder (``--model_name_or_path``): the recipe's non-preset path, offline, fast."""
    import shutil

    from transformers import ViTForImageClassification

    from hf_weyl.recipe import presets

    train, validation = presets.tiny_image_dirs()
    files = {"train_dir": root / "train", "validation_dir": root / "validation", "model": root / "vit"}
    for split, source, n in (("train_dir", train, train_per_class), ("validation_dir", validation, validation_per_class)):
        for label in sorted(os.listdir(source)):
            (files[split] / label).mkdir(parents=True)
            for image in sorted(os.listdir(Path(source) / label))[:n]:
                shutil.copy(Path(source) / label / image, files[split] / label / image)
    torch.manual_seed(0)
    ViTForImageClassification(presets.tiny_vit_config(10)).save_pretrained(files["model"])
    presets.tiny_image_processor().save_pretrained(files["model"])
    return {k: str(v) for k, v in files.items()}


def small_gpt2_files(root: Path, train_docs: int = 3, validation_docs: int = 2) -> dict[str, str]:
    """The tiny preset's tokenizer and GPT-2 config saved as local folders, and a few of its documents as
    ``.jsonl`` files (``--tokenizer_name``/``--config_name``/``--train_file``/``--validation_file``)."""
    from hf_weyl.recipe import presets

    train, validation = presets.tiny_text_files()
    tokenizer = presets.tiny_text_tokenizer(train)
    files = {"tokenizer": root / "tokenizer", "config": root / "config", "train_file": root / "train.jsonl",
             "validation_file": root / "validation.jsonl"}
    tokenizer.save_pretrained(files["tokenizer"])
    presets.tiny_gpt2_config(len(tokenizer)).save_pretrained(files["config"])
    for key, source, n in (("train_file", train, train_docs), ("validation_file", validation, validation_docs)):
        with open(source) as f:
            files[key].write_text("".join(next(f) for _ in range(n)))
    return {k: str(v) for k, v in files.items()}


def check_hub_folder(out: Path, metric_types: set[str], processor_file: str) -> dict:
    """The folder has everything a Hub repo needs and a card whose metadata is a valid model-index."""
    from huggingface_hub import ModelCard

    for name in ("model.safetensors", "config.json", processor_file, "README.md", "all_results.json", "train_log.json",
                 "plots/loss.png", "plots/cap.png"):
        assert (out / name).is_file(), name
    for png in ("plots/loss.png", "plots/cap.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = ModelCard.load(out / "README.md")
    results = json.loads((out / "all_results.json").read_text())
    eval_results = card.data.eval_results
    assert {r.metric_type for r in eval_results} == metric_types
    for r in eval_results:
        assert r.dataset_split == "validation" and r.task_type
    by_type = {r.metric_type: r.metric_value for r in eval_results}
    assert by_type["loss"] == pytest.approx(results["eval_loss"])
    assert {"hf_weyl", "adamw_weyl", "no-warmup"} <= set(card.data.tags)
    text = card.text
    assert "](plots/loss.png)" in text and "](plots/cap.png)" in text
    assert "| optimizer | adamw_weyl |" in text and "| warmup steps | 0 (no warmup) |" in text and "| tau (τ) |" in text
    assert "accelerate launch recipes/" in text and "--preset tiny" in text
    assert "https://arxiv.org/abs/2505.21910" in text and "github.com" not in text
    return results


def test_gpt2_tiny_writes_hub_ready_folder(tmp_path):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    out = tmp_path / "gpt2"
    run(GPT2, out, "--max_train_steps", "4", "--eval_steps", "2", "--max_eval_batches", "2", "--logging_steps", "1",
        "--with_tracking")
    results = check_hub_folder(out, {"loss", "perplexity"}, "tokenizer.json")
    assert results["perplexity"] == pytest.approx(torch.tensor(results["eval_loss"]).exp().item(), rel=1e-6)
    log = json.loads((out / "train_log.json").read_text())
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all("cap/capped_fraction" in r and "lr" in r and "train_loss" in r for r in log)
    assert all(0 <= r["cap/lr_ratio_min"] <= r["cap/lr_ratio_mean"] <= 1 for r in log)
    assert log[0]["cap/capped_fraction"] > 0  # lr 6e-4 on fresh weights: the cap fires at step 1
    assert "eval_loss" in log[1] and "eval_loss" in log[3]
    # the cap statistics also reach TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = next((out / "runs").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert {"cap/capped_fraction", "cap/lr_ratio_mean", "train_loss", "lr", "eval_loss"} <= set(acc.Tags()["scalars"])
    # the folder loads back with transformers
    model = GPT2LMHeadModel.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer)
    assert not (out / "checkpoints").exists()


def test_vit_tiny_writes_hub_ready_folder(tmp_path):
    from transformers import ViTForImageClassification

    out = tmp_path / "vit"
    run(VIT, out, "--max_train_steps", "3", "--eval_steps", "3", "--max_eval_batches", "1", "--logging_steps", "1")
    results = check_hub_folder(out, {"accuracy", "loss"}, "preprocessor_config.json")
    assert 0 <= results["accuracy"] <= 1
    model = ViTForImageClassification.from_pretrained(out)
    assert model.config.id2label[3] == "3"
    log = json.loads((out / "train_log.json").read_text())
    assert "cap/capped_fraction" in log[0] and "accuracy" in log[-1]


def same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_gpt2_resume_equals_uninterrupted(tmp_path):
    """Checkpoint at step 3 of 6 (with gradient accumulation), resume into a fresh folder: same weights, same log."""
    common = ["--max_train_steps", "6", "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "4",
              "--eval_steps", "6", "--max_eval_batches", "1", "--logging_steps", "1"]
    full = tmp_path / "full"
    run(GPT2, full, *common, "--checkpointing_steps", "3")
    checkpoints = sorted(p.name for p in (full / "checkpoints").iterdir())
    assert checkpoints == ["step_3", "step_6"]  # atomic: no leftover temp folders
    resumed = tmp_path / "resumed"
    run(GPT2, resumed, *common, "--resume_from_checkpoint", str(full / "checkpoints" / "step_3"))
    same_weights(full, resumed)
    assert json.loads((full / "train_log.json").read_text()) == json.loads((resumed / "train_log.json").read_text())


def test_monitor_steps_records_the_story_and_leaves_training_untouched(tmp_path):
    """--monitor_steps logs min attention entropy and max σ1(W_qᵀW_k) at steps 1, N, 2N, ... and the last, without
    changing the trajectory (bit-identical weights); compare_runs draws the demo's figure and ranks the runs."""
    common = ["--max_train_steps", "5", "--eval_steps", "5", "--max_eval_batches", "2", "--logging_steps", "1",
              "--learning_rate", "1e-2"]
    run(GPT2, tmp_path / "monitored", *common, "--monitor_steps", "2")
    run(GPT2, tmp_path / "plain", *common)
    run(GPT2, tmp_path / "adamw", *common, "--optimizer", "adamw", "--warmup_steps", "2")
    log = json.loads((tmp_path / "monitored" / "train_log.json").read_text())
    monitored = [r["step"] for r in log if "monitor/entropy_min" in r]
    assert monitored == [1, 2, 4, 5]
    for r in log:
        if "monitor/entropy_min" in r:
            assert 0 < r["monitor/entropy_min"] < 10 and r["monitor/sigma_qk_max"] > 0
    plain = json.loads((tmp_path / "plain" / "train_log.json").read_text())
    assert not any("monitor/entropy_min" in r for r in plain)
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("monitored", "plain"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    compare = load_recipe("compare_runs")
    summary = compare.main([str(tmp_path / n) for n in ("monitored", "plain", "adamw")] + ["--output_dir", str(tmp_path / "cmp")])
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = list(summary)
    assert names == ["AdamW² τ=0.01, no warmup", "AdamW² τ=0.01, no warmup (plain)", "AdamW, 2 warmup steps"]
    entropies = [summary[n]["min_attention_entropy"] for n in names]
    assert entropies[0] == pytest.approx(min(r["monitor/entropy_min"] for r in log if "monitor/entropy_min" in r))
    assert entropies[2] != entropies[2]  # nan: not monitored
    text = (tmp_path / "cmp" / "summary.md").read_text()
    best = min(names, key=lambda n: summary[n]["eval_loss"])
    assert f"**{best}** has the lowest final validation loss, {summary[best]['eval_loss']:.3f} nats." in text
    worst = max(names, key=lambda n: summary[n]["eval_loss"])
    assert f"{summary[worst]['eval_loss'] - summary[best]['eval_loss']:.3f} nats worse" in text


@pytest.mark.parametrize(
    "recipe, argv, message",
    [
        (GPT2, ["--preset", "huge"], "invalid choice: 'huge'"),
        (VIT, ["--preset", "huge"], "invalid choice: 'huge'"),
        (GPT2, ["--train_file", "/nonexistent/owt.jsonl"], "--train_file: no such file '/nonexistent/owt.jsonl'"),
        (VIT, ["--train_dir", "/nonexistent/imagenet"], "--train_dir: no such directory '/nonexistent/imagenet'"),
        (GPT2, ["--preset", "tiny", "--resume_from_checkpoint", "/nonexistent/step_5"], "no checkpoint folder '/nonexistent/step_5'"),
        (VIT, ["--preset", "tiny", "--resume_from_checkpoint", "/nonexistent/step_5"], "no checkpoint folder '/nonexistent/step_5'"),
        (GPT2, ["--preset", "tiny", "--tau", "0"], "--tau must be a finite number > 0"),
        (GPT2, ["--preset", "tiny", "--optimizer", "sgd"], "invalid choice: 'sgd'"),
        (GPT2, ["--preset", "tiny", "--warmup_steps", "-1"], "--warmup_steps must be >= 0"),
        (VIT, ["--preset", "tiny", "--label_smoothing", "1.5"], "--label_smoothing must be in [0, 1)"),
        (GPT2, ["--preset", "tiny", "--monitor_steps", "0"], "--monitor_steps must be an integer >= 1"),
    ],
)
def test_bad_arguments_fail_at_start_up(recipe, argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        load_recipe(recipe).main(["--output_dir", str(out), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing was started


def test_resume_from_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_recipe(GPT2).main(["--preset", "tiny", "--output_dir", str(tmp_path / "o"), "--resume_from_checkpoint", str(tmp_path)])
    assert "is not a complete checkpoint: it has no hf_weyl_checkpoint.json (not a checkpoint of these recipes" in \
        capsys.readouterr().err


@pytest.mark.distributed
def test_gpt2_two_process_cpu_launch_and_exact_resume(tmp_path):
    """Two real gloo ranks (torchrun + ACCELERATE_USE_CPU: accelerate's MULTI_CPU, as `accelerate launch` with a
    multi-CPU config sets up): 4 steps with a checkpoint at 2 (and the last), then a 2-rank resume from step_2
    into another folder ends with the same weights and log."""
    common = ["--preset", "tiny", "--max_train_steps", "4", "--eval_steps", "2", "--max_eval_batches", "2",
              "--logging_steps", "1", "--checkpointing_steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}

    def launch(out: Path, *extra: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               str(ROOT / "recipes" / f"{GPT2}.py"), "--output_dir", str(out), *common, *extra]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]

    out = tmp_path / "ddp"
    launch(out)
    results = json.loads((out / "all_results.json").read_text())
    assert results["step"] == 4
    card = (out / "README.md").read_text()
    assert "| processes | 2 |" in card and "| effective batch size | 32 |" in card
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_4"]
    assert len(list((out / "checkpoints" / "step_2").glob("random_states_*.pkl"))) == 2  # one per rank
    resumed = tmp_path / "resumed"
    launch(resumed, "--resume_from_checkpoint", str(out / "checkpoints" / "step_2"))
    same_weights(out, resumed)
    assert json.loads((out / "train_log.json").read_text()) == json.loads((resumed / "train_log.json").read_text())


@pytest.mark.parametrize("kind, stage, refused", [("FSDP", None, "FSDP"), ("DEEPSPEED", 3, "DeepSpeed ZeRO-3"),
                                                  ("DEEPSPEED", 2, None), ("MULTI_CPU", None, None), ("NO", None, None)])
def test_monitor_steps_refused_where_engines_partition_the_matrices(kind, stage, refused):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from hf_weyl.recipe.errors import UserError
    from hf_weyl.recipe.tracking import check_monitor_supported

    plugin = SimpleNamespace(zero_stage=stage) if stage is not None else None
    accelerator = SimpleNamespace(distributed_type=DistributedType[kind], state=SimpleNamespace(deepspeed_plugin=plugin))
    if refused is None:
        check_monitor_supported(accelerator)
    else:
        with pytest.raises(UserError, match=f"--monitor_steps needs whole weight matrices on every process, but {refused}"):
            check_monitor_supported(accelerator)
