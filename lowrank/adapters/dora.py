"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv 2402.09353).

W = m ⊙ (W₀ + sBA) / ‖W₀ + sBA‖_row, where ‖·‖_row is the L2 norm of each output row over the
inputs (shape (out,)) and m ∈ ℝ^{out} is a trained magnitude. With g = m / ‖W₀ + sBA‖_row,
ΔW = W − W₀ = (g − 1) ⊙ W₀ + g ⊙ sBA: a row rescaling of W₀ plus a rescaled LoRA update.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Adapter, Shapes
from .lora import LowRankAdapter
from .ops import add_product, widen
from .registry import register


def _without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off on ``device``; nothing to switch off where autocast does not exist
    (the meta device of a model built before its weights)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


@register
class DoRA(LowRankAdapter):
    """DoRA: ΔW = (g−1)⊙W₀ + g⊙sBA, g = m/‖W₀+sBA‖_row (Liu et al., 2024, arXiv 2402.09353).

    A, B as LoRA (A kaiming-uniform(a=√5), B = 0, s = α/r, α = r by default); m = ‖W₀‖_row,
    trainable, so the output is unchanged at initialisation. Trainable: r(in+out) + out.

    :meth:`delta_weight` is the source of truth; ``merged_weight()`` = W₀ + ΔW = m ⊙ (W₀+sBA) /
    ‖W₀+sBA‖_row as for every variant. The norm is a constant in the backward pass (paper §4.3,
    as PEFT), computed once per call (not per token) in at least float32 and outside autocast;
    in eval mode it is cached until A, B or W₀ change (cache key: their storage and in-place
    version counters; writes through ``.data`` are not seen, so call :meth:`clear_cache` after
    those).

    The forward never builds the merged weight: it rescales the base output y = W₀x + b to
    g⊙(y − b) + b and adds (Ax)(g·s·B)ᵀ to that in one GEMM (PEFT's formula). Dropout follows PEFT:
    with dropout active (training, p > 0) the whole correction sees the dropped input,
    y + (g−1)⊙(W₀x̃) + g⊙sB(Ax̃) with x̃ = dropout(x), which costs a second product with W₀.
    """

    name = "dora"
    display_name = "DoRA"
    # W₀ + ΔW, not LoRA's residual-base shortcut base + s·BA
    merged_weight = Adapter.merged_weight
    # the branch alone (adapter_forward) is x ΔWᵀ; the forward's route is add_adapter below
    branch = Adapter.branch

    # PEFT stores DoRA as a LoRA with use_dora and the magnitude m
    peft = LowRankAdapter.peft_lora(use_dora=True, m="lora_magnitude_vector")

    delta_needs_w0 = "ΔW = m⊙(W₀+sBA)/‖W₀+sBA‖ − W₀ needs the base weight W₀, which the file does not hold"

    @classmethod
    def trainable_shapes(cls, out_f: int, in_f: int, rank: int, bias: bool = True, **options: Any) -> Shapes:
        """A, B as LoRA and the magnitude m (out): r(in + out) + out."""
        return {**super().trainable_shapes(out_f, in_f, rank, bias), "m": (out_f,)}

    def __init__(self, base: nn.Linear, **common: Any) -> None:
        super().__init__(base, **common)
        self.clear_cache()
        # Same routine as the forward's norm, so m / ‖W₀ + s·0‖ is exactly 1 at initialisation.
        self.m = nn.Parameter(self.weight_norm())

    def clear_cache(self) -> None:
        """Forget the cached eval-mode norm."""
        self._norm_key: tuple | None = None
        self._norm: Tensor | None = None

    def weight_norm(self) -> Tensor:
        """‖W₀ + sBA‖_row, shape (out,), detached, in the layer's dtype; accumulated in at least
        float32 and outside autocast (a property of the weights, not of the activations)."""
        w0 = self.w0
        key = tuple((t.data_ptr(), t._version) for t in (w0, self.A, self.B)) + (
            self.scale,
            w0.dtype,
            torch.is_inference_mode_enabled(),
        )
        if not self.training and key == self._norm_key:
            return self._norm
        with torch.no_grad(), _without_autocast(w0.device):
            v = widen(w0) + widen(self.product())
            norm = torch.linalg.vector_norm(v, dim=1).to(w0.dtype)
        if self.training:
            self.clear_cache()
        else:
            self._norm_key, self._norm = key, norm
        return norm

    def magnitude_scale(self) -> Tensor:
        """g = m / ‖W₀ + sBA‖_row, shape (out,); gradients reach m only."""
        return self.m / self.weight_norm()

    def delta_weight(self) -> Tensor:
        w0 = self.w0
        g = widen(self.magnitude_scale())[:, None]
        return ((g - 1) * widen(w0) + g * widen(self.product())).to(w0.dtype)

    def add_adapter(self, y: Tensor, x: Tensor) -> Tensor:
        g = self.magnitude_scale()
        bias = self.base.bias
        if self.training and self.dropout_p > 0:  # PEFT: the correction sees the dropped input
            out = torch.addcmul(y, g - 1, F.linear(x, self.base.weight))
        elif bias is None:
            out = g * y
        else:  # g⊙(y − b) + b, written so that g = 1 returns y bit for bit
            out = torch.addcmul(bias * (1 - g), g, y)
        # out is this call's own tensor (float32 under autocast, as g is): add into it in place
        h, gB = F.linear(x, self.A), self.B * g[:, None]
        return add_product(out, h, gB, self.scale, inplace=True).to(y.dtype)
