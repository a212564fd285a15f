"""Low-rank linear algebra: truncated SVD, Eckart–Young, nuclear norm, SVT, and the Frobenius-
regularised factorisation  ‖W − UVᵀ‖²_F + λ(‖U‖²_F + ‖V‖²_F)  solved in closed form and by
gradient descent.

The closed form rests on  min_{UVᵀ = X} ½(‖U‖²_F + ‖V‖²_F) = ‖X‖_*  (Srebro et al., 2005), so
the objective equals  min_X ‖W − X‖²_F + 2λ‖X‖_*  under rank(X) ≤ r, which singular value
thresholding at λ solves (Cai, Candès & Shen, 2010): keep σᵢ ↦ max(σᵢ − λ, 0) for i ≤ r.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "truncated_svd",
    "eckart_young_error",
    "nuclear_norm",
    "svt",
    "frobenius_lowrank",
    "frobenius_objective",
    "fit_uv",
    "FitResult",
    "random_projection_lowrank",
]


def _check_matrix(W: Tensor, what: str = "W") -> None:
    if not isinstance(W, Tensor) or W.ndim != 2:
        shape = tuple(W.shape) if isinstance(W, Tensor) else type(W).__name__
        raise ValueError(f"{what} must be a 2-D tensor, got {shape}; pass a single matrix")
    if not torch.isfinite(W).all():
        raise ValueError(f"{what} contains NaN or inf; clean the matrix before factorising it")


def _check_rank(W: Tensor, r: int) -> None:
    hi = min(W.shape)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= hi:
        raise ValueError(
            f"rank r={r!r} is invalid for a {W.shape[0]}x{W.shape[1]} matrix; "
            f"choose an integer between 1 and {hi}"
        )


def truncated_svd(
    W: Tensor,
    r: int,
    method: str = "exact",
    niter: int = 4,
    oversample: int = 10,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-r singular triplets (U (m×r), S (r), Vh (r×n)), as ``torch.linalg.svd`` orders them.

    ``method="randomized"`` uses ``torch.svd_lowrank`` (Halko et al., 2011) with ``r + oversample``
    probes and ``niter`` power iterations, seeded so it is reproducible.
    """
    _check_matrix(W)
    _check_rank(W, r)
    if method == "exact":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r]
    if method == "randomized":
        q = min(r + oversample, *W.shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(W, q=q, niter=niter)
        return U[:, :r], S[:r], V[:, :r].mT
    raise ValueError(f"method={method!r} is unknown; use 'exact' or 'randomized'")


def eckart_young_error(W: Tensor, r: int) -> Tensor:
    """Squared Frobenius error of the best rank-r approximation: Σ_{i>r} σᵢ² (Eckart & Young, 1936)."""
    _check_matrix(W)
    _check_rank(W, r)
    S = torch.linalg.svdvals(W)
    return (S[r:] ** 2).sum()


def random_projection_lowrank(W: Tensor, r: int, seed: int = 0) -> Tensor:
    """W Q Qᵀ: W's rows projected onto a random r-dimensional subspace of its input space.

    Q (in × r) is an orthonormal basis (QR) of a seeded standard Gaussian, so the subspace is
    uniformly distributed. The result has rank ≤ r and error ≥ the Eckart–Young error, with
    equality when the subspace contains the top-r right singular vectors of W.
    """
    _check_matrix(W)
    _check_rank(W, r)
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(W.shape[1], r, generator=g, dtype=torch.float64)
    Q = torch.linalg.qr(G)[0].to(W)
    return (W @ Q) @ Q.mT


def nuclear_norm(W: Tensor) -> Tensor:
    """‖W‖_* = Σᵢ σᵢ."""
    _check_matrix(W)
    return torch.linalg.svdvals(W).sum()


def svt(W: Tensor, tau: float) -> Tensor:
    """Singular value thresholding: U diag(max(σ − τ, 0)) Vᵀ = argmin_X ½‖W − X‖²_F + τ‖X‖_*."""
    _check_matrix(W)
    if not tau >= 0:
        raise ValueError(f"tau={tau!r} must be a non-negative threshold")
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return (U * (S - tau).clamp_min(0)) @ Vh


def frobenius_lowrank(W: Tensor, r: int, lam: float) -> Tensor:
    """argmin_{UVᵀ, U∈ℝ^{m×r}} ‖W − UVᵀ‖²_F + λ(‖U‖²_F + ‖V‖²_F) = Σ_{i≤r} max(σᵢ − λ, 0) uᵢvᵢᵀ."""
    _check_matrix(W)
    _check_rank(W, r)
    if not lam >= 0:
        raise ValueError(f"lam={lam!r} must be a non-negative regularisation weight")
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return (U[:, :r] * (S[:r] - lam).clamp_min(0)) @ Vh[:r]


def frobenius_objective(W: Tensor, U: Tensor, V: Tensor, lam: float) -> Tensor:
    """‖W − UVᵀ‖²_F + λ(‖U‖²_F + ‖V‖²_F): the loss of the Frobenius-regularised factorisation."""
    return ((W - U @ V.mT) ** 2).sum() + lam * ((U**2).sum() + (V**2).sum())


@dataclass
class FitResult:
    """Factors found by :func:`fit_uv` and the loss after every step."""

    U: Tensor
    V: Tensor
    losses: list[float] = field(default_factory=list)

    @property
    def X(self) -> Tensor:
        """The fitted matrix UVᵀ."""
        return self.U @ self.V.mT


def fit_uv(
    W: Tensor,
    r: int,
    lam: float,
    steps: int = 5000,
    lr: float | None = None,
    seed: int = 0,
    init_scale: float = 1e-2,
    tol: float = 0.0,
) -> FitResult:
    """Minimise ‖W − UVᵀ‖²_F + λ(‖U‖²_F + ‖V‖²_F) by full-batch gradient descent.

    U, V start as small seeded Gaussians (``init_scale``·N(0,1)); the gradients are
    ∇_U = 2(UVᵀ − W)V + 2λU and ∇_V = 2(UVᵀ − W)ᵀU + 2λV. The default step size,
    ``lr = 1 / (4‖W‖₂ + 4λ)``, is safe near the optimum (where ‖U‖²₂ ≈ ‖V‖²₂ ≲ ‖W‖₂).
    Stops early when the loss changes by less than ``tol`` (relative) between steps.
    Computed in the dtype of ``W``; pass float64 to reach the closed form to 1e-10.
    """
    _check_matrix(W)
    _check_rank(W, r)
    if not lam >= 0:
        raise ValueError(f"lam={lam!r} must be a non-negative regularisation weight")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps={steps!r} must be a positive integer")
    if lr is None:
        lr = 1.0 / (4 * float(torch.linalg.matrix_norm(W, ord=2)) + 4 * lam)
    if not lr > 0:
        raise ValueError(f"lr={lr!r} must be a positive step size")
    g = torch.Generator().manual_seed(seed)
    m, n = W.shape
    U = (init_scale * torch.randn(m, r, generator=g, dtype=torch.float64)).to(W)
    V = (init_scale * torch.randn(n, r, generator=g, dtype=torch.float64)).to(W)
    losses = [float(frobenius_objective(W, U, V, lam))]
    for _ in range(steps):
        R = U @ V.mT - W
        U, V = U - 2 * lr * (R @ V + lam * U), V - 2 * lr * (R.mT @ U + lam * V)
        losses.append(float(frobenius_objective(W, U, V, lam)))
        if not torch.isfinite(torch.tensor(losses[-1])):
            raise FloatingPointError(f"fit_uv diverged (loss={losses[-1]}) with lr={lr:g}; use a smaller lr")
        if tol > 0 and abs(losses[-2] - losses[-1]) <= tol * abs(losses[-1]):
            break
    return FitResult(U, V, losses)
