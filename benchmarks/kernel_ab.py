"""Two builds of the CPU kernel side by side: the pieces passes of a git revision's ``weyl_cpu.cpp`` against the
working tree's, alternated call by call on GPT-2 small's flat fp32 partition (1 rank), medians and ratios.

    python benchmarks/kernel_ab.py --base HEAD~1 [--calls 15]

A change to the kernel is judged by this (the VM's speed drifts by tens of percent between runs; alternating the two
builds in one process makes both see the same drift). Where the two revisions' passes have the same interface, it
also says whether their results are bit for bit equal (pass 1's products, pass 2's products and check product, the
update's weights and kept product), which a change meant to be a pure speed-up must keep. Revisions from before pass 1
took U's second half-step on whole tall pieces (pass 2 then returned its products; now it fills pass 1's) are called
through their own interface, and their results are not compared: the passes divide the work differently, so only
the sum of the three is comparable. Builds go to a temporary folder (about a minute each).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

from hf_weyl.core import cpu_kernel as ck

from offload_step import partition, pieces_plan

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "hf_weyl/core/csrc/weyl_cpu.cpp"


def build(name: str, source: Path, folder: Path):
    from torch.utils.cpp_extension import load

    print(f"kernel_ab: building {name} from {source} ...", file=sys.stderr, flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    return load(name=f"kernel_ab_{name}", sources=[str(source)], extra_cflags=ck._flags(), extra_ldflags=["-fopenmp"],
                build_directory=str(folder), verbose=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision whose kernel source is the baseline")
    parser.add_argument("--calls", type=int, default=15, help="timed calls of each pass per build")
    args = parser.parse_args()
    try:
        base_source = subprocess.run(["git", "show", f"{args.base}:{SOURCE}"], cwd=ROOT, check=True,
                                     capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as err:
        sys.exit(f"kernel_ab: no {SOURCE} at revision {args.base!r}: {err.stderr.strip()}")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    with tempfile.TemporaryDirectory(prefix="kernel_ab-") as tmp:
        base_file = Path(tmp) / "base.cpp"
        base_file.write_text(base_source)
        kernels = {"base": build("base", base_file, Path(tmp) / "base"),
                   "tree": build("tree", ROOT / SOURCE, Path(tmp) / "tree")}
        run(kernels, args.calls, args.base)
    dist.destroy_process_group()


def run(kernels: dict, calls: int, base: str) -> None:
    with torch.device("meta"):
        shapes = [p.shape for p in GPT2LMHeadModel(GPT2Config()).parameters()]
    numel, layout = partition(shapes, 0, 1)
    gen = torch.Generator().manual_seed(0)
    weights, u = torch.randn(numel, generator=gen) * 0.02, torch.randn(numel, generator=gen) * 1e-3
    plan = pieces_plan(weights, layout)
    pieces, gaps = plan.pieces, plan.gaps
    short, long, count = plan.short_sizes_total // 2, plan.long_sizes_total // 2, len(plan.pieces[0])
    x, y, kept = torch.randn(short, generator=gen), torch.randn(long, generator=gen), torch.randn(long, generator=gen)
    lrs = [1e-6] * count

    m, v, g = torch.zeros(numel), torch.full((numel,), 1e-6), torch.randn(numel, generator=gen) * 1e-3
    apis = {name: _api(k) for name, k in kernels.items()}

    def pass1(k, m_, v_):
        return k.pieces_pass1(weights, g, m_, v_, u, *pieces, *gaps, x, x, 0.5, 0.5, 0.9, 0.95, 1e-8, kept)

    def pass2(k, z):
        if apis_of[id(k)] == "new":
            return k.pieces_pass2(weights, u, *pieces, y, y, x, kept, z, False)
        return k.pieces_pass2(weights, u, *pieces, y, y, x, kept)

    apis_of = {id(k): apis[name] for name, k in kernels.items()}
    zeros = torch.zeros(2 * short + 1)
    same = None
    if apis["base"] == apis["tree"]:  # results on the same inputs (pass 1 and the update on copies)
        results = {}
        for name, k in kernels.items():
            first = pass1(k, m.clone(), v.clone())
            z = first[1] if apis[name] == "new" else zeros.clone()
            second = pass2(k, z)
            w = weights.clone()
            product = k.pieces_update(w, u, *pieces, lrs, *gaps, 1e-6, 0.1, x)
            results[name] = [*_tensors(first), *_tensors(second), z, w, product]
        same = [torch.equal(a, b) for a, b in zip(results["base"], results["tree"])]

    w = weights.clone()
    passes = {
        "pass 1": lambda k: pass1(k, m, v),
        "pass 2 (with the check)": lambda k: pass2(k, zeros),
        "update": lambda k: k.pieces_update(w, u, *pieces, [0.0] * count, *gaps, 0.0, 0.0, x),
    }
    times = {(p, name): [] for p in passes for name in kernels}
    for _ in range(calls):
        for p, call in passes.items():
            for name, k in kernels.items():
                t0 = time.perf_counter()
                call(k)
                times[(p, name)].append(time.perf_counter() - t0)
    print(f"\nGPT-2 small's flat fp32 partition ({numel / 1e6:.1f}M elements), {torch.get_num_threads()} thread(s), "
          f"{calls} alternated calls each, medians")
    print(f"| pass | {base} | working tree | tree / base |\n|---|---|---|---|")
    sums = {"base": 0.0, "tree": 0.0}
    for p in passes:
        b, t = (statistics.median(times[(p, name)]) for name in ("base", "tree"))
        sums["base"], sums["tree"] = sums["base"] + b, sums["tree"] + t
        print(f"| {p} | {1e3 * b:.2f} ms | {1e3 * t:.2f} ms | {t / b:.3f} |")
    print(f"| the three | {1e3 * sums['base']:.2f} ms | {1e3 * sums['tree']:.2f} ms | "
          f"{sums['tree'] / sums['base']:.3f} |")
    if same is None:
        print(f"\nnot compared bit for bit: {base}'s passes divide the work differently (its pass 2 returns its "
              "products; the working tree's fills pass 1's)")
    else:
        print("\nbit for bit equal (pass 1's products, pass 2's products and check product, the updated weights, the "
              "kept product): " + ", ".join("yes" if s else "NO" for s in same))


def _api(kernel) -> str:
    """Which interface a build's pieces passes have: "new" (pass 1 returns b and z, pass 2 fills z), else "old"."""
    return "new" if "bool" in (kernel.pieces_pass2.__doc__ or "") else "old"


def _tensors(out) -> list:
    return list(out) if isinstance(out, (list, tuple)) else [out]


if __name__ == "__main__":
    main()
