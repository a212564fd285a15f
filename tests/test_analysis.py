"""Analysis functions on constructed cases with known answers."""

import math

import pytest
import torch

from lowrank import analysis as an


def diag(*s, shape=(6, 5)):
    W = torch.zeros(shape, dtype=torch.float64)
    W[range(len(s)), range(len(s))] = torch.tensor(s, dtype=torch.float64)
    return W


def rotated(W, seed=0):
    """Q₁ W Q₂ with random orthogonal Q: same singular values, generic singular vectors."""
    g = torch.Generator().manual_seed(seed)
    q1 = torch.linalg.qr(torch.randn(W.shape[0], W.shape[0], generator=g, dtype=W.dtype))[0]
    q2 = torch.linalg.qr(torch.randn(W.shape[1], W.shape[1], generator=g, dtype=W.dtype))[0]
    return q1 @ W @ q2


def test_effective_rank_of_k_equal_singular_values_is_k():
    for k in (1, 2, 4):
        assert an.effective_rank(rotated(diag(*[3.0] * k))) == pytest.approx(k, rel=1e-10)
    assert an.effective_rank(torch.zeros(4, 4)) == 0.0


def test_effective_rank_matches_the_entropy_formula():
    s = [4.0, 2.0, 1.0, 1.0]
    p = [x / sum(s) for x in s]
    expected = math.exp(-sum(q * math.log(q) for q in p))
    assert an.effective_rank(rotated(diag(*s))) == pytest.approx(expected, rel=1e-10)


def test_stable_rank_energy_and_rank90():
    W = rotated(diag(3.0, 2.0, 1.0))  # energies 9, 4, 1 of 14
    assert an.stable_rank(W) == pytest.approx(14 / 9, rel=1e-10)
    assert an.energy_top_k(W, 1) == pytest.approx(9 / 14, rel=1e-10)
    assert an.energy_top_k(W, 2) == pytest.approx(13 / 14, rel=1e-10)
    assert an.rank_for_energy(W, 0.9) == 2  # 13/14 = 0.93 ≥ 0.9 > 9/14
    assert an.rank_for_energy(W, 0.95) == 3
    assert an.rank_for_energy(W, 13 / 14) == 2  # exactly at the boundary


def test_subspace_similarity_identical_orthogonal_and_nested():
    g = torch.Generator().manual_seed(1)
    Q = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))[0]
    A = torch.diag(torch.tensor([5.0, 4, 3, 2], dtype=torch.float64)) @ Q[:, :4].mT
    B = torch.diag(torch.tensor([5.0, 4, 3, 2], dtype=torch.float64)) @ Q[:, 4:8].mT
    assert an.subspace_similarity(A, A, 4, 4) == pytest.approx(1.0, abs=1e-12)
    assert an.subspace_similarity(A, 7 * A, 2, 3) == pytest.approx(1.0, abs=1e-12)
    assert an.subspace_similarity(A, B, 4, 4) == pytest.approx(0.0, abs=1e-12)
    # half overlapping: span(q0, q1) vs span(q0, q4) → ‖UᵀU‖² = 1 of min(i, j) = 2
    C = torch.stack([Q[:, 0] * 2, Q[:, 4]])
    D = torch.stack([Q[:, 0] * 2, Q[:, 1]])
    assert an.subspace_similarity(C, D, 2, 2) == pytest.approx(0.5, abs=1e-12)


def test_amplification_of_a_direction_outside_w_is_large_and_inside_is_one():
    W = diag(10.0, 5.0, 1.0, shape=(5, 5))
    inside = diag(10.0, shape=(5, 5))  # ΔW along W's top direction, same size
    assert an.amplification(inside, W, 1) == pytest.approx(1.0, rel=1e-12)
    weak = torch.zeros(5, 5, dtype=torch.float64)
    weak[2, 2] = 3.0  # along W's weakest direction σ=1: amplification 3/1
    assert an.amplification(weak, W, 1) == pytest.approx(3.0, rel=1e-12)


def test_intruder_dimensions_zero_for_w0_and_one_for_a_planted_off_basis_direction():
    W0 = rotated(diag(5.0, 4.0, 3.0, 2.0, 1.0, shape=(8, 8)) + diag(*[0.5] * 8, shape=(8, 8)))
    assert an.intruder_dimensions(W0, W0, k=5, eps=0.5) == 0
    U, _, Vh = torch.linalg.svd(W0)
    # a dominant new direction halfway between two pre-trained ones: |cos| = 1/√2 with each
    u = (U[:, 6] + U[:, 7]) / math.sqrt(2)
    ft = W0 + 50.0 * torch.outer(u, Vh[0])
    assert an.intruder_dimensions(ft, W0, k=1, eps=0.8) == 1  # 0.707 < 0.8: an intruder
    assert an.intruder_dimensions(ft, W0, k=1, eps=0.6) == 0  # 0.707 ≥ 0.6: not one


def test_magnitude_direction_separates_scaling_from_rotation():
    W0 = rotated(diag(1.0, 2.0, 3.0, shape=(3, 4)))
    dm, dd = an.magnitude_direction(2 * W0, W0)
    assert dd == pytest.approx(0.0, abs=1e-12)
    assert dm == pytest.approx(float(W0.norm(dim=1).mean()), rel=1e-12)
    R = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))[0]
    dm, dd = an.magnitude_direction(W0 @ R, W0)  # rotating inputs keeps every row norm
    assert dm == pytest.approx(0.0, abs=1e-12) and dd > 0.01


def test_md_correlation_sign():
    W0 = rotated(diag(1.0, 2.0, 3.0, shape=(3, 4)))
    R = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))[0]
    # magnitude and direction grow together → positive correlation
    together = [(1 + t) * (W0 + t * (W0 @ R - W0)) for t in (0.1, 0.2, 0.3, 0.4)]
    assert an.md_correlation(together, W0) > 0.9


def test_forgetting_and_summary():
    assert an.forgetting(0.9, 0.7) == pytest.approx(0.2)
    s = an.spectrum_summary(rotated(diag(1.0, 1.0)), k=1)
    assert s["effective_rank"] == pytest.approx(2.0) and s["rank90"] == 2
    assert s["energy_top1"] == pytest.approx(0.5)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="different inputs"):
        an.subspace_similarity(torch.ones(2, 3), torch.ones(2, 4), 1, 1)
    with pytest.raises(ValueError, match="i=5"):
        an.subspace_similarity(torch.ones(2, 3), torch.ones(2, 3), 5, 1)
