#!/usr/bin/env python
"""Compare recipe runs side by side: one figure and a summary that ranks them by final validation loss.

    python recipes/compare_runs.py results/demo/adamw_weyl results/demo/adamw results/demo/adamw_warmup \
        --output_dir results/demo

Reads each run folder's ``train_log.json`` and ``all_results.json`` (written by the recipes) and writes into
``--output_dir``: ``comparison.png`` (four panels: validation loss, minimum attention entropy and max
σ1(W_qᵀW_k) where the runs used ``--monitor_steps``, the AdamW² cap's effective / scheduled lr) and
``summary.json`` / ``summary.md`` (who won, by how much, and what the monitor saw: when each run's worst attention
entropy fell below :data:`NEAR_COLLAPSE` nats and how low it went, and each run's largest σ1(W_qᵀW_k)).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from hf_weyl.recipe.plotting import plot_story, series


NAMES = {"adamw_weyl": "AdamW²", "adamw": "AdamW"}
#: Attention entropy (nats) below which a head puts nearly all of its attention on one token (two tokens at 98/2 %
#: have 0.098 nats): what summary.md calls near collapse.
NEAR_COLLAPSE = 0.1


def label(run: Path, results: dict) -> str:
    warm = "no warmup" if not results.get("warmup_steps") else f"{results['warmup_steps']} warmup steps"
    name = NAMES.get(results.get("optimizer"), results.get("optimizer", run.name))
    tau = f" τ={results['tau']:g}" if results.get("tau") is not None else ""
    if tau and results.get("tau_auto_steps"):
        tau += " (auto)"
    return f"{name}{tau}, {warm}"


def extreme(log: list[dict], key: str, pick) -> float:
    values = [v for v in series(log, key)[1] if math.isfinite(v)]
    return pick(values) if values else float("nan")


def first_step_below(log: list[dict], key: str, threshold: float) -> int | None:
    """The first logged step whose ``key`` is below ``threshold`` (or not finite), ``None`` if none is."""
    steps, values = series(log, key)
    return next((s for s, v in zip(steps, values) if not v >= threshold), None)


def step_reached(log: list[dict], key: str, value: float) -> int | None:
    """The first logged step at which ``key`` is ``value`` to the 3 decimals summary.md shows."""
    steps, values = series(log, key)
    return next((s for s, v in zip(steps, values) if f"{v:.3f}" == f"{value:.3f}"), None)


def monitor_findings(summary: dict[str, dict]) -> list[str]:
    """What the entropy and σ1 panels show, in numbers: for each monitored run when its worst attention entropy first
    fell below NEAR_COLLAPSE and its lowest value; whether the run that held out longest still fell (delayed, not
    prevented); the largest σ1(W_qᵀW_k) of each run against the smallest. Empty without --monitor_steps."""
    runs = {n: s for n, s in summary.items() if math.isfinite(s["min_attention_entropy"])}
    if not runs:
        return []
    lines = []
    for name, s in runs.items():
        below = s["entropy_near_collapse_step"]
        when = f"first below {NEAR_COLLAPSE:g} nats at step {below}" if below is not None else \
            f"never below {NEAR_COLLAPSE:g} nats in {s['steps']} steps"
        lines.append(f"{name}: minimum attention entropy {when}; its lowest, {s['min_attention_entropy']:.3f} nats, "
                     f"by step {s['min_attention_entropy_step']}.")
    fell = [n for n, s in runs.items() if s["entropy_near_collapse_step"] is not None]
    if len(runs) > 1 and fell:
        last = max(runs, key=lambda n: (runs[n]["entropy_near_collapse_step"] is None,
                                        runs[n]["entropy_near_collapse_step"] or 0))
        if runs[last]["entropy_near_collapse_step"] is not None:
            lines.append(f"Every run's attention entropy fell near collapse (below {NEAR_COLLAPSE:g} nats): {last} "
                         "delayed it but did not prevent it.")
        else:
            lines.append(f"{last} stayed above {NEAR_COLLAPSE:g} nats over its {runs[last]['steps']} steps; "
                         f"{', '.join(fell)} fell below.")
    sigma = {n: s["max_sigma_qk"] for n, s in runs.items() if math.isfinite(s["max_sigma_qk"]) and s["max_sigma_qk"] > 0}
    if len(sigma) > 1:
        low = min(sigma, key=sigma.get)
        others = ", ".join(f"{n} {sigma[n]:.3g} ({sigma[n] / sigma[low]:.0f}×)" for n in sigma if n != low)
        lines.append(f"Largest σ1(W_qᵀW_k) over the run: {low} {sigma[low]:.3g}; {others}.")
    return lines


def verdict(summary: dict[str, dict]) -> list[str]:
    """Sentences: the winner by final validation loss and its margin over each other run."""
    ranked = sorted(summary, key=lambda n: (not math.isfinite(summary[n]["eval_loss"]), summary[n]["eval_loss"]))
    best = ranked[0]
    lines = [f"**{best}** has the lowest final validation loss, {summary[best]['eval_loss']:.3f} nats."]
    for name in ranked[1:]:
        gap = summary[name]["eval_loss"] - summary[best]["eval_loss"]
        lines.append(f"{name}: {summary[name]['eval_loss']:.3f} nats, {gap:.3f} nats worse.")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="Recipe output folders.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--title", default="GPT-2 tiny preset: AdamW² vs AdamW")
    args = parser.parse_args(argv)
    logs, summary = {}, {}
    for run in map(Path, args.runs):
        for name in ("train_log.json", "all_results.json"):
            if not (run / name).is_file():
                parser.error(f"{str(run)!r} is not a finished recipe run (no {name})")
        results = json.loads((run / "all_results.json").read_text())
        name = label(run, results)
        if name in logs:  # same settings: tell the runs apart by their folders
            name = f"{name} ({run.name})"
        logs[name] = json.loads((run / "train_log.json").read_text())
        losses = [r["train_loss"] for r in logs[name] if "train_loss" in r]
        finite = [x for x in losses if math.isfinite(x)]
        summary[name] = {
            "folder": str(run),
            "eval_loss": results["eval_loss"],
            "final_train_loss": losses[-1],
            "max_train_loss_after_start": max(finite[len(finite) // 10:]) if finite else float("nan"),
            "learning_rate": max((r["lr"] for r in logs[name] if "lr" in r), default=float("nan")),
            "steps": results.get("step"),
            "min_attention_entropy": extreme(logs[name], "monitor/entropy_min", min),
            "max_sigma_qk": extreme(logs[name], "monitor/sigma_qk_max", max),
            "min_cap_lr_ratio": extreme(logs[name], "cap/lr_ratio_min", min),
        }
        summary[name]["min_attention_entropy_step"] = step_reached(logs[name], "monitor/entropy_min",
                                                              summary[name]["min_attention_entropy"])
        summary[name]["entropy_near_collapse_step"] = first_step_below(logs[name], "monitor/entropy_min", NEAR_COLLAPSE)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_story(logs, out / "comparison.png", title=args.title)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = "\n".join(
        f"| {n} | {s['eval_loss']:.4f} | {s['final_train_loss']:.4f} | {s['min_attention_entropy']:.3f} | "
        f"{s['max_sigma_qk']:.3g} | {s['min_cap_lr_ratio']:.3g} | [{s['folder']}]({s['folder']}) |"
        for n, s in summary.items())
    lines, findings = verdict(summary), monitor_findings(summary)
    (out / "summary.md").write_text(
        f"# {args.title}\n\n" + " ".join(lines) + "\n\n"
        + ("".join(f"- {line}\n" for line in findings) + "\n" if findings else "")
        + "![comparison](comparison.png)\n\n"
        "| run | validation loss | final train loss | min attention entropy | max σ1(W_qᵀW_k) | min effective/scheduled lr "
        "| folder (model card: README.md) |\n"
        f"|---|---|---|---|---|---|---|\n{rows}\n\n"
        "Attention entropy (lowest over layers and heads, in nats) and σ1(W_qᵀW_k) (largest over heads): hf_weyl.monitor "
        "on a fixed probe batch (nan: the run had no --monitor_steps). The lr ratio is the AdamW² cap's "
        "effective / scheduled lr, lowest over capped tensors and logged steps (nan: AdamW has no cap).\n")
    for n, s in summary.items():
        print(f"{n:>32}: validation loss {s['eval_loss']:.4f}, final train loss {s['final_train_loss']:.4f}, "
              f"min attention entropy {s['min_attention_entropy']:.3f}")
    print("\n".join(lines + findings))
    print(f"plot: {plot}")
    return summary


if __name__ == "__main__":
    main()
