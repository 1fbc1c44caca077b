"""The objects a recipe's training loop uses, built from the command-line options.

* :func:`make_accelerator`: gradient accumulation, seedable samplers (exact resume), the trackers;
* :func:`build_optimizer`: ``adamw_weyl`` (AdamW², the default, no warmup) or ``adamw`` (the baseline),
  weight decay on ≥2-D tensors only;
* :func:`build_scheduler`: ``transformers.get_scheduler`` with ``--warmup_steps`` and ``--max_train_steps``.

The loop itself is in each recipe (``recipes/*.py``), top to bottom.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from ..core.optimizer import AdamWeyl

__all__ = ["build_optimizer", "build_scheduler", "make_accelerator"]


def make_accelerator(args: argparse.Namespace) -> Any:
    """An ``Accelerator`` with gradient accumulation, seedable samplers (exact resume) and the trackers
    of ``--report_to`` under ``--with_tracking`` (project name: the recipe's)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to.split(",") if args.with_tracking else None,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "runs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if args.with_tracking:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}
        accelerator.init_trackers(args.recipe, config)
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
    """``transformers.get_scheduler`` (counted in per-process scheduler steps, as accelerate steps it once
    per process). ``--lr_scheduler_type`` only offers the types that need nothing more (see ``cli.SCHEDULERS``)."""
    from transformers import get_scheduler

    return get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.warmup_steps * num_processes,
        num_training_steps=args.max_train_steps * num_processes,
    )
