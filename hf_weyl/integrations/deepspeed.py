"""AdamW² on DeepSpeed ZeRO's flat fp32 partitions (stages 1, 2 and 3), chosen automatically.

Under ZeRO the optimizer no longer holds the model's parameters: each param group holds one flat
fp32 partition per rank (per sub-group for stage 3), and a weight matrix W (m×n, row-major) may be
split across ranks. Each rank holds one contiguous piece ``W.flatten()[s : s + c]`` (possibly
empty). The elementwise parts of AdamW² (moments, direction U, the update) work on the flat
partition unchanged; only σ1(W) and σ1(U) need the pieces brought together. Two ways:

* ``vector_reduce`` (default): distributed power iteration. With B = W if n ≤ m else Wᵀ and a unit
  x ∈ R^{min(m,n)} identical on every rank, each rank multiplies only its piece,
  Bx = Σ_r B_r x and Bᵀy = Σ_r B_rᵀ y, and the partial vectors of *all* matrices (W and U) are
  summed with one all-reduce per half-step: 2 all-reduces of Σ_j 2(m_j + n_j) floats per iteration.
* ``gather``: all-gather every matrix and its update, then run the single-process
  :func:`hf_weyl.core.power_iteration.power_iteration_` on the full matrices: 1 all-gather of the local
  pieces (≈ 2N/world floats per rank) plus a tiny one of the piece addresses.

Both give the single-process σ's (``gather`` bit for bit, ``vector_reduce`` up to summation order).
Every rank makes the same collectives in the same order (a rank without a piece contributes
zeros); the only control-flow decisions taken here (skip on non-finite gradients, cold start)
come from reduced or replicated values.

Where the pieces are comes from DeepSpeed's own bookkeeping (private API, tested with
``TESTED_DEEPSPEED``): ``param._hp_mapping`` / ``param._dp_group`` for ZeRO-1/2 and the BF16
optimizer; for ZeRO-3 the sub-group's flat tensor ``ds_id`` ("first_last" parameter ds_id) and each
parameter's ``partition_numel()`` (rank r holds elements [r·p, (r+1)·p) of the flattened tensor).
If the mapping cannot be found or does not check out, we raise rather than fall back to AdamW on
flat chunks.

The power-iteration vectors are replicated on every rank and stored in the state of the flat
partition under ``zero_weyl``: a dict holding one 2-D fp32 tensor (``"vectors"``, row 0 for W,
row 1 for U) and the vector lengths (``"lengths"``, a list of ints). DeepSpeed checkpoints keep it
(bit-identical resume). It is a dict, not a tensor, on purpose: universal-checkpoint conversion
(``ds_to_universal``) cuts every *tensor* of a flat partition's state at the partition padding,
which would break a (2, Σk) tensor, while it passes other values through and extracts only
``exp_avg``, ``exp_avg_sq``, fp32 weights and ``step``. After loading a universal checkpoint (e.g.
on another number of ranks) the vectors are therefore absent and start cold (``cold_start_iters``
iterations); everything else continues exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..core.functional import adam_direction, adam_moments_, apply_capped_update_, cap_ratio, is_capped
from ..core.power_iteration import as_matrix, initial_vector, power_iteration_, vector_length

__all__ = [
    "COMM_STATS",
    "SIGMA_MODES",
    "TESTED_DEEPSPEED",
    "ZeroLayout",
    "check_deepspeed_config",
    "check_active_deepspeed_config",
    "comm_bytes_per_step",
    "is_zero_partition",
    "zero_layout",
    "zero_step",
]

#: σ modes under ZeRO (``sigma_mode`` option of ``AdamWeyl``).
SIGMA_MODES = ("vector_reduce", "gather")

#: DeepSpeed versions whose private bookkeeping (``_hp_mapping``, stage-3 ``ds_id``) we rely on:
#: [low, high). Others raise unless ``HF_WEYL_ALLOW_UNTESTED_DEEPSPEED=1``.
TESTED_DEEPSPEED = ((0, 19), (0, 20))

#: Optimizer-state key of the power-iteration vectors on each flat partition (see the module doc).
VECTORS_KEY = "zero_weyl"

_TINY = torch.finfo(torch.float32).tiny


@dataclass
class _Comm:
    """Payload bytes this process handed to collectives in the ZeRO path (for benchmarks)."""

    bytes: int = 0
    calls: int = 0

    def add(self, t: Tensor) -> None:
        self.bytes += t.numel() * t.element_size()
        self.calls += 1

    def reset(self) -> None:
        self.bytes = 0
        self.calls = 0


COMM_STATS = _Comm()


# --------------------------------------------------------------------------------------------
# start-up checks
# --------------------------------------------------------------------------------------------


def check_deepspeed_config(config: dict[str, Any]) -> None:
    """Refuse DeepSpeed configurations AdamWeyl cannot honour (ValueError saying why and what to change)."""
    zero = config.get("zero_optimization") or {}
    device = (zero.get("offload_optimizer") or {}).get("device", "none")
    if device not in (None, "none"):
        raise ValueError(
            f"AdamWeyl cannot run with zero_optimization.offload_optimizer.device={device!r}: with optimizer "
            "offload, accelerate and the HF Trainer replace a client optimizer by DeepSpeedCPUAdam "
            "(zero_force_ds_cpu_optimizer), which would silently train plain AdamW without the AdamW² cap, and "
            "the offloaded ZeRO path is untested. Remove 'offload_optimizer' (or set its device to 'none'); "
            "ZeRO-3 sharding already divides optimizer memory by the number of ranks."
        )
    if zero.get("round_robin_gradients") in (True, "true"):
        raise ValueError(
            "AdamWeyl cannot run with zero_optimization.round_robin_gradients=true: in DeepSpeed "
            f"{'.'.join(map(str, TESTED_DEEPSPEED[0]))}.x the reordered fragment mapping (param._hp_mapping) "
            "can point at the wrong part of the flat partition, so per-matrix σ's would be computed on the "
            "wrong weights. Set round_robin_gradients to false."
        )


def check_active_deepspeed_config() -> None:
    """Run :func:`check_deepspeed_config` on the DeepSpeed config already announced by the HF Trainer
    (``TrainingArguments(deepspeed=...)``) or by accelerate (``DeepSpeedPlugin``), if any."""
    try:
        from transformers.integrations.deepspeed import deepspeed_config

        cfg = deepspeed_config()
        if cfg:
            check_deepspeed_config(cfg)
    except ImportError:
        pass
    try:
        from accelerate.state import AcceleratorState

        plugins = AcceleratorState._shared_state.get("deepspeed_plugins")
        if plugins:
            for plugin in plugins.values() if isinstance(plugins, dict) else [plugins]:
                cfg = getattr(plugin, "deepspeed_config", None)
                if cfg:
                    check_deepspeed_config(cfg)
    except ImportError:
        pass


def _check_deepspeed_version() -> None:
    import deepspeed

    parts = tuple(int(x) for x in deepspeed.__version__.split("+")[0].split(".")[:2])
    low, high = TESTED_DEEPSPEED
    if not (low <= parts < high) and os.environ.get("HF_WEYL_ALLOW_UNTESTED_DEEPSPEED") != "1":
        raise RuntimeError(
            f"AdamWeyl's ZeRO path reads DeepSpeed's private fragment bookkeeping and is tested with DeepSpeed "
            f">={low[0]}.{low[1]},<{high[0]}.{high[1]}; found {deepspeed.__version__}. Install a tested version or "
            "set HF_WEYL_ALLOW_UNTESTED_DEEPSPEED=1 to try anyway (the mapping is still checked at run time)."
        )


# --------------------------------------------------------------------------------------------
# where each matrix's piece lives
# --------------------------------------------------------------------------------------------


@dataclass
class ZeroLayout:
    """This rank's pieces of a flat partition's parameters, in the same order on every rank.

    ``offsets[i]``: start of ``params[i]``'s piece in the flat partition; ``starts[i]``: start of the
    piece in the flattened parameter; ``numels[i]``: its length (0 where this rank holds none).
    """

    params: list[Tensor]
    shapes: list[torch.Size]
    offsets: list[int]
    starts: list[int]
    numels: list[int]
    group: Any  # the process group to reduce over
    stage: int


def _optimized(p: Tensor) -> bool:
    numel = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
    return p.requires_grad and numel > 0


def is_zero_partition(flat: Tensor, original_ids: set[int]) -> bool:
    """True when a group's tensor is not one of the parameters it was built with (DeepSpeed replaced them).

    ``original_ids`` are the ``id()``s of those parameters (a set: this runs on every step)."""
    return id(flat) not in original_ids


def _same_storage(view: Tensor, flat: Tensor) -> bool:
    return view.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()


def _zero12_layout(flat: Tensor, params: list[Tensor]) -> ZeroLayout:
    offsets, starts, numels = [], [], []
    for p in params:
        mapping = p._hp_mapping
        if mapping is None:
            offsets.append(0), starts.append(0), numels.append(0)
            continue
        if not _same_storage(mapping.hp_fragment, flat):
            raise RuntimeError(
                f"AdamWeyl (ZeRO-1/2): the fragment of a parameter of shape {tuple(p.shape)} does not live in the flat "
                "partition the optimizer was given (optimizer offload or an unsupported DeepSpeed version?)"
            )
        offsets.append(int(mapping.hp_fragment_address.start))
        starts.append(int(mapping.lp_fragment_address.start))
        numels.append(int(mapping.lp_fragment_address.numel))
    groups = {id(p._dp_group) for p in params}
    if len(groups) != 1:
        raise RuntimeError("AdamWeyl (ZeRO-1/2): the parameters of one param group have different data-parallel groups")
    return ZeroLayout(params, [p.shape for p in params], offsets, starts, numels, params[0]._dp_group, stage=2)


def _zero3_layout(flat: Tensor, params: list[Tensor]) -> ZeroLayout:
    ds_id = str(getattr(flat, "ds_id", ""))
    first, _, last = ds_id.partition("_")
    ids = [str(p.ds_id) for p in params]
    if first not in ids or last not in ids:
        raise RuntimeError(
            f"AdamWeyl (ZeRO-3): cannot find the parameters of the flat sub-group {ds_id!r} among the optimizer's "
            "parameters; unsupported DeepSpeed version?"
        )
    sub = params[ids.index(first) : ids.index(last) + 1]
    if sum(p.partition_numel() for p in sub) != flat.numel():
        raise RuntimeError(
            f"AdamWeyl (ZeRO-3): sub-group {ds_id!r} has {flat.numel()} elements but its parameters' partitions "
            f"add up to {sum(p.partition_numel() for p in sub)}; unsupported DeepSpeed version?"
        )
    group = sub[0].ds_process_group
    rank = dist.get_rank(group)
    offsets, starts, numels, offset = [], [], [], 0
    for p in sub:
        part = p.partition_numel()
        start = rank * part
        offsets.append(offset)
        starts.append(start)
        numels.append(max(0, min(part, p.ds_numel - start)))
        offset += part
    return ZeroLayout(sub, [p.ds_shape for p in sub], offsets, starts, numels, group, stage=3)


def zero_layout(flat: Tensor, originals: list[Tensor]) -> ZeroLayout:
    """The layout of a DeepSpeed flat fp32 partition built from the group's original parameters; raises if unknown."""
    _check_deepspeed_version()
    params = [p for p in originals if _optimized(p)]
    if params and all(hasattr(p, "ds_id") for p in params) and hasattr(flat, "ds_id"):
        z3 = next((p._z3_optimizer for p in params if getattr(p, "_z3_optimizer", None) is not None), None)
        if z3 is not None and getattr(z3, "offload_optimizer", False):  # bare deepspeed.initialize lets it through
            check_deepspeed_config({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})
        return _zero3_layout(flat, params)
    if params and all(hasattr(p, "_hp_mapping") and hasattr(p, "_dp_group") for p in params):
        zero_opt = next((p._zero_optimizer for p in params if getattr(p, "_zero_optimizer", None) is not None), None)
        if zero_opt is not None:
            if getattr(zero_opt, "cpu_offload", False):
                check_deepspeed_config({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})
            if getattr(zero_opt, "round_robin_gradients", False):
                check_deepspeed_config({"zero_optimization": {"round_robin_gradients": True}})
        return _zero12_layout(flat, params)
    raise RuntimeError(
        f"AdamWeyl: a param group holds a tensor of shape {tuple(flat.shape)} that is not one of the parameters the "
        "optimizer was built with, and no DeepSpeed ZeRO fragment mapping (param._hp_mapping or ZeRO-3 ds_id) was "
        "found for the group's parameters. Refusing to fall back to AdamW on flattened chunks, which would compute "
        "σ1 of the wrong matrices. Build AdamWeyl on the model's parameters and pass it to deepspeed.initialize / "
        "accelerate / the HF Trainer unchanged."
    )


def _check_mapping(layout: ZeroLayout, flat: Tensor) -> None:
    """ZeRO-1/2 only, first step: each fp32 fragment must hold its low-precision parameter's values."""
    for p, off, start, numel in zip(layout.params, layout.offsets, layout.starts, layout.numels):
        if numel == 0:
            continue
        hp = flat.narrow(0, off, numel)
        lp = p.detach().reshape(-1).narrow(0, start, numel)
        if not torch.equal(hp.to(lp.dtype), lp):
            raise RuntimeError(
                f"AdamWeyl (ZeRO-{layout.stage}): DeepSpeed's fragment mapping of a parameter of shape "
                f"{tuple(p.shape)} does not match the fp32 partition (known with round_robin_gradients); refusing to "
                "compute σ's on the wrong weights"
            )


# --------------------------------------------------------------------------------------------
# products of a contiguous row-major piece
# --------------------------------------------------------------------------------------------


def _split_piece(piece: Tensor, start: int, n: int):
    """Split a row-major piece starting at element ``start`` of an (m×n) matrix into
    (head row, head col, head values), (first full row, full rows as q×n), (tail row, tail values)."""
    count = piece.numel()
    h = min((-start) % n, count)
    r0, c0 = divmod(start, n)
    rest = piece[h:]
    r1 = (start + h) // n
    q = rest.numel() // n
    return (r0, c0, piece[:h]), (r1, rest[: q * n].view(q, n)), (r1 + q, rest[q * n :])


def _matvec(split, m: int, v: Tensor) -> Tensor:
    """Partial A·v (length m) from this rank's piece of A."""
    (r0, c0, head), (r1, mid), (r2, tail) = split
    out = torch.zeros(m, dtype=torch.float32, device=v.device)
    if head.numel():
        out[r0] += torch.dot(head, v[c0 : c0 + head.numel()])
    if mid.shape[0]:
        out[r1 : r1 + mid.shape[0]] += mid @ v
    if tail.numel():
        out[r2] += torch.dot(tail, v[: tail.numel()])
    return out


def _rmatvec(split, n: int, w: Tensor) -> Tensor:
    """Partial Aᵀ·w (length n) from this rank's piece of A."""
    (r0, c0, head), (r1, mid), (r2, tail) = split
    out = torch.zeros(n, dtype=torch.float32, device=w.device)
    if head.numel():
        out[c0 : c0 + head.numel()] += head * w[r0]
    if mid.shape[0]:
        out += mid.t() @ w[r1 : r1 + mid.shape[0]]
    if tail.numel():
        out[: tail.numel()] += tail * w[r2]
    return out


def _all_reduce(t: Tensor, group: Any, op=dist.ReduceOp.SUM) -> None:
    COMM_STATS.add(t)
    dist.all_reduce(t, op=op, group=group)


def _sigma_vector_reduce(
    pieces: list[Tensor], starts: list[int], dims: list[tuple[int, int]], vectors: list[Tensor], iters: int, group: Any
) -> Tensor:
    """σ1 of each distributed matrix by power iteration; only the m-/n-vectors are all-reduced (batched).

    Mirrors :func:`hf_weyl.core.power_iteration.power_iteration_` (short side, warm start, never NaN).
    """
    splits = [_split_piece(p, s, n) for p, s, (m, n) in zip(pieces, starts, dims)]
    tall = [n <= m for m, n in dims]  # B = A (x ∈ R^n) if tall else Aᵀ (x ∈ R^m)
    sigmas = torch.zeros(len(dims), dtype=torch.float32, device=vectors[0].device if vectors else None)
    for _ in range(iters):
        bx = [_matvec(sp, m, x) if t else _rmatvec(sp, n, x) for sp, (m, n), t, x in zip(splits, dims, tall, vectors)]
        buf = torch.cat(bx)
        _all_reduce(buf, group)
        ys = [v / v.norm().clamp_min(_TINY) for v in buf.split([b.numel() for b in bx])]
        bty = [_rmatvec(sp, n, y) if t else _matvec(sp, m, y) for sp, (m, n), t, y in zip(splits, dims, tall, ys)]
        buf = torch.cat(bty)
        _all_reduce(buf, group)
        zs = buf.split([b.numel() for b in bty])
        sigmas = torch.stack([z.norm() for z in zs])
        ok = (sigmas > 0) & torch.isfinite(sigmas)
        for x, z, s, good in zip(vectors, zs, sigmas.clamp_min(_TINY), ok):
            x.copy_(torch.where(good, z / s, x))
    return torch.nan_to_num(sigmas, nan=0.0, posinf=0.0)


def _all_gather(t: Tensor, group: Any) -> list[Tensor]:
    COMM_STATS.add(t)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return out


def _sigma_gather(
    pieces: list[Tensor], starts: list[int], shapes: list[torch.Size], vectors: list[Tensor], iters: int, group: Any
) -> Tensor:
    """σ1 of each distributed matrix: all-gather the pieces, then the single-process power iteration."""
    device = vectors[0].device
    meta = torch.tensor([[s, p.numel()] for s, p in zip(starts, pieces)], dtype=torch.int64, device=device).reshape(-1, 2)
    metas = _all_gather(meta, group)
    sizes = [int(m[:, 1].sum()) for m in metas]
    local = torch.cat(pieces).to(device=device, dtype=torch.float32)
    local = torch.cat([local, local.new_zeros(max(sizes) - local.numel())])
    chunks = _all_gather(local, group)
    fulls = [torch.zeros(torch.Size(shape).numel(), dtype=torch.float32, device=device) for shape in shapes]
    for rank_meta, chunk in zip(metas, chunks):
        pos = 0
        for full, (start, numel) in zip(fulls, rank_meta.tolist()):
            full[start : start + numel] = chunk[pos : pos + numel]
            pos += numel
    return power_iteration_([as_matrix(f.view(shape)) for f, shape in zip(fulls, shapes)], vectors, iters)


# --------------------------------------------------------------------------------------------
# the step
# --------------------------------------------------------------------------------------------


def _dims(shape: torch.Size) -> tuple[int, int]:
    if len(shape) >= 2:
        return int(shape[0]), int(torch.Size(shape[1:]).numel())
    return 1, int(torch.Size(shape).numel())


def _vectors(state: dict[str, Any], lengths: list[int], device: torch.device) -> tuple[Tensor, bool]:
    """The (2, Σk) replicated vector buffer; re-initialised (cold) when missing or laid out differently."""
    saved = state.get(VECTORS_KEY)
    if isinstance(saved, dict) and [int(k) for k in saved.get("lengths", ())] == lengths:
        vectors = saved["vectors"]
        if vectors.device != device or vectors.dtype != torch.float32:  # e.g. loaded onto the CPU
            saved["vectors"] = vectors = vectors.to(device=device, dtype=torch.float32)
        return vectors, False
    row = torch.cat([initial_vector(k) for k in lengths]) if lengths else torch.zeros(0)
    vectors = torch.stack([row, row.clone()]).to(device)
    state[VECTORS_KEY] = {"vectors": vectors, "lengths": list(lengths)}
    return vectors, True


@torch.no_grad()
def zero_step(optimizer: Any, group: dict[str, Any], flat: Tensor, layout: ZeroLayout, first_call: bool):
    """One AdamW² step on a DeepSpeed flat fp32 partition. Returns (params, ratio, σ_W, σ_U, capped) or
    None when the step was skipped because some rank's gradient is non-finite (all ranks skip together)."""
    if flat.grad is None:
        raise RuntimeError("AdamWeyl (ZeRO): the flat fp32 partition has no gradient at step time")
    if layout.stage != 3 and first_call:
        _check_mapping(layout, flat)
    grad = flat.grad
    bad = (~torch.isfinite(grad)).any().to(torch.float32).reshape(1)
    _all_reduce(bad, layout.group, op=dist.ReduceOp.MAX)
    if bad.item() > 0:
        return None

    state = optimizer.state[flat]
    if len(state) == 0:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
    # A fresh step counter each step: DeepSpeed's ZeRO-3 universal-checkpoint load puts one and the same
    # step tensor into the state of every sub-group, and an in-place increment would count it twice.
    state["step"] = torch.as_tensor(state["step"], dtype=torch.float32, device="cpu").clone()
    beta1, beta2 = group["betas"]
    lr = float(group["lr"])
    (bc1,), (bc2,) = adam_moments_(
        [grad], [state["exp_avg"]], [state["exp_avg_sq"]], [state["step"]], beta1=beta1, beta2=beta2
    )
    # U = scale · direction (see hf_weyl.core.functional.adam_direction)
    (direction,), (scale,) = adam_direction([state["exp_avg"]], [state["exp_avg_sq"]], [bc1], [bc2], eps=group["eps"])

    capped = [is_capped(s, group["cap_vectors"]) for s in layout.shapes]
    idx = [i for i, c in enumerate(capped) if c]
    lengths = [vector_length(layout.shapes[i]) for i in idx]
    buf, cold = _vectors(state, lengths, flat.device)
    iters = max(group["power_iters"], group["cold_start_iters"]) if cold else group["power_iters"]

    n = len(layout.params)
    sigma_w = torch.zeros(n, dtype=torch.float32, device=flat.device)
    sigma_u = torch.zeros(n, dtype=torch.float32, device=flat.device)
    if idx:
        w_pieces = [flat.narrow(0, layout.offsets[i], layout.numels[i]) for i in idx]
        u_pieces = [direction.narrow(0, layout.offsets[i], layout.numels[i]) for i in idx]
        starts = [layout.starts[i] for i in idx]
        vecs = list(buf[0].split(lengths)) + list(buf[1].split(lengths))
        if group["sigma_mode"] == "gather":
            shapes = [layout.shapes[i] for i in idx]
            sig = _sigma_gather(w_pieces + u_pieces, starts + starts, shapes + shapes, vecs, iters, layout.group)
        else:
            dims = [_dims(layout.shapes[i]) for i in idx]
            sig = _sigma_vector_reduce(w_pieces + u_pieces, starts + starts, dims + dims, vecs, iters, layout.group)
        index = torch.tensor(idx, device=flat.device)
        sigma_w.index_copy_(0, index, sig[: len(idx)])
        sigma_u.index_copy_(0, index, sig[len(idx) :] * scale)
    capped_t = torch.tensor(capped, dtype=torch.bool, device=flat.device)
    ratio = cap_ratio(sigma_w, sigma_u, capped_t, lr=lr, tau=group["tau"])

    # Segments covering the flat partition: each parameter piece with its ratio, gaps (padding) with 1.
    seg_w, seg_u, seg_ratio, pos = [], [], [], 0
    one = torch.ones(1, dtype=torch.float32, device=flat.device)
    for i in sorted((i for i in range(n) if layout.numels[i]), key=lambda i: layout.offsets[i]):
        off, numel = layout.offsets[i], layout.numels[i]
        if off < pos:
            raise RuntimeError("AdamWeyl (ZeRO): overlapping parameter fragments in one flat partition")
        if off > pos:
            seg_w.append(flat.narrow(0, pos, off - pos)), seg_u.append(direction.narrow(0, pos, off - pos))
            seg_ratio.append(one)
        seg_w.append(flat.narrow(0, off, numel)), seg_u.append(direction.narrow(0, off, numel))
        seg_ratio.append(ratio[i : i + 1])
        pos = off + numel
    if pos < flat.numel():
        seg_w.append(flat.narrow(0, pos, flat.numel() - pos)), seg_u.append(direction.narrow(0, pos, flat.numel() - pos))
        seg_ratio.append(one)
    if seg_w:
        apply_capped_update_(
            seg_w, seg_u, torch.cat(seg_ratio), [scale] * len(seg_w), lr=lr, weight_decay=group["weight_decay"]
        )
    return layout.params, ratio, sigma_w, sigma_u, capped_t


def comm_bytes_per_step(shapes: list[tuple[int, ...]], world: int, mode: str, *, power_iters: int = 1,
                        bytes_per_float: int = 4) -> dict[str, float]:
    """Payload bytes one rank hands to collectives per optimizer step for the σ's of these capped tensors
    (one param group), and the ring-algorithm bytes it actually sends on the wire."""
    if mode not in SIGMA_MODES:
        raise ValueError(f"unknown sigma_mode {mode!r}; valid: {SIGMA_MODES}")
    flag = 4  # the reduced non-finite flag
    if not shapes:
        return {"payload": flag, "wire": flag, "collectives": 1}
    if mode == "vector_reduce":
        payload = sum(2 * (m + n) for m, n in (_dims(torch.Size(s)) for s in shapes)) * power_iters * bytes_per_float
        return {"payload": payload + flag, "wire": 2 * (world - 1) / world * payload + flag, "collectives": 1 + 2 * power_iters}
    numel = sum(torch.Size(s).numel() for s in shapes)
    local = 2 * numel / world * bytes_per_float  # W and U pieces (≈ evenly split)
    meta = 16 * len(shapes) * 2
    return {"payload": local + meta + flag, "wire": (world - 1) * (local + meta) + flag, "collectives": 3}
