"""Frobenius-regularised UVᵀ: ΔW = U Vᵀ with the penalty λ(‖U‖²_F + ‖V‖²_F).

The low-rank approximation W ≈ UVᵀ that minimises ‖W − UVᵀ‖²_F + λ(‖U‖²_F + ‖V‖²_F) by
gradient descent, made an adapter: the penalty is added to the task's loss.

Stored as LoRA factors with U = √s·B and Vᵀ = √s·A, so the penalty is λ·s·(‖A‖²_F + ‖B‖²_F).
By ‖X‖_* = min_{UVᵀ=X} ½(‖U‖² + ‖V‖²) (Srebro et al., 2005) the penalty is an implicit
nuclear-norm regulariser 2λ‖ΔW‖_* at the balanced optimum.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..linalg import frobenius_lowrank, truncated_svd
from .lora import LowRankAdapter
from .registry import register


@register
class FrobeniusUV(LowRankAdapter):
    """ΔW = U Vᵀ (= s·B A), penalty λ(‖U‖²_F + ‖V‖²_F); defaults λ = 1e-4, init="lora".

    ``init="closed_form"`` starts U Vᵀ at the optimum of ‖W₀ − UVᵀ‖²_F + λ(‖U‖² + ‖V‖²)
    (balanced factors of ``linalg.frobenius_lowrank``) and trains on the residual, like PiSSA.
    """

    name = "frobenius"
    display_name = "Frobenius UVᵀ"
    test_options = ({"init": "closed_form", "lam": 0.05},)
    max_rank_reason = (
        "init='closed_form' starts the factors at r of the closed form's min(out, in) singular triplets"
    )

    @classmethod
    def max_rank(cls, out_f: int, in_f: int, **options: Any) -> int | None:
        return min(out_f, in_f) if options.get("init") == "closed_form" else None

    def __init__(self, base: nn.Linear, *, lam: float = 1e-4, init: str = "lora", **common: Any) -> None:
        if not (isinstance(lam, (int, float)) and lam >= 0):
            raise ValueError(f"lam={lam!r} must be a non-negative number")
        if init not in ("lora", "closed_form"):
            raise ValueError(f"init={init!r} is unknown; use 'lora' or 'closed_form'")
        super().__init__(base, rank_options={"init": init}, **common)
        self.lam, self.init = float(lam), init
        if init == "closed_form":
            W = self._weight_values("frobenius's init='closed_form' (an SVD of W₀)")
            U, S, Vh = truncated_svd(frobenius_lowrank(W, self.rank, self.lam), self.rank)
            self.start_from_svd(U, S, Vh)

    def penalty(self) -> Tensor:
        return self.lam * self.scale * (self.A.square().sum() + self.B.square().sum())

    def config(self) -> dict:
        return {**super().config(), "lam": self.lam, "init": self.init}
