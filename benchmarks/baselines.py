"""Warmup-free baselines for the comparison in ``benchmarks/warmup_free.py`` (SPEC §3).

- ``GIAdam``: AdamW with the second moment initialised to the first gradient squared (v₀ = g₀²;
  Kalra & Barkeshli 2024). Our choice: v is then an unbiased estimate from step 1, so only the first
  moment is bias-corrected (with v₀ = 0 Adam's first steps are sign(g)-sized; here they are too, but
  v does not forget the initial scale during the first ~1/(1−β2) steps).
- ``LionA`` / ``LionAR``: Kosson et al. 2024 released no code; our reading of the description:
  Lion direction u = sign(β m_t + (1−β) g_t) with m_t = β m_{t−1} + (1−β) g_t (Nesterov, one β = 0.98).
  For every neuron (a row of a Linear weight, a column of GPT-2's Conv1D: ``neuron_dim``) the step is
  *angular*: Δw = −η·c_t·‖w‖·u/‖u‖ (η = lr in radians), then w is rescaled to its initial norm (no
  weight decay: the norm is held fixed). c_t = 1 − β^t is the "inverse bias correction" (momentum
  not divided by 1 − β^t; it multiplies the step, so early steps are small). Vectors (gains, biases)
  get a plain Lion step lr·c_t·u with decoupled weight decay.
  ``LionAR`` additionally corrects the relative representation change for the gradient SNR: with the
  coherence φ = ‖m̂‖²/E‖g‖² of the tensor (m̂ = m/(1−β^t); E‖g‖² an EMA of ‖g‖²), which is
  (1−β)/(1+β) for pure noise and 1 for a constant gradient, the angular step is multiplied by
  min(1, sqrt(φ_noise/φ)): high-SNR (early) phases move the representation less.
- ``MuonWithAdamW``: ``torch.optim.Muon`` for the hidden 2-D matrices (``adjust_lr_fn="match_rms_adamw"``
  so one lr serves both) and ``torch.optim.AdamW`` for everything else; one optimizer object whose
  ``param_groups`` are shared with both, so LR schedulers and ``Trainer`` work unchanged.
- StableAdamW comes from transformers' own ``optim="stable_adamw"`` handler (needs ``torch-optimi``):
  see ``stable_adamw``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import AdamW, Muon, Optimizer

__all__ = ["GIAdam", "LionA", "LionAR", "MuonWithAdamW", "lion_param_groups", "muon_param_groups", "stable_adamw"]


def _check(cls: str, name: str, value: Any, ok: bool, valid: str) -> None:
    if not ok:
        raise ValueError(f"{cls}: invalid {name}={value!r}; {name} must be {valid}")


class GIAdam(Optimizer):
    """AdamW with v₀ = g₀² ("gradient-initialised" Adam); only m is bias-corrected (see module doc)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        _check("GIAdam", "lr", lr, lr >= 0, ">= 0")
        _check("GIAdam", "betas", betas, len(betas) == 2 and all(0 <= b < 1 for b in betas), "a pair in [0, 1)")
        _check("GIAdam", "eps", eps, eps >= 0, ">= 0")
        _check("GIAdam", "weight_decay", weight_decay, weight_decay >= 0, ">= 0")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = g.square()  # v₀ = g₀²
                st["step"] += 1
                st["exp_avg"].lerp_(g, 1 - beta1)
                st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                m_hat = st["exp_avg"] / (1 - beta1 ** st["step"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(m_hat, st["exp_avg_sq"].sqrt().add_(group["eps"]), value=-group["lr"])
        return loss


class LionA(Optimizer):
    """Lion with angular per-neuron updates on a fixed-norm sphere (our reading of Kosson et al.'s LionA)."""

    _correct_rrc = False

    def __init__(self, params, lr: float = 1e-2, beta: float = 0.98, weight_decay: float = 0.0, neuron_dim: int = 0):
        name = type(self).__name__
        _check(name, "lr", lr, lr >= 0, ">= 0 (radians per step for matrices)")
        _check(name, "beta", beta, 0 <= beta < 1, "in [0, 1)")
        _check(name, "weight_decay", weight_decay, weight_decay >= 0, ">= 0")
        _check(name, "neuron_dim", neuron_dim, neuron_dim in (0, 1), "0 (rows, nn.Linear) or 1 (columns, GPT-2 Conv1D)")
        super().__init__(params, dict(lr=lr, beta=beta, weight_decay=weight_decay, neuron_dim=neuron_dim))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta, lr = group["beta"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(g)
                    st["grad_sq"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    if p.ndim >= 2:
                        st["neuron_norm"] = self._neuron_norms(p.float(), group["neuron_dim"])
                st["step"] += 1
                t = st["step"]
                m = st["exp_avg"].lerp_(g, 1 - beta)
                u = torch.sign(m * beta + g * (1 - beta))
                scale = lr * (1 - beta**t)  # inverse bias correction
                if p.ndim < 2:
                    p.mul_(1 - lr * group["weight_decay"]).add_(u.to(p.dtype), alpha=-scale)
                    continue
                if self._correct_rrc:
                    st["grad_sq"].lerp_(g.square().sum(), 1 - beta)
                    m_hat_sq = m.square().sum() / (1 - beta**t) ** 2
                    phi = m_hat_sq / (st["grad_sq"] / (1 - beta**t)).clamp_min(1e-30)
                    phi_noise = (1 - beta) / (1 + beta)
                    scale = scale * float(torch.clamp(torch.sqrt(phi_noise / phi.clamp_min(1e-30)), max=1.0))
                d = group["neuron_dim"]
                w = p.float()
                norms = st["neuron_norm"]
                u_norm = self._neuron_norms(u, d).clamp_min(1e-30)
                w = w - scale * self._expand(norms / u_norm, d, w) * u
                w = w * self._expand(norms / self._neuron_norms(w, d).clamp_min(1e-30), d, w)
                p.copy_(w)
        return loss

    @staticmethod
    def _neuron_norms(t: Tensor, dim: int) -> Tensor:
        m = t.reshape(t.shape[0], -1)
        return m.norm(dim=1) if dim == 0 else m.norm(dim=0)

    @staticmethod
    def _expand(v: Tensor, dim: int, like: Tensor) -> Tensor:
        if dim == 0:
            return v.reshape(-1, *([1] * (like.ndim - 1)))
        return v.reshape(1, *like.shape[1:])


class LionAR(LionA):
    """LionA with the gradient-SNR correction of the relative representation change (see module doc)."""

    _correct_rrc = True


def lion_param_groups(model: nn.Module, lr: float) -> list[dict[str, Any]]:
    """Param groups for ``LionA``/``LionAR``: GPT-2 ``Conv1D`` weights (in, out) use ``neuron_dim=1``."""
    from transformers.pytorch_utils import Conv1D

    conv = {id(m.weight) for m in model.modules() if isinstance(m, Conv1D)}
    cols = [p for p in model.parameters() if id(p) in conv]
    rows = [p for p in model.parameters() if id(p) not in conv]
    return [g for g in ({"params": rows, "lr": lr, "neuron_dim": 0}, {"params": cols, "lr": lr, "neuron_dim": 1}) if g["params"]]


def muon_param_groups(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """(hidden 2-D matrices for Muon, everything else for AdamW): embeddings, the output head and
    vectors go to AdamW, as Muon's authors recommend."""
    skip = set()
    for mod in model.modules():
        if isinstance(mod, nn.Embedding):
            skip.add(id(mod.weight))
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None:
        skip.add(id(out.weight))
    for name, p in model.named_parameters():
        if name.startswith(("classifier", "score", "lm_head")) or "patch_embeddings" in name:
            skip.add(id(p))
    hidden = [p for p in model.parameters() if p.ndim == 2 and id(p) not in skip]
    rest = [p for p in model.parameters() if id(p) not in {id(h) for h in hidden}]
    return hidden, rest


class MuonWithAdamW(Optimizer):
    """``torch.optim.Muon`` on ``muon_params`` and ``torch.optim.AdamW`` on ``adamw_params`` as one optimizer."""

    def __init__(
        self,
        muon_params: Iterable[Tensor],
        adamw_params: Iterable[Tensor],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
    ):
        muon_params, adamw_params = list(muon_params), list(adamw_params)
        bad = [tuple(p.shape) for p in muon_params if p.ndim != 2]
        if bad:
            raise ValueError(f"MuonWithAdamW: Muon only takes 2-D matrices, got shapes {bad}; pass them as adamw_params")
        self.muon = Muon(muon_params, lr=lr, weight_decay=weight_decay, momentum=momentum, adjust_lr_fn="match_rms_adamw")
        self.adamw = AdamW(adamw_params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay) if adamw_params else None
        groups = self.muon.param_groups + (self.adamw.param_groups if self.adamw else [])
        super().__init__([{"params": []}], {"lr": lr})
        self.param_groups = groups  # shared dicts: schedulers reach both optimizers

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        if self.adamw is not None:
            self.adamw.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict() if self.adamw else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state_dict["adamw"])


def stable_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float = 1e-8) -> Optimizer:
    """StableAdamW built exactly as ``Trainer`` does for ``optim="stable_adamw"`` (requires ``torch-optimi``)."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir="unused", optim="stable_adamw", learning_rate=lr, weight_decay=weight_decay,
        adam_beta1=betas[0], adam_beta2=betas[1], adam_epsilon=eps, report_to=[],
    )
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return cls(model.parameters(), **kwargs)
