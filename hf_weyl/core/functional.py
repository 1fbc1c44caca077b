"""AdamW² (Algorithm 1 of Qi et al., ICLR 2025) as functions over lists of tensors.

Per tensor W with AdamW direction U_t and scheduled learning rate α_t:

    σ_W = σ1(W_{t-1}),  σ_U = σ1(U_t)                      (warm-started power iteration)
    α'  = τ σ_W / σ_U   if α_t σ_U > τ σ_W and σ_W > 0,   else α_t
    W_t = W_{t-1} − α' U_t − α' λ W_{t-1}

By Weyl's inequality σ1(W_t) ≤ (1 + α'λ) σ1(W_{t-1}) + α' σ_U, so without weight decay every
step satisfies σ1(W_t − W_{t−1}) ≤ τ σ1(W_{t−1}) (up to the power-iteration error).

The denominator follows ``torch.optim.AdamW``: U = m̂ / (sqrt(v̂) + ε). With a τ that never binds,
these functions reproduce AdamW to float rounding. The steps are split in phases so that the
DeepSpeed ZeRO form (which computes σ across ranks) composes the same pieces.

On the CPU, :func:`adamweyl_step` walks the tensors in cache-sized chunks (``CPU_CHUNK_BYTES`` of
parameters each): moments, direction, both power iterations and the update of a chunk run while
its tensors are still in the last-level cache, and the directions of all chunks share one work
buffer allocated once per step (for bf16/fp16 parameters also one fp32 scratch buffer for the
power-iteration copies), so no model-sized buffer has its pages faulted in afresh every step.
Chunks are cut between tensors (the cap is per tensor), so the result is the same element by
element. On accelerators the whole list is one chunk (one fused foreach launch per op).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate

import torch
from torch import Tensor

from .power_iteration import as_matrix, power_iteration_

__all__ = [
    "CPU_CHUNK_BYTES",
    "SigmaFn",
    "adam_direction",
    "adam_moments_",
    "adamweyl_step",
    "apply_capped_update_",
    "cap_ratio",
    "is_capped",
]


#: On the CPU, :func:`adamweyl_step` processes consecutive tensors in chunks of at most this many
#: parameter bytes (a larger tensor is a chunk of its own). 8 MiB keeps a chunk's parameters,
#: gradients, moments and direction within a typical 32 MiB last-level cache.
CPU_CHUNK_BYTES = 8 << 20


#: σ's of the capped tensors of a step whose matrices are not whole on this device (engine adapters):
#: ``sigma(indices, weights, directions, weight_vectors, update_vectors, iters)`` gets the positions of
#: the capped tensors in the step's lists, their local weight and direction tensors, their fp32 warm-start
#: vectors (updated in place) and the iteration count, and returns (σ_W, σ1(direction)) as fp32 tensors.
SigmaFn = Callable[[list[int], list[Tensor], list[Tensor], list[Tensor], list[Tensor], int], tuple[Tensor, Tensor]]


def is_capped(shape: torch.Size | tuple[int, ...], cap_vectors: bool) -> bool:
    """Whether AdamW² caps a tensor of this shape: matrices (≥2-D), and 1-D tensors if ``cap_vectors``.

    Tensors with no elements have no σ1 and are never capped."""
    if 0 in shape:
        return False
    return len(shape) >= 2 or (cap_vectors and len(shape) == 1)


def adam_moments_(
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
) -> tuple[list[float], list[float]]:
    """Advance step counters and moments in place; return bias corrections (1−β1^t, 1−β2^t)."""
    if steps[0].is_cpu:
        torch._foreach_add_(steps, torch.tensor(1.0), alpha=1.0)
    else:
        torch._foreach_add_(steps, 1)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    ts = [float(s) for s in steps]  # step counters live on the CPU (as in torch): no device sync
    return [1 - beta1**t for t in ts], [1 - beta2**t for t in ts]


def adam_direction(
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    bias_corrections1: list[float],
    bias_corrections2: list[float],
    *,
    eps: float,
    out: list[Tensor] | None = None,
) -> tuple[list[Tensor], list[float]]:
    """The AdamW direction U = m̂ / (sqrt(v̂) + ε) as (D, s) with U = s·D per tensor.

    With c = sqrt(1−β2^t): U = (m/(1−β1^t)) / (sqrt(v)/c + ε) = (c/(1−β1^t)) · m / (sqrt(v) + cε),
    so D = m / (sqrt(v) + cε) and s = c/(1−β1^t). This costs four passes, as AdamW's own
    denominator + addcdiv do, and one work buffer per tensor (the one AdamW allocates too), or
    D is written into ``out`` (tensors shaped like the moments).
    """
    roots = [bc**0.5 for bc in bias_corrections2]
    if out is None:
        direction = torch._foreach_sqrt(exp_avg_sqs)
    else:
        torch._foreach_copy_(out, exp_avg_sqs)
        torch._foreach_sqrt_(out)
        direction = out
    torch._foreach_add_(direction, [eps * c for c in roots])
    torch._foreach_reciprocal_(direction)
    torch._foreach_mul_(direction, exp_avgs)
    return direction, [c / bc for c, bc in zip(roots, bias_corrections1)]


def _fp32(tensors: list[Tensor], scratch: list[Tensor] | None, idx: list[int]) -> list[Tensor]:
    """Matrix views of ``tensors``, copied into ``scratch[idx]`` (fp32) when given."""
    if scratch is None:
        return [as_matrix(t) for t in tensors]
    targets = [scratch[i] for i in idx]
    torch._foreach_copy_(targets, tensors)
    return [as_matrix(t) for t in targets]


def cap_ratio(sigma_weight: Tensor, sigma_update: Tensor, capped: Tensor, *, lr: float, tau: float) -> Tensor:
    """Effective / scheduled lr per tensor: τσ_W/(α σ_U) where the cap binds, else 1.

    A tensor with σ_W = 0 (e.g. a zero-initialised bias) has no scale to be relative to and is
    never capped, so it can leave zero. ``capped`` masks the tensors AdamW² applies to.
    """
    limit = tau * sigma_weight
    proposed = lr * sigma_update
    binds = capped & (sigma_weight > 0) & (proposed > limit)
    return torch.where(binds, limit / proposed.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(limit))


def apply_capped_update_(
    params: list[Tensor],
    directions: list[Tensor],
    ratio: Tensor,
    direction_scales: list[float],
    *,
    lr: float,
    weight_decay: float,
) -> None:
    """W ← W(1 − α'λ) − α' s D with α' = lr · ratio per tensor (U = s·D), without a host sync."""
    ratio = ratio.to(torch.promote_types(params[0].dtype, torch.float32))  # fp64 params keep fp64 scalars
    eff_lr = ratio * lr
    if weight_decay != 0:
        torch._foreach_mul_(params, list((1 - eff_lr * weight_decay).unbind(0)))
    scales = torch.tensor(direction_scales, dtype=ratio.dtype).to(ratio.device, non_blocking=True)
    torch._foreach_addcmul_(params, directions, list((-eff_lr * scales).unbind(0)))


def adamweyl_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    weight_vectors: list[Tensor | None],
    update_vectors: list[Tensor | None],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    tau: float,
    power_iters: int,
    sigma: SigmaFn | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One AdamW² step over tensors on one device. Tensors whose vectors are None are not capped.

    ``sigma`` (a :data:`SigmaFn`) computes the σ's of the capped tensors when their matrices are split
    across ranks (a collective call: the step then runs as one chunk, so every rank calls it once); by
    default σ's come from power iteration of the whole matrices. Returns (lr ratio, σ_W, σ_U) per tensor as fp32 tensors on the
    device (σ = 0 where not capped).
    """
    lists = (params, grads, exp_avgs, exp_avg_sqs, steps, weight_vectors, update_vectors)
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, tau=tau, power_iters=power_iters)
    if params[0].device.type != "cpu" or sigma is not None:
        return _step_chunk(*lists, **hyper, sigma=sigma)
    bounds = _chunk_bounds(params, CPU_CHUNK_BYTES)
    # Work buffers shared by all chunks, allocated (and their pages touched) once per step: the
    # direction, and for bf16/fp16 an fp32 copy of the matrix under power iteration.
    numel = max(sum(_aligned(t.numel()) for t in params[a:b]) for a, b in bounds)
    work = exp_avg_sqs[0].new_empty(numel)
    low_precision = torch.promote_types(work.dtype, torch.float32) != work.dtype
    scratch = work.new_empty(numel, dtype=torch.float32) if low_precision else None
    results = []
    for a, b in bounds:
        results.append(
            _step_chunk(
                *(seq[a:b] for seq in lists),
                **hyper,
                out=_views(work, params[a:b]),
                fp32_scratch=None if scratch is None else _views(scratch, params[a:b]),
            )
        )
    if len(results) == 1:
        return results[0]
    return tuple(torch.cat(parts) for parts in zip(*results))  # type: ignore[return-value]


def _aligned(numel: int) -> int:
    """``numel`` rounded up to 16 elements (64 bytes of fp32): every view of a work buffer starts on a cache line,
    as a fresh allocation does, so BLAS kernels (whose summation order may follow alignment) give the same
    σ's whatever a tensor's position in its chunk."""
    return -(-numel // 16) * 16


def _views(buffer: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Consecutive 64-byte aligned views of a flat buffer shaped like ``like``."""
    offsets = accumulate((_aligned(t.numel()) for t in like), initial=0)
    return [buffer[o : o + t.numel()].view(t.shape) for o, t in zip(offsets, like)]


def _chunk_bounds(tensors: list[Tensor], max_bytes: int) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive tensors with at most ``max_bytes`` each (≥ 1 tensor per range)."""
    bounds, start, size = [], 0, 0
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        if i > start and size + nbytes > max_bytes:
            bounds.append((start, i))
            start, size = i, 0
        size += nbytes
    bounds.append((start, len(tensors)))
    return bounds


def _step_chunk(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    weight_vectors: list[Tensor | None],
    update_vectors: list[Tensor | None],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    tau: float,
    power_iters: int,
    out: list[Tensor] | None = None,
    fp32_scratch: list[Tensor] | None = None,
    sigma: SigmaFn | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`adamweyl_step` on one chunk of tensors; the direction goes to ``out`` if given.

    ``fp32_scratch`` (tensors shaped like ``params``) receives fp32 copies of low-precision
    matrices for the power iteration, instead of a fresh allocation per matrix.
    """
    device = params[0].device
    bc1, bc2 = adam_moments_(grads, exp_avgs, exp_avg_sqs, steps, beta1=beta1, beta2=beta2)
    directions, scales = adam_direction(exp_avgs, exp_avg_sqs, bc1, bc2, eps=eps, out=out)

    n = len(params)
    sigma_w = torch.zeros(n, dtype=torch.float32, device=device)
    sigma_u = torch.zeros(n, dtype=torch.float32, device=device)
    idx = [i for i, v in enumerate(weight_vectors) if v is not None]
    if idx:
        w_vecs, u_vecs = [weight_vectors[i] for i in idx], [update_vectors[i] for i in idx]
        if sigma is None:
            sw = power_iteration_(_fp32([params[i] for i in idx], fp32_scratch, idx), w_vecs, power_iters)
            su = power_iteration_(_fp32([directions[i] for i in idx], fp32_scratch, idx), u_vecs, power_iters)
        else:
            sw, su = sigma(idx, [params[i] for i in idx], [directions[i] for i in idx], w_vecs, u_vecs, power_iters)
        index = torch.tensor(idx, device=device)
        sigma_w.index_copy_(0, index, sw)
        sigma_u.index_copy_(0, index, su * torch.tensor([scales[i] for i in idx], device=device))  # σ1(sD) = s σ1(D)
    capped = torch.zeros(n, dtype=torch.bool, device=device)
    if idx:
        capped[idx] = True
    ratio = cap_ratio(sigma_w, sigma_u, capped, lr=lr, tau=tau)
    apply_capped_update_(params, directions, ratio, scales, lr=lr, weight_decay=weight_decay)
    return ratio, sigma_w, sigma_u
