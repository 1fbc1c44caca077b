"""AdamW² under DeepSpeed ZeRO (stages 1, 2 and 3): the adapter from ZeRO's flat fp32 partitions to pieces.

Under ZeRO the optimizer no longer holds the model's parameters: each param group holds one flat fp32
partition per rank (per sub-group for stage 3), and a weight matrix W (m×n, row-major) may be split
across ranks: each rank holds one contiguous piece ``W.flatten()[s : s + c]`` (possibly empty). The
elementwise parts of AdamW² (moments, direction U, the update) work on the flat partition unchanged;
σ1(W) and σ1(U) come from ``hf_weyl.distributed`` (``vector_reduce`` or ``gather``), given the pieces.

Where the pieces are comes from DeepSpeed's own bookkeeping (private attributes, listed in
:data:`DEEPSPEED_PRIVATE` and read only through ``hf_weyl.integrations.internals.deepspeed``): ``param._hp_mapping`` /
``param._dp_group`` for ZeRO-1/2 and the BF16 optimizer; for ZeRO-3 the sub-group's flat tensor
``ds_id`` ("first_last" parameter ds_id) and each parameter's ``partition_numel()`` (rank r holds
elements [r·p, (r+1)·p) of the flattened tensor). A layout is built once per flat partition, verified
against the weights at its first step (each fragment of the fp32 partition must hold its parameter's
values), and cached. A missing attribute, a mapping that does not check out, or an engine setting that
cannot be read raises (naming the DeepSpeed version): never AdamW on flat chunks. DeepSpeed versions
outside ``TESTED_DEEPSPEED`` get a warning; the verification is the guard.

The power-iteration vectors are replicated on every rank and stored in the state of the flat
partition under ``zero_weyl``: a dict holding one 2-D fp32 tensor (``"vectors"``, row 0 for W, row 1
for U) and the vector lengths (``"lengths"``, a list of ints). DeepSpeed checkpoints keep it
(bit-identical resume). It is a dict, not a tensor, on purpose: universal-checkpoint conversion
(``ds_to_universal``) cuts every *tensor* of a flat partition's state at the partition padding,
which would break a (2, Σk) tensor, while it passes other values through and extracts only
``exp_avg``, ``exp_avg_sq``, fp32 weights and ``step``. After loading a universal checkpoint (e.g. on
another number of ranks) the vectors are therefore absent and start cold (``cold_start_iters``
iterations); everything else continues exactly.

A non-finite gradient on any rank makes every rank skip the step. DeepSpeed's own check does this where it runs
(its ``step()`` skips a step whose global gradient norm is not finite before calling the optimizer: ZeRO-3 always,
ZeRO-1/2 in every dtype but bf16 with ``check_grad_overflow: false``); elsewhere AdamWeyl checks itself with a
reduced flag (one read of the gradient partition).
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ..core.cpu_kernel import cpu_kernel
from ..core.layout import Part, RowPiece, StepPlan, Unit
from ..core.optimizer import GROUP_INDEX, AdamWeyl, register_engine_adapter
from ..distributed.collectives import COMM_STATS, all_reduce_
from ..distributed.sigma import LAYOUT_SIGMA, SIGMA_MODES, matrix_dims
from ..distributed.sigma import comm_bytes_per_step as sigma_comm_bytes
from .internals.accelerate import deepspeed_plugins
from .internals.deepspeed import (
    DEEPSPEED_PRIVATE,
    TESTED_DEEPSPEED,
    deepspeed_version,
    first_set,
    optional,
    private,
    skips_nonfinite_steps,
    tested_version,
)

__all__ = [
    "COMM_STATS",
    "DEEPSPEED_PRIVATE",
    "SIGMA_MODES",
    "TESTED_DEEPSPEED",
    "DeepSpeedZeroAdapter",
    "ZeroLayout",
    "KEEP_CLIENT_OPTIMIZER",
    "active_deepspeed_configs",
    "check_active_deepspeed_config",
    "check_deepspeed_config",
    "keep_client_optimizer_under_offload",
    "nonfinite_anywhere",
    "comm_bytes_per_step",
    "zero_layout",
    "zero_unit",
]

# --------------------------------------------------------------------------------------------
# start-up checks
# --------------------------------------------------------------------------------------------


#: The DeepSpeed config line that keeps a client optimizer under optimizer offload (without it accelerate and the HF
#: Trainer replace AdamWeyl by DeepSpeedCPUAdam, and bare ``deepspeed.initialize`` refuses it).
KEEP_CLIENT_OPTIMIZER = '"zero_force_ds_cpu_optimizer": false'


def offload_device(config: dict[str, Any]) -> str:
    """``zero_optimization.offload_optimizer.device`` of a DeepSpeed config ("none" without offload)."""
    zero = config.get("zero_optimization") or {}
    device = (zero.get("offload_optimizer") or {}).get("device", "none")
    return "none" if device is None else str(device).lower()


def keeps_client_optimizer(config: dict[str, Any]) -> bool:
    """Whether the config has ``zero_force_ds_cpu_optimizer: false`` (DeepSpeed's default is true)."""
    return config.get("zero_force_ds_cpu_optimizer", True) in (False, "false", "False")


def check_deepspeed_config(config: dict[str, Any]) -> None:
    """Refuse DeepSpeed configurations AdamWeyl cannot honour (ValueError saying why and what to change)."""
    zero = config.get("zero_optimization") or {}
    device = offload_device(config)
    if device == "nvme":
        raise ValueError(
            "AdamWeyl cannot run with zero_optimization.offload_optimizer.device='nvme': DeepSpeed then swaps optimizer "
            "state between NVMe and memory around each step by its own bookkeeping, which is untested with AdamWeyl's "
            "state (the power-iteration vectors of each flat partition). Use offload_optimizer.device 'cpu' with "
            f"{KEEP_CLIENT_OPTIMIZER} in the DeepSpeed config, or no optimizer offload."
        )
    if device != "none" and not keeps_client_optimizer(config):
        raise ValueError(
            f"AdamWeyl under zero_optimization.offload_optimizer.device={device!r} needs {KEEP_CLIENT_OPTIMIZER} in the "
            "DeepSpeed config: without it accelerate and the HF Trainer replace a client optimizer by DeepSpeedCPUAdam "
            "(plain Adam, no AdamW² cap) and deepspeed.initialize refuses it. Add that line (with optim=\"adamw_weyl\" "
            "the Trainer adds it for you)."
        )
    if zero.get("round_robin_gradients") in (True, "true"):
        raise ValueError(
            "AdamWeyl cannot run with zero_optimization.round_robin_gradients=true: in DeepSpeed "
            f"{'.'.join(map(str, TESTED_DEEPSPEED[0]))}.x the reordered fragment mapping (param._hp_mapping) "
            "can point at the wrong part of the flat partition, so per-matrix σ's would be computed on the "
            "wrong weights. Set round_robin_gradients to false."
        )


def keep_client_optimizer_under_offload(config: dict[str, Any]) -> bool:
    """Set ``zero_force_ds_cpu_optimizer: false`` in a config with CPU optimizer offload that lacks it (what the HF
    Trainer route does when hf_weyl builds the optimizer); True if it changed the config."""
    if offload_device(config) == "cpu" and not keeps_client_optimizer(config) \
            and "zero_force_ds_cpu_optimizer" not in config:
        config["zero_force_ds_cpu_optimizer"] = False
        return True
    return False


def active_deepspeed_configs() -> list[dict[str, Any]]:
    """The DeepSpeed configs already announced by the HF Trainer (``TrainingArguments(deepspeed=...)``) or by
    accelerate (``DeepSpeedPlugin``), as the dicts those libraries read (changes to them are seen by both).

    Only libraries that are already imported are consulted (a config can only have been announced through them),
    so building an ``AdamWeyl`` imports neither accelerate nor DeepSpeed."""
    configs = []
    hf_deepspeed = sys.modules.get("transformers.integrations.deepspeed")
    if hf_deepspeed is not None:
        cfg = hf_deepspeed.deepspeed_config()
        if cfg:
            configs.append(cfg)
    accelerate_state = sys.modules.get("accelerate.state")
    if accelerate_state is not None:
        for plugin in deepspeed_plugins(accelerate_state):
            cfg = getattr(plugin, "deepspeed_config", None)
            if cfg and all(cfg is not c for c in configs):
                configs.append(cfg)
    return configs


def check_active_deepspeed_config() -> None:
    """Run :func:`check_deepspeed_config` on every DeepSpeed config already announced (:func:`active_deepspeed_configs`)."""
    for cfg in active_deepspeed_configs():
        check_deepspeed_config(cfg)


def _warn_if_untested_version() -> None:
    import deepspeed

    low, high = TESTED_DEEPSPEED
    if not tested_version():
        warnings.warn(
            f"AdamWeyl's ZeRO path reads DeepSpeed's private fragment bookkeeping and is tested with DeepSpeed "
            f">={low[0]}.{low[1]},<{high[0]}.{high[1]}; found {deepspeed.__version__}. The mapping is verified "
            "against the weights at the first step and AdamWeyl raises if it does not check out.",
            stacklevel=4,
        )


# --------------------------------------------------------------------------------------------
# where each matrix's piece lives
# --------------------------------------------------------------------------------------------


@dataclass
class ZeroLayout:
    """This rank's pieces of a flat partition's parameters, in the same order on every rank.

    ``offsets[i]``: start of ``params[i]``'s piece in the flat partition; ``starts[i]``: start of the
    piece in the flattened parameter; ``numels[i]``: its length (0 where this rank holds none).
    ``engine_skips_nonfinite``: DeepSpeed's step skips non-finite steps itself (``skips_nonfinite_steps``).
    """

    params: list[Tensor]
    shapes: list[torch.Size]
    offsets: list[int]
    starts: list[int]
    numels: list[int]
    group: Any  # the process group to reduce over
    stage: int
    engine_skips_nonfinite: bool = False


def _optimized(p: Tensor) -> bool:
    numel = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
    return p.requires_grad and numel > 0


def _same_storage(view: Tensor, flat: Tensor) -> bool:
    return view.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()


def _zero12_layout(flat: Tensor, params: list[Tensor]) -> ZeroLayout:
    offsets, starts, numels = [], [], []
    for p in params:
        mapping = private(p, "_hp_mapping", "the fp32 fragment of a parameter")
        if mapping is None:
            offsets.append(0), starts.append(0), numels.append(0)
            continue
        fragment = private(mapping, "hp_fragment", "the fp32 fragment tensor")
        if not _same_storage(fragment, flat):
            raise RuntimeError(
                f"AdamWeyl (ZeRO-1/2): the fragment of a parameter of shape {tuple(p.shape)} does not live in the flat "
                f"partition the optimizer was given (DeepSpeed {deepspeed_version()} changed its bookkeeping)"
            )
        offsets.append(int(private(mapping, "hp_fragment_address", "fragment address").start))
        lp_address = private(mapping, "lp_fragment_address", "fragment address in the parameter")
        starts.append(int(lp_address.start))
        numels.append(int(lp_address.numel))
    groups = {id(private(p, "_dp_group", "the data-parallel group")) for p in params}
    if len(groups) != 1:
        raise RuntimeError("AdamWeyl (ZeRO-1/2): the parameters of one param group have different data-parallel groups")
    group = private(params[0], "_dp_group", "the data-parallel group")
    return ZeroLayout(params, [p.shape for p in params], offsets, starts, numels, group, stage=2)


def _zero3_layout(flat: Tensor, params: list[Tensor]) -> ZeroLayout:
    ds_id = str(private(flat, "ds_id", "the parameter ids of a flat sub-group"))
    first, _, last = ds_id.partition("_")
    ids = [str(private(p, "ds_id", "ZeRO-3 parameter id")) for p in params]
    if first not in ids or last not in ids:
        raise RuntimeError(
            f"AdamWeyl (ZeRO-3): cannot find the parameters of the flat sub-group {ds_id!r} among the optimizer's "
            f"parameters (DeepSpeed {deepspeed_version()})"
        )
    sub = params[ids.index(first) : ids.index(last) + 1]
    part_numels = [int(private(p, "partition_numel", "ZeRO-3 partition size")()) for p in sub]
    if sum(part_numels) != flat.numel():
        raise RuntimeError(
            f"AdamWeyl (ZeRO-3): sub-group {ds_id!r} has {flat.numel()} elements but its parameters' partitions "
            f"add up to {sum(part_numels)} (DeepSpeed {deepspeed_version()})"
        )
    group = private(sub[0], "ds_process_group", "ZeRO-3 process group")
    rank = dist.get_rank(group)
    offsets, starts, numels, offset = [], [], [], 0
    for p, part in zip(sub, part_numels):
        start = rank * part
        offsets.append(offset)
        starts.append(start)
        numels.append(max(0, min(part, int(private(p, "ds_numel", "ZeRO-3 parameter size")) - start)))
        offset += part
    shapes = [torch.Size(private(p, "ds_shape", "ZeRO-3 parameter shape")) for p in sub]
    return ZeroLayout(sub, shapes, offsets, starts, numels, group, stage=3)


def _check_settings(params: list[Tensor], stage: int) -> None:
    """Refuse engine settings AdamWeyl cannot honour, read from DeepSpeed's optimizer (fail closed)."""
    if stage == 3:
        z3 = first_set(params, "_z3_optimizer", "the ZeRO-3 optimizer")
        if z3 is None:
            raise RuntimeError(f"AdamWeyl (ZeRO-3): no parameter carries its ZeRO-3 optimizer (DeepSpeed "
                               f"{deepspeed_version()}); cannot read whether it swaps optimizer state to NVMe")
        if private(z3, "swap_optimizer", "ZeRO-3 NVMe optimizer swapping flag"):  # (CPU offload is supported)
            check_deepspeed_config({"zero_optimization": {"offload_optimizer": {"device": "nvme"}}})
        return
    # ZeRO-1/2 mark every parameter with a fragment on this rank; DeepSpeed's BF16 optimizer (stage 0)
    # marks none and has neither offload nor gradient round-robin. (CPU optimizer offload is supported.)
    zero_opt = optional(params, "_zero_optimizer")
    if zero_opt is not None:
        if private(zero_opt, "round_robin_gradients", "ZeRO gradient round-robin flag"):
            check_deepspeed_config({"zero_optimization": {"round_robin_gradients": True}})


def zero_layout(flat: Tensor, originals: list[Tensor]) -> ZeroLayout:
    """The layout of a DeepSpeed flat fp32 partition built from the group's original parameters; raises if unknown."""
    params = [p for p in originals if _optimized(p)]
    if params and all(hasattr(p, "ds_id") for p in params) and hasattr(flat, "ds_id"):
        _check_settings(params, stage=3)
        layout = _zero3_layout(flat, params)
    elif params and all(hasattr(p, "_hp_mapping") and hasattr(p, "_dp_group") for p in params):
        _check_settings(params, stage=2)
        layout = _zero12_layout(flat, params)
    else:
        layout = None
    if layout is not None:
        layout.engine_skips_nonfinite = skips_nonfinite_steps(params, layout.stage)
        return layout
    raise RuntimeError(
        f"AdamWeyl: a param group holds a tensor of shape {tuple(flat.shape)} that is not one of the parameters the "
        "optimizer was built with, and no DeepSpeed ZeRO fragment mapping (param._hp_mapping or ZeRO-3 ds_id) was "
        f"found for the group's parameters (DeepSpeed {deepspeed_version()}). Refusing to fall back to AdamW on "
        "flattened chunks, which would compute σ1 of the wrong matrices. Build AdamWeyl on the model's parameters "
        "and pass it to deepspeed.initialize / accelerate / the HF Trainer unchanged."
    )


def _verify(layout: ZeroLayout, flat: Tensor) -> None:
    """First step: each piece of the fp32 partition must hold its parameter's values (ZeRO-1/2: the
    parameter; ZeRO-3: its local partition ``ds_tensor``)."""
    for p, off, start, numel in zip(layout.params, layout.offsets, layout.starts, layout.numels):
        if numel == 0:
            continue
        hp = flat.narrow(0, off, numel)
        if layout.stage == 3:
            lp = private(p, "ds_tensor", "ZeRO-3 local partition").detach().reshape(-1).narrow(0, 0, numel)
        else:
            lp = p.detach().reshape(-1).narrow(0, start, numel)
        if not torch.equal(hp.to(device=lp.device, dtype=lp.dtype), lp):  # (offload: hp on the CPU, lp not)
            raise RuntimeError(
                f"AdamWeyl (ZeRO-{layout.stage}): DeepSpeed's fragment mapping of a parameter of shape "
                f"{tuple(p.shape)} does not match the fp32 partition (DeepSpeed {deepspeed_version()}; known with "
                "round_robin_gradients); refusing to compute σ's on the wrong weights"
            )


# --------------------------------------------------------------------------------------------
# the description of a step
# --------------------------------------------------------------------------------------------


def nonfinite_anywhere(grads: list[Tensor], group: Any) -> bool:
    """Whether any rank's gradient of these partitions holds inf/NaN: one reduced flag, so all ranks agree. One read
    of each gradient: the fused CPU kernel's ``all_finite`` for contiguous fp32 CPU partitions (memory speed), else
    ``aminmax`` (min and max propagate NaN and ±inf; no mask of the gradient's size)."""
    bad = torch.zeros(1, dtype=torch.float32, device=grads[0].device)
    for grad in grads:
        if not grad.numel():
            continue
        kernel = cpu_kernel() if grad.device.type == "cpu" and grad.dtype == torch.float32 and grad.is_contiguous() else None
        if kernel is not None:
            bad += 0.0 if kernel.all_finite(grad) else 1.0
        else:
            lo, hi = grad.aminmax()
            bad += ~(torch.isfinite(lo) & torch.isfinite(hi))
    all_reduce_(bad, group, op=dist.ReduceOp.MAX)
    return bad.item() > 0


def zero_unit(flat: Tensor, layout: ZeroLayout) -> Unit:
    """A flat partition as the core step sees it: one unit holding a row piece of each of its parameters (possibly
    empty on this rank); the elements no piece covers (padding) are stepped as AdamW."""
    parts = [
        Part(p, shape, RowPiece(matrix_dims(shape), start, numel, layout.group), offset, numel)
        for p, shape, offset, start, numel in zip(layout.params, layout.shapes, layout.offsets, layout.starts, layout.numels)
    ]
    return Unit(flat, flat, flat.grad, parts)


# --------------------------------------------------------------------------------------------
# the adapter
# --------------------------------------------------------------------------------------------


@register_engine_adapter
class DeepSpeedZeroAdapter:
    """Steps param groups whose tensors DeepSpeed ZeRO replaced by flat fp32 partitions."""

    name = "deepspeed_zero"

    def __init__(self) -> None:
        self._layouts: WeakIdKeyDictionary = WeakIdKeyDictionary()  # flat partition → verified ZeroLayout
        _warn_if_untested_version()

    @classmethod
    def check_construction(cls, optimizer: AdamWeyl) -> None:
        check_active_deepspeed_config()

    @classmethod
    def claims(cls, optimizer: AdamWeyl, group: dict[str, Any]) -> bool:
        replaced = optimizer.replaced_tensors(group) if "deepspeed" in sys.modules else []
        return any(not hasattr(t, "placements") for t in replaced)  # (DTensors are FSDP2's)

    def describe(self, optimizer: AdamWeyl, group: dict[str, Any]) -> StepPlan | None:
        """The group's flat partitions as units (:func:`zero_unit`), each layout verified against the weights at its
        first step; None (every rank skips the step) when some rank's gradient is non-finite and DeepSpeed did not
        check (where it checks, its step() never calls ours with one)."""
        _repair_group_indices(optimizer)
        originals = optimizer.group_params(group)
        layouts = []
        for flat in group["params"]:
            layout = self._layouts.get(flat)
            if layout is None:
                layout = zero_layout(flat, originals)
                _verify(layout, flat)
                self._layouts[flat] = layout
            if flat.grad is None:
                raise RuntimeError("AdamWeyl (ZeRO): the flat fp32 partition has no gradient at step time")
            layouts.append(layout)
        if not layouts[0].engine_skips_nonfinite and nonfinite_anywhere([flat.grad for flat in group["params"]],
                                                                         layouts[0].group):
            return None
        units = [zero_unit(flat, layout) for flat, layout in zip(group["params"], layouts)]
        # ZeRO-1/2 step one group per call, ZeRO-3 one sub-group: the group's stats gather all its partitions.
        return StepPlan(units, engine=self.name, sigma=LAYOUT_SIGMA, partial=True)


def _repair_group_indices(optimizer: AdamWeyl) -> None:
    """Give every group back its own index after DeepSpeed's ZeRO-3 universal-checkpoint load.

    That load (DeepSpeed 0.19: ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``) copies param
    group 0's entries into every group, our group index included. ZeRO-3 keeps the groups in their
    original order (ZeRO-1/2 narrow ``param_groups`` to one group per call, so this never fires there),
    which lets us restore the indices by position.
    """
    groups = optimizer.param_groups
    indices = [g.get(GROUP_INDEX) for g in groups]
    if len(groups) < 2 or len(groups) != optimizer.num_built_groups or len(set(indices)) == len(indices):
        return
    for i, g in enumerate(groups):
        g[GROUP_INDEX] = i
    warnings.warn(
        "AdamWeyl: every param group carried param group 0's entries (what DeepSpeed's ZeRO-3 universal-"
        "checkpoint load does); AdamWeyl restored its own group bookkeeping, but hyperparameters such as "
        f"weight_decay are now group 0's in every group: {[g['weight_decay'] for g in groups]}. Set them "
        "again after loading if your groups differ (e.g. no weight decay for biases and norms).",
        stacklevel=4,
    )


def comm_bytes_per_step(
    shapes: list[tuple[int, ...]], world: int, mode: str, *, power_iters: int = 1, bytes_per_float: int = 4,
    engine_checks: bool = False, fused: bool = False,
) -> dict[str, float]:
    """Payload bytes one rank hands to collectives per optimizer step under ZeRO for the capped tensors of
    one flat partition, and the ring-algorithm bytes on the wire: the σ traffic
    (:func:`hf_weyl.distributed.comm_bytes_per_step`); the reduced 4-byte non-finite flag unless ``engine_checks``
    (DeepSpeed's step checks the gradient norm and AdamWeyl sees that it does: ZeRO-3, ZeRO-1/2 under offload);
    and with ``fused`` (the fused CPU step: CPU fp32 partitions, ``vector_reduce``, warm steps) one float more in
    the second all-reduce, the kept product's check, and on more than one rank three per capped matrix (the guards
    and the owner flag of the matrices a rank holds whole, which it steps while the all-reduces run)."""
    sigma = sigma_comm_bytes(shapes, world, mode, power_iters=power_iters, bytes_per_float=bytes_per_float,
                             fused=fused)
    extra = 0 if engine_checks else 4
    if fused and mode == "vector_reduce" and world > 1 and shapes:
        extra += 3 * 4 * len(shapes)
    calls = sigma["collectives"] + (0 if engine_checks else 1)
    return {"payload": sigma["payload"] + extra, "wire": sigma["wire"] + extra, "collectives": calls}
