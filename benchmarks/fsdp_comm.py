"""Communication and step time of AdamWeyl under PyTorch FSDP2 (``fully_shard``).

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/fsdp_comm.py [--layers 4 --width 256 --steps 20] [--parts]

1. Bytes per optimizer step that each σ mode sends, computed from GPT-2 small's shapes (124M, built on
   the meta device, nothing downloaded) at 2 and 8 ranks, next to FSDP2's own traffic per step
   (all-gather of the parameters in forward and again in backward, reduce-scatter of the gradients).
2. The same formula checked against the bytes a 2-rank CPU run actually hands to its σ collectives
   (``hf_weyl.distributed.COMM_STATS``) on a small GPT-2.
3. Step-time ratio AdamWeyl / torch AdamW under FSDP2 on 2 CPU ranks, measured side by side (alternating
   the models step by step), for the optimizer step alone and for the whole training step; torch AdamW
   both with its default (foreach, through DTensor dispatch) and with ``fused=True``.
4. ``--parts``: where AdamWeyl's optimizer step goes, per rank (means over the timed steps): each pass of the
   fused CPU step, the σ all-reduces, and — for scale — one more all-reduce of the first σ payload's size made in
   the same process after a barrier, before each AdamWeyl training step (outside its timing).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from hf_weyl import AdamWeyl
from hf_weyl.core.cpu_kernel import kernel_disabled
from hf_weyl.core.functional import FRESH_STEPS
from hf_weyl.core.power_iteration import matrix_dims
from hf_weyl.distributed import COMM_STATS, SIGMA_MODES, comm_bytes_per_step
from hf_weyl.distributed.collectives import all_reduce_

from comm_common import batch, capped_shapes, gpt2_small_table, param_groups, small_gpt2
from part_timer import PartTimer, print_parts


def fsdp2_traffic(world, n):
    """All-gather of the parameters in forward and again in backward (reshard_after_forward) and reduce-scatter
    of the gradients, with bf16 and with fp32 parameters."""
    return {f"{name} params": 3 * (world - 1) / world * n * b for name, b in (("bf16", 2), ("fp32", 4))}


def sharded(layers, width, mesh):
    model = small_gpt2(layers, width)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def make_optimizer(name, model, mode="vector_reduce"):
    if name == "adamw_foreach":
        return torch.optim.AdamW(param_groups(model), lr=1e-3, foreach=True)
    if name == "adamw_fused":
        return torch.optim.AdamW(param_groups(model), lr=1e-3, fused=True)
    return AdamWeyl(param_groups(model), lr=1e-3, tau=0.01, sigma_mode=mode)


def train_step(model, opt, step):
    ids = batch(step)
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    t1 = time.perf_counter()
    opt.step()
    t2 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    return t2 - t0, t2 - t1


def measured_vs_predicted(layers, width, mesh):
    world = dist.get_world_size()
    rows = []
    for mode in SIGMA_MODES:
        model = sharded(layers, width, mesh)
        opt = make_optimizer("weyl", model, mode)
        for step in range(FRESH_STEPS):  # cold start and fresh steps (cold_start_iters)
            train_step(model, opt, step)
        COMM_STATS.reset()
        train_step(model, opt, FRESH_STEPS)
        measured = torch.tensor([float(COMM_STATS.bytes)])
        dist.all_reduce(measured)
        fused = mode == "vector_reduce" and not kernel_disabled()  # the fused CPU step's check flag: 4 B more
        want = comm_bytes_per_step(capped_shapes(model), world, mode, fused=fused)["payload"]
        rows.append((mode, measured.item() / world, want, COMM_STATS.calls))
    if dist.get_rank() == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"\n## Measured on {world} CPU ranks, GPT-2 n_layer={layers} n_embd={width} vocab=1000 ({n / 1e6:.2f}M params), FSDP2")
        print("| σ mode | measured payload/rank/step | predicted | collectives/step |")
        print("|---|---|---|---|")
        for mode, got, want, calls in rows:
            print(f"| {mode} | {got:,.0f} B | {want:,.0f} B | {calls} |")


def first_payload_floats(model) -> int:
    """Floats in the first σ all-reduce of a warm fused step: the long side of every capped matrix, for W and U."""
    return 2 * sum(max(matrix_dims(s)) for s in capped_shapes(model))


def step_time_ratio(layers, width, steps, mesh, parts=False):
    names = ("adamw_foreach", "adamw_fused", "weyl")
    timer = PartTimer() if parts else None
    runs = {}
    for name in names:
        model = sharded(layers, width, mesh)
        runs[name] = (model, make_optimizer(name, model))
    times = {name: ([], []) for name in names}
    bare = torch.zeros(first_payload_floats(runs["weyl"][0])) if timer is not None else None
    for step in range(steps + FRESH_STEPS + 1):
        for name, (model, opt) in runs.items():
            timed = step > FRESH_STEPS  # warm-up, AdamWeyl's cold start and fresh steps excluded
            if timer is not None and name == "weyl" and timed:
                dist.barrier()
                start = time.perf_counter()
                all_reduce_(bare, mesh.get_group())  # (the step's own call: gloo's Work kept, see collectives)
                timer.totals["one all-reduce of the first payload after a barrier (not in the step)"] += time.perf_counter() - start
            if timer is not None:
                timer.on = name == "weyl" and timed
            total, opt_time = train_step(model, opt, step)
            if timed:
                times[name][0].append(total)
                times[name][1].append(opt_time)
    if timer is not None:
        timer.on = False
        print_parts(timer, times["weyl"][1], "optimizer.step()")
    med = {name: [sorted(t)[len(t) // 2] for t in ts] for name, ts in times.items()}
    if dist.get_rank() == 0:
        print(f"\n## Step time under FSDP2, {dist.get_world_size()} CPU ranks, GPT-2 n_layer={layers} n_embd={width}, "
              f"batch 4×64 per rank, median of {steps} alternating steps")
        print("| | AdamW foreach | AdamW fused | AdamWeyl (vector_reduce) | AdamWeyl / foreach | AdamWeyl / fused |")
        print("|---|---|---|---|---|---|")
        for i, what in enumerate(("whole training step", "optimizer.step()")):
            a, f, w = med["adamw_foreach"][i], med["adamw_fused"][i], med["weyl"][i]
            print(f"| {what} | {a * 1e3:.1f} ms | {f * 1e3:.1f} ms | {w * 1e3:.1f} ms | {w / a:.2f} | {w / f:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--parts", action="store_true", help="also print where AdamWeyl's optimizer step goes")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if dist.get_rank() == 0:
        gpt2_small_table("FSDP2", comm_bytes_per_step, fsdp2_traffic)
    measured_vs_predicted(args.layers, args.width, mesh)
    step_time_ratio(args.layers, args.width, args.steps, mesh, args.parts)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
