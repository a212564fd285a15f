"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv 2402.09353).

W = m ⊙ (W₀ + sBA) / ‖W₀ + sBA‖_row,  ΔW = W − W₀, where ‖·‖_row is the L2 norm of each output
row over the inputs (shape (out,)) and m ∈ ℝ^{out} is a trained magnitude.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import register
from .lora import LowRankAdapter


@register
class DoRA(LowRankAdapter):
    """DoRA: W = m ⊙ (W₀+sBA)/‖W₀+sBA‖_row, ΔW = W − W₀ (Liu et al., 2024, arXiv 2402.09353).

    A, B as LoRA (A kaiming-uniform(a=√5), B = 0, s = α/r, α = r by default); m = ‖W₀‖_row,
    trainable, so the output is unchanged at initialisation. Trainable: r(in+out) + out.

    The norm ‖W₀+sBA‖_row is a constant in the backward pass (paper §4.3, as PEFT). The forward
    never builds the merged weight for the product: with g = m/‖W₀+sBA‖_row it rescales the
    base output y = W₀x + b to g⊙(y − b) + b and adds g⊙s·B(Ax) (PEFT's formula); the norm needs
    W₀+sBA once per call, not per token, and in eval mode it is cached until A, B or W₀ change
    (cache key: their storage and in-place version counters; writes through ``.data`` are
    not seen, so call :meth:`clear_cache` after those).

    Dropout follows PEFT: with dropout active (training, p > 0) the whole DoRA correction sees
    the dropped input, y = W₀x + b + (g−1)⊙(W₀ x̃) + g⊙s·B(A x̃) with x̃ = dropout(x), which costs
    a second product with W₀; without dropout x̃ = x and the base output is reused.
    """

    name = "dora"

    delta_needs_w0 = ("ΔW = m⊙(W₀+sBA)/‖W₀+sBA‖ − W₀ needs the base weight W₀, which the file "
                      "does not hold")

    @classmethod
    def trainable_shapes(cls, out_f: int, in_f: int, rank: int, bias: bool = True,
                         **options: object) -> dict[str, tuple[int, ...]]:
        """A, B as LoRA and the magnitude m (out): r(in + out) + out."""
        return {**super().trainable_shapes(out_f, in_f, rank, bias), "m": (out_f,)}

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float | None = None,
                 dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__(base, rank, alpha, dropout, seed)
        self.clear_cache()
        # Same routine as the forward's norm, so m / ‖W₀ + s·0‖ is exactly 1 at initialisation.
        self.m = nn.Parameter(self.weight_norm())

    def clear_cache(self) -> None:
        """Forget the cached eval-mode norm."""
        self._norm_key: tuple | None = None
        self._norm: Tensor | None = None

    def weight_norm(self) -> Tensor:
        """‖W₀ + sBA‖_row, shape (out,), detached; accumulated in at least float32."""
        w0 = self.w0
        key = tuple((t.data_ptr(), t._version) for t in (w0, self.A, self.B)) + (
            self.scale, w0.dtype, torch.is_inference_mode_enabled())
        if not self.training and key == self._norm_key:
            return self._norm
        with torch.no_grad():
            acc = torch.promote_types(w0.dtype, torch.float32)
            norm = torch.linalg.vector_norm(w0.to(acc) + self.product().to(acc), dim=1)
            norm = norm.to(w0.dtype)
        if self.training:
            self.clear_cache()
        else:
            self._norm_key, self._norm = key, norm
        return norm

    def merged_weight(self) -> Tensor:
        w0 = self.w0
        acc = torch.promote_types(w0.dtype, torch.float32)
        g = self.m.to(acc) / self.weight_norm().to(acc)
        return (g[:, None] * (w0.to(acc) + self.product().to(acc))).to(w0.dtype)

    def delta_weight(self) -> Tensor:
        w0 = self.w0
        acc = torch.promote_types(w0.dtype, torch.float32)
        return (self.merged_weight().to(acc) - w0.to(acc)).to(w0.dtype)

    def adapter_forward(self, x: Tensor) -> Tensor:
        g = self.m / self.weight_norm()
        return (g - 1) * F.linear(x, self.w0) + g * super().adapter_forward(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        g = self.m / self.weight_norm()
        if not torch.is_grad_enabled() and not (self.training and self.dropout_p > 0):
            return self._inference_forward(x, g)
        y = self.base(x)
        bias = self.base.bias
        if self.training and self.dropout_p > 0:  # PEFT: the correction sees the dropped input
            x = self.dropout(x)
            out = torch.addcmul(y, g - 1, F.linear(x, self.base.weight))
        elif bias is None:
            out = g * y
        else:  # g⊙(y − b) + b, written so that g = 1 returns y bit for bit
            out = torch.addcmul(bias * (1 - g), g, y)
        # + g⊙s·B(Ax) as one fused multiply-add, with g·s folded into B's rows
        h = F.linear(x, self.A).reshape(-1, self.rank)
        gB = self.B * (g * self.scale)[:, None]
        return torch.addmm(out.reshape(-1, self.out_features), h, gB.mT).view(out.shape)

    def _inference_forward(self, x: Tensor, g: Tensor) -> Tensor:
        """Without autograd, in place: g⊙(W₀x), then + [Ax, 1]·[g·s·B, b]ᵀ as one GEMM
        (the bias rides along as an extra column), one pass over the output fewer."""
        y = F.linear(x, self.base.weight)
        y.mul_(g)
        h = F.linear(x, self.A).reshape(-1, self.rank)
        gB = self.B * (g * self.scale)[:, None]
        if self.base.bias is not None:
            h = torch.cat([h, h.new_ones(len(h), 1)], 1)
            gB = torch.cat([gB, self.base.bias[:, None]], 1)
        y.view(-1, self.out_features).addmm_(h, gB.mT)
        return y
