#!/usr/bin/env python
"""Compare recipe runs side by side: one loss plot and a summary of their final validation metrics.

    python recipes/compare_runs.py results/demo/adamw_weyl results/demo/adamw --output_dir results/demo

Reads each run folder's ``train_log.json`` and ``all_results.json`` (written by the recipes) and
writes ``comparison.png`` and ``summary.json`` / ``summary.md`` into ``--output_dir``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from hf_weyl.recipe.plotting import plot_comparison


def label(run: Path, results: dict) -> str:
    warm = "no warmup" if not results.get("warmup_steps") else f"{results['warmup_steps']} warmup steps"
    return f"{results.get('optimizer', run.name)}, {warm}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="Recipe output folders.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--title", default="GPT-2 tiny preset, no warmup: AdamW² vs AdamW")
    args = parser.parse_args(argv)
    logs, summary = {}, {}
    for run in map(Path, args.runs):
        for name in ("train_log.json", "all_results.json"):
            if not (run / name).is_file():
                parser.error(f"{str(run)!r} is not a finished recipe run (no {name})")
        results = json.loads((run / "all_results.json").read_text())
        name = label(run, results)
        logs[name] = json.loads((run / "train_log.json").read_text())
        losses = [r["train_loss"] for r in logs[name] if "train_loss" in r]
        finite = [x for x in losses if math.isfinite(x)]
        summary[name] = {
            "folder": str(run),
            "eval_loss": results["eval_loss"],
            "final_train_loss": losses[-1],
            "max_train_loss_after_start": max(finite[len(finite) // 10:]) if finite else float("nan"),
            "learning_rate": max((r["lr"] for r in logs[name] if "lr" in r), default=float("nan")),
        }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_comparison(logs, out / "comparison.png", title=args.title)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = "\n".join(f"| {n} | {s['eval_loss']:.4f} | {s['final_train_loss']:.4f} | [{s['folder']}]({s['folder']}) |"
                     for n, s in summary.items())
    (out / "summary.md").write_text(f"# {args.title}\n\n![comparison](comparison.png)\n\n"
                                    "| run | validation loss | final train loss | folder (model card: README.md) |\n"
                                    f"|---|---|---|---|\n{rows}\n")
    for n, s in summary.items():
        print(f"{n:>28}: validation loss {s['eval_loss']:.4f}, final train loss {s['final_train_loss']:.4f}")
    print(f"plot: {plot}")
    return summary


if __name__ == "__main__":
    main()
