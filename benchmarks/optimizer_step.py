"""Optimizer step time and memory: AdamWeyl vs torch.optim.AdamW(foreach=True), side by side.

Parameters have the shapes of GPT-2 small (124M). Steps of the two optimizers are interleaved in one
process, so machine noise hits both alike; the ratio of medians is the figure. Peak memory is
measured in a fresh subprocess per optimizer (CPU: peak RSS growth over the state-free baseline;
CUDA: ``max_memory_allocated``).

    python benchmarks/optimizer_step.py                     # CPU, GPT-2 small shapes
    python benchmarks/optimizer_step.py --device cuda --dtype bf16
    python benchmarks/optimizer_step.py --cpu_chunk_mib 0   # CPU without cache-sized chunks
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from hf_weyl import AdamWeyl
from hf_weyl.core import functional

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of GPT-2 small (tied LM head), as ``GPT2LMHeadModel(GPT2Config())`` has them."""
    d, layers, vocab, ctx = 768, 12, 50257, 1024
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(vocab, d), (ctx, d)] + block * layers + [(d,), (d,)]


def make_params(device: str, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in gpt2_small_shapes():
        p = (torch.randn(shape, generator=gen) * 0.02).to(device=device, dtype=dtype).requires_grad_()
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device=device, dtype=dtype)
        params.append(p)
    return params


def build(name: str, params: list[torch.Tensor], power_iters: int) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    return AdamWeyl(params, lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, tau=0.01, power_iters=power_iters)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(args: argparse.Namespace) -> dict:
    dtype = DTYPES[args.dtype]
    opts = {name: build(name, make_params(args.device, dtype), args.power_iters) for name in ("adamw", "adamweyl")}
    times: dict[str, list[float]] = {name: [] for name in opts}
    for i in range(args.warmup + args.steps):
        for name, opt in opts.items():  # interleaved: noise hits both
            sync(args.device)
            t0 = time.perf_counter()
            opt.step()
            sync(args.device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {"median_s": med, "ratio": med["adamweyl"] / med["adamw"]}


def peak_memory_child(name: str, device: str, dtype: str, power_iters: int) -> None:
    """(subprocess) print peak memory growth of `steps` optimizer steps over params+grads."""
    params = make_params(device, DTYPES[dtype])
    opt = build(name, params, power_iters)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(3):
        opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    print(json.dumps({"peak_bytes": peak, "state_bytes": state}))


def peak_memory(name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--_child", name, "--device", args.device, "--dtype", args.dtype,
           "--power_iters", str(args.power_iters), "--cpu_chunk_mib", str(args.cpu_chunk_mib)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--power_iters", type=int, default=1)
    parser.add_argument("--cpu_chunk_mib", type=float, default=functional.CPU_CHUNK_BYTES / 2**20,
                        help="hf_weyl.core.functional.CPU_CHUNK_BYTES in MiB; 0 = one chunk (no cache blocking)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_chunk_mib < 0:
        parser.error(f"--cpu_chunk_mib must be >= 0, got {args.cpu_chunk_mib}")
    functional.CPU_CHUNK_BYTES = int(args.cpu_chunk_mib * 2**20) if args.cpu_chunk_mib > 0 else sys.maxsize
    if args._child:
        peak_memory_child(args._child, args.device, args.dtype, args.power_iters)
        return

    n = sum(torch.Size(s).numel() for s in gpt2_small_shapes())
    print(f"GPT-2 small shapes: {len(gpt2_small_shapes())} tensors, {n / 1e6:.1f}M params, {args.dtype}, {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, power_iters={args.power_iters}, "
          f"cpu_chunk_mib={args.cpu_chunk_mib:g}")
    # Memory first: a child inherits this process's RSS high-water mark across exec.
    mem = {name: peak_memory(name, args) for name in ("adamw", "adamweyl")}
    for name, m in mem.items():
        print(f"{name:9s} optimizer state {m['state_bytes'] / 2**20:8.1f} MiB, peak growth during steps "
              f"{m['peak_bytes'] / 2**20:8.1f} MiB")
    extra = mem["adamweyl"]["state_bytes"] - mem["adamw"]["state_bytes"]
    print(f"extra state of AdamWeyl: {extra / 2**10:.1f} KiB (power-iteration vectors); "
          f"peak ratio {mem['adamweyl']['peak_bytes'] / max(mem['adamw']['peak_bytes'], 1):.3f}")
    timing = time_steps(args)
    print(f"step time (median of {args.steps}): AdamW foreach {timing['median_s']['adamw'] * 1e3:.1f} ms, "
          f"AdamWeyl {timing['median_s']['adamweyl'] * 1e3:.1f} ms, ratio {timing['ratio']:.3f}")


if __name__ == "__main__":
    main()
