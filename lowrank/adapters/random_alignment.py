"""Random alignment (seed 002): ΔW = s·B A with A a frozen random orthonormal basis; only B trains.

A's rows are the first r columns of Q from the QR factorisation of a seeded in×r Gaussian, so
A Aᵀ = I_r; B starts at 0. With A fixed this is LoRA-FA (Zhang et al., 2023, arXiv 2308.03303)
with an orthonormal rather than a kaiming A.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import register
from .lora import LowRankAdapter


@register
class RandomAlignment(LowRankAdapter):
    """ΔW = s·B A, A = Qᵀ (frozen, orthonormal rows) from QR of a seeded Gaussian; B = 0 trains."""

    name = "random_alignment"

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float | None = None,
                 dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__(base, rank, alpha, dropout, seed)
        gauss = torch.randn(self.in_features, self.rank, generator=self._generator(),
                            dtype=torch.float64)
        Q, _ = torch.linalg.qr(gauss)
        del self.A
        self.register_buffer("A", Q.mT.contiguous().to(base.weight))
