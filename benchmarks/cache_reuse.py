"""How much the fused pieces kernel's passes gain when the matrix they read was just read: the update right after pass 2
(W and U possibly still in the CPU's caches) against the same update after a 64 MiB sweep that evicts them.

    python benchmarks/cache_reuse.py [--reps 30]

One capped matrix per call, as a flat fp32 partition holding only it (``pieces_pass1``, ``pieces_pass2``,
``pieces_update`` of ``csrc/weyl_cpu.cpp``), GPT-2 small's matrix shapes; nanoseconds per element, medians. The
question it answers: would a schedule that runs all three passes on one cache-sized group of matrices before the next
(W and U read back from the cache by pass 2 and the update, instead of from memory) pay on this machine?
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_weyl.core.cpu_kernel import cpu_kernel


def per_element(m: int, n: int, reps: int) -> dict[str, float]:
    kernel, numel = cpu_kernel(), m * n
    flat, grad = torch.randn(numel) * 0.02, torch.randn(numel) * 1e-3
    exp_avg, exp_avg_sq, work = torch.zeros(numel), torch.zeros(numel), torch.empty(numel)
    pieces, gaps = ([0], [0], [numel], [m], [n]), ([], [])
    x, y, kept = torch.randn(min(m, n)), torch.randn(max(m, n)), torch.randn(max(m, n))
    sweep = torch.empty(64 * 2**20 // 4)
    times: dict[str, list[float]] = {"pass 1": [], "pass 2": [], "update after pass 2": [], "update, caches swept": []}

    def timed(name, call):
        start = time.perf_counter()
        out = call()
        times[name].append(time.perf_counter() - start)
        return out

    def update():
        return kernel.pieces_update(flat, work, *pieces, [1e-8], *gaps, 1e-8, 0.0, x)

    for _ in range(reps):
        sweep.add_(1.0)
        _, z = timed("pass 1", lambda: kernel.pieces_pass1(flat, grad, exp_avg, exp_avg_sq, work, *pieces, *gaps, x, x,
                                                            0.5, 0.5, 0.9, 0.95, 1e-8, kept))
        timed("pass 2", lambda: kernel.pieces_pass2(flat, work, *pieces, y, y, x, kept, z, False))
        timed("update after pass 2", update)
        sweep.add_(1.0)
        timed("update, caches swept", update)
    return {name: 1e9 * statistics.median(t) / numel for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    if cpu_kernel() is None:
        raise SystemExit("cache_reuse: the fused CPU kernel is not available here (see HF_WEYL_CPU_KERNEL)")
    print(f"ns per element, medians of {args.reps}, {torch.get_num_threads()} threads")
    rows = [(m, n, per_element(m, n, args.reps)) for m, n in ((768, 768), (768, 2304), (768, 3072), (3072, 768))]
    names = list(rows[0][2])
    print("| matrix | " + " | ".join(names) + " | update: after pass 2 / swept |")
    print("|---|" + "---|" * (len(names) + 1))
    for m, n, r in rows:
        print(f"| {m}×{n} | " + " | ".join(f"{r[k]:.3f}" for k in names)
              + f" | {r['update after pass 2'] / r['update, caches swept']:.2f} |")


if __name__ == "__main__":
    main()
