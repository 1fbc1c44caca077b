"""The Hub-ready output folder of a recipe run, and the command lines that reproduce it.

:func:`save_hub_folder` writes weights + config (safetensors), the tokenizer or image processor,
``all_results.json``, ``train_log.json``, ``plots/*.png`` and ``README.md`` (the model card) into
``--output_dir``; :func:`hf_weyl.recipe.hub.push_folder` uploads that folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checkpoint import checkpoint_path
from .tracking import TrainLog
from .training import no_deepspeed_import

__all__ = ["reproduce_command", "reproduce_commands", "save_hub_folder"]

#: Not part of a reproduce command: secrets and where the run resumed from.
_SKIP = ("--hub_token", "--resume_from_checkpoint")


def reproduce_command(script: str, argv: list[str], resume_from: str | None = None) -> str:
    """The ``accelerate launch`` command line of a launch (``--hub_token`` and ``--resume_from_checkpoint`` left out;
    ``resume_from`` adds the latter back)."""
    kept, it = [], iter(argv)
    for a in it:
        if a in _SKIP:
            next(it, None)
        elif not any(a.startswith(s + "=") for s in _SKIP):
            kept.append(a)
    if resume_from is not None:
        kept += ["--resume_from_checkpoint", resume_from]
    return shlex.join(["accelerate", "launch", script, *kept])


def reproduce_commands(script: str, log: TrainLog, output_dir: str) -> list[str]:
    """The first launch's command, then one resume command per launch that changed an option."""
    commands = [reproduce_command(script, log.launches[0]["argv"])]
    for launch in log.launches[1:]:
        commands.append(reproduce_command(script, launch["argv"], str(checkpoint_path(output_dir, launch["step"]))))
    return commands


def save_hub_folder(
    accelerator: Any,
    model: Any,
    processor: Any,
    args: argparse.Namespace,
    log: TrainLog,
    results: dict[str, Any],
    render_card: Callable[[dict[str, Path]], Any],
) -> Path:
    """Write the Hub-ready folder; the card is ``render_card(plots)``. Only the main process writes; everyone waits."""
    from .plotting import plot_training

    out = Path(args.output_dir)
    accelerator.wait_for_everyone()
    with no_deepspeed_import(accelerator):
        state_dict = accelerator.get_state_dict(model)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(out, is_main_process=accelerator.is_main_process, save_function=accelerator.save,
                                  state_dict=state_dict, safe_serialization=True)
    if accelerator.is_main_process:
        processor.save_pretrained(out)
        _write_json(out / "all_results.json", results)
        _write_json(out / "train_log.json", log.history)
        plots = plot_training(log.history, out / "plots")
        card = render_card({k: p.relative_to(out) for k, p in plots.items()})
        card.save(out / "README.md")
    accelerator.wait_for_everyone()
    return out


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n")
    os.replace(tmp, path)
