"""Accuracy of AdamWeyl's warm-started σ estimates against exact SVD, along a real training run.

Trains the tiny GPT-2 preset (offline text, ``hf_weyl.recipe.presets``) with the paper's GPT settings and no
warmup, and after every step compares, for every matrix, the optimizer's estimates σ̂1(W_{t-1}) and
σ̂1(U_t) with exact singular values, and the realised relative step α'σ1(U_t)/σ1(W_{t-1}) of capped
tensors with τ. Power iteration never overestimates, so errors are underestimates; an underestimated
σ_U loosens the cap (realised step > τ), an underestimated σ_W tightens it.

    python benchmarks/sigma_accuracy.py --power_iters 1 2 3 --steps 150

``--tightness``: the cap's tightness from a fresh model's first step, as the realised
σ1(W_t − W_{t−1}) / (τ σ1(W_{t−1})) of capped matrices (exact SVDs, weight decay 0 so that the step is
α'U alone), reported as median / p99 / max and the worst per step, for several τ and learning rates:

    python benchmarks/sigma_accuracy.py --tightness --steps 30 --taus 0.005 0.01 --lrs 1e-2 3e-2
"""

from __future__ import annotations

import argparse

import torch
from transformers import GPT2LMHeadModel

from hf_weyl import AdamWeyl
from hf_weyl.recipe.presets import tiny_gpt2_config, tiny_text_splits


def exact_sigma(t: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(t.reshape(t.shape[0], -1).double(), ord=2).item()


def run(power_iters: int, args: argparse.Namespace) -> dict[str, list[float]]:
    splits, tokenizer = tiny_text_splits(block_size=args.block_size, seed=0)
    data = torch.tensor(splits["train"]["input_ids"])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config(len(tokenizer)))
    opt = AdamWeyl(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, tau=args.tau,
                   power_iters=power_iters)
    gen = torch.Generator().manual_seed(0)
    err_w, err_u, excess, capped = [], [], [], []
    for step in range(args.steps):
        batch = data[torch.randint(0, len(data), (args.batch_size,), generator=gen)]
        before = {p: exact_sigma(p.detach()) for p in model.parameters() if p.ndim >= 2}
        opt.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        stats = opt.last_stats
        beta1, beta2 = opt.param_groups[0]["betas"]
        for i, p in enumerate(stats.params):
            if p.ndim < 2:
                continue
            s = opt.state[p]
            t = float(s["step"])
            u = (s["exp_avg"] / (1 - beta1**t)) / ((s["exp_avg_sq"] / (1 - beta2**t)).sqrt() + 1e-8)
            sw, su = before[p], exact_sigma(u)
            err_w.append(1 - stats.sigma_weight[i].item() / sw)
            err_u.append(1 - stats.sigma_update[i].item() / su)
            ratio = stats.lr_ratio[i].item()
            if ratio < 1:
                excess.append(ratio * args.lr * su / sw / args.tau - 1)
            capped.append(ratio < 1)
    return {"err_w": err_w, "err_u": err_u, "excess": excess, "capped": capped}


def tightness(tau: float, lr: float, args: argparse.Namespace) -> list[list[float]]:
    """Per step, the realised σ1(ΔW) / (τ σ1(W_{t−1})) of every capped matrix (wd 0, default AdamWeyl settings)."""
    splits, tokenizer = tiny_text_splits(block_size=args.block_size, seed=0)
    data = torch.tensor(splits["train"]["input_ids"])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config(len(tokenizer)))
    opt = AdamWeyl(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0, tau=tau)
    gen = torch.Generator().manual_seed(0)
    per_step = []
    for _ in range(args.steps):
        batch = data[torch.randint(0, len(data), (args.batch_size,), generator=gen)]
        before = {p: p.detach().clone() for p in model.parameters() if p.ndim >= 2}
        opt.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        stats = opt.last_stats
        per_step.append([
            exact_sigma(p.detach() - before[p]) / (tau * exact_sigma(before[p]))
            for p, r in zip(stats.params, stats.lr_ratio.tolist()) if p.ndim >= 2 and r < 1
        ])
    return per_step


def quantiles(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    t = torch.tensor(xs, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.95, 1.0], dtype=torch.float64)).tolist()
    return f"median {q[0]:.2e}  p95 {q[1]:.2e}  max {q[2]:.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--power_iters", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--tau", type=float, default=0.01)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--tightness", action="store_true", help="report the realised step / τ from the first step")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.005, 0.01])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-2, 3e-2])
    args = parser.parse_args()
    if args.tightness:
        print(f"tiny GPT-2 preset, default AdamWeyl settings, weight decay 0, betas (0.9, 0.95), {args.steps} steps "
              f"from a fresh model, batch {args.batch_size}x{args.block_size}: realised σ1(ΔW) / (τ σ1(W)) of capped matrices")
        print("| τ | lr | capped matrix-steps | median | p99 | max | worst step |\n|---|---|---|---|---|---|---|")
        for tau in args.taus:
            for lr in args.lrs:
                per_step = tightness(tau, lr, args)
                flat = torch.tensor([r for step in per_step for r in step], dtype=torch.float64)
                if flat.numel() == 0:
                    print(f"| {tau:g} | {lr:g} | 0 | | | | |")
                    continue
                worst = max(range(len(per_step)), key=lambda i: max(per_step[i], default=0.0))
                q = torch.quantile(flat, torch.tensor([0.5, 0.99], dtype=torch.float64)).tolist()
                print(f"| {tau:g} | {lr:g} | {flat.numel()} | {q[0]:.3f} | {q[1]:.3f} | {flat.max():.3f} | {worst + 1} |", flush=True)
        return
    print(f"tiny GPT-2 preset, lr {args.lr}, tau {args.tau}, betas (0.9, 0.95), wd 0.1, no warmup, "
          f"{args.steps} steps, batch {args.batch_size}x{args.block_size}")
    for k in args.power_iters:
        r = run(k, args)
        frac = sum(r["capped"]) / max(len(r["capped"]), 1)
        print(f"power_iters={k}: σ_W underestimate {quantiles(r['err_w'])}")
        print(f"               σ_U underestimate {quantiles(r['err_u'])}")
        print(f"               capped {frac:.1%} of tensor-steps; realised step / τ − 1 when capped: "
              f"{quantiles(r['excess'])}")


if __name__ == "__main__":
    main()
