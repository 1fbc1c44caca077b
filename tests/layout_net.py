"""A model whose parameters have every memory layout a parameter can have (the multi-rank layout checks of
``zero_scripts/zero_checks.py`` and ``fsdp_scripts/fsdp_checks.py``; the single-process ones are in test_layouts.py)."""

from __future__ import annotations

import torch
from torch import nn

BATCH, FEATURES = 8, 40


class LayoutNet(nn.Module):
    """A channels_last conv, a channels_last_3d conv, a transposed matrix, a strided slice of a wider matrix and a
    bias: every dense and strided layout, each capped by AdamW² (≥ 2-D) but the bias."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(2, 4, 2).to(memory_format=torch.channels_last)
        self.conv3 = nn.Conv3d(2, 3, 2, bias=False).to(memory_format=torch.channels_last_3d)
        self.t = nn.Parameter((torch.randn(6, 5) * 0.3).t())  # (5, 6), strides (1, 5)
        self.s = nn.Parameter((torch.randn(3, 12) * 0.3)[:, ::2])  # (3, 6), strides (12, 2)
        assert self.conv.weight.is_contiguous(memory_format=torch.channels_last) and not self.conv.weight.is_contiguous()
        assert self.conv3.weight.is_contiguous(memory_format=torch.channels_last_3d) and self.t.stride() == (1, 5)
        assert self.s.stride() == (12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 40) → (B,)
        b = x.shape[0]
        a = self.conv(x[:, :18].reshape(b, 2, 3, 3).contiguous(memory_format=torch.channels_last)).mean((2, 3))
        c = self.conv3(x[:, 18:34].reshape(b, 2, 2, 2, 2)).flatten(1)
        u = torch.tanh(x[:, 34:] @ self.t.t())
        w = torch.tanh(x[:, 34:] @ self.s.t())
        return torch.cat([a, c, u, w], 1).pow(2).sum(1)


def layout_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(BATCH, FEATURES, generator=g), torch.randn(BATCH, generator=g)


def layout_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def layout_groups(model: nn.Module) -> list[dict]:
    return [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]


def layout_reference(optimizer: str, steps: int, lr: float, tau: float = 0.01) -> dict[str, torch.Tensor]:
    """Weights after ``steps`` single-process steps on the full batch: ``torch.optim.AdamW(foreach=False)`` with
    ``optimizer="adamw"``, else AdamWeyl (τ as given)."""
    from hf_weyl import AdamWeyl

    model = LayoutNet()
    if optimizer == "adamw":
        opt = torch.optim.AdamW(layout_groups(model), lr=lr, betas=(0.9, 0.95), foreach=False)
    else:
        opt = AdamWeyl(layout_groups(model), lr=lr, betas=(0.9, 0.95), tau=tau)
    for step in range(steps):
        layout_loss(model, *layout_batch(step)).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}
