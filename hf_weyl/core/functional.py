"""AdamW² (Algorithm 1 of Qi et al., ICLR 2025) as functions over lists of tensors.

Per tensor W with AdamW direction U_t and scheduled learning rate α_t:

    σ_W = σ1(W_{t-1}),  σ_U = σ1(U_t)                      (warm-started power iteration)
    α'  = τ σ_W / σ_U   if α_t σ_U > τ σ_W and σ_W > 0,   else α_t
    W_t = W_{t-1} − α' U_t − α' λ W_{t-1}

By Weyl's inequality σ1(W_t) ≤ (1 + α'λ) σ1(W_{t-1}) + α' σ_U, so without weight decay every
step satisfies σ1(W_t − W_{t−1}) ≤ τ σ1(W_{t−1}) (up to the power-iteration error).

The denominator follows ``torch.optim.AdamW``: U = m̂ / (sqrt(v̂) + ε). With a τ that never binds,
these functions reproduce AdamW to float rounding.

Two implementations of the step, equal to float rounding:

* the eager one (:func:`eager_step`), in phases over lists of tensors (moments, direction, σ's, cap,
  update) that the engine adapters compose with σ's computed across ranks; it runs everywhere;
* on the CPU, for contiguous fp32/bf16 matrices, the fused one (``csrc/weyl_cpu.cpp``, see
  :mod:`hf_weyl.core.cpu_kernel`): three passes over each matrix instead of about 17, the tensors
  AdamW² does not cap stepped by torch's fused AdamW kernel. :func:`adamweyl_step` picks it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .cpu_kernel import cpu_kernel, kernel_disabled
from .power_iteration import PowerIters, as_matrix, power_iteration_

__all__ = [
    "FRESH_STEPS",
    "FUSED_CPU_DTYPES",
    "SigmaFn",
    "WorkBuffer",
    "adam_direction",
    "adam_moments_",
    "adamweyl_step",
    "apply_capped_update_",
    "cap_ratio",
    "dense_layout",
    "eager_step",
    "fused_cpu_applies",
    "fused_direction",
    "is_capped",
    "power_iters_for",
    "same_dense_layout",
]

#: Parameter dtypes the fused CPU step handles (others take the eager step).
FUSED_CPU_DTYPES = (torch.float32, torch.bfloat16)

#: While a tensor has taken fewer optimizer steps than this, σ1(U) gets ``cold_start_iters`` power
#: iterations: Adam's direction changes fastest while its moments fill up, and a vector warm-started from
#: the previous step lags most then (an underestimated σ_U loosens the cap; see docs/benchmarks.md).
FRESH_STEPS = 10


def power_iters_for(power_iters: int, cold_start_iters: int, *, cold: bool, fresh: bool) -> PowerIters:
    """Iterations this step: ``cold_start_iters`` for vectors that start cold and, while fresh, for σ1(U)."""
    more = max(power_iters, cold_start_iters)
    return PowerIters(more if cold else power_iters, more if cold or fresh else power_iters)


#: σ's of the capped tensors of a step whose matrices are not whole on this device (engine adapters):
#: ``sigma(indices, weights, directions, weight_vectors, update_vectors, iters)`` gets the positions of
#: the capped tensors in the step's lists, their local weight and direction tensors, their fp32 warm-start
#: vectors (updated in place) and the iteration counts, and returns (σ_W, σ1(direction)) as fp32 tensors.
SigmaFn = Callable[[list[int], list[Tensor], list[Tensor], list[Tensor], list[Tensor], PowerIters], tuple[Tensor, Tensor]]


def is_capped(shape: torch.Size | tuple[int, ...], cap_vectors: bool) -> bool:
    """Whether AdamW² caps a tensor of this shape: matrices (≥2-D), and 1-D tensors if ``cap_vectors``.

    Tensors with no elements have no σ1 and are never capped."""
    if 0 in shape:
        return False
    return len(shape) >= 2 or (cap_vectors and len(shape) == 1)


def advance_steps_(steps: list[Tensor]) -> None:
    """t ← t + 1 for each step counter (CPU counters with a CPU scalar, as torch's AdamW does)."""
    if steps[0].is_cpu:
        torch._foreach_add_(steps, torch.tensor(1.0), alpha=1.0)
    else:
        torch._foreach_add_(steps, 1)


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
    advance_steps_(steps)
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
) -> tuple[list[Tensor], list[float]]:
    """The AdamW direction U = m̂ / (sqrt(v̂) + ε) as (D, s) with U = s·D per tensor.

    With c = sqrt(1−β2^t): U = (m/(1−β1^t)) / (sqrt(v)/c + ε) = (c/(1−β1^t)) · m / (sqrt(v) + cε),
    so D = m / (sqrt(v) + cε) and s = c/(1−β1^t): four passes and one work buffer per tensor, as AdamW's
    own denominator + addcdiv.
    """
    roots = [bc**0.5 for bc in bias_corrections2]
    direction = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(direction, [eps * c for c in roots])
    torch._foreach_reciprocal_(direction)
    torch._foreach_mul_(direction, exp_avgs)
    return direction, [c / bc for c, bc in zip(roots, bias_corrections1)]


def dense_layout(t: Tensor) -> bool:
    """Whether ``t``'s elements fill a block of memory exactly once, in some order of its dims (contiguous,
    transposed, channels_last, channels_last_3d, ...; not a strided slice or an expanded tensor): then an
    elementwise kernel that walks the memory of tensors with equal strides pairs up the right elements."""
    expected = 1
    for size, stride in sorted(((n, s) for n, s in zip(t.shape, t.stride()) if n != 1), key=lambda ns: ns[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def same_dense_layout(*tensors: Tensor) -> bool:
    """Whether the tensors share one shape and one set of strides, and that layout is :func:`dense_layout`."""
    first = tensors[0]
    return dense_layout(first) and all(t.shape == first.shape and t.stride() == first.stride() for t in tensors[1:])


def fused_direction_applies(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor]) -> bool:
    """Whether :func:`fused_direction` can serve these tensors: all on the CPU, one floating dtype, each
    tensor's gradient and moments of one dense layout (torch's fused kernel walks memory, not indices: on a
    gradient strided unlike its moments, or on strided slices, it pairs up the wrong elements), and the CPU
    kernels not switched off (``HF_WEYL_CPU_KERNEL=0`` gives the foreach path everywhere: its elementwise
    results do not depend on where a shard starts, so sharded runs can be compared bit for bit)."""
    dtype = params[0].dtype
    return (
        not kernel_disabled()
        and all(t.device.type == "cpu" and t.dtype == dtype for seq in (grads, exp_avgs, exp_avg_sqs) for t in seq)
        and all(same_dense_layout(g, m, v) for g, m, v in zip(grads, exp_avgs, exp_avg_sqs))
    )


def fused_direction(
    work: WorkBuffer,
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    eps: float,
) -> list[Tensor]:
    """Advance step counters and moments, and return U = m̂ / (sqrt(v̂) + ε) per tensor, in one pass of torch's
    fused AdamW kernel (CPU) run on zeroed views of the work buffer as its "parameters" with lr = −1 and no
    weight decay: p ← 0 − (−1)·U. Each view has its moments' strides (:func:`fused_direction_applies`: one
    dense layout per tensor), so U has its parameter's layout. (The foreach form, :func:`adam_moments_` +
    :func:`adam_direction`, takes about six passes.)"""
    advance_steps_(steps)
    buffer = work.get(exp_avgs[0].dtype, sum(t.numel() for t in exp_avgs))
    directions, offset = [], 0
    for m in exp_avgs:
        directions.append(buffer[offset : offset + m.numel()].as_strided(m.shape, m.stride()))
        offset += m.numel()
    torch._foreach_zero_(directions)
    torch._fused_adamw_(directions, grads, exp_avgs, exp_avg_sqs, [], steps, lr=-1.0, beta1=beta1, beta2=beta2,
                        weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)
    return directions


def cap_ratio(sigma_weight: Tensor, sigma_update: Tensor, capped: Tensor, *, lr: float | Tensor, tau: float) -> Tensor:
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
    lr: float | Tensor,
    weight_decay: float,
) -> None:
    """W ← W(1 − α'λ) − α' s D with α' = lr · ratio per tensor (U = s·D), without a host sync."""
    ratio = ratio.to(torch.promote_types(params[0].dtype, torch.float32))  # fp64 params keep fp64 scalars
    eff_lr = ratio * lr
    if weight_decay != 0:
        torch._foreach_mul_(params, list((1 - eff_lr * weight_decay).unbind(0)))
    scales = torch.tensor(direction_scales, dtype=ratio.dtype).to(ratio.device, non_blocking=True)
    torch._foreach_addcmul_(params, directions, list((-eff_lr * scales).unbind(0)))


class WorkBuffer:
    """A flat buffer per dtype, grown as needed and kept between steps, for U: the fused CPU step needs the largest
    capped matrix, :func:`fused_direction` a whole bucket of tensors. Kept, so no fresh one is page-faulted in
    every step."""

    def __init__(self) -> None:
        self._buffers: dict[torch.dtype, Tensor] = {}

    def get(self, dtype: torch.dtype, numel: int) -> Tensor:
        buf = self._buffers.get(dtype)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[dtype] = torch.empty(numel, dtype=dtype)
        return buf


def fused_cpu_applies(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor]) -> bool:
    """Whether :func:`adamweyl_step` can take the fused CPU step for these tensors (it also needs the kernel)."""
    return all(
        t.device.type == "cpu" and t.dtype == params[0].dtype and t.is_contiguous() and not t.is_sparse
        for seq in (params, grads, exp_avgs, exp_avg_sqs)
        for t in seq
    ) and params[0].dtype in FUSED_CPU_DTYPES


def adamweyl_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    weight_vectors: list[Tensor | None],
    update_vectors: list[Tensor | None],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    tau: float,
    power_iters: PowerIters,
    sigma: SigmaFn | None = None,
    weight_products: list[Tensor | None] | None = None,
    work: WorkBuffer | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One AdamW² step over tensors on one device. Tensors whose vectors are None are not capped.

    Takes the fused CPU step where it applies (CPU, contiguous fp32/bf16, whole matrices — no ``sigma``
    — and ``weight_products``/``work`` given: the per-matrix fp32 vector b_W = B_W x_W the fused step
    keeps between steps, and its work buffer), else :func:`eager_step`. ``sigma`` (a :data:`SigmaFn`)
    computes the σ's of the capped tensors when their matrices are split across ranks. Returns
    (lr ratio, σ_W, σ_U) per tensor as fp32 tensors on the device (σ = 0 where not capped).
    """
    lists = (params, grads, exp_avgs, exp_avg_sqs, steps, weight_vectors, update_vectors)
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, tau=tau, power_iters=power_iters)
    fused = sigma is None and weight_products is not None and work is not None and not isinstance(lr, Tensor)
    if fused and fused_cpu_applies(*lists[:4]):
        kernel = cpu_kernel()
        if kernel is not None:
            return _fused_cpu_step(kernel, *lists, weight_products, work, **hyper)
    return eager_step(*lists, **hyper, sigma=sigma, work=work)


def _fused_cpu_step(
    kernel,
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    weight_vectors: list[Tensor | None],
    update_vectors: list[Tensor | None],
    weight_products: list[Tensor | None],
    work: WorkBuffer,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    tau: float,
    power_iters: PowerIters,
) -> tuple[Tensor, Tensor, Tensor]:
    """The fused CPU step: torch's fused AdamW for the tensors that are not capped, ``csrc/weyl_cpu.cpp`` for
    the matrices (three passes each; see the source for the maths)."""
    advance_steps_(steps)
    n = len(params)
    ratio, sigma_w, sigma_u = torch.ones(n), torch.zeros(n), torch.zeros(n)
    idx = [i for i, v in enumerate(weight_vectors) if v is not None]
    rest = [i for i, v in enumerate(weight_vectors) if v is None]
    if rest:
        torch._fused_adamw_(
            [params[i] for i in rest], [grads[i] for i in rest], [exp_avgs[i] for i in rest],
            [exp_avg_sqs[i] for i in rest], [], [steps[i] for i in rest],
            lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False,
        )
    if idx:
        ts = [float(steps[i]) for i in idx]  # step counters live on the CPU
        stats = kernel.weyl_step(
            [params[i] for i in idx], [grads[i] for i in idx], [exp_avgs[i] for i in idx], [exp_avg_sqs[i] for i in idx],
            work.get(params[0].dtype, max(params[i].numel() for i in idx)),
            [weight_vectors[i] for i in idx], [update_vectors[i] for i in idx], [weight_products[i] for i in idx],
            [as_matrix(params[i]).shape[0] for i in idx], [1 - beta1**t for t in ts], [1 - beta2**t for t in ts],
            lr, beta1, beta2, eps, weight_decay, tau, power_iters.weight, power_iters.update,
        )
        index = torch.tensor(idx)
        ratio.index_copy_(0, index, stats[0])
        sigma_w.index_copy_(0, index, stats[1])
        sigma_u.index_copy_(0, index, stats[2])
    return ratio, sigma_w, sigma_u


def eager_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    weight_vectors: list[Tensor | None],
    update_vectors: list[Tensor | None],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    tau: float,
    power_iters: PowerIters,
    sigma: SigmaFn | None = None,
    work: WorkBuffer | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The AdamW² step in phases, on any device (the reference the fused step equals). On the CPU, with a
    ``work`` buffer, moments and U come from torch's fused AdamW kernel in one pass (:func:`fused_direction`),
    else (and with ``HF_WEYL_CPU_KERNEL=0``) from foreach ops."""
    device = params[0].device
    if work is not None and fused_direction_applies(params, grads, exp_avgs, exp_avg_sqs):
        directions = fused_direction(work, grads, exp_avgs, exp_avg_sqs, steps, beta1=beta1, beta2=beta2, eps=eps)
        scales = [1.0] * len(params)
    else:
        bc1, bc2 = adam_moments_(grads, exp_avgs, exp_avg_sqs, steps, beta1=beta1, beta2=beta2)
        directions, scales = adam_direction(exp_avgs, exp_avg_sqs, bc1, bc2, eps=eps)

    n = len(params)
    sigma_w = torch.zeros(n, dtype=torch.float32, device=device)
    sigma_u = torch.zeros(n, dtype=torch.float32, device=device)
    idx = [i for i, v in enumerate(weight_vectors) if v is not None]
    if idx:
        w_vecs, u_vecs = [weight_vectors[i] for i in idx], [update_vectors[i] for i in idx]
        if sigma is None:
            sw = power_iteration_([as_matrix(params[i]) for i in idx], w_vecs, power_iters.weight)
            su = power_iteration_([as_matrix(directions[i]) for i in idx], u_vecs, power_iters.update)
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
