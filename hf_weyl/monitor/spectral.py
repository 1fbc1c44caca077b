"""Spectral quantities of the paper (SPEC §1), all in fp32.

For head h, M_h = W_q,hᵀ W_k,h (d_model × d_model, rank ≤ d_head). With the thin QR factorisations
W_q,hᵀ = Q_q R_q and W_k,hᵀ = Q_k R_k, M_h = Q_q (R_q R_kᵀ) Q_kᵀ, so the singular values of M_h are
those of the small d_head × d_head matrix R_q R_kᵀ: exact, and cheap for any d_model.

SEC(s) = Σ_{i≤s} σ_i(M)² / Σ_i σ_i(M)²  (spectral energy concentration; 1 = all energy in s directions).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["qk_singular_values", "sec_index", "sigma_max", "attention_entropy"]


@torch.no_grad()
def sigma_max(matrix: Tensor) -> float:
    """σ1 of a matrix (ℓ2 norm of a vector), exact, in fp32."""
    m = matrix.detach().float()
    if m.numel() == 0:
        return 0.0
    if m.ndim == 1:
        return float(m.norm())
    return float(torch.linalg.matrix_norm(m.reshape(m.shape[0], -1), ord=2))


@torch.no_grad()
def qk_singular_values(query: Tensor, key: Tensor) -> Tensor:
    """Singular values (descending) of W_q,hᵀ W_k,h for every head: (heads, d_head) from (heads, d_head, d_model)."""
    _, r_q = torch.linalg.qr(query.float().transpose(1, 2))
    _, r_k = torch.linalg.qr(key.float().transpose(1, 2))
    return torch.linalg.svdvals(r_q @ r_k.transpose(1, 2))


def sec_index(singular_values: Tensor, s: int) -> Tensor:
    """SEC(s) along the last dim of descending singular values; 0 where all are 0."""
    energy = singular_values.float().square()
    total = energy.sum(-1)
    top = energy[..., : max(1, s)].sum(-1)
    return torch.where(total > 0, top / total.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(total))


def attention_entropy(probs: Tensor) -> Tensor:
    """Mean Shannon entropy (nats) per head of attention rows ``probs`` (batch, heads, queries, keys) → (heads,).

    0·log 0 is taken as 0, so one-hot rows give exactly 0 and a uniform row over n keys gives log n.
    """
    p = probs.detach().float()
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    return ent.mean(dim=(0, 2))
