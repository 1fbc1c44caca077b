"""Warmup-free training: AdamWeyl against AdamW (with / without warmup) and the alternatives.

On the tiny GPT-2 and tiny ViT presets (``hf_weyl.recipe.presets``), for every method × lr × seed: same
data order, model init and cosine schedule; only ``adamw_warmup`` has a linear warmup
(``--warmup_fraction`` of the steps). Every ``--monitor_interval`` steps the training monitor
(``hf_weyl.monitor``) measures σ1(W_qᵀW_k), SEC and the attention entropy on a fixed probe batch.

A run counts as *collapsed* when the monitor's ``CollapseDetector`` fires or the loss becomes
non-finite. Reported per method and lr (mean over seeds): final validation loss (GPT) or accuracy
(ViT), minimum attention entropy, maximum σ1(W_qᵀW_k), collapsed runs, ms per step (training
steps only, monitor excluded).

    python benchmarks/warmup_free.py --tasks gpt2 vit --seeds 0 1 --output docs/benchmarks_warmup_free.md
    python benchmarks/warmup_free.py --from_json seed0.json seed1.json --img_dir docs/img   # merge runs

Prints a markdown table and writes it, the raw results (JSON) and plots (``--img_dir``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import transformers
from torch import nn

import hf_weyl
import baselines
from hf_weyl.monitor import CollapseDetector, collect_metrics

METHODS = ("adamw_warmup", "adamw", "adamweyl", "stable_adamw", "muon", "gi_adam", "lion_a", "lion_ar")
TASKS = ("gpt2", "vit")
#: lr sweeps (×30 span), up to rates where AdamW without warmup collapses or fails on these presets. (ViT at
#: 1e-2 and 3e-2 leaves every Adam-type method at chance accuracy in 150 steps: see docs/benchmarks.md.)
DEFAULT_LRS = {"gpt2": (1e-3, 3e-3, 1e-2, 3e-2), "vit": (1e-4, 3e-4, 1e-3, 3e-3)}
#: Paper hyper-parameters (SPEC Table 2): GPT betas (0.9, 0.95), wd 0.1, clip 1.0, τ 0.01; ViT (0.9, 0.99), wd 0.05, τ 0.004.
HPARAMS = {
    "gpt2": dict(betas=(0.9, 0.95), weight_decay=0.1, tau=0.01, clip=1.0, batch_size=8),
    "vit": dict(betas=(0.9, 0.99), weight_decay=0.05, tau=0.004, clip=0.0, batch_size=32),
}


@dataclass
class RunResult:
    task: str
    method: str
    lr: float
    seed: int
    steps: int
    final_metric: float  # val loss (gpt2) / accuracy (vit)
    final_val_loss: float
    min_entropy: float
    max_sigma_qk: float
    collapsed: bool
    collapse_step: int | None
    nonfinite: bool
    ms_per_step: float
    history: list[dict[str, float]]


def load_task(task: str, seed: int = 0) -> dict[str, Any]:
    """Tensors of the preset's train/validation data and a model factory."""
    from hf_weyl.recipe import presets

    if task == "gpt2":
        splits, tok = presets.tiny_text_splits(block_size=64, seed=0)
        train = torch.tensor(splits["train"]["input_ids"])
        val = torch.tensor(splits["validation"]["input_ids"])[:256]
        cfg = presets.tiny_gpt2_config(len(tok))
        return dict(train=(train,), val=(val,), make_model=lambda: transformers.GPT2LMHeadModel(cfg))
    if task == "vit":
        splits, _ = presets.tiny_image_splits(seed=0)

        def tensors(ds):
            rows = ds[: len(ds)]
            return torch.stack(list(rows["pixel_values"])), torch.as_tensor(rows["labels"])

        train, val = tensors(splits["train"]), tensors(splits["validation"])
        cfg = presets.tiny_vit_config(int(train[1].max()) + 1)
        return dict(train=train, val=val, make_model=lambda: transformers.ViTForImageClassification(cfg))
    raise ValueError(f"unknown task {task!r}; valid: {TASKS}")


def as_inputs(task: str, tensors: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    if task == "gpt2":
        return {"input_ids": tensors[0], "labels": tensors[0]}
    return {"pixel_values": tensors[0], "labels": tensors[1]}


def build_optimizer(method: str, model: nn.Module, lr: float, hp: dict[str, Any]) -> torch.optim.Optimizer:
    betas, wd = hp["betas"], hp["weight_decay"]
    if method in ("adamw", "adamw_warmup"):
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=wd)
    if method == "adamweyl":
        return hf_weyl.AdamWeyl(model.parameters(), lr=lr, betas=betas, weight_decay=wd, tau=hp["tau"])
    if method == "stable_adamw":
        return baselines.stable_adamw(model, lr=lr, weight_decay=wd, betas=betas)
    if method == "muon":
        hidden, rest = baselines.muon_param_groups(model)
        return baselines.MuonWithAdamW(hidden, rest, lr=lr, weight_decay=wd, betas=betas)
    if method == "gi_adam":
        return baselines.GIAdam(model.parameters(), lr=lr, betas=betas, weight_decay=wd)
    if method in ("lion_a", "lion_ar"):
        cls = baselines.LionA if method == "lion_a" else baselines.LionAR
        # Lion's sign steps are larger than Adam's: the usual 3-10x smaller lr (we use /3, a choice).
        return cls(baselines.lion_param_groups(model, lr / 3), lr=lr / 3, beta=0.98, weight_decay=wd)
    raise ValueError(f"unknown method {method!r}; valid: {METHODS}")


@torch.no_grad()
def evaluate(task: str, model: nn.Module, val: tuple[torch.Tensor, ...], batch_size: int = 128) -> tuple[float, float]:
    """(mean validation loss, accuracy (vit) or exp(-loss) placeholder-free NaN for gpt2)."""
    model.eval()
    losses, correct, n = [], 0, 0
    for i in range(0, len(val[0]), batch_size):
        batch = as_inputs(task, tuple(t[i : i + batch_size] for t in val))
        out = model(**batch)
        losses.append(float(out.loss) * len(batch["labels"]))
        if task == "vit":
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        n += len(batch["labels"])
    model.train()
    return sum(losses) / n, (correct / n if task == "vit" else float("nan"))


def run_one(task: str, method: str, lr: float, seed: int, data: dict[str, Any], steps: int, *,
            warmup_fraction: float = 0.1, monitor_interval: int = 10, detector_kwargs: dict | None = None) -> RunResult:
    """Train one model; identical init and batches for every method at a given seed."""
    hp = HPARAMS[task]
    torch.manual_seed(seed)
    model = data["make_model"]()
    model.train()
    opt = build_optimizer(method, model, lr, hp)
    warmup = int(round(warmup_fraction * steps)) if method == "adamw_warmup" else 0
    sched = transformers.get_cosine_schedule_with_warmup(opt, warmup, steps)
    gen = torch.Generator().manual_seed(1000 + seed)
    train = data["train"]
    probe = as_inputs(task, tuple(t[:4] for t in data["val"]))
    detector = CollapseDetector(**(detector_kwargs or {}))
    history, train_time, nonfinite = [], 0.0, False
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(train[0]), (hp["batch_size"],), generator=gen)
        batch = as_inputs(task, tuple(t[idx] for t in train))
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        if hp["clip"]:
            nn.utils.clip_grad_norm_(model.parameters(), hp["clip"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        train_time += time.perf_counter() - t0
        if not math.isfinite(float(loss.detach())):
            nonfinite = True
            break
        if step == 1 or step % monitor_interval == 0 or step == steps:
            m = collect_metrics(model, probe, opt)
            rec = {"step": step, "loss": float(loss.detach()), "lr": sched.get_last_lr()[0],
                   **{k: v for k, v in m.items() if not k.startswith("monitor/lr_ratio/") or step % (5 * monitor_interval) == 0}}
            history.append(rec)
            detector.update(m, step)
    val_loss, acc = evaluate(task, model, data["val"]) if not nonfinite else (float("nan"), float("nan"))
    finite = [h for h in history]
    return RunResult(
        task, method, lr, seed, step,
        final_metric=acc if task == "vit" else val_loss,
        final_val_loss=val_loss,
        min_entropy=min((h["monitor/entropy_min"] for h in finite), default=float("nan")),
        max_sigma_qk=max((h["monitor/sigma_qk_max"] for h in finite), default=float("nan")),
        collapsed=detector.collapsed or nonfinite,
        collapse_step=detector.alerts[0].step if detector.alerts else None,
        nonfinite=nonfinite,
        ms_per_step=1000 * train_time / step,
        history=history,
    )


def summarise(results: list[RunResult]) -> str:
    """Markdown table: one row per task × method × lr, means over seeds."""
    rows = ["| task | method | lr | val loss (gpt2) / acc (vit) | min entropy | max σ1(W_qᵀW_k) | collapsed | ms/step |",
            "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r.task, r.method, r.lr) for r in results}, key=lambda k: (k[0], METHODS.index(k[1]), k[2]))
    for task, method, lr in keys:
        rs = [r for r in results if (r.task, r.method, r.lr) == (task, method, lr)]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        metric = mean([r.final_metric for r in rs])
        rows.append(
            f"| {task} | {method} | {lr:g} | {metric:.3f} | {mean([r.min_entropy for r in rs]):.3f} | "
            f"{max(r.max_sigma_qk for r in rs):.3g} | {sum(r.collapsed for r in rs)}/{len(rs)} | {mean([r.ms_per_step for r in rs]):.1f} |"
        )
    return "\n".join(rows)


def plot(results: list[RunResult], img_dir: str) -> list[str]:
    """Per task: final metric vs lr per method, and σ1(W_qᵀW_k)/entropy trajectories at the largest lr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(img_dir, exist_ok=True)
    paths = []
    for task in sorted({r.task for r in results}):
        rs = [r for r in results if r.task == task]
        lrs = sorted({r.lr for r in rs})
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for method in [m for m in METHODS if any(r.method == m for r in rs)]:
            ys = [sum(r.final_metric for r in rs if r.method == method and r.lr == lr) /
                  max(1, sum(1 for r in rs if r.method == method and r.lr == lr)) for lr in lrs]
            axes[0].plot(lrs, ys, "o-", label=method)
            top = [r for r in rs if r.method == method and r.lr == lrs[-1] and r.seed == min(x.seed for x in rs)]
            for r in top:
                x = [h["step"] for h in r.history]
                axes[1].plot(x, [h["monitor/sigma_qk_max"] for h in r.history], label=method)
                axes[2].plot(x, [h["monitor/entropy_min"] for h in r.history], label=method)
        axes[0].set_xscale("log")
        axes[0].set_xticks(lrs, [f"{lr:g}" for lr in lrs])
        axes[0].minorticks_off()
        axes[0].set_xlabel("peak lr")
        axes[0].set_ylabel("val loss" if task == "gpt2" else "val accuracy")
        axes[1].set_yscale("log")
        axes[1].set_title(f"max σ1(W_qᵀW_k), lr={lrs[-1]:g}")
        axes[2].set_title(f"min attention entropy, lr={lrs[-1]:g}")
        for ax in axes[1:]:
            ax.set_xlabel("step")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"warmup-free sweep, tiny {task}")
        fig.tight_layout()
        path = os.path.join(img_dir, f"warmup_free_{task}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--lrs", nargs="+", type=float, default=None, help="peak learning rates (default: per task DEFAULT_LRS)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="torch threads (run tasks as parallel processes instead)")
    p.add_argument("--warmup_fraction", type=float, default=0.1)
    p.add_argument("--monitor_interval", type=int, default=10)
    p.add_argument("--output", default=None, help="markdown file for the table (default: print only)")
    p.add_argument("--json", default=None, help="raw results (with histories) as JSON")
    p.add_argument("--img_dir", default=None, help="folder for the PNG plots")
    p.add_argument("--from_json", nargs="+", default=None, metavar="FILE",
                   help="train nothing: merge the results of earlier --json files (e.g. one per seed) into one table")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if not 0 <= args.warmup_fraction < 1:
        p.error(f"--warmup_fraction must be in [0, 1), got {args.warmup_fraction}")
    if args.monitor_interval < 1:
        p.error(f"--monitor_interval must be >= 1, got {args.monitor_interval}")
    if args.lrs is not None and any(lr <= 0 for lr in args.lrs):
        p.error(f"--lrs must be > 0, got {args.lrs}")
    return args


def load_results(paths: list[str]) -> list[RunResult]:
    """RunResults from ``--json`` files; a run (task, method, lr, seed) present twice is an error."""
    results, seen = [], {}
    for path in paths:
        with open(path) as f:
            for raw in json.load(f):
                r = RunResult(**raw)
                key = (r.task, r.method, r.lr, r.seed)
                if key in seen:
                    raise SystemExit(f"run {key} is in both {seen[key]} and {path}")
                seen[key] = path
                results.append(r)
    return results


def main(argv=None) -> list[RunResult]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results: list[RunResult] = load_results(args.from_json) if args.from_json else []
    for task in [] if args.from_json else args.tasks:
        data = load_task(task)
        for lr in args.lrs or DEFAULT_LRS[task]:
            for method in args.methods:
                for seed in args.seeds:
                    r = run_one(task, method, lr, seed, data, args.steps,
                                warmup_fraction=args.warmup_fraction, monitor_interval=args.monitor_interval)
                    results.append(r)
                    print(f"{task} {method:13s} lr={lr:g} seed={seed} metric={r.final_metric:.4f} "
                          f"min_H={r.min_entropy:.3f} max_sqk={r.max_sigma_qk:.3g} collapsed={r.collapsed} "
                          f"({r.collapse_step}) {r.ms_per_step:.1f} ms/step", flush=True)
                    if args.json:  # keep partial results of long sweeps
                        with open(args.json + ".tmp", "w") as f:
                            json.dump([asdict(x) for x in results], f)
                        os.replace(args.json + ".tmp", args.json)
    table = summarise(results)
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + "\n")
    if args.img_dir:
        print(plot(results, args.img_dir))
    return results


if __name__ == "__main__":
    main()
