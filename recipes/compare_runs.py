#!/usr/bin/env python
"""Compare recipe runs side by side: one figure and a summary that ranks them by final validation loss.

    python recipes/compare_runs.py results/demo/adamw_weyl results/demo/adamw results/demo/adamw_warmup \
        --output_dir results/demo

Reads each run folder's ``train_log.json`` and ``all_results.json`` (written by the recipes) and writes into
``--output_dir``: ``comparison.png`` (four panels: validation loss, minimum attention entropy and max
σ1(W_qᵀW_k) where the runs used ``--monitor_steps``, the AdamW² cap's effective / scheduled lr) and
``summary.json`` / ``summary.md`` (who won, by how much, and each run's worst attention entropy).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from hf_weyl.recipe.plotting import plot_story, series


NAMES = {"adamw_weyl": "AdamW²", "adamw": "AdamW"}


def label(run: Path, results: dict) -> str:
    warm = "no warmup" if not results.get("warmup_steps") else f"{results['warmup_steps']} warmup steps"
    name = NAMES.get(results.get("optimizer"), results.get("optimizer", run.name))
    tau = f" τ={results['tau']:g}" if results.get("tau") is not None else ""
    return f"{name}{tau}, {warm}"


def extreme(log: list[dict], key: str, pick) -> float:
    values = [v for v in series(log, key)[1] if math.isfinite(v)]
    return pick(values) if values else float("nan")


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
            "min_attention_entropy": extreme(logs[name], "monitor/entropy_min", min),
            "max_sigma_qk": extreme(logs[name], "monitor/sigma_qk_max", max),
            "min_cap_lr_ratio": extreme(logs[name], "cap/lr_ratio_min", min),
        }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_story(logs, out / "comparison.png", title=args.title)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = "\n".join(
        f"| {n} | {s['eval_loss']:.4f} | {s['final_train_loss']:.4f} | {s['min_attention_entropy']:.3f} | "
        f"{s['max_sigma_qk']:.3g} | {s['min_cap_lr_ratio']:.3g} | [{s['folder']}]({s['folder']}) |"
        for n, s in summary.items())
    lines = verdict(summary)
    (out / "summary.md").write_text(
        f"# {args.title}\n\n" + " ".join(lines) + "\n\n![comparison](comparison.png)\n\n"
        "| run | validation loss | final train loss | min attention entropy | max σ1(W_qᵀW_k) | min effective/scheduled lr "
        "| folder (model card: README.md) |\n"
        f"|---|---|---|---|---|---|---|\n{rows}\n\n"
        "Attention entropy and σ1(W_qᵀW_k): hf_weyl.monitor on a fixed probe batch (nan: the run had no "
        "--monitor_steps). The lr ratio is the AdamW² cap's, lowest over capped tensors and logged steps (nan: AdamW).\n")
    for n, s in summary.items():
        print(f"{n:>32}: validation loss {s['eval_loss']:.4f}, final train loss {s['final_train_loss']:.4f}, "
              f"min attention entropy {s['min_attention_entropy']:.3f}")
    print("\n".join(lines))
    print(f"plot: {plot}")
    return summary


if __name__ == "__main__":
    main()
