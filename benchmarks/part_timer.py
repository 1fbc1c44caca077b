"""Where AdamWeyl's fused CPU step spends its time, for the benchmarks' ``--parts``: each call of the pieces kernel and
each σ all-reduce, timed by wrapping what ``hf_weyl.core.functional`` and ``hf_weyl.distributed.sigma`` call."""

from __future__ import annotations

import collections
import time

import torch
import torch.distributed as dist


class PartTimer:
    """Seconds spent in each call of the fused CPU kernel and in the σ all-reduces while ``on`` (``--parts``): wraps
    the kernel that ``hf_weyl.core.functional`` hands its steps and the all-reduces of ``LAYOUT_SIGMA`` (an overlapped
    one: its start and its wait, the time the step did not hide)."""

    def __init__(self) -> None:
        import hf_weyl.core.functional as functional
        import hf_weyl.distributed.sigma as sigma

        self.totals: collections.Counter = collections.Counter()
        self.on = False
        kernel, reduce_ = functional.cpu_kernel(), sigma._LayoutSigma.all_reduce_
        start_ = sigma._LayoutSigma.all_reduce_start
        timer = self

        def timed(name, fn):
            def call(*args, **kwargs):
                start = time.perf_counter()
                out = fn(*args, **kwargs)
                if timer.on:
                    timer.totals[name] += time.perf_counter() - start
                return out
            return call

        class Kernel:
            def __getattr__(self, name):
                return timed(name, getattr(kernel, name))

        if kernel is not None:
            wrapped = Kernel()
            functional.cpu_kernel = lambda: wrapped
        sigma._LayoutSigma.all_reduce_ = staticmethod(timed("σ all-reduces", reduce_))

        class Pending:  # an overlapped all-reduce: its start and its wait (what the step did not hide) timed
            def __init__(self, pending):
                self.wait = timed("σ all-reduces", pending.wait)

        sigma._LayoutSigma.all_reduce_start = staticmethod(
            lambda *args, **kwargs: Pending(timed("σ all-reduces", start_)(*args, **kwargs)))


def print_parts(timer: PartTimer, step_times: list[float], what: str) -> None:
    """Every rank's means per timed AdamWeyl step (``step_times``: its seconds per step): the kernel's calls, the σ
    all-reduces, the rest (Python, small ops); a total whose name starts with "one all-reduce" is outside the step."""
    steps = len(step_times)
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, sorted(timer.totals))
    names = sorted(set().union(*seen))  # (the same rows on every rank: a call one rank made alone counts 0 elsewhere)
    inside = [n for n in names if not n.startswith("one all-reduce")]
    values = [1e3 * timer.totals[n] / steps for n in names]
    rest = 1e3 * sum(step_times) / steps - sum(1e3 * timer.totals[n] / steps for n in inside)
    mine = torch.tensor(values + [1e3 * sum(step_times) / steps, rest])
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    if dist.get_rank() == 0:
        print(f"\n## Where AdamWeyl's {what} goes (--parts; ms per step, means of {steps} steps)")
        print("| part | " + " | ".join(f"rank {r}" for r in range(len(every))) + " |")
        print("|---|" + "---|" * len(every))
        for i, name in enumerate(names + [f"{what}, whole", "the rest (Python, small ops)"]):
            print(f"| {name} | " + " | ".join(f"{float(e[i]):.2f}" for e in every) + " |")
