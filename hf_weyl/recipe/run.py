"""A recipe run's output folder and checkpoints: the start-up checks, the resume, the saves.

Start-up, before any data is loaded (:func:`prepare_output_dir`, :meth:`Run.start`):

* the output folder is created and writable (a probe file is written and removed);
* a fresh run does not start over the checkpoints of another one in the same folder;
* the checkpoint to resume from is complete (:mod:`hf_weyl.recipe.checkpoint`), written by the same
  recipe with the same number of processes, and every option that defines the run matches it
  (:data:`~hf_weyl.recipe.cli.FREE_ON_RESUME` may differ; :data:`~hf_weyl.recipe.cli.ADJUSTABLE_ON_RESUME`
  options that differ are applied from the next step and recorded).

:meth:`Run.resume` (after ``accelerator.prepare``) checks that the model's config is the checkpoint's,
loads the state and applies the changed options: a new ``--learning_rate`` scales the schedule by
new/old from the next step on, a new ``--tau`` replaces τ in every parameter group.

``--tau auto`` (:meth:`Run.resolve_tau`, once the run's total optimizer steps are known, before the optimizer is
built): τ = :func:`hf_weyl.tau_for_steps` of that total, logged once; the options keep ``auto`` (a resume compares
``auto`` with ``auto``), the manifest records the τ chosen (``tau_auto``), and a resume with ``--tau auto`` must
choose the same τ. A change between a number and ``auto`` on resume is one between the two τ values.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.optimizer import unwrap_adamweyl
from ..core.tau_rule import tau_for_steps
from .checkpoint import (
    CHECKPOINT_DIR, MANIFEST, checkpoint_path, latest_checkpoint, list_checkpoints, read_manifest, save_checkpoint,
    unverified_reason,
)
from .cli import ADJUSTABLE_ON_RESUME, FREE_ON_RESUME, TAU_AUTO
from .errors import UserError
from .tracking import TrainLog
from .training import unwrap_model

__all__ = ["Run", "prepare_output_dir"]

#: 1: files with their sizes; 2: and their SHA-256 (``sha256``). Both resume (1 with a warning).
MANIFEST_FORMAT = 2
#: What :meth:`Run.start` and :meth:`Run.resume` read from a manifest, and its JSON type.
_MANIFEST_KEYS = {"recipe": str, "step": int, "num_processes": int, "options": dict, "model_config": dict}
#: Options recorded in a checkpoint but never compared or stored (secrets, the raw command line).
_NOT_RECORDED = {"argv", "hub_token"}
#: Config keys that do not define the architecture (names, versions, dtype of the saved weights).
_CONFIG_IGNORED = {"transformers_version", "architectures", "torch_dtype", "dtype"}


def prepare_output_dir(path: str) -> Path:
    """Create ``path`` and check that this process can write into it (a probe file, removed again)."""
    out = Path(path)
    probe = out / f".write_probe_{socket.gethostname()}_{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"hf_weyl")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--output_dir {path!r} is not a writable folder ({e.strerror or e}); "
                        "give a folder this job can create and write to") from None
    return out


def recorded_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options a checkpoint records (JSON values; no token, no raw command line)."""
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in _NOT_RECORDED}, default=str))


def _fmt(name: str, value: Any) -> str:
    return f"--{name} {value}"


@dataclass
class Run:
    """The output folder, the options of this launch and the checkpoint to resume from (if any)."""

    output_dir: Path
    recipe: str
    num_processes: int
    options: dict[str, Any]
    argv: list[str]
    checkpoint: Path | None = None
    manifest: dict[str, Any] | None = None
    #: adjustable options that differ from the checkpoint's: name -> (old, new)
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    #: ``--tau auto``: ``{"tau": τ, "optimizer_steps": total}`` once :meth:`resolve_tau` has chosen τ
    tau_auto: dict[str, Any] | None = None

    @classmethod
    def start(cls, accelerator: Any, args: argparse.Namespace) -> Run:
        """Pick and check the checkpoint to resume from; raise :class:`UserError` on any mismatch."""
        run = cls(Path(args.output_dir), args.recipe, accelerator.num_processes, recorded_options(args), list(args.argv))
        spec = args.resume_from_checkpoint
        if spec is None:
            existing = list_checkpoints(run.output_dir)
            if existing:
                names = ", ".join(p.name for _, p in existing[-3:])
                raise UserError(f"--output_dir {args.output_dir!r} already holds checkpoints of a run ({names}); "
                                "continue it with --resume_from_checkpoint latest, or give another --output_dir")
            return run
        if spec == "latest":
            checkpoint, skipped = latest_checkpoint(run.output_dir)
            for note in skipped:
                accelerator.print(note)
            if checkpoint is None:
                accelerator.print(f"--resume_from_checkpoint latest: no complete checkpoint in "
                                  f"{run.output_dir / CHECKPOINT_DIR}; starting from scratch")
                return run
            accelerator.print(f"--resume_from_checkpoint latest: {checkpoint} (the newest complete checkpoint)")
        else:
            checkpoint = Path(spec)
        run.checkpoint, run.manifest = checkpoint, read_manifest(checkpoint)
        run._check_manifest(run.manifest)
        unverified = unverified_reason(run.manifest)
        if unverified is not None and accelerator.is_main_process:
            print(f"warning: --resume_from_checkpoint {str(checkpoint)!r}: {unverified}; its content cannot be "
                  "verified, resuming anyway", file=sys.stderr, flush=True)
        run.changes = run._compare(run.manifest)
        return run

    def _check_manifest(self, manifest: dict[str, Any]) -> None:
        """Every entry the resume reads is there, with its type (a manifest of an older format, or edited, is not)."""
        bad = [k for k, kind in _MANIFEST_KEYS.items()
               if not isinstance(manifest.get(k), kind) or (kind is int and isinstance(manifest.get(k), bool))]
        if bad:
            raise UserError(f"--resume_from_checkpoint {str(self.checkpoint)!r}: its {MANIFEST} is incomplete "
                            f"(no valid {', '.join(repr(k) for k in bad)}; written by another or an older version of "
                            "hf_weyl, or edited), so the run it belongs to cannot be checked; give a checkpoint "
                            "written by these recipes")

    def _compare(self, manifest: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        where = f"--resume_from_checkpoint {str(self.checkpoint)!r}"
        if manifest.get("recipe") != self.recipe:
            raise UserError(f"{where} was written by {manifest.get('recipe')}.py, not by {self.recipe}.py; "
                            "give a checkpoint of this recipe")
        if manifest.get("num_processes") != self.num_processes:
            raise UserError(f"{where} was written by {manifest.get('num_processes')} processes, this launch has "
                            f"{self.num_processes}; resume with the same number "
                            "(the data order and RNG states are per process)")
        old, new = manifest["options"], self.options
        ignored = set(FREE_ON_RESUME)
        if new.get("optimizer") != "adamw_weyl":
            ignored |= {"tau", "power_iters"}  # unused by the baseline
        differ = [k for k in sorted(set(old) | set(new)) if k not in ignored and old.get(k) != new.get(k)]
        fixed = [k for k in differ if k not in ADJUSTABLE_ON_RESUME]
        if fixed:
            raise UserError(
                f"{where}: the run was started with {', '.join(_fmt(k, old.get(k)) for k in fixed)}, this launch has "
                f"{', '.join(_fmt(k, new.get(k)) for k in fixed)}; these define the run and cannot change on resume "
                f"(only {', '.join('--' + k for k in ADJUSTABLE_ON_RESUME)} can, from the next step, and the logging, "
                "evaluation, checkpoint and Hub options); give the checkpoint's values or start a new run in another "
                "--output_dir"
            )
        changes = {k: (old[k], new[k]) for k in differ}
        if "tau" in changes and changes["tau"][0] == TAU_AUTO:  # from auto: the τ the checkpoint's run chose
            changes["tau"] = (_chosen_tau(manifest), changes["tau"][1])
            if changes["tau"][0] == changes["tau"][1]:
                del changes["tau"]
        return changes

    def resolve_tau(self, accelerator: Any, args: argparse.Namespace) -> float | None:
        """``--tau auto`` (adamw_weyl): τ = :func:`hf_weyl.tau_for_steps` of ``args.max_train_steps`` (the run's
        total optimizer steps, resolved by the recipe) into ``args.tau`` (what the optimizer is built with), and
        ``args.tau_auto_steps``; logged once, and to the trackers under ``--with_tracking``. Call it before the
        optimizer is built. On resume, ``auto`` again must give the checkpoint's τ (a :class:`UserError` if the run's
        length changed). Returns the τ chosen, or ``None`` when τ is not ``auto``."""
        if args.optimizer != "adamw_weyl" or args.tau != TAU_AUTO:
            return None
        steps = args.max_train_steps
        tau = tau_for_steps(steps)
        args.tau, args.tau_auto_steps = tau, steps
        self.tau_auto = {"tau": tau, "optimizer_steps": steps}
        accelerator.print(f"tau=auto -> τ={tau:.4g} for {steps} optimizer steps")
        if self.manifest is not None:
            old = self.manifest["options"].get("tau")
            if old == TAU_AUTO:
                chosen = _chosen_tau(self.manifest)
                chosen_steps = (self.manifest.get("tau_auto") or {}).get("optimizer_steps")
                if chosen not in (tau, TAU_AUTO):  # (a manifest from before tau_auto was recorded: not checked)
                    raise UserError(f"--resume_from_checkpoint {str(self.checkpoint)!r}: its run chose --tau auto -> "
                                    f"τ={chosen} for {chosen_steps} optimizer steps, this launch counts {steps} steps "
                                    f"(τ={tau}); the run's length changed (its data?), so it is another run; resume "
                                    "with the same data and options, or give --tau explicitly")
            elif "tau" in self.changes:  # from a number to auto: to the τ chosen now
                if old == tau:
                    del self.changes["tau"]
                else:
                    self.changes["tau"] = (old, tau)
        elif args.with_tracking:
            accelerator.log({"tau": tau, "tau_auto_steps": steps}, step=0)
        return tau

    def resume(self, accelerator: Any, model: Any, optimizer: Any, scheduler: Any, log: TrainLog) -> None:
        """Load the checkpoint into the prepared objects and apply the changed options from the next step."""
        assert self.checkpoint is not None and self.manifest is not None
        config = _config_dict(unwrap_model(accelerator, model).config)
        saved = self.manifest["model_config"]
        differ = [k for k in sorted(set(config) | set(saved)) if config.get(k) != saved.get(k)]
        if differ:
            shown = ", ".join(f"{k} {saved.get(k)!r} (now {config.get(k)!r})" for k in differ[:4])
            raise UserError(f"--resume_from_checkpoint {str(self.checkpoint)!r} holds another model: {shown}"
                            f"{' …' if len(differ) > 4 else ''}; give a checkpoint of this model")
        accelerator.load_state(str(self.checkpoint))
        if log.completed_steps != self.manifest["step"]:
            raise RuntimeError(f"{self.checkpoint}: the training log is at step {log.completed_steps}, "
                               f"the manifest says {self.manifest['step']}")
        accelerator.print(f"Resumed from {self.checkpoint} (step {log.completed_steps})")
        if not self.changes:
            return
        if "learning_rate" in self.changes:
            old, new = self.changes["learning_rate"]
            _scale_learning_rate(optimizer, scheduler, new / old)
        if "tau" in self.changes:
            for group in unwrap_adamweyl(optimizer).param_groups:
                group["tau"] = self.changes["tau"][1]
        log.record_changes(self.changes, self.argv)
        accelerator.print(f"From step {log.completed_steps + 1}: "
                          + ", ".join(f"--{k} {new} (was {old})" for k, (old, new) in self.changes.items()))

    def save_checkpoint(self, accelerator: Any, step: int, model: Any) -> Path:
        """Atomically write ``checkpoints/step_<step>`` with its manifest (see :mod:`hf_weyl.recipe.checkpoint`)."""
        manifest = {"format": MANIFEST_FORMAT, "recipe": self.recipe, "step": step, "num_processes": self.num_processes,
                    "options": self.options, "model_config": _config_dict(unwrap_model(accelerator, model).config)}
        if self.tau_auto is not None:
            manifest["tau_auto"] = dict(self.tau_auto)
        return save_checkpoint(accelerator, checkpoint_path(self.output_dir, step), manifest)


def _chosen_tau(manifest: dict[str, Any]) -> Any:
    """The τ a ``--tau auto`` run recorded in its manifest (``"auto"`` if the manifest predates that record)."""
    tau_auto = manifest.get("tau_auto")
    return tau_auto.get("tau", TAU_AUTO) if isinstance(tau_auto, dict) else TAU_AUTO


def _config_dict(config: Any) -> dict[str, Any]:
    """The architecture-defining part of a transformers config, as JSON values."""
    d = json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str))
    return {k: v for k, v in d.items() if not k.startswith("_") and k not in _CONFIG_IGNORED}


def _scale_learning_rate(optimizer: Any, scheduler: Any, factor: float) -> None:
    """Multiply the schedule by ``factor`` from now on: the scheduler's base lrs and the groups' current lr."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler wraps the LambdaLR
    inner.base_lrs = [lr * factor for lr in inner.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
