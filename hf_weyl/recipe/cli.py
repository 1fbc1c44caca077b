"""The command-line options both recipes share, and their start-up checks.

Every check runs before anything is loaded: a bad value stops the script with one line naming it and
what is valid (exit code 2). What may change when a run is resumed is declared here too:

* :data:`FREE_ON_RESUME`: where and how often to log, evaluate, save and upload (no effect on training);
* :data:`ADJUSTABLE_ON_RESUME`: applied from the step after the checkpoint, recorded in ``train_log.json``
  and on the model card;
* everything else defines the run (model, data, batch, schedule, optimizer) and must match the checkpoint.

``--tau auto`` (:data:`TAU_AUTO`) is resolved by the recipe once the run's total optimizer steps are known
(:meth:`hf_weyl.recipe.run.Run.resolve_tau`); the option itself stays ``auto`` in what a checkpoint compares.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from .errors import ArgumentParser

__all__ = [
    "ADJUSTABLE_ON_RESUME",
    "FREE_ON_RESUME",
    "OPTIMIZERS",
    "SCHEDULERS",
    "TAU_AUTO",
    "add_training_args",
    "check_training_args",
    "make_parser",
    "parse_with_train_length",
]

OPTIMIZERS = ("adamw_weyl", "adamw")
#: ``transformers.get_scheduler`` types that work with a warmup and a step count alone (tested:
#: tests/test_recipe_startup.py); the others need arguments the recipes do not have
#: (``cosine_with_min_lr``, ``warmup_stable_decay``, …) or a metric (``reduce_lr_on_plateau``, ``greedy``).
SCHEDULERS = ("cosine", "linear", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")
#: Trackers accelerate knows (``--report_to``, comma-separated, or ``all``).
TRACKERS = ("all", "tensorboard", "wandb", "trackio", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab")

FREE_ON_RESUME = frozenset({
    "output_dir", "resume_from_checkpoint", "logging_steps", "eval_steps", "max_eval_batches",
    "per_device_eval_batch_size", "checkpointing_steps", "with_tracking", "report_to", "push_to_hub",
    "hub_model_id", "hub_token", "hub_private_repo", "dataloader_num_workers", "preprocessing_num_workers",
    "monitor_steps",
})
ADJUSTABLE_ON_RESUME = ("learning_rate", "tau")
#: ``--tau auto``: τ = ``hf_weyl.tau_for_steps(total optimizer steps of the run)``, set before the first step.
TAU_AUTO = "auto"
#: ``--seed`` seeds ``random``, numpy and torch (``accelerate.utils.set_seed``); numpy takes 0 .. 2**32-1.
SEED_RANGE = (0, 2**32 - 1)


def _tau(value: str) -> float | str:
    """``--tau``: a number, or ``auto`` (:data:`TAU_AUTO`)."""
    if value.strip() == TAU_AUTO:
        return TAU_AUTO
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or '{TAU_AUTO}', got {value!r}") from None


def make_parser(recipe: str, description: str) -> ArgumentParser:
    """The recipe's parser (one-line errors); ``recipe`` is the script's name without ``.py``."""
    parser = ArgumentParser(prog=f"{recipe}.py", description=description)
    parser.set_defaults(recipe=recipe)
    return parser


def add_training_args(parser: argparse.ArgumentParser, **defaults: Any) -> argparse.ArgumentParser:
    """Options common to both recipes; ``defaults`` (e.g. ``learning_rate=6e-4, tau=0.01``) set the recipe's paper values."""
    g = parser.add_argument_group("training")
    g.add_argument("--output_dir", type=str, default=None, help="Where the Hub-ready folder, logs and checkpoints go.")
    g.add_argument("--seed", type=int, default=42, help=f"Seeds random, numpy and torch ({SEED_RANGE[0]} .. 2**32-1).")
    g.add_argument("--per_device_train_batch_size", type=int, default=8)
    g.add_argument("--per_device_eval_batch_size", type=int, default=8)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=1e-3,
                   help="Peak (scheduled) learning rate. May be changed on resume: applied from the next step.")
    g.add_argument("--weight_decay", type=float, default=0.1, help="Decoupled weight decay on >=2-D tensors.")
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.95)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping; 0 disables it.")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw_weyl",
                   help="adamw_weyl: AdamW² (meant for --warmup_steps 0); adamw: torch's AdamW (the baseline).")
    g.add_argument("--tau", type=_tau, default=0.01,
                   help="AdamW² τ: largest relative σ1 change per step (adamw_weyl only; may be changed on resume), or "
                        "'auto': hf_weyl.tau_for_steps(the run's total optimizer steps) = clamp(30 / steps, 0.01, 0.03).")
    g.add_argument("--power_iters", type=int, default=1,
                   help="AdamW² power-iteration steps per optimizer step (adamw_weyl only).")
    g.add_argument("--warmup_steps", type=int, default=0, help="Linear warmup steps (0 = none, the AdamW² setting).")
    g.add_argument("--lr_scheduler_type", choices=SCHEDULERS, default="cosine")
    g.add_argument("--num_train_epochs", type=int, default=1,
                   help="Passes over the training data (steps = epochs × optimizer steps per epoch), unless "
                        "--max_train_steps is given.")
    g.add_argument("--max_train_steps", type=int, default=None,
                   help="Optimizer steps; given, it overrides --num_train_epochs.")
    g.add_argument("--logging_steps", type=int, default=10, help="Log every N optimizer steps (and at every checkpoint).")
    g.add_argument("--eval_steps", type=int, default=500, help="Evaluate every N optimizer steps (and at the end).")
    g.add_argument("--monitor_steps", type=int, default=None,
                   help="Every N optimizer steps (and at the first and last) record the minimum attention entropy and "
                        "the largest σ1(W_qᵀW_k) (hf_weyl.monitor, on a fixed probe batch of validation rows).")
    g.add_argument("--max_eval_batches", type=int, default=None, help="Evaluate on the first N batches per process only.")
    g.add_argument("--checkpointing_steps", type=int, default=None,
                   help="Save a checkpoint every N optimizer steps and at the last step.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help="A checkpoint folder, or 'latest' (the newest complete one in <output_dir>/checkpoints; "
                        "none: start from scratch).")
    g.add_argument("--with_tracking", action="store_true", help="Log to the trackers of --report_to.")
    g.add_argument("--report_to", type=str, default="tensorboard",
                   help=f"Comma-separated trackers: {', '.join(TRACKERS)}.")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", type=str, default=None, help="Repository id (default: the output folder's name).")
    g.add_argument("--hub_token", type=str, default=None)
    g.add_argument("--hub_private_repo", action="store_true")
    parser.set_defaults(**defaults)
    return parser


def parse_with_train_length(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with the run's length as in transformers' ``run_*_no_trainer.py``: a
    ``--max_train_steps`` on the command line wins; otherwise a ``--num_train_epochs`` on the command line sets
    ``max_train_steps`` to ``None`` (the recipe computes epochs × optimizer steps per epoch from the data); with
    neither, the defaults (the recipe's or its preset's ``max_train_steps``, else its epochs) apply."""
    unset = object()
    defaults = {k: parser.get_default(k) for k in ("num_train_epochs", "max_train_steps")}
    parser.set_defaults(num_train_epochs=unset, max_train_steps=unset)
    try:
        args = parser.parse_args(argv)
    finally:
        parser.set_defaults(**defaults)
    epochs_given, steps_given = args.num_train_epochs is not unset, args.max_train_steps is not unset
    if not epochs_given:
        args.num_train_epochs = defaults["num_train_epochs"]
    if not steps_given:
        args.max_train_steps = None if epochs_given else defaults["max_train_steps"]
    elif epochs_given:
        print(f"{parser.prog}: note: --max_train_steps {args.max_train_steps} overrides --num_train_epochs "
              f"{args.num_train_epochs}", file=sys.stderr)
    return args


def check_training_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad values and combinations with ``parser.error`` (one line, exit code 2)."""
    if args.output_dir is None:
        parser.error("--output_dir is required")
    low, high = SEED_RANGE
    if not low <= args.seed <= high:
        parser.error(f"--seed must be an integer in {low} .. {high} (0 .. 2**32-1, what numpy's seed accepts), "
                     f"got {args.seed}")
    positive_ints = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "num_train_epochs", "logging_steps", "eval_steps")
    for name in positive_ints:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be an integer >= 1, got {getattr(args, name)}")
    for name in ("max_train_steps", "checkpointing_steps", "max_eval_batches", "monitor_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be an integer >= 1 (or left out), got {value}")
    if args.warmup_steps < 0:
        parser.error(f"--warmup_steps must be >= 0, got {args.warmup_steps}")
    if args.lr_scheduler_type == "constant" and args.warmup_steps > 0:
        parser.error(f"--lr_scheduler_type constant has no warmup, but --warmup_steps is {args.warmup_steps}; "
                     "use constant_with_warmup")
    for name in ("learning_rate", "weight_decay", "adam_epsilon", "max_grad_norm"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            parser.error(f"--{name} must be a finite number >= 0, got {value}")
    if not args.learning_rate > 0:
        parser.error(f"--learning_rate must be > 0, got {args.learning_rate}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(args, name) < 1:
            parser.error(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if args.optimizer == "adamw_weyl":
        if args.tau != TAU_AUTO and not (math.isfinite(args.tau) and args.tau > 0):
            parser.error(f"--tau must be a finite number > 0 (the paper uses 0.004 for ViT, 0.01 for GPT) or "
                         f"'{TAU_AUTO}' (from the run's length), got {args.tau}")
        if args.power_iters < 1:
            parser.error(f"--power_iters must be an integer >= 1, got {args.power_iters}")
    else:  # τ and the power iteration are AdamW² options: unused by the baseline, so not checked
        unused = [f"--{n}" for n in ("tau", "power_iters") if getattr(args, n) != parser.get_default(n)]
        if unused:
            verb = "applies" if len(unused) == 1 else "apply"
            print(f"{parser.prog}: note: {' and '.join(unused)} only {verb} to --optimizer adamw_weyl; "
                  f"unused with --optimizer {args.optimizer}", file=sys.stderr)
    _check_report_to(parser, args)
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        parser.error(f"--resume_from_checkpoint: no checkpoint folder {args.resume_from_checkpoint!r} "
                     "(give a folder written by --checkpointing_steps, e.g. <output_dir>/checkpoints/step_100, or 'latest')")
    if args.hub_model_id is not None and not args.push_to_hub:
        parser.error("--hub_model_id is given but --push_to_hub is not")


def _check_report_to(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    names = [n.strip() for n in args.report_to.split(",") if n.strip()]
    bad = [n for n in names if n not in TRACKERS]
    if not names or bad:
        parser.error(f"--report_to {args.report_to!r}: unknown tracker {', '.join(map(repr, bad)) or '(none given)'}; "
                     f"valid: {', '.join(TRACKERS)} (comma-separated)")
    if args.with_tracking and "all" not in names:
        from accelerate.tracking import get_available_trackers

        available = {str(t) for t in get_available_trackers()}
        missing = [n for n in names if n not in available]
        if missing:
            parser.error(f"--report_to {args.report_to!r}: {', '.join(missing)} not installed "
                         f"(installed trackers: {', '.join(sorted(available)) or 'none'}); pip install {' '.join(missing)}")
    args.report_to = ",".join(names)
