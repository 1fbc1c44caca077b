"""Baseline optimizers of the warmup-free benchmark (baselines)."""

import pytest
import torch
import transformers as tf

import baselines


def test_giadam_initialises_v_with_first_gradient_and_steps_like_adam():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = baselines.GIAdam([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.0, eps=0.0)
    p.grad = torch.tensor([0.5, -3.0])
    opt.step()
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"], torch.tensor([0.25, 9.0]))  # v₀ = g₀², then EMA with g₁ = g₀
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, -1.9]))  # m̂ = g, √v = |g|: sign step of size lr
    p.grad = torch.tensor([0.0, 0.0])
    opt.step()
    m_hat = torch.tensor([0.5, -3.0]) * 0.9 * 0.1 / (1 - 0.81)
    v = torch.tensor([0.25, 9.0]) * 0.99
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, -1.9]) - 0.1 * m_hat / v.sqrt())
    with pytest.raises(ValueError, match="betas"):
        baselines.GIAdam([p], betas=(0.9, 1.0))


@pytest.mark.parametrize("cls", [baselines.LionA, baselines.LionAR])
def test_lion_angular_step_keeps_neuron_norms(cls):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 5))
    b = torch.nn.Parameter(torch.zeros(6))
    norms = w.detach().norm(dim=1).clone()
    opt = cls([w, b], lr=0.05, beta=0.9)
    before = w.detach().clone()
    w.grad, b.grad = torch.randn(6, 5), torch.ones(6)
    opt.step()
    torch.testing.assert_close(w.detach().norm(dim=1), norms)
    cos = torch.nn.functional.cosine_similarity(w.detach(), before, dim=1)
    angle = torch.arccos(cos.clamp(max=1))
    assert float(angle.max()) <= 0.05 * (1 - 0.9) + 1e-4  # lr radians × inverse bias correction (1 − β)
    assert float(angle.min()) > 0
    torch.testing.assert_close(b.detach(), torch.full((6,), -0.05 * 0.1))
    with pytest.raises(ValueError, match="neuron_dim"):
        cls([w], neuron_dim=2)


def test_lionar_moves_less_than_liona_on_a_constant_gradient():
    steps = {}
    for cls in (baselines.LionA, baselines.LionAR):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(4, 4))
        start = w.detach().clone()
        opt = cls([w], lr=0.05, beta=0.9)
        g = torch.randn(4, 4)
        for _ in range(5):
            w.grad = g.clone()
            opt.step()
        steps[cls.__name__] = float((w.detach() - start).norm())
    assert steps["LionAR"] < 0.5 * steps["LionA"]  # high SNR: RRC correction shrinks the step


def test_muon_with_adamw_splits_params_and_follows_scheduler():
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=30, n_positions=8))
    hidden, rest = baselines.muon_param_groups(model)
    ids = {id(p) for p in hidden}
    assert id(model.transformer.wte.weight) not in ids and id(model.transformer.h[0].attn.c_attn.weight) in ids
    opt = baselines.MuonWithAdamW(hidden, rest, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert opt.muon.param_groups[0]["lr"] == opt.adamw.param_groups[0]["lr"] == 5e-3
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randint(0, 30, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    sched.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="2-D"):
        baselines.MuonWithAdamW([model.transformer.ln_f.weight], [])


def test_stable_adamw_comes_from_transformers_handler():
    pytest.importorskip("optimi", reason="transformers' stable_adamw needs torch-optimi")
    model = torch.nn.Linear(3, 3)
    opt = baselines.stable_adamw(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    assert type(opt).__name__ == "StableAdamW" and opt.defaults["weight_decay"] == 0.1
