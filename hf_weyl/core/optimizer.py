"""``AdamWeyl``: AdamW with the AdamW² per-tensor learning-rate cap (see ``hf_weyl.core.functional``)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .functional import adamweyl_step, is_capped
from .power_iteration import initial_vector, vector_length
from ..integrations.deepspeed import SIGMA_MODES, check_active_deepspeed_config, is_zero_partition, zero_layout, zero_step

__all__ = ["AdamWeyl", "CapStats", "DEFAULT_COLD_START_ITERS", "unwrap_adamweyl"]

#: Power-iteration steps on a tensor's first optimizer step (its vectors start cold).
DEFAULT_COLD_START_ITERS = 4

#: Optimizer-state keys of the power-iteration vectors (fp32, kept between steps).
WEIGHT_VECTOR = "weight_vector"
UPDATE_VECTOR = "update_vector"

#: Param-group key: the group's position when it was added (DeepSpeed ZeRO narrows ``param_groups``
#: to one group per call; this finds the parameters the group was built with).
GROUP_INDEX = "weyl_group_index"


@dataclass
class CapStats:
    """What the cap did in the last ``step()``, as device tensors (reading them syncs, building them doesn't).

    ``lr_ratio[i]`` is effective / scheduled lr of ``params[i]`` (1.0 = not capped);
    ``sigma_weight``/``sigma_update`` are the σ1 estimates (0 where the tensor is not capped).
    """

    params: list[Tensor]
    lr_ratio: Tensor
    sigma_weight: Tensor
    sigma_update: Tensor
    capped: Tensor  # bool: the tensors AdamW² applies to (≥2-D, or 1-D with cap_vectors)

    @property
    def num_capped(self) -> int:
        """Tensors whose lr the cap reduced this step (syncs)."""
        return int((self.lr_ratio < 1).sum())

    @property
    def capped_fraction(self) -> float:
        """Fraction of the capped-eligible tensors whose lr was reduced (syncs)."""
        eligible = int(self.capped.sum())
        return self.num_capped / eligible if eligible else 0.0

    def named_lr_ratio(self, names: dict[Tensor, str] | Any) -> dict[str, float]:
        """``{name: ratio}`` given a model (its ``named_parameters``) or a {param: name} mapping (syncs)."""
        if hasattr(names, "named_parameters"):
            names = {p: n for n, p in names.named_parameters()}
        by_id = {id(p): n for p, n in names.items()}
        values = self.lr_ratio.tolist()
        return {by_id.get(id(p), f"param_{i}"): v for i, (p, v) in enumerate(zip(self.params, values))}


def _check_range(name: str, value: Any, ok: bool, valid: str) -> None:
    if not ok:
        raise ValueError(f"AdamWeyl: invalid {name}={value!r}; {name} must be {valid}")


def _validate_group(g: dict[str, Any]) -> None:
    lr = g["lr"]
    lr_value = float(lr) if isinstance(lr, Tensor) and lr.numel() == 1 else lr
    _check_range("lr", lr, isinstance(lr_value, (int, float)) and lr_value >= 0, "a number >= 0")
    betas = g["betas"]
    _check_range(
        "betas",
        betas,
        isinstance(betas, (tuple, list)) and len(betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas),
        "a pair (beta1, beta2) with each value in [0, 1)",
    )
    _check_range("eps", g["eps"], isinstance(g["eps"], (int, float)) and g["eps"] >= 0, "a number >= 0")
    _check_range(
        "weight_decay", g["weight_decay"], isinstance(g["weight_decay"], (int, float)) and g["weight_decay"] >= 0, "a number >= 0"
    )
    tau = g["tau"]
    _check_range("tau", tau, isinstance(tau, (int, float)) and tau > 0 and tau != float("inf"), "a finite number > 0 (the paper uses 0.004-0.01)")
    pi = g["power_iters"]
    _check_range("power_iters", pi, isinstance(pi, int) and not isinstance(pi, bool) and pi >= 1, "an integer >= 1")
    _check_range("cap_vectors", g["cap_vectors"], isinstance(g["cap_vectors"], bool), "True or False")
    _check_range("sigma_mode", g["sigma_mode"], g["sigma_mode"] in SIGMA_MODES, f"one of {SIGMA_MODES} (used under DeepSpeed ZeRO)")
    for p in g["params"]:
        if torch.is_complex(p):
            raise ValueError(
                f"AdamWeyl: complex parameters are not supported (got a {p.dtype} tensor of shape {tuple(p.shape)}); "
                "the σ1 cap is defined for real matrices — optimise real and imaginary parts as separate real tensors"
            )
        if not p.is_floating_point():
            raise ValueError(f"AdamWeyl: parameters must be floating point, got {p.dtype} of shape {tuple(p.shape)}")


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
        cold_start_iters: power-iteration steps on a tensor's first step, when its vectors are new.
        sigma_mode: how σ's are computed when DeepSpeed ZeRO shards the parameters (chosen
            automatically, see ``hf_weyl.integrations.deepspeed``): ``"vector_reduce"`` (all-reduce only the
            power-iteration vectors) or ``"gather"`` (all-gather whole matrices). Ignored otherwise.

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
    ):
        if isinstance(betas, list):
            betas = tuple(betas)
        _check_range(
            "cold_start_iters",
            cold_start_iters,
            isinstance(cold_start_iters, int) and not isinstance(cold_start_iters, bool) and cold_start_iters >= 1,
            "an integer >= 1",
        )
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            tau=tau,
            power_iters=power_iters,
            cap_vectors=cap_vectors,
            cold_start_iters=cold_start_iters,
            sigma_mode=sigma_mode,
        )
        _validate_group({**defaults, "params": []})
        check_active_deepspeed_config()  # refuse DeepSpeed configs we cannot honour, at construction
        self._built_with: list[list[Tensor]] = []  # each group's parameters (ZeRO replaces them later)
        self._zero_stats: dict[tuple[int, int], tuple] = {}
        self._zero_checked: set[int] = set()
        super().__init__(params, defaults)
        self.last_stats: CapStats | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _validate_group(self.param_groups[-1])
        self.param_groups[-1][GROUP_INDEX] = len(self._built_with)
        self._built_with.append(list(self.param_groups[-1]["params"]))

    def _repair_group_indices(self) -> None:
        """Give every group back its own index after DeepSpeed's ZeRO-3 universal-checkpoint load.

        That load (DeepSpeed 0.19: ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``) copies
        param group 0's entries into every group, our group index included. ZeRO-3 keeps the groups in
        their original order (ZeRO-1/2 narrow ``param_groups`` to one group per call, so this never fires
        there), which lets us restore the indices by position.
        """
        groups = self.param_groups
        indices = [g.get(GROUP_INDEX) for g in groups]
        if len(groups) < 2 or len(groups) != len(self._built_with) or len(set(indices)) == len(indices):
            return
        for i, g in enumerate(groups):
            g[GROUP_INDEX] = i
        warnings.warn(
            "AdamWeyl: every param group carried param group 0's entries (what DeepSpeed's ZeRO-3 universal-"
            "checkpoint load does); AdamWeyl restored its own group bookkeeping, but hyperparameters such as "
            f"weight_decay are now group 0's in every group: {[g['weight_decay'] for g in groups]}. Set them "
            "again after loading if your groups differ (e.g. no weight decay for biases and norms).",
            stacklevel=3,
        )

    def _zero_group_step(self, group: dict[str, Any]) -> bool:
        """If DeepSpeed ZeRO replaced this group's parameters by flat fp32 partitions, step them with
        collectively computed σ's (``hf_weyl.integrations.deepspeed``) and return True; False for an ordinary group."""
        index = group.get(GROUP_INDEX, 0)
        built_with = self._built_with[index] if index < len(self._built_with) else []
        flats = group["params"]
        built_ids = {id(p) for p in built_with}
        if not flats or not any(is_zero_partition(f, built_ids) for f in flats):
            return bool(built_with) and not flats  # ZeRO-3 empties the groups it is not stepping
        for flat in flats:
            layout = zero_layout(flat, built_with)
            first = id(flat) not in self._zero_checked
            result = zero_step(self, group, flat, layout, first)
            self._zero_checked.add(id(flat))
            if result is not None:
                first_param = next(j for j, p in enumerate(built_with) if p is layout.params[0])
                self._zero_stats[(index, first_param)] = result
        if self._zero_stats:
            parts = [self._zero_stats[k] for k in sorted(self._zero_stats)]
            device = parts[0][1].device
            self.last_stats = CapStats(
                [p for part in parts for p in part[0]],
                *(torch.cat([part[i].to(device) for part in parts]) for i in range(1, 5)),
            )
        return True

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("last_stats", None)
        self.__dict__.setdefault("_built_with", [list(g["params"]) for g in self.param_groups])
        self.__dict__.setdefault("_zero_stats", {})
        self.__dict__.setdefault("_zero_checked", set())

    def _init_state(self, p: Tensor, capped: bool) -> bool:
        """Create missing state for ``p``; True if its power-iteration vectors start cold."""
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if capped and WEIGHT_VECTOR not in state:
            k = vector_length(p.shape)
            state[WEIGHT_VECTOR] = initial_vector(k, p.device)
            state[UPDATE_VECTOR] = initial_vector(k, p.device)
            return True
        return False

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        self._repair_group_indices()
        all_params, ratios, sws, sus, caps = [], [], [], [], []
        for group in self.param_groups:
            if self._zero_group_step(group):
                continue
            beta1, beta2 = group["betas"]
            lr = float(group["lr"])
            buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"AdamWeyl does not support sparse gradients (parameter of shape {tuple(p.shape)}); "
                        "use dense gradients (e.g. nn.Embedding(sparse=False))"
                    )
                buckets.setdefault((p.device, p.dtype), []).append(p)

            for params in buckets.values():
                capped_flags = [is_capped(p.shape, group["cap_vectors"]) for p in params]
                cold = any([self._init_state(p, c) for p, c in zip(params, capped_flags)])
                states = [self.state[p] for p in params]
                iters = max(group["power_iters"], group["cold_start_iters"]) if cold else group["power_iters"]
                ratio, sw, su = adamweyl_step(
                    params,
                    [p.grad for p in params],
                    [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states],
                    [s["step"] for s in states],
                    [s[WEIGHT_VECTOR] if c else None for s, c in zip(states, capped_flags)],
                    [s[UPDATE_VECTOR] if c else None for s, c in zip(states, capped_flags)],
                    lr=lr,
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    tau=group["tau"],
                    power_iters=iters,
                )
                all_params.extend(params)
                device = ratios[0].device if ratios else ratio.device
                ratios.append(ratio.to(device))
                sws.append(sw.to(device))
                sus.append(su.to(device))
                caps.append(torch.tensor(capped_flags, device=device))

        if all_params:
            self.last_stats = CapStats(all_params, torch.cat(ratios), torch.cat(sws), torch.cat(sus), torch.cat(caps))
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``Optimizer.load_state_dict``, but the power-iteration vectors stay fp32.

        (torch casts every floating state tensor to its parameter's dtype, which would round
        the vectors of bf16/fp16 parameters and break bit-identical resumption.)
        """
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        vectors = {
            pid: {k: v for k, v in state_dict["state"][pid].items() if k in (WEIGHT_VECTOR, UPDATE_VECTOR)}
            for pid in saved_ids
            if pid in state_dict["state"]
        }
        super().load_state_dict(state_dict)
        for i, g in enumerate(self.param_groups):  # groups saved by older versions lack newer options
            for key, value in self.defaults.items():
                g.setdefault(key, value)
            g[GROUP_INDEX] = i
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params):
            for key, value in vectors.get(pid, {}).items():
                self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)


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
