"""Frobenius-regularised UVᵀ (seed 000): ΔW = U Vᵀ with the penalty λ(‖U‖²_F + ‖V‖²_F).

Stored as LoRA factors with U = √s·B and Vᵀ = √s·A, so the penalty is λ·s·(‖A‖²_F + ‖B‖²_F).
By ‖X‖_* = min_{UVᵀ=X} ½(‖U‖² + ‖V‖²) (Srebro et al., 2005) the penalty is an implicit
nuclear-norm regulariser 2λ‖ΔW‖_* at the balanced optimum.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..linalg import frobenius_lowrank, truncated_svd
from .base import register
from .lora import LowRankAdapter


@register
class FrobeniusUV(LowRankAdapter):
    """ΔW = U Vᵀ (= s·B A), penalty λ(‖U‖²_F + ‖V‖²_F); defaults λ = 1e-4, init="lora".

    ``init="closed_form"`` starts U Vᵀ at the optimum of ‖W₀ − UVᵀ‖²_F + λ(‖U‖² + ‖V‖²)
    (balanced factors of ``linalg.frobenius_lowrank``) and trains on the residual, like PiSSA.
    """

    name = "frobenius"

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float | None = None,
                 dropout: float = 0.0, seed: int = 0, lam: float = 1e-4,
                 init: str = "lora") -> None:
        super().__init__(base, rank, alpha, dropout, seed)
        if not (isinstance(lam, (int, float)) and lam >= 0):
            raise ValueError(f"lam={lam!r} must be a non-negative number")
        if init not in ("lora", "closed_form"):
            raise ValueError(f"init={init!r} is unknown; use 'lora' or 'closed_form'")
        self.lam, self.init = float(lam), init
        if init == "closed_form":
            W = base.weight.detach().to(torch.float64)
            U, S, Vh = truncated_svd(frobenius_lowrank(W, self.rank, self.lam), self.rank)
            self.start_from_svd(U, S, Vh)

    def penalty(self) -> Tensor:
        return self.lam * self.scale * (self.A.square().sum() + self.B.square().sum())

    def config(self) -> dict:
        return {**super().config(), "lam": self.lam, "init": self.init}
