"""lowrank.linalg against independent references (numpy's SVD) and the identities it rests on.

Everything here is float64; "to float64 precision" means a relative error of a few hundred ε
(ε = 2.2e-16) for an SVD-based quantity on a 30×20 matrix, so 1e-12 relative is used.
"""

import numpy as np
import pytest
import torch

import lowrank as lr
from lowrank import linalg as la

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


def with_spectrum(s, m=30, n=20, seed=0):
    """Q₁ diag(s) Q₂ᵀ with random orthonormal Q: a matrix with exactly the singular values s."""
    q1 = torch.linalg.qr(randn(m, len(s), seed=seed))[0]
    q2 = torch.linalg.qr(randn(n, len(s), seed=seed + 1))[0]
    return (q1 * torch.as_tensor(s, dtype=F64)) @ q2.mT


def np_svals(W):
    return torch.from_numpy(np.linalg.svd(W.numpy(), compute_uv=False))


def sq(W):
    return float((W**2).sum())


W = randn(30, 20, seed=0)
SIGMA = np_svals(W)


# ----------------------------------------------------------------------------- Eckart–Young


@pytest.mark.parametrize("r", [1, 4, 10, 19, 20])
def test_eckart_young_equality(r):
    U, S, Vh = la.truncated_svd(W, r)
    assert U.shape == (30, r) and S.shape == (r,) and Vh.shape == (r, 20)
    tail = float((SIGMA[r:] ** 2).sum())
    err = sq(W - U @ torch.diag(S) @ Vh)
    ey = float(la.eckart_young_error(W, r))
    scale = sq(W)
    assert abs(err - tail) <= 1e-12 * scale
    assert abs(ey - tail) <= 1e-12 * scale
    assert torch.allclose(S, SIGMA[:r], rtol=1e-12, atol=0)


def test_eckart_young_is_optimal_against_other_rank_r_routes():
    r = 4
    best = float(la.eckart_young_error(W, r))
    slack = 1e-12 * sq(W)  # rounding only: a competitor may tie, never win
    competitors = {}
    # random factors, and their least-squares improvement (best B given a random A)
    for seed in range(20):
        A = randn(r, 20, seed=100 + seed)
        competitors[f"random {seed}"] = randn(30, r, seed=200 + seed) @ A
        B = torch.linalg.lstsq(A.mT, W.mT).solution.mT
        competitors[f"lstsq {seed}"] = B @ A
    # truncated SVD of noisy copies
    for seed, noise in enumerate([1e-3, 1e-1, 1.0]):
        U, S, Vh = la.truncated_svd(W + noise * randn(30, 20, seed=300 + seed), r)
        competitors[f"svd of noisy copy {noise}"] = U @ torch.diag(S) @ Vh
    # factors trained by gradient descent (Adam on ‖W − BA‖²)
    B = (0.1 * randn(30, r, seed=400)).requires_grad_(True)
    A = (0.1 * randn(r, 20, seed=401)).requires_grad_(True)
    opt = torch.optim.Adam([A, B], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        ((W - B @ A) ** 2).sum().backward()
        opt.step()
    competitors["gradient descent"] = (B @ A).detach()
    for what, X in competitors.items():
        assert torch.linalg.matrix_rank(X) <= r
        assert sq(W - X) >= best - slack, f"{what} beats Eckart–Young"
    # gradient descent gets close: the bound is tight, not just a bound
    assert sq(W - competitors["gradient descent"]) <= best * (1 + 1e-3)


def test_randomized_svd_matches_exact_on_a_decaying_spectrum():
    s = 0.7 ** np.arange(20)
    M = with_spectrum(s, seed=3)
    r = 5
    U, S, Vh = la.truncated_svd(M, r, method="randomized", seed=0)
    Ue, Se, Vhe = la.truncated_svd(M, r)
    assert torch.allclose(S, Se, rtol=1e-3, atol=0)
    approx, exact = U @ torch.diag(S) @ Vh, Ue @ torch.diag(Se) @ Vhe
    assert float(torch.linalg.norm(approx - exact)) <= 1e-3 * float(torch.linalg.norm(exact))
    err = sq(M - approx)
    assert err <= float(la.eckart_young_error(M, r)) * (1 + 1e-3)
    # reproducible for a seed
    U2, S2, Vh2 = la.truncated_svd(M, r, method="randomized", seed=0)
    assert torch.equal(S, S2) and torch.equal(U, U2) and torch.equal(Vh, Vh2)


# ----------------------------------------------------------------------------- nuclear norm


def test_nuclear_norm_is_the_minimum_of_half_factor_norms():
    X = randn(12, 5, seed=1) @ randn(5, 9, seed=2)  # rank 5
    nn_ = float(la.nuclear_norm(X))
    assert nn_ == pytest.approx(float(np_svals(X).sum()), rel=1e-12)
    Ux, S, Vxh = torch.linalg.svd(X, full_matrices=False)
    Ux, S, Vxh = Ux[:, :5], S[:5], Vxh[:5]
    U, V = Ux * S.sqrt(), Vxh.mT * S.sqrt()  # the balanced factorisation
    assert torch.allclose(U @ V.mT, X, rtol=0, atol=1e-12)
    assert 0.5 * (sq(U) + sq(V)) == pytest.approx(nn_, rel=1e-12)
    for seed in range(20):
        M = randn(5, 5, seed=10 + seed) + 0.5 * torch.eye(5, dtype=F64)
        U2, V2 = U @ M, V @ torch.linalg.inv(M).mT  # U M (V M^{-T})ᵀ = U Vᵀ
        assert torch.allclose(U2 @ V2.mT, X, rtol=0, atol=1e-9)
        assert 0.5 * (sq(U2) + sq(V2)) >= nn_ * (1 - 1e-12)


# ----------------------------------------------------------------------------- SVT


def np_svt(W, tau):
    u, s, vh = np.linalg.svd(W.numpy(), full_matrices=False)
    return torch.from_numpy((u * np.maximum(s - tau, 0)) @ vh)


def prox_objective(X, W, tau):
    return 0.5 * sq(W - X) + tau * float(np_svals(X).sum())


@pytest.mark.parametrize("tau", [0.0, 0.5, 2.0, 100.0])
def test_svt_is_the_proximal_operator_of_the_nuclear_norm(tau):
    X = la.svt(W, tau)
    assert torch.allclose(X, np_svt(W, tau), rtol=0, atol=1e-12)
    assert torch.allclose(np_svals(X), (SIGMA - tau).clamp_min(0), rtol=0, atol=1e-12)
    best = prox_objective(X, W, tau)
    for seed in range(10):
        for eps in (1e-1, 1e-3):
            E = randn(30, 20, seed=500 + seed)
            assert prox_objective(X + eps * E, W, tau) >= best - 1e-12 * max(best, 1.0)
    if tau >= float(SIGMA[0]):
        assert torch.equal(X, torch.zeros_like(X))


# ----------------------------------------------------------------------------- seed-000 objective


@pytest.mark.parametrize("lam", [0.0, 0.3, 3.0, 8.0])  # σ₄ ≈ 7.7 < 8 ≤ σ₁ ≈ 9.7
def test_fit_uv_reaches_the_closed_form(lam):
    r = 4
    X = la.frobenius_lowrank(W, r, lam)
    # the closed form is the SVT of the truncated spectrum: σᵢ ↦ max(σᵢ − λ, 0), i ≤ r
    expected_s = torch.cat([(SIGMA[:r] - lam).clamp_min(0), torch.zeros(16, dtype=F64)])
    assert torch.allclose(np_svals(X), expected_s, rtol=0, atol=1e-12)
    Ux, S, Vxh = la.truncated_svd(X, r)
    U0, V0 = Ux * S.sqrt(), Vxh.mT * S.sqrt()
    closed = float(la.frobenius_objective(W, U0, V0, lam))
    # its value: Σ_{i>r} σᵢ² + Σ_{i≤r} [min(σᵢ, λ)² + 2λ max(σᵢ − λ, 0)]
    top = SIGMA[:r]
    by_hand = float(
        (SIGMA[r:] ** 2).sum() + (top.clamp_max(lam) ** 2).sum() + 2 * lam * (top - lam).clamp_min(0).sum()
    )
    assert closed == pytest.approx(by_hand, rel=1e-12)

    fit = la.fit_uv(W, r, lam, steps=20_000, tol=1e-15)
    assert isinstance(fit, la.FitResult)
    assert fit.U.shape == (30, r) and fit.V.shape == (20, r) and fit.U.dtype == F64
    assert fit.losses[-1] == pytest.approx(float(la.frobenius_objective(W, fit.U, fit.V, lam)))
    assert all(b <= a * (1 + 1e-12) for a, b in zip(fit.losses, fit.losses[1:], strict=False)), (
        "gradient descent increased the loss"
    )
    gap = (fit.losses[-1] - closed) / closed
    assert -1e-12 <= gap < 1e-4, f"fit_uv stopped {gap:.2e} (relative) above the optimum"
    # the fitted singular values are σᵢ − λ thresholded, as SVT at λ gives them (top r); a
    # component that the threshold removes only decays geometrically, hence 1e-5 (σ₁ ≈ 10)
    svt_s = np_svals(la.svt(W, lam))[:r]
    assert torch.allclose(svt_s, expected_s[:r], rtol=0, atol=1e-12)
    assert torch.allclose(np_svals(fit.X)[:r], svt_s, rtol=0, atol=1e-5)
    assert torch.allclose(fit.X, X, rtol=0, atol=1e-5)
    assert torch.allclose(fit.X, fit.U @ fit.V.mT)


def test_frobenius_closed_form_beats_perturbed_factors():
    r, lam = 4, 0.8
    Ux, S, Vxh = la.truncated_svd(la.frobenius_lowrank(W, r, lam), r)
    U0, V0 = Ux * S.sqrt(), Vxh.mT * S.sqrt()
    best = float(la.frobenius_objective(W, U0, V0, lam))
    for seed in range(10):
        U = U0 + 1e-2 * randn(30, r, seed=600 + seed)
        V = V0 + 1e-2 * randn(20, r, seed=700 + seed)
        assert float(la.frobenius_objective(W, U, V, lam)) >= best


# ----------------------------------------------------------------------------- adapters' algebra


def test_pissa_residual_plus_principal_part_is_w0():
    lin = torch.nn.Linear(20, 30, dtype=F64)
    with torch.no_grad():
        lin.weight.copy_(W)
    for alpha in (None, 2.0, 16.0):
        ad = lr.make("pissa", lin, rank=4, alpha=alpha)
        s = ad.scale
        recon = ad.base.weight + s * ad.B0 @ ad.A0
        assert float((recon - W).abs().max()) <= 1e-12 * float(W.abs().max())
        # and s·B₀A₀ is the best rank-r approximation of W₀
        U, S, Vh = la.truncated_svd(W, 4)
        assert torch.allclose(s * ad.B0 @ ad.A0, U @ torch.diag(S) @ Vh, rtol=0, atol=1e-12)
        # A₀ = √S Vᵀ/√s, B₀ = U √S/√s: the two factors are balanced
        assert torch.allclose(ad.A0 @ ad.A0.mT, ad.B0.mT @ ad.B0, rtol=0, atol=1e-12)
        assert torch.equal(lin.weight, W)


def test_milora_takes_the_smallest_triplets():
    lin = torch.nn.Linear(20, 30, dtype=F64)
    with torch.no_grad():
        lin.weight.copy_(W)
    ad = lr.make("milora", lin, rank=3)
    assert torch.allclose(np_svals(ad.B0 @ ad.A0)[:3], SIGMA[-3:], rtol=1e-12, atol=0)
    assert torch.allclose(ad.base.weight + ad.B0 @ ad.A0, W, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["lora", "rslora"])
def test_lora_represents_a_planted_update_exactly_iff_rank_suffices(name):
    k = 3
    dW = randn(30, k, seed=800) @ randn(k, 20, seed=801)  # rank(ΔW*) = 3
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    for r in (1, 2, 3, 5):
        lin = torch.nn.Linear(20, 30, dtype=F64)
        ad = lr.make(name, lin, rank=r, alpha=2.0 * r)
        m = min(r, k)  # set s·B A to the top-m part of ΔW*, split evenly
        with torch.no_grad():
            ad.B.zero_()
            ad.A.zero_()
            ad.B[:, :m] = U[:, :m] * (S[:m] / ad.scale).sqrt()
            ad.A[:m] = (S[:m] / ad.scale).sqrt()[:, None] * Vh[:m]
        err = sq(ad.delta_weight().detach() - dW)
        if r >= k:
            assert err <= 1e-24 * sq(dW), f"rank {r} ≥ {k} should represent ΔW* exactly"
            merged = ad.merged_weight()
            assert torch.allclose(merged, lin.weight + dW, rtol=0, atol=1e-12)
        else:
            ey = float(la.eckart_young_error(dW, r))
            assert ey > 0
            assert err == pytest.approx(ey, rel=1e-10)
