"""The device-parametrised subset: what ``scripts/gpu_check.sh`` runs on a GPU (``cuda`` joins ``cpu`` when one is
there). Each test runs on every available device: AdamWeyl equals the Trainer's default ``AdamW(fused=True)`` when
the cap cannot bind (fp32, bf16), the cap is tight from the first step, and a state_dict round trip continues bit
for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_tiny_gpt2, token_batches
from hf_weyl import AdamWeyl

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def _loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


def _train(model, opt, batches, device):
    for batch in batches:
        opt.zero_grad()
        _loss(model, batch.to(device)).float().backward()
        opt.step()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_equals_fused_adamw_when_the_cap_cannot_bind(device, dtype, tol):
    m1 = make_tiny_gpt2(dtype=dtype).to(device)
    m2 = copy.deepcopy(m1)
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    o2 = AdamWeyl(m2.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, tau=1e30)
    batches = token_batches(8)
    _train(m1, o1, batches, device)
    _train(m2, o2, batches, device)
    assert o2.last_stats.num_capped == 0
    for (name, a), b in zip(m1.named_parameters(), m2.parameters()):
        err = float((a.float() - b.float()).norm() / a.float().norm().clamp_min(1e-12))
        bound = tol if a.ndim >= 2 else 50 * tol  # (see test_optimizer: near-zero-gradient vectors amplify rounding)
        assert err <= bound, (str(device), name, err)


def test_cap_is_tight_from_the_first_step(device):
    """σ1(W_t − W_{t−1}) ≤ τ σ1(W_{t−1}) up to the power-iteration error (docs: ≤ 1.025 τ with the defaults)."""
    model = make_tiny_gpt2().to(device)
    opt = AdamWeyl(model.parameters(), lr=3e-2, weight_decay=0.0, tau=0.01)
    worst = 0.0
    for batch in token_batches(12):
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.ndim >= 2}
        opt.zero_grad()
        _loss(model, batch.to(device)).backward()
        opt.step()
        assert opt.last_stats.num_capped > 0
        for n, p in model.named_parameters():
            if p.ndim >= 2:
                w0 = before[n].double()
                rel = torch.linalg.matrix_norm(p.detach().double() - w0, 2) / torch.linalg.matrix_norm(w0, 2)
                worst = max(worst, float(rel) / 0.01)
    assert 0.9 <= worst <= 1.1, worst


def test_state_dict_round_trip_continues_bit_for_bit(device):
    batches = token_batches(6)
    model = make_tiny_gpt2().to(device)
    opt = AdamWeyl(model.parameters(), lr=2e-2, tau=0.01)
    _train(model, opt, batches[:3], device)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, batches[3:], device)
    resumed = make_tiny_gpt2(seed=5).to(device)
    resumed.load_state_dict(saved_model)
    resumed_opt = AdamWeyl(resumed.parameters(), lr=2e-2, tau=0.01)
    resumed_opt.load_state_dict(saved_opt)
    _train(resumed, resumed_opt, batches[3:], device)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_capturable_step_in_a_cuda_graph(device):
    """``capturable=True`` (step counters and lr as device tensors, no host read in ``step()``): the step captured in a
    CUDA graph and replayed equals the same capturable optimizer stepped eagerly (same gradients each step)."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    batch = token_batches(1)[0].to(device)
    models = [make_tiny_gpt2().to(device) for _ in range(2)]  # (same seed: the same weights)
    opts = []
    for model in models:
        opt = AdamWeyl(model.parameters(), lr=3e-2, tau=0.01, capturable=True)
        opt.param_groups[0]["lr"] = torch.tensor(3e-2, device=device)
        _loss(model, batch).backward()  # the gradients every step reuses
        opt.step()  # state and buffers made outside the graph
        opts.append(opt)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph):
            opts[1].step()  # (capturing does not run it)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        graph.replay()
        opts[0].step()
    torch.cuda.synchronize()
    assert (opts[0].last_stats.lr_ratio < 1).any()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
