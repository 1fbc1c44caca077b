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

Matrices of one shape are processed together: small ones (≤ ``BATCHED_MAX_NUMEL`` elements) are
stacked and multiplied with one ``bmm``; large ones go through one ``mv`` each, which on every
backend is already a full-size kernel (stacking them would only add a copy of the weights).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

__all__ = [
    "BATCHED_MAX_NUMEL",
    "as_matrix",
    "finite_sigma",
    "initial_vector",
    "power_iteration_",
    "power_step",
    "subnormal_guard",
    "unit_rows",
    "vector_length",
]

#: Matrices with at most this many elements are stacked per shape and multiplied in one ``bmm``.
BATCHED_MAX_NUMEL = 1 << 16



def as_matrix(t: Tensor) -> Tensor:
    """The matrix whose σ1 AdamW² controls: ``(shape[0], rest)`` for ≥2-D tensors, ``(1, n)`` for vectors."""
    if t.ndim >= 2:
        return t.reshape(t.shape[0], torch.Size(t.shape[1:]).numel())  # explicit: -1 is ambiguous for empty tensors
    return t.reshape(1, t.numel())


def vector_length(shape: torch.Size | tuple[int, ...]) -> int:
    """Length of the power-iteration vector kept for a tensor of this shape: min(m, n) of its matrix view."""
    if len(shape) == 0:
        return 1
    m = shape[0] if len(shape) >= 2 else 1
    n = 1
    for s in shape[1:] if len(shape) >= 2 else shape:
        n *= s
    return max(1, min(m, n))


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


def unit_rows(v: Tensor) -> tuple[Tensor, Tensor]:
    """(v / ‖v‖, ‖v‖) along the last dim, scale-safe: computed as w = v / max|v|, then w / ‖w‖ and
    ‖v‖ = max|v| · ‖w‖, so no square under- or overflows at any finite magnitude. A zero row gives
    (0, 0); a row with inf/NaN gives NaN (callers treat a non-finite norm as "no estimate")."""
    scale = v.abs().amax(dim=-1, keepdim=True)
    w = v / torch.where(scale > 0, scale, torch.ones_like(scale))
    norm = w.norm(dim=-1, keepdim=True)  # >= 1 unless the row is zero
    return w / norm.clamp_min(1), (norm * scale).squeeze(-1)


def _compute_dtype(a: Tensor) -> torch.dtype:
    return torch.promote_types(a.dtype, torch.float32)


def power_step(b: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One power step on (batched) B from unit x: y = Bx/‖Bx‖, z = Bᵀy, σ = ‖z‖ (≤ σ1(B)).

    Returns (σ, z/σ, ok) with ok = σ finite and > 0; where not ok the caller keeps x."""
    y, bx_norm = unit_rows(torch.matmul(b, x.unsqueeze(-1)).squeeze(-1))
    c = subnormal_guard(bx_norm)
    x_new, z_norm = unit_rows(torch.matmul(b.transpose(-2, -1), (y * c.unsqueeze(-1)).unsqueeze(-1)).squeeze(-1))
    sigma = z_norm / c
    return sigma, x_new, (sigma > 0) & torch.isfinite(sigma)


def subnormal_guard(scale: Tensor) -> Tensor:
    """A power of two c with which a product whose result has magnitude ``scale`` is computed as
    B(c·y)/c: 1 normally, 2^min(-⌊log2 scale⌋, 126) when scale < 2^-60, so that no partial product is
    subnormal (rounding there could make σ = ‖Bᵀy‖ exceed σ1). Dividing by c is exact."""
    tiny = (scale > 0) & (scale < 2.0**-60)
    exponent = torch.floor(torch.log2(torch.where(tiny, scale, torch.ones_like(scale))))
    return torch.exp2((-exponent).clamp_max(126))  # 2^126 still fits fp32 (and bf16/fp16 never get here)


def _iterate(b: Tensor, x: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """``iters`` power steps on (batched) B with start x; returns (σ, new x) without touching x."""
    x = x.to(b.dtype)
    for _ in range(iters):
        sigma, x_new, ok = power_step(b, x)
        x = torch.where(ok.unsqueeze(-1), x_new, x)
    return finite_sigma(sigma), x.float()


def finite_sigma(sigma: Tensor) -> Tensor:
    """σ estimates as fp32 with non-finite values (and values beyond fp32's range) reported as 0: no estimate."""
    sigma = torch.nan_to_num(sigma, nan=0.0, posinf=0.0)
    return torch.nan_to_num(sigma.float(), posinf=0.0)


@torch.no_grad()
def power_iteration_(matrices: list[Tensor], vectors: list[Tensor], iters: int) -> Tensor:
    """Estimate σ1 of each 2-D matrix; updates each fp32 vector in place (warm start).

    ``vectors[i]`` must be a unit fp32 vector of length ``min(matrices[i].shape)`` on the matrix's
    device. Returns the σ1 estimates as one fp32 tensor of ``len(matrices)`` on that device.
    A non-finite matrix gives σ = 0 (treated as "no scale", i.e. not capped) and keeps its vector.
    """
    if iters < 1:
        raise ValueError(f"power iteration needs iters >= 1, got {iters}")
    if not matrices:
        return torch.empty(0)
    sigmas: list[Tensor | None] = [None] * len(matrices)
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, a in enumerate(matrices):
        by_shape[tuple(a.shape)].append(i)

    for (m, n), idx in by_shape.items():
        if m * n <= BATCHED_MAX_NUMEL and len(idx) > 1:
            stack = torch.stack([matrices[i] for i in idx])
            stack = stack.to(_compute_dtype(stack))
            b = stack if n <= m else stack.transpose(1, 2)
            x0 = torch.stack([vectors[i] for i in idx])
            sigma, x = _iterate(b, x0, iters)
            torch._foreach_copy_([vectors[i] for i in idx], list(x.unbind(0)))
            for j, i in enumerate(idx):
                sigmas[i] = sigma[j]
        else:
            for i in idx:
                b = _short_side(matrices[i].to(_compute_dtype(matrices[i])))
                sigma, x = _iterate(b, vectors[i], iters)
                vectors[i].copy_(x)
                sigmas[i] = sigma
    return torch.stack(sigmas)  # type: ignore[arg-type]
