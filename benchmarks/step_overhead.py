"""The fixed cost of AdamWeyl's optimizer.step() per parameter under FSDP2, where the arithmetic is negligible.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 1 benchmarks/step_overhead.py [--layers 12 --width 64 --steps 300]

A GPT-2 of 12 blocks and width 64 (148 parameters, 0.7M elements) sharded with ``fully_shard`` on one CPU rank: the
same parameters, DTensors and fused CPU step as on more ranks, without the σ all-reduces (a group of one rank reduces
nothing), so the step time is the Python that describes, checks and dispatches each parameter plus the kernels on
small tensors. The gradients are computed once and handed back before every step; AdamWeyl's step and torch's
``AdamW(fused=True)`` on a copy of the model are alternated, after AdamWeyl's fresh steps. Prints medians and the
ratio, and the time per parameter.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from hf_weyl.core.functional import FRESH_STEPS

from fsdp_comm import make_optimizer, sharded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    models = {name: sharded(args.layers, args.width, mesh) for name in ("adamweyl", "adamw_fused")}  # (same seed)
    opts = {"adamweyl": make_optimizer("weyl", models["adamweyl"]),
            "adamw_fused": make_optimizer("adamw_fused", models["adamw_fused"])}
    grads = {}
    for name, model in models.items():
        ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        grads[name] = [p.grad for p in model.parameters()]
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(FRESH_STEPS + 1 + args.steps):
        for name, model in models.items():
            for p, g in zip(model.parameters(), grads[name]):
                p.grad = g
            start = time.perf_counter()
            opts[name].step()
            if i > FRESH_STEPS:
                times[name].append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        count = len(list(models["adamweyl"].parameters()))
        med = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        print(f"\nFSDP2 on {dist.get_world_size()} CPU rank(s), GPT-2 n_layer={args.layers} n_embd={args.width} "
              f"({count} parameters), {torch.get_num_threads()} thread(s), medians of {args.steps} alternated steps")
        print("| optimizer | step ms | µs per parameter |\n|---|---|---|")
        for name, m in med.items():
            print(f"| {name} | {m:.3f} | {1e3 * m / count:.1f} |")
        print(f"| AdamWeyl / fused AdamW | {med['adamweyl'] / med['adamw_fused']:.2f} | |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
