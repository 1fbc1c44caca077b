"""Latency of one all-reduce on this machine's process group, by payload size: the fixed cost of each of the
σ collectives per optimizer step under ZeRO and FSDP2 (``hf_weyl.distributed``).

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/allreduce_latency.py [--floats 16 4500 18000 36000]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--floats", type=int, nargs="+", default=[16, 4500, 18000, 36000])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rows = []
    for n in args.floats:
        t = torch.zeros(n)
        for _ in range(20):
            dist.all_reduce(t)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.repeats):
            dist.all_reduce(t)
        rows.append((n, (time.perf_counter() - start) / args.repeats))
    if dist.get_rank() == 0:
        print(f"| fp32 elements | bytes | all-reduce ({dist.get_world_size()} ranks, {dist.get_backend()}) |")
        print("|---|---|---|")
        for n, seconds in rows:
            print(f"| {n} | {4 * n:,} | {seconds * 1e3:.3f} ms |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
