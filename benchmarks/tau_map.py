"""τ by run length: which AdamWeyl cap τ matches best-tuned AdamW + warmup, for how many training steps.

Reads ``benchmarks/warmup_free.py`` results (``--json`` / ``--summary_json`` files). For each task and run
length T the reference is AdamW + warmup at its best lr (mean over seeds); for each τ, AdamWeyl at its
best lr. A τ is *good* at T when that best is within the tie margin of the reference (0.02 nats of
validation loss, 0.5 accuracy points; ``warmup_free.TIE``) or better, and none of its runs collapsed.

A rule τ(T) is checked at every measured T against the measured τ nearest to τ(T) (log scale; if none
is within a factor √3 — half a step of a ×3 grid — the rule is "not measured" there).

    python benchmarks/tau_map.py benchmarks/results/tau_map_gpt2.json benchmarks/results/tau_map_vit.json \
        --rule 3 --img docs/img/tau_map.png
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass

import warmup_free as wf

CAPPED = "adamweyl"


@dataclass
class Cell:
    """AdamWeyl at one (task, T, τ): its best lr and how it compares with the reference."""

    lr: float
    metric: float
    gain: float  # > 0: better than best AdamW + warmup (loss or accuracy alike)
    collapsed: int
    seeds: int

    def good(self, task: str) -> bool:
        return self.collapsed == 0 and not math.isnan(self.gain) and self.gain >= -wf.TIE[task]


def tau_map(results: list[wf.RunResult]) -> tuple[dict, dict]:
    """({(task, T): best reference Best}, {(task, T, τ): Cell}) from the runs of ``results``."""
    refs = {(b.task, b.length): b for b in wf.best_settings([r for r in results if r.method == wf.REFERENCE])}
    cells = {}
    for (task, length), ref in refs.items():
        capped = [r for r in results if r.method == CAPPED and r.task == task and r.length == length]
        for tau in sorted({r.tau for r in capped}):
            (best,) = wf.best_settings([r for r in capped if r.tau == tau])
            gain, _ = wf.verdict(task, best.metric, ref.metric)
            cells[task, length, tau] = Cell(best.lr, best.metric, gain, best.collapsed, len(best.per_seed))
    return refs, cells


def table(task: str, refs: dict, cells: dict) -> str:
    """Markdown: rows τ, columns run length; a cell is gain vs best AdamW + warmup (best lr), ✓ when good."""
    lengths = sorted(t for k, t in refs if k == task)
    taus = sorted({tau for (k, _, tau) in cells if k == task})
    unit = "acc" if wf.higher_is_better(task) else "nats"
    rows = [f"| {task}: gain vs best AdamW + warmup ({unit}) | " + " | ".join(f"{t} steps" for t in lengths) + " |",
            "|---" * (len(lengths) + 1) + "|"]
    ref_row = [f"{refs[task, t].metric:.3f} (lr {refs[task, t].lr:g}{', ' + refs[task, t].edge if refs[task, t].edge else ''})"
               for t in lengths]
    rows.append("| AdamW + warmup, best lr | " + " | ".join(ref_row) + " |")
    for tau in taus:
        out = []
        for t in lengths:
            c = cells.get((task, t, tau))
            if c is None:
                out.append("–")
                continue
            mark = "✓" if c.good(task) else ("✗ collapsed" if c.collapsed else "✗")
            out.append(f"{c.gain:+.3f} (lr {c.lr:g}) {mark}")
        rows.append(f"| AdamWeyl τ = {tau:g} | " + " | ".join(out) + " |")
    best = []
    for t in lengths:
        here = {tau: c for (k, tt, tau), c in cells.items() if k == task and tt == t}
        best.append(f"τ {max(here, key=lambda x: here[x].gain):g}" if here else "–")
    rows.append("| best τ | " + " | ".join(best) + " |")
    return "\n".join(rows)


def nearest(tau: float, measured: list[float]) -> float | None:
    """The measured τ nearest to ``tau`` in log scale, if within a factor √3."""
    if not measured:
        return None
    near = min(measured, key=lambda m: abs(math.log(m / tau)))
    return near if abs(math.log(near / tau)) <= 0.5 * math.log(3) + 1e-9 else None


def check_rule(c: float, refs: dict, cells: dict, tau_max: float | None = None) -> list[tuple[str, int, float, str]]:
    """Rows (task, T, τ(T) = c/T (capped at tau_max), "good" / "not good" / "not measured") at every measured T."""
    out = []
    for task, t in sorted(refs):
        tau = c / t if tau_max is None else min(c / t, tau_max)
        near = nearest(tau, sorted({x for (k, tt, x) in cells if k == task and tt == t}))
        if near is None:
            out.append((task, t, tau, "not measured"))
        else:
            out.append((task, t, tau, f"{'good' if cells[task, t, near].good(task) else 'not good'} (τ {near:g})"))
    return out


def plot(refs: dict, cells: dict, path: str, rule: float | None = None, tau_max: float | None = None) -> str:
    """Per task: gain vs τ, one line per run length (band = tie margin); best τ vs T with the rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({k for k, _ in refs})
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.6 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        lengths = sorted(t for k, t in refs if k == task)
        best_x, best_y = [], []
        for t in lengths:
            here = sorted((tau, c) for (k, tt, tau), c in cells.items() if k == task and tt == t)
            if not here:
                continue
            row[0].plot([tau for tau, _ in here], [c.gain for _, c in here], "o-", label=f"{t} steps")
            for tau, c in here:
                if c.collapsed:
                    row[0].plot([tau], [c.gain], "kx", ms=9)
            tau_best = max(here, key=lambda x: x[1].gain)[0]
            best_x.append(t)
            best_y.append(tau_best)
        row[0].axhspan(-wf.TIE[task], wf.TIE[task], color="grey", alpha=0.2, lw=0)
        row[0].axhline(0, color="k", lw=0.6)
        row[0].set_xscale("log")
        row[0].set_xlabel("τ")
        unit = "accuracy" if wf.higher_is_better(task) else "val loss, nats"
        row[0].set_ylabel(f"gain vs best AdamW+warmup ({unit})")
        row[0].set_title(f"tiny {task}: AdamWeyl (best lr per τ), no warmup")
        row[0].legend(fontsize=7)
        row[1].plot(best_x, best_y, "o", label="best τ measured")
        if rule is not None and best_x:
            xs = [min(best_x), max(best_x)]
            if tau_max is not None and xs[0] < rule / tau_max < xs[1]:
                xs.insert(1, rule / tau_max)  # the corner where the cap meets C / steps
            cap = "" if tau_max is None else f", at most {tau_max:g}"
            row[1].plot(xs, [rule / x if tau_max is None else min(rule / x, tau_max) for x in xs], "--",
                        label=f"τ = {rule:g} / steps{cap}")
        row[1].set_xscale("log")
        row[1].set_yscale("log")
        row[1].set_xlabel("training steps")
        row[1].set_ylabel("τ")
        row[1].set_title(f"tiny {task}: best τ by run length")
        row[1].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="warmup_free.py --json / --summary_json files")
    p.add_argument("--rule", type=float, default=None, metavar="C", help="check the rule τ = C / steps")
    p.add_argument("--tau_max", type=float, default=None, help="cap of the rule's τ")
    p.add_argument("--img", default=None, help="PNG path for the plot")
    p.add_argument("--output", default=None, help="markdown file for the tables")
    args = p.parse_args(argv)
    if args.rule is not None and args.rule <= 0:
        p.error(f"--rule must be > 0, got {args.rule}")
    refs, cells = tau_map(wf.load_results(args.files))
    if not cells:
        p.error(f"no {CAPPED} runs with a {wf.REFERENCE} run of the same task and length in {args.files}")
    parts = [table(task, refs, cells) for task in sorted({k for k, _ in refs})]
    if args.rule is not None:
        rows = check_rule(args.rule, refs, cells, args.tau_max)
        parts.append("| task | steps | τ = C / steps | measured |\n|---|---|---|---|\n" +
                     "\n".join(f"| {task} | {t} | {tau:.3g} | {verdict} |" for task, t, tau, verdict in rows))
    text = "\n\n".join(parts)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    if args.img:
        print(plot(refs, cells, args.img, args.rule, args.tau_max))
    return text


if __name__ == "__main__":
    main()
