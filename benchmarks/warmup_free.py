"""Warmup-free training: AdamWeyl against AdamW (with / without warmup) and the alternatives.

On the tiny GPT-2, tiny ViT (``hf_weyl.recipe.presets``) and tiny Post-LN BERT (masked LM on the GPT-2
preset's text, built here) tasks, for every length × lr × method (× τ for the capped methods) × seed:
same data order, model init and cosine schedule; only ``adamw_warmup`` has a linear warmup
(``--warmup_fraction`` of the steps). ``admin_*`` methods first apply the Admin transform
(``baselines.admin_transform``, Post-LN only). Every ``--monitor_interval`` steps the training monitor
(``hf_weyl.monitor``) measures σ1(W_qᵀW_k), SEC and the attention entropy on a fixed probe batch.

A run counts as *collapsed* when the monitor's ``CollapseDetector`` fires or the loss becomes
non-finite. Reported per task × length × method × τ × lr (mean over seeds): final validation loss (GPT,
BERT: masked-token loss) or accuracy (ViT), minimum attention entropy, maximum σ1(W_qᵀW_k), collapsed
runs, ms per step (training steps only, monitor excluded). Then *best-vs-best*: per method its best
(lr, τ) of the sweep, compared with the best AdamW-with-warmup run of the same length.

    python benchmarks/warmup_free.py --tasks gpt2 vit --seeds 0 1 --output docs/benchmarks_warmup_free.md
    python benchmarks/warmup_free.py --tasks gpt2 --methods adamweyl --taus 0.003 0.01 0.03 --steps 150 600
    python benchmarks/warmup_free.py --from_json seed0.json seed1.json --img_dir docs/img   # merge runs

Prints the markdown tables and writes them, the raw results (JSON) and plots (``--img_dir``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import transformers
from torch import nn

import hf_weyl
import baselines
from hf_weyl.monitor import CollapseDetector, ModelLayout, collect_metrics

METHODS = ("adamw_warmup", "adamw", "adamweyl", "admin_adamw", "admin_adamweyl", "stable_adamw", "muon", "gi_adam",
           "lion_a", "lion_ar")
#: Methods with a cap τ (``--taus``) and methods applying the Admin transform (Post-LN tasks only).
CAPPED = ("adamweyl", "admin_adamweyl")
ADMIN = ("admin_adamw", "admin_adamweyl")
TASKS = ("gpt2", "vit", "bert")
POST_LN_TASKS = ("bert",)
#: The reference of the best-vs-best comparison.
REFERENCE = "adamw_warmup"
#: "Tie" margin of the best-vs-best verdicts: 0.02 nats (loss tasks), 0.5 accuracy points (ViT).
TIE = {"gpt2": 0.02, "bert": 0.02, "vit": 0.005}
#: lr sweeps (×30 span), up to rates where AdamW without warmup collapses or fails on these presets. (ViT at
#: 1e-2 and 3e-2 leaves every Adam-type method at chance accuracy in 150 steps: see docs/benchmarks.md.)
DEFAULT_LRS = {"gpt2": (1e-3, 3e-3, 1e-2, 3e-2), "vit": (1e-4, 3e-4, 1e-3, 3e-3), "bert": (3e-4, 1e-3, 3e-3, 1e-2)}
#: Paper hyper-parameters (SPEC Table 2): GPT betas (0.9, 0.95), wd 0.1, clip 1.0, τ 0.01; ViT (0.9, 0.99), wd 0.05,
#: τ 0.004. BERT (not in the paper): BERT's own betas (0.9, 0.999), wd 0.01 and clip 1.0; GPT's τ 0.01.
HPARAMS = {
    "gpt2": dict(betas=(0.9, 0.95), weight_decay=0.1, tau=0.01, clip=1.0, batch_size=8),
    "vit": dict(betas=(0.9, 0.99), weight_decay=0.05, tau=0.004, clip=0.0, batch_size=32),
    "bert": dict(betas=(0.9, 0.999), weight_decay=0.01, tau=0.01, clip=1.0, batch_size=8),
}
#: Tiny Post-LN BERT (HF ``BertForMaskedLM``): 6 layers (12 residual sub-layers), 128 wide, 4 heads, no dropout.
BERT_CONFIG = dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512,
                   max_position_embeddings=64, type_vocab_size=1, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0)
MLM_PROBABILITY = 0.15


def higher_is_better(task: str) -> bool:
    return task == "vit"


def default_methods(task: str) -> tuple[str, ...]:
    """All methods valid for ``task``: on the Post-LN task the five of the Admin comparison."""
    if task in POST_LN_TASKS:
        return ("adamw_warmup", "adamw", "adamweyl", "admin_adamw", "admin_adamweyl")
    return tuple(m for m in METHODS if m not in ADMIN)


@dataclass
class RunResult:
    task: str
    method: str
    lr: float
    seed: int
    steps: int  # steps done (< total_steps when the loss became non-finite)
    final_metric: float  # val loss (gpt2, bert) / accuracy (vit)
    final_val_loss: float
    min_entropy: float
    max_sigma_qk: float
    collapsed: bool
    collapse_step: int | None
    nonfinite: bool
    ms_per_step: float
    history: list[dict[str, float]]
    tau: float | None = None  # the cap of adamweyl / admin_adamweyl
    total_steps: int | None = None  # planned run length (older files: = steps)

    @property
    def length(self) -> int:
        return self.total_steps if self.total_steps is not None else self.steps

    @property
    def key(self) -> tuple:
        return (self.task, self.length, self.method, self.tau, self.lr, self.seed)


def mlm_mask(ids: torch.Tensor, gen: torch.Generator, mask_id: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: 15 % of the tokens are predicted; of those 80 % → [MASK], 10 % → random, 10 % kept."""
    chosen = torch.rand(ids.shape, generator=gen) < MLM_PROBABILITY
    how = torch.rand(ids.shape, generator=gen)
    random_ids = torch.randint(0, vocab_size, ids.shape, generator=gen)
    inputs = torch.where(chosen & (how < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, inputs)
    return inputs, torch.where(chosen, ids, torch.full_like(ids, -100))


def bert_layout(model: nn.Module) -> ModelLayout:
    """Monitor layout of HF BERT (separate q/k/v ``nn.Linear``; the Admin transform keeps these paths)."""
    return ModelLayout(
        blocks="bert.encoder.layer", num_heads=model.config.num_attention_heads,
        query="attention.self.query", key="attention.self.key", value="attention.self.value",
        output="attention.output.dense", mlp=("intermediate.dense", "output.dense"),
        norms=("attention.output.LayerNorm", "output.LayerNorm"), name="bert",
    )


def load_task(task: str, seed: int = 0) -> dict[str, Any]:
    """Tensors of the task's train/validation data and a model factory (``mask``: the train-batch corruption)."""
    from hf_weyl.recipe import presets

    if task in ("gpt2", "bert"):
        splits, tok = presets.tiny_text_splits(block_size=64, seed=0)
        train = torch.tensor(splits["train"]["input_ids"])
        val = torch.tensor(splits["validation"]["input_ids"])[:256]
        if task == "gpt2":
            cfg = presets.tiny_gpt2_config(len(tok))
            return dict(train=(train,), val=(val,), make_model=lambda: transformers.GPT2LMHeadModel(cfg))
        mask_id = len(tok)  # one extra token: [MASK]
        # no padding in packed blocks: pad_token_id=None keeps token 0 (<|endoftext|>) an ordinary, trained embedding
        cfg = transformers.BertConfig(vocab_size=len(tok) + 1, pad_token_id=None, **BERT_CONFIG)
        mask = lambda ids, gen: mlm_mask(ids, gen, mask_id, len(tok))  # noqa: E731
        val_masked = mask(val, torch.Generator().manual_seed(0))  # one fixed masking for every run
        return dict(train=(train,), val=val_masked, mask=mask, make_model=lambda: transformers.BertForMaskedLM(cfg),
                    layout=bert_layout)
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
    if task == "bert":
        return {"input_ids": tensors[0], "labels": tensors[1]}
    return {"pixel_values": tensors[0], "labels": tensors[1]}


def build_optimizer(method: str, model: nn.Module, lr: float, hp: dict[str, Any], tau: float | None = None) -> torch.optim.Optimizer:
    betas, wd = hp["betas"], hp["weight_decay"]
    if method in ("adamw", "adamw_warmup", "admin_adamw"):
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=wd)
    if method in CAPPED:
        return hf_weyl.AdamWeyl(model.parameters(), lr=lr, betas=betas, weight_decay=wd, tau=hp["tau"] if tau is None else tau)
    if method == "stable_adamw":
        return baselines.stable_adamw(model, lr=lr, weight_decay=wd, betas=betas)
    if method == "muon":
        hidden, rest = baselines.muon_param_groups(model)
        return baselines.MuonWithAdamW(hidden, rest, lr=lr, weight_decay=wd, betas=betas)
    if method == "gi_adam":
        return baselines.GIAdam(model.parameters(), lr=lr, betas=betas, weight_decay=wd)
    if method in ("lion_a", "lion_ar"):
        cls = baselines.LionA if method == "lion_a" else baselines.LionAR
        # Lion's practice: lr 3-10x smaller than AdamW's, weight decay as many times larger (we use 3, a choice); the
        # matrices then turn by sqrt(2·lr·wd) per step, AdamW's own equilibrium angular update at (lr, wd).
        return cls(baselines.lion_param_groups(model, lr / 3), lr=lr / 3, beta=0.98, weight_decay=3 * wd)
    raise ValueError(f"unknown method {method!r}; valid: {METHODS}")


@torch.no_grad()
def evaluate(task: str, model: nn.Module, val: tuple[torch.Tensor, ...], batch_size: int = 128) -> tuple[float, float]:
    """(mean validation loss per predicted token/sample, accuracy (vit; NaN otherwise))."""
    model.eval()
    total, correct, n = 0.0, 0, 0
    for i in range(0, len(val[0]), batch_size):
        batch = as_inputs(task, tuple(t[i : i + batch_size] for t in val))
        out = model(**batch)
        # HF's loss is a mean over the batch's predicted tokens: weight it by their number (masked LM) or rows
        weight = int((batch["labels"] != -100).sum()) if task == "bert" else len(batch["labels"])
        total += float(out.loss) * weight
        if task == "vit":
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        n += weight
    model.train()
    return total / n, (correct / n if task == "vit" else float("nan"))


def run_one(task: str, method: str, lr: float, seed: int, data: dict[str, Any], steps: int, *, tau: float | None = None,
            warmup_fraction: float = 0.1, monitor_interval: int = 10, detector_kwargs: dict | None = None) -> RunResult:
    """Train one model; identical init and batches for every method at a given seed."""
    hp = HPARAMS[task]
    if method in ADMIN and task not in POST_LN_TASKS:
        raise ValueError(f"method {method!r} applies Admin, which targets Post-LN models; task {task!r} is Pre-LN "
                         f"(Admin tasks: {POST_LN_TASKS})")
    if method in CAPPED:
        tau = hp["tau"] if tau is None else tau
    elif tau is not None:
        raise ValueError(f"tau={tau} given for method {method!r}, which has no cap; capped methods: {CAPPED}")
    torch.manual_seed(seed)
    model = data["make_model"]()
    model.train()
    train = data["train"]
    if method in ADMIN:  # profiling pass on a fixed batch, from a generator of its own (the data order is unchanged)
        pgen = torch.Generator().manual_seed(2000 + seed)
        rows = tuple(t[: hp["batch_size"]] for t in train)
        rows = data["mask"](rows[0], pgen) if "mask" in data else rows
        baselines.admin_transform(model, as_inputs(task, rows))
    opt = build_optimizer(method, model, lr, hp, tau)
    warmup = int(round(warmup_fraction * steps)) if method == "adamw_warmup" else 0
    sched = transformers.get_cosine_schedule_with_warmup(opt, warmup, steps)
    gen = torch.Generator().manual_seed(1000 + seed)
    probe = as_inputs(task, tuple(t[:4] for t in data["val"]))
    layout = data["layout"](model) if "layout" in data else None
    detector = CollapseDetector(**(detector_kwargs or {}))
    history, train_time, nonfinite = [], 0.0, False
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(train[0]), (hp["batch_size"],), generator=gen)
        rows = tuple(t[idx] for t in train)
        if "mask" in data:
            rows = data["mask"](rows[0], gen)
        batch = as_inputs(task, rows)
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
            m = collect_metrics(model, probe, opt, layout=layout)
            rec = {"step": step, "loss": float(loss.detach()), "lr": sched.get_last_lr()[0],
                   **{k: v for k, v in m.items() if not k.startswith("monitor/lr_ratio/") or step % (5 * monitor_interval) == 0}}
            history.append(rec)
            detector.update(m, step)
    val_loss, acc = evaluate(task, model, data["val"]) if not nonfinite else (float("nan"), float("nan"))
    return RunResult(
        task, method, lr, seed, step,
        final_metric=acc if task == "vit" else val_loss,
        final_val_loss=val_loss,
        min_entropy=min((h["monitor/entropy_min"] for h in history), default=float("nan")),
        max_sigma_qk=max((h["monitor/sigma_qk_max"] for h in history), default=float("nan")),
        collapsed=detector.collapsed or nonfinite,
        collapse_step=detector.alerts[0].step if detector.alerts else None,
        nonfinite=nonfinite,
        ms_per_step=1000 * train_time / step,
        history=history,
        tau=tau,
        total_steps=steps,
    )


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _tau(tau: float | None) -> str:
    return "–" if tau is None else f"{tau:g}"


def _order(r: RunResult) -> tuple:
    return (r.task, r.length, METHODS.index(r.method), -1 if r.tau is None else r.tau, r.lr)


def groups(results: list[RunResult]) -> dict[tuple, list[RunResult]]:
    """Runs grouped by (task, length, method, τ, lr): the seeds of one setting."""
    out: dict[tuple, list[RunResult]] = {}
    for r in sorted(results, key=_order):
        out.setdefault(r.key[:5], []).append(r)
    return out


def summarise(results: list[RunResult]) -> str:
    """Markdown table: one row per task × length × method × τ × lr, means over seeds."""
    rows = ["| task | steps | method | τ | lr | val loss (gpt2, bert) / acc (vit) | min entropy | max σ1(W_qᵀW_k) | collapsed | ms/step |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for (task, length, method, tau, lr), rs in groups(results).items():
        rows.append(
            f"| {task} | {length} | {method} | {_tau(tau)} | {lr:g} | {_mean([r.final_metric for r in rs]):.3f} | "
            f"{_mean([r.min_entropy for r in rs]):.3f} | {max(r.max_sigma_qk for r in rs):.3g} | "
            f"{sum(r.collapsed for r in rs)}/{len(rs)} | {_mean([r.ms_per_step for r in rs]):.1f} |"
        )
    return "\n".join(rows)


@dataclass
class Best:
    """A method's best setting of a sweep (by the mean over seeds of the final metric)."""

    task: str
    length: int
    method: str
    lr: float
    tau: float | None
    metric: float
    per_seed: list[float]
    collapsed: int
    settings: int  # (lr, τ) settings tried
    edge: str  # "" or which swept value the best sits at the edge of ("lr low", "τ high", ...)


def _edge(value: float | None, values: set, name: str) -> list[str]:
    if value is None or len(values) < 2:
        return []
    return [f"{name} low"] if value == min(values) else [f"{name} high"] if value == max(values) else []


def best_settings(results: list[RunResult]) -> list[Best]:
    """Per task × length × method, the (lr, τ) with the best mean metric (NaN — diverged — is worst)."""
    per_method: dict[tuple, list[tuple]] = {}
    for (task, length, method, tau, lr), rs in groups(results).items():
        per_method.setdefault((task, length, method), []).append((tau, lr, rs))
    best = []
    for (task, length, method), settings in per_method.items():
        sign = 1 if higher_is_better(task) else -1

        def score(s):
            m = _mean([r.final_metric for r in s[2]])
            return -math.inf if math.isnan(m) else sign * m

        tau, lr, rs = max(settings, key=score)
        lrs, taus = {s[1] for s in settings}, {s[0] for s in settings if s[0] is not None}
        # edges are about the swept axis at the best point: the lrs tried at this τ, the τs tried at this lr
        lrs_here = {s[1] for s in settings if s[0] == tau}
        taus_here = {s[0] for s in settings if s[1] == lr and s[0] is not None}
        edge = ", ".join(_edge(lr, lrs_here if len(lrs_here) > 1 else lrs, "lr") + _edge(tau, taus_here or taus, "τ"))
        best.append(Best(task, length, method, lr, tau, _mean([r.final_metric for r in rs]),
                         [r.final_metric for r in sorted(rs, key=lambda r: r.seed)], sum(r.collapsed for r in rs),
                         len(settings), edge))
    return best


def verdict(task: str, metric: float, reference: float) -> tuple[float, str]:
    """(gain over the reference: > 0 is better, for loss and accuracy alike; "wins" / "ties" / "loses")."""
    gain = (metric - reference) if higher_is_better(task) else (reference - metric)
    if math.isnan(gain):
        return gain, "loses"
    return gain, "ties" if abs(gain) <= TIE[task] else "wins" if gain > 0 else "loses"


def best_vs_best(results: list[RunResult]) -> str:
    """Markdown table: per task × length × method its best (lr, τ) and the verdict against best AdamW + warmup."""
    rows = ["| task | steps | method | best lr | best τ | val loss / acc (mean) | per seed | collapsed | settings | "
            f"gain vs best {REFERENCE} | verdict | at sweep edge |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    bests = best_settings(results)
    refs = {(b.task, b.length): b for b in bests if b.method == REFERENCE}
    for b in bests:
        ref = refs.get((b.task, b.length))
        if ref is None or b.method == REFERENCE:
            gain, word = "", "reference" if b.method == REFERENCE else f"(no {REFERENCE} run)"
        else:
            g, word = verdict(b.task, b.metric, ref.metric)
            gain = f"{g:+.3f}"
        rows.append(
            f"| {b.task} | {b.length} | {b.method} | {b.lr:g} | {_tau(b.tau)} | {b.metric:.3f} | "
            f"{' / '.join(f'{m:.3f}' for m in b.per_seed)} | {b.collapsed}/{len(b.per_seed)} | {b.settings} | "
            f"{gain} | {word} | {b.edge} |"
        )
    return "\n".join(rows)


def plot(results: list[RunResult], img_dir: str) -> list[str]:
    """Per task (and length): final metric vs lr per method (and τ), σ1(W_qᵀW_k)/entropy trajectories at the largest lr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(img_dir, exist_ok=True)
    paths = []
    lengths = {r.length for r in results}
    for task, length in sorted({(r.task, r.length) for r in results}):
        rs = [r for r in results if r.task == task and r.length == length]
        lrs = sorted({r.lr for r in rs})
        seed0 = min(r.seed for r in rs)
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for method in [m for m in METHODS if any(r.method == m for r in rs)]:
            for tau in sorted({r.tau for r in rs if r.method == method}, key=lambda t: -1 if t is None else t):
                mine = [r for r in rs if r.method == method and r.tau == tau]
                label = method if tau is None or len({r.tau for r in rs if r.method == method}) == 1 else f"{method} τ={tau:g}"
                xs = sorted({r.lr for r in mine})
                axes[0].plot(xs, [_mean([r.final_metric for r in mine if r.lr == lr]) for lr in xs], "o-", label=label)
                for r in [r for r in mine if r.lr == lrs[-1] and r.seed == seed0]:
                    x = [h["step"] for h in r.history]
                    axes[1].plot(x, [h["monitor/sigma_qk_max"] for h in r.history], label=label)
                    axes[2].plot(x, [h["monitor/entropy_min"] for h in r.history], label=label)
        axes[0].set_xscale("log")
        axes[0].set_xticks(lrs, [f"{lr:g}" for lr in lrs])
        axes[0].minorticks_off()
        axes[0].set_xlabel("peak lr")
        axes[0].set_ylabel("val accuracy" if higher_is_better(task) else "val loss")
        axes[1].set_yscale("log")
        axes[1].set_title(f"max σ1(W_qᵀW_k), lr={lrs[-1]:g}")
        axes[2].set_title(f"min attention entropy, lr={lrs[-1]:g}")
        for ax in axes[1:]:
            ax.set_xlabel("step")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"warmup-free sweep, tiny {task}, {length} steps")
        fig.tight_layout()
        path = os.path.join(img_dir, f"warmup_free_{task}.png" if len(lengths) == 1 else f"warmup_free_{task}_{length}steps.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["gpt2", "vit"], choices=TASKS)
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                   help="default: every method valid for the task (admin_* only on the Post-LN task bert)")
    p.add_argument("--lrs", nargs="+", type=float, default=None, help="peak learning rates (default: per task DEFAULT_LRS)")
    p.add_argument("--taus", nargs="+", type=float, default=None,
                   help=f"caps τ swept for {'/'.join(CAPPED)} (default: the task's paper value, HPARAMS)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", nargs="+", type=int, default=[200], help="run lengths (each a separate cosine schedule)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (run tasks as parallel processes instead)")
    p.add_argument("--warmup_fraction", type=float, default=0.1)
    p.add_argument("--monitor_interval", type=int, default=10)
    p.add_argument("--output", default=None, help="markdown file for the tables (default: print only)")
    p.add_argument("--json", default=None, help="raw results (with histories) as JSON, rewritten after every run")
    p.add_argument("--summary_json", default=None, help="the same results without the per-step histories (small)")
    p.add_argument("--resume", action="store_true", help="with --json: keep its runs and train only the missing ones")
    p.add_argument("--img_dir", default=None, help="folder for the PNG plots")
    p.add_argument("--from_json", nargs="+", default=None, metavar="FILE",
                   help="train nothing: merge the results of earlier --json files (e.g. one per seed) into one table")
    args = p.parse_args(argv)
    if any(s < 1 for s in args.steps):
        p.error(f"--steps must be >= 1, got {args.steps}")
    if not 0 <= args.warmup_fraction < 1:
        p.error(f"--warmup_fraction must be in [0, 1), got {args.warmup_fraction}")
    if args.monitor_interval < 1:
        p.error(f"--monitor_interval must be >= 1, got {args.monitor_interval}")
    if args.lrs is not None and any(lr <= 0 for lr in args.lrs):
        p.error(f"--lrs must be > 0, got {args.lrs}")
    if args.taus is not None and any(t <= 0 for t in args.taus):
        p.error(f"--taus must be > 0, got {args.taus}")
    if args.resume and not args.json:
        p.error("--resume needs --json (the file whose runs are kept)")
    if not args.from_json:
        for task in args.tasks:
            methods = args.methods or default_methods(task)
            if task not in POST_LN_TASKS and set(methods) & set(ADMIN):
                p.error(f"--methods {' '.join(sorted(set(methods) & set(ADMIN)))} apply Admin, which targets Post-LN "
                        f"models; task {task} is Pre-LN (use --tasks {' '.join(POST_LN_TASKS)})")
            if args.taus is not None and not set(methods) & set(CAPPED):
                p.error(f"--taus applies to {'/'.join(CAPPED)}, none of which is in --methods {' '.join(methods)}")
    return args


def load_results(paths: list[str]) -> list[RunResult]:
    """RunResults from ``--json`` files; a run (task, length, method, τ, lr, seed) present twice is an error.

    Files written before τ was recorded ran the capped methods at the task's HPARAMS τ."""
    names = {f.name for f in fields(RunResult)}
    results, seen = [], {}
    for path in paths:
        with open(path) as f:
            for raw in json.load(f):
                r = RunResult(**{k: v for k, v in raw.items() if k in names})
                if r.method in CAPPED and r.tau is None:
                    r.tau = HPARAMS[r.task]["tau"]
                if r.key in seen:
                    raise SystemExit(f"run {r.key} is in both {seen[r.key]} and {path}")
                seen[r.key] = path
                results.append(r)
    return results


def save_results(results: list[RunResult], path: str, history: bool = True) -> None:
    """Atomic write of ``results`` (optionally without the per-step histories)."""
    rows = [asdict(r) | ({} if history else {"history": []}) for r in results]
    with open(path + ".tmp", "w") as f:
        json.dump(rows, f)
    os.replace(path + ".tmp", path)


def main(argv=None) -> list[RunResult]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.from_json:
        results = load_results(args.from_json)
    else:
        results = load_results([args.json]) if args.resume and os.path.exists(args.json) else []
    done = {r.key for r in results}
    for task in [] if args.from_json else args.tasks:
        data = load_task(task)
        for length in args.steps:
            for lr in args.lrs or DEFAULT_LRS[task]:
                for method in args.methods or default_methods(task):
                    for tau in (args.taus or [HPARAMS[task]["tau"]]) if method in CAPPED else [None]:
                        for seed in args.seeds:
                            if (task, length, method, tau, lr, seed) in done:
                                continue
                            r = run_one(task, method, lr, seed, data, length, tau=tau,
                                        warmup_fraction=args.warmup_fraction, monitor_interval=args.monitor_interval)
                            results.append(r)
                            print(f"{task} {length} {method:14s} τ={_tau(tau)} lr={lr:g} seed={seed} "
                                  f"metric={r.final_metric:.4f} min_H={r.min_entropy:.3f} max_sqk={r.max_sigma_qk:.3g} "
                                  f"collapsed={r.collapsed} ({r.collapse_step}) {r.ms_per_step:.1f} ms/step", flush=True)
                            if args.json:  # keep partial results of long sweeps
                                save_results(results, args.json)
                            if args.summary_json:
                                save_results(results, args.summary_json, history=False)
    if args.from_json and args.json:
        save_results(results, args.json)
    if args.from_json and args.summary_json:
        save_results(results, args.summary_json, history=False)
    tables = summarise(results) + "\n\nBest vs best (each method at its best lr and τ of the sweep):\n\n" + best_vs_best(results)
    print(tables)
    if args.output:
        with open(args.output, "w") as f:
            f.write(tables + "\n")
    if args.img_dir:
        print(plot(results, args.img_dir))
    return results


if __name__ == "__main__":
    main()
