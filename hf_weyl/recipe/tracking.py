"""What a recipe run records: :class:`TrainLog` (step counter, history, launches), the AdamW² cap statistics
(:class:`CapLog`) and (``--monitor_steps``) the monitor's worst-block attention entropy and σ1(W_qᵀW_k).

The log is registered with ``accelerator.register_for_checkpointing``, so every checkpoint carries it
and a resumed run continues the same curves; ``train_log.json`` is its ``history``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.optimizer import unwrap_adamweyl

__all__ = ["CAP_KEYS", "CHANGES_KEY", "MONITOR_KEYS", "CapLog", "TrainLog", "cap_summary", "check_monitor_supported",
           "monitor_probe", "monitor_statistics"]

#: Key of a history record that lists the options changed on a resume, applied from that record's step.
CHANGES_KEY = "hyperparameter_changes"
#: What ``--monitor_steps`` records (:mod:`hf_weyl.monitor` names): the minimum over blocks and heads of the
#: mean attention entropy on a probe batch, and the maximum of σ1(W_q,hᵀ W_k,h).
MONITOR_KEYS = ("monitor/entropy_min", "monitor/sigma_qk_max")


class TrainLog:
    """The optimizer-step counter, the logged history (one dict per logged step) and the launches.

    ``launches``: ``{"step", "argv"}`` of the first launch and of every resume that changed an option
    (the model card's reproduce commands). ``FILE`` is the name accelerate gives it inside a checkpoint.
    """

    FILE = "custom_checkpoint_0.pkl"

    def __init__(self, argv: list[str] | None = None) -> None:
        self.completed_steps = 0
        self.history: list[dict[str, Any]] = []
        self.launches: list[dict[str, Any]] = [{"step": 0, "argv": list(argv or [])}]

    def record(self, values: dict[str, Any], step: int | None = None) -> None:
        """Add ``values`` (``None`` values left out) to the record of ``step`` (default: the current step)."""
        step = self.completed_steps if step is None else step
        values = {k: v for k, v in values.items() if v is not None}
        if self.history and self.history[-1]["step"] == step:
            self.history[-1].update(values)
        else:
            self.history.append({"step": step, **values})

    def record_changes(self, changes: dict[str, tuple[Any, Any]], argv: list[str]) -> None:
        """Options changed on a resume (``name -> (old, new)``), applied from the next step."""
        step = self.completed_steps + 1
        self.record({CHANGES_KEY: {k: {"old": old, "new": new} for k, (old, new) in changes.items()}}, step=step)
        self.launches.append({"step": self.completed_steps, "argv": list(argv)})

    def changes(self) -> list[tuple[int, str, Any, Any]]:
        """``(first step, option, old, new)`` of every change on resume, in order."""
        return [(r["step"], name, c["old"], c["new"]) for r in self.history for name, c in r.get(CHANGES_KEY, {}).items()]

    def last(self, key: str) -> Any:
        """The most recent logged value of ``key``."""
        return next(r[key] for r in reversed(self.history) if key in r)

    def state_dict(self) -> dict[str, Any]:
        return {"completed_steps": self.completed_steps, "history": [dict(r) for r in self.history],
                "launches": [dict(x) for x in self.launches]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.completed_steps = int(state["completed_steps"])
        self.history = [dict(r) for r in state["history"]]
        self.launches = [dict(x) for x in state["launches"]]


#: What :meth:`CapLog.read` logs (besides ``cap/effective_lr_*``): over the capped-eligible tensors (those AdamW²
#: applies to) of each optimizer step since the previous logging step — the fraction whose lr the cap reduced and
#: their number (means over the steps), the effective / scheduled lr ratio's mean and median over the tensors (means
#: over the steps) and its smallest value (over the tensors and the steps).
CAP_KEYS = ("cap/capped_fraction", "cap/num_capped", "cap/lr_ratio_mean", "cap/lr_ratio_median", "cap/lr_ratio_min")


def cap_summary(stats: Any) -> torch.Tensor:
    """``[capped fraction, number capped, mean ratio, median ratio, min ratio, eligible tensors]`` of one step's
    ``CapStats`` (:meth:`hf_weyl.CapStats.summary`: on the stats' device, without a host sync)."""
    return stats.summary()


def _to_host(t: torch.Tensor) -> list[float]:
    """The one host read per logging step."""
    return t.tolist()


class CapLog:
    """The AdamW² cap's statistics (:data:`CAP_KEYS`) over each logging interval, accumulated on the device of
    ``AdamWeyl.last_stats``: :meth:`update` after every optimizer step (no host sync), :meth:`read` at a logging
    step (one host read, then a new interval). Inert (``read`` gives ``{}``) for AdamW. A checkpoint is saved at the
    end of a logging interval, so nothing of it is lost on resume."""

    def __init__(self, optimizer: Any) -> None:
        self.weyl = unwrap_adamweyl(optimizer)
        self._seen: Any = None
        self._reset()

    def _reset(self) -> None:
        self._sum: torch.Tensor | None = None  # [fraction, number, mean, median] summed over the interval's steps
        self._min: torch.Tensor | None = None  # [min ratio, eligible tensors] (smallest over the steps)
        self._steps = 0

    def update(self) -> None:
        """After an optimizer step: add its statistics (nothing if the step was skipped, e.g. an fp16 overflow)."""
        stats = getattr(self.weyl, "last_stats", None) if self.weyl is not None else None
        if stats is None or stats is self._seen:
            return
        self._seen = stats
        summary = cap_summary(stats)
        if self._sum is None:
            self._sum, self._min = summary[:4].clone(), summary[4:].clone()
        else:
            self._sum += summary[:4].to(self._sum.device)
            self._min = torch.minimum(self._min, summary[4:].to(self._min.device))
        self._steps += 1

    def read(self, lr: float) -> dict[str, float]:
        """The interval's :data:`CAP_KEYS` and ``cap/effective_lr_mean``/``_min`` (``lr``, the scheduled lr now, ×
        the mean / smallest ratio), in one host read; ``{}`` if no step was recorded or no tensor is capped-eligible."""
        if self._steps == 0:
            return {}
        fraction, number, mean, median, low, eligible = _to_host(torch.cat([self._sum / self._steps, self._min]))
        self._reset()
        if eligible == 0:
            return {}
        values = dict(zip(CAP_KEYS, (fraction, number, mean, median, low)))
        return {**values, "cap/effective_lr_mean": lr * mean, "cap/effective_lr_min": lr * low}


def check_monitor_supported(accelerator: Any) -> None:
    """``--monitor_steps`` reads whole weight matrices on every process: refuse engines that partition them."""
    from accelerate.utils import DistributedType

    from .errors import UserError

    kind = accelerator.distributed_type
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    stage = getattr(plugin, "zero_stage", None) if plugin is not None else None
    if kind == DistributedType.FSDP or (kind == DistributedType.DEEPSPEED and stage == 3):
        engine = "FSDP" if kind == DistributedType.FSDP else "DeepSpeed ZeRO-3"
        raise UserError(f"--monitor_steps needs whole weight matrices on every process, but {engine} partitions them; "
                        "leave --monitor_steps out, or monitor under DDP / ZeRO-1/2")


def monitor_probe(dataset: Any, collate_fn: Any, device: Any) -> dict[str, Any]:
    """``--monitor_steps``' fixed probe batch: the first 8 rows of ``dataset`` collated
    (:func:`hf_weyl.monitor.probe_batch_from_dataset`: no RNG consumed), on ``device``."""
    from ..monitor import probe_batch_from_dataset

    return {k: v.to(device) for k, v in probe_batch_from_dataset(dataset, collate_fn, size=8).items()}


def monitor_statistics(model: Any, probe_batch: dict[str, Any]) -> dict[str, float]:
    """:data:`MONITOR_KEYS` of ``model`` now, from :func:`hf_weyl.monitor.collect_metrics` on ``probe_batch`` (a pass
    in eval mode that leaves the parameters, their gradients and the RNG streams untouched)."""
    from ..monitor import collect_metrics

    values = collect_metrics(model, probe_batch)
    return {k: values[k] for k in MONITOR_KEYS if k in values}
