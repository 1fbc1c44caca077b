"""``WeylMonitorCallback``: the training monitor as a ``transformers.TrainerCallback``."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from transformers import TrainerCallback

from ..distributed.collectives import all_reduce_
from .collect import DEFAULT_SEC_RANKS, collect_metrics
from .layouts import ModelLayout, resolve_layout
from .warning import CollapseDetector

__all__ = ["DEFAULT_INTERVAL", "DEFAULT_PROBE_SIZE", "WeylMonitorCallback", "probe_batch_from_dataset"]

#: Steps between two measurements (overhead on the tiny GPT-2 preset: see benchmarks/monitor_overhead.py).
DEFAULT_INTERVAL = 100
#: Examples in the probe batch taken from the start of the training set.
DEFAULT_PROBE_SIZE = 4

JSONL_NAME = "weyl_monitor.jsonl"


def probe_batch_from_dataset(dataset: Any, collate_fn: Any, size: int = DEFAULT_PROBE_SIZE) -> dict[str, Tensor]:
    """The first ``size`` examples of ``dataset`` collated: a fixed probe batch that consumes no RNG."""
    n = min(size, len(dataset))
    if n < 1:
        raise ValueError("the training monitor needs a non-empty dataset to build its probe batch")
    batch = collate_fn([dataset[i] for i in range(n)])
    return {k: v for k, v in batch.items() if isinstance(v, Tensor)}


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """``flag`` of any rank (all_reduce MAX) when torch.distributed runs with several ranks; else ``flag``.

    A collective: every rank must call it at the same point. ``device``: one the backend can reduce on.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    all_reduce_(t, None, op=dist.ReduceOp.MAX)  # (on a device the default group's backend takes)
    return bool(t.item())


class WeylMonitorCallback(TrainerCallback):
    """Every ``interval`` optimizer steps, measure the model (``collect_metrics``) and watch for collapse.

    Each measurement is appended to ``history`` and to ``state.log_history`` (so it is saved with
    ``trainer_state.json``), written as one JSON line to ``<output_dir>/weyl_monitor.jsonl``, and fed
    to a ``CollapseDetector`` (``detector.alerts``; ``stop_on_collapse=True`` ends training at the first
    alert). Only the main process measures; under DDP or ZeRO-1/2 that needs no collective. With
    ``stop_on_collapse`` the stop decision is reduced across ranks (one all-reduce at each measurement
    step, on every rank), so that all ranks stop after the same step.

    Args:
        interval: optimizer steps between measurements (also measured at step 1).
        probe_batch: fixed model inputs for entropy and input norms (with labels for gradient
            norms); default: the first ``probe_size`` training examples through the data collator.
        layout: explicit ``ModelLayout`` for models without a built-in one.
        sec_ranks: s values of SEC(s). detector: a configured ``CollapseDetector`` (None: defaults).
    """

    def __init__(
        self,
        interval: int = DEFAULT_INTERVAL,
        probe_batch: Mapping[str, Tensor] | None = None,
        *,
        probe_size: int = DEFAULT_PROBE_SIZE,
        layout: ModelLayout | None = None,
        sec_ranks: Sequence[int] = DEFAULT_SEC_RANKS,
        detector: CollapseDetector | None = None,
        stop_on_collapse: bool = False,
        write_jsonl: bool = True,
    ):
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise ValueError(f"WeylMonitorCallback: interval must be an integer >= 1, got {interval!r}")
        if not isinstance(probe_size, int) or probe_size < 1:
            raise ValueError(f"WeylMonitorCallback: probe_size must be an integer >= 1, got {probe_size!r}")
        if any(not isinstance(s, int) or s < 1 for s in sec_ranks):
            raise ValueError(f"WeylMonitorCallback: sec_ranks must be integers >= 1, got {tuple(sec_ranks)!r}")
        self.interval = interval
        self.probe_batch = dict(probe_batch) if probe_batch is not None else None
        self.probe_size = probe_size
        self.layout = layout
        self.sec_ranks = tuple(sec_ranks)
        self.detector = detector if detector is not None else CollapseDetector()
        if self.detector.sec_rank not in self.sec_ranks:
            self.sec_ranks += (self.detector.sec_rank,)
        self.stop_on_collapse = stop_on_collapse
        self.write_jsonl = write_jsonl
        self.history: list[dict[str, float]] = []

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self.layout = resolve_layout(model, self.layout)  # unsupported model: fail before training starts
        if self.probe_batch is None:
            if train_dataloader is None:
                raise ValueError("WeylMonitorCallback: no probe_batch given and no train_dataloader to build one from")
            self.probe_batch = probe_batch_from_dataset(train_dataloader.dataset, train_dataloader.collate_fn, self.probe_size)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        if not (step == 1 or step % self.interval == 0):
            return control
        collapsed = False
        if state.is_world_process_zero:
            metrics = self.measure(model, optimizer, step)
            state.log_history.append({**metrics, "step": step})
            if self.write_jsonl and args.output_dir:
                os.makedirs(args.output_dir, exist_ok=True)
                with open(os.path.join(args.output_dir, JSONL_NAME), "a") as f:
                    f.write(json.dumps({"step": step, **metrics}) + "\n")
            collapsed = bool(self.detector.update(metrics, step))
        if self.stop_on_collapse and any_rank(collapsed, args.device):
            control.should_training_stop = True  # on every rank, after the same step
        return control

    def measure(self, model: torch.nn.Module, optimizer: Any, step: int) -> dict[str, float]:
        """One measurement, appended to ``history`` with its step."""
        metrics = collect_metrics(model, self.probe_batch, optimizer, layout=self.layout, sec_ranks=self.sec_ranks)
        self.history.append({"step": step, **metrics})
        return metrics
