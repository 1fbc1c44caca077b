"""Early warning of malignant entropy collapse (SPEC §1): attention entropy falling toward 0 while
σ1(W_qᵀW_k) grows fast and its spectral energy concentrates in a few directions (SEC(small s) → 1).

A block is flagged when, at one measurement, all three hold:

1. ``entropy_min`` (lowest per-head mean entropy) ≤ ``entropy_fraction`` × its value at the first measurement;
2. ``sigma_qk_max`` ≥ ``sigma_growth`` × its value ``window`` measurements earlier (or at the first
   measurement, early in the run);
3. ``sec{sec_rank}_max`` ≥ ``sec_level``.

Sparse but full-rank attention (benign collapse) fails 3; slow healthy growth of σ1 fails 2.
Defaults were set on real runs of the tiny GPT-2 preset (``tests/test_monitor_collapse.py``): AdamW at
lr 1e-2 without warmup collapses and is flagged; AdamWeyl at the same lr, and AdamW with warmup, are not.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["CollapseAlert", "CollapseDetector", "CollapseWarning"]

logger = logging.getLogger(__name__)


class CollapseWarning(UserWarning):
    """Raised (as a warning) when a block heads for malignant entropy collapse."""


@dataclass(frozen=True)
class CollapseAlert:
    step: int
    block: int
    entropy: float
    entropy_start: float
    sigma_qk: float
    sigma_qk_before: float
    sec: float

    def message(self) -> str:
        return (
            f"step {self.step}: block {self.block} heads for malignant attention-entropy collapse: "
            f"min head entropy {self.entropy:.3g} nats (was {self.entropy_start:.3g}), "
            f"σ1(W_qᵀW_k) {self.sigma_qk:.4g} (was {self.sigma_qk_before:.4g}), SEC {self.sec:.3f}"
        )


@dataclass
class CollapseDetector:
    """Feed it each ``collect_metrics`` dict with ``update(metrics, step)``; returns the new alerts.

    Each block warns once (a ``CollapseWarning`` and a log line); ``alerts`` keeps them all.
    """

    entropy_fraction: float = 0.5
    sigma_growth: float = 2.0
    sec_rank: int = 1
    sec_level: float = 0.8
    window: int = 5
    alerts: list[CollapseAlert] = field(default_factory=list)
    _entropy_start: dict[int, float] = field(default_factory=dict, repr=False)
    _sigma_history: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list), repr=False)

    def __post_init__(self) -> None:
        checks = [
            ("entropy_fraction", self.entropy_fraction, 0 < self.entropy_fraction < 1, "in (0, 1)"),
            ("sigma_growth", self.sigma_growth, self.sigma_growth > 1, "> 1"),
            ("sec_rank", self.sec_rank, isinstance(self.sec_rank, int) and self.sec_rank >= 1, "an integer >= 1"),
            ("sec_level", self.sec_level, 0 < self.sec_level <= 1, "in (0, 1]"),
            ("window", self.window, isinstance(self.window, int) and self.window >= 1, "an integer >= 1"),
        ]
        for name, value, ok, valid in checks:
            if not ok:
                raise ValueError(f"CollapseDetector: invalid {name}={value!r}; must be {valid}")

    @property
    def collapsed(self) -> bool:
        return bool(self.alerts)

    def update(self, metrics: Mapping[str, float], step: int) -> list[CollapseAlert]:
        new: list[CollapseAlert] = []
        flagged = {a.block for a in self.alerts}
        i = 0
        while f"monitor/b{i}/sigma_qk_max" in metrics:
            sigma = metrics[f"monitor/b{i}/sigma_qk_max"]
            entropy = metrics.get(f"monitor/b{i}/entropy_min")
            sec = metrics.get(f"monitor/b{i}/sec{self.sec_rank}_max")
            if entropy is None or sec is None:
                raise KeyError(
                    f"CollapseDetector needs monitor/b{i}/entropy_min and monitor/b{i}/sec{self.sec_rank}_max "
                    "(collect with a probe batch and sec_ranks containing sec_rank)"
                )
            start = self._entropy_start.setdefault(i, entropy)
            history = self._sigma_history[i]
            before = history[-self.window] if len(history) >= self.window else (history[0] if history else sigma)
            history.append(sigma)
            del history[: -self.window]
            if (
                i not in flagged
                and entropy <= self.entropy_fraction * start
                and sigma >= self.sigma_growth * before
                and sec >= self.sec_level
            ):
                alert = CollapseAlert(step, i, entropy, start, sigma, before, sec)
                new.append(alert)
                warnings.warn(alert.message(), CollapseWarning, stacklevel=2)
                logger.warning(alert.message())
            i += 1
        if i == 0:
            raise KeyError("CollapseDetector.update: no monitor/b{i}/sigma_qk_max in the metrics; pass collect_metrics output")
        self.alerts.extend(new)
        return new
