"""Checkpoint folders ``<output_dir>/checkpoints/step_<N>``: atomic replacement, a manifest, and "complete".

A checkpoint is what ``accelerator.save_state`` writes (weights, optimizer, scheduler, RNG states, the
registered :class:`~hf_weyl.recipe.tracking.TrainLog`) plus ``hf_weyl_checkpoint.json``, written last:
the recipe, the step, the number of processes, the run's options, the model config and every file with
its size. A folder is *complete* when the manifest is there and every file it lists has its size.

Replacement is atomic: the new checkpoint is written into ``.tmp_step_N``; an existing ``step_N`` is
renamed to ``.old_step_N``, the new one renamed in, then the old one deleted. A kill at any moment leaves
every ``step_N`` folder complete (or absent). Only ``step_<integer>`` folders count as checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from .errors import UserError

__all__ = [
    "CHECKPOINT_DIR",
    "MANIFEST",
    "checkpoint_path",
    "incomplete_reason",
    "latest_checkpoint",
    "list_checkpoints",
    "read_manifest",
    "save_checkpoint",
]

#: Checkpoints live in ``<output_dir>/checkpoints/step_<N>``.
CHECKPOINT_DIR = "checkpoints"
MANIFEST = "hf_weyl_checkpoint.json"
_STEP = re.compile(r"step_(0|[1-9][0-9]*)")


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / f"step_{step}"


def save_checkpoint(accelerator: Any, folder: Path, manifest: dict[str, Any]) -> Path:
    """``accelerator.save_state`` into ``.tmp_<name>``, the manifest last, then the atomic swap into ``folder``.

    All processes call it (each writes its RNG state); the main process writes the manifest and renames."""
    folder = Path(folder)
    tmp = folder.with_name(f".tmp_{folder.name}")
    old = folder.with_name(f".old_{folder.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        _write_json(tmp / MANIFEST, {**manifest, "files": files})
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def incomplete_reason(folder: str | Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint (``None`` when it is)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST} (not a checkpoint of these recipes, or its save was interrupted)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST} is unreadable ({e})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint; a :class:`UserError` naming what is missing otherwise."""
    reason = incomplete_reason(folder)
    if reason is not None:
        raise UserError(f"--resume_from_checkpoint {str(folder)!r} is not a complete checkpoint: {reason}; "
                        "give a complete one (or 'latest')")
    return json.loads((Path(folder) / MANIFEST).read_text())


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``step_<integer>`` folder in ``<output_dir>/checkpoints``, by step
    (complete or not; temp folders, ``step_best``, ``step_10_old`` and files are not checkpoints)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint (or ``None``), and a note for each newer incomplete one skipped."""
    skipped = []
    for step, path in reversed(list_checkpoints(output_dir)):
        reason = incomplete_reason(path)
        if reason is None:
            return path, skipped
        skipped.append(f"skipping {path}: incomplete ({reason})")
    return None, skipped


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
