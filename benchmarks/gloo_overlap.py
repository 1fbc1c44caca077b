"""How much of a σ all-reduce an asynchronous one could hide behind work on 2 CPU ranks over gloo.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/gloo_overlap.py [--floats N] [--work-mb 48] [--repeats 40]

The multi-rank offloaded step (``benchmarks/offload_step.py --parts``, ``benchmarks/fsdp_comm.py --parts``) spends
5–8 ms per step in its two σ all-reduces. Part of a rank's work does not need the reduced vector (the pieces it
holds whole), so the all-reduce could be posted asynchronously and waited for after that work. This measures what
that could gain, with the ranks in step (a barrier before each series): the all-reduce alone, a memory-bound piece of
work alone (``torch.mul`` of a ``--work-mb`` MB fp32 tensor into another, the streams of a pass over whole pieces),
the two one after the other, and the all-reduce posted with ``async_op=True``, the work, then the wait. Medians over
``--repeats``; the default payload is the first σ all-reduce of GPT-2 small's warm fused step (the long side of
every capped matrix, for W and U). What is not measured here is the part of the step's all-reduce time that is one
rank waiting for the other (the ranks' passes differ in length step by step): no overlap on the late rank hides it.
The last row: how much longer the all-reduce and the work take one after the other than each alone (a thread woken
from a blocking wait on this VM starts late); the overlapped case does not block until the end.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

from hf_weyl.core.power_iteration import matrix_dims

from comm_common import capped_shapes


def first_payload() -> int:
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    return 2 * sum(max(matrix_dims(s)) for s in capped_shapes(model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--floats", type=int, default=0, help="all-reduce payload in fp32 elements (0: GPT-2 small's)")
    parser.add_argument("--work-mb", type=float, default=48.0, help="size of the tensor the work streams through")
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    floats = args.floats or first_payload()
    vector = torch.randn(floats)
    src = torch.randn(int(args.work_mb * 2**20 / 4))
    dst = torch.empty_like(src)

    def work() -> None:
        torch.mul(src, 1.0001, out=dst)

    def serial() -> None:
        dist.all_reduce(vector)
        work()

    def overlapped() -> None:
        handle = dist.all_reduce(vector, async_op=True)
        work()
        handle.wait()

    cases = {"all-reduce alone": lambda: dist.all_reduce(vector), "work alone": work,
             "all-reduce, then work": serial, "all-reduce posted, work, wait": overlapped}
    times = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, call in cases.items():
            dist.barrier()
            start = time.perf_counter()
            call()
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slower rank's time
            times[name].append(float(elapsed))
    if dist.get_rank() == 0:
        med = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        print(f"\n{dist.get_world_size()} ranks, {torch.get_num_threads()} thread(s) each; all-reduce of {floats:,} "
              f"floats; work: {args.work_mb:g} MB streamed in and out; medians of {args.repeats} (slower rank)")
        print("| case | ms |\n|---|---|")
        for name, m in med.items():
            print(f"| {name} | {m:.2f} |")
        serial, over = med["all-reduce, then work"], med["all-reduce posted, work, wait"]
        print(f"| overlapped / serial | {over / serial:.3f} |")
        print(f"| serial − overlapped | {serial - over:.2f} ms |")
        print(f"| serial − (all-reduce alone + work alone): what a blocking wait adds | "
              f"{serial - med['all-reduce alone'] - med['work alone']:.2f} ms |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
