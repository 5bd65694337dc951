"""The design note's six properties of the closed form, in float64, plus its helpers."""

import pytest
import torch

from adaprelora_diffusion.optim.closed_form import (
    factored_step,
    h_step_rms,
    lorapro_step,
    preconditioned_step,
    step_bound_scales,
    tangent_statistics,
)

SHAPES = [(7, 5, 2), (6, 9, 1), (5, 8, 5), (4, 4, 4), (12, 10, 3)]  # r = 1 and r = min(m, n) included
T = lambda x: x.transpose(-1, -2)  # noqa: E731


def problem(m, n, r, k=3, seed=0):
    g = torch.Generator().manual_seed(seed + 100 * m + 10 * n + r)
    kw = dict(dtype=torch.float64, generator=g)
    A, B, G = torch.randn(k, r, n, **kw), torch.randn(k, m, r, **kw), torch.randn(k, m, n, **kw)
    d1, d2 = torch.rand(k, m, **kw) + 0.2, torch.rand(k, n, **kw) + 0.2
    return A, B, G, d1, d2


def step(A, B, G, d1, d2, balance=0.5):
    return preconditioned_step(A, B, T(B) @ G, G @ T(A), d1, d2, balance=balance, damping=0.0)


def frobenius_projection(A, B, G):
    PB = B @ torch.linalg.inv(T(B) @ B) @ T(B)
    PA = T(A) @ torch.linalg.inv(A @ T(A)) @ A
    return PB @ G + G @ PA - PB @ G @ PA


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_normal_equations(m, n, r):
    A, B, G, d1, d2 = problem(m, n, r)
    dA, dB = step(A, B, G, d1, d2)
    HZ = d1[:, :, None] * (B @ dA + dB @ A) * d2[:, None, :]
    torch.testing.assert_close(T(B) @ HZ, T(B) @ G, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(HZ @ T(A), G @ T(A), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_projection_equals_weighted_least_squares(m, n, r):
    A, B, G, d1, d2 = problem(m, n, r, k=1)
    dA, dB = step(A, B, G, d1, d2)
    Z = (B @ dA + dB @ A)[0]
    # brute force: min over all (dA, dB) of || sqrt(w) (B dA + dB A - G / w) ||, w_ij = d1_i d2_j
    columns = [(B[0] @ e.view(r, n)).reshape(-1) for e in torch.eye(r * n, dtype=torch.float64)]
    columns += [(e.view(m, r) @ A[0]).reshape(-1) for e in torch.eye(m * r, dtype=torch.float64)]
    J = torch.stack(columns, 1)
    w = (d1[0][:, None] * d2[0][None, :]).reshape(-1)
    x = torch.linalg.lstsq(J * w.sqrt()[:, None], (G[0].reshape(-1) / w) * w.sqrt(), driver="gelsd").solution
    torch.testing.assert_close(Z, (J @ x).view(m, n), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_balance_minimises_split_energy(m, n, r):
    A, B, G, d1, d2 = problem(m, n, r)
    dA, dB = step(A, B, G, d1, d2)
    w = d1[:, :, None] * d2[:, None, :]

    def energy(a, b):
        return ((B @ a) ** 2 * w).sum((1, 2)) + ((b @ A) ** 2 * w).sum((1, 2))

    base = energy(dA, dB)
    g = torch.Generator().manual_seed(1)
    for scale in (1e-3, 1e-1, 10.0):
        X = scale * torch.randn(A.shape[0], r, r, dtype=torch.float64, generator=g)
        assert (energy(dA - X @ A, dB + B @ X) >= base - 1e-9 * base.abs()).all()
    # any other balance is a different gauge with the same W-step but higher energy
    dA2, dB2 = step(A, B, G, d1, d2, balance=0.9)
    torch.testing.assert_close(B @ dA2 + dB2 @ A, B @ dA + dB @ A, rtol=1e-8, atol=1e-8)
    assert (energy(dA2, dB2) > base).all()


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_gauge_invariance(m, n, r):
    A, B, G, d1, d2 = problem(m, n, r)
    K = torch.randn(A.shape[0], r, r, dtype=torch.float64) + 3 * torch.eye(r, dtype=torch.float64)
    dA, dB = step(A, B, G, d1, d2)
    dA2, dB2 = step(K @ A, B @ torch.linalg.inv(K), G, d1, d2)
    torch.testing.assert_close(B @ torch.linalg.inv(K) @ dA2, B @ dA, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(dB2 @ K @ A, dB @ A, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_identity_metric_gives_frobenius_projection(m, n, r):
    A, B, G, d1, d2 = problem(m, n, r)
    dA, dB = step(A, B, G, torch.ones_like(d1), torch.ones_like(d2))
    torch.testing.assert_close(B @ dA + dB @ A, frobenius_projection(A, B, G), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_first_step_from_zero_B_moves_only_B(damping):
    A, B, G, d1, d2 = problem(8, 10, 4)
    B = torch.zeros_like(B)
    dA, dB = preconditioned_step(A, B, T(B) @ G, G @ T(A), d1, d2, damping=damping)
    assert torch.equal(dA, torch.zeros_like(dA))
    assert torch.isfinite(dB).all() and dB.abs().sum() > 0


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_tangent_statistics_are_row_and_column_sums_of_projected_gradient(m, n, r):
    A, B, G, _, _ = problem(m, n, r)
    rows, cols = tangent_statistics(A, B, T(B) @ G, G @ T(A), damping=0.0)
    Gh = frobenius_projection(A, B, G)
    torch.testing.assert_close(rows, (Gh**2).sum(-1), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(cols, (Gh**2).sum(-2), rtol=1e-8, atol=1e-8)


def test_tangent_statistics_at_zero_B_see_only_the_row_space_of_A():
    A, B, G, _, _ = problem(6, 9, 2)
    B = torch.zeros_like(B)
    rows, cols = tangent_statistics(A, B, T(B) @ G, G @ T(A), damping=0.0)
    PA = T(A) @ torch.linalg.inv(A @ T(A)) @ A
    torch.testing.assert_close(rows, ((G @ PA) ** 2).sum(-1), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_h_step_rms_is_the_sqrt_v_weighted_rms_of_the_w_step(m, n, r):
    A, B, G, d1, d2 = problem(m, n, r)
    dA, dB = step(A, B, G, d1, d2)
    Z = B @ dA + dB @ A
    sqrt_v = d1[:, :, None] * d2[:, None, :]
    expected = ((sqrt_v * Z**2).sum((1, 2)) / sqrt_v.sum((1, 2))).sqrt()
    torch.testing.assert_close(h_step_rms(dA, dB, T(B) @ G, G @ T(A), d1, d2), expected, rtol=1e-8, atol=1e-10)


def test_h_step_rms_is_the_plain_rms_for_uniform_statistics_and_ignores_their_scale():
    A, B, G, d1, d2 = problem(9, 7, 3)
    ones1, ones2 = torch.full_like(d1, 0.7), torch.full_like(d2, 0.7)
    dA, dB = step(A, B, G, ones1, ones2)
    rms = (B @ dA + dB @ A).square().mean((1, 2)).sqrt()
    torch.testing.assert_close(h_step_rms(dA, dB, T(B) @ G, G @ T(A), ones1, ones2), rms, rtol=1e-8, atol=1e-10)
    # multiplying the statistics by c scales sqrt(V) by c and the step by 1/c: the weighted RMS by 1/c
    dA3, dB3 = step(A, B, G, 3 * d1, d2)
    torch.testing.assert_close(h_step_rms(dA3, dB3, T(B) @ G, G @ T(A), 3 * d1, d2),
                               h_step_rms(*step(A, B, G, d1, d2), T(B) @ G, G @ T(A), d1, d2) / 3)


@pytest.mark.parametrize("m,n,r", SHAPES)
@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_factored_form_and_shared_core(m, n, r, damping):
    A, B, G, d1, d2 = problem(m, n, r)
    P, Ra, Rb, Q = factored_step(A, B, T(B) @ G, G @ T(A), d1, d2, damping=damping)
    dA, dB = preconditioned_step(A, B, T(B) @ G, G @ T(A), d1, d2, damping=damping)
    torch.testing.assert_close(P @ Ra, dA)
    torch.testing.assert_close(Rb @ Q, dB)
    # true gradients: Ga A^T = B^T Gb, so computing it once gives the same step
    shared = preconditioned_step(A, B, T(B) @ G, G @ T(A), d1, d2, damping=damping, shared_core=True)
    torch.testing.assert_close(shared, (dA, dB))
    # momenta of Ga and Gb are not a true gradient pair: the shared core is then a different step
    Ga2 = T(B) @ G + 0.5 * torch.randn_like(A)
    separate = preconditioned_step(A, B, Ga2, G @ T(A), d1, d2, damping=damping)
    assert not torch.allclose(separate[1], preconditioned_step(A, B, Ga2, G @ T(A), d1, d2, damping=damping, shared_core=True)[1])


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_lorapro_projects_and_stays_closest_to_plain_lora_gradients(m, n, r):
    A, B, G, _, _ = problem(m, n, r)
    Ga, Gb = T(B) @ G, G @ T(A)
    dA, dB = lorapro_step(A, B, Ga, Gb, damping=0.0)
    torch.testing.assert_close(B @ dA + dB @ A, frobenius_projection(A, B, G), rtol=1e-8, atol=1e-8)

    def distance(a, b):
        return ((a - Ga) ** 2).sum((1, 2)) + ((b - Gb) ** 2).sum((1, 2))

    base = distance(dA, dB)
    for scale in (1e-3, 1.0):
        X = scale * torch.randn(A.shape[0], r, r, dtype=torch.float64)
        assert (distance(dA + X @ A, dB - B @ X) >= base - 1e-9).all()


def test_step_bound_scales_shorten_each_component_then_a_as_a_whole():
    """Version 3's bounds against a loop over modules and components (float64), zero steps and limits included."""
    g = torch.Generator().manual_seed(3)
    k, r, m, n = 4, 3, 7, 5
    dA = torch.randn(k, r, n, generator=g, dtype=torch.float64)
    dB = torch.randn(k, m, r, generator=g, dtype=torch.float64)
    dA[0, 1] = 0.0  # a component that does not move
    dB[2, :, 0] = 0.0
    bound_A = torch.tensor([0.5, 10.0, 1.0, 2.0], dtype=torch.float64)
    bound_B = torch.tensor([1.0, 0.2, 10.0, 3.0], dtype=torch.float64)
    trust = torch.tensor([1.0, 0.0, 100.0, 2.0], dtype=torch.float64)  # 0: no reference (an all-zero A)
    sA, sB = step_bound_scales(dA, dB, bound_A, bound_B, trust)
    for j in range(k):
        rows = [min(1.0, float(bound_A[j] / dA[j, i].norm())) if dA[j, i].norm() > 0 else 1.0 for i in range(r)]
        cols = [min(1.0, float(bound_B[j] / dB[j, :, i].norm())) if dB[j, :, i].norm() > 0 else 1.0 for i in range(r)]
        total = sum((f * dA[j, i].norm()) ** 2 for i, f in enumerate(rows)) ** 0.5
        if trust[j] > 0 and total > trust[j]:
            rows = [f * float(trust[j] / total) for f in rows]
        torch.testing.assert_close(sA[j], torch.tensor(rows, dtype=torch.float64))
        torch.testing.assert_close(sB[j], torch.tensor(cols, dtype=torch.float64))
    assert (sA <= 1).all() and (sB <= 1).all() and (sA < 1).any() and (sB < 1).any()
    # every bound holds after scaling, and directions are kept (positive multipliers)
    assert ((dA * sA[..., None]).norm(dim=-1) <= bound_A[:, None] * (1 + 1e-12)).all()
    assert ((dB * sB[:, None, :]).norm(dim=-2) <= bound_B[:, None] * (1 + 1e-12)).all()
    # off: no multiplier at all
    ones_A, ones_B = step_bound_scales(dA, dB, None, None, None)
    assert torch.equal(ones_A, torch.ones(k, r, dtype=torch.float64)) and torch.equal(ones_B, torch.ones(k, r, dtype=torch.float64))
