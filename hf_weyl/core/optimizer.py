"""``AdamWeyl``: AdamW with the AdamW² per-tensor learning-rate cap (see ``hf_weyl.core.functional``).

The optimizer steps tensors that live whole on one device. Engines that shard parameters (DeepSpeed
ZeRO's flat partitions, FSDP2's DTensors) plug in beside it through *engine adapters*
(``hf_weyl.integrations``, registered with :func:`register_engine_adapter`): for every param group the
registered adapters are asked in turn whether they recognise the group's tensors, and the first that
does steps the group. A tensor that is not one of the parameters the optimizer was built with and that
no adapter recognises is refused — never stepped as plain AdamW on pieces of matrices.
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .functional import (
    FRESH_STEPS, WorkBuffer, adamweyl, choose_impl, constant_tensor, is_capped, is_fresh, power_iters_for,
)
from .layout import SIGMA_MODES, Part, StepPlan, Unit
from .power_iteration import PowerIters, initial_vector, vector_length

__all__ = [
    "DEFAULT_COLD_START_ITERS",
    "MAX_POWER_ITERS",
    "OPTIONS",
    "SIGMA_MODES",
    "AdamWeyl",
    "CapStats",
    "EngineAdapter",
    "register_engine_adapter",
    "unwrap_adamweyl",
]

#: Power-iteration steps on a tensor's first optimizer step (its vectors start cold), and for σ1(U) during
#: its first ``FRESH_STEPS`` steps. Measured on the tiny GPT-2 preset from its first step (wd 0, lr 3e-2,
#: τ 0.01): the realised σ1(ΔW)/(τ σ1(W)) peaks at step 2 at 1.38 with 8, 1.004 with 12, 1.005 with 16
#: (docs/benchmarks.md); 16 leaves a margin on flatter spectra.
DEFAULT_COLD_START_ITERS = 16

#: The most power-iteration steps per optimizer step ``power_iters`` and ``cold_start_iters`` may ask for: each
#: costs two passes over every matrix, and past a few dozen the estimate no longer changes (it converges
#: geometrically); a larger value is a typo that would make every step take minutes.
MAX_POWER_ITERS = 256

#: Optimizer-state keys of the power-iteration vectors (fp32, kept between steps), and of the product
#: b_W = B_W x_W of the weights after the last update that the fused CPU step keeps for the next one
#: (fp64; used only if the next step's product of the weights and x_W as they are then reproduces it bit for bit).
WEIGHT_VECTOR = "weight_vector"
UPDATE_VECTOR = "update_vector"
WEIGHT_PRODUCT = "weight_product"
KEEP_DTYPE_STATE = (WEIGHT_VECTOR, UPDATE_VECTOR, WEIGHT_PRODUCT)

#: Optimizer-state key of the vectors of a unit holding several parameters' pieces (a DeepSpeed ZeRO flat
#: partition): a dict of one (2, Σk) fp32 tensor (``"vectors"``, row 0 for W, row 1 for U) and the vector lengths
#: (``"lengths"``). A dict, not a tensor, on purpose: DeepSpeed's universal-checkpoint conversion cuts every *tensor*
#: of a partition's state at the partition padding, and passes other values through. (The name is the one
#: checkpoints have always carried.)
PACKED_VECTORS = "zero_weyl"

#: Param-group key: the group's position when it was added. An engine may swap a group's tensors (ZeRO's flat
#: partitions) or narrow ``param_groups`` to the group it steps in this call; the index finds the parameters the
#: group was built with (:meth:`AdamWeyl.group_params`) and keys the group's statistics.
GROUP_INDEX = "weyl_group_index"

#: The per-group options of ``AdamWeyl`` (every one may be overridden per param group).
OPTIONS = ("lr", "betas", "eps", "weight_decay", "tau", "power_iters", "cap_vectors", "cold_start_iters", "sigma_mode")


@dataclass
class CapStats:
    """What the cap did in the last ``step()``, as device tensors (reading them syncs, building them doesn't).

    ``lr_ratio[i]`` is effective / scheduled lr of ``params[i]`` (1.0 = not capped);
    ``sigma_weight``/``sigma_update`` are the σ1 estimates (0 where the tensor is not capped);
    ``engine`` names what computed them (``"single_device"``, ``"deepspeed_zero"``, ``"fsdp2"``).
    """

    params: list[Tensor]
    lr_ratio: Tensor
    sigma_weight: Tensor
    sigma_update: Tensor
    capped: Tensor  # bool: the tensors AdamW² applies to (≥2-D, or 1-D with cap_vectors)
    engine: str = "single_device"

    @property
    def num_capped(self) -> int:
        """Tensors whose lr the cap reduced this step (syncs)."""
        return int((self.lr_ratio < 1).sum())

    @property
    def capped_fraction(self) -> float:
        """Fraction of the capped-eligible tensors whose lr was reduced (syncs)."""
        eligible = int(self.capped.sum())
        return self.num_capped / eligible if eligible else 0.0

    #: What :meth:`summary` holds, in order.
    SUMMARY = ("capped_fraction", "num_capped", "lr_ratio_mean", "lr_ratio_median", "lr_ratio_min", "num_eligible")

    def summary(self) -> Tensor:
        """:data:`SUMMARY` over the capped-eligible tensors as one fp32 tensor on the stats' device, built without a
        host sync (for logging: accumulate these between logging steps, read once). No eligible tensor:
        ``[0, 0, 1, 1, 1, 0]``."""
        ratio, eligible = self.lr_ratio.float(), self.capped
        one = ratio.new_ones(())
        if ratio.numel() == 0:
            return torch.stack([one * 0, one * 0, one, one, one, one * 0])
        count = eligible.sum().float()
        capped = ((ratio < 1) & eligible).sum().float()
        mean = torch.where(eligible, ratio, 0.0).sum() / count.clamp(min=1)
        median = torch.nanmedian(torch.where(eligible, ratio, torch.nan))
        low = torch.where(eligible, ratio, torch.inf).amin()
        none = count == 0
        return torch.stack([capped / count.clamp(min=1), capped, torch.where(none, one, mean),
                            torch.where(none, one, median), torch.where(none, one, low), count])

    def named_lr_ratio(self, names: dict[Tensor, str] | Any) -> dict[str, float]:
        """``{name: ratio}`` given a model (its ``named_parameters``) or a {param: name} mapping (syncs)."""
        if hasattr(names, "named_parameters"):
            names = {p: n for n, p in names.named_parameters()}
        by_id = {id(p): n for p, n in names.items()}
        values = self.lr_ratio.tolist()
        return {by_id.get(id(p), f"param_{i}"): v for i, (p, v) in enumerate(zip(self.params, values))}

    @classmethod
    def cat(cls, parts: list[CapStats]) -> CapStats:
        """One ``CapStats`` of several (e.g. one per param group), in order, on the first part's device."""
        if len(parts) == 1:
            return parts[0]
        device = parts[0].lr_ratio.device
        fields = ("lr_ratio", "sigma_weight", "sigma_update", "capped")
        engines = sorted({p.engine for p in parts})
        return cls(
            [p for part in parts for p in part.params],
            *(torch.cat([getattr(part, f).to(device) for part in parts]) for f in fields),
            engine="+".join(engines),
        )


class EngineAdapter(Protocol):
    """Describes the param groups whose tensors an engine has replaced or sharded (``hf_weyl.integrations``);
    ``AdamWeyl`` steps them.

    ``check_construction(optimizer)`` (a classmethod) runs when an ``AdamWeyl`` is built and refuses engine
    configurations already announced that the adapter cannot honour. ``claims(optimizer, group)`` (a
    classmethod, asked for every group at construction and when its tensors change) says whether the group's
    tensors are the adapter's engine's; it may raise to refuse a layout it recognises but cannot honour.
    One adapter instance per optimizer describes the claimed groups: ``describe(optimizer, group)`` returns a
    :class:`~hf_weyl.core.layout.StepPlan` (units, the parts they hold and their layouts), or None when this
    step is skipped (e.g. a non-finite gradient on some rank, decided from reduced values)."""

    name: str

    @classmethod
    def check_construction(cls, optimizer: AdamWeyl) -> None: ...

    @classmethod
    def claims(cls, optimizer: AdamWeyl, group: dict[str, Any]) -> bool: ...

    def describe(self, optimizer: AdamWeyl, group: dict[str, Any]) -> StepPlan | None: ...


_ENGINE_ADAPTERS: list[type[EngineAdapter]] = []


def register_engine_adapter(adapter: type[EngineAdapter]) -> type[EngineAdapter]:
    """Make ``AdamWeyl`` consult ``adapter`` for every param group (idempotent; usable as a decorator)."""
    if adapter not in _ENGINE_ADAPTERS:
        _ENGINE_ADAPTERS.append(adapter)
    return adapter


_FOREIGN_STEP_GUARD: list[Any] = []  # the handle of the global step pre-hook, once registered


def _refuse_foreign_step(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    """A global ``Optimizer`` step pre-hook: refuse the step of another optimizer built from an ``AdamWeyl``'s
    param groups (they carry :data:`GROUP_INDEX`) — what accelerate does under DeepSpeed optimizer offload when
    the optimizer existed before the DeepSpeed config was announced (``map_pytorch_optim_to_deepspeed``:
    ``DeepSpeedCPUAdam(optimizer.param_groups)``), which would train plain Adam without the cap."""
    if isinstance(optimizer, AdamWeyl):
        return
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list) or not any(isinstance(g, dict) and GROUP_INDEX in g for g in groups):
        return
    raise RuntimeError(
        f"AdamWeyl: refusing the step of {type(optimizer).__module__}.{type(optimizer).__name__}, which was built "
        "from an AdamWeyl's param groups and would train without the AdamW² cap. accelerate (and the HF Trainer "
        "through it) replace a client optimizer by DeepSpeedCPUAdam when the DeepSpeed config has "
        "zero_optimization.offload_optimizer.device='cpu' and zero_force_ds_cpu_optimizer is not false. Add "
        '"zero_force_ds_cpu_optimizer": false to the DeepSpeed config: AdamWeyl then steps the offloaded partitions '
        "itself."
    )


def _guard_foreign_steps() -> None:
    """Register :func:`_refuse_foreign_step` once per process (a no-op for every optimizer that is not built from
    AdamWeyl's groups: one isinstance and one scan of its param groups per step)."""
    if not _FOREIGN_STEP_GUARD:
        _FOREIGN_STEP_GUARD.append(register_optimizer_step_pre_hook(_refuse_foreign_step))


def _check(name: str, value: Any, ok: bool, valid: str) -> None:
    if not ok:
        raise ValueError(f"AdamWeyl: invalid {name}={value!r}; {name} must be {valid}")


def _is_real(x: Any) -> bool:
    """A real number (Python, NumPy or a one-element tensor), not a bool."""
    if isinstance(x, Tensor):
        return x.numel() == 1 and not x.is_complex() and x.dtype != torch.bool
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _finite_at_least(x: Any, low: float, strict: bool = False) -> bool:
    if not _is_real(x):
        return False
    v = float(x)
    return math.isfinite(v) and (v > low if strict else v >= low)


def _validate_group(g: dict[str, Any]) -> None:
    """Check every option of a param group; ValueError naming the value and what is valid."""
    _check("lr", g["lr"], _finite_at_least(g["lr"], 0), "a finite number >= 0")
    betas = g["betas"]
    _check(
        "betas",
        betas,
        isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_real(b) and 0 <= float(b) < 1 for b in betas),
        "a pair (beta1, beta2) with each value in [0, 1)",
    )
    _check("eps", g["eps"], _finite_at_least(g["eps"], 0), "a finite number >= 0")
    _check("weight_decay", g["weight_decay"], _finite_at_least(g["weight_decay"], 0), "a finite number >= 0")
    _check("tau", g["tau"], _finite_at_least(g["tau"], 0, strict=True), "a finite number > 0 (the paper uses 0.004-0.01)")
    for key in ("power_iters", "cold_start_iters"):
        _check(
            key, g[key], _is_int(g[key]) and 1 <= g[key] <= MAX_POWER_ITERS,
            f"an integer in [1, {MAX_POWER_ITERS}] (each iteration is two more passes over every matrix per step; "
            "warm-started, 1 is enough)",
        )
    _check("cap_vectors", g["cap_vectors"], isinstance(g["cap_vectors"], bool), "True or False")
    _check("sigma_mode", g["sigma_mode"], g["sigma_mode"] in SIGMA_MODES, f"one of {SIGMA_MODES} (used when matrices are sharded)")
    for p in g["params"]:
        if torch.is_complex(p):
            raise ValueError(
                f"AdamWeyl: complex parameters are not supported (got a {p.dtype} tensor of shape {tuple(p.shape)}); "
                "the σ1 cap is defined for real matrices — optimise real and imaginary parts as separate real tensors"
            )
        if not p.is_floating_point():
            raise ValueError(f"AdamWeyl: parameters must be floating point, got {p.dtype} of shape {tuple(p.shape)}")


def _check_capturable(plan: StepPlan) -> None:
    """``capturable=True`` steps parameters whole on one device: matrices split across ranks are refused (their σ
    collectives are not capturable yet)."""
    if plan.sigma is not None:
        raise RuntimeError(
            f"AdamWeyl(capturable=True) steps parameters whole on one device; these are split across ranks by "
            f"{plan.engine}, whose σ collectives are not capturable yet. Use capturable=False under ZeRO, FSDP2 and "
            "tensor parallelism."
        )


def _host_or_device_lr(lr: float | Tensor) -> float | Tensor:
    """A Python float, unless the lr is a tensor on an accelerator: then it stays there (no host sync)."""
    if isinstance(lr, Tensor) and lr.device.type != "cpu":
        return lr
    return float(lr)


class _KeepDtype:
    """A state tensor passing through ``Optimizer.load_state_dict`` in its own dtype (torch casts every
    floating state tensor to its parameter's dtype, which would round the fp32 vectors of bf16 parameters)."""

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


class _CounterOwners:
    """Which state key owns each step counter, by identity and without keeping either alive: id(counter) → weak
    references to the counter and its key. An entry whose counter died no longer matches (a new tensor that reuses
    the id is not the one referenced). A lookup is a dict read and two weak-reference calls (``_state_for`` asks once
    per unit and step; ``WeakIdKeyDictionary`` made a new weak reference for every lookup)."""

    def __init__(self) -> None:
        self._refs: dict[int, tuple[weakref.ref, weakref.ref]] = {}
        self._live_at_prune = 0

    def owns(self, key: Tensor, counter: Tensor) -> bool:
        entry = self._refs.get(id(counter))
        return entry is not None and entry[0]() is counter and entry[1]() is key

    def claim(self, key: Tensor, counter: Tensor) -> None:
        if len(self._refs) > 2 * self._live_at_prune + 64:  # drop the entries of dead counters now and then
            self._refs = {i: e for i, e in self._refs.items() if e[0]() is not None}
            self._live_at_prune = len(self._refs)
        self._refs[id(counter)] = (weakref.ref(counter), weakref.ref(key))


class AdamWeyl(Optimizer):
    r"""AdamW with the AdamW² cap: per tensor and step, lr·σ1(update) ≤ τ·σ1(weight).

    Implements Algorithm 1 of "Taming Transformer Without Using Learning Rate Warmup" (Qi et al.,
    ICLR 2025) with ``torch.optim.AdamW``'s denominator ``sqrt(v̂) + eps``. With a τ that never binds
    it is AdamW. The cap only lowers this step's lr of that tensor; the group's (scheduled) lr is
    unchanged, so LR schedulers work as with AdamW.

    Args:
        params: parameters or param groups (each group may override every option below).
        lr: learning rate α (the scheduled, uncapped value).
        betas: (β1, β2) for the first and second moments.
        eps: ε added to sqrt(v̂).
        weight_decay: decoupled weight decay λ; applied with the *capped* lr.
        tau: τ, the largest relative change of σ1 per step (paper: 0.01 for GPT, 0.004 for ViT).
        power_iters: power-iteration steps per optimizer step (warm-started; 1 is enough, see docs).
        cap_vectors: also cap 1-D tensors (norm gains, biases) by their ℓ2 norm. Default: only
            tensors with ≥ 2 dims, viewed as (shape[0], rest), are capped.
        cold_start_iters: power-iteration steps on a tensor's first step, when its vectors are new, and for
            σ1(U) during its first ``FRESH_STEPS`` (10) steps, while Adam's direction changes fastest.
        sigma_mode: how σ's are computed when an engine shards the matrices (DeepSpeed ZeRO, FSDP2):
            ``"vector_reduce"`` (all-reduce only the power-iteration vectors) or ``"gather"``
            (all-gather whole matrices). Ignored for tensors that are whole on one device.
        capturable: as ``torch.optim.AdamW(capturable=True)``: step counters live on the parameters' device and
            ``step()`` reads no device value on the host (give ``lr`` as a device tensor to change it between
            replays), so the step can be captured in a CUDA graph. Moments and U then come from torch's fused
            AdamW kernel where it serves the layouts, else from foreach ops with bias corrections computed on the
            device; every path is the eager one; parameters split across ranks are refused; and the extra σ1(U) iterations of the first ``FRESH_STEPS`` steps follow the number of ``step()``
            calls of this optimizer object (a resumed one repeats them: more iterations, never fewer), σ1(W)'s
            too. Capture after a first eager step, which creates the state and the buffers the step reuses.

    ``torch.compile(optimizer.step, fullgraph=True)`` compiles with no graph break: one graph for the first step
    (which creates the state) and one for the others. A compiled step has no step count to branch on, so it gives
    σ1(U) ``cold_start_iters`` iterations on a tensor's first step only, not during its first ``FRESH_STEPS``
    (a looser cap in steps 2–10); compile after ``FRESH_STEPS`` eager steps to keep them, as the eager step does.

    After each ``step()``, ``last_stats`` holds a :class:`CapStats` (device tensors, no sync).

    Non-finite gradients propagate as in AdamW (the weights become non-finite; use a GradScaler,
    DeepSpeed's overflow check or ``clip_grad_norm_(error_if_nonfinite=True)``); the stored
    power-iteration vectors are never replaced by non-finite values.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        tau: float = 0.01,
        power_iters: int = 1,
        cap_vectors: bool = False,
        cold_start_iters: int = DEFAULT_COLD_START_ITERS,
        sigma_mode: str = "vector_reduce",
        capturable: bool = False,
    ):
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            tau=tau,
            power_iters=power_iters,
            cap_vectors=cap_vectors,
            cold_start_iters=cold_start_iters,
            sigma_mode=sigma_mode,
        )
        _validate_group({**defaults, "params": []})
        _check("capturable", capturable, isinstance(capturable, bool), "True or False")
        #: (an optimizer-wide option, not a param-group key: checkpoints saved without it keep loading through DCP,
        #: which asks the checkpoint for every key of the optimizer's groups)
        self.capturable = capturable
        self._group_params: list[list[Tensor]] = []  # each group's parameters as built (engines may swap them)
        self._built_ids: set[int] = set()
        self._adapters: dict[str, EngineAdapter] = {}
        self._claimed: dict[int, tuple[tuple, EngineAdapter | None]] = {}  # see _adapter_for
        self._group_stats: dict[int, dict[int, CapStats]] = {}  # group index → first parameter's position → stats
        self._work = WorkBuffer()  # the fused CPU step's buffer for U, kept between steps
        self._counters = _CounterOwners()  # step counter → the state key that owns it
        self._calls: dict[int, int] = {}  # group index → step() calls that stepped it (the capturable fresh rule)
        super().__init__(params, defaults)
        _guard_foreign_steps()
        for adapter in _ENGINE_ADAPTERS:
            adapter.check_construction(self)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_group(group)
        group[GROUP_INDEX] = len(self._group_params)
        self._group_params.append(list(group["params"]))
        for p in group["params"]:  # (their start vectors, made now: a step under torch.compile only copies them)
            if is_capped(p.shape, group["cap_vectors"]):
                initial_vector(vector_length(p.shape))
        self._built_ids.update(id(p) for p in group["params"])
        self._adapter_for(group)  # refuse layouts no adapter can honour (e.g. FSDP1) at construction

    @property
    def num_built_groups(self) -> int:
        """How many param groups the optimizer was built with (``add_param_group`` included)."""
        return len(self._group_params)

    def group_params(self, group: dict[str, Any]) -> list[Tensor]:
        """The parameters ``group`` was built with (an engine such as DeepSpeed ZeRO may have replaced them)."""
        index = group.get(GROUP_INDEX, 0)
        return self._group_params[index] if index < len(self._group_params) else []

    def replaced_tensors(self, group: dict[str, Any]) -> list[Tensor]:
        """The tensors of ``group`` that are not parameters the optimizer was built with."""
        return [t for t in group["params"] if id(t) not in self._built_ids]

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Called on unpickling and by ``load_state_dict`` (before its post-hooks run): restore the fp32
        # power-iteration vectors and turn a plain-number ``step`` (older AdamW checkpoints) into a tensor.
        super().__setstate__(state)
        for p, s in self.state.items():
            for key, value in s.items():
                if isinstance(value, _KeepDtype):
                    s[key] = value.tensor.to(device=p.device, copy=True)
            if "step" in s and not torch.is_tensor(s["step"]):
                s["step"] = torch.tensor(float(s["step"]), dtype=torch.float32)
        for i, g in enumerate(self.param_groups):
            for key in OPTIONS:  # groups saved by older versions lack newer options
                g.setdefault(key, self.defaults[key])
            g.setdefault(GROUP_INDEX, i)
        self.__dict__.setdefault("_group_params", [list(g["params"]) for g in self.param_groups])
        self.__dict__.setdefault("_built_ids", {id(p) for g in self._group_params for p in g})
        self.__dict__.setdefault("_adapters", {})
        self.__dict__.setdefault("_claimed", {})
        self.__dict__.setdefault("_group_stats", {})
        self.__dict__.setdefault("_work", WorkBuffer())
        self.__dict__.setdefault("_counters", _CounterOwners())
        self.__dict__.setdefault("_calls", {})
        self.__dict__.setdefault("capturable", False)
        self.__dict__.pop("last_stats", None)  # (a property now; older pickles carried it as an attribute)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``Optimizer.load_state_dict``; the power-iteration vectors keep their dtype (bit-identical resume)."""
        state_dict = dict(state_dict)
        state_dict["state"] = {
            pid: {k: _KeepDtype(v) if k in KEEP_DTYPE_STATE and torch.is_tensor(v) else v for k, v in s.items()}
            for pid, s in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)

    def _adapter_for(self, group: dict[str, Any]) -> EngineAdapter | None:
        """The engine adapter that steps ``group``, or None when its tensors are the parameters themselves.
        Decided once per group and set of tensors; asked again when an engine swaps the group's tensors or
        reshapes them in place (FSDP1 with ``use_orig_params`` turns the same Parameters into 1-D views)."""
        key = tuple((id(p), type(p), p.shape) for p in group["params"])
        known = self._claimed.get(id(group))
        if known is not None and known[0] == key:
            return known[1]
        adapter = self._find_adapter(group)
        self._claimed[id(group)] = (key, adapter)
        return adapter

    def _find_adapter(self, group: dict[str, Any]) -> EngineAdapter | None:
        for cls in _ENGINE_ADAPTERS:
            if cls.claims(self, group):
                if cls.name not in self._adapters:
                    self._adapters[cls.name] = cls()
                return self._adapters[cls.name]
        foreign = next(iter(self.replaced_tensors(group)), None)
        if foreign is not None:
            raise RuntimeError(
                f"AdamWeyl: a param group holds a tensor of shape {tuple(foreign.shape)} that is not one of the "
                "parameters the optimizer was built with, and no engine adapter recognises it (no DeepSpeed ZeRO "
                "fragment mapping, no FSDP2 DTensor). Refusing to fall back to AdamW on flattened or sharded "
                "pieces, which would compute σ1 of the wrong matrices. Build AdamWeyl on the model's parameters "
                "and pass it to deepspeed.initialize / accelerate / the HF Trainer unchanged, or shard with FSDP2 "
                "(torch.distributed.fsdp.fully_shard) before building it."
            )
        return None

    def _describe(self, group: dict[str, Any]) -> StepPlan:
        """The plan of a group of parameters whole on this device: one unit per parameter with a gradient."""
        return StepPlan([Unit(p, p, p.grad, [Part(p, p.shape)]) for p in group["params"] if p.grad is not None])

    def _state_for(self, unit: Unit, capped: list[bool], keep_product: bool,
                   capturable: bool = False) -> tuple[dict[str, Any], list, list, list, bool]:
        """The state of ``unit`` — the one place optimizer state is created — and its parts' (weight vector, update
        vector, kept b_W) (None where a part is not capped); True if some vector starts cold.

        Moments are shaped like the unit's key (a parameter, a DTensor, a flat partition). The step counter is a CPU
        fp32 tensor owned by this unit: one shared with another state (DeepSpeed's ZeRO-3 universal-checkpoint load
        puts one tensor into every sub-group) is copied first, so no step is counted twice; ``capturable``: it lives on
        the unit's device instead. Vectors (fp32, length
        min(m, n) of the full matrix) are kept per tensor for a unit that is one parameter, and packed
        (:data:`PACKED_VECTORS`) for a unit holding several parameters' pieces; ``keep_product``: whole CPU
        matrices keep b_W for the fused step."""
        key = unit.key
        state = self.state[key]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(key, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(key, memory_format=torch.preserve_format)
        step = state.get("step", 0.0)
        where = unit.param.device if capturable else torch.device("cpu")
        if torch.compiler.is_compiling():  # (a compiled step is single-device: no engine shares counters)
            if not torch.is_tensor(step):
                state["step"] = torch.zeros((), dtype=torch.float32, device=where)
        elif (not torch.is_tensor(step) or not self._counters.owns(key, step) or step.device != where
              or step.dtype != torch.float32):
            state["step"] = step = torch.as_tensor(step, dtype=torch.float32).to(where, copy=True)
            self._counters.claim(key, step)
        cold = False
        none = [None] * len(capped)
        if not any(capped):
            return state, none, none, none, cold
        parts = unit.parts
        if len(parts) == 1 and parts[0].param is key:
            if WEIGHT_VECTOR not in state:
                k = vector_length(parts[0].shape)
                state[WEIGHT_VECTOR] = initial_vector(k, key.device)
                state[UPDATE_VECTOR] = initial_vector(k, key.device)
                cold = True
            if keep_product and key.device.type == "cpu" and WEIGHT_PRODUCT not in state:
                state[WEIGHT_PRODUCT] = torch.zeros(0, dtype=torch.float64)  # none yet: the first fused step computes it
            return state, [state[WEIGHT_VECTOR]], [state[UPDATE_VECTOR]], [state.get(WEIGHT_PRODUCT)], cold
        lengths = [vector_length(part.shape) for part, c in zip(parts, capped) if c]
        saved = state.get(PACKED_VECTORS)
        if isinstance(saved, dict) and [int(k) for k in saved.get("lengths", ())] == lengths:
            vectors = saved["vectors"]
            if vectors.device != unit.param.device or vectors.dtype != torch.float32:  # e.g. loaded onto the CPU
                saved["vectors"] = vectors = vectors.to(device=unit.param.device, dtype=torch.float32)
        else:  # new, or laid out differently (a universal checkpoint drops them): cold
            row = torch.cat([initial_vector(k) for k in lengths])
            vectors = torch.stack([row, row.clone()]).to(unit.param.device)
            state[PACKED_VECTORS] = {"vectors": vectors, "lengths": list(lengths)}
            cold = True
        w_vecs, u_vecs = iter(vectors[0].split(lengths)), iter(vectors[1].split(lengths))
        return state, [next(w_vecs) if c else None for c in capped], [next(u_vecs) if c else None for c in capped], \
            none, cold

    def _step_plan(self, group: dict[str, Any], plan: StepPlan) -> list[tuple[list[Unit], CapStats]]:
        """AdamW² on the units of ``plan`` (:func:`~hf_weyl.core.functional.adamweyl`), bucketed by device and dtype;
        each bucket's units and statistics."""
        beta1, beta2 = group["betas"]
        capturable = self.capturable
        if capturable:
            _check_capturable(plan)
        buckets: dict[tuple[torch.device, torch.dtype], list[Unit]] = {}
        for unit in plan.units:
            if unit.grad.is_sparse:
                raise RuntimeError(
                    f"AdamWeyl does not support sparse gradients (parameter of shape {tuple(unit.key.shape)}); "
                    "use dense gradients (e.g. nn.Embedding(sparse=False))"
                )
            buckets.setdefault((unit.param.device, unit.param.dtype), []).append(unit)

        out = []
        for units in buckets.values():
            capped = [[is_capped(part.shape, group["cap_vectors"]) for part in u.parts] for u in units]
            states, w_vecs, u_vecs, products, cold = [], [], [], [], False
            for unit, c in zip(units, capped):
                state, wv, uv, wp, unit_cold = self._state_for(unit, c, plan.sigma is None and not capturable, capturable)
                states.append(state), w_vecs.extend(wv), u_vecs.extend(uv), products.extend(wp)
                cold |= unit_cold
            if torch.compiler.is_compiling():  # nothing to branch on that the graph need not guard on
                fresh = False
            elif capturable:  # no host read: the step() calls of this object
                fresh = self._calls.get(group[GROUP_INDEX], 0) < FRESH_STEPS
            else:
                fresh = is_fresh([s["step"] for s, c in zip(states, capped) if any(c)])
            iters = power_iters_for(group["power_iters"], group["cold_start_iters"], cold=cold, fresh=fresh)
            if capturable:  # W's and U's always in the same products: a fresh step builds no other buffers
                iters = PowerIters(max(iters), max(iters))
            lists = ([u.param for u in units], [u.grad for u in units], [plan.local(s["exp_avg"]) for s in states],
                     [plan.local(s["exp_avg_sq"]) for s in states])
            parts = [u.parts for u in units]
            lr = _host_or_device_lr(group["lr"])
            flags = tuple(c for cs in capped for c in cs)
            if capturable:
                impl = "eager"
            else:
                impl = choose_impl(*lists, parts, flags, lr=lr, power_iters=iters, sigma=plan.sigma,
                                   sigma_mode=group["sigma_mode"])
            ratio, sw, su = adamweyl(
                *lists, [s["step"] for s in states], parts, w_vecs, u_vecs, products,
                lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                tau=group["tau"], power_iters=iters, impl=impl, sigma=plan.sigma, sigma_mode=group["sigma_mode"],
                work=self._work, no_host_reads=capturable,
            )
            capped_t = constant_tensor(self._work, "capped", flags, ratio.device, torch.bool)
            out.append((units, CapStats([part.param for u in units for part in u.parts], ratio, sw, su, capped_t,
                                        plan.engine)))
        if not torch.compiler.is_compiling():
            self._calls[group[GROUP_INDEX]] = self._calls.get(group[GROUP_INDEX], 0) + 1
        return out

    def step_plan(self, group: dict[str, Any], plan: StepPlan) -> CapStats | None:
        """Step the units an adapter described for ``group`` (what ``step()`` does with each group's plan) and keep
        their statistics for ``last_stats``; returns this call's statistics (None: nothing had a gradient)."""
        stats = self._step_plan(group, plan)
        self._record(group, plan, stats)
        return CapStats.cat([s for _, s in stats]) if stats else None

    def _record(self, group: dict[str, Any], plan: StepPlan, stats: list[tuple[list[Unit], CapStats]]) -> None:
        """Keep the group's statistics: this step's, or (``plan.partial``: ZeRO steps one flat partition per call)
        merged with those of the units not stepped in this call, in the order of the group's parameters."""
        index = group[GROUP_INDEX]
        if not plan.partial:
            self._group_stats[index] = {i: s for i, (_, s) in enumerate(stats)}
            return
        kept = self._group_stats.setdefault(index, {})
        originals = self.group_params(group)
        for units, s in stats:
            pos = 0
            for unit in units:
                k, first = len(unit.parts), unit.parts[0].param
                kept[next(j for j, p in enumerate(originals) if p is first)] = CapStats(
                    s.params[pos : pos + k], s.lr_ratio[pos : pos + k], s.sigma_weight[pos : pos + k],
                    s.sigma_update[pos : pos + k], s.capped[pos : pos + k], s.engine)
                pos += k

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            if not group["params"]:
                continue  # (DeepSpeed ZeRO-3 empties the groups it is not stepping in this call)
            adapter = self._adapter_for(group)
            plan = adapter.describe(self, group) if adapter is not None else self._describe(group)
            if plan is not None:
                self.step_plan(group, plan)
        return loss

    @property
    def last_stats(self) -> CapStats | None:
        """What the cap did in the last ``step()`` of each group (:class:`CapStats`, device tensors, no sync), in group
        order; None before the first step."""
        kept = [self._group_stats[i] for i in sorted(self._group_stats)]
        parts = [stats[k] for stats in kept for k in sorted(stats)]
        return CapStats.cat(parts) if parts else None


def unwrap_adamweyl(optimizer: Any) -> AdamWeyl | None:
    """The ``AdamWeyl`` inside wrappers (accelerate's ``AcceleratedOptimizer``, DeepSpeed's ZeRO/BF16
    optimizers, ...), found by following ``.optimizer``; None if there is none."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, AdamWeyl):
            return optimizer
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return None
