"""Warmup-free baselines for the comparison in ``benchmarks/warmup_free.py`` (SPEC §3).

- ``GIAdam``: AdamW with the second moment initialised to the first gradient squared (v₀ = g₀²;
  Kalra & Barkeshli 2024). Our choice: v is then an unbiased estimate from step 1, so only the first
  moment is bias-corrected (with v₀ = 0 Adam's first steps are sign(g)-sized; here they are too, but
  v does not forget the initial scale during the first ~1/(1−β2) steps).
- ``LionA`` / ``LionAR``: Kosson et al. 2024 released no code; our reading of SPEC §3's description,
  detail by detail:
  * high momentum: one β (default 0.98) for the momentum and the interpolation;
  * Nesterov momentum: m_t = β m_{t−1} + (1−β) g_t, direction u = sign(β m_t + (1−β) g_t) (Lion's sign
    of a look-ahead interpolation, with the momentum updated first);
  * inverse bias correction: m is *not* divided by 1 − β^t; instead the step is multiplied by
    c_t = 1 − β^t, so the first ~1/(1−β) steps are small (their momentum holds few gradients);
  * angular update control (LionA): every neuron (a row of a Linear / conv weight, a column of GPT-2's
    Conv1D: ``neuron_dim``) is rotated by a fixed angle and keeps its initial norm:
    Δw = −θ_t·c_t·‖w‖·u/‖u‖, then w is rescaled to its initial norm (no weight decay on matrices).
    The angle is the equilibrium angular update of Lion with decoupled weight decay ("rotational
    equilibrium", Kosson et al. 2023): θ_t = sqrt(2·lr_t·weight_decay) radians, lr_t the scheduled lr.
    Vectors (gains, biases; no direction to rotate) get a plain Lion step lr_t·c_t·u with decoupled
    weight decay. (Before this reading the matrices used θ = lr radians: one number cannot serve as
    both an angle, ~1e-2 rad, and a per-element step of zero-initialised biases, ~1e-4, which kept ViT
    at chance: a rate that rotated the matrices let the biases swamp the input signal.)
  * relative representation change (LionAR): the angle is also multiplied by min(1, sqrt(φ_noise/φ)),
    with the coherence φ = ‖m̂‖²/E‖g‖² of the tensor (m̂ = m/(1−β^t); E‖g‖² an EMA of ‖g‖², bias
    corrected), which is (1−β)/(1+β) = φ_noise for pure noise in steady state and 1 for a constant
    gradient: high-SNR (early) phases move the representation less. (Early on even pure noise gives
    φ > φ_noise — at t = 1, φ = 1 — so this also shortens the first ~1/(1−β) steps: our choice.)
  Lion's usual practice (lr 3–10× smaller than AdamW's, weight decay as many times larger, same
  lr·weight_decay) maps an AdamW (lr, λ) to an angle sqrt(2·lr·λ): AdamW's own equilibrium angular update.
- ``MuonWithAdamW``: ``torch.optim.Muon`` for the hidden 2-D matrices (``adjust_lr_fn="match_rms_adamw"``
  so one lr serves both) and ``torch.optim.AdamW`` for everything else; one optimizer object whose
  ``param_groups`` are shared with both, so LR schedulers and ``Trainer`` work unchanged.
- StableAdamW comes from transformers' own ``optim="stable_adamw"`` handler (needs ``torch-optimi``):
  see ``stable_adamw``.
- ``admin_transform``: Admin (Liu et al. 2020) for Post-LN models, a model transform rather than an
  optimizer; see ``admin_transform`` for the maths and the choices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import AdamW, Muon, Optimizer

__all__ = [
    "AdminResidual", "GIAdam", "LionA", "LionAR", "MuonWithAdamW", "admin_profile", "admin_transform", "admin_wrap",
    "lion_param_groups", "muon_param_groups", "stable_adamw",
]


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
    """Lion with angular per-neuron updates on a fixed-norm sphere (our reading of Kosson et al.'s LionA).

    ``lr``: Lion's lr (the vectors' per-element step); ``weight_decay`` λ > 0: decoupled weight decay of
    the vectors, and with ``lr`` the matrices' angle per step sqrt(2·lr·λ) (see the module docstring).
    """

    _correct_rrc = False

    def __init__(self, params, lr: float = 1e-4, beta: float = 0.98, weight_decay: float = 1.0, neuron_dim: int = 0):
        name = type(self).__name__
        _check(name, "lr", lr, lr >= 0, ">= 0")
        _check(name, "beta", beta, 0 <= beta < 1, "in [0, 1)")
        _check(name, "weight_decay", weight_decay, weight_decay > 0,
               "> 0 (with lr it sets the matrices' angle per step, sqrt(2·lr·weight_decay))")
        _check(name, "neuron_dim", neuron_dim, neuron_dim in (0, 1), "0 (rows, nn.Linear) or 1 (columns, GPT-2 Conv1D)")
        super().__init__(params, dict(lr=lr, beta=beta, weight_decay=weight_decay, neuron_dim=neuron_dim))

    @staticmethod
    def angle(lr: float, weight_decay: float) -> float:
        """The matrices' rotation per step (radians) before c_t and the RRC factor: sqrt(2·lr·λ)."""
        return math.sqrt(2 * lr * weight_decay)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta, lr, wd = group["beta"], group["lr"], group["weight_decay"]
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
                m = st["exp_avg"].lerp_(g, 1 - beta)  # m_t = β m_{t−1} + (1−β) g_t
                u = torch.sign(m * beta + g * (1 - beta))  # Nesterov look-ahead
                c = 1 - beta**t  # inverse bias correction
                if p.ndim < 2:
                    p.mul_(1 - lr * wd).add_(u.to(p.dtype), alpha=-lr * c)
                    continue
                angle = self.angle(lr, wd) * c
                if self._correct_rrc:
                    st["grad_sq"].lerp_(g.square().sum(), 1 - beta)
                    m_hat_sq = m.square().sum() / (1 - beta**t) ** 2
                    phi = m_hat_sq / (st["grad_sq"] / (1 - beta**t)).clamp_min(1e-30)
                    phi_noise = (1 - beta) / (1 + beta)
                    angle = angle * float(torch.clamp(torch.sqrt(phi_noise / phi.clamp_min(1e-30)), max=1.0))
                d = group["neuron_dim"]
                w = p.float()
                norms = st["neuron_norm"]
                u_norm = self._neuron_norms(u, d).clamp_min(1e-30)
                w = w - angle * self._expand(norms / u_norm, d, w) * u
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


# --------------------------------------------------------------------------------------------------
# Admin (Liu et al., EMNLP 2020): adaptive model initialisation of Post-LN residual shortcuts
# --------------------------------------------------------------------------------------------------


def _post_ln_types() -> tuple[type, ...]:
    from transformers.models.bert.modeling_bert import BertOutput, BertSelfOutput

    return (BertSelfOutput, BertOutput)


class AdminResidual(nn.Module):
    """A Post-LN residual sub-layer with Admin's shortcut scale: ``LN(dropout(dense(h)) + ω ⊙ x)``.

    Replaces an HF ``BertSelfOutput`` / ``BertOutput`` (whose forward is ``LN(dropout(dense(h)) + x)``),
    keeping its ``dense``, ``dropout`` and ``LayerNorm`` modules (same parameters, same state-dict names)
    and adding ``omega``: one trainable weight per hidden dimension, 1 at construction (then the output
    is bit-for-bit the original's: ``1.0 * x == x`` and the addition order is kept).
    """

    def __init__(self, sublayer: nn.Module):
        super().__init__()
        missing = [n for n in ("dense", "dropout", "LayerNorm") if not isinstance(getattr(sublayer, n, None), nn.Module)]
        if missing:
            raise TypeError(f"AdminResidual: {type(sublayer).__name__} has no {missing} module(s); it wraps HF Post-LN "
                            "residual sub-layers with dense, dropout and LayerNorm (BertSelfOutput, BertOutput)")
        self.dense, self.dropout, self.LayerNorm = sublayer.dense, sublayer.dropout, sublayer.LayerNorm
        w = self.dense.weight
        self.omega = nn.Parameter(torch.ones(w.shape[0], dtype=w.dtype, device=w.device))
        self._record: list[tuple[float, float]] | None = None  # (Var[x], Var[f(x)]) during admin_profile

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        branch = self.dropout(self.dense(hidden_states))
        if self._record is not None:
            self._record.append((_element_var(input_tensor), _element_var(branch)))
        return self.LayerNorm(branch + self.omega * input_tensor)


def _element_var(t: Tensor) -> float:
    """Variance over all elements (batch × positions × features), population form."""
    return float(t.detach().double().var(unbiased=False))


def admin_wrap(model: nn.Module, types: tuple[type, ...] | None = None) -> list[AdminResidual]:
    """Replace every Post-LN residual sub-layer of ``model`` (default: HF BERT's ``BertSelfOutput`` and
    ``BertOutput``; RoBERTa-style copies can be passed as ``types``) by an ``AdminResidual`` with ω = 1."""
    types = types or _post_ln_types()
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, types)]
    if not targets:
        raise ValueError(
            f"admin_wrap: {type(model).__name__} has no Post-LN residual sub-layer of type "
            f"{[t.__name__ for t in types]}; Admin targets Post-LN models (Pre-LN GPT-2 / ViT have none)"
        )
    wrapped = []
    for name, mod in targets:
        parent_name, _, attr = name.rpartition(".")
        new = AdminResidual(mod)
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
        wrapped.append(new)
    return wrapped


@torch.no_grad()
def admin_profile(model: nn.Module, batch: dict[str, Tensor]) -> list[float]:
    """Admin's profiling pass: set each sub-layer's ω from one forward pass on ``batch`` with every ω = 1.

    In call order i = 1..2N (attention and FFN sub-layers alike), x_0 the embedding output and f_j the
    residual branch of sub-layer j: ω_i = sqrt(Var[x_0] + Σ_{j<i} Var[f_j(x_{j−1})]). Returns the ω's.
    """
    subs = [m for m in model.modules() if isinstance(m, AdminResidual)]
    if not subs:
        raise ValueError("admin_profile: no AdminResidual in the model; call admin_wrap (or admin_transform) first")
    mask = batch.get("attention_mask")
    if isinstance(mask, Tensor) and not bool(mask.bool().all()):
        raise ValueError("admin_profile: the profiling batch has padding (attention_mask has zeros); the variances "
                         "would include padded positions: profile on full, unpadded sequences")
    record: list[tuple[float, float]] = []
    calls: list[AdminResidual] = []
    hooks = [m.register_forward_pre_hook(lambda mod, _args: calls.append(mod)) for m in subs]
    was_training = model.training
    for m in subs:
        m.omega.fill_(1.0)
        m._record = record
    try:
        model.eval()
        model(**batch)
    finally:
        for m in subs:
            m._record = None
        for h in hooks:
            h.remove()
        model.train(was_training)
    if sorted(map(id, calls)) != sorted(map(id, subs)):
        raise RuntimeError(f"admin_profile: expected each of the {len(subs)} residual sub-layers to run once in the "
                           f"profiling pass, saw {len(calls)} calls")
    accumulated = record[0][0]  # Var[x_0]: the embeddings count as the branch before the first sub-layer
    omegas = []
    for mod, (_, branch_var) in zip(calls, record):
        omega = math.sqrt(accumulated)
        mod.omega.fill_(omega)
        omegas.append(omega)
        accumulated += branch_var
    return omegas


def admin_transform(model: nn.Module, batch: dict[str, Tensor], types: tuple[type, ...] | None = None) -> list[float]:
    """Admin on a Post-LN model, in place: ``admin_wrap`` then ``admin_profile`` on ``batch``; returns the ω's.

    Before profiling it checks that the wrapped model at ω = 1 gives exactly the original outputs on
    ``batch`` (so a transformers version whose sub-layer forward differs from ``LN(dropout(dense(h)) + x)``
    is refused instead of silently trained as another model).
    """
    import transformers

    was_training = model.training
    model.eval()
    with torch.no_grad():
        before = model(**batch)
    admin_wrap(model, types)
    with torch.no_grad():
        after = model(**batch)
    model.train(was_training)
    ref = before.to_tuple() if hasattr(before, "to_tuple") else (before,)
    new = after.to_tuple() if hasattr(after, "to_tuple") else (after,)
    if len(ref) != len(new) or not all(torch.equal(a, b) for a, b in zip(ref, new) if isinstance(a, Tensor)):
        raise RuntimeError(
            f"admin_transform: the wrapped {type(model).__name__} at ω = 1 does not reproduce the original outputs "
            f"(transformers {transformers.__version__}); its residual sub-layers no longer compute LN(dropout(dense(h)) + x)"
        )
    return admin_profile(model, batch)
