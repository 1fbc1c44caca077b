"""One measurement of the training dynamics: weights' spectra, probe-batch attention and optimizer caps.

``collect_metrics`` returns a flat ``{name: float}`` dict ready for ``accelerator.log(..., step=)``,
``Trainer.log`` or a JSONL file. Names (``i`` = block index, ``h`` = head):

- ``monitor/b{i}/sigma_q``, ``sigma_k``, ``sigma_v``, ``sigma_o``: σ1 of the full projection matrices;
- ``monitor/b{i}/sigma_qk_h{h}`` and ``sigma_qk_max``: σ1(W_q,hᵀ W_k,h) per head and the max over heads;
- ``monitor/b{i}/sec{s}_max``: SEC(s) of W_q,hᵀ W_k,h, max over heads, for each s in ``sec_ranks``;
- ``monitor/b{i}/entropy_h{h}`` and ``entropy_min``: mean attention entropy (nats) per head on the probe batch;
- ``monitor/b{i}/sigma_ov``: σ1(W_o W_v); ``sigma_<mlp module>`` and ``sigma_w2w1`` (two-matrix MLPs);
- ``monitor/b{i}/norm_<norm module>.weight|bias``: ℓ2 norms of the norm layers' gains and biases;
- ``monitor/b{i}/input_norm``: mean over probe tokens of ‖x_t‖₂ of the block input;
  ``input_grad_norm``: ‖∂L/∂X‖_F of the probe loss w.r.t. the whole block input (batch mean loss);
- ``monitor/sigma_qk_max``, ``monitor/entropy_min``, ``monitor/sec{s}_max``: worst over blocks;
- with an ``AdamWeyl`` optimizer: ``monitor/lr_ratio/<param name>`` (effective / scheduled lr of the
  last step), ``monitor/lr_ratio_min`` and ``monitor/capped_fraction``.

The probe pass runs in eval mode with eager attention (to get the attention probabilities) and
never writes ``.grad`` of the parameters (gradients are taken w.r.t. the block inputs only), so it
leaves training untouched: the parameters, their gradients and the RNG streams are unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..core.optimizer import unwrap_adamweyl
from ..integrations.trainer import attn_implementation
from .layouts import ModelLayout, resolve_layout
from .spectral import attention_entropy, qk_singular_values, sec_index, sigma_max

__all__ = ["DEFAULT_SEC_RANKS", "collect_metrics", "weight_metrics", "probe_metrics", "optimizer_metrics"]

#: s values of SEC(s) reported by default (clipped to d_head).
DEFAULT_SEC_RANKS = (1, 2, 4, 8)

PREFIX = "monitor"


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _check_not_partitioned(model: nn.Module) -> None:
    """Refuse a model any of whose parameters DeepSpeed ZeRO-3 has partitioned (an empty local tensor with a
    ``ds_id``); small parameters ZeRO-3 keeps whole (``stage3_param_persistence_threshold``) may come first."""
    for name, p in model.named_parameters():
        if hasattr(p, "ds_id") and p.numel() == 0:
            raise NotImplementedError(
                f"the training monitor reads full weight matrices; under DeepSpeed ZeRO-3 they are partitioned "
                f"across ranks ({name} holds no elements on this rank). Use ZeRO-1/2 (or DDP) for monitored runs."
            )


@torch.no_grad()
def weight_metrics(model: nn.Module, layout: ModelLayout, sec_ranks: Sequence[int] = DEFAULT_SEC_RANKS) -> dict[str, float]:
    """σ1 of the attention/MLP matrices, σ1 and SEC of W_qᵀW_k per head, and norm-layer gains (no forward pass)."""
    out: dict[str, float] = {}
    worst = {"sigma_qk_max": 0.0, **{f"sec{s}_max": 0.0 for s in sec_ranks}}
    for i, block in enumerate(layout.block_modules(model)):
        w = layout.block_weights(block)
        b = f"{PREFIX}/b{i}"
        sv = qk_singular_values(w.query, w.key)  # (heads, d_head)
        top = sv[:, 0]
        for h, v in enumerate(top.tolist()):
            out[f"{b}/sigma_qk_h{h}"] = v
        out[f"{b}/sigma_qk_max"] = float(top.max())
        worst["sigma_qk_max"] = max(worst["sigma_qk_max"], out[f"{b}/sigma_qk_max"])
        for s in sec_ranks:
            out[f"{b}/sec{s}_max"] = float(sec_index(sv, min(s, sv.shape[-1])).max())
            worst[f"sec{s}_max"] = max(worst[f"sec{s}_max"], out[f"{b}/sec{s}_max"])
        out[f"{b}/sigma_q"] = sigma_max(w.query.flatten(0, 1))
        out[f"{b}/sigma_k"] = sigma_max(w.key[:: layout.group_size].flatten(0, 1))  # each KV head once
        if w.value.numel():
            out[f"{b}/sigma_v"] = sigma_max(w.value)
        if w.output.numel():
            out[f"{b}/sigma_o"] = sigma_max(w.output)
            if w.value.numel() and w.output.shape[1] == w.value.shape[0]:
                out[f"{b}/sigma_ov"] = sigma_max(w.output @ w.value)
        for name, m in w.mlp.items():
            out[f"{b}/sigma_{name}"] = sigma_max(m)
        if len(w.mlp) == 2:
            w1, w2 = w.mlp.values()
            if w2.shape[1] == w1.shape[0]:
                out[f"{b}/sigma_w2w1"] = sigma_max(w2 @ w1)
        for name, v in w.norms.items():
            out[f"{b}/norm_{name}"] = float(v.norm())
    out.update({f"{PREFIX}/{k}": v for k, v in worst.items()})
    return out


@contextlib.contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Temporarily switch an HF model to eager attention (the only one returning probabilities)."""
    current = attn_implementation(model)
    if current in (None, "eager"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(current)


def probe_metrics(model: nn.Module, layout: ModelLayout, probe_batch: Mapping[str, Tensor]) -> dict[str, float]:
    """Attention entropy per head and block-input / input-gradient norms from one forward(+backward) on the probe batch."""
    blocks = layout.block_modules(model)
    inputs: list[Tensor | None] = [None] * len(blocks)

    def capture(i: int):
        def hook(_module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            if isinstance(x, Tensor):
                inputs[i] = x
        return hook

    handles = [blk.register_forward_pre_hook(capture(i), with_kwargs=True) for i, blk in enumerate(blocks)]
    was_training = model.training
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in probe_batch.items()}
    out: dict[str, float] = {}
    try:
        model.eval()
        with _eager_attention(model), torch.enable_grad():
            outputs = model(**batch, output_attentions=True)
            attentions = getattr(outputs, "attentions", None)
            loss = getattr(outputs, "loss", None)
            captured = [x for x in inputs if x is not None and x.requires_grad]
            grads = (
                torch.autograd.grad(loss, captured, allow_unused=True)
                if loss is not None and captured and len(captured) == len(blocks)
                else [None] * len(blocks)
            )
    finally:
        for hd in handles:
            hd.remove()
        model.train(was_training)
    if not attentions or len(attentions) != len(blocks):
        raise RuntimeError(
            f"the training monitor needs attention probabilities from {type(model).__name__}(..., output_attentions=True); "
            f"got {0 if not attentions else len(attentions)} for {len(blocks)} blocks"
        )
    worst = float("inf")
    for i, probs in enumerate(attentions):
        ent = attention_entropy(probs)
        for h, v in enumerate(ent.tolist()):
            out[f"{PREFIX}/b{i}/entropy_h{h}"] = v
        out[f"{PREFIX}/b{i}/entropy_min"] = float(ent.min())
        worst = min(worst, out[f"{PREFIX}/b{i}/entropy_min"])
        x = inputs[i]
        if x is not None:
            out[f"{PREFIX}/b{i}/input_norm"] = float(x.detach().float().norm(dim=-1).mean())
        g = grads[i]
        if g is not None:
            out[f"{PREFIX}/b{i}/input_grad_norm"] = float(g.float().norm())
    out[f"{PREFIX}/entropy_min"] = worst
    return out


def optimizer_metrics(optimizer: Any, model: nn.Module) -> dict[str, float]:
    """Effective/scheduled lr per tensor and the fraction capped, from ``AdamWeyl.last_stats`` ({} otherwise)."""
    opt = unwrap_adamweyl(optimizer)
    stats = getattr(opt, "last_stats", None)
    if stats is None:
        return {}
    out = {f"{PREFIX}/lr_ratio/{name}": v for name, v in stats.named_lr_ratio(model).items()}
    out[f"{PREFIX}/lr_ratio_min"] = float(stats.lr_ratio.min()) if stats.lr_ratio.numel() else 1.0
    out[f"{PREFIX}/capped_fraction"] = stats.capped_fraction
    return out


def collect_metrics(
    model: nn.Module,
    probe_batch: Mapping[str, Tensor] | None = None,
    optimizer: Any = None,
    *,
    layout: ModelLayout | None = None,
    sec_ranks: Sequence[int] = DEFAULT_SEC_RANKS,
) -> dict[str, float]:
    """All monitor quantities for ``model`` now (see the module docstring for the names).

    Usable from any loop, e.g. in an Accelerate loop after ``optimizer.step()``::

        if step % 50 == 0 and accelerator.is_main_process:
            accelerator.log(collect_metrics(accelerator.unwrap_model(model), probe, optimizer), step=step)

    ``probe_batch`` (a dict of model inputs, with labels for the gradient norms) is needed for the
    entropy and the block-input norms; without it only the weight and optimizer metrics are returned.
    """
    if any(not isinstance(s, int) or s < 1 for s in sec_ranks):
        raise ValueError(f"sec_ranks must be integers >= 1, got {tuple(sec_ranks)!r}")
    model = _unwrap(model)
    _check_not_partitioned(model)
    layout = resolve_layout(model, layout)
    out = weight_metrics(model, layout, sec_ranks)
    if probe_batch is not None:
        out.update(probe_metrics(model, layout, probe_batch))
    if optimizer is not None:
        out.update(optimizer_metrics(optimizer, model))
    return out
