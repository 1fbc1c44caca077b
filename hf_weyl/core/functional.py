"""AdamW² (Algorithm 1 of Qi et al., ICLR 2025) as functions over lists of tensors.

Per tensor W with AdamW direction U_t and scheduled learning rate α_t:

    σ_W = σ1(W_{t-1}),  σ_U = σ1(U_t)                      (warm-started power iteration)
    α'  = τ σ_W / σ_U   if α_t σ_U > τ σ_W and σ_W > 0,   else α_t
    W_t = W_{t-1} − α' U_t − α' λ W_{t-1}

By Weyl's inequality σ1(W_t) ≤ (1 + α'λ) σ1(W_{t-1}) + α' σ_U, so without weight decay every
step satisfies σ1(W_t − W_{t−1}) ≤ τ σ1(W_{t−1}) (up to the power-iteration error).

The denominator follows ``torch.optim.AdamW``: U = m̂ / (sqrt(v̂) + ε). With a τ that never binds,
these functions reproduce AdamW to float rounding.

One step, :func:`adamweyl`, over *units* (the tensors the elementwise maths runs on: parameters, local
shards, ZeRO flat partitions) and the *parts* of parameters they hold with their layouts across ranks
(:mod:`hf_weyl.core.layout`); engine adapters only describe those. Three implementations, chosen explicitly
(:func:`choose_impl`) and equal to float rounding:

* ``eager``: in phases over lists of tensors (moments, direction, σ's by layout, cap, update by segments); it
  runs everywhere, with σ's of split matrices from ``hf_weyl.distributed``;
* ``fused_cpu``: whole contiguous fp32/bf16 matrices on the CPU (``csrc/weyl_cpu.cpp``, see
  :mod:`hf_weyl.core.cpu_kernel`): three passes over each matrix instead of about 17, the tensors AdamW²
  does not cap stepped by torch's fused AdamW kernel;
* ``fused_pieces``: flat fp32 CPU partitions of row pieces (ZeRO, ZeRO-Offload), the same three passes with
  the vector all-reduces between them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .cpu_kernel import cpu_kernel, kernel_disabled
from .layout import Part, RowPiece, ShardedSigma, uncovered
from .power_iteration import PowerIters, StackCache, as_matrix, power_iteration_

__all__ = [
    "FRESH_STEPS",
    "FUSED_CPU_DTYPES",
    "FUSED_DIRECTION_DEVICES",
    "IMPLS",
    "WorkBuffer",
    "adam_direction",
    "adam_direction_on_device",
    "adam_moments_",
    "adamweyl",
    "apply_capped_update_",
    "cap_ratio",
    "choose_impl",
    "constant_tensor",
    "dense_layout",
    "fused_cpu_applies",
    "fused_direction",
    "is_capped",
    "is_fresh",
    "power_iters_for",
    "same_dense_layout",
]

#: Parameter dtypes the fused CPU step handles (others take the eager step).
FUSED_CPU_DTYPES = (torch.float32, torch.bfloat16)

#: While a tensor has taken fewer optimizer steps than this, σ1(U) gets ``cold_start_iters`` power
#: iterations: Adam's direction changes fastest while its moments fill up, and a vector warm-started from
#: the previous step lags most then (an underestimated σ_U loosens the cap; see docs/benchmarks.md).
FRESH_STEPS = 10


def is_fresh(steps: list[Tensor]) -> bool:
    """Whether any of these tensors has taken fewer than :data:`FRESH_STEPS` steps before this one (CPU counters:
    one host read of their minimum)."""
    return bool(steps) and float(torch.stack(steps).amin()) < FRESH_STEPS


def power_iters_for(power_iters: int, cold_start_iters: int, *, cold: bool, fresh: bool) -> PowerIters:
    """Iterations this step: ``cold_start_iters`` for vectors that start cold and, while fresh, for σ1(U)."""
    more = max(power_iters, cold_start_iters)
    return PowerIters(more if cold else power_iters, more if cold or fresh else power_iters)


def is_capped(shape: torch.Size | tuple[int, ...], cap_vectors: bool) -> bool:
    """Whether AdamW² caps a tensor of this shape: matrices (≥2-D), and 1-D tensors if ``cap_vectors``.

    Tensors with no elements have no σ1 and are never capped."""
    if 0 in shape:
        return False
    return len(shape) >= 2 or (cap_vectors and len(shape) == 1)


_ONE = torch.tensor(1.0)  # (made once: a warm step creates no tensor for it)


def advance_steps_(steps: list[Tensor]) -> None:
    """t ← t + 1 for each step counter (CPU counters with a CPU scalar, as torch's AdamW does)."""
    if steps[0].is_cpu:
        torch._foreach_add_(steps, _ONE, alpha=1.0)
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
    ts = torch.stack(steps).tolist()  # step counters live on the CPU (as in torch): no device sync
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


def adam_direction_on_device(
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    eps: float,
) -> list[Tensor]:
    """Advance counters and moments and return U = m̂ / (sqrt(v̂) + ε) with foreach ops whose bias corrections are
    tensors computed from the counters where they live (as torch's capturable AdamW): no host read, any layout —
    the form ``capturable=True`` and ``torch.compile`` take where the fused kernel cannot serve."""
    advance_steps_(steps)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    bc1 = torch._foreach_pow(beta1, steps)  # β1^t, then 1 − β1^t
    torch._foreach_neg_(bc1)
    torch._foreach_add_(bc1, 1)
    root2 = torch._foreach_pow(beta2, steps)
    torch._foreach_neg_(root2)
    torch._foreach_add_(root2, 1)
    torch._foreach_sqrt_(root2)  # sqrt(1 − β2^t)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [r.to(d.device) for r, d in zip(root2, denom)] if steps[0].device != denom[0].device else root2)
    torch._foreach_add_(denom, eps)
    directions = torch._foreach_div(exp_avgs, [b.to(m.device) for b, m in zip(bc1, exp_avgs)]
                                    if steps[0].device != exp_avgs[0].device else bc1)
    torch._foreach_div_(directions, denom)
    return directions


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


#: Device types with torch's fused AdamW kernel (``torch._fused_adamw_``), which :func:`fused_direction` runs.
FUSED_DIRECTION_DEVICES = ("cpu", "cuda", "xpu", "meta")


def fused_direction_applies(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor]) -> bool:
    """Whether :func:`fused_direction` can serve these tensors: all on one device of :data:`FUSED_DIRECTION_DEVICES`,
    one floating dtype, each tensor's gradient and moments of one dense layout (torch's fused kernel walks memory,
    not indices: on a gradient strided unlike its moments, or on strided slices, it pairs up the wrong elements),
    and the kernels not switched off (``HF_WEYL_CPU_KERNEL=0`` gives the foreach path everywhere: its elementwise
    results do not depend on where a shard starts, so sharded runs can be compared bit for bit)."""
    dtype, device = params[0].dtype, exp_avgs[0].device
    return (
        device.type in FUSED_DIRECTION_DEVICES
        and not kernel_disabled()
        and all(t.device == device and t.dtype == dtype for seq in (grads, exp_avgs, exp_avg_sqs) for t in seq)
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
    fused AdamW kernel run on zeroed views of the work buffer as its "parameters" with lr = −1 and no weight decay:
    p ← 0 − (−1)·U. Each view has its moments' strides (:func:`fused_direction_applies`: one dense layout per
    tensor), so U has its parameter's layout; the views are made once per set of layouts (:meth:`WorkBuffer.views`).
    The kernel reads the step counters on the moments' device: CPU counters are copied there in one transfer.
    (The foreach form, :func:`adam_moments_` + :func:`adam_direction`, takes about six passes.)"""
    advance_steps_(steps)
    directions = work.views(exp_avgs)
    torch._foreach_zero_(directions)
    device = exp_avgs[0].device
    kernel_steps = steps
    if steps[0].device != device and device.type != "meta":
        kernel_steps = list(torch.stack(steps).to(device, non_blocking=True).unbind(0))
    torch._fused_adamw_(directions, grads, exp_avgs, exp_avg_sqs, [], kernel_steps, lr=-1.0, beta1=beta1, beta2=beta2,
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
    return torch.where(binds, limit / proposed.clamp_min(torch.finfo(torch.float32).tiny), 1.0)


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
    if params[0].dtype == torch.float64:
        ratio = ratio.double()  # fp64 params keep fp64 scalars
    eff_lr = ratio * lr
    if weight_decay != 0:
        torch._foreach_mul_(params, list((1 - eff_lr * weight_decay).unbind(0)))
    if any(s != 1.0 for s in direction_scales):
        scales = torch.tensor(direction_scales, dtype=ratio.dtype).to(ratio.device, non_blocking=True)
        eff_lr = eff_lr * scales
    torch._foreach_addcmul_(params, directions, list((-eff_lr).unbind(0)))


class WorkBuffer:
    """What a step reuses between steps, so that a warm step allocates and views nothing: a flat buffer per device and
    dtype, grown as needed, for U (the fused CPU step needs the largest capped matrix, :func:`fused_direction` a
    whole bucket of tensors), the views of it :func:`fused_direction` writes U into, and the stacked matrices of the
    batched power iteration (:class:`~hf_weyl.core.power_iteration.StackCache`); and, per flat partition, the partial
    B_W x_W the fused pieces step's update computed for the next step (:attr:`products`; a cache: used only where the
    next step finds it is still B_W x_W, bit for bit, so a lost or stale entry changes nothing but speed)."""

    #: Sets of U views kept (one per bucket of tensors a step has; more means the buckets change between steps).
    MAX_VIEW_SETS = 8

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self._views: dict[tuple, tuple[Tensor, list[Tensor]]] = {}
        self._constants: dict[tuple, Tensor] = {}
        self.stacks = StackCache()
        self.products: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def get(self, dtype: torch.dtype, numel: int, device: torch.device | str = "cpu") -> Tensor:
        key = (dtype, torch.device(device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf

    def constant(self, key: tuple, make):
        """A small value kept under ``key`` (made by ``make()`` the first time): a tensor (:func:`constant_tensor`) or
        the fused pieces step's plan of a partition."""
        value = self._constants.get(key)
        if value is None:
            if len(self._constants) >= 64:
                self._constants.clear()
            value = self._constants[key] = make()
        return value

    def views(self, like: list[Tensor]) -> list[Tensor]:
        """Consecutive views of the buffer on ``like``'s device and dtype, each with the shape and strides of its
        tensor in ``like`` (dense layouts); made once per set of layouts while the buffer stays the same."""
        first = like[0]
        key = (first.dtype, first.device, tuple((t.shape, t.stride()) for t in like))
        buf = self.get(first.dtype, sum(t.numel() for t in like), first.device)
        kept = self._views.get(key)
        if kept is not None and kept[0] is buf:
            return kept[1]
        views, offset = [], 0
        for t in like:
            views.append(buf[offset : offset + t.numel()].as_strided(t.shape, t.stride()))
            offset += t.numel()
        if len(self._views) >= self.MAX_VIEW_SETS:
            self._views.clear()
        self._views[key] = (buf, views)
        return views


def fused_cpu_applies(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor]) -> bool:
    """Whether the fused CPU step on whole matrices can serve these tensors (it also needs the kernel): all on the
    CPU, contiguous, of one dtype in :data:`FUSED_CPU_DTYPES`."""
    return all(
        t.is_cpu and t.dtype == params[0].dtype and t.is_contiguous() and not t.is_sparse
        for seq in (params, grads, exp_avgs, exp_avg_sqs)
        for t in seq
    ) and params[0].dtype in FUSED_CPU_DTYPES


#: The implementations of :func:`adamweyl` (see :func:`choose_impl`).
IMPLS = ("eager", "fused_cpu", "fused_pieces", "fused_shards")


def _fused_pieces_applies(params: list[Tensor], grads: list[Tensor], parts: list[list[Part]]) -> bool:
    """Every unit a flat contiguous fp32 CPU partition whose parts are row pieces over one process group (ZeRO)."""
    groups = set()
    for param, grad, unit_parts in zip(params, grads, parts):
        if not (param.is_cpu and param.dtype == torch.float32 and param.ndim == 1 and param.is_contiguous()
                and grad.dtype == torch.float32 and grad.is_contiguous() and grad.shape == param.shape):
            return False
        for part in unit_parts:
            if part.whole_unit or not isinstance(part.layout, RowPiece):
                return False
            groups.add(id(part.layout.group))
    return len(groups) == 1


def _fused_shards_applies(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                          parts: list[list[Part]], capped: list[bool]) -> bool:
    """Every unit one contiguous fp32 CPU tensor (parameter, gradient, moments) holding one part; the capped ones row
    pieces over one process group, each the whole unit (FSDP2's dim-0 shards under ``CPUOffloadPolicy``)."""
    groups = set()  # (none: nothing is capped, every unit takes torch's fused AdamW)
    for param, grad, m, v, unit_parts, cap in zip(params, grads, exp_avgs, exp_avg_sqs, parts, capped):
        if len(unit_parts) != 1 or not unit_parts[0].whole_unit:
            return False
        numel = param.numel()
        for t in (param, grad, m, v):  # (a loop, not all() over a generator: this runs for every parameter, every step)
            if not (t.is_cpu and t.dtype == torch.float32 and t.is_contiguous() and t.numel() == numel):
                return False
        layout = unit_parts[0].layout
        if cap:
            if not isinstance(layout, RowPiece) or layout.numel != numel:
                return False
            groups.add(id(layout.group))
    return len(groups) <= 1


def choose_impl(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    parts: list[list[Part]],
    capped: list[bool],
    *,
    lr: float | Tensor,
    power_iters: PowerIters,
    sigma: ShardedSigma | None,
    sigma_mode: str,
) -> str:
    """Which implementation of :func:`adamweyl` steps these units (explicitly, as torch's ``adam()`` picks
    single-tensor / foreach / fused):

    * ``"fused_cpu"``: whole matrices on one device (no ``sigma``), CPU, contiguous fp32/bf16 — ``csrc/weyl_cpu.cpp``,
      three passes per matrix, b_W kept between steps;
    * ``"fused_pieces"``: flat fp32 CPU partitions of row pieces (ZeRO, ZeRO-Offload), each with a capped piece, one
      power iteration (warm steps), ``vector_reduce`` — the same kernel's piece passes with two vector all-reduces;
    * ``"fused_shards"``: the same on pieces that are tensors of their own (FSDP2's dim-0 shards on the CPU), torch's
      fused AdamW for the tensors that are not capped (all of them in a group with nothing capped: biases, norms);
    * ``"eager"``: everything else (any device, layout, dtype; a device-tensor lr), and everywhere with
      ``HF_WEYL_CPU_KERNEL=0``, under ``torch.compile``, or when the kernel is not built.
    """
    if torch.compiler.is_compiling() or kernel_disabled() or isinstance(lr, Tensor) or not params:
        return "eager"  # (the C++ kernels are opaque to torch.compile)
    if sigma is None:
        if fused_cpu_applies(params, grads, exp_avgs, exp_avg_sqs) and cpu_kernel() is not None:
            return "fused_cpu"
        return "eager"
    if not any(capped):  # σ's of nothing: the power iterations and σ mode do not matter
        return "fused_shards" if _fused_shards_applies(params, grads, exp_avgs, exp_avg_sqs, parts, list(capped)) \
            else "eager"  # (no kernel needed)
    if power_iters != (1, 1) or sigma_mode != "vector_reduce":
        return "eager"
    every_unit_capped, pos = True, 0
    for unit_parts in parts:
        every_unit_capped = every_unit_capped and any(capped[pos : pos + len(unit_parts)])
        pos += len(unit_parts)
    if every_unit_capped and _fused_pieces_applies(params, grads, parts):
        impl = "fused_pieces"
    elif _fused_shards_applies(params, grads, exp_avgs, exp_avg_sqs, parts, list(capped)):
        impl = "fused_shards"
    else:
        return "eager"
    return impl if cpu_kernel() is not None else "eager"  # (built only where it would run)


def adamweyl(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    parts: list[list[Part]],
    weight_vectors: list[Tensor | None],
    update_vectors: list[Tensor | None],
    weight_products: list[Tensor | None],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    tau: float,
    power_iters: PowerIters,
    impl: str,
    sigma: ShardedSigma | None = None,
    sigma_mode: str = "vector_reduce",
    work: WorkBuffer | None = None,
    no_host_reads: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One AdamW² step over units (:mod:`hf_weyl.core.layout`) on one device:
    moments → direction U → σ_W, σ_U (by layout) → ratio = min(1, τσ_W/(lr σ_U)) → W ← W(1 − α'λ) − α'U.

    ``params``, ``grads``, moments and step counters are per unit (local tensors; the counters are advanced in
    place), ``parts`` per unit; ``weight_vectors``/``update_vectors`` (fp32, warm-started in place; None: the part
    is not capped) and ``weight_products`` (the fused CPU step's kept b_W) per part, in unit order. ``impl``: one of
    :data:`IMPLS` (:func:`choose_impl`); ``sigma`` computes σ's of parts with a layout; ``no_host_reads``
    (``capturable``, with the eager impl): nothing read on the host, the counters may live on the device. Returns (lr ratio, σ_W,
    σ_U) per part as fp32 tensors (σ = 0 where not capped)."""
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, tau=tau, power_iters=power_iters)
    if impl == "fused_cpu":
        return _fused_cpu_step(cpu_kernel(), params, grads, exp_avgs, exp_avg_sqs, steps, weight_vectors,
                               update_vectors, weight_products, work, **hyper)
    if impl == "fused_pieces":
        outs = [_fused_pieces_step(cpu_kernel(), params[u], grads[u], exp_avgs[u], exp_avg_sqs[u], steps[u], parts[u],
                                   _of_unit(weight_vectors, parts, u), _of_unit(update_vectors, parts, u), sigma, work,
                                   **hyper) for u in range(len(params))]
        return tuple(torch.cat(x) for x in zip(*outs))  # type: ignore[return-value]
    if impl == "fused_shards":
        return _fused_shards_step(cpu_kernel(), params, grads, exp_avgs, exp_avg_sqs, steps, parts, weight_vectors,
                                  update_vectors, sigma, work, **hyper)
    if impl != "eager":
        raise ValueError(f"unknown AdamW² implementation {impl!r}; valid: {IMPLS}")
    return _eager_step(params, grads, exp_avgs, exp_avg_sqs, steps, parts, weight_vectors, update_vectors, **hyper,
                       sigma=sigma, sigma_mode=sigma_mode, work=work, no_host_reads=no_host_reads)


def _of_unit(per_part: list, parts: list[list[Part]], u: int) -> list:
    start = sum(len(p) for p in parts[:u])
    return per_part[start : start + len(parts[u])]


def _part_view(unit: Tensor, part: Part) -> Tensor:
    """The part's local elements: the unit itself, or its stretch of the flattened unit."""
    return unit if part.whole_unit else unit.view(-1).narrow(0, part.offset, part.numel)


def _segments(units: list[Tensor], parts: list[list[Part]]) -> list[tuple[int, int | None, int, int]]:
    """Stretches covering every unit once, for the update: ``(unit, part index or None, offset, numel)`` — a whole-unit
    part is the unit in its own layout (offset 0, numel -1); a flat unit is cut into its parts' pieces and the gaps
    between them (padding, stepped with lr ratio 1)."""
    out, i = [], 0
    for u, (unit, unit_parts) in enumerate(zip(units, parts)):
        if len(unit_parts) == 1 and unit_parts[0].whole_unit:
            out.append((u, i, 0, -1))
            i += 1
            continue
        pieces = [(part.offset, part.numel, i + j) for j, part in enumerate(unit_parts) if part.numel]
        gaps = uncovered(unit.numel(), [(off, numel) for off, numel, _ in pieces])
        for off, numel, j in sorted(pieces + [(off, numel, None) for off, numel in gaps], key=lambda s: s[0]):
            out.append((u, j, off, numel))
        i += len(unit_parts)
    return out


def _eager_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    parts: list[list[Part]],
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
    sigma: ShardedSigma | None,
    sigma_mode: str,
    work: WorkBuffer | None,
    no_host_reads: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """The AdamW² step in phases, on any device (the reference the fused steps equal). With a ``work`` buffer,
    moments and U come from torch's fused AdamW kernel in one pass (:func:`fused_direction`) where it serves the
    layouts, else (and with ``HF_WEYL_CPU_KERNEL=0``) from foreach ops; ``no_host_reads`` (``capturable``) and
    ``torch.compile`` take the foreach ops with bias corrections on the counters' device
    (:func:`adam_direction_on_device`) where the fused kernel does not serve (under compile: always)."""
    device = params[0].device
    compiling = torch.compiler.is_compiling()
    fused = not compiling and work is not None and fused_direction_applies(params, grads, exp_avgs, exp_avg_sqs)
    if compiling or (no_host_reads and not fused):
        directions = adam_direction_on_device(grads, exp_avgs, exp_avg_sqs, steps, beta1=beta1, beta2=beta2, eps=eps)
        scales = [1.0] * len(params)
    elif fused:
        directions = fused_direction(work, grads, exp_avgs, exp_avg_sqs, steps, beta1=beta1, beta2=beta2, eps=eps)
        scales = [1.0] * len(params)
    else:
        bc1, bc2 = adam_moments_(grads, exp_avgs, exp_avg_sqs, steps, beta1=beta1, beta2=beta2)
        directions, scales = adam_direction(exp_avgs, exp_avg_sqs, bc1, bc2, eps=eps)

    flat = [(u, part) for u, unit_parts in enumerate(parts) for part in unit_parts]
    n = len(flat)
    idx = [i for i, v in enumerate(weight_vectors) if v is not None]
    capped = constant_tensor(work, "capped", tuple(v is not None for v in weight_vectors), device, torch.bool)
    sigmas = torch.zeros(2 * n, dtype=torch.float32, device=device)  # σ_W, then σ_U
    whole = [i for i in idx if flat[i][1].layout is None]
    sharded = [i for i in idx if flat[i][1].layout is not None]
    for chosen, sharded_here in ((whole, False), (sharded, True)):
        if not chosen:
            continue
        w_vecs, u_vecs = [weight_vectors[i] for i in chosen], [update_vectors[i] for i in chosen]
        weights = [_part_view(params[flat[i][0]], flat[i][1]) for i in chosen]
        updates = [_part_view(directions[flat[i][0]], flat[i][1]) for i in chosen]
        if not sharded_here:
            stacks = work.stacks if work is not None else None
            w_mats, u_mats = [as_matrix(w) for w in weights], [as_matrix(d) for d in updates]
            if power_iters.weight == power_iters.update:  # W's and U's in the same products
                both = power_iteration_(w_mats + u_mats, w_vecs + u_vecs, power_iters.weight, stacks)
            else:
                both = torch.cat([power_iteration_(w_mats, w_vecs, power_iters.weight, stacks),
                                  power_iteration_(u_mats, u_vecs, power_iters.update, stacks)])
        else:
            if sigma is None:
                raise RuntimeError("AdamWeyl: parts laid out across ranks need a sharded σ (StepPlan.sigma)")
            sw, su = sigma.sigmas([flat[i][1].layout for i in chosen], weights, updates, w_vecs, u_vecs, power_iters,
                                  sigma_mode)
            both = torch.cat([sw.to(device), su.to(device)])
        sigmas.index_copy_(0, constant_tensor(work, "index", tuple(chosen) + tuple(n + i for i in chosen), device), both)
    sigma_w, sigma_u = sigmas[:n], sigmas[n:]
    if any(s != 1.0 for s in scales):  # σ1(sD) = s σ1(D)
        sigma_u = sigma_u * torch.tensor([scales[u] for u, _ in flat], device=device)
    ratio = cap_ratio(sigma_w, sigma_u, capped, lr=lr, tau=tau)

    segments = _segments(params, parts)
    if all(numel == -1 for _, _, _, numel in segments):  # one whole part per unit: segment i is unit i
        apply_capped_update_(params, directions, ratio, scales, lr=lr, weight_decay=weight_decay)
    elif segments:
        seg_w = [params[u] if numel == -1 else params[u].view(-1).narrow(0, off, numel) for u, _, off, numel in segments]
        seg_u = [directions[u] if numel == -1 else directions[u].view(-1).narrow(0, off, numel)
                 for u, _, off, numel in segments]
        padded = torch.cat([ratio, ratio.new_ones(1)])  # gaps take ratio 1
        seg_ratio = padded[torch.tensor([n if j is None else j for _, j, _, _ in segments], device=device)]
        apply_capped_update_(seg_w, seg_u, seg_ratio, [scales[u] for u, _, _, _ in segments], lr=lr,
                             weight_decay=weight_decay)
    return ratio, sigma_w, sigma_u


def constant_tensor(work: WorkBuffer | None, kind: str, values: tuple, device: torch.device,
                    dtype: torch.dtype = torch.int64) -> Tensor:
    """A small constant tensor (indices, masks) on ``device``, made once per value and kept in ``work`` (under
    ``torch.compile`` made in the graph, where it is a constant, instead of read from a cache the graph would have
    to guard on)."""
    if work is None or torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    return work.constant((kind, values, device, dtype), lambda: torch.tensor(values, dtype=dtype, device=device))


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
    """The fused CPU step on whole matrices (one part per unit): torch's fused AdamW for the tensors that are not
    capped, ``csrc/weyl_cpu.cpp`` for the matrices (three passes each; see the source for the maths)."""
    advance_steps_(steps)
    n = len(params)
    ratio, sigma_w, sigma_u = torch.ones(n), torch.zeros(n), torch.zeros(n)
    idx = [i for i, v in enumerate(weight_vectors) if v is not None]
    _adamw_uncapped(params, grads, exp_avgs, exp_avg_sqs, steps, weight_vectors, lr=lr, beta1=beta1, beta2=beta2,
                    eps=eps, weight_decay=weight_decay)
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


def _adamw_uncapped(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                    steps: list[Tensor], weight_vectors: list[Tensor | None], *, lr: float, beta1: float, beta2: float,
                    eps: float, weight_decay: float) -> None:
    """torch's fused AdamW on the units that are not capped (no vectors), counters already advanced."""
    rest = [i for i, v in enumerate(weight_vectors) if v is None]
    if rest:
        torch._fused_adamw_(
            [params[i] for i in rest], [grads[i] for i in rest], [exp_avgs[i] for i in rest],
            [exp_avg_sqs[i] for i in rest], [], [steps[i] for i in rest],
            lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False,
        )


def _capped_stats(work: WorkBuffer, weight_vectors: list[Tensor | None], both: Tensor, *, lr: float,
                  tau: float) -> tuple[Tensor, Tensor, Tensor, list[float]]:
    """(lr ratio, σ_W, σ_U) per part from ``both`` = [σ_W | σ_U] of the capped parts, and the capped parts' lrs."""
    idx = [i for i, v in enumerate(weight_vectors) if v is not None]
    n, k = len(weight_vectors), len(idx)
    index = constant_tensor(work, "index", tuple(idx), torch.device("cpu"))
    sigma_w, sigma_u = torch.zeros(n), torch.zeros(n)
    sigma_w.index_copy_(0, index, both[:k])
    sigma_u.index_copy_(0, index, both[k:])
    capped = constant_tensor(work, "capped", tuple(v is not None for v in weight_vectors), torch.device("cpu"), torch.bool)
    ratio = cap_ratio(sigma_w, sigma_u, capped, lr=lr, tau=tau)
    return ratio, sigma_w, sigma_u, [lr * r for r in ratio[index].tolist()]


def _fused_pieces_step(
    kernel,
    flat: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    parts: list[Part],
    weight_vectors: list[Tensor | None],
    update_vectors: list[Tensor | None],
    sigma: ShardedSigma,
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
    """A warm step (one power iteration) of a flat fp32 CPU partition of row pieces in three passes of
    ``csrc/weyl_cpu.cpp``, with one all-reduce of the partial products after each of the first two: what the
    single-process fused step costs, plus two vector all-reduces (none on one rank). Equal to the eager step to float
    rounding.

    ``pieces_pass1``: moments, U and the partial b_U = B_U x_U, with the partial B_W x_W the previous update kept
    (:attr:`WorkBuffer.products`; computed here from W where there is none), and on tall pieces of whole rows U's
    second half-step B_Uᵀ b_U, row by row; ``pieces_pass2``: the partial B_Wᵀ y_W, B_Uᵀ b_U of the other pieces,
    and whether the kept B_W x_W is still that of the weights and x_W (if not on some rank — weights loaded or edited,
    vectors reset — the W half is repeated with pass 2's own B_W x_W, as the eager step computes it);
    ``pieces_update``: the update, and the partial B_W x_W of the new weights to keep. U's z is B_Uᵀ b_U, b_U not
    normalised (pass 1 has all of b_i only as row i ends), so σ_U = ‖z_U‖ / ‖b_U‖; where ‖b_U‖ is so small that its
    terms could be subnormal (or z_U overflowed), every rank repeats pass 2 with y_U = c b_U / ‖b_U‖.

    On more than one rank the all-reduces run while the rank works on the matrices it holds whole
    (:func:`_overlapped_pieces_step`): the same results."""
    advance_steps_([step])
    t = float(step)
    idx = [i for i, v in enumerate(weight_vectors) if v is not None]
    group = parts[idx[0]].layout.group
    plan = _pieces_plan(work, flat.numel(), [parts[i] for i in idx])
    buffer = work.get(torch.float32, flat.numel())
    if OVERLAP_ALLREDUCES and not _one_rank(group):  # (also where this rank holds no matrix whole: every rank makes
        # the same all-reduces)
        return _overlapped_pieces_step(kernel, flat, grad, exp_avg, exp_avg_sq, buffer, plan, weight_vectors,
                                       update_vectors, sigma, group, work, t=t, lr=lr, beta1=beta1, beta2=beta2,
                                       eps=eps, weight_decay=weight_decay, tau=tau)
    passes = _Passes(
        lambda x_w, x_u, kept: kernel.pieces_pass1(flat, grad, exp_avg, exp_avg_sq, buffer, *plan.pieces, *plan.gaps,
                                                   x_w, x_u, 1 - beta1**t, 1 - beta2**t, beta1, beta2, eps, kept),
        lambda *vectors_kept_z_full: kernel.pieces_pass2(flat, buffer, *plan.pieces, *vectors_kept_z_full),
    )
    w_vecs, u_vecs = [weight_vectors[i] for i in idx], [update_vectors[i] for i in idx]
    both, x_w = _power_step(kernel, passes, plan, w_vecs, u_vecs, work.products.pop(flat, _NO_PRODUCT), sigma, group)
    ratio, sigma_w, sigma_u, lrs = _capped_stats(work, weight_vectors, both, lr=lr, tau=tau)
    work.products[flat] = kernel.pieces_update(flat, buffer, *plan.pieces, lrs, *plan.gaps, lr, weight_decay, x_w)
    return ratio, sigma_w, sigma_u


#: Whether the fused pieces step on more than one rank overlaps its all-reduces with the matrices each rank holds
#: whole (:func:`_overlapped_pieces_step`); False takes :func:`_power_step`'s order, bit for bit the same results
#: (tests compare the two).
OVERLAP_ALLREDUCES = True


def _overlapped_pieces_step(kernel, flat: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, buffer: Tensor,
                            plan: _PiecesPlan, weight_vectors: list[Tensor | None], update_vectors: list[Tensor | None],
                            sigma: ShardedSigma, group, work: WorkBuffer, *, t: float, lr: float, beta1: float,
                            beta2: float, eps: float, weight_decay: float, tau: float) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_fused_pieces_step` on more than one rank, with each all-reduce running while this rank steps the
    matrices it holds whole (most of a ZeRO partition; the others are cut at its ends):

    1. pass 1 on every piece; start the all-reduce of the long products b;
    2. the whole matrices' pass 2 from this rank's own b: the reduced b of a whole matrix is the owner's plus zeros, so
       it differs at most in the sign of a zero, which cannot change a product sum that starts from +0 — the same
       z, σ and x. A stale kept product or an unsafe unnormalised b_U is repeated here alone (no collective: the
       repeat every rank would make for these matrices), and their σ's and lrs follow;
    3. wait; the other pieces' pass 2 from the reduced b; start the all-reduce of z, with the guards c this rank used
       for its whole matrices (the other ranks cannot know them after a local repeat) and a flag per matrix it owns;
    4. the update of the whole matrices and of the gaps, with their next B_W x_W;
    5. wait; the other matrices' checks and repeats from reduced values (every rank alike), every σ and x from the
       reduced z and the guards, the rest of the update.

    The passes over part of the pieces give each task the partial sums it has in a pass over all
    (``for_task_slots``), so products, kept product and checks are bit for bit those of :func:`_power_step`'s steps."""
    idx = [i for i, v in enumerate(weight_vectors) if v is not None]
    w_vecs, u_vecs = [weight_vectors[i] for i in idx], [update_vectors[i] for i in idx]
    k, hs = len(w_vecs), plan.short_sizes_total // 2
    whole, rest, pieces = plan.whole, plan.rest, plan.pieces
    kept = work.products.pop(flat, _NO_PRODUCT)
    x = torch.cat(w_vecs + u_vecs)
    x_w, x_u = x[:hs], x[hs:]

    # 1. pass 1 everywhere; the long products' all-reduce starts
    b, z = kernel.pieces_pass1(flat, grad, exp_avg, exp_avg_sq, buffer, *pieces, *plan.gaps, x_w, x_u, 1 - beta1**t,
                               1 - beta2**t, beta1, beta2, eps, kept)
    own = b.clone()
    pending = sigma.all_reduce_start(b, group)

    # 2. the whole matrices from this rank's own products
    own_w, own_u, c_own_w, norm_own_u = _pass2_inputs(kernel, plan, own, k)
    fresh = kernel.pieces_pass2_of(flat, buffer, *pieces, own_w, own_u, x_w, kept, z, False, whole)
    c_own = torch.cat([c_own_w, norm_own_u])
    stale_own = z[-1].item() > 0
    if stale_own or not _unscaled_u_safe(kernel, norm_own_u, z[hs:-1], plan, plan.whole_matrices):
        if stale_own:  # the kept B_W x_W is not that of these weights: pass 2's own
            own_w = fresh
            c_own_w = kernel.segments_unit_scaled_(own_w, plan.long_sizes[:k])
        c_own = torch.cat([c_own_w, kernel.segments_unit_scaled_(own_u, plan.long_sizes[k:])])
        z[:-1].masked_fill_(plan.whole_short, 0.0)
        kernel.pieces_pass2_of(flat, buffer, *pieces, own_w, own_u, x_w, _NO_PRODUCT, z, True, whole)
    z_own, x_own = z[:-1].clone(), x.clone()  # (segments_sigma_ normalises its z: a copy)
    _, _, _, lrs_own = _capped_stats(work, weight_vectors,
                                     kernel.segments_sigma_(z_own.clone(), plan.short_sizes, c_own, x_own), lr=lr,
                                     tau=tau)

    # 3. the other pieces from the reduced products; z's all-reduce starts, with the guards of the whole matrices
    pending.wait()
    b_w, b_u, c_w, norm_u = _pass2_inputs(kernel, plan, b, k)
    z[-1] = 0.0
    fresh = kernel.pieces_pass2_of(flat, buffer, *pieces, b_w, b_u, x_w, kept, z, False, rest)
    owned = plan.whole_matrices
    payload = torch.cat([z, torch.where(torch.cat([owned, owned]), c_own, 0.0), owned.float()])
    pending = sigma.all_reduce_start(payload, group)

    # 4. the whole matrices' update, and the gaps'
    next_own = kernel.pieces_update_of(flat, buffer, *pieces, lrs_own, *plan.gaps, lr, weight_decay, x_own[:hs], whole)

    # 5. the other matrices: checks and repeats (from reduced values: every rank alike), then every σ and x
    pending.wait()
    z = payload[: 2 * hs + 1]
    owners = payload[-k:] > 0  # matrices some rank holds whole: their z and guards are the owner's
    c_owned = payload[2 * hs + 1 : 2 * hs + 1 + 2 * k]
    c = torch.cat([c_w, norm_u])
    stale = z[-1].item() > 0
    if stale or not _unscaled_u_safe(kernel, norm_u, z[hs:-1], plan, ~owners):
        if stale:
            b_w = fresh
            sigma.all_reduce_(b_w, group)
            c_w = kernel.segments_unit_scaled_(b_w, plan.long_sizes[:k])
        c = torch.cat([c_w, kernel.segments_unit_scaled_(b_u, plan.long_sizes[k:])])
        z = torch.where(plan.whole_short_with_flag, torch.cat([z_own, z.new_zeros(1)]), 0.0)  # the owner's own again
        kernel.pieces_pass2_of(flat, buffer, *pieces, b_w, b_u, x_w, _NO_PRODUCT, z, True, rest)
        sigma.all_reduce_(z, group)
    c = torch.where(torch.cat([owners, owners]), c_owned, c)
    both = kernel.segments_sigma_(z[:-1], plan.short_sizes, c, x)
    torch._foreach_copy_(w_vecs + u_vecs, list(x.split(plan.short_sizes)))
    ratio, sigma_w, sigma_u, lrs = _capped_stats(work, weight_vectors, both, lr=lr, tau=tau)
    next_rest = kernel.pieces_update_of(flat, buffer, *pieces, lrs, [], [], lr, weight_decay, x[:hs], rest)
    work.products[flat] = torch.where(plan.whole_long_w, next_own, next_rest)
    return ratio, sigma_w, sigma_u


def _fused_shards_step(
    kernel,
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    parts: list[list[Part]],
    weight_vectors: list[Tensor | None],
    update_vectors: list[Tensor | None],
    sigma: ShardedSigma,
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
    """The fused pieces step on shards, one unit per parameter (FSDP2 on the CPU): the capped ones through the pieces
    kernel's ``shards_*`` passes (each shard its own tensors, U in one work buffer), the others through torch's fused
    AdamW. The capped units' step counters must agree (one bias correction per call); else the eager step runs."""
    idx = [i for i, v in enumerate(weight_vectors) if v is not None]
    if len({float(steps[i]) for i in idx}) > 1:  # (step counters live on the CPU)
        return _eager_step(params, grads, exp_avgs, exp_avg_sqs, steps, parts, weight_vectors, update_vectors, lr=lr,
                           beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, tau=tau,
                           power_iters=power_iters, sigma=sigma, sigma_mode="vector_reduce", work=work,
                           no_host_reads=False)
    advance_steps_(steps)
    _adamw_uncapped(params, grads, exp_avgs, exp_avg_sqs, steps, weight_vectors, lr=lr, beta1=beta1, beta2=beta2,
                    eps=eps, weight_decay=weight_decay)
    if not idx:
        n = len(params)
        return torch.ones(n), torch.zeros(n), torch.zeros(n)
    t = float(steps[idx[0]])
    capped_parts = [parts[i][0] for i in idx]
    group = capped_parts[0].layout.group
    plan = _pieces_plan(work, None, capped_parts)
    buffer = work.get(torch.float32, max(1, sum(plan.pieces[1])))
    ps, gs = [params[i] for i in idx], [grads[i] for i in idx]
    ms, vs = [exp_avgs[i] for i in idx], [exp_avg_sqs[i] for i in idx]
    passes = _Passes(
        lambda x_w, x_u, kept: kernel.shards_pass1(ps, gs, ms, vs, buffer, *plan.pieces, x_w, x_u, 1 - beta1**t,
                                                   1 - beta2**t, beta1, beta2, eps, kept),
        lambda *vectors_kept_z_full: kernel.shards_pass2(ps, buffer, *plan.pieces, *vectors_kept_z_full),
    )
    key = capped_parts[0].param  # the first capped parameter: the kept product's owner (a stable object)
    w_vecs, u_vecs = [weight_vectors[i] for i in idx], [update_vectors[i] for i in idx]
    both, x_w = _power_step(kernel, passes, plan, w_vecs, u_vecs, work.products.pop(key, _NO_PRODUCT), sigma, group)
    ratio, sigma_w, sigma_u, lrs = _capped_stats(work, weight_vectors, both, lr=lr, tau=tau)
    work.products[key] = kernel.shards_update(ps, buffer, *plan.pieces, lrs, weight_decay, x_w)
    return ratio, sigma_w, sigma_u


def _pass2_inputs(kernel, plan: _PiecesPlan, b: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pass 2's inputs from the long products b = [b_W | b_U] of ``k`` matrices: y_W = c b_W / ‖b_W‖ (in place) with
    the guards c, and b_U as it is with ‖b_U‖ (U's z is B_Uᵀ b_U, unnormalised: σ_U = ‖z_U‖ / ‖b_U‖)."""
    b_w, b_u = b[: plan.long_sizes_total // 2], b[plan.long_sizes_total // 2 :]
    return b_w, b_u, kernel.segments_unit_scaled_(b_w, plan.long_sizes[:k]), kernel.segments_norm(b_u, plan.long_sizes[k:])


class _Passes(NamedTuple):
    """The first two passes of the pieces kernel on one layout: ``pass1(x_w, x_u, kept) -> (b, z)`` and
    ``pass2(y_w, y_u, x_w, kept, z, full) -> fresh``."""

    pass1: Callable
    pass2: Callable


def _power_step(kernel, passes: _Passes, plan: _PiecesPlan, w_vecs: list[Tensor], u_vecs: list[Tensor], kept: Tensor,
                sigma: ShardedSigma, group) -> tuple[Tensor, Tensor]:
    """The power step of the pieces kernel's passes 1 and 2 with the reductions over ``group`` between them (none
    on a group of one rank: the sum is the tensor): σ_W and σ_U of every capped matrix (concatenated), and x_W after
    it (the vectors are updated in place). ``kept``: the partial B_W x_W the last update kept (or an empty tensor)."""
    reduce_ = _no_reduce if _one_rank(group) else sigma.all_reduce_
    x = torch.cat(w_vecs + u_vecs)
    k, half_short, half_long = len(w_vecs), plan.short_sizes_total // 2, plan.long_sizes_total // 2
    x_w, x_u = x[:half_short], x[half_short:]

    # pass 1: moments, U, B_U x_U (and B_W x_W where none was kept), and U's whole power step on tall pieces of whole
    # rows: z_U = B_Uᵀ b_U row by row. All-reduce the long products; y_W = c b_W / ‖b_W‖ per matrix.
    b, z = passes.pass1(x_w, x_u, kept)
    local_bw = b[:half_long].clone() if kept.numel() != half_long else None  # this rank's own, for a repeat
    reduce_(b, group)
    b_w, b_u, c_w, norm_u = _pass2_inputs(kernel, plan, b, k)

    # pass 2: B_Wᵀ y_W, the B_Uᵀ b_U pass 1 left (wide or split pieces), and whether the kept B_W x_W is still that of
    # the weights and x_W; all-reduce
    fresh = passes.pass2(b_w, b_u, x_w, kept, z, False)
    reduce_(z, group)
    c = torch.cat([c_w, norm_u])
    stale = z[-1].item() > 0  # a reduced flag: the kept B_W x_W is not that of the weights now on some rank
    if stale or not _unscaled_u_safe(kernel, norm_u, z[half_short:-1]):
        # every rank repeats pass 2 with y = c b / ‖b‖ for W and U, as the eager step computes them
        if stale:
            b_w = fresh if local_bw is None else local_bw
            reduce_(b_w, group)
            c_w = kernel.segments_unit_scaled_(b_w, plan.long_sizes[:k])
        c = torch.cat([c_w, kernel.segments_unit_scaled_(b_u, plan.long_sizes[k:])])
        z = torch.zeros_like(z)
        passes.pass2(b_w, b_u, x_w, _NO_PRODUCT, z, True)
        reduce_(z, group)
    both = kernel.segments_sigma_(z[:-1], plan.short_sizes, c, x)  # σ = ‖z‖ / c; x ← z / ‖z‖ where σ > 0
    torch._foreach_copy_(w_vecs + u_vecs, list(x.split(plan.short_sizes)))
    return both, x_w


_NO_PRODUCT = torch.zeros(0)


def _one_rank(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) == 1


def _no_reduce(t: Tensor, group) -> None:
    pass


_UNSCALED_MIN = 2.0**-40  # ‖b‖ below this: B_Uᵀ b could have subnormal terms that matter


def _unscaled_u_safe(kernel, norm_u: Tensor, z_u: Tensor, plan: _PiecesPlan | None = None,
                     matrices: Tensor | None = None) -> bool:
    """Whether z_U = B_Uᵀ b_U, taken without normalising b_U, is as good as B_Uᵀ (b_U / ‖b_U‖): no ‖b_U‖ in
    (0, 2⁻⁴⁰) (the terms b_i U_ij could be subnormal; 0 and non-finite norms give σ = 0 either way) and no
    overflow in z_U (not finite where ‖b_U‖ is). From reduced values: the same answer on every rank. ``matrices``
    (a bool per matrix of ``plan``): of those matrices only."""
    if matrices is not None:
        norm_u, z_u = norm_u[matrices], z_u[plan.segment_mask(matrices)]
    norms = norm_u.tolist()
    if any(0.0 < n < _UNSCALED_MIN for n in norms):
        return False
    return kernel.all_finite(z_u) or not all(math.isfinite(n) for n in norms)


class _PiecesPlan:
    """What the fused pieces step passes its kernel for one layout: the pieces' (offsets, starts, numels, rows, cols)
    of a flat partition (``numel`` its size) and its gaps' (offsets, numels) — or, ``numel`` None, the pieces'
    (starts, numels, rows, cols) of shards that are tensors of their own — and the vector segments [W's | U's] of the
    short and the long side."""

    def __init__(self, numel: int | None, parts: list[Part]) -> None:
        dims = [part.layout.dims for part in parts]
        starts, rows, cols = [part.layout.start for part in parts], [m for m, _ in dims], [n for _, n in dims]
        self.gaps: tuple = ()
        if numel is None:
            self.pieces: tuple = (starts, [part.layout.numel for part in parts], rows, cols)
        else:
            offsets, numels = [part.offset for part in parts], [part.numel for part in parts]
            self.pieces = (offsets, starts, numels, rows, cols)
            gaps = uncovered(numel, list(zip(offsets, numels)))
            self.gaps = ([g[0] for g in gaps], [g[1] for g in gaps])
        self.short_sizes = [min(m, n) for m, n in dims] * 2
        self.long_sizes = [max(m, n) for m, n in dims] * 2
        self.short_sizes_total, self.long_sizes_total = sum(self.short_sizes), sum(self.long_sizes)
        # the matrices this rank holds whole and the others (a 0/1 per piece for the kernel); the whole ones as masks
        # of the vectors' elements: the short side [W | U] with pass 2's flag after it, and the long side of W
        self.whole = [int(part.layout.start == 0 and part.layout.numel == m * n > 0) for part, (m, n) in zip(parts, dims)]
        self.rest = [1 - w for w in self.whole]
        self.whole_matrices = torch.tensor(self.whole, dtype=torch.bool)
        self.whole_short = self.segment_mask(self.whole_matrices, both=True)
        self.whole_short_with_flag = torch.cat([self.whole_short, torch.zeros(1, dtype=torch.bool)])
        k = len(parts)
        self.whole_long_w = self.whole_matrices.repeat_interleave(torch.tensor(self.long_sizes[:k], dtype=torch.long))

    def segment_mask(self, matrices: Tensor, both: bool = False) -> Tensor:
        """The elements of one half of the short vectors (``both``: of [W | U]) that belong to ``matrices``."""
        k = len(self.short_sizes) // 2
        sizes = torch.tensor(self.short_sizes[: 2 * k if both else k], dtype=torch.long)
        return (torch.cat([matrices, matrices]) if both else matrices).repeat_interleave(sizes)


def _pieces_plan(work: WorkBuffer, numel: int | None, parts: list[Part]) -> _PiecesPlan:
    """The plan of a partition of ``numel`` elements (None: of shards) holding these capped parts, made once per
    layout."""
    key = ("pieces", numel, tuple((p.offset, p.numel, p.layout.start, p.layout.numel, p.layout.dims) for p in parts))
    return work.constant(key, lambda: _PiecesPlan(numel, parts))
