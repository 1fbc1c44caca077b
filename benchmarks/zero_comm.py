"""Communication and step time of AdamWeyl under DeepSpeed ZeRO.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 benchmarks/zero_comm.py [--layers 4 --width 256 --steps 20]

1. Bytes per optimizer step that each σ mode sends, computed from GPT-2 small's shapes (124M, built on
   the meta device, nothing downloaded) at 2 and 8 ranks, next to ZeRO-2's own gradient/parameter traffic.
2. The same formula checked against the bytes a 2-rank CPU run actually hands to its collectives
   (``hf_weyl.integrations.deepspeed.COMM_STATS``) on a small GPT-2.
3. Step-time ratio AdamWeyl / torch AdamW under ZeRO-2 on 2 CPU ranks, measured side by side
   (alternating the two engines), for the optimizer step and the whole training step.
"""

from __future__ import annotations

import argparse
import time

import deepspeed
import torch
import torch.distributed as dist

from hf_weyl import AdamWeyl
from hf_weyl.core.functional import FRESH_STEPS
from hf_weyl.integrations.deepspeed import COMM_STATS, SIGMA_MODES, comm_bytes_per_step

from comm_common import batch, capped_shapes, gpt2_small_table, param_groups, small_gpt2


def predicted(shapes, world, mode, *, power_iters=1, fused=False):
    """The σ traffic of the matrices' param group plus the non-finite flag of each of the two param groups (ZeRO-2
    without offload: AdamWeyl checks itself), and with ``fused`` the kept product's check of the fused CPU step."""
    per = [comm_bytes_per_step(g, world, mode, power_iters=power_iters, fused=fused) for g in (shapes, [])]
    return {k: sum(p[k] for p in per) for k in ("payload", "wire", "collectives")}


def zero2_traffic(world, n):
    """Reduce-scatter of the gradients and all-gather of the parameters, bf16."""
    return {"bf16 grads + params": 2 * (world - 1) / world * n * 2}


def engine_for(optim, layers, width, mode="vector_reduce"):
    model = small_gpt2(layers, width)
    if optim == "adamw":
        opt = torch.optim.AdamW(param_groups(model), lr=1e-3, foreach=True)
    else:
        opt = AdamWeyl(param_groups(model), lr=1e-3, tau=0.01, sigma_mode=mode)
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def train_step(engine, step):
    ids = batch(step)
    t0 = time.perf_counter()
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    t1 = time.perf_counter()
    engine.step()
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def measured_vs_predicted(layers, width):
    model = small_gpt2(layers, width)
    shapes = capped_shapes(model)
    world = dist.get_world_size()
    rows = []
    for mode in SIGMA_MODES:
        engine = engine_for("weyl", layers, width, mode)
        for step in range(FRESH_STEPS):  # cold start and fresh steps (cold_start_iters)
            train_step(engine, step)
        COMM_STATS.reset()
        train_step(engine, FRESH_STEPS)
        measured = torch.tensor([float(COMM_STATS.bytes)])
        dist.all_reduce(measured)
        rows.append((mode, measured.item() / world, predicted(shapes, world, mode, fused=mode == "vector_reduce")["payload"],
                     COMM_STATS.calls))  # (CPU fp32 partitions: the fused step)
    if dist.get_rank() == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"\n## Measured on 2 CPU ranks, GPT-2 n_layer={layers} n_embd={width} vocab=1000 ({n / 1e6:.2f}M params), ZeRO-2")
        print("| σ mode | measured payload/rank/step | predicted | collectives/step |")
        print("|---|---|---|---|")
        for mode, got, want, calls in rows:
            print(f"| {mode} | {got:,.0f} B | {want:,.0f} B | {calls} |")


def step_time_ratio(layers, width, steps):
    engines = {name: engine_for(name, layers, width) for name in ("adamw", "weyl")}
    times = {name: ([], []) for name in engines}
    for step in range(steps + FRESH_STEPS + 1):
        for name, engine in engines.items():
            total, opt = train_step(engine, step)
            if step > FRESH_STEPS:  # warm-up, AdamWeyl's cold start and fresh steps excluded
                times[name][0].append(total)
                times[name][1].append(opt)
    med = {name: [sorted(t)[len(t) // 2] for t in ts] for name, ts in times.items()}
    if dist.get_rank() == 0:
        print(f"\n## Step time under ZeRO-2, 2 CPU ranks, GPT-2 n_layer={layers} n_embd={width}, batch 4×64 per rank, "
              f"median of {steps} alternating steps")
        print("| | AdamW (torch, foreach) | AdamWeyl (vector_reduce) | ratio |")
        print("|---|---|---|---|")
        for i, what in enumerate(("whole training step", "engine.step() (clip + optimizer + all-gather)")):
            a, w = med["adamw"][i], med["weyl"][i]
            print(f"| {what} | {a * 1e3:.1f} ms | {w * 1e3:.1f} ms | {w / a:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    if dist.get_rank() == 0:
        gpt2_small_table("ZeRO-2", predicted, zero2_traffic)
    measured_vs_predicted(args.layers, args.width)
    step_time_ratio(args.layers, args.width, args.steps)


if __name__ == "__main__":
    main()
