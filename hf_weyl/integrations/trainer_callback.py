"""``WeylTrainerCallback``: what ``optim="adamw_weyl"`` adds to a ``transformers.Trainer`` run.

Registered among transformers' default callbacks (``transformers.trainer.DEFAULT_CALLBACKS``, see
:mod:`hf_weyl.integrations.trainer`), so every Trainer has one, after ``DefaultFlowCallback`` and before the
reporting callbacks (TensorBoard, W&B, ...) and the user's. It does nothing unless ``args.optim`` is
``adamw_weyl`` and the optimizer unwraps to ``AdamWeyl``. Then:

- ``optim_args="tau=auto"``: at ``on_train_begin`` (before the first optimizer step) every param group gets
  τ = :func:`hf_weyl.tau_for_steps` of the run's total optimizer steps as the Trainer computed them
  (``state.max_steps``: ``--max_steps``, or epochs × update steps per epoch); logged once and recorded in
  ``state.log_history`` (``trainer_state.json``) as ``weyl/tau`` with ``weyl/tau_auto_steps``.
- unless ``optim_args="log_cap=false"``: every training log (the dicts with ``loss``) gets the cap's
  statistics over the optimizer steps since the previous log, accumulated on the device of
  ``AdamWeyl.last_stats`` (one host read per logging step, none in between):
  ``weyl/capped_fraction`` (capped tensors / capped-eligible tensors, mean over the steps),
  ``weyl/lr_ratio_min`` (smallest effective/scheduled lr of an eligible tensor in those steps) and
  ``weyl/lr_ratio_median`` (median over the eligible tensors, mean over the steps).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor
from transformers.trainer_callback import TrainerCallback

from ..core.optimizer import AdamWeyl, CapStats, unwrap_adamweyl
from ..core.tau_rule import tau_for_steps

__all__ = ["CAP_LOG_KEYS", "WeylTrainerCallback", "cap_summary"]

logger = logging.getLogger(__name__)

#: The keys added to the Trainer's training logs, in the order of :func:`cap_summary`'s values.
CAP_LOG_KEYS = ("weyl/capped_fraction", "weyl/lr_ratio_median", "weyl/lr_ratio_min")


def cap_summary(stats: CapStats) -> Tensor:
    """``[capped fraction, median ratio, min ratio]`` over the capped-eligible tensors of one step
    (:meth:`CapStats.summary`: on the stats' device without a host sync; no eligible tensor: ``[0, 1, 1]``)."""
    return stats.summary()[[0, 3, 4]]


def _to_host(t: Tensor) -> list[float]:
    """The one host read per logging step."""
    return t.tolist()


class WeylTrainerCallback(TrainerCallback):
    """τ for ``tau=auto`` from the Trainer's step count, and the cap's statistics in the Trainer's logs
    (see the module docstring). Inert for other optimizers."""

    def __init__(self) -> None:
        self.active = False
        self.log_cap = False
        self._reset()

    def _reset(self) -> None:
        self._sum: Tensor | None = None  # [fraction, median] summed over the steps since the last log
        self._min: Tensor | None = None
        self._steps = 0
        self._seen: CapStats | None = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        from .trainer import OPTIM_NAME, trainer_options_from_optim_args

        weyl = unwrap_adamweyl(optimizer)
        self.active = weyl is not None and str(getattr(args.optim, "value", args.optim)) == OPTIM_NAME
        self._reset()
        if not self.active:
            return control
        options = trainer_options_from_optim_args(args.optim_args)
        self.log_cap = options["log_cap"] and args.logging_strategy != "no"  # no logs: nothing to accumulate
        if options["tau_auto"]:
            self._set_tau_auto(weyl, args, state)
        return control

    @staticmethod
    def _set_tau_auto(weyl: AdamWeyl, args: Any, state: Any) -> None:
        from .trainer import OPTIM_NAME

        total = state.max_steps
        if not isinstance(total, int) or total < 1:
            raise ValueError(
                f"optim_args for {OPTIM_NAME}: tau=auto derives τ from the run's total optimizer steps, which the "
                f"Trainer does not know (max_steps={total!r}, e.g. a dataset without a length); pass --max_steps, "
                "or give a number (tau=0.01)"
            )
        tau = tau_for_steps(total)
        for group in weyl.param_groups:
            group["tau"] = tau
        state.log_history.append({"weyl/tau": tau, "weyl/tau_auto_steps": total, "step": state.global_step})
        if state.is_world_process_zero and args.get_process_log_level() <= logging.WARNING:
            logger.warning(f"hf_weyl: tau=auto -> τ={tau:.4g} for {total} optimizer steps")

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if not (self.active and self.log_cap):
            return control
        weyl = unwrap_adamweyl(optimizer)
        stats = weyl.last_stats if weyl is not None else None
        if stats is None or stats is self._seen:  # no step, or one skipped (fp16 overflow): nothing new
            return control
        self._seen = stats
        summary = cap_summary(stats)
        if self._sum is None:
            self._sum, self._min = summary[:2].clone(), summary[2].clone()
        else:
            self._sum += summary[:2].to(self._sum.device)
            self._min = torch.minimum(self._min, summary[2].to(self._min.device))
        self._steps += 1
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (self.active and self.log_cap) or logs is None or "loss" not in logs or self._steps == 0:
            return control
        fraction, median, low = _to_host(torch.cat([self._sum / self._steps, self._min.reshape(1)]))
        self._reset_interval()
        values = dict(zip(CAP_LOG_KEYS, (fraction, median, low)))
        logs.update(values)  # before the reporting callbacks, which run after this one
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and "loss" in last:
            last.update(values)  # Trainer.log appended its copy of logs before calling on_log
        return control

    def _reset_interval(self) -> None:
        seen = self._seen
        self._reset()
        self._seen = seen
