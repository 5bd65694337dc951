"""The design note's six properties of the closed form, in float64, plus its helpers."""

import pytest
import torch

from adaprelora_diffusion.optim.closed_form import (
    factored_step,
    factored_w_step_sq_norm,
    lorapro_step,
    preconditioned_step,
    tangent_statistics,
    w_step_sq_norm,
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
def test_w_step_norm_without_forming_the_step(m, n, r):
    A, B, G, d1, d2 = problem(m, n, r)
    dA, dB = step(A, B, G, d1, d2)
    torch.testing.assert_close(w_step_sq_norm(A, B, dA, dB), ((B @ dA + dB @ A) ** 2).sum((1, 2)))


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_factored_form_and_its_norm(m, n, r):
    A, B, G, d1, d2 = problem(m, n, r)
    P, Ra, Rb, Q = factored_step(A, B, T(B) @ G, G @ T(A), d1, d2, damping=0.1)
    dA, dB = preconditioned_step(A, B, T(B) @ G, G @ T(A), d1, d2, damping=0.1)
    torch.testing.assert_close(P @ Ra, dA)
    torch.testing.assert_close(Rb @ Q, dB)
    torch.testing.assert_close(factored_w_step_sq_norm(A, B, P, Ra, Rb, Q), ((B @ dA + dB @ A) ** 2).sum((1, 2)))


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
