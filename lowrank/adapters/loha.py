"""LoHa: low-rank Hadamard product (Hyeon-Woo et al., 2022, FedPara, arXiv 2108.06098).

ΔW = s·(B₁A₁) ⊙ (B₂A₂) with B_k ∈ ℝ^{out×r}, A_k ∈ ℝ^{r×in}: 2r(out+in) parameters whose update
can reach rank r², as in PEFT's and LyCORIS's LoHa.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import Adapter, Shapes
from .registry import register


@register
class LoHa(Adapter):
    """LoHa: ΔW = s·(B₁A₁) ⊙ (B₂A₂), s = α/r (Hyeon-Woo et al., 2022, arXiv 2108.06098).

    Init as PEFT (``init_weights=True``): B₁, A₁, B₂ kaiming-uniform(a=√5) (bound 1/√fan_in, so
    1/√r for the out×r factors, 1/√in for the r×in one) and A₂ = 0, so ΔW = 0 at initialisation.
    PEFT's names: ``hada_w1_a`` = B₁, ``hada_w1_b`` = A₁, ``hada_w2_a`` = B₂, ``hada_w2_b`` = A₂
    (the zero factor is PEFT's ``hada_w2_b``, the r×in one); ``scaling`` = α/r (PEFT's default
    α = 8 = r; here α = r). ``dropout`` is dropout on the adapter branch's input, as for LoRA;
    PEFT's ``rank_dropout`` and ``module_dropout`` are not offered. Trainable: 2r(in + out).
    The Hadamard product does not factor through x, so the forward builds ΔW (out × in) once
    per call.
    """

    name = "loha"
    display_name = "LoHa"

    @classmethod
    def trainable_shapes(cls, out_f: int, in_f: int, rank: int, bias: bool = True, **options: Any) -> Shapes:
        """B₁, B₂ (out × r) and A₁, A₂ (r × in): 2r(in + out)."""
        return {"B1": (out_f, rank), "A1": (rank, in_f), "B2": (out_f, rank), "A2": (rank, in_f)}

    def __init__(self, base: nn.Linear, **common: Any) -> None:
        super().__init__(base, **common)
        gen = self._generator()
        out_f, in_f = self.out_features, self.in_features
        self.B1 = nn.Parameter(self._kaiming(out_f, self.rank, gen=gen))
        self.A1 = nn.Parameter(self._kaiming(self.rank, in_f, gen=gen))
        self.B2 = nn.Parameter(self._kaiming(out_f, self.rank, gen=gen))
        self.A2 = nn.Parameter(torch.zeros_like(self._new(self.rank, in_f)))

    def delta_weight(self) -> Tensor:
        return (self.B1 @ self.A1) * (self.B2 @ self.A2) * self.scale
