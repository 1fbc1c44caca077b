"""Checkpoint folders without training: atomic replacement under a kill at every file-system operation,
which folders ``latest`` considers, and what it says (issue 11, case 5)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest

from hf_weyl.recipe import checkpoint as ckpt
from hf_weyl.recipe.errors import UserError
from hf_weyl.recipe.run import Run, recorded_options


class FakeAccelerator:
    """What ``save_checkpoint`` and ``Run.start`` use of an Accelerator: one process, ``save_state`` writing
    files whose contents name the checkpoint's version."""

    is_main_process = True
    num_processes = 1

    def __init__(self, version: str = "v1") -> None:
        self.version = version
        self.printed: list[str] = []

    def wait_for_everyone(self) -> None:
        pass

    def print(self, *args) -> None:
        self.printed.append(" ".join(map(str, args)))

    def save_state(self, folder: str) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"):
            (Path(folder) / name).write_text(f"{self.version}:{name}")


def write(output_dir: Path, step: int, version: str) -> Path:
    return ckpt.save_checkpoint(FakeAccelerator(version), ckpt.checkpoint_path(output_dir, step), {"step": step})


def version_of(folder: Path) -> str:
    return (folder / "optimizer.bin").read_text().split(":")[0]


class Killed(BaseException):
    """A kill -9 in the middle of the save: nothing after it runs."""


def test_checkpoint_is_complete_with_its_manifest(tmp_path):
    folder = write(tmp_path, 3, "v1")
    assert ckpt.incomplete_reason(folder) is None
    manifest = ckpt.read_manifest(folder)
    assert manifest["step"] == 3 and set(manifest["files"]) == {
        "model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"}
    (folder / "optimizer.bin").unlink()
    assert ckpt.incomplete_reason(folder) == "optimizer.bin is missing"
    (folder / "optimizer.bin").write_text("v")  # truncated
    assert "optimizer.bin has 1 bytes" in ckpt.incomplete_reason(folder)
    with pytest.raises(UserError, match="is not a complete checkpoint: optimizer.bin has 1 bytes"):
        ckpt.read_manifest(folder)
    assert "has no hf_weyl_checkpoint.json" in ckpt.incomplete_reason(tmp_path)


def _file_operations(monkeypatch, kill_at: int | None) -> list[str]:
    """Count ``os.replace`` and each file ``shutil.rmtree`` removes inside ``save_checkpoint``; kill at ``kill_at``."""
    done: list[str] = []
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def tick(what: str) -> None:
        if kill_at is not None and len(done) == kill_at:
            raise Killed(what)
        done.append(what)

    def replace(src, dst):
        tick(f"replace {Path(src).name} -> {Path(dst).name}")
        real_replace(src, dst)

    def rmtree(path, ignore_errors=False):
        path = Path(path)
        if not path.exists():
            return
        for f in sorted(path.rglob("*")):  # a kill can land between two unlinks
            if f.is_file():
                tick(f"unlink {path.name}/{f.name}")
                f.unlink()
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    return done


def test_replacing_a_checkpoint_survives_a_kill_at_every_operation(tmp_path, monkeypatch):
    """Re-saving step_4 (a resumed run reaching it again): wherever the save is killed, every ``step_<N>``
    folder is complete, and ``latest`` finds step_4 in its old or its new version."""
    counting = tmp_path / "count"
    write(counting, 4, "old")
    operations = _file_operations(monkeypatch, kill_at=None)
    write(counting, 4, "new")
    assert len(operations) > 5, operations
    for kill_at in range(len(operations)):
        out = tmp_path / f"kill{kill_at}"
        monkeypatch.undo()
        write(out, 2, "old")
        write(out, 4, "old")
        _file_operations(monkeypatch, kill_at=kill_at)
        with pytest.raises(Killed):
            write(out, 4, "new")
        monkeypatch.undo()
        for step, folder in ckpt.list_checkpoints(out):
            assert ckpt.incomplete_reason(folder) is None, (kill_at, operations[kill_at], folder)
        latest, _ = ckpt.latest_checkpoint(out)
        assert latest is not None and latest.name in ("step_4", "step_2"), (kill_at, operations[kill_at])
        if latest.name == "step_4":
            assert version_of(latest) in ("old", "new")
        # the next save of the same step cleans up and completes
        write(out, 4, "new")
        assert version_of(ckpt.latest_checkpoint(out)[0]) == "new"
        assert sorted(p.name for p in (out / ckpt.CHECKPOINT_DIR).iterdir()) == ["step_2", "step_4"]


def test_latest_takes_the_newest_complete_step_integer_folder(tmp_path):
    root = tmp_path / ckpt.CHECKPOINT_DIR
    write(tmp_path, 9, "v")
    write(tmp_path, 10, "v")
    shutil.copytree(root / "step_10", root / "step_10_old")
    shutil.copytree(root / "step_10", root / "step_best")
    shutil.copytree(root / "step_10", root / ".tmp_step_11")
    shutil.copytree(root / "step_10", root / "step_12")
    (root / "step_12" / "model.safetensors").unlink()  # an interrupted copy
    (root / "step_13").write_text("a file, not a folder")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [9, 10, 12]
    latest, skipped = ckpt.latest_checkpoint(tmp_path)
    assert latest == root / "step_10"
    assert skipped == [f"skipping {root / 'step_12'}: incomplete (model.safetensors is missing)"]
    assert ckpt.latest_checkpoint(tmp_path / "elsewhere") == (None, [])


def _args(tmp_path: Path, resume: str | None, **options) -> argparse.Namespace:
    return argparse.Namespace(output_dir=str(tmp_path), recipe="pretrain_gpt2_openwebtext", resume_from_checkpoint=resume,
                              argv=[], optimizer="adamw_weyl", learning_rate=1e-3, tau=0.01, **options)


def test_latest_names_the_checkpoint_it_picked_or_says_there_is_none(tmp_path):
    accelerator = FakeAccelerator()
    run = Run.start(accelerator, _args(tmp_path, "latest"))
    assert run.checkpoint is None
    assert accelerator.printed == [f"--resume_from_checkpoint latest: no complete checkpoint in "
                                   f"{tmp_path / 'checkpoints'}; starting from scratch"]
    args = _args(tmp_path, "latest")
    manifest = {"format": 1, "recipe": args.recipe, "step": 5, "num_processes": 1, "options": recorded_options(args),
                "model_config": {}}
    ckpt.save_checkpoint(accelerator, ckpt.checkpoint_path(tmp_path, 5), manifest)
    accelerator.printed.clear()
    run = Run.start(accelerator, args)
    assert run.checkpoint == tmp_path / "checkpoints" / "step_5" and run.changes == {}
    assert accelerator.printed == [f"--resume_from_checkpoint latest: {tmp_path / 'checkpoints' / 'step_5'} "
                                   "(the newest complete checkpoint)"]


def test_a_fresh_run_does_not_start_over_another_runs_checkpoints(tmp_path):
    write(tmp_path, 5, "v")
    with pytest.raises(UserError, match=r"already holds checkpoints of a run \(step_5\); continue it with "
                                        "--resume_from_checkpoint latest"):
        Run.start(FakeAccelerator(), _args(tmp_path, None))


def test_manifest_written_last_lists_every_file(tmp_path):
    folder = write(tmp_path, 1, "v")
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    on_disk = {p.name for p in folder.iterdir()} - {ckpt.MANIFEST}
    assert set(manifest["files"]) == on_disk
