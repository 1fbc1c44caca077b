import pytest
import torch

from hf_weyl.core.power_iteration import as_matrix, initial_vector, power_iteration_, vector_length


def exact_sigma(a: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(a.double(), ord=2).item()


def planted(shape, gen, gap=0.8):
    """Random singular vectors with singular values 1, gap, gap², ... (convergence rate ~gap² per step)."""
    m, n = shape
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
    return (u * gap ** torch.arange(k, dtype=torch.float32)) @ v.T * 3.0


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (300, 400), (1, 9), (9, 1)])
def test_converges_to_exact_sigma_and_never_overestimates(shape):
    gen = torch.Generator().manual_seed(0)
    mats = [planted(shape, gen) for _ in range(2)] + [torch.randn(shape, generator=gen)]
    vecs = [initial_vector(vector_length(shape)) for _ in mats]
    previous = torch.zeros(3)
    for _ in range(40):
        sigma = power_iteration_(mats, vecs, 1)
        exact = torch.tensor([exact_sigma(m) for m in mats], dtype=torch.float32)
        assert torch.all(sigma <= exact * (1 + 1e-5)), (sigma, exact)
        assert torch.all(sigma >= previous * (1 - 1e-5))  # monotone for a fixed matrix
        previous = sigma
    torch.testing.assert_close(sigma[:2], exact[:2], rtol=1e-5, atol=0)  # converged where there is a gap
    for v in vecs:
        assert v.dtype == torch.float32
        torch.testing.assert_close(v.norm(), torch.tensor(1.0))


def test_many_matrices_at_once_equal_one_at_a_time():
    """The batched vector ops of one call give each matrix what a call with it alone gives."""
    gen = torch.Generator().manual_seed(1)
    mats = [torch.randn(s, generator=gen) for s in ((16, 24), (16, 24), (30, 7), (1, 9), (5, 5))]
    together = [initial_vector(vector_length(m.shape)) for m in mats]
    alone = [v.clone() for v in together]
    s_together = power_iteration_(mats, together, 3)
    s_alone = torch.cat([power_iteration_([m], [v], 3) for m, v in zip(mats, alone)])
    torch.testing.assert_close(s_together, s_alone, rtol=1e-6, atol=0)
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_vector_view_gives_exact_l2_norm_in_one_step():
    v = torch.randn(1000)
    vec = initial_vector(vector_length(v.shape))
    assert vec.numel() == 1
    sigma = power_iteration_([as_matrix(v)], [vec], 1)
    torch.testing.assert_close(sigma[0], v.norm(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matrices_use_fp32_math(dtype):
    a = planted((64, 48), torch.Generator().manual_seed(2)).to(dtype)
    vec = initial_vector(48)
    sigma = power_iteration_([a], [vec], 30)
    assert sigma.dtype == torch.float32 and vec.dtype == torch.float32
    torch.testing.assert_close(sigma[0].item(), exact_sigma(a.float()), rtol=1e-4, atol=0)


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e-42])
def test_zero_and_tiny_matrices_stay_finite(scale):
    mats = [torch.randn(20, 30) * scale, torch.randn(20, 30) * scale]
    vecs = [initial_vector(20), initial_vector(20)]
    before = [v.clone() for v in vecs]
    sigma = power_iteration_(mats, vecs, 2)
    assert torch.isfinite(sigma).all() and (sigma >= 0).all()
    for v, b in zip(vecs, before):
        assert torch.isfinite(v).all()
        if scale == 0.0:
            assert torch.equal(v, b)  # nothing to learn from a zero matrix: keep the warm start


def test_non_finite_matrix_keeps_vector_and_reports_zero():
    a = torch.randn(8, 8)
    a[0, 0] = float("nan")
    vec = initial_vector(8)
    before = vec.clone()
    sigma = power_iteration_([a], [vec], 2)
    assert sigma.item() == 0.0
    assert torch.equal(vec, before)


def test_initial_vector_is_deterministic_and_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    v1 = initial_vector(17)
    after = torch.rand(3)
    assert torch.equal(expected, after)
    assert torch.equal(v1, initial_vector(17))


def test_rejects_zero_iterations():
    with pytest.raises(ValueError, match="iters"):
        power_iteration_([torch.ones(2, 2)], [initial_vector(2)], 0)


@pytest.mark.parametrize("shape", [(50, 30), (30, 50), (1, 40)])
@pytest.mark.parametrize("scale", [3e-45, 1e-40, 1e-30, 1e-25, 1e-10, 1e10, 1e25, 1e36])
def test_never_overestimates_at_any_finite_scale(shape, scale):
    """Norms are scale-safe and products never subnormal: σ ≤ σ1 (to fp32 rounding of σ itself) and close to it
    at every finite magnitude (unscaled fp32 squares under/overflow below ~1e-19 and above ~1e19)."""
    a = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * scale
    exact = exact_sigma(a)
    vec = initial_vector(vector_length(shape))
    for _ in range(30):
        sigma = power_iteration_([a], [vec], 1).item()
        assert sigma <= exact * (1 + 1e-5) + 2**-149, (sigma, exact)  # 2^-149: σ's own fp32 rounding
    assert sigma >= exact * (0.9 if scale < 1e-38 else 0.99), (sigma, exact)  # subnormal matrices are coarse
    assert torch.isfinite(vec).all()
