"""Plots of a training log (a list of ``{"step": ..., key: value}`` records, see ``hf_weyl.recipe.TrainLog``).

* ``loss.png``: training loss (and validation loss where evaluated) against optimizer steps;
* ``cap.png``: the fraction of capped tensors whose lr the AdamW² cap reduced, and the scheduled
  lr beside the effective lr (scheduled × mean and min of effective/scheduled over tensors);
* :func:`plot_comparison`: several runs' losses on one figure;
* :func:`plot_story`: several runs in four panels — loss, minimum attention entropy, max σ1(W_qᵀW_k)
  (``--monitor_steps``) and the cap's effective / scheduled lr — each with a title, axis labels and a legend of
  its runs and line styles (the demo's figure).
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


#: The panels of :func:`plot_story`: (log key, title, y label, log scale).
STORY_PANELS = (
    ("eval_loss", "Loss (lower is better)", "cross-entropy (nats per token)", False),
    ("monitor/entropy_min", "Attention entropy of the most collapsed head\n(0 = every query attends to one token)",
     "min attention entropy (nats)", False),
    ("monitor/sigma_qk_max", "Largest query–key product σ1(W_qᵀW_k)\n(grows as attention sharpens)",
     "max σ1(W_qᵀW_k) over heads (log scale)", True),
    ("cap/lr_ratio_median", "AdamW² cap: the lr it lets through\n(1 = not capped; AdamW has no cap)",
     "effective / scheduled lr (log scale)", True),
)


def _style_handle(style: str, label: str, **kwargs):
    """A legend entry for a line style (black), not for a run."""
    from matplotlib.lines import Line2D

    marker = "o" if style.startswith("o") else None
    return Line2D([], [], color=kwargs.pop("color", "black"), linestyle=style.lstrip("o") or "-", marker=marker,
                  markersize=3, label=label, **kwargs)


def plot_story(runs: Mapping[str, Log], path: str | Path, title: str | None = None) -> Path:
    """Four panels, one colour per run (label → log), each with a title, axis labels and a legend that says what its
    lines are: the loss (validation loss at the evaluation steps, solid with dots; training loss faint), the monitor's
    minimum attention entropy and largest σ1(W_qᵀW_k), and the cap's effective / scheduled lr (median over the
    capped-eligible tensors solid — the mean in logs from before the median was logged — the smallest dashed, and the
    scheduled lr gray dotted on a right axis; AdamW runs have none). A panel whose key no run logged says so."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for ax, (key, panel_title, ylabel, log_scale) in zip(axes.flat, STORY_PANELS):
        drawn, extra, plotted, schedule = False, [], [], None
        for i, (label, log) in enumerate(runs.items()):
            color = f"C{i}"
            if key == "eval_loss":
                s, v = series(log, "train_loss")
                if s:
                    ax.plot(s, _finite(v), "-", color=color, alpha=0.3, linewidth=1)
            panel_key = key
            if key == "cap/lr_ratio_median" and not series(log, key)[0]:
                panel_key = "cap/lr_ratio_mean"  # a log from before the median was logged
            steps, values = series(log, panel_key)
            if not steps:
                continue
            values = _finite(values)
            plotted += values
            if key == "cap/lr_ratio_median":
                what = "median" if panel_key == key else "mean"
                ax.plot(steps, values, "-", color=color, label=f"{label}: {what} over capped tensors")
                s, v = series(log, "cap/lr_ratio_min")
                if s:
                    ax.plot(s, _finite(v), "--", color=color, linewidth=1, label=f"{label}: smallest tensor")
                s, v = series(log, "lr")
                if s and schedule is None:  # the ratio rises as the schedule decays: the scheduled lr, right axis
                    schedule = ax.twinx()
                    schedule.plot(s, _finite(v), ":", color="gray", linewidth=1.2)
                    schedule.set_ylabel("scheduled lr (gray dotted)", color="gray")
                    schedule.tick_params(axis="y", colors="gray")
                    schedule.set_ylim(bottom=0)
                    extra.append(_style_handle(":", f"scheduled lr of {label} (right axis)", color="gray"))
            else:
                ax.plot(steps, values, "o-" if len(steps) < 30 else "-", color=color, label=label, markersize=3)
            drawn = True
        if key == "eval_loss" and drawn:
            extra = [_style_handle("o-", "solid with dots: validation loss"),
                     _style_handle("-", "faint: training loss (mean per logging interval)", alpha=0.3)]
        if key == "cap/lr_ratio_median":
            uncapped = [label for label, log in runs.items()
                        if not series(log, key)[0] and not series(log, "cap/lr_ratio_mean")[0]]
            if uncapped and drawn:
                extra.append(_style_handle("", f"no cap, not drawn: {' / '.join(uncapped)}", color="none"))
        if log_scale and any(v > 0 for v in plotted):  # a log axis needs a positive value
            ax.set_yscale("log")
        if not drawn:
            ax.text(0.5, 0.5, f"not logged ({key})", ha="center", va="center", transform=ax.transAxes, fontsize=9)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn:
            handles, _ = ax.get_legend_handles_labels()
            if schedule is None:
                ax.legend(handles=handles + extra, fontsize=7.5, loc="best")
            else:  # on the right axis, which is drawn above the left one
                schedule.legend(handles=handles + extra, fontsize=7.5, loc="lower right", framealpha=0.9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
