"""Where the attention and MLP matrices of a transformer block live: one ``ModelLayout`` per model family.

A layout names, relative to each block, the modules holding W_q, W_k, W_v, W_o, the MLP matrices
and the norm layers, and says how the heads are laid out. ``BlockWeights`` are the per-head
matrices in the paper's convention (W_q, W_k: d_head × d_model per head, so that the attention
logits of head h are xᵀ W_q,hᵀ W_k,h x'), read as fp32 copies.

Built in: HF GPT-2 (fused ``c_attn`` Conv1D, weights stored in × out), ViT (separate q/k/v Linear)
and Llama-style ``q_proj``/``k_proj`` with grouped KV heads (each query head paired with its KV
head). Any other model: pass an explicit ``ModelLayout``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["BlockWeights", "ModelLayout", "UnsupportedModelError", "resolve_layout"]


class UnsupportedModelError(ValueError):
    """The monitor does not know where this model keeps its attention matrices."""


@dataclass
class BlockWeights:
    """fp32 matrices of one block. ``query``/``key``: (heads, d_head, d_model), ``key`` repeated per query head."""

    query: Tensor
    key: Tensor
    value: Tensor  # (d_kv_total, d_model)
    output: Tensor  # (d_model, d_heads_total)
    mlp: dict[str, Tensor]  # name -> (out, in)
    norms: dict[str, Tensor]  # "<module>.weight"/"<module>.bias" -> 1-D


def _get(module: nn.Module, path: str) -> nn.Module:
    try:
        return module.get_submodule(path)
    except AttributeError as err:
        raise UnsupportedModelError(f"monitor layout: no submodule {path!r} in {type(module).__name__}") from err


@dataclass
class ModelLayout:
    """Explicit description of a model's blocks (paths are dotted ``get_submodule`` paths).

    Args:
        blocks: path of the ``nn.ModuleList`` of transformer blocks (e.g. ``"transformer.h"``).
        num_heads: query heads per block; ``num_kv_heads`` key/value heads (grouped-query attention).
        query, key, value, output: modules relative to a block, each with a ``.weight``. With
            ``fused_qkv`` set, ``query``/``key``/``value`` are ignored and the fused module's output
            is split into three equal q, k, v parts.
        mlp: MLP matrices relative to a block (``"mlp.c_fc"``, ...), in forward order: with exactly
            two, σ1(W_2 W_1) is reported too.
        norms: norm layers relative to a block; their ``weight``/``bias`` norms are reported.
        transposed: weights are stored (in, out) as in GPT-2's ``Conv1D`` instead of ``nn.Linear``'s (out, in).
    """

    blocks: str
    num_heads: int
    query: str = ""
    key: str = ""
    value: str = ""
    output: str = ""
    fused_qkv: str = ""
    mlp: tuple[str, ...] = ()
    norms: tuple[str, ...] = ()
    num_kv_heads: int | None = None
    transposed: bool = False
    name: str = "custom"
    _kv: int = field(init=False, repr=False, default=0)

    def __post_init__(self) -> None:
        if not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise ValueError(f"ModelLayout: num_heads must be an integer >= 1, got {self.num_heads!r}")
        kv = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        if not isinstance(kv, int) or kv < 1 or self.num_heads % kv:
            raise ValueError(
                f"ModelLayout: num_kv_heads={self.num_kv_heads!r} must be an integer >= 1 dividing num_heads={self.num_heads}"
            )
        self._kv = kv
        if not self.fused_qkv and not (self.query and self.key):
            raise ValueError("ModelLayout: give either fused_qkv or both query and key module paths")

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.num_heads // self._kv

    def block_modules(self, model: nn.Module) -> list[nn.Module]:
        blocks = _get(model, self.blocks)
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
            raise UnsupportedModelError(f"monitor layout {self.name!r}: {self.blocks!r} is not a non-empty ModuleList")
        return list(blocks)

    def _matrix(self, block: nn.Module, path: str) -> Tensor:
        w = _get(block, path).weight.detach().float()
        return w.t() if self.transposed else w  # (out, in)

    @torch.no_grad()
    def block_weights(self, block: nn.Module) -> BlockWeights:
        """Read one block's matrices as fp32 (out, in) copies, split into heads."""
        h, kv = self.num_heads, self._kv
        if self.fused_qkv:
            qkv = self._matrix(block, self.fused_qkv)
            if qkv.shape[0] % 3:
                raise UnsupportedModelError(f"monitor layout {self.name!r}: fused qkv has {qkv.shape[0]} outputs, not 3 equal parts")
            q, k, v = qkv.chunk(3, dim=0)
        else:
            q, k = self._matrix(block, self.query), self._matrix(block, self.key)
            v = self._matrix(block, self.value) if self.value else None
        d_model = q.shape[1]
        if q.shape[0] % h or k.shape[0] % kv or k.shape[0] // kv != q.shape[0] // h:
            raise UnsupportedModelError(
                f"monitor layout {self.name!r}: W_q {tuple(q.shape)} / W_k {tuple(k.shape)} do not split into "
                f"{h} query and {kv} key heads of equal size"
            )
        d_head = q.shape[0] // h
        query = q.reshape(h, d_head, d_model)
        key = k.reshape(kv, d_head, d_model).repeat_interleave(h // kv, dim=0)
        output = self._matrix(block, self.output) if self.output else torch.empty(0, 0)
        mlp = {path: self._matrix(block, path) for path in self.mlp}
        norms = {}
        for path in self.norms:
            mod = _get(block, path)
            for pname in ("weight", "bias"):
                p = getattr(mod, pname, None)
                if isinstance(p, Tensor):
                    norms[f"{path}.{pname}"] = p.detach().float()
        return BlockWeights(query, key, v if v is not None else torch.empty(0, 0), output, mlp, norms)


def _gpt2(model: nn.Module) -> ModelLayout:
    cfg = model.config
    return ModelLayout(
        blocks="transformer.h" if hasattr(model, "transformer") else "h",
        num_heads=cfg.n_head,
        fused_qkv="attn.c_attn",
        output="attn.c_proj",
        mlp=("mlp.c_fc", "mlp.c_proj"),
        norms=("ln_1", "ln_2"),
        transposed=True,
        name="gpt2",
    )


def _vit(model: nn.Module) -> ModelLayout:
    cfg = model.config
    base = "vit." if hasattr(model, "vit") else ""
    root = getattr(model, "vit", model)
    if hasattr(root, "layers"):  # transformers >= 5 naming
        names = dict(query="attention.q_proj", key="attention.k_proj", value="attention.v_proj", output="attention.o_proj")
        blocks, mlp = f"{base}layers", ("mlp.fc1", "mlp.fc2")
    else:  # transformers 4 naming
        names = dict(
            query="attention.attention.query",
            key="attention.attention.key",
            value="attention.attention.value",
            output="attention.output.dense",
        )
        blocks, mlp = f"{base}encoder.layer", ("intermediate.dense", "output.dense")
    return ModelLayout(
        blocks=blocks, num_heads=cfg.num_attention_heads, mlp=mlp, norms=("layernorm_before", "layernorm_after"), name="vit", **names
    )


def _llama_like(model: nn.Module) -> ModelLayout:
    cfg = model.config
    inner = model.model if hasattr(model, "model") else model
    prefix = "model." if inner is not model else ""
    block = inner.layers[0]
    mlp = tuple(f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj") if hasattr(block.mlp, n))
    norms = tuple(n for n in ("input_layernorm", "post_attention_layernorm") if hasattr(block, n))
    return ModelLayout(
        blocks=f"{prefix}layers",
        num_heads=cfg.num_attention_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        query="self_attn.q_proj",
        key="self_attn.k_proj",
        value="self_attn.v_proj",
        output="self_attn.o_proj",
        mlp=mlp,
        norms=norms,
        name="llama",
    )


def _is_llama_like(model: nn.Module) -> bool:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    return (
        isinstance(layers, nn.ModuleList)
        and len(layers) > 0
        and hasattr(getattr(layers[0], "self_attn", None), "q_proj")
        and hasattr(getattr(model, "config", None), "num_attention_heads")
    )


#: Supported model types (``config.model_type``) besides any Llama-style model (``layers[i].self_attn.q_proj``).
KNOWN_LAYOUTS = {"gpt2": _gpt2, "vit": _vit}


def resolve_layout(model: nn.Module, layout: ModelLayout | None = None) -> ModelLayout:
    """The layout for ``model``: ``layout`` if given, else the built-in one for its family.

    Raises ``UnsupportedModelError`` naming the model and the supported families otherwise.
    """
    model = getattr(model, "module", model)  # DDP / DeepSpeed engine
    if layout is not None:
        if not isinstance(layout, ModelLayout):
            raise TypeError(f"layout must be a hf_weyl.monitor.ModelLayout, got {type(layout).__name__}")
        layout.block_modules(model)  # fail now, not at the first log
        return layout
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in KNOWN_LAYOUTS:
        return KNOWN_LAYOUTS[model_type](model)
    if _is_llama_like(model):
        return _llama_like(model)
    raise UnsupportedModelError(
        f"the training monitor does not know the layout of {type(model).__name__} (model_type={model_type!r}); "
        f"supported: {sorted(KNOWN_LAYOUTS)} and Llama-style models with layers[i].self_attn.q_proj/k_proj. "
        "Pass layout=hf_weyl.monitor.ModelLayout(blocks=..., num_heads=..., query=..., key=..., ...) for other models."
    )
