"""Random alignment: ΔW = s·B A with A a frozen random orthonormal basis; only B trains.

The input is aligned to a fixed random, orthonormalised low-dimensional basis, and only the linear
map out of that low-dimensional space is learned.

A's rows are the first r columns of Q from the QR factorisation of a seeded in×r Gaussian, so
A Aᵀ = I_r; B starts at 0. With A fixed this is LoRA-FA (Zhang et al., 2023, arXiv 2308.03303)
with an orthonormal rather than a kaiming A.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .lora import LowRankAdapter
from .registry import register


@register
class RandomAlignment(LowRankAdapter):
    """ΔW = s·B A, A = Qᵀ (frozen, orthonormal rows) from QR of a seeded Gaussian; B = 0 trains.

    The rank is at most ``in`` (A's rows are orthonormal in ℝ^in); every rank up to it widens
    the row space that B A can reach, one above ``out`` included, so none is warned about.
    """

    name = "random_alignment"
    display_name = "random alignment"
    lr_scale = 3.0  # B alone trains, in a frozen basis: optima 1–7× LoRA's in the sweeps, text 3×
    trains_A = False
    max_rank_reason = "A's r rows are orthonormal vectors of ℝ^in, of which there are at most in"

    @classmethod
    def max_rank(cls, out_f: int, in_f: int, **options: Any) -> int:
        return in_f

    @classmethod
    def useful_rank(cls, out_f: int, in_f: int, **options: Any) -> None:
        return None

    def initial_A(self, gen: torch.Generator) -> Tensor:
        gauss = torch.randn(self.in_features, self.rank, generator=gen, dtype=torch.float64)
        Q, _ = torch.linalg.qr(gauss)
        return Q.mT.contiguous().to(self.base.weight)
