"""Warm-started power iteration: σ1 estimates for many matrices at once.

For a matrix A (m×n) we run the power method on the *short* side: with k = min(m, n) and
B = A if n <= m else Aᵀ (so B is (max×k)), one iteration on a unit vector x ∈ R^k is

    y = B x / ‖B x‖,     z = Bᵀ y,     σ = ‖z‖,     x ← z / σ,

which is one step of the power method on BᵀB. σ = ‖Bᵀ y‖ with ‖y‖ = 1 is a lower bound on σ1(A)
that converges to it: the estimate never overestimates. Keeping x between calls (warm start, as
``torch.nn.utils.spectral_norm`` does) makes one iteration per optimizer step nearly exact for
slowly moving matrices.

All arithmetic is at least fp32 (fp64 matrices stay fp64; bf16/fp16 ones are promoted), vectors
are stored in fp32. Norms are taken scale-safely (divided by the largest magnitude first), so the
estimate stays a lower bound at any finite scale of the matrix. A zero, tiny or non-finite matrix
never turns a stored vector into NaN: x is only replaced where the new σ is finite and positive.

The matrices of one call are processed together: one matrix-vector product per matrix and half-step
(on every backend already a full-size kernel), and everything else — norms, scaling, the choice of
which vectors to keep — over the concatenated vectors at once, so a step dispatches a fixed number of
small ops whatever the number of matrices (what an accelerator's launch overhead needs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "STACK_DEVICES",
    "STACK_MAX_NUMEL",
    "PowerIters",
    "Segments",
    "StackCache",
    "as_matrix",
    "matrix_dims",
    "finite_sigma",
    "initial_vector",
    "power_iteration_",
    "power_steps_",
    "subnormal_guard",
    "unit_segments",
    "vector_length",
]



class PowerIters(NamedTuple):
    """Power-iteration steps this optimizer step, for σ1(W) and for σ1(U)."""

    weight: int
    update: int


def matrix_dims(shape: Sequence[int]) -> tuple[int, int]:
    """(m, n) of the matrix AdamW² caps for a tensor of this shape: (shape[0], rest) for ≥2-D tensors, (1, n) for
    vectors and scalars — the one definition of the matrix view."""
    shape = torch.Size(shape)
    if len(shape) >= 2:
        return int(shape[0]), int(shape[1:].numel())
    return 1, int(shape.numel())


def as_matrix(t: Tensor) -> Tensor:
    """The matrix whose σ1 AdamW² controls (:func:`matrix_dims`) as a view or copy of ``t`` (``t`` itself if 2-D)."""
    if t.ndim == 2:
        return t
    return t.reshape(matrix_dims(t.shape))  # explicit sizes: -1 is ambiguous for empty tensors


def vector_length(shape: torch.Size | tuple[int, ...]) -> int:
    """Length of the power-iteration vector kept for a tensor of this shape: min(m, n) of its matrix view."""
    return max(1, min(matrix_dims(shape)))


_INITIAL: dict[int, Tensor] = {}  # length → its start vector (CPU), made once per process


def initial_vector(length: int, device: torch.device | str | None = None) -> Tensor:
    """A deterministic unit start vector (fp32): identical on every rank and every run.

    Drawn from a generator seeded by the length, so it neither consumes nor depends on the global
    RNG (a cold start must not change the user's random stream). Made once per length and process and
    copied from there: ``AdamWeyl`` makes those of its parameters when it is built, so a step that
    creates its state under ``torch.compile`` only copies a known tensor.
    """
    x = _INITIAL.get(length)
    if x is None:
        gen = torch.Generator(device="cpu").manual_seed(0x5EED + length)
        x = torch.randn(length, generator=gen, dtype=torch.float32)
        x = _INITIAL[length] = x / x.norm()
    return x.to(device, copy=True)


def _short_side(a: Tensor) -> Tensor:
    """View B of the (m×n) matrix a with B.shape[1] = min(m, n)."""
    return a if a.shape[1] <= a.shape[0] else a.t()


def subnormal_guard(scale: Tensor) -> Tensor:
    """A power of two c with which a product whose result has magnitude ``scale`` is computed as
    B(c·y)/c: 1 normally, 2^min(-⌊log2 scale⌋, 126) when scale < 2^-60, so that no partial product is
    subnormal (rounding there could make σ = ‖Bᵀy‖ exceed σ1). Dividing by c is exact. (A zero scale gets
    2^126 here: its vector is zero, and so is σ whatever c is.)"""
    k = -torch.floor(torch.log2(scale))  # > 60 exactly when scale < 2^-60 (NaN and inf give no shift)
    return torch.exp2(torch.where(k > 60, k.clamp_max(126), 0.0))  # 2^126 still fits fp32 (bf16/fp16 never get here)


def unit_segments(v: Tensor, lengths: Tensor, total: int, ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(v_s / ‖v_s‖, ‖v_s‖) for the consecutive segments v_s of a flat vector (``lengths``, a tensor on v's
    device, summing to ``total``; ``ids``: each element's segment, if known), scale-safe: ‖v_s‖ = max|v_s| ·
    ‖v_s / max|v_s|‖, so no square under- or overflows at any finite magnitude. A zero segment gives (0, 0); one
    with inf/NaN a NaN norm (callers treat a non-finite norm as "no estimate"). A fixed number of ops whatever
    the number of segments, and no host sync."""
    if ids is None:
        ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=v.device), lengths, output_size=total)
    scale = torch.segment_reduce(v.abs(), "max", lengths=lengths, unsafe=True)
    w = v / scale.masked_fill(scale == 0, 1.0).index_select(0, ids)
    norm = torch.segment_reduce(w * w, "sum", lengths=lengths, unsafe=True).sqrt()
    return w / norm.clamp_min(1).index_select(0, ids), norm * scale


class Segments:
    """Lengths of consecutive segments of a flat vector, as a list and as a tensor on ``device``, and each
    element's segment (``ids``)."""

    def __init__(self, lengths: list[int], device: torch.device | str | None) -> None:
        self.sizes = lengths
        self.total = sum(lengths)
        self.tensor = torch.tensor(lengths, dtype=torch.int64, device=device)
        self.ids = torch.repeat_interleave(torch.arange(len(lengths), device=device), self.tensor, output_size=self.total)

    def expand(self, per_segment: Tensor) -> Tensor:
        """One value per segment, repeated over the segment's elements."""
        return per_segment.index_select(0, self.ids)

    def unit(self, v: Tensor) -> tuple[Tensor, Tensor]:
        return unit_segments(v, self.tensor, self.total, self.ids)


def power_steps_(
    long_products: Callable[[Tensor], Tensor],
    short_products: Callable[[Tensor], Tensor],
    x: Tensor,
    short: Segments,
    long: Segments,
    iters: int,
) -> tuple[Tensor, Tensor]:
    """``iters`` power steps for many matrices at once, their vectors concatenated.

    ``x`` holds the unit start vectors (segments ``short``); ``long_products(x)`` returns the concatenated
    B_i x_i (segments ``long``) and ``short_products(y)`` the concatenated B_iᵀ y_i. Per step:
    y = Bx/‖Bx‖, z = Bᵀ(c y), σ = ‖z‖/c, x ← z/‖z‖ where σ is finite and > 0 (c: :func:`subnormal_guard`).
    Returns (σ as fp32 with non-finite values reported 0, the new x)."""
    sigma = None
    for _ in range(iters):
        y, b_norm = long.unit(long_products(x))
        c = subnormal_guard(b_norm)
        z_unit, z_norm = short.unit(short_products(y * long.expand(c)))
        sigma = z_norm / c
        ok = (sigma > 0) & (sigma < torch.inf)  # finite and positive (NaN fails both)
        x = torch.where(short.expand(ok), z_unit, x)
    return finite_sigma(sigma), x


def finite_sigma(sigma: Tensor) -> Tensor:
    """σ estimates as fp32 with non-finite values (and values beyond fp32's range) reported as 0: no estimate."""
    sigma = torch.nan_to_num(sigma, nan=0.0, posinf=0.0)
    return torch.nan_to_num(sigma.float(), posinf=0.0)


@torch.no_grad()
def power_iteration_(matrices: list[Tensor], vectors: list[Tensor], iters: int, stacks: StackCache | None = None) -> Tensor:
    """Estimate σ1 of each 2-D matrix; updates each fp32 vector in place (warm start).

    ``vectors[i]`` must be a unit fp32 vector of length ``min(matrices[i].shape)`` on the matrices' device.
    Returns the σ1 estimates as one fp32 tensor of ``len(matrices)`` on that device. A non-finite matrix
    gives σ = 0 (treated as "no scale", i.e. not capped) and keeps its vector. One matrix-vector product
    per matrix and half-step — or, with ``stacks`` on a device of :data:`STACK_DEVICES` and fp32 arithmetic, one
    batched product per shape (:class:`StackCache`); everything else is batched over all matrices.
    """
    if iters < 1:
        raise ValueError(f"power iteration needs iters >= 1, got {iters}")
    if not matrices:
        return torch.empty(0)
    dtype = torch.float64 if any(m.dtype == torch.float64 for m in matrices) else torch.float32  # at least fp32
    device = matrices[0].device
    if stacks is not None and dtype == torch.float32 and device.type in STACK_DEVICES and not torch.compiler.is_compiling():
        return stacks.plan([tuple(m.shape) for m in matrices], device).sigmas_(matrices, vectors, iters)
    bs = [_short_side(m.to(dtype)) for m in matrices]  # (fp32 copies of bf16/fp16 matrices, once)
    short = Segments([b.shape[1] for b in bs], device)
    long = Segments([b.shape[0] for b in bs], device)
    sigma, x = power_steps_(
        lambda x: torch.cat([b @ xi for b, xi in zip(bs, x.split(short.sizes))]),
        lambda y: torch.cat([b.t() @ yi for b, yi in zip(bs, y.split(long.sizes))]),
        torch.cat(vectors).to(dtype),
        short,
        long,
        iters,
    )
    torch._foreach_copy_(vectors, list(x.float().split(short.sizes)))
    return sigma


#: Devices on which :func:`power_iteration_` stacks equal-shape matrices (given a :class:`StackCache`): where every
#: product is a kernel launch. (On the CPU the fused kernels serve the common layouts, and each matrix keeps its own
#: matrix-vector product, so CPU results stay those of the per-matrix products bit for bit.)
STACK_DEVICES = ("cuda", "xpu", "mps", "meta")

#: Matrices of at most this many elements (16 MiB in fp32) are stacked: copying one into its stack (a read and an
#: fp32 write, ≈ 8 bytes per element, 32 MiB) costs at most about what the kernel launches it saves do (two per
#: half-step, ≈ 5 µs each, the time a current GPU moves ≈ 30 MiB in). Larger ones keep their own products, and
#: no fp32 copy of them is kept.
STACK_MAX_NUMEL = 2**22


class _StackPlan:
    """How one list of matrix shapes is multiplied: equal (m, n) shapes of at most :data:`STACK_MAX_NUMEL` elements,
    two or more, stacked into one fp32 (count, m, n) buffer each (one ``bmm`` per shape and half-step), the others
    alone (one ``mv``); the vectors in that order, with input and output buffers and their per-chunk views made
    once (a warm step creates no views)."""

    def __init__(self, dims: list[tuple[int, int]], device: torch.device) -> None:
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, (m, n) in enumerate(dims):
            if m * n <= STACK_MAX_NUMEL:
                by_shape.setdefault((m, n), []).append(i)
        chunks = [(idx, m, n) for (m, n), idx in by_shape.items() if len(idx) >= 2]
        stacked = {i for idx, _, _ in chunks for i in idx}
        chunks += [([i], m, n) for i, (m, n) in enumerate(dims) if i not in stacked]
        self.order = [i for idx, _, _ in chunks for i in idx]
        tall = [n <= m for _, m, n in chunks]
        short = [n if t else m for (_, m, n), t in zip(chunks, tall)]
        long = [m if t else n for (_, m, n), t in zip(chunks, tall)]
        counts = [len(idx) for idx, _, _ in chunks]
        self.short = Segments([s for s, c in zip(short, counts) for _ in range(c)], device)
        self.long = Segments([s for s, c in zip(long, counts) for _ in range(c)], device)
        f32 = dict(dtype=torch.float32, device=device)
        self.x_in, self.short_out = torch.empty(self.short.total, **f32), torch.empty(self.short.total, **f32)
        self.y_in, self.long_out = torch.empty(self.long.total, **f32), torch.empty(self.long.total, **f32)
        self.stacked_idx: list[int] = []
        self.dst: list[Tensor] = []
        self.chunks: list[tuple] = []  # (matrix index or None, long mat, short mat, x in, long out, y in, short out)
        s0 = l0 = 0
        for (idx, m, n), t, s, l, c in zip(chunks, tall, short, long, counts):
            views = (self.x_in, self.long_out, self.y_in, self.short_out)
            spans = ((s0, s), (l0, l), (l0, l), (s0, s))
            if c >= 2:
                buf = torch.empty(c, m, n, **f32)
                self.stacked_idx += idx
                self.dst += list(buf.unbind(0))
                long_mat, short_mat = (buf, buf.transpose(1, 2)) if t else (buf.transpose(1, 2), buf)
                vs = [v.narrow(0, a, c * k).view(c, k, 1) for v, (a, k) in zip(views, spans)]
                self.chunks.append((None, long_mat, short_mat, *vs))
            else:
                vs = [v.narrow(0, a, k) for v, (a, k) in zip(views, spans)]
                self.chunks.append((idx[0], None, None, *vs))  # (its matrix is taken at each call)
            s0, l0 = s0 + c * s, l0 + c * l
        self.inverse = torch.tensor(sorted(range(len(self.order)), key=self.order.__getitem__), device=device)

    def sigmas_(self, matrices: list[Tensor], vectors: list[Tensor], iters: int) -> Tensor:
        if self.dst:
            torch._foreach_copy_(self.dst, [matrices[i] for i in self.stacked_idx])
        mats = []
        for i, long_mat, short_mat, *rest in self.chunks:
            if i is not None:  # alone: B = A (tall) or Aᵀ
                b = _short_side(matrices[i].float())
                long_mat, short_mat = b, b.t()
            mats.append((long_mat, short_mat, *rest))

        def long_products(x: Tensor) -> Tensor:
            self.x_in.copy_(x)
            for long_mat, _, x_in, out, _, _ in mats:
                (torch.bmm if long_mat.ndim == 3 else torch.mv)(long_mat, x_in, out=out)
            return self.long_out

        def short_products(y: Tensor) -> Tensor:
            self.y_in.copy_(y)
            for _, short_mat, _, _, y_in, out in mats:
                (torch.bmm if short_mat.ndim == 3 else torch.mv)(short_mat, y_in, out=out)
            return self.short_out

        ordered = [vectors[i] for i in self.order]
        sigma, x = power_steps_(long_products, short_products, torch.cat(ordered), self.short, self.long, iters)
        torch._foreach_copy_(ordered, list(x.split(self.short.sizes)))
        return sigma[self.inverse]


class StackCache:
    """The :class:`_StackPlan` of each list of matrix shapes a step has seen (an optimizer keeps one: the stacks are
    kept between steps, so no buffer or view is made in a warm step)."""

    #: Plans kept, most recently used last (a warm step uses one per bucket; fresh steps, whose W's and U's take
    #: different iteration counts, one each for W's and U's). Each holds fp32 copies of its stacked matrices.
    MAX_PLANS = 3

    def __init__(self) -> None:
        self._plans: dict[tuple, _StackPlan] = {}

    def plan(self, dims: list[tuple[int, int]], device: torch.device) -> _StackPlan:
        key = (tuple(dims), device)
        plan = self._plans.pop(key, None)
        if plan is None:
            while len(self._plans) >= self.MAX_PLANS:
                self._plans.pop(next(iter(self._plans)))
            plan = _StackPlan(dims, device)
        self._plans[key] = plan
        return plan
