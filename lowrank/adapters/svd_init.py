"""SVD-initialised LoRA: start B A at a block of W₀'s singular triplets, train on the residual.

PiSSA (Meng et al., 2024, arXiv 2404.02948) takes the r largest triplets, MiLoRA (Wang et al.,
2024, arXiv 2406.09044) the r smallest:  A₀ = √S_r V_rᵀ/√s,  B₀ = U_r √S_r/√s,  so that
s·B₀A₀ = U_r S_r V_rᵀ and the frozen base is W_res = W₀ − s·B₀A₀. ΔW = s·(B A − B₀A₀).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..linalg import truncated_svd
from .lora import LowRankAdapter
from .registry import register


@register
class PiSSA(LowRankAdapter):
    """PiSSA: B A starts at the top-r singular triplets of W₀ (Meng et al., 2024, arXiv 2404.02948).

    ``svd="exact"`` (default) or ``"randomized"`` (``torch.svd_lowrank`` with ``niter`` power
    iterations). The SVD runs in float64; the caller's Linear is never modified.
    """

    name = "pissa"
    display_name = "PiSSA"
    test_options = ({"svd": "randomized"},)
    smallest = False
    max_rank_reason = "its factors start at r of W₀'s min(out, in) singular triplets"

    @classmethod
    def max_rank(cls, out_f: int, in_f: int, **options: Any) -> int:
        return min(out_f, in_f)

    def __init__(self, base: nn.Linear, *, svd: str = "exact", niter: int = 4, **common: Any) -> None:
        if svd not in ("exact", "randomized"):
            raise ValueError(f"svd={svd!r} is unknown; use 'exact' or 'randomized'")
        if svd == "randomized" and self.smallest:
            raise ValueError("svd='randomized' finds the largest triplets only; use svd='exact'")
        super().__init__(base, **common)
        self.svd, self.niter = svd, int(niter)
        W = self._weight_values(f"{self.name}'s initialisation (an SVD of W₀)")
        if self.smallest:  # every triplet, largest first, then the last r
            U, S, Vh = truncated_svd(W, min(W.shape))
            U, S, Vh = U[:, -self.rank :], S[-self.rank :], Vh[-self.rank :]
        else:
            U, S, Vh = truncated_svd(W, self.rank, method=svd, niter=niter, seed=self.seed)
        self.start_from_svd(U, S, Vh)

    def config(self) -> dict:
        return {**super().config(), "svd": self.svd, "niter": self.niter}


@register
class MiLoRA(PiSSA):
    """MiLoRA: as PiSSA with the r smallest singular triplets (Wang et al., 2024, arXiv 2406.09044)."""

    name = "milora"
    display_name = "MiLoRA"
    test_options = ()  # the smallest triplets need the exact SVD
    smallest = True
