"""LoRA and rsLoRA: ΔW = s·B A with A ∈ ℝ^{r×in}, B ∈ ℝ^{out×r}.

LoRA (Hu et al., 2021, arXiv 2106.09685): s = α/r, A kaiming-uniform(a=√5), B = 0.
rsLoRA (Kalajdzievski, 2023, arXiv 2312.03732): s = α/√r, so the update's scale is stable in r.
:class:`LowRankAdapter` is the shared B A machinery; PiSSA, MiLoRA, random alignment and
the Frobenius-regularised UVᵀ are subclasses that change only initialisation, which
factors train, or the penalty.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Adapter, PeftFormat, Shapes
from .ops import widen
from .registry import register


class LowRankAdapter(Adapter):
    """ΔW = s·(B A − B₀A₀): the B A family.

    A starts at :meth:`initial_A` (kaiming-uniform) and trains unless the class sets
    ``trains_A = False`` (then it is a frozen buffer); B starts at 0. B₀A₀ is zero unless the
    variant starts from given factors (:meth:`start_from`), in which case the frozen base
    becomes the residual W_res = W₀ − s·B₀A₀ so the output is unchanged at initialisation and
    ΔW is still measured from W₀.
    """

    trains_A: ClassVar[bool] = True

    @classmethod
    def trainable_shapes(cls, out_f: int, in_f: int, rank: int, bias: bool = True, **options: Any) -> Shapes:
        """A (r × in) unless frozen (``trains_A = False``) and B (out × r): r(in + out), or out·r."""
        return {**({"A": (rank, in_f)} if cls.trains_A else {}), "B": (out_f, rank)}

    def __init__(self, base: nn.Linear, **common: Any) -> None:
        super().__init__(base, **common)
        A = self.initial_A(self._generator())
        if self.trains_A:
            self.A = nn.Parameter(A)
        else:
            self.register_buffer("A", A)
        self.B = nn.Parameter(torch.zeros_like(self._new(self.out_features, self.rank)))
        self.register_buffer("A0", None)  # set by start_from()
        self.register_buffer("B0", None)

    def initial_A(self, gen: torch.Generator) -> Tensor:
        """A at initialisation (r × in), drawn from ``gen``: kaiming-uniform(a=√5)."""
        return self._kaiming(self.rank, self.in_features, gen=gen)

    def product(self) -> Tensor:
        """s·B A (the current factors' product)."""
        return self.scale * (self.B @ self.A)

    @torch.no_grad()
    def start_from(self, B0: Tensor, A0: Tensor) -> None:
        """Set B = B₀, A = A₀ and replace the frozen base by W_res = W₀ − s·B₀A₀ (a new module,
        so the caller's Linear is never modified)."""
        w0, bias = self.base.weight, self.base.bias
        w = widen(w0)
        residual = w - self.scale * (B0.to(w) @ A0.to(w))
        new = nn.Linear(
            self.in_features, self.out_features, bias=bias is not None, device=w0.device, dtype=w0.dtype
        )
        new.weight = nn.Parameter(residual.to(w0.dtype), requires_grad=False)
        if bias is not None:
            new.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.base = new
        self.A0 = A0.to(w0).clone()
        self.B0 = B0.to(w0).clone()
        self.A.copy_(self.A0)
        self.B.copy_(self.B0)

    def start_from_svd(self, U: Tensor, S: Tensor, Vh: Tensor) -> None:
        """:meth:`start_from` singular triplets: B₀ = U√(S/s), A₀ = √(S/s)Vh, so that
        s·B₀A₀ = U diag(S) Vh (PiSSA's balanced split, Meng et al. 2024)."""
        root = (S / self.scale).sqrt()
        self.start_from(B0=U * root, A0=root[:, None] * Vh)

    @property
    def w0(self) -> Tensor:
        if self.A0 is None:
            return self.base_weight
        return self.base_weight + self.scale * (self.B0 @ self.A0)

    def delta_weight(self) -> Tensor:
        if self.A0 is None:
            return self.product()
        return self.scale * (self.B @ self.A - self.B0 @ self.A0)

    def merged_weight(self) -> Tensor:
        # base + s·BA directly: with a residual base this avoids adding and removing s·B₀A₀.
        w = self.base_weight
        return (widen(w) + widen(self.product())).to(w.dtype)

    def branch(self, x: Tensor) -> tuple[Tensor, Tensor, float]:
        # s·B(Ax): the branch on top of the (possibly residual) base is s·BA
        return F.linear(x, self.A), self.B, self.scale

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, Tensor]) -> None:
        # The residual base is never saved: it is rebuilt from W₀ and the saved (A0, B0).
        if self.A0 is not None and not (
            torch.equal(state["A0"], self.A0) and torch.equal(state["B0"], self.B0)
        ):
            # The file was made from other initial factors: rebuild the residual from W₀.
            w0 = self.w0
            self.base.weight.copy_(w0 - self.scale * (state["B0"].to(w0) @ state["A0"].to(w0)))
        super().load_adapter_state(state)

    @staticmethod
    def peft_lora(*, use_rslora: bool = False, use_dora: bool = False, **tensors: str) -> PeftFormat:
        """PEFT's LoRA format: A, B as lora_A, lora_B, the flags that pick the variant, and the
        variant's further ``tensors`` (our name = PEFT's)."""
        return PeftFormat(
            "LORA",
            {"use_rslora": use_rslora, "use_dora": use_dora},
            {"A": "lora_A.weight", "B": "lora_B.weight", **tensors},
        )

    def peft_export(self) -> tuple[PeftFormat, dict[str, Tensor], int, float]:
        """The variant's :attr:`peft`, or PEFT's plain LoRA for a variant without one (PiSSA,
        MiLoRA, Frobenius, random alignment). Started from factors B₀A₀ the adapter trains on the
        residual W₀ − s·B₀A₀, which PEFT's base model does not have: ΔW = s·(B A − B₀A₀) =
        s·[B, −B₀][A; A₀] is written as a rank-2r LoRA over W₀ itself, with α' = 2α so that
        PEFT's α'/(2r) is s (= α/r)."""
        state = dict(self.adapter_state())
        if self.A0 is None:
            return self.peft or self.peft_lora(), state, self.rank, self.alpha
        A0, B0 = state.pop("A0"), state.pop("B0")
        state["A"], state["B"] = torch.cat([state["A"], A0]), torch.cat([state["B"], -B0], dim=1)
        return self.peft_lora(), state, 2 * self.rank, 2 * self.alpha


@register
class LoRA(LowRankAdapter):
    """LoRA: ΔW = (α/r)·B A; A kaiming-uniform(a=√5), B = 0 (Hu et al., 2021, arXiv 2106.09685)."""

    name = "lora"
    display_name = "LoRA"

    # PEFT stores A and B as lora_A and lora_B
    peft = LowRankAdapter.peft_lora()


@register
class RsLoRA(LowRankAdapter):
    """rsLoRA: ΔW = (α/√r)·B A, init as LoRA (Kalajdzievski, 2023, arXiv 2312.03732)."""

    name = "rslora"
    display_name = "rsLoRA"

    # PEFT stores rsLoRA as a LoRA with use_rslora
    peft = LowRankAdapter.peft_lora(use_rslora=True)

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank)
