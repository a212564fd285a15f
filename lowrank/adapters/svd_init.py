"""SVD-initialised LoRA: start B A at a block of W₀'s singular triplets, train on the residual.

PiSSA (Meng et al., 2024, arXiv 2404.02948) takes the r largest triplets, MiLoRA (Wang et al.,
2024, arXiv 2406.09044) the r smallest:  A₀ = √S_r V_rᵀ/√s,  B₀ = U_r √S_r/√s,  so that
s·B₀A₀ = U_r S_r V_rᵀ and the frozen base is W_res = W₀ − s·B₀A₀. ΔW = s·(B A − B₀A₀).
"""

from __future__ import annotations

import torch
from torch import nn

from ..linalg import truncated_svd
from .base import register
from .lora import LowRankAdapter


@register
class PiSSA(LowRankAdapter):
    """PiSSA: B A starts at the top-r singular triplets of W₀ (Meng et al., 2024, arXiv 2404.02948).

    ``svd="exact"`` (default) or ``"randomized"`` (``torch.svd_lowrank`` with ``niter`` power
    iterations). The SVD runs in float64; the caller's Linear is never modified.
    """

    name = "pissa"
    smallest = False

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float | None = None,
                 dropout: float = 0.0, seed: int = 0, svd: str = "exact", niter: int = 4) -> None:
        super().__init__(base, rank, alpha, dropout, seed)
        if svd not in ("exact", "randomized"):
            raise ValueError(f"svd={svd!r} is unknown; use 'exact' or 'randomized'")
        if svd == "randomized" and self.smallest:
            raise ValueError("svd='randomized' finds the largest triplets only; use svd='exact'")
        self.svd, self.niter = svd, int(niter)
        W = base.weight.detach().to(torch.float64)
        if self.smallest:
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            U, S, Vh = U[:, -self.rank:], S[-self.rank:], Vh[-self.rank:]
        else:
            U, S, Vh = truncated_svd(W, self.rank, method=svd, niter=niter, seed=seed)
        self.start_from_svd(U, S, Vh)

    def config(self) -> dict:
        return {**super().config(), "svd": self.svd, "niter": self.niter}


@register
class MiLoRA(PiSSA):
    """MiLoRA: as PiSSA with the r smallest singular triplets (Wang et al., 2024, arXiv 2406.09044)."""

    name = "milora"
    smallest = True


