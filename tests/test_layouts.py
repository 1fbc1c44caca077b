"""Every memory layout and dtype a parameter can have, on every single-process CPU path: with a τ that cannot bind,
AdamWeyl equals ``torch.optim.AdamW``; with the cap binding, a strided parameter gets the update its contiguous
copy gets. (The ZeRO and FSDP2 paths: ``layouts_*`` checks in tests/zero_scripts and tests/fsdp_scripts.)

The reference is ``torch.optim.AdamW(foreach=False)`` stepping a *contiguous* copy of the parameter: torch's own
``fused=True`` kernel is itself wrong on strided slices (it walks memory, not indices), so it is no oracle here.
"""

from __future__ import annotations

import pytest
import torch

from hf_weyl import AdamWeyl
from hf_weyl.core import functional
from hf_weyl.core.cpu_kernel import cpu_kernel


def _slice(shape, dtype):
    base = torch.zeros(shape[0], 2 * shape[1], dtype=dtype)
    return base[:, ::2]


#: name → (shape, maker of an empty tensor of that logical shape with the layout)
LAYOUTS = {
    "contiguous": ((6, 5), lambda s, d: torch.empty(s, dtype=d)),
    "transposed": ((6, 5), lambda s, d: torch.empty(s[::-1], dtype=d).t()),
    "channels_last": ((4, 3, 2, 3), lambda s, d: torch.empty(s, dtype=d).to(memory_format=torch.channels_last)),
    "channels_last_3d": (
        (3, 2, 2, 3, 2), lambda s, d: torch.empty(s, dtype=d).to(memory_format=torch.channels_last_3d)
    ),
    "strided_slice": ((6, 5), _slice),
    "strided_vector": ((7,), lambda s, d: torch.zeros(2 * s[0], dtype=d)[::2]),
    "row_slice": ((4, 5), lambda s, d: torch.zeros(8, 5, dtype=d)[2:6]),  # contiguous rows, offset storage
}

#: dtype → (rtol, atol) for the comparison with AdamW after 4 steps (about two roundings of the dtype)
DTYPES = {
    torch.float32: (2e-5, 1e-6),
    torch.float64: (1e-10, 1e-12),
    torch.bfloat16: (2e-2, 4e-3),
    torch.float16: (3e-3, 5e-4),
}


@pytest.fixture(params=["fused_kernel", "fused_direction", "foreach"])
def path(request, monkeypatch):
    """``fused_kernel``: the default (csrc kernel for contiguous fp32/bf16 matrices, torch's fused AdamW kernel for
    moments and U elsewhere); ``fused_direction``: no csrc kernel; ``foreach``: HF_WEYL_CPU_KERNEL=0."""
    if request.param == "fused_kernel":
        monkeypatch.delenv("HF_WEYL_CPU_KERNEL", raising=False)
        if cpu_kernel() is None:
            pytest.fail("the fused CPU step could not be built on this machine (see the warning)")
    else:
        monkeypatch.setattr(functional, "cpu_kernel", lambda: None)
        if request.param == "foreach":
            monkeypatch.setenv("HF_WEYL_CPU_KERNEL", "0")
        else:
            monkeypatch.delenv("HF_WEYL_CPU_KERNEL", raising=False)
    return request.param


def _param(layout: str, dtype: torch.dtype, values: torch.Tensor) -> torch.nn.Parameter:
    shape, make = LAYOUTS[layout]
    t = make(shape, dtype)
    t.copy_(values)
    p = torch.nn.Parameter(t)
    assert p.shape == values.shape and p.is_contiguous() == (layout in ("contiguous", "row_slice")), (layout, p.stride())
    return p


def _train(p: torch.nn.Parameter, opt: torch.optim.Optimizer, targets: list[torch.Tensor]) -> None:
    """Gradients by autograd (so their layout is what AccumulateGrad gives a parameter of this layout)."""
    for target in targets:
        opt.zero_grad()
        (torch.tanh(p.float() * 3) * target).sum().backward()
        opt.step()


def _data(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    values = 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)  # small: bf16 rounds finely there
    return values, [torch.randn(shape, generator=gen) for _ in range(4)]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_equals_adamw_for_every_layout(layout, dtype, path):
    shape = LAYOUTS[layout][0]
    values, targets = _data(shape)
    p = _param(layout, dtype, values)
    ref = torch.nn.Parameter(values.to(dtype).clone())  # contiguous
    _train(p, AdamWeyl([p], lr=3e-2, weight_decay=0.1, eps=1e-6, tau=1e9, cap_vectors=True), targets)
    _train(ref, torch.optim.AdamW([ref], lr=3e-2, weight_decay=0.1, eps=1e-6, foreach=False), targets)
    rtol, atol = DTYPES[dtype]
    moved = (ref.detach().double() - values.to(dtype).double()).abs().max()
    assert moved > 5 * atol, "the steps did not move the weights: the comparison would see nothing"
    torch.testing.assert_close(p.detach(), ref.detach(), rtol=rtol, atol=atol, msg=lambda m: f"{layout}/{path}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "contiguous"])
def test_capped_strided_equals_capped_contiguous(layout, dtype, path):
    shape = LAYOUTS[layout][0]
    values, targets = _data(shape, seed=1)
    p = _param(layout, dtype, values)
    ref = torch.nn.Parameter(values.to(dtype).clone())
    opts = [AdamWeyl([q], lr=0.5, weight_decay=0.1, tau=0.01, cap_vectors=True) for q in (p, ref)]
    _train(p, opts[0], targets)
    _train(ref, opts[1], targets)
    assert float(opts[1].last_stats.lr_ratio.max()) < 0.5, "the cap did not bind"
    # (bf16: the two paths may round U differently by an ulp, which moves σ1(U) by ~1e-3)
    ratio_rtol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(opts[0].last_stats.lr_ratio, opts[1].last_stats.lr_ratio, rtol=ratio_rtol, atol=0)
    rtol, atol = DTYPES[dtype]
    torch.testing.assert_close(p.detach(), ref.detach(), rtol=rtol, atol=atol, msg=lambda m: f"{layout}/{path}: {m}")


def test_dense_layout():
    assert functional.dense_layout(torch.empty(3, 4).t())
    assert functional.dense_layout(torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last))
    assert functional.dense_layout(torch.empty(0, 3))
    assert not functional.dense_layout(torch.empty(3, 8)[:, ::2])
    assert not functional.dense_layout(torch.empty(3, 1).expand(3, 4))
    assert not functional.same_dense_layout(torch.empty(3, 4), torch.empty(4, 3).t())
