"""Checkpoint folders ``<output_dir>/checkpoints/step_<N>``: atomic replacement, a manifest, and "complete".

A checkpoint is what ``accelerator.save_state`` writes (weights, optimizer, scheduler, RNG states, the
registered :class:`~hf_weyl.recipe.tracking.TrainLog`) plus ``hf_weyl_checkpoint.json``, written last:
the recipe, the step, the number of processes, the run's options, the model config, every file with
its size (``files``) and its SHA-256 (``sha256``, hashed from disk after ``save_state``, before the
manifest). A folder is *complete* when the manifest is there and every file it lists has its size
(cheap: what ``latest`` uses to skip interrupted saves); :func:`read_manifest` also checks every file's
content against its hash, so a checkpoint whose bytes changed after the save (same size or not) is refused
naming the file, before anything is loaded. Manifests written before the hashes (no ``sha256``) still
load: :func:`unverified_reason` says why their content cannot be checked.

Replacement is atomic: the new checkpoint is written into ``.tmp_step_N``; an existing ``step_N`` is
renamed to ``.old_step_N``, the new one renamed in, then the old one deleted. A kill at any moment leaves
every ``step_N`` folder complete (or absent). Only ``step_<integer>`` folders count as checkpoints.
"""

from __future__ import annotations

import hashlib
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
    "corrupted_reason",
    "file_sha256",
    "incomplete_reason",
    "latest_checkpoint",
    "list_checkpoints",
    "read_manifest",
    "save_checkpoint",
    "unverified_reason",
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
        paths = {p.relative_to(tmp).as_posix(): p for p in sorted(tmp.rglob("*")) if p.is_file()}
        files = {name: p.stat().st_size for name, p in paths.items()}
        hashes = {name: file_sha256(p) for name, p in paths.items()}
        _write_json(tmp / MANIFEST, {**manifest, "files": files, "sha256": hashes})
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
        return f"its {MANIFEST} is unreadable ({type(e).__name__}: {e})"
    if not isinstance(files, dict) or not all(isinstance(v, int) for v in files.values()):
        return f"its {MANIFEST} is unreadable ('files' is not a table of file sizes)"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's content (hex), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def unverified_reason(manifest: dict[str, Any]) -> str | None:
    """Why the content of a (complete) checkpoint cannot be checked: its manifest predates the hashes."""
    if "sha256" not in manifest:
        return (f"its {MANIFEST} has no content hashes (written by an hf_weyl from before they were added); "
                "only the file sizes can be checked")
    return None


def corrupted_reason(folder: str | Path, manifest: dict[str, Any]) -> str | None:
    """Why the files of a complete checkpoint do not hold what was saved (``None``: every hash matches, or the
    manifest has no hashes, see :func:`unverified_reason`)."""
    hashes = manifest.get("sha256")
    if hashes is None:
        return None
    if not isinstance(hashes, dict) or set(hashes) != set(manifest["files"]):
        return f"its {MANIFEST} is unreadable ('sha256' does not list the same files as 'files')"
    for name in sorted(hashes):
        if file_sha256(Path(folder) / name) != hashes[name]:
            return (f"{name} is corrupted: its content is not what was saved (same size, but its SHA-256 differs "
                    "from the one the manifest recorded at the save)")
    return None


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint whose files hold what was saved; a :class:`UserError` naming the file
    that is missing, truncated or corrupted otherwise."""
    reason = incomplete_reason(folder)
    if reason is not None:
        raise UserError(f"--resume_from_checkpoint {str(folder)!r} is not a complete checkpoint: {reason}; "
                        "give a complete one (or 'latest')")
    manifest = json.loads((Path(folder) / MANIFEST).read_text())
    reason = corrupted_reason(folder, manifest)
    if reason is not None:
        raise UserError(f"--resume_from_checkpoint {str(folder)!r}: {reason}; the checkpoint cannot be resumed "
                        "(the disk or a copy changed it); give another checkpoint, e.g. an older step_N of the run")
    return manifest


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
