"""Training-loop pieces shared by the ``recipes/`` scripts (the ``run_*_no_trainer.py`` conventions).

* :func:`add_training_args` / :func:`check_training_args`: the argparse options users know, checked
  at start-up (bad values fail before any data or model is loaded);
* :func:`build_optimizer` / :func:`build_scheduler`: ``adamw_weyl`` (AdamW², the default, no warmup)
  or the usual ``adamw`` (the baseline, with ``--warmup_steps``); weight decay on ≥2-D tensors only;
* :class:`TrainLog`: the logged history and step counter, checkpointed with the model;
* :func:`cap_statistics`: the AdamW² cap statistics logged beside loss and lr;
* :func:`save_checkpoint` / :func:`resolve_checkpoint`: atomic ``save_state`` (temp dir, then rename)
  and ``load_state`` for exact resumption (RNG, sampler, data position via ``skip_first_batches``);
* :func:`train`: the loop itself (gradient accumulation, clipping, logging, evaluation, checkpoints);
* :func:`save_hub_folder`: weights, config, processor, results, log, plots and model card in one
  folder that :func:`hf_weyl.recipe.hub.push_folder` uploads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..core.optimizer import AdamWeyl, unwrap_adamweyl

__all__ = [
    "CHECKPOINT_DIR",
    "OPTIMIZERS",
    "TrainLog",
    "add_training_args",
    "build_optimizer",
    "build_scheduler",
    "cap_statistics",
    "check_training_args",
    "make_accelerator",
    "reproduce_command",
    "resolve_checkpoint",
    "save_checkpoint",
    "save_hub_folder",
    "train",
]

OPTIMIZERS = ("adamw_weyl", "adamw")
#: Checkpoints live in ``<output_dir>/checkpoints/step_<N>``.
CHECKPOINT_DIR = "checkpoints"
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_min_lr", "warmup_stable_decay")


def add_training_args(parser: argparse.ArgumentParser, **defaults: Any) -> argparse.ArgumentParser:
    """Options common to both recipes; ``defaults`` (e.g. ``learning_rate=6e-4, tau=0.01``) set the recipe's paper values."""
    g = parser.add_argument_group("training")
    g.add_argument("--output_dir", type=str, default=None, help="Where the Hub-ready folder, logs and checkpoints go.")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--per_device_train_batch_size", type=int, default=8)
    g.add_argument("--per_device_eval_batch_size", type=int, default=8)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=1e-3, help="Peak (scheduled) learning rate.")
    g.add_argument("--weight_decay", type=float, default=0.1, help="Decoupled weight decay on >=2-D tensors.")
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.95)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping; 0 disables it.")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw_weyl",
                   help="adamw_weyl: AdamW² (meant for --warmup_steps 0); adamw: torch's AdamW (the baseline).")
    g.add_argument("--tau", type=float, default=0.01, help="AdamW² τ: largest relative σ1 change per step.")
    g.add_argument("--power_iters", type=int, default=1, help="AdamW² power-iteration steps per optimizer step.")
    g.add_argument("--warmup_steps", type=int, default=0, help="Linear warmup steps (0 = none, the AdamW² setting).")
    g.add_argument("--lr_scheduler_type", choices=SCHEDULERS, default="cosine")
    g.add_argument("--num_train_epochs", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_train_epochs.")
    g.add_argument("--logging_steps", type=int, default=10)
    g.add_argument("--eval_steps", type=int, default=500, help="Evaluate every N optimizer steps (and at the end).")
    g.add_argument("--max_eval_batches", type=int, default=None, help="Cap on evaluation batches per evaluation.")
    g.add_argument("--checkpointing_steps", type=int, default=None, help="Save a checkpoint every N optimizer steps.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help="A checkpoint folder, or 'latest' (the newest in <output_dir>/checkpoints, if any).")
    g.add_argument("--with_tracking", action="store_true", help="Log to the trackers of --report_to.")
    g.add_argument("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, comet_ml, all, ...")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", type=str, default=None, help="Repository id (default: the output folder's name).")
    g.add_argument("--hub_token", type=str, default=None)
    g.add_argument("--hub_private_repo", action="store_true")
    parser.set_defaults(**defaults)
    return parser


def check_training_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad values at start-up with ``parser.error`` (exit code 2, message on stderr)."""
    if args.output_dir is None:
        parser.error("--output_dir is required")
    positive_ints = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "num_train_epochs", "logging_steps", "eval_steps", "power_iters")
    for name in positive_ints:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be an integer >= 1, got {getattr(args, name)}")
    for name in ("max_train_steps", "checkpointing_steps", "max_eval_batches"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be an integer >= 1 (or left out), got {value}")
    if args.warmup_steps < 0:
        parser.error(f"--warmup_steps must be >= 0, got {args.warmup_steps}")
    for name in ("learning_rate", "weight_decay", "adam_epsilon", "max_grad_norm"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            parser.error(f"--{name} must be a finite number >= 0, got {value}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(args, name) < 1:
            parser.error(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if not (math.isfinite(args.tau) and args.tau > 0):
        parser.error(f"--tau must be a finite number > 0 (the paper uses 0.004 for ViT, 0.01 for GPT), got {args.tau}")
    if args.resume_from_checkpoint not in (None, "latest"):
        path = Path(args.resume_from_checkpoint)
        if not path.is_dir():
            parser.error(f"--resume_from_checkpoint: no checkpoint folder {str(path)!r} "
                         f"(give a folder written by --checkpointing_steps, e.g. <output_dir>/{CHECKPOINT_DIR}/step_100, "
                         "or 'latest')")
        if not (path / TrainLog.FILE).exists() and not any(path.glob("custom_checkpoint_*.pkl")):
            parser.error(f"--resume_from_checkpoint: {str(path)!r} is not a checkpoint of these recipes "
                         "(no training-log state in it)")
    if args.hub_model_id is not None and not args.push_to_hub:
        parser.error("--hub_model_id is given but --push_to_hub is not")


def reproduce_command(script: str, argv: list[str]) -> str:
    """The ``accelerate launch`` command line of this run (the card's "how to reproduce")."""
    skip = {"--hub_token", "--resume_from_checkpoint"}
    kept, it = [], iter(argv)
    for a in it:
        if a in skip:
            next(it, None)
        elif not any(a.startswith(s + "=") for s in skip):
            kept.append(a)
    return shlex.join(["accelerate", "launch", script, *kept])


def make_accelerator(args: argparse.Namespace, project_name: str) -> Any:
    """An ``Accelerator`` with gradient accumulation, seedable samplers (exact resume) and the trackers."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "runs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if args.with_tracking:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}
        accelerator.init_trackers(project_name, config)
    return accelerator


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW² or AdamW over two groups: ≥2-D tensors with weight decay, the rest (biases, norms) without."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    common = dict(lr=args.learning_rate, betas=(args.beta1, args.beta2), eps=args.adam_epsilon)
    if args.optimizer == "adamw_weyl":
        return AdamWeyl(groups, tau=args.tau, power_iters=args.power_iters, **common)
    return torch.optim.AdamW(groups, **common)


def build_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace, num_processes: int) -> Any:
    """``transformers.get_scheduler`` (counted in per-process scheduler steps, as accelerate steps it once per process)."""
    from transformers import get_scheduler

    return get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.warmup_steps * num_processes,
        num_training_steps=args.max_train_steps * num_processes,
    )


class TrainLog:
    """The optimizer-step counter and the logged history (one dict per logging/eval step).

    Registered with ``accelerator.register_for_checkpointing``, so checkpoints carry it and a resumed
    run continues the same curves. ``FILE`` is the name accelerate gives it inside a checkpoint.
    """

    FILE = "custom_checkpoint_0.pkl"

    def __init__(self) -> None:
        self.completed_steps = 0
        self.history: list[dict[str, Any]] = []

    def record(self, values: dict[str, Any]) -> None:
        """Add ``values`` to the record of the current step (one record per step)."""
        if self.history and self.history[-1]["step"] == self.completed_steps:
            self.history[-1].update(values)
        else:
            self.history.append({"step": self.completed_steps, **values})

    def state_dict(self) -> dict[str, Any]:
        return {"completed_steps": self.completed_steps, "history": [dict(r) for r in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.completed_steps = int(state["completed_steps"])
        self.history = [dict(r) for r in state["history"]]


def cap_statistics(optimizer: Any, lr: float) -> dict[str, float]:
    """The AdamW² cap in the last step: fraction/number of capped tensors, effective/scheduled lr
    ratio (mean and min over the capped-eligible tensors) and the effective lr. Empty for AdamW.
    Reads device tensors: call it on logging steps only."""
    weyl = unwrap_adamweyl(optimizer)
    stats = getattr(weyl, "last_stats", None) if weyl is not None else None
    if stats is None:
        return {}
    eligible = stats.lr_ratio[stats.capped]
    if eligible.numel() == 0:
        return {}
    mean, low = float(eligible.float().mean()), float(eligible.min())
    return {
        "cap/capped_fraction": stats.capped_fraction,
        "cap/num_capped": float(stats.num_capped),
        "cap/lr_ratio_mean": mean,
        "cap/lr_ratio_min": low,
        "cap/effective_lr_mean": lr * mean,
        "cap/effective_lr_min": lr * low,
    }


def checkpoint_path(output_dir: str, step: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / f"step_{step}"


def save_checkpoint(accelerator: Any, output_dir: str, step: int) -> Path:
    """``accelerator.save_state`` into a temp folder, then rename it to ``checkpoints/step_<step>``:
    a checkpoint folder either is complete or does not exist."""
    final = checkpoint_path(output_dir, step)
    tmp = final.with_name(f".tmp_{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(spec: str | None, output_dir: str) -> Path | None:
    """The checkpoint folder for ``--resume_from_checkpoint`` (``'latest'``: newest in output_dir, or None)."""
    if spec is None:
        return None
    if spec != "latest":
        return Path(spec)
    found = sorted(Path(output_dir, CHECKPOINT_DIR).glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    return found[-1] if found else None


def prepare_training(accelerator: Any, model: torch.nn.Module, train_dataloader: Any, eval_dataloader: Any,
                     args: argparse.Namespace) -> tuple[Any, Any, Any, Any, Any, TrainLog]:
    """Optimizer and scheduler from ``args``, ``accelerator.prepare`` of everything, a checkpointed
    :class:`TrainLog`, and the resume from ``--resume_from_checkpoint`` if asked.

    Returns ``(model, optimizer, train_dataloader, eval_dataloader, scheduler, log)``."""
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args, accelerator.num_processes)
    model, optimizer, train_dataloader, eval_dataloader, scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, scheduler
    )
    log = TrainLog()
    accelerator.register_for_checkpointing(log)
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if checkpoint is not None:
        accelerator.print(f"Resuming from {checkpoint}")
        accelerator.load_state(str(checkpoint))
    return model, optimizer, train_dataloader, eval_dataloader, scheduler, log


def train(
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    train_dataloader: Any,
    args: argparse.Namespace,
    log: TrainLog,
    evaluate_fn: Callable[[], dict[str, float]],
    logger: Any,
    loss_fn: Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor] | None = None,
) -> None:
    """Run optimizer steps until ``args.max_train_steps`` (resuming from ``log.completed_steps``).

    Per logging step: ``train_loss`` (mean over the interval and processes), ``lr`` (scheduled),
    ``grad_norm`` (before clipping) and :func:`cap_statistics`; per evaluation: ``evaluate_fn()``.
    ``loss_fn(model, batch)`` defaults to ``model(**batch).loss``.
    """
    from tqdm.auto import tqdm

    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    start_epoch = log.completed_steps // steps_per_epoch
    skip_batches = (log.completed_steps % steps_per_epoch) * args.gradient_accumulation_steps
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    progress = tqdm(range(args.max_train_steps), initial=log.completed_steps, disable=not accelerator.is_local_main_process,
                    desc=f"training ({args.optimizer})")
    loss_sum = torch.zeros((), device=accelerator.device)
    loss_count = 0
    grad_norm = None

    for epoch in range(start_epoch, num_epochs):
        model.train()
        train_dataloader.set_epoch(epoch)
        batches = train_dataloader
        if epoch == start_epoch and skip_batches:
            batches = accelerator.skip_first_batches(train_dataloader, skip_batches)
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**batch).loss if loss_fn is None else loss_fn(model, batch)
                loss_sum += loss.detach().float()
                loss_count += 1
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            log.completed_steps += 1
            progress.update(1)
            step = log.completed_steps
            if step % args.logging_steps == 0 or step == args.max_train_steps:
                mean_loss = accelerator.reduce(loss_sum / max(loss_count, 1), reduction="mean")
                lr = scheduler.get_last_lr()[0]
                values = {"train_loss": float(mean_loss), "lr": lr, "epoch": epoch, **cap_statistics(optimizer, lr)}
                if grad_norm is not None:
                    values["grad_norm"] = float(grad_norm)
                loss_sum.zero_()
                loss_count = 0
                log.record(values)
                postfix = {"loss": f"{values['train_loss']:.3f}", "lr": f"{lr:.2e}"}
                if "cap/capped_fraction" in values:
                    postfix["capped"] = f"{values['cap/capped_fraction']:.2f}"
                progress.set_postfix(postfix)
                if args.with_tracking:
                    accelerator.log(values, step=step)
            if step % args.eval_steps == 0 or step == args.max_train_steps:
                results = evaluate_fn()
                model.train()
                log.record(results)
                logger.info(f"step {step}: " + ", ".join(f"{k} = {v:.4g}" for k, v in results.items()))
                if args.with_tracking:
                    accelerator.log(results, step=step)
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, step)
            if step >= args.max_train_steps:
                break
        if log.completed_steps >= args.max_train_steps:
            break
    progress.close()


def save_hub_folder(
    accelerator: Any,
    model: torch.nn.Module,
    processor: Any,
    args: argparse.Namespace,
    log: TrainLog,
    results: dict[str, Any],
    render_card: Callable[[dict[str, Path]], Any],
) -> Path:
    """Write the Hub-ready folder: safetensors weights + config, tokenizer/image processor,
    ``all_results.json``, ``train_log.json``, ``plots/*.png`` and ``README.md`` (the model card,
    made by ``render_card(plots)``). Only the main process writes; everyone waits."""
    from .plotting import plot_training

    out = Path(args.output_dir)
    accelerator.wait_for_everyone()
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


def script_argv(argv: list[str] | None) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)
