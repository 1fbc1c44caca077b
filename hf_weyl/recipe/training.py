"""The objects a recipe's training loop uses, built from the command-line options.

* :func:`make_accelerator`: gradient accumulation, seedable samplers (exact resume), the trackers;
* :func:`build_optimizer`: ``adamw_weyl`` (AdamW², the default, no warmup) or ``adamw`` (the baseline),
  weight decay on ≥2-D tensors only;
* :func:`build_scheduler`: ``transformers.get_scheduler`` with ``--warmup_steps`` and ``--max_train_steps``;
* :func:`unwrap_model`, :func:`no_deepspeed_import`: accelerate's unwrap without importing DeepSpeed in runs that
  do not use it.

The loop itself is in each recipe (``recipes/*.py``), top to bottom.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch

from ..core.optimizer import AdamWeyl

__all__ = ["build_optimizer", "build_scheduler", "make_accelerator", "no_deepspeed_import", "unwrap_model"]


def make_accelerator(args: argparse.Namespace) -> Any:
    """An ``Accelerator`` with gradient accumulation, seedable samplers (exact resume) and the trackers
    of ``--report_to`` under ``--with_tracking`` (project name: the recipe's)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to.split(",") if args.with_tracking else None,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "runs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if _deepspeed_ranks_without_accelerator() else None,
    )
    if args.with_tracking:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}
        accelerator.init_trackers(args.recipe, config)
    return accelerator


def _deepspeed_ranks_without_accelerator() -> bool:
    """A multi-process DeepSpeed launch (``accelerate launch`` with a DEEPSPEED config, e.g.
    recipes/configs/ds_zero2_cpu.yaml) on a machine without a torch accelerator (DeepSpeed's CPU accelerator).

    accelerate 1.16 takes its process-group backend from the torch accelerator; with none it has no backend, so it
    counts 1 process (every rank the main one, the data unsharded) while DeepSpeed's own group has them all, and
    DeepSpeed asserts ``train_batch_size == micro batch × accumulation × world size`` (16 != 16 * 1 * 2). Naming
    gloo makes accelerate and DeepSpeed share the group. (``use_cpu`` is no way out: accelerate then drops
    DeepSpeed.)"""
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if not deepspeed or int(os.environ.get("LOCAL_RANK", -1)) < 0:
        return False
    try:
        return torch.accelerator.current_accelerator() is None
    except RuntimeError:  # older torch on CPU-only builds: "Cannot access accelerator device when none is available"
        return True


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


def unwrap_model(accelerator: Any, model: torch.nn.Module) -> torch.nn.Module:
    """``accelerator.unwrap_model(model)``, without importing DeepSpeed in a run that does not use it."""
    with no_deepspeed_import(accelerator):
        return accelerator.unwrap_model(model)


@contextlib.contextmanager
def no_deepspeed_import(accelerator: Any) -> Iterator[None]:
    """Inside: accelerate's unwrap without importing DeepSpeed, outside a DeepSpeed run.

    accelerate's unwrap (``accelerate.utils.other.extract_model_from_parallel``, behind ``Accelerator.unwrap_model``
    and ``get_state_dict`` and transformers' ``save_pretrained``) runs ``from deepspeed import DeepSpeedEngine``
    whenever DeepSpeed is installed, to test ``isinstance(model, DeepSpeedEngine)``; importing DeepSpeed takes
    seconds and logs "Setting accelerator to CPU" into the progress bar. No model can be a ``DeepSpeedEngine``
    while ``deepspeed`` is not imported, so outside a DeepSpeed run accelerate's check is told, for the duration,
    that DeepSpeed is available only once imported."""
    from accelerate.utils import DistributedType
    from accelerate.utils import other

    original = getattr(other, "is_deepspeed_available", None)
    if accelerator.distributed_type == DistributedType.DEEPSPEED or "deepspeed" in sys.modules or original is None:
        yield
        return
    other.is_deepspeed_available = lambda: "deepspeed" in sys.modules and original()
    try:
        yield
    finally:
        other.is_deepspeed_available = original
