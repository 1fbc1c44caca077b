"""The fused CPU step on flat partitions of matrix pieces (``impl="fused_pieces"``) against the eager step, on 2 real
gloo ranks, without a DeepSpeed engine: each rank holds the ZeRO-1/2 cut of a flat group of matrices (pieces that
start and end mid-row, tall and wide matrices, uncapped vectors and padding in between).

    torchrun --nproc_per_node 2 tests/zero_scripts/pieces_checks.py [CHECK ...] OUT.json

The update keeps each piece's partial B_W x_W for the next step (``WorkBuffer.products``); pass 2 checks that it is
still B_W x_W of the weights and x_W. ``stale_*`` edit the weights, or the vectors, on one rank between steps: both
ranks must then repeat the W half of the power step and equal the eager step on the edited state;
``kept_equals_fresh``: a step with nothing kept (a resumed run's first) computes what the kept product gives, bit for
bit. U's power step takes B_Uᵀ b_U without normalising b_U (on tall pieces of whole rows in pass 1, row by row;
``whole_rows``: a tall matrix cut between the ranks on a row boundary);
``tiny_update``: where ‖b_U‖ is too small for that, every rank repeats pass 2 as the eager step computes it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "benchmarks"))
from offload_step import partition, pieces_plan  # noqa: E402
from rank_checks import KernelRecorder, run_checks  # noqa: E402

from hf_weyl.core.cpu_kernel import cpu_kernel  # noqa: E402
from hf_weyl.core.functional import WorkBuffer, _fused_pieces_step, adamweyl  # noqa: E402
from hf_weyl.core.power_iteration import PowerIters, initial_vector, vector_length  # noqa: E402
from hf_weyl.distributed import LAYOUT_SIGMA  # noqa: E402
from hf_weyl.integrations.deepspeed import ZeroLayout, zero_unit  # noqa: E402

SHAPES = [torch.Size(s) for s in ((37, 11), (64,), (9, 40), (5, 3, 4), (70, 48), (23, 23), (7,), (9, 80), (13, 50))]
# 1104 elements: the 2 ranks' cut (at 552) falls on a row boundary of the tall (30 × 16) matrix, which each rank then
# holds whole rows of (rows 0–2 on rank 0, 3–29 on rank 1), as FSDP2's dim-0 shards always are
ROW_SHAPES = [torch.Size(s) for s in ((40, 12), (24,), (30, 16), (6, 20))]
# 1216 elements: rank 0 holds the (4 × 4) matrix whole and the start of the (40 × 30) one, rank 1 the rest of it and
# no matrix whole
CUT_SHAPES = [torch.Size(s) for s in ((4, 4), (40, 30))]
HYPER = dict(lr=0.02, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, tau=0.002)


class Run:
    """One optimizer's tensors for the partition: weights, moments, counter, vectors per capped part."""

    def __init__(self, flat: torch.Tensor, layout: ZeroLayout, shapes: list[torch.Size]) -> None:
        self.flat, self.layout, self.shapes = flat.clone(), layout, shapes
        self.m, self.v = torch.zeros_like(flat), torch.zeros_like(flat)
        self.step = torch.zeros((), dtype=torch.float32)
        self.w_vecs = [initial_vector(vector_length(s)) if len(s) >= 2 else None for s in shapes]
        self.u_vecs = [v.clone() if v is not None else None for v in self.w_vecs]
        self.work = WorkBuffer()

    def run(self, grad: torch.Tensor, impl: str, kernel=None):
        unit = zero_unit(self.flat, self.layout)
        if impl == "fused_pieces" and kernel is not None:  # the step itself, with a kernel that records its calls
            return _fused_pieces_step(kernel, self.flat, grad, self.m, self.v, self.step, unit.parts, self.w_vecs,
                                      self.u_vecs, LAYOUT_SIGMA, self.work, **HYPER, power_iters=PowerIters(1, 1))
        return adamweyl([self.flat], [grad], [self.m], [self.v], [self.step], [unit.parts], self.w_vecs, self.u_vecs,
                        [None] * len(self.shapes), **HYPER, power_iters=PowerIters(1, 1), impl=impl, sigma=LAYOUT_SIGMA,
                        work=self.work)


def setup(seed: int = 0, shapes: list[torch.Size] = SHAPES):
    rank, world = dist.get_rank(), dist.get_world_size()
    numel, layout = partition(shapes, rank, world, padding=3)  # + padding at the end of every partition
    gen = torch.Generator().manual_seed(100 + rank)
    flat = torch.randn(numel, generator=gen)
    fused, eager = Run(flat, layout, shapes), Run(flat, layout, shapes)
    grads = [torch.randn(numel, generator=gen) * 0.1 for _ in range(6)]
    return rank, fused, eager, grads


def same(fused: Run, eager: Run, stats_f, stats_e, what: str) -> None:
    torch.testing.assert_close(fused.flat, eager.flat, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: weights {m}")
    for a, b, name in zip(stats_f, stats_e, ("lr ratio", "σ_W", "σ_U")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{what}: {n} {m}")


def check_steady(shapes: list[torch.Size] = SHAPES) -> None:
    """Warm steps: pass 1 takes the kept product from the second step on, pass 2 finds it valid, and every step
    equals the eager one with the cap binding; the kept product is this rank's partial B_W x_W of the new weights."""
    rank, fused, eager, grads = setup(shapes=shapes)
    rec = KernelRecorder(cpu_kernel())
    for i, g in enumerate(grads):
        sf, se = fused.run(g, "fused_pieces", rec), eager.run(g, "eager")
        same(fused, eager, sf, se, f"step {i}")
    assert rec.kept_given == [False] + [True] * (len(grads) - 1), rec.kept_given
    whole = pieces_plan(fused.flat, fused.layout).whole
    assert any(whole), f"rank {rank} holds no matrix whole"
    for i in range(len(grads)):  # the whole matrices, then the others; never a repeat, the kept product valid
        assert rec.passes_of(i, whole) == [("whole", False, 0.0), ("rest", False, 0.0)], (i, rec.passes_of(i, whole))
    assert bool((se[0] < 1).any()), "the cap never bound"
    kept = fused.work.products[fused.flat]
    want = []
    for part, x in ((p, v) for p, v in zip(zero_unit(fused.flat, fused.layout).parts, fused.w_vecs) if v is not None):
        m, n = part.layout.dims
        full = torch.zeros(m * n)
        full[part.layout.start : part.layout.start + part.numel] = fused.flat[part.offset : part.offset + part.numel]
        a = full.view(m, n)
        want.append(a @ x if n <= m else a.t() @ x)  # B x, B = A (tall) or Aᵀ (wide): zeros off this rank's piece
    torch.testing.assert_close(kept, torch.cat(want), rtol=1e-5, atol=1e-6)


def check_whole_rows() -> None:
    """A tall matrix cut between the ranks on a row boundary: each rank's piece is whole rows, so pass 1 takes U's
    half-steps there (z_U = U_pᵀ (U_p x_U) of the rank's rows, which the all-reduce then sums) and pass 2 reads that
    piece's W alone, from its first row; the steady steps (kept product valid, equal to the eager step) hold."""
    check_steady(ROW_SHAPES)
    rank, fused, _, grads = setup(shapes=ROW_SHAPES)
    kernel = cpu_kernel()
    plan = pieces_plan(fused.flat, fused.layout)
    parts = [p for p, v in zip(zero_unit(fused.flat, fused.layout).parts, fused.w_vecs) if v is not None]
    x_w = torch.cat([v for v in fused.w_vecs if v is not None])
    x_u = torch.cat([v for v in fused.u_vecs if v is not None])
    work = torch.empty_like(fused.flat)
    _, z = kernel.pieces_pass1(fused.flat, grads[0], fused.m, fused.v, work, *plan.pieces, *plan.gaps, x_w, x_u,
                               0.1, 0.05, 0.9, 0.95, 1e-8, torch.zeros(0))
    j = next(i for i, p in enumerate(parts) if p.layout.dims == (30, 16))
    part, half = parts[j], plan.short_sizes_total // 2
    assert part.layout.start % 16 == 0 and part.numel % 16 == 0 and part.numel < 30 * 16, "not a cut on a row boundary"
    u_rows = work[part.offset : part.offset + part.numel].view(-1, 16)
    at = half + sum(plan.short_sizes[:j])
    x = x_u[at - half : at - half + 16]
    torch.testing.assert_close(z[at : at + 16], u_rows.t() @ (u_rows @ x), rtol=1e-5, atol=1e-7,
                               msg=lambda m: f"rank {rank}: pass 1's z_U of the rows here {m}")


def check_stale(edit: str) -> None:
    """Between steps, rank 1 alone edits its weights (or resets its x_W): pass 2 flags the kept product there, both
    ranks repeat the W half, and the step equals the eager one on the edited state."""
    rank, fused, eager, grads = setup()
    rec = KernelRecorder(cpu_kernel())
    whole = pieces_plan(fused.flat, fused.layout).whole
    for i, g in enumerate(grads):
        if i == 3 and rank == 1:
            for run in (fused, eager):
                if edit == "weights":
                    run.flat.mul_(3.0)
                else:
                    for v in run.w_vecs:
                        if v is not None:
                            v.copy_(initial_vector(v.numel()).flip(0))
        sf, se = fused.run(g, "fused_pieces", rec), eager.run(g, "eager")
        same(fused, eager, sf, se, f"step {i} after rank 1 edited its {edit}")
    for i in range(len(grads)):
        runs = rec.passes_of(i, whole)
        if i != 3:
            assert runs == [("whole", False, 0.0), ("rest", False, 0.0)], (i, runs)
            continue
        # rank 1 finds its whole matrices stale and repeats them alone; the cut ones: the reduced flag makes every
        # rank repeat them (rank 0 finds nothing stale itself)
        edited = 1.0 if rank == 1 else 0.0
        want = [("whole", False, edited)] + ([("whole", True, edited)] if rank == 1 else [])
        want += [("rest", False, edited), ("rest", True, 0.0)]
        assert runs == want, (rank, runs)


def check_kept_equals_fresh() -> None:
    """A step that finds no kept product (a resumed run's first) computes, bit for bit, what the uninterrupted run
    computes with the kept one: the update's B_W x_W and pass 1's agree exactly (so is resume bit-exact)."""
    rank, kept_run, _, grads = setup()
    _, fresh_run, _, _ = setup()
    for i, g in enumerate(grads):
        if i in (2, 4):
            fresh_run.work.products.clear()  # as after a restart: nothing kept
        a, b = kept_run.run(g, "fused_pieces"), fresh_run.run(g, "fused_pieces")
        assert torch.equal(kept_run.flat, fresh_run.flat), f"step {i}: weights differ"
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f"step {i}: stats differ"
        for v, w in zip(kept_run.w_vecs + kept_run.u_vecs, fresh_run.w_vecs + fresh_run.u_vecs):
            assert v is None or torch.equal(v, w), f"step {i}: vectors differ"


def check_tiny_update() -> None:
    """Gradients of 1e-31: U is about 1e-23 and ‖B_U x_U‖ < 2⁻⁴⁰, where the unnormalised B_Uᵀ b_U that pass 1 and
    pass 2 take would have subnormal terms. Every rank then repeats pass 2 with y_U = c b_U / ‖b_U‖, as the eager step
    computes it: σ_U equals the eager one to float rounding, relatively (an absolute tolerance would hide a σ of
    1e-22)."""
    rank, fused, eager, grads = setup()
    rec = KernelRecorder(cpu_kernel())
    whole = pieces_plan(fused.flat, fused.layout).whole
    for i, g in enumerate(grads):
        g = g * 1e-30
        sf, se = fused.run(g, "fused_pieces", rec), eager.run(g, "eager")
        same(fused, eager, sf, se, f"step {i}")
        capped = se[2] > 0
        assert bool(capped.any()) and bool((se[2][capped] < 1e-15).all()), se[2]
        torch.testing.assert_close(sf[2], se[2], rtol=1e-5, atol=0, msg=lambda m, i=i: f"step {i}: σ_U {m}")
    for i in range(len(grads)):  # each rank repeats its whole matrices alone, and every rank the cut ones
        assert [(kind, full) for kind, full, _ in rec.passes_of(i, whole)] == [
            ("whole", False), ("whole", True), ("rest", False), ("rest", True)], (i, rec.passes_of(i, whole))


def check_overlap_is_bit_exact(shapes: list[torch.Size] = SHAPES) -> None:
    """The step that overlaps its all-reduces with the matrices each rank holds whole computes bit for bit what the
    step in order computes (weights, stats, vectors, kept product) through steady steps, a resumed run's first step
    and gradients too small for the unnormalised b_U (every matrix repeated, in both). A kept product stale on one
    rank: that rank repeats its whole matrices alone and every rank the cut ones, where the step in order repeats
    every matrix: the same to float rounding."""
    import hf_weyl.core.functional as fn

    rank, overlapped, _, grads = setup(shapes=shapes)
    _, ordered, _, _ = setup(shapes=shapes)
    if shapes is CUT_SHAPES:  # every rank makes the same all-reduces, whatever it holds whole
        assert any(pieces_plan(overlapped.flat, overlapped.layout).whole) == (rank == 0), "not the layout meant"
    try:
        for i, g in enumerate(grads):
            if i == 2:
                for run in (overlapped, ordered):
                    run.work.products.clear()
            if i == 3:
                g = g * 1e-30
            if i == 4 and rank == 1:
                for run in (overlapped, ordered):
                    run.flat.mul_(3.0)
            fn.OVERLAP_ALLREDUCES = True
            a = overlapped.run(g, "fused_pieces")
            fn.OVERLAP_ALLREDUCES = False
            b = ordered.run(g, "fused_pieces")
            if i >= 4:
                same(overlapped, ordered, a, b, f"step {i}")
                continue
            assert torch.equal(overlapped.flat, ordered.flat), f"step {i}: weights differ"
            assert all(torch.equal(x, y) for x, y in zip(a, b)), f"step {i}: stats differ"
            for v, w in zip(overlapped.w_vecs + overlapped.u_vecs, ordered.w_vecs + ordered.u_vecs):
                assert v is None or torch.equal(v, w), f"step {i}: vectors differ"
            assert torch.equal(overlapped.work.products[overlapped.flat], ordered.work.products[ordered.flat]), \
                f"step {i}: kept products differ"
    finally:
        fn.OVERLAP_ALLREDUCES = True


def check_all_finite() -> None:
    kernel = cpu_kernel()
    base = torch.randn(100_003)
    assert kernel.all_finite(base)
    for value in (float("inf"), float("-inf"), float("nan")):
        for pos in (0, 77_777, 100_002):
            t = base.clone()
            t[pos] = value
            assert not kernel.all_finite(t), (value, pos)
    extreme = torch.tensor([3.4028235e38, -3.4028235e38, 1e-45, -0.0, 0.0])
    assert kernel.all_finite(extreme)
    assert kernel.all_finite(torch.zeros(0))


CHECKS = {
    "steady": check_steady,
    "whole_rows": check_whole_rows,
    "stale_weights": lambda: check_stale("weights"),
    "stale_vectors": lambda: check_stale("vectors"),
    "kept_equals_fresh": check_kept_equals_fresh,
    "tiny_update": check_tiny_update,
    "overlap_is_bit_exact": check_overlap_is_bit_exact,
    "overlap_nothing_whole_on_one_rank": lambda: check_overlap_is_bit_exact(CUT_SHAPES),
    "all_finite": check_all_finite,
}

if __name__ == "__main__":
    dist.init_process_group("gloo")
    names = sys.argv[1:-1] or list(CHECKS)
    run_checks({n: CHECKS[n] for n in names}, sys.argv[-1])
    dist.destroy_process_group()
