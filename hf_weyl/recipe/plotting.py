"""Plots of a training log (a list of ``{"step": ..., key: value}`` records, see ``hf_weyl.recipe.TrainLog``).

* ``loss.png``: training loss (and validation loss where evaluated) against optimizer steps;
* ``cap.png``: the fraction of capped tensors whose lr the AdamW² cap reduced, and the scheduled
  lr beside the effective lr (scheduled × mean and min of effective/scheduled over tensors);
* :func:`plot_comparison`: several runs' losses on one figure;
* :func:`plot_story`: several runs in four panels — validation loss, minimum attention entropy,
  max σ1(W_qᵀW_k) (``--monitor_steps``) and the cap's effective / scheduled lr (the demo's figure).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_cap_stats", "plot_comparison", "plot_loss", "plot_story", "plot_training", "series"]

Log = Sequence[Mapping[str, Any]]


def _pyplot():
    """``subplots``/``close`` on matplotlib's object API (``Figure`` + Agg canvas), not pyplot: no backend is
    selected and no pyplot figure created, so a notebook's backend and figures are left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    class _Figures:
        @staticmethod
        def subplots(*args, figsize=None, **kwargs):
            fig = Figure(figsize=figsize)
            FigureCanvasAgg(fig)
            return fig, fig.subplots(*args, **kwargs)

        @staticmethod
        def close(fig):
            pass

    return _Figures


def series(log: Log, key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of the records that have ``key``."""
    rows = [(r["step"], float(r[key])) for r in log if key in r and r[key] is not None]
    return [s for s, _ in rows], [v for _, v in rows]


def _finite(values: list[float]) -> list[float]:
    return [v if math.isfinite(v) else float("nan") for v in values]


def plot_loss(log: Log, path: str | Path, title: str = "loss") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key, label, style in (("train_loss", "train", "-"), ("eval_loss", "validation", "o-")):
        steps, values = series(log, key)
        if steps:
            ax.plot(steps, _finite(values), style, label=label, markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_cap_stats(log: Log, path: str | Path, title: str = "AdamW² cap") -> Path:
    plt = _pyplot()
    fig, (ax_frac, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps, frac = series(log, "cap/capped_fraction")
    if steps:
        ax_frac.plot(steps, frac, color="tab:red")
    else:
        ax_frac.text(0.5, 0.5, "no cap statistics\n(optimizer is not adamw_weyl)", ha="center", va="center",
                     transform=ax_frac.transAxes)
    ax_frac.set_ylim(-0.02, 1.02)
    ax_frac.set_xlabel("optimizer step")
    ax_frac.set_ylabel("fraction of tensors capped")
    ax_frac.set_title(title + ": capped tensors")
    ax_frac.grid(alpha=0.3)
    positive = False
    for key, label, style in (
        ("lr", "scheduled lr", "k-"),
        ("cap/effective_lr_mean", "effective lr (mean over tensors)", "-"),
        ("cap/effective_lr_min", "effective lr (min over tensors)", "--"),
    ):
        s, v = series(log, key)
        if s:
            ax_lr.plot(s, v, style, label=label)
            positive = positive or any(x > 0 for x in v)
    if positive:  # a log axis needs a positive value (a run that is all lr = 0 gets a linear one)
        ax_lr.set_yscale("log")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("scheduled vs effective lr")
    ax_lr.grid(alpha=0.3, which="both")
    ax_lr.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_training(log: Log, out_dir: str | Path) -> dict[str, Path]:
    """Write ``loss.png`` and ``cap.png`` into ``out_dir``; returns ``{"loss": path, "cap": path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {"loss": plot_loss(log, out / "loss.png"), "cap": plot_cap_stats(log, out / "cap.png")}


def plot_comparison(runs: Mapping[str, Log], path: str | Path, key: str = "train_loss", title: str | None = None) -> Path:
    """One curve of ``key`` per run (label → log), plus validation points where present."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, log) in enumerate(runs.items()):
        color = f"C{i}"
        steps, values = series(log, key)
        ax.plot(steps, _finite(values), "-", color=color, label=f"{label} ({key.replace('_', ' ')})")
        s, v = series(log, "eval_loss")
        if s:
            ax.plot(s, _finite(v), "o", color=color, markersize=4, label=f"{label} (validation)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title or "no warmup")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


#: The panels of :func:`plot_story`: (log key, y label, log scale).
STORY_PANELS = (
    ("eval_loss", "validation loss (nats)", False),
    ("monitor/entropy_min", "min attention entropy (nats)", False),
    ("monitor/sigma_qk_max", "max σ1(W_qᵀW_k)", True),
    ("cap/lr_ratio_mean", "effective / scheduled lr (AdamW² cap)", True),
)


def plot_story(runs: Mapping[str, Log], path: str | Path, title: str | None = None) -> Path:
    """Four panels, one line per run (label → log): validation loss (train loss faint), the monitor's minimum
    attention entropy and largest σ1(W_qᵀW_k), and the cap's effective / scheduled lr (mean over the capped
    tensors, min dashed; AdamW runs have none). A panel whose key no run logged says so."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (key, ylabel, log_scale) in zip(axes.flat, STORY_PANELS):
        drawn = False
        for i, (label, log) in enumerate(runs.items()):
            color = f"C{i}"
            steps, values = series(log, key)
            if key == "eval_loss":
                s, v = series(log, "train_loss")
                if s:
                    ax.plot(s, _finite(v), "-", color=color, alpha=0.25, linewidth=1)
            if not steps:
                continue
            values = _finite(values)
            ax.plot(steps, values, "o-" if len(steps) < 30 else "-", color=color, label=label, markersize=3)
            drawn = True
            if key == "cap/lr_ratio_mean":
                s, v = series(log, "cap/lr_ratio_min")
                ax.plot(s, _finite(v), "--", color=color, linewidth=1)
        if log_scale and drawn and any(v > 0 for _, log in runs.items() for v in series(log, key)[1]):
            ax.set_yscale("log")
        if not drawn:
            ax.text(0.5, 0.5, f"not logged ({key})", ha="center", va="center", transform=ax.transAxes, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
