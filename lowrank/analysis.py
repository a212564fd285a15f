"""Analyses of learned updates: pure functions on tensors, comparing variants on the same ΔW.

Spectra and ranks of ΔW; the LoRA paper's subspace similarity (§7.2) and amplification
factor (§7.3); intruder dimensions (Shuttleworth et al., 2024, arXiv 2410.21228); DoRA's
magnitude/direction decomposition (Liu et al., 2024, arXiv 2402.09353, §2); forgetting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "singular_values",
    "energy_top_k",
    "effective_rank",
    "stable_rank",
    "rank_for_energy",
    "subspace_similarity",
    "amplification",
    "intruder_dimensions",
    "magnitude_direction",
    "md_correlation",
    "forgetting",
    "spectrum_summary",
    "weight_report",
]


def _matrix(W: Tensor) -> Tensor:
    if not isinstance(W, Tensor) or W.ndim != 2:
        raise ValueError(f"expected a 2-D tensor, got {getattr(W, 'shape', type(W).__name__)}")
    return W.detach().to(torch.float64)


def singular_values(W: Tensor) -> Tensor:
    """σ₁ ≥ σ₂ ≥ … of W, in float64."""
    return torch.linalg.svdvals(_matrix(W))


def energy_top_k(W: Tensor, k: int) -> float:
    """Σ_{i≤k} σᵢ² / Σᵢ σᵢ²: the share of ‖W‖²_F in the top-k directions (1 for W = 0)."""
    s2 = singular_values(W) ** 2
    total = float(s2.sum())
    return 1.0 if total == 0 else float(s2[:k].sum()) / total


def effective_rank(W: Tensor) -> float:
    """exp(H(p)), pᵢ = σᵢ/Σσ (Roy & Vetterli, 2007): k for k equal singular values, 0 for W = 0."""
    s = singular_values(W)
    if float(s.sum()) == 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def stable_rank(W: Tensor) -> float:
    """‖W‖²_F / ‖W‖²₂ (0 for W = 0)."""
    s = singular_values(W)
    return 0.0 if float(s[0]) == 0 else float((s**2).sum() / s[0] ** 2)


def rank_for_energy(W: Tensor, energy: float = 0.9) -> int:
    """Smallest k with Σ_{i≤k} σᵢ² ≥ energy · ‖W‖²_F (0 for W = 0)."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy={energy!r} must be in (0, 1]")
    s2 = singular_values(W) ** 2
    total = float(s2.sum())
    if total == 0:
        return 0
    cum = torch.cumsum(s2, 0) / total
    return int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12)) + 1


def subspace_similarity(A1: Tensor, A2: Tensor, i: int, j: int) -> float:
    """φ(A₁, A₂, i, j) = ‖U_iᵀ U_j‖²_F / min(i, j), U the right singular vectors of A (LoRA §7.2).

    A₁, A₂ are (r × in) down-projections; U_i holds the top-i right singular vectors of A₁ and
    U_j the top-j of A₂. φ = 1 when one subspace contains the other, 0 when orthogonal.
    """
    A1, A2 = _matrix(A1), _matrix(A2)
    if A1.shape[1] != A2.shape[1]:
        raise ValueError(f"A1 and A2 act on different inputs ({A1.shape[1]} vs {A2.shape[1]})")
    for name, k, A in (("i", i, A1), ("j", j, A2)):
        if not 1 <= k <= min(A.shape):
            raise ValueError(f"{name}={k} must be between 1 and {min(A.shape)}")
    U1 = torch.linalg.svd(A1, full_matrices=False)[2][:i].mT
    U2 = torch.linalg.svd(A2, full_matrices=False)[2][:j].mT
    return float((U1.mT @ U2).square().sum()) / min(i, j)


def amplification(dW: Tensor, W: Tensor, r: int) -> float:
    """‖ΔW‖_F / ‖U_rᵀ W V_r‖_F with U_r, V_r the top-r singular vectors of ΔW (LoRA §7.3)."""
    dW, W = _matrix(dW), _matrix(W)
    if dW.shape != W.shape:
        raise ValueError(f"dW {tuple(dW.shape)} and W {tuple(W.shape)} differ in shape")
    U, _, Vh = torch.linalg.svd(dW, full_matrices=False)
    proj = U[:, :r].mT @ W @ Vh[:r].mT
    return float(dW.norm() / proj.norm())


def intruder_dimensions(W_ft: Tensor, W_pre: Tensor, k: int = 10, eps: float = 0.5) -> int:
    """How many of the top-k left singular vectors of W_ft have max |cos| < ε with every left
    singular vector of W_pre (Shuttleworth et al., 2024)."""
    U_ft = torch.linalg.svd(_matrix(W_ft), full_matrices=False)[0][:, :k]
    U_pre = torch.linalg.svd(_matrix(W_pre), full_matrices=False)[0]
    best = (U_ft.mT @ U_pre).abs().max(dim=1).values
    return int((best < eps).sum())


def magnitude_direction(W: Tensor, W0: Tensor) -> tuple[float, float]:
    """(ΔM, ΔD) of DoRA §2 in the (out × in) convention: the mean over output rows of
    |‖Wₙ‖ − ‖W₀ₙ‖| and of 1 − cos(Wₙ, W₀ₙ)."""
    W, W0 = _matrix(W), _matrix(W0)
    dm = (W.norm(dim=1) - W0.norm(dim=1)).abs().mean()
    dd = (1 - torch.nn.functional.cosine_similarity(W, W0, dim=1)).mean()
    return float(dm), float(dd)


def md_correlation(checkpoints: Sequence[Tensor], W0: Tensor) -> float:
    """Pearson correlation of ΔM and ΔD over checkpoints (DoRA §2: negative for full
    fine-tuning and DoRA, positive for LoRA)."""
    pts = torch.tensor([magnitude_direction(W, W0) for W in checkpoints], dtype=torch.float64)
    if len(pts) < 3:
        raise ValueError("md_correlation needs at least 3 checkpoints")
    return float(torch.corrcoef(pts.mT)[0, 1])


def forgetting(before: float, after: float) -> float:
    """Old-task accuracy lost by adaptation: before − after."""
    return before - after


def spectrum_summary(dW: Tensor, k: int = 8) -> dict[str, float]:
    """The scalar summaries of one ΔW, as a results row."""
    return {
        "fro_norm": float(_matrix(dW).norm()),
        "effective_rank": effective_rank(dW),
        "stable_rank": stable_rank(dW),
        "rank90": rank_for_energy(dW, 0.9),
        f"energy_top{k}": energy_top_k(dW, k),
    }


def weight_report(
    model: nn.Module, top: int = 64, intruder_k: int = 10, intruder_eps: float = 0.5
) -> dict[str, dict[str, Any]]:
    """Per adapted layer of ``model``: the spectrum of ΔW = ``delta_weight()`` (its ``top``
    largest singular values, effective and stable rank, rank for 90 % energy, the share of
    ‖ΔW‖²_F in the adapter's rank r), ‖ΔW‖_F, ‖W₀‖_F, DoRA's ΔM and ΔD of W₀ + ΔW against W₀,
    and the intruder dimensions of W₀ + ΔW among its top ``intruder_k`` (ε = ``intruder_eps``)."""
    from .inject import adapters

    out = {}
    for name, ad in adapters(model).items():
        dW, W0 = _matrix(ad.delta_weight()), _matrix(ad.w0)
        sv = torch.linalg.svdvals(dW)
        dm, dd = magnitude_direction(W0 + dW, W0)
        out[name] = {
            "variant": ad.name,
            "rank": ad.rank,
            "shape": list(dW.shape),
            "sv": [float(x) for x in sv[:top]],
            "fro_norm": float(dW.norm()),
            "w0_norm": float(W0.norm()),
            "effective_rank": effective_rank(dW),
            "stable_rank": stable_rank(dW),
            "rank90": rank_for_energy(dW, 0.9),
            "energy_in_rank": energy_top_k(dW, ad.rank),
            "delta_magnitude": dm,
            "delta_direction": dd,
            "intruders": intruder_dimensions(W0 + dW, W0, intruder_k, intruder_eps),
        }
    return out
