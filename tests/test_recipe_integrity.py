"""What a recipe does with bad bytes and bad values (issue 17, items 5 and 7): a checkpoint whose files were changed
in place (same size) is refused at start-up naming the file, a manifest of an older format still resumes (with a
warning) or, when it lacks what the resume reads, is refused in one line; a diverged run's card reports no result;
``--seed`` outside numpy's range and ``--num_train_epochs`` of the GPT-2 recipe.

The checkpoints are those of one real tiny GPT-2 run (module-scoped); every corruption works on a copy."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
from test_recipe_startup import fails_at_start_up
from test_recipes import (  # noqa: F401  (autouse fixtures)
    GPT2, VIT, fresh_accelerate_state, load_recipe, one_thread, run, same_weights, small_gpt2_files,
)

from hf_weyl.recipe import checkpoint as ckpt

# 4 steps, a checkpoint at 2 and 4 (the last); what every resume below repeats.
RUN = ["--max_train_steps", "4", "--per_device_train_batch_size", "4", "--eval_steps", "2", "--max_eval_batches", "1",
       "--logging_steps", "2", "--checkpointing_steps", "2"]


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    out = tmp_path_factory.mktemp("gpt2") / "full"
    run(GPT2, out, *RUN)
    return out


def _copy(full: Path, tmp_path: Path, step: int = 2) -> Path:
    folder = tmp_path / f"step_{step}"
    shutil.copytree(full / "checkpoints" / f"step_{step}", folder)
    return folder


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` in place: the file keeps its size, the bytes there change."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(offset)
        before = f.read(len(data))
        f.seek(offset)
        f.write(data)
    assert path.stat().st_size == size and before != data


def _safetensors_header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def _corrupt(folder: Path, case: str) -> str:
    """Corrupt one file of ``folder`` in place; return its name."""
    if case == "optimizer zeros":  # 4 KiB of zeros inside the optimizer state (the moments)
        path = folder / "optimizer.bin"
        _overwrite(path, path.stat().st_size // 2, b"\0" * 4096)
    elif case == "weights 0xFF":  # 4 KiB of 0xFF (NaN floats) in the weights, after the header
        path = folder / "model.safetensors"
        _overwrite(path, 8 + _safetensors_header_length(path) + 1024, b"\xff" * 4096)
    elif case == "safetensors header":  # garbage in the JSON header (safetensors would raise SafetensorError)
        path = folder / "model.safetensors"
        _overwrite(path, 8, b"#garbage#" * 4)
    else:
        raise AssertionError(case)
    return path.name


def test_manifest_holds_the_sha256_of_every_file(full):
    folder = full / "checkpoints" / "step_2"
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    assert manifest["format"] == 2
    assert set(manifest["sha256"]) == set(manifest["files"]) >= {"model.safetensors", "optimizer.bin", "scheduler.bin"}
    for name, digest in manifest["sha256"].items():
        assert ckpt.file_sha256(folder / name) == digest, name


@pytest.mark.parametrize("case", ["optimizer zeros", "weights 0xFF", "safetensors header"])
def test_checkpoint_corrupted_in_place_is_refused_at_start_up(full, tmp_path, capsys, monkeypatch, case):
    folder = _copy(full, tmp_path)
    name = _corrupt(folder, case)
    assert ckpt.incomplete_reason(folder) is None  # the sizes alone do not see it
    line = fails_at_start_up(GPT2, ["--preset", "tiny", "--output_dir", str(tmp_path / "o"), *RUN,
                                    "--resume_from_checkpoint", str(folder)], capsys, monkeypatch)
    assert f"--resume_from_checkpoint '{folder}': {name} is corrupted" in line
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_latest_refuses_a_corrupted_newest_checkpoint_instead_of_going_back(full, tmp_path, capsys, monkeypatch):
    """Corruption is not an interrupted save: ``latest`` does not silently take an older checkpoint."""
    out = tmp_path / "run"
    shutil.copytree(full, out)
    _corrupt(out / "checkpoints" / "step_4", "optimizer zeros")
    line = fails_at_start_up(GPT2, ["--preset", "tiny", "--output_dir", str(out), *RUN, "--resume_from_checkpoint",
                                    "latest"], capsys, monkeypatch)
    assert f"'{out / 'checkpoints' / 'step_4'}': optimizer.bin is corrupted" in line
    assert "give another checkpoint, e.g. an older step_N" in line


def _as_old_manifest(folder: Path, drop: tuple[str, ...] = ("sha256",)) -> None:
    """The manifest as hf_weyl wrote it before the hashes (format 1), or without other entries."""
    path = folder / ckpt.MANIFEST
    manifest = json.loads(path.read_text())
    for key in drop:
        manifest.pop(key, None)
    manifest["format"] = 1
    path.write_text(json.dumps(manifest))


def test_checkpoint_without_hashes_resumes_with_a_warning(full, tmp_path, capsys):
    folder = _copy(full, tmp_path)
    _as_old_manifest(folder)
    out = tmp_path / "resumed"
    results = run(GPT2, out, *RUN, "--resume_from_checkpoint", str(folder))
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: --resume_from_checkpoint")]
    assert len(warnings) == 1 and f"'{folder}'" in warnings[0]
    assert "has no content hashes" in warnings[0] and "cannot be verified, resuming anyway" in warnings[0]
    assert results["step"] == 4
    same_weights(full, out)


@pytest.mark.parametrize("key", ["options", "model_config", "step"])
def test_manifest_without_what_the_resume_reads_is_refused_in_one_line(full, tmp_path, capsys, monkeypatch, key):
    folder = _copy(full, tmp_path)
    _as_old_manifest(folder, drop=("sha256", key))
    line = fails_at_start_up(GPT2, ["--preset", "tiny", "--output_dir", str(tmp_path / "o"), *RUN,
                                    "--resume_from_checkpoint", str(folder)], capsys, monkeypatch)
    assert f"--resume_from_checkpoint '{folder}': its hf_weyl_checkpoint.json is incomplete (no valid '{key}'" in line


def test_manifest_whose_files_entry_is_not_a_table_is_incomplete(tmp_path):
    (tmp_path / ckpt.MANIFEST).write_text(json.dumps({"files": ["model.safetensors"]}))
    assert "'files' is not a table of file sizes" in ckpt.incomplete_reason(tmp_path)


def test_diverged_run_reports_no_result(tmp_path, capsys):
    """lr 1e30 with AdamW: NaN after one step. The card says diverged and its metadata has no evaluation result."""
    from huggingface_hub import ModelCard

    out = tmp_path / "nan"
    results = run(GPT2, out, "--optimizer", "adamw", "--learning_rate", "1e30", "--max_train_steps", "2", "--eval_steps",
                  "2", "--max_eval_batches", "1")
    assert math.isnan(results["eval_loss"])
    assert "warning: training diverged: validation loss is nan" in capsys.readouterr().out
    card = ModelCard.load(out / "README.md")
    assert not card.data.eval_results and not card.data.get("model-index") and "diverged" in card.data.tags
    assert "**Training diverged: validation loss is nan, validation perplexity is nan.**" in card.text
    assert "| validation loss | validation | nan (diverged: not a result) |" in card.text
    assert "| validation loss | validation | nan |" not in card.text


# --- options --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", ["-1", str(2**32), str(2**64)])
def test_seed_outside_numpys_range_is_refused_at_start_up(seed, tmp_path, capsys, monkeypatch):
    for recipe in (GPT2, VIT):
        line = fails_at_start_up(recipe, ["--preset", "tiny", "--output_dir", str(tmp_path / "o"), "--seed", seed],
                                 capsys, monkeypatch)
        assert f"--seed must be an integer in 0 .. 4294967295 (0 .. 2**32-1, what numpy's seed accepts), got {seed}" in line
    assert not (tmp_path / "o").exists()


def test_largest_seed_is_accepted():
    args = load_recipe(GPT2).parse_args(["--preset", "tiny", "--output_dir", "o", "--seed", str(2**32 - 1)])
    assert args.seed == 2**32 - 1


@pytest.mark.parametrize("argv, steps, epochs", [
    ([], 300, 1),  # the preset's --max_train_steps (the default run is unchanged)
    (["--num_train_epochs", "2"], None, 2),  # counted from the data
    (["--num_train_epochs", "2", "--max_train_steps", "7"], 7, 2),  # given, --max_train_steps wins
    (["--max_train_steps", "7"], 7, 1),
])
def test_num_train_epochs_given_sets_the_length_unless_max_train_steps_is_given(argv, steps, epochs):
    args = load_recipe(GPT2).parse_args(["--preset", "tiny", "--output_dir", "o", *argv])
    assert (args.max_train_steps, args.num_train_epochs) == (steps, epochs)
    assert load_recipe(GPT2).parse_args(["--output_dir", "o"]).max_train_steps == 600_000  # the paper's run
    vit = load_recipe(VIT).parse_args(["--preset", "tiny", "--output_dir", "o", *argv])
    vit_epochs = 2 if "--num_train_epochs" in argv else 10  # the ViT recipe's default: 10 epochs
    assert (vit.max_train_steps, vit.num_train_epochs) == (60 if steps == 300 else steps, vit_epochs)


def test_gpt2_num_train_epochs_trains_that_many_epochs(tmp_path, capsys):
    files = small_gpt2_files(tmp_path / "data")
    argv = ["--train_file", files["train_file"], "--validation_file", files["validation_file"], "--tokenizer_name",
            files["tokenizer"], "--config_name", files["config"], "--block_size", "32", "--per_device_train_batch_size",
            "4", "--gradient_accumulation_steps", "2", "--eval_steps", "1000", "--max_eval_batches", "1",
            "--logging_steps", "1"]
    module = load_recipe(GPT2)
    assert module.parse_args(["--output_dir", "o", *argv, "--num_train_epochs", "2"]).max_train_steps is None
    out = tmp_path / "epochs"
    results = module.main(["--output_dir", str(out), *argv, "--num_train_epochs", "2"])
    log = json.loads((out / "train_log.json").read_text())
    epochs = [r["epoch"] for r in log if "train_loss" in r]
    per_epoch = epochs.count(0)
    assert per_epoch >= 2 and epochs == [0] * per_epoch + [1] * per_epoch
    assert results["step"] == 2 * per_epoch
    assert f"| optimizer steps | {2 * per_epoch} |" in (out / "README.md").read_text()
    # --max_train_steps given wins, with a note
    capsys.readouterr()
    results = load_recipe(GPT2).main(["--output_dir", str(tmp_path / "steps"), *argv, "--num_train_epochs", "2",
                                      "--max_train_steps", "1"])
    assert results["step"] == 1
    assert "note: --max_train_steps 1 overrides --num_train_epochs 2" in capsys.readouterr().err


def test_num_train_epochs_with_streaming_is_refused(tmp_path, capsys, monkeypatch):
    line = fails_at_start_up(GPT2, ["--output_dir", str(tmp_path / "o"), "--streaming", "--num_train_epochs", "2"],
                             capsys, monkeypatch)
    assert "--num_train_epochs 2: a streamed dataset has no length" in line and "give --max_train_steps" in line
