"""The optimizer step under DeepSpeed ZeRO-Offload: AdamWeyl vs DeepSpeedCPUAdam vs torch's fused AdamW, side by side.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 1 benchmarks/offload_step.py [--steps 10]
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/offload_step.py
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 1 benchmarks/offload_step.py --passes   # and each pass's time
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/offload_step.py --parts
        # and where the ``adamweyl`` step's time goes on each rank: its passes and all-reduces inside the step

Under ``offload_optimizer: {device: cpu}`` each rank steps its flat fp32 partition of the parameters on the CPU;
DeepSpeed ships ``DeepSpeedCPUAdam`` (AVX, one pass) for it, the anchor here. The partitions are those of GPT-2
small (124M parameters, one param group as ZeRO flattens it, rank r holding elements [r·P, (r+1)·P)). Each rank
steps its own partition with

* ``DeepSpeedCPUAdam(adamw_mode=True)`` (built here by DeepSpeed's op builder),
* ``torch.optim.AdamW(fused=True)`` (the Trainer's default optimizer),
* ``AdamWeyl`` through its ZeRO path (``AdamWeyl.step_plan`` on the partition described as the ZeRO adapter does,
  ``zero_unit``, with the layout of GPT-2 small's matrices: σ's of matrices split between ranks by vector
  all-reduces) as DeepSpeed's step calls it after its own check of the gradient norm (fp32, fp16, bf16 by default);
* ``adamweyl_vote``: the same with AdamWeyl's own non-finite vote first (one more read of the gradient and a
  reduced flag: what runs where DeepSpeed does not check, bf16 with ``check_grad_overflow: false``),
* ``adamweyl_ordered`` (more than one rank): ``adamweyl`` with its all-reduces in order
  (``functional.OVERLAP_ALLREDUCES = False``), not overlapped with the matrices each rank holds whole,

alternated step by step in one run (the machine's noise hits all alike), after ``FRESH_STEPS`` + 1 warm-up steps
(AdamWeyl's first steps run more power iterations). Prints medians and the ratios to DeepSpeedCPUAdam.

``--passes`` also times pass 1 without a kept product, reading W for B_W x_W as well: what a step that wrote the
uncapped update in pass 2 (and kept nothing) would pay in pass 1 (docs/benchmarks.md: it costs more than it saves).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

from hf_weyl import AdamWeyl
from hf_weyl.core import functional
from hf_weyl.core.functional import FRESH_STEPS, _PiecesPlan, is_capped
from hf_weyl.core.layout import StepPlan
from hf_weyl.distributed import LAYOUT_SIGMA
from hf_weyl.integrations.deepspeed import DeepSpeedZeroAdapter, ZeroLayout, nonfinite_anywhere, zero_unit
from part_timer import PartTimer, print_parts


def partition(shapes: list[torch.Size], rank: int, world: int, padding: int = 0) -> tuple[int, ZeroLayout]:
    """This rank's partition size and the layout of the parameters' pieces in it (as ZeRO-1/2 cut a flat group),
    with ``padding`` elements after the data of every partition."""
    sizes = [torch.Size(s).numel() for s in shapes]
    total = sum(sizes)
    per = -(-total // world)
    lo, hi = rank * per, min((rank + 1) * per, total)
    offsets, starts, numels, pos = [], [], [], 0
    for size in sizes:
        a, b = max(pos, lo), min(pos + size, hi)
        offsets.append(a - lo if b > a else 0)
        starts.append(a - pos if b > a else 0)
        numels.append(max(0, b - a))
        pos += size
    params = [torch.empty(0) for _ in shapes]  # (stand-ins: the step reads shapes and pieces only)
    return per + padding, ZeroLayout(params, list(shapes), offsets, starts, numels, dist.group.WORLD, stage=2)


def pieces_plan(flat: torch.Tensor, layout: ZeroLayout) -> _PiecesPlan:
    """What the fused step hands the pieces kernel for the capped parameters of this partition (``plan.pieces``,
    ``plan.gaps``; the vectors' lengths ``plan.short_sizes_total // 2`` and ``plan.long_sizes_total // 2``)."""
    parts = [part for part, shape in zip(zero_unit(flat, layout).parts, layout.shapes) if is_capped(shape, False)]
    return _PiecesPlan(flat.numel(), parts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10, help="timed steps per optimizer")
    parser.add_argument("--passes", action="store_true",
                        help="also time each pass of AdamWeyl's fused step on this rank's partition (and fused AdamW's one)")
    parser.add_argument("--parts", action="store_true",
                        help="also print where the timed adamweyl steps go on each rank (passes, all-reduces, the rest)")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    with torch.device("meta"):
        shapes = [p.shape for p in GPT2LMHeadModel(GPT2Config()).parameters()]
    numel, layout = partition(shapes, rank, world)
    gen = torch.Generator().manual_seed(rank)
    init = torch.randn(numel, generator=gen) * 0.02
    names = ("deepspeed_cpu_adam", "adamw_fused", "adamweyl", "adamweyl_vote") + (("adamweyl_ordered",) if world > 1 else ())
    flats = {name: torch.nn.Parameter(init.clone()) for name in names}
    hyper = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opts = {
        "deepspeed_cpu_adam": DeepSpeedCPUAdam([flats["deepspeed_cpu_adam"]], adamw_mode=True, **hyper),
        "adamw_fused": torch.optim.AdamW([flats["adamw_fused"]], fused=True, **hyper),
        "adamweyl": AdamWeyl([flats["adamweyl"]], tau=0.01, **hyper),
        "adamweyl_vote": AdamWeyl([flats["adamweyl_vote"]], tau=0.01, **hyper),
    }
    if world > 1:
        opts["adamweyl_ordered"] = AdamWeyl([flats["adamweyl_ordered"]], tau=0.01, **hyper)

    def step(name: str) -> None:
        if name.startswith("adamweyl"):
            flat = flats[name]
            if name != "adamweyl_vote" or not nonfinite_anywhere([flat.grad], layout.group):
                plan = StepPlan([zero_unit(flat, layout)], DeepSpeedZeroAdapter.name, LAYOUT_SIGMA)
                functional.OVERLAP_ALLREDUCES = name != "adamweyl_ordered"
                opts[name].step_plan(opts[name].param_groups[0], plan)
                functional.OVERLAP_ALLREDUCES = True
        else:
            opts[name].step()

    times: dict[str, list[float]] = {name: [] for name in opts}
    timer, own = (PartTimer() if args.parts else None), []
    for i in range(FRESH_STEPS + 1 + args.steps):
        grad = torch.randn(numel, generator=gen) * 1e-3
        for name in opts:
            flats[name].grad = grad.clone()
            dist.barrier()
            if timer is not None:
                timer.on = name == "adamweyl" and i > FRESH_STEPS
            t0 = time.perf_counter()
            with torch.no_grad():
                step(name)
            elapsed = torch.tensor([time.perf_counter() - t0])
            if timer is not None and timer.on:
                own.append(float(elapsed))  # (this rank's own time; the table's is the slowest rank's)
                timer.on = False
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the step time
            if i > FRESH_STEPS:
                times[name].append(float(elapsed))
    if rank == 0:
        med = {name: statistics.median(t) for name, t in times.items()}
        base = med["deepspeed_cpu_adam"]
        print(f"\nGPT-2 small, flat fp32 partition of {numel / 1e6:.1f}M elements per rank, {world} rank(s), "
              f"{torch.get_num_threads()} thread(s) per rank, {args.steps} steps, medians")
        print("| optimizer | step ms | / DeepSpeedCPUAdam | / AdamW fused |")
        print("|---|---|---|---|")
        for name, m in med.items():
            print(f"| {name} | {1e3 * m:.1f} | {m / base:.2f} | {m / med['adamw_fused']:.2f} |")
    if timer is not None:
        print_parts(timer, own, "adamweyl step")
    if args.passes:
        time_passes(flats["adamweyl"], opts["adamweyl"], layout, opts["adamw_fused"], args.steps, rank)
    dist.destroy_process_group()


def time_passes(flat, weyl, layout, fused, steps: int, rank: int) -> None:
    """Medians of the non-finite check, the three kernel passes and fused AdamW's step on the same partition."""
    from hf_weyl.core.cpu_kernel import cpu_kernel

    kernel, state = cpu_kernel(), weyl.state[flat]
    plan = pieces_plan(flat, layout)
    pieces, gaps, short, long = plan.pieces, plan.gaps, plan.short_sizes_total // 2, plan.long_sizes_total // 2
    work, x, y = weyl._work.get(torch.float32, flat.numel()), torch.randn(short), torch.randn(long)
    kept = torch.randn(long)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    _, z = kernel.pieces_pass1(flat, flat.grad, m, v, work, *pieces, *gaps, x, x, 0.5, 0.5, 0.9, 0.95, 1e-8, kept)
    calls = {
        "non-finite check (all_finite)": lambda: kernel.all_finite(flat.grad),
        "pass 1 (moments, U, B_U x_U, B_Uᵀ b_U of tall pieces of whole rows; B_W x_W kept)": lambda: kernel.pieces_pass1(
            flat, flat.grad, m, v, work, *pieces, *gaps, x, x, 0.5, 0.5, 0.9, 0.95, 1e-8, kept),
        "pass 1 without a kept product (reads W for B_W x_W too)": lambda: kernel.pieces_pass1(
            flat, flat.grad, m, v, work, *pieces, *gaps, x, x, 0.5, 0.5, 0.9, 0.95, 1e-8, torch.zeros(0)),
        "pass 2 (Bᵀ y of W, B_Uᵀ b_U of the other pieces, B_W x_W to check the kept one)":
            lambda: kernel.pieces_pass2(flat, work, *pieces, y, y, x, kept, z, False),
        "update (and the next B_W x_W)": lambda: kernel.pieces_update(
            flat, work, *pieces, [1e-8] * len(pieces[0]), *gaps, 1e-8, 0.0, x),
        "AdamW fused, whole step": fused.step,
    }
    times = {name: [] for name in calls}
    for _ in range(steps):
        for name, call in calls.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                call()
            times[name].append(time.perf_counter() - t0)
    medians = torch.tensor([1e3 * statistics.median(t) for t in times.values()])
    every = [torch.zeros_like(medians) for _ in range(dist.get_world_size())]
    dist.all_gather(every, medians)
    if rank == 0:
        print("\n| part (each rank's partition) | " + " | ".join(f"rank {r} ms" for r in range(len(every))) + " |")
        print("|---|" + "---|" * len(every))
        for i, name in enumerate(times):
            print(f"| {name} | " + " | ".join(f"{float(m[i]):.1f}" for m in every) + " |")


if __name__ == "__main__":
    main()
