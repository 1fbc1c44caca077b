"""Optimizer step time, memory and dispatched ops: AdamWeyl vs torch.optim.AdamW (fused and foreach), side by side.

The Trainer's default optimizer is ``AdamW(fused=True)`` (``adamw_torch_fused``): that is the headline
reference. Parameters have GPT-2's layout (tied LM head, 12 blocks) in three regimes:

* ``gpt2_small``: width 768 (124M parameters, 148 tensors): memory-bound;
* ``width256``: width 256 (22M): in between;
* ``width64``: width 64 (3.3M, dominated by the 50257×64 embedding; the blocks' tensors are tiny): per-op overhead.
* ``gpt_1p3b`` (GPUs, by name only): width 2048, 24 layers (1.3B, GPT-3 XL's shape).

Steps of all optimizers are interleaved in one process, so machine noise hits them alike; the ratio of
medians is the figure. Peak memory is measured in a fresh subprocess per optimizer (CPU: peak RSS
growth over the state-free baseline; CUDA: ``max_memory_allocated``). ``--count_ops`` counts the aten
ops one step dispatches (on the meta device for the eager step, which is the accelerator path).

On an accelerator AdamWeyl runs three ways: ``adamweyl`` (eager), ``adamweyl_compiled``
(``torch.compile(step, fullgraph=True)``) and ``adamweyl_graph`` (``capturable=True``, lr as a device tensor,
the step captured once in a CUDA graph and replayed). ``--variants`` adds the first two on the CPU too.

    python benchmarks/optimizer_step.py                                   # CPU, all regimes, fp32 and bf16
    python benchmarks/optimizer_step.py --regimes gpt2_small --dtypes fp32 --memory
    python benchmarks/optimizer_step.py --device cuda --dtypes bf16 fp32  # on a GPU machine
    python benchmarks/optimizer_step.py --count_ops
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_weyl import AdamWeyl
from hf_weyl.core import functional

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: regime → (width, layers) of a GPT-2-layout parameter set. ``gpt_1p3b`` (GPT-3 XL's 1.3B shape: width 2048, 24
#: layers) is for GPUs only (scripts/gpu_check.sh): the three optimizers' states of it do not fit a small machine.
REGIMES = {"gpt2_small": (768, 12), "width256": (256, 12), "width64": (64, 12), "gpt_1p3b": (2048, 24)}
DEFAULT_REGIMES = ["gpt2_small", "width256", "width64"]
OPTIMIZERS = ("adamw_fused", "adamw_foreach", "adamweyl", "adamweyl_eager")
VARIANTS = ("adamweyl_compiled", "adamweyl_graph")


def gpt2_shapes(d: int, layers: int = 12, vocab: int = 50257, ctx: int = 1024) -> list[tuple[int, ...]]:
    """Parameter shapes of GPT-2 at width ``d`` (tied LM head), in ``GPT2LMHeadModel``'s order."""
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(vocab, d), (ctx, d)] + block * layers + [(d,), (d,)]


def make_params(shapes, device: str, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = (torch.randn(shape, generator=gen) * 0.02).to(device=device, dtype=dtype).requires_grad_()
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device=device, dtype=dtype)
        params.append(p)
    return params


def build(name: str, params: list[torch.Tensor], power_iters: int = 1) -> torch.optim.Optimizer:
    common = dict(lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    if name == "adamw_fused":
        return torch.optim.AdamW(params, fused=True, **common)
    if name == "adamw_foreach":
        return torch.optim.AdamW(params, foreach=True, **common)
    if name == "adamweyl_graph":
        opt = AdamWeyl(params, tau=0.01, power_iters=power_iters, capturable=True, **common)
        opt.param_groups[0]["lr"] = torch.tensor(common["lr"], device=params[0].device)
        return _Graphed(opt)
    opt = AdamWeyl(params, tau=0.01, power_iters=power_iters, **common)
    return _Compiled(opt) if name == "adamweyl_compiled" else opt


class _Compiled:
    """``torch.compile(opt.step, fullgraph=True)`` (compiled on its first call, which the warm-up steps absorb)."""

    def __init__(self, opt: AdamWeyl) -> None:
        self.opt, self.step = opt, torch.compile(opt.step, fullgraph=True)


class _Graphed:
    """A capturable AdamWeyl whose step is captured in a CUDA graph after ``FRESH_STEPS`` eager steps, then replayed."""

    def __init__(self, opt: AdamWeyl) -> None:
        self.opt, self.calls, self.graph = opt, 0, None

    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        self.calls += 1
        if self.calls <= functional.FRESH_STEPS:
            self.opt.step()
            return
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.opt.step()
        self.graph.replay()


class _Eager:
    """Steps an AdamWeyl with the fused CPU step switched off (the eager step, as on accelerators)."""

    def __init__(self, opt: AdamWeyl) -> None:
        self.opt = opt

    def step(self) -> None:
        kernel, functional.cpu_kernel = functional.cpu_kernel, lambda: None
        try:
            self.opt.step()
        finally:
            functional.cpu_kernel = kernel


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(shapes, device: str, dtype: torch.dtype, steps: int, warmup: int, names) -> dict[str, float]:
    opts = {}
    for name in names:
        opt = build(name, make_params(shapes, device, dtype))
        opts[name] = _Eager(opt) if name == "adamweyl_eager" else opt
    times: dict[str, list[float]] = {name: [] for name in opts}
    for i in range(warmup + steps):
        for name, opt in opts.items():  # interleaved: noise hits all alike
            sync(device)
            t0 = time.perf_counter()
            opt.step()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_memory_child(name: str, regime: str, device: str, dtype: str) -> None:
    """(subprocess) print peak memory growth of 3 optimizer steps over params+grads, and the state size."""
    params = make_params(gpt2_shapes(*REGIMES[regime]), device, DTYPES[dtype])
    opt = build(name, params)
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


def peak_memory(name: str, regime: str, device: str, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--_child", name, "--regimes", regime, "--device", device, "--dtypes", dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


class CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched while active (a TorchDispatchMode sees every op below autograd)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(shapes, device: str, name: str) -> Counter:
    """aten ops dispatched by one warm step."""
    opt = build(name.replace("_eager", ""), make_params(shapes, device, torch.float32))
    opt = _Eager(opt) if name.endswith("_eager") else opt
    for _ in range(functional.FRESH_STEPS):  # cold start and fresh steps (more σ_U iterations) before the warm step
        opt.step()
    with CountOps() as mode:
        opt.step()
    return mode.ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--regimes", nargs="+", choices=sorted(REGIMES), default=DEFAULT_REGIMES)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=functional.FRESH_STEPS + 1,
                        help="untimed steps first (default: past AdamWeyl's cold start and fresh steps)")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory (a subprocess per optimizer)")
    parser.add_argument("--count_ops", action="store_true", help="count dispatched aten ops per step instead of timing")
    parser.add_argument("--variants", action="store_true", help="CPU: also time the compiled step")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        peak_memory_child(args._child, args.regimes[0], args.device, args.dtypes[0])
        return

    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads; medians of {args.steps} "
          f"alternated steps after {args.warmup} warm-up steps; AdamWeyl defaults (tau 0.01, power_iters 1)")
    if args.count_ops:
        shapes = gpt2_shapes(*REGIMES[args.regimes[0]])
        print(f"\ndispatched aten ops per warm step, {args.regimes[0]} ({len(shapes)} tensors)")
        print("| optimizer | ops | most frequent |\n|---|---|---|")
        runs = [("adamw_fused", "cpu"), ("adamw_foreach", "cpu"), ("adamweyl", "cpu"), ("adamweyl_eager", "meta")]
        for name, device in runs:
            ops = count_ops(shapes, device, name)
            top = ", ".join(f"{op} {n}" for op, n in ops.most_common(4))
            print(f"| {name} ({device}) | {sum(ops.values())} | {top} |")
        return

    if args.device == "cpu":
        names = OPTIMIZERS + (("adamweyl_compiled",) if args.variants else ())
    else:
        names = ("adamw_fused", "adamw_foreach", "adamweyl", "adamweyl_compiled") + (
            ("adamweyl_graph",) if args.device.startswith("cuda") else ())
    weyl = [n for n in names if n.startswith("adamweyl")]
    print("\n| regime | dtype | params | AdamW fused | AdamW foreach | " + " | ".join(weyl) + " | "
          + " | ".join(f"{n} / fused" for n in weyl) + " |")
    print("|---" * (5 + 2 * len(weyl)) + "|")
    for regime in args.regimes:
        shapes = gpt2_shapes(*REGIMES[regime])
        n = sum(torch.Size(s).numel() for s in shapes)
        for dtype in args.dtypes:
            med = time_steps(shapes, args.device, DTYPES[dtype], args.steps, args.warmup, names)
            f, fe = med["adamw_fused"], med["adamw_foreach"]
            row = (f"| {regime} | {dtype} | {n / 1e6:.1f}M | {f * 1e3:.1f} ms | {fe * 1e3:.1f} ms | "
                   + " | ".join(f"{med[w] * 1e3:.1f} ms" for w in weyl) + " | "
                   + " | ".join(f"**{med[w] / f:.2f}**" for w in weyl) + " |")
            print(row, flush=True)
            if args.memory:
                mem = {name: peak_memory(name, regime, args.device, dtype) for name in ("adamw_fused", "adamweyl")}
                print(f"|   memory | | | peak +{mem['adamw_fused']['peak_bytes'] / 2**20:.0f} MiB, state "
                      f"{mem['adamw_fused']['state_bytes'] / 2**20:.0f} MiB | | peak +{mem['adamweyl']['peak_bytes'] / 2**20:.0f} MiB, "
                      f"state {mem['adamweyl']['state_bytes'] / 2**20:.0f} MiB | | | |", flush=True)


if __name__ == "__main__":
    main()
