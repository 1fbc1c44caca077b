"""The accelerator step (issue 20): few dispatched ops per warm step — power iteration batched by shape
(``hf_weyl.core.power_iteration.StackCache``), moments and U from torch's fused AdamW kernel on every device that has
it — with the numerics of the per-matrix step. The batched products run on accelerators only; here they are forced
onto the CPU to compare them with the per-matrix ones."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from conftest import make_tiny_gpt2, token_batches
from optimizer_step import CountOps, gpt2_shapes
from hf_weyl import AdamWeyl
from hf_weyl.core import functional, power_iteration
from hf_weyl.core.power_iteration import StackCache, initial_vector, power_iteration_


def gpt2_small_params(device: str) -> list[torch.Tensor]:
    """GPT-2 small's 148 parameter shapes (tied head), with gradients."""
    shapes = gpt2_shapes(768)
    params = [torch.empty(s, device=device, requires_grad=True) for s in shapes]
    for p in params:
        p.grad = torch.empty_like(p)
    return params


def test_warm_step_dispatches_at_most_100_ops_for_gpt2_small():
    """The accelerator step (meta device: no kernel, every op counted) of GPT-2 small past its fresh steps: ≤ 100
    dispatched aten ops (it was 817: a product per matrix and half-step, a counter read per tensor)."""
    opt = AdamWeyl(gpt2_small_params("meta"), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, tau=0.01)
    for _ in range(functional.FRESH_STEPS):
        opt.step()
    with CountOps() as mode:
        opt.step()
    total = sum(mode.ops.values())
    assert total <= 100, (total, mode.ops.most_common(12))
    assert mode.ops["aten._fused_adamw_"] == 1 and mode.ops["aten.mv"] <= 4  # only the matrices too big to stack
    assert mode.ops["aten._local_scalar_dense"] <= 1  # one host read of a CPU counter (the fresh-step rule)


@pytest.fixture
def stacks_on_cpu(monkeypatch):
    monkeypatch.setattr(power_iteration, "STACK_DEVICES", ("cpu",))
    monkeypatch.setattr(power_iteration, "STACK_MAX_NUMEL", 600)  # so that some matrices stay alone


def test_stacked_power_iteration_equals_per_matrix(stacks_on_cpu):
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 4), (4, 6), (6, 4), (30, 30), (4, 6), (6, 4), (1, 9), (1, 9), (5, 5)]
    mats = [torch.randn(s, generator=gen) * 10.0 ** (i - 4) for i, s in enumerate(shapes)]
    mats.append(torch.randn(8, 3, generator=gen).t())  # a transposed view (3 × 8)
    ref_vecs = [initial_vector(min(m.shape)) for m in mats]
    vecs = [v.clone() for v in ref_vecs]
    stacks = StackCache()
    for iters in (3, 1, 1):
        ref = power_iteration_(mats, ref_vecs, iters)
        got = power_iteration_(mats, vecs, iters, stacks)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
        for a, b in zip(vecs, ref_vecs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    exact = torch.stack([torch.linalg.matrix_norm(m.double(), 2) for m in mats]).float()
    assert (got <= exact * (1 + 1e-5)).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
def test_eager_step_with_stacks_equals_the_per_matrix_step(stacks_on_cpu, monkeypatch, dtype, tol):
    """The eager step (kernel off) with the batched products against the per-matrix products, cap binding, on
    GPT-2 (tall and wide matrices of equal shapes) with a transposed and a channels_last parameter added."""
    monkeypatch.setattr(functional, "cpu_kernel", lambda: None)
    base = make_tiny_gpt2(dtype=dtype)
    extra = [torch.nn.Parameter(torch.randn(12, 20).to(dtype).t()),  # transposed (20 × 12)
             torch.nn.Parameter(torch.randn(4, 3, 2, 2).to(dtype).to(memory_format=torch.channels_last)),
             torch.nn.Parameter(torch.randn(4, 3, 2, 2).to(dtype))]
    runs = []
    for stacked in (False, True):
        model, ps = copy.deepcopy(base), [torch.nn.Parameter(e.detach().clone()) for e in extra]
        if stacked:
            monkeypatch.setattr(power_iteration, "STACK_DEVICES", ("cpu",))
        else:
            monkeypatch.setattr(power_iteration, "STACK_DEVICES", ())
        opt = AdamWeyl(list(model.parameters()) + ps, lr=3e-2, tau=0.01, weight_decay=0.1)
        ratios = []
        for batch in token_batches(12):
            opt.zero_grad()
            (model(input_ids=batch, labels=batch).loss + sum((p.float() ** 2).sum() for p in ps)).backward()
            opt.step()
            ratios.append(opt.last_stats.lr_ratio.clone())
        runs.append(([p.detach().float() for p in list(model.parameters()) + ps], torch.stack(ratios)))
    (w0, r0), (w1, r1) = runs
    assert (r0 < 1).any(), "the cap never bound"
    torch.testing.assert_close(r1, r0, rtol=tol, atol=tol)
    for a, b in zip(w1, w0):  # per tensor, relative to its norm; vectors (near-zero gradients) amplify rounding, as
        bound = tol if a.ndim >= 2 else 50 * tol  # in test_device
        assert float((a - b).norm() / b.norm().clamp_min(1e-12)) <= bound, (tuple(a.shape), bound)


def test_capturable_step_reads_no_device_value():
    """``capturable=True``: counters on the parameters' device and no host read of a device value in ``step()`` (on
    the meta device any such read raises) — cold, fresh and warm steps, a device-tensor lr."""
    model = make_tiny_gpt2().to("meta")
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    opt = AdamWeyl(model.parameters(), lr=3e-2, tau=0.01, capturable=True)
    opt.param_groups[0]["lr"] = torch.tensor(3e-2, device="meta")  # (validated as a host value when built)
    for _ in range(functional.FRESH_STEPS + 2):
        opt.step()
    assert all(s["step"].device.type == "meta" for s in opt.state.values())
    assert opt.last_stats.lr_ratio.device.type == "meta"


def test_capturable_equals_the_eager_step_on_cpu(monkeypatch):
    """Same arithmetic as the eager step (fused direction, per-matrix σ's): bit for bit over 13 steps with the cap
    binding (one iteration for every σ: capturable gives σ1(W) the fresh steps' iterations too); counters as device
    (here CPU) tensors."""
    monkeypatch.setattr(functional, "cpu_kernel", lambda: None)
    base, batches = make_tiny_gpt2(), token_batches(13)
    runs = []
    for capturable in (False, True):
        model = copy.deepcopy(base)
        opt = AdamWeyl(model.parameters(), lr=3e-2, tau=0.01, weight_decay=0.1, cold_start_iters=1,
                       capturable=capturable)
        for batch in batches:
            opt.zero_grad()
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
        runs.append((model, opt))
    (m0, o0), (m1, o1) = runs
    assert (o1.last_stats.lr_ratio < 1).any()
    for a, b in zip(m1.parameters(), m0.parameters()):
        assert torch.equal(a, b)
    assert "capturable" not in o1.state_dict()["param_groups"][0]  # (optimizer-wide: DCP loads older checkpoints)
    assert all(s["step"].device.type == "cpu" for s in o1.state.values())


def test_capturable_serves_layouts_the_fused_kernel_cannot(monkeypatch):
    """A gradient strided unlike its parameter (the fused kernel would pair up the wrong elements) takes the foreach
    ops with device bias corrections: equal to the eager step's foreach form, no host read."""
    monkeypatch.setattr(functional, "cpu_kernel", lambda: None)
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(4, 8, generator=gen).t()
    grads = [torch.randn(8, 4, generator=gen) for _ in range(4)]
    out = []
    for capturable in (False, True):
        w = torch.nn.Parameter(w0.clone().t().contiguous().t())  # transposed, like w0
        opt = AdamWeyl([w], lr=3e-2, tau=0.01, cold_start_iters=1, capturable=capturable)
        for g in grads:
            w.grad = g.clone()  # contiguous: not the parameter's layout
            opt.step()
        out.append(w.detach().clone())
    torch.testing.assert_close(out[1], out[0], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="capturable"):
        AdamWeyl([w0.clone().requires_grad_()], capturable="yes")


def _compare(m1, o1, m0, o0):
    assert (o1.last_stats.lr_ratio < 1).any(), "the cap never bound"
    torch.testing.assert_close(o1.last_stats.lr_ratio, o0.last_stats.lr_ratio, rtol=1e-5, atol=1e-6)
    for a, b in zip(m1.parameters(), m0.parameters()):  # per tensor, relative to its norm (vectors: see above)
        bound = 1e-5 if a.ndim >= 2 else 5e-4
        assert float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-12)) <= bound, tuple(a.shape)


@pytest.mark.parametrize("eager_first", [0, functional.FRESH_STEPS], ids=["from-step-1", "after-fresh-steps"])
def test_compiled_step_has_no_graph_break_and_equals_the_eager_step(eager_first):
    """``torch.compile(optimizer.step, fullgraph=True)`` with inductor on the CPU: no graph break (fullgraph raises on
    one), and the weights and lr ratios equal the eager step's within float rounding (the compiled step takes the
    foreach form with device bias corrections), cap binding — compiled from the first step (state made inside the
    graph; one iteration per σ, since a compiled step has no step count for the fresh-step rule) and after
    ``FRESH_STEPS`` eager steps with the default iterations."""
    import torch._dynamo

    torch._dynamo.reset()
    base, batches = make_tiny_gpt2(n_layer=1, n_embd=16), token_batches(eager_first + 3)
    options = dict(lr=3e-2, tau=0.01, weight_decay=0.1, **({} if eager_first else {"cold_start_iters": 1}))
    runs = []
    for compiled in (False, True):
        model = copy.deepcopy(base)
        opt = AdamWeyl(model.parameters(), **options)
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        for i, batch in enumerate(batches):
            opt.zero_grad()
            model(input_ids=batch, labels=batch).loss.backward()
            (step if i >= eager_first else opt.step)()
        runs.append((model, opt))
    _compare(*runs[1], *runs[0])
