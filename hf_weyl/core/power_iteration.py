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
    "PowerIters",
    "Segments",
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
    """The matrix whose σ1 AdamW² controls (:func:`matrix_dims`) as a view or copy of ``t``."""
    return t.reshape(matrix_dims(t.shape))  # explicit sizes: -1 is ambiguous for empty tensors


def vector_length(shape: torch.Size | tuple[int, ...]) -> int:
    """Length of the power-iteration vector kept for a tensor of this shape: min(m, n) of its matrix view."""
    return max(1, min(matrix_dims(shape)))


def initial_vector(length: int, device: torch.device | str | None = None) -> Tensor:
    """A deterministic unit start vector (fp32): identical on every rank and every run.

    Drawn from a generator seeded by the length, so it neither consumes nor depends on the global
    RNG (a cold start must not change the user's random stream).
    """
    gen = torch.Generator(device="cpu").manual_seed(0x5EED + length)
    x = torch.randn(length, generator=gen, dtype=torch.float32)
    return (x / x.norm()).to(device)


def _short_side(a: Tensor) -> Tensor:
    """View B of the (m×n) matrix a with B.shape[1] = min(m, n)."""
    return a if a.shape[1] <= a.shape[0] else a.t()


def subnormal_guard(scale: Tensor) -> Tensor:
    """A power of two c with which a product whose result has magnitude ``scale`` is computed as
    B(c·y)/c: 1 normally, 2^min(-⌊log2 scale⌋, 126) when scale < 2^-60, so that no partial product is
    subnormal (rounding there could make σ = ‖Bᵀy‖ exceed σ1). Dividing by c is exact."""
    tiny = (scale > 0) & (scale < 2.0**-60)
    exponent = torch.floor(torch.log2(torch.where(tiny, scale, torch.ones_like(scale))))
    return torch.exp2((-exponent).clamp_max(126))  # 2^126 still fits fp32 (and bf16/fp16 never get here)


def unit_segments(v: Tensor, lengths: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """(v_s / ‖v_s‖, ‖v_s‖) for the consecutive segments v_s of a flat vector (``lengths``, a tensor on v's
    device, summing to ``total``), scale-safe: ‖v_s‖ = max|v_s| · ‖v_s / max|v_s|‖, so no square under- or
    overflows at any finite magnitude. A zero segment gives (0, 0); one with inf/NaN a NaN norm (callers
    treat a non-finite norm as "no estimate"). A fixed number of ops whatever the number of segments,
    and no host sync."""
    scale = torch.segment_reduce(v.abs(), "max", lengths=lengths, unsafe=True)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    w = v / torch.repeat_interleave(safe, lengths, output_size=total)
    norm = torch.segment_reduce(w * w, "sum", lengths=lengths, unsafe=True).sqrt()
    return w / torch.repeat_interleave(norm.clamp_min(1), lengths, output_size=total), norm * scale


class Segments:
    """Lengths of consecutive segments of a flat vector, as a list and as a tensor on ``device``."""

    def __init__(self, lengths: list[int], device: torch.device | str | None) -> None:
        self.sizes = lengths
        self.total = sum(lengths)
        self.tensor = torch.tensor(lengths, dtype=torch.int64, device=device)

    def expand(self, per_segment: Tensor) -> Tensor:
        """One value per segment, repeated over the segment's elements."""
        return torch.repeat_interleave(per_segment, self.tensor, output_size=self.total)

    def unit(self, v: Tensor) -> tuple[Tensor, Tensor]:
        return unit_segments(v, self.tensor, self.total)


def power_steps_(
    long_products: Callable[[list[Tensor]], Tensor],
    short_products: Callable[[list[Tensor]], Tensor],
    x: Tensor,
    short: Segments,
    long: Segments,
    iters: int,
) -> tuple[Tensor, Tensor]:
    """``iters`` power steps for many matrices at once, their vectors concatenated.

    ``x`` holds the unit start vectors (segments ``short``); ``long_products(xs)`` returns the concatenated
    B_i x_i (segments ``long``) and ``short_products(ys)`` the concatenated B_iᵀ y_i. Per step:
    y = Bx/‖Bx‖, z = Bᵀ(c y), σ = ‖z‖/c, x ← z/‖z‖ where σ is finite and > 0 (c: :func:`subnormal_guard`).
    Returns (σ as fp32 with non-finite values reported 0, the new x)."""
    sigma = None
    for _ in range(iters):
        y, b_norm = long.unit(long_products(list(x.split(short.sizes))))
        c = subnormal_guard(b_norm)
        z_unit, z_norm = short.unit(short_products(list((y * long.expand(c)).split(long.sizes))))
        sigma = z_norm / c
        ok = (sigma > 0) & torch.isfinite(sigma)
        x = torch.where(short.expand(ok), z_unit, x)
    return finite_sigma(sigma), x


def finite_sigma(sigma: Tensor) -> Tensor:
    """σ estimates as fp32 with non-finite values (and values beyond fp32's range) reported as 0: no estimate."""
    sigma = torch.nan_to_num(sigma, nan=0.0, posinf=0.0)
    return torch.nan_to_num(sigma.float(), posinf=0.0)


@torch.no_grad()
def power_iteration_(matrices: list[Tensor], vectors: list[Tensor], iters: int) -> Tensor:
    """Estimate σ1 of each 2-D matrix; updates each fp32 vector in place (warm start).

    ``vectors[i]`` must be a unit fp32 vector of length ``min(matrices[i].shape)`` on the matrices' device.
    Returns the σ1 estimates as one fp32 tensor of ``len(matrices)`` on that device. A non-finite matrix
    gives σ = 0 (treated as "no scale", i.e. not capped) and keeps its vector. One matrix-vector product
    per matrix and half-step; everything else is batched over all matrices.
    """
    if iters < 1:
        raise ValueError(f"power iteration needs iters >= 1, got {iters}")
    if not matrices:
        return torch.empty(0)
    dtype = torch.promote_types(max((m.dtype for m in matrices), key=lambda d: torch.finfo(d).bits), torch.float32)
    bs = [_short_side(m.to(dtype)) for m in matrices]  # (fp32 copies of bf16/fp16 matrices, once)
    device = bs[0].device
    short = Segments([b.shape[1] for b in bs], device)
    long = Segments([b.shape[0] for b in bs], device)
    sigma, x = power_steps_(
        lambda xs: torch.cat([b @ xi for b, xi in zip(bs, xs)]),
        lambda ys: torch.cat([b.t() @ yi for b, yi in zip(bs, ys)]),
        torch.cat(vectors).to(dtype),
        short,
        long,
        iters,
    )
    torch._foreach_copy_(vectors, list(x.float().split(short.sizes)))
    return sigma
