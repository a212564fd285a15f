"""LoKr: low-rank Kronecker product (LyCORIS; Yeh et al., 2024, arXiv 2309.14859).

ΔW = s·C ⊗ (B A) with out = a·b and in = c·d factored as PEFT's ``factorization``:
C ∈ ℝ^{a×c} full, B ∈ ℝ^{b×r}, A ∈ ℝ^{r×d}.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Adapter, Shapes
from .registry import register


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension, PEFT's rule: m = ``factor`` if it divides ``dimension``,
    otherwise the largest divisor m ≤ min(factor, √dimension) (factor -1: no bound), e.g.
    256 → (16, 16), 128 → (8, 16), 127 → (1, 127), (128, factor=4) → (4, 32)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    factor = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        if new_m > factor:
            break
        m, n = new_m, dimension // new_m
    return min(m, n), max(m, n)


def _split(dim: int, bound: int) -> tuple[int, int]:
    """(m, dim/m) with m the largest divisor of dim with m ≤ bound and m² ≤ dim."""
    m = max(k for k in range(1, min(bound, math.isqrt(dim)) + 1) if dim % k == 0)
    return m, dim // m


def lokr_shapes(
    out_f: int, in_f: int, factor: int = -1, rank: int = 1
) -> tuple[tuple[int, int], tuple[int, int]]:
    """((a, c), (b, d)): C is a×c, the low-rank block B A is b×d; out = a·b, in = c·d.

    ``factor`` > 0: PEFT's ``factorization(·, factor)`` of out and in. ``factor`` = -1: PEFT's
    automatic split (the divisors nearest √out and √in) when ``rank`` ≤ min(b, d); otherwise the
    split with the largest common bound f on a and c whose block still holds the rank (f = 1
    gives C of size 1×1, i.e. LoRA times a scalar).
    """
    if factor != -1:
        (a, b), (c, d) = factorization(out_f, factor), factorization(in_f, factor)
        return (a, c), (b, d)
    for f in range(math.isqrt(max(out_f, in_f)), 0, -1):
        (a, b), (c, d) = _split(out_f, f), _split(in_f, f)
        if min(b, d) >= rank:
            return (a, c), (b, d)
    return (1, 1), (out_f, in_f)  # rank > min(out, in): an over-complete B A (warned)


@register
class LoKr(Adapter):
    """LoKr: ΔW = s·C ⊗ (B A), s = α/r (LyCORIS; Yeh et al., 2024, arXiv 2309.14859).

    ``factor`` (PEFT's ``decompose_factor``, default -1 = automatic) picks the factorisation of
    out and in (see :func:`lokr_shapes`); C (a×c, the smaller block) is a full matrix, B A (b×d)
    has rank r ≤ min(b, d). Init: C and A kaiming-uniform(a=√5), B = 0, so ΔW = 0 at initialisation
    (PEFT zeros C instead, LyCORIS zeros A; the forward is the same function of the factors).
    PEFT's names: ``lokr_w1`` = C, ``lokr_w2_a`` = B, ``lokr_w2_b`` = A; PEFT switches to a full
    w2 when r ≥ max(b, d)/2, here B A is always low-rank. ``dropout`` is input dropout as for
    LoRA (PEFT's ``rank_dropout``/``module_dropout`` are not offered).
    Trainable: a·c + r(b + d). The forward never builds ΔW: y = vec(C · X · Aᵀ Bᵀ) · s with X the
    input reshaped to c×d.
    """

    name = "lokr"
    display_name = "LoKr"

    @classmethod
    def trainable_shapes(cls, out_f: int, in_f: int, rank: int, bias: bool = True, **options: Any) -> Shapes:
        """C (a × c), B (b × r), A (r × d) with out = a·b, in = c·d (:func:`lokr_shapes`): a·c + r(b + d)."""
        (a, c), (b, d) = lokr_shapes(out_f, in_f, options.get("factor", -1), rank)
        return {"C": (a, c), "B": (b, rank), "A": (rank, d)}

    def __init__(self, base: nn.Linear, *, factor: int = -1, **common: Any) -> None:
        if type(factor) is not int or not (factor == -1 or factor > 0):
            raise ValueError(f"factor={factor!r} must be a positive integer or -1 (automatic)")
        super().__init__(base, rank_options={"factor": factor}, **common)
        self.factor = factor
        (a, c), (b, d) = lokr_shapes(self.out_features, self.in_features, factor, self.rank)
        self.kron_shapes = ((a, c), (b, d))
        gen = self._generator()
        self.C = nn.Parameter(self._kaiming(a, c, gen=gen))
        self.A = nn.Parameter(self._kaiming(self.rank, d, gen=gen))
        self.B = nn.Parameter(torch.zeros_like(self._new(b, self.rank)))

    @classmethod
    def useful_rank(cls, out_f: int, in_f: int, **options: Any) -> int:
        """min(b, d) of the B A block: with ``factor`` = -1 the split makes room for any rank up to
        min(out, in) (:func:`lokr_shapes`), with a given ``factor`` the block is fixed."""
        factor = options.get("factor", -1)
        if factor == -1:
            return min(out_f, in_f)
        return min(lokr_shapes(out_f, in_f, factor)[1])

    def delta_weight(self) -> Tensor:
        return torch.kron(self.C, self.B @ self.A) * self.scale

    def adapter_forward(self, x: Tensor) -> Tensor:
        (a, c), (b, d) = self.kron_shapes
        X = x.reshape(*x.shape[:-1], c, d)
        Y = self.C @ F.linear(F.linear(X, self.A), self.B * self.scale)  # (…, a, b)
        return Y.reshape(*x.shape[:-1], a * b)

    def add_adapter(self, y: Tensor, x: Tensor) -> Tensor:
        # The Kronecker route ends in a batched product, not one GEMM into y: add after it.
        return y + self.adapter_forward(x)

    def config(self) -> dict:
        return {**super().config(), "factor": self.factor}
