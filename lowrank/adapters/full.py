"""Full fine-tuning on the same footing: W itself trains; ΔW = W − W₀ against a frozen copy of W₀."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import Adapter, Shapes
from .registry import register


@register
class Full(Adapter):
    """Full fine-tuning: ΔW = W − W₀; the layer's weight and bias train; W₀ is kept as a buffer.

    ``rank`` and ``alpha`` are accepted for a uniform interface and ignored (the rank of ΔW
    is whatever training makes it); ``self.rank`` is min(out, in), the largest it can be.
    Memory: one extra (out × in) copy of W₀.
    """

    name = "full"
    display_name = "full fine-tuning"
    delta_needs_w0 = "ΔW = W − W₀ needs the base weight W₀, which the file does not hold"
    takes_rank = False
    lr_scale = 0.03  # text: optima at 0.01–0.03× LoRA's; small MLPs 0.1–6× (an extension finds them)

    def __init__(self, base: nn.Linear, **common: Any) -> None:
        super().__init__(base, **common)
        self.base.requires_grad_(True)
        self.register_buffer("W0", base.weight.detach().clone())

    @property
    def w0(self) -> Tensor:
        return self.W0

    def delta_weight(self) -> Tensor:
        return self.base.weight - self.W0

    def merged_weight(self) -> Tensor:
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x)

    def merge(self) -> None:
        """Nothing to fold: the trained weight is the layer's own. Sets the flag only."""
        self.merged = True

    def unmerge(self) -> None:
        self.merged = False

    def config(self) -> dict:
        return {"dropout": self.dropout_p, "seed": self.seed}

    def adapter_state(self) -> dict[str, Tensor]:
        return {
            "weight": self.base.weight.detach(),
            **({"bias": self.base.bias.detach()} if self.base.bias is not None else {}),
        }

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, Tensor]) -> None:
        self.base.weight.copy_(state["weight"])
        if self.base.bias is not None:
            self.base.bias.copy_(state["bias"])

    @classmethod
    def trainable_shapes(
        cls, out_f: int, in_f: int, rank: int | None = None, bias: bool = True, **options: Any
    ) -> Shapes:
        """The layer's own weight (out × in) and bias (out): out·in + out; the rank plays no part."""
        return {"base.weight": (out_f, in_f), **({"base.bias": (out_f,)} if bias else {})}

    def trainable_keys(self) -> list[str]:
        """Every saved tensor: they are the layer's own weight and bias, which train."""
        return list(self.adapter_state())
