"""Start-up checks of the recipes (issue 11, cases 1 and 6; issue 10, the scheduler choices): a bad option, output
folder or data stops the script before training, with one line naming the value and what is valid, exit code 2,
and no traceback; internal errors keep theirs."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_recipes import (  # noqa: F401  (autouse fixtures)
    GPT2, ROOT, VIT, fresh_accelerate_state, load_recipe, one_thread, small_gpt2_files, small_vit_files,
)

from hf_weyl.recipe.cli import SCHEDULERS
from hf_weyl.recipe.training import build_scheduler


def fails_at_start_up(recipe: str, argv: list[str], capsys, monkeypatch=None) -> str:
    """Run the recipe in-process; it must exit with code 2 (so no other exception escaped) and print exactly one
    error line. With ``monkeypatch``, loading any data fails the test (the check must come before it).
    (The absence of a traceback on the terminal is checked on the real script: ``test_cli_prints_one_line_and_exits_2``;
    in-process, loggers that kept an earlier test's captured stream print "--- Logging error ---" tracebacks.)"""
    module = load_recipe(recipe)
    if monkeypatch is not None:
        monkeypatch.setattr(module, "load_data", lambda args: pytest.fail("data was loaded before the check"))
    with pytest.raises(SystemExit) as exc:
        module.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if f"{recipe}.py: error:" in line]
    assert len(errors) == 1, err
    return errors[0]


# --- output folder -------------------------------------------------------------------------------------------------

def test_unwritable_output_dir_fails_before_anything_is_loaded(tmp_path, capsys, monkeypatch):
    regular_file = tmp_path / "file"
    regular_file.write_text("x")
    for out, why in ((regular_file / "run", "Not a directory"), (Path("/proc/x"), "")):
        line = fails_at_start_up(GPT2, ["--preset", "tiny", "--output_dir", str(out)], capsys, monkeypatch)
        assert f"--output_dir '{out}' is not a writable folder ({why}" in line
    line = fails_at_start_up(VIT, ["--preset", "tiny", "--output_dir", str(regular_file)], capsys, monkeypatch)
    assert "is not a writable folder" in line


def test_output_dir_probe_leaves_nothing_behind(tmp_path):
    from hf_weyl.recipe.run import prepare_output_dir

    out = prepare_output_dir(str(tmp_path / "a" / "b"))
    assert out.is_dir() and list(out.iterdir()) == []


# --- options -------------------------------------------------------------------------------------------------------

def test_scheduler_choices_are_exactly_those_that_work():
    from transformers.optimization import SchedulerType

    def works(name: str) -> bool:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        args = argparse.Namespace(lr_scheduler_type=name, warmup_steps=2, max_train_steps=10)
        try:
            scheduler = build_scheduler(optimizer, args, num_processes=1)
            for _ in range(10):
                optimizer.step()
                scheduler.step()
        except (TypeError, ValueError):
            return False
        return True

    assert {t.value for t in SchedulerType if works(t.value)} == set(SCHEDULERS)


@pytest.mark.parametrize("argv, message", [
    (["--lr_scheduler_type", "cosine_with_min_lr"], "argument --lr_scheduler_type: invalid choice: 'cosine_with_min_lr'"),
    (["--lr_scheduler_type", "warmup_stable_decay"], "argument --lr_scheduler_type: invalid choice: 'warmup_stable_decay'"),
    (["--lr_scheduler_type", "constant", "--warmup_steps", "10"], "use constant_with_warmup"),
    (["--with_tracking", "--report_to", "bogus"], "--report_to 'bogus': unknown tracker 'bogus'; valid: all, tensorboard"),
    (["--report_to", "tensorboard,bogus"], "unknown tracker 'bogus'"),
    (["--validation_split_percentage", "0"], "--validation_split_percentage must be in (0, 100), got 0.0"),
    (["--learning_rate", "0"], "--learning_rate must be > 0"),
    (["--power_iters", "0"], "--power_iters must be an integer >= 1"),
])
def test_bad_options_fail_before_anything_is_loaded(argv, message, tmp_path, capsys, monkeypatch):
    line = fails_at_start_up(GPT2, ["--preset", "tiny", "--output_dir", str(tmp_path / "o"), *argv], capsys, monkeypatch)
    assert message in line
    assert not (tmp_path / "o").exists()


def test_tracker_that_is_not_installed_is_refused(tmp_path, capsys, monkeypatch):
    from accelerate.tracking import get_available_trackers

    missing = next((t for t in ("wandb", "comet_ml", "mlflow", "aim") if t not in {str(a) for a in get_available_trackers()}), None)
    if missing is None:
        pytest.skip("every tracker is installed")
    line = fails_at_start_up(GPT2, ["--preset", "tiny", "--output_dir", str(tmp_path), "--with_tracking", "--report_to",
                                    missing], capsys, monkeypatch)
    assert f"{missing} not installed" in line


def test_baseline_ignores_the_unused_tau_and_says_so(tmp_path, capsys):
    """τ is an AdamW² option: ``--optimizer adamw --tau 0`` trains the baseline (with a note), the card has no τ."""
    out = tmp_path / "adamw"
    results = load_recipe(GPT2).main(["--preset", "tiny", "--output_dir", str(out), "--optimizer", "adamw", "--tau", "0",
                                      "--max_train_steps", "1", "--max_eval_batches", "1"])
    assert results["step"] == 1 and results["optimizer"] == "adamw"
    assert "note: --tau only applies to --optimizer adamw_weyl; unused with --optimizer adamw" in capsys.readouterr().err
    card = (out / "README.md").read_text()
    assert "| optimizer | adamw |" in card and "| tau (τ) |" not in card


def test_push_to_hub_that_would_fail_at_the_end_fails_at_start_up(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    argv = ["--preset", "tiny", "--output_dir", str(tmp_path / "o"), "--push_to_hub", "--hub_token", "hf_x"]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "the Hub is switched off here (HF_HUB_OFFLINE=1)" in fails_at_start_up(GPT2, argv, capsys, monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    line = fails_at_start_up(GPT2, argv, capsys, monkeypatch)
    assert "--push_to_hub: cannot create the Hub repository 'o'" in line and "Connect" in line


def test_internal_errors_keep_their_traceback(tmp_path, monkeypatch):
    module = load_recipe(GPT2)

    def broken(args, tokenizer):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(module, "make_model", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        module.main(["--preset", "tiny", "--output_dir", str(tmp_path / "o")])


# --- text data -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("gpt2_data")
    files = small_gpt2_files(root)
    (root / "empty.jsonl").write_text("")
    (root / "blank.jsonl").write_text("\n\n  \n")
    (root / "binary.jsonl").write_bytes(bytes(range(256)) * 8)
    (root / "one_line.jsonl").write_text(json.dumps({"text": "def f():\n    return 1\n"}) + "\n")
    (root / "no_text.jsonl").write_text("".join(json.dumps({"body": f"document {i}"}) + "\n" for i in range(20)))
    (root / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    return {**files, "root": str(root)}


def gpt2_argv(files: dict[str, str], out: Path, **overrides: str) -> list[str]:
    options = {"train_file": files["train_file"], "validation_file": files["validation_file"], "tokenizer_name":
               files["tokenizer"], "config_name": files["config"], "block_size": "32", "per_device_train_batch_size": "4",
               "max_train_steps": "2", "eval_steps": "2", "max_eval_batches": "1", **overrides}
    return ["--output_dir", str(out), *(x for k, v in options.items() for x in (f"--{k}", v))]


@pytest.mark.parametrize("overrides, message", [
    ({"train_file": "empty.jsonl"}, "train_file '{root}/empty.jsonl' is empty; it needs one document per row"),
    ({"train_file": "blank.jsonl"}, "train_file '{root}/blank.jsonl' is empty"),
    ({"train_file": "binary.jsonl"}, "train_file '{root}/binary.jsonl' is binary (a NUL byte at offset 0), not jsonl text"),
    ({"train_file": "broken.jsonl"}, "train_file '{root}/broken.jsonl' cannot be read as json rows"),
    ({"train_file": "no_text.jsonl"}, "train_file '{root}/no_text.jsonl' has no 'text' column (columns: ['body'])"),
    ({"validation_file": "no_text.jsonl"}, "validation_file '{root}/no_text.jsonl' has no 'text' column"),
    ({"train_file": "one_line.jsonl"}, "the training data, in 32-token blocks, has 0 rows, fewer than the 4 needed"),
    ({"block_size": "100000"}, "the training data, in 100000-token blocks, has 0 rows, fewer than the 4 needed"),
    ({"per_device_train_batch_size": "100000"}, "fewer than the 100000 needed; one batch is --per_device_train_batch_size"),
    ({"tokenizer_name": "/nonexistent/tokenizer"}, "--tokenizer_name '/nonexistent/tokenizer': no such folder"),
    ({"tokenizer_name": "{root}"}, "--tokenizer_name '{root}' cannot be loaded"),
    ({"config_name": "{root}/train.jsonl"}, "--config_name '{root}/train.jsonl' cannot be loaded"),
])
def test_bad_text_data_gets_one_line(gpt2_files, overrides, message, tmp_path, capsys):
    root = gpt2_files["root"]
    overrides = {k: (f"{root}/{v}" if v.endswith(".jsonl") and "/" not in v else v.format(root=root))
                 for k, v in overrides.items()}
    out = tmp_path / "o"
    line = fails_at_start_up(GPT2, gpt2_argv(gpt2_files, out, **overrides), capsys)
    assert message.format(root=root) in line
    assert not (out / "checkpoints").exists() and not (out / "model.safetensors").exists()


def test_small_local_text_data_trains(gpt2_files, tmp_path):
    """The same files with valid options: the local-data path works (so the errors above are about the data)."""
    results = load_recipe(GPT2).main(gpt2_argv(gpt2_files, tmp_path / "ok"))
    assert results["step"] == 2


def test_cli_prints_one_line_and_exits_2(gpt2_files, tmp_path):
    """The script as a user runs it: exit code 2, one error line, no traceback."""
    argv = gpt2_argv(gpt2_files, tmp_path / "o", train_file=f"{gpt2_files['root']}/binary.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / f"{GPT2}.py"), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "error:" in line] == [
        f"{GPT2}.py: error: train_file '{gpt2_files['root']}/binary.jsonl' is binary (a NUL byte at offset 0), not jsonl text"]


# --- image data ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vit_files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("vit_data")
    files = small_vit_files(root)
    train = Path(files["train_dir"])
    (root / "empty").mkdir()
    shutil.copytree(train / "3", root / "one_class" / "3")
    (root / "flat").mkdir()
    for image in sorted((train / "4").iterdir()):
        shutil.copy(image, root / "flat" / image.name)
    shutil.copytree(train, root / "corrupt")
    (root / "corrupt" / "2" / "broken.png").write_bytes(b"not a png" * 10)
    for label in "0123456789":
        (root / "few" / label).mkdir(parents=True)
        for image in sorted((train / label).iterdir())[:2]:
            shutil.copy(image, root / "few" / label / image.name)
    return {**files, "root": str(root)}


def vit_argv(files: dict[str, str], out: Path, *extra: str) -> list[str]:
    return ["--output_dir", str(out), "--model_name_or_path", files["model"], "--max_train_steps", "2",
            "--per_device_train_batch_size", "8", "--dataloader_num_workers", "0", *extra]


@pytest.mark.parametrize("extra, message", [
    (["--train_dir", "{root}/empty"], "train_dir '{root}/empty' holds no images; expected train_dir/<class name>/<image>"),
    (["--train_dir", "{root}/one_class"], "train_dir '{root}/one_class' holds one class ('3'); classification needs at least two"),
    (["--train_dir", "{root}/flat"], "is directly in the folder; expected train_dir/<class name>/<image>"),
    (["--train_dir", "{root}/corrupt"], "train_dir '{root}/corrupt': 1 of 91 images cannot be read, e.g. {root}/corrupt/2/broken.png"),
    (["--train_dir", "{root}/train", "--validation_dir", "{root}/corrupt"], "validation_dir '{root}/corrupt': 1 of 91 images"),
    (["--train_dir", "{root}/few"], "train_dir '{root}/few': 20 images in 10 classes are too few to hold out a stratified 10% "
                                    "validation split"),
    (["--train_dir", "{root}/train", "--validation_dir", "{root}/validation", "--per_device_train_batch_size", "128"],
     "the training data has 90 rows, fewer than the 128 needed"),
    (["--train_dir", "{root}/train", "--model_name_or_path", "{root}/empty"], "--model_name_or_path '{root}/empty' cannot be loaded"),
])
def test_bad_image_data_gets_one_line(vit_files, extra, message, tmp_path, capsys):
    root = vit_files["root"]
    out = tmp_path / "o"
    line = fails_at_start_up(VIT, vit_argv(vit_files, out, *(x.format(root=root) for x in extra)), capsys)
    assert message.format(root=root) in line
    assert not (out / "model.safetensors").exists()
