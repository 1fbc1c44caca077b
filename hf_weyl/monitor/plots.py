"""PNG figures in the style of the paper: σ trajectories per block, SEC curves, effective lr per tensor.
Each function takes the monitor ``history`` (a list of ``{"step": .., "monitor/...": ..}`` dicts, e.g.
``WeylMonitorCallback.history`` or the lines of ``weyl_monitor.jsonl``).

matplotlib is imported when a figure is drawn, through its object API (``Figure`` on an Agg canvas): no
backend is selected and no pyplot figure is created, so a notebook's own backend and figures are untouched.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

__all__ = ["plot_lr_ratios", "plot_sec_curves", "plot_trajectories"]

TRAJECTORY_KEYS = ("sigma_qk_max", "sigma_q", "sigma_k", "sigma_ov", "entropy_min", "input_norm")


def _figure(**subplots_kw):
    """A ``Figure`` with an Agg canvas and its axes (``Figure.subplots(**subplots_kw)``)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"hf_weyl.monitor.plots needs matplotlib ({err}): pip install matplotlib, or \"hf_weyl[recipes]\"") from None

    figsize = subplots_kw.pop("figsize")
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(**subplots_kw)


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def _num_blocks(history: Sequence[Mapping[str, float]]) -> int:
    blocks = {int(m.group(1)) for rec in history for k in rec if (m := re.match(r"monitor/b(\d+)/", k))}
    if not blocks:
        raise ValueError("no monitor/b{i}/... entries in the history; pass WeylMonitorCallback.history or collect_metrics records")
    return max(blocks) + 1


def _series(history, key):
    pts = [(r["step"], r[key]) for r in history if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_trajectories(history: Sequence[Mapping[str, float]], path: str, keys: Sequence[str] = TRAJECTORY_KEYS, title: str = "") -> str:
    """One panel per quantity, one line per block (σ's on a log scale), as in the paper's Fig. 1/3."""
    n = _num_blocks(history)
    fig, axes = _figure(nrows=1, ncols=len(keys), figsize=(3.2 * len(keys), 3.0), squeeze=False)
    cmap = _cmap("viridis")
    for ax, key in zip(axes[0], keys):
        for i in range(n):
            x, y = _series(history, f"monitor/b{i}/{key}")
            if x:
                ax.plot(x, y, color=cmap(i / max(1, n - 1)), label=f"block {i}")
        if key.startswith("sigma") or key.startswith("input"):
            ax.set_yscale("log")
        ax.set_title(key)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_sec_curves(history: Sequence[Mapping[str, float]], path: str, block: int | None = None, num_steps: int = 5, title: str = "") -> str:
    """SEC(s) of W_qᵀW_k (max over heads) against s, one curve per measurement step (paper Fig. 2)."""
    n = _num_blocks(history)
    blocks = range(n) if block is None else [block]
    fig, axes = _figure(nrows=1, ncols=len(blocks), figsize=(3.2 * len(blocks), 3.0), squeeze=False)
    picks = [history[round(j * (len(history) - 1) / max(1, num_steps - 1))] for j in range(min(num_steps, len(history)))]
    cmap = _cmap("plasma")
    for ax, b in zip(axes[0], blocks):
        for j, rec in enumerate(picks):
            pts = sorted((int(m.group(1)), v) for k, v in rec.items() if (m := re.fullmatch(rf"monitor/b{b}/sec(\d+)_max", k)))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=cmap(j / max(1, len(picks) - 1)), label=f"step {rec['step']}")
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("s")
        ax.set_title(f"SEC(s), block {b}")
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_lr_ratios(history: Sequence[Mapping[str, float]], path: str, title: str = "", max_lines: int = 24) -> str:
    """Effective / scheduled lr per tensor over training (AdamWeyl's cap; paper appendix M)."""
    names = sorted({k for rec in history for k in rec if k.startswith("monitor/lr_ratio/")})
    if not names:
        raise ValueError("no monitor/lr_ratio/... entries in the history (was the optimizer an AdamWeyl?)")
    fig, ax = _figure(figsize=(6.5, 3.6))
    cmap = _cmap("tab20")
    for j, key in enumerate(names[:max_lines]):
        x, y = _series(history, key)
        ax.plot(x, y, color=cmap(j % 20), lw=1, label=key.removeprefix("monitor/lr_ratio/"))
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("effective / scheduled lr")
    ax.legend(fontsize=5, ncol=2, loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
