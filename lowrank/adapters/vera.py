"""VeRA: vector-based random matrix adaptation (Kopiczko et al., 2024, arXiv 2310.11454).

ΔW = Λ_b B Λ_d A with one frozen random pair A (r × in_max), B (out_max × r) shared by every
adapted layer (each layer uses the slice A[:, :in], B[:out, :]) and only the vectors d (r) and
b (out) trained.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Adapter, PeftFormat, Shapes
from .registry import register

# One copy of each projection per (seed, shape, dtype, device), alive while an adapter uses it.
_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _kaiming(shape: tuple[int, int], gen: torch.Generator) -> Tensor:
    """PEFT's VeRA init: U(±√(6/fan_in)) in float32 (kaiming-uniform, gain √2)."""
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def projections(
    seed: int,
    rank: int,
    out_max: int,
    in_max: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """The frozen pair (A: rank × in_max, B: out_max × rank), exactly as PEFT draws them:
    a CPU generator seeded with ``seed`` draws A first, then B. Cached: every caller asking
    for the same pair gets the same tensors."""
    key = (int(seed), rank, out_max, in_max, dtype, torch.device(device))
    A, B = _SHARED.get((*key, "A")), _SHARED.get((*key, "B"))
    if A is None or B is None:
        gen = torch.Generator().manual_seed(int(seed))
        A = _kaiming((rank, in_max), gen).to(dtype=dtype, device=device)
        B = _kaiming((out_max, rank), gen).to(dtype=dtype, device=device)
        _SHARED[(*key, "A")], _SHARED[(*key, "B")] = A, B
    return A, B


@register
class VeRA(Adapter):
    """VeRA: ΔW = Λ_b B Λ_d A, A and B frozen and shared (Kopiczko et al., 2024, arXiv 2310.11454).

    Defaults as PEFT: d = ``d_initial`` = 0.1, b = 0 (so ΔW = 0 at initialisation); A, B drawn
    from ``projection_seed`` = 0 (PEFT's ``projection_prng_key``), the same for every layer,
    independent of the per-layer ``seed`` (unused here). ``projection_shape`` = (out_max, in_max)
    is the size of the shared pair; pass the largest (out, in) among the adapted layers to get
    PEFT's matrices exactly (``lr.inject`` forwards it to every layer). The default, the layer's
    own shape, shares one pair among all layers of equal shape. ``alpha`` is accepted for a
    uniform interface and ignored (VeRA has no scale). Trainable: r + out per layer. A and B are
    never saved: :meth:`adapter_state` holds d and b, and loading (``load_state_dict`` included)
    takes A, B from the seed again.
    """

    name = "vera"
    display_name = "VeRA"
    lr_scale = 3.0  # only the scaling vectors train: optima 2–20× LoRA's in the sweeps, text 3×

    # PEFT stores VeRA's b and d as vera_lambda_b and vera_lambda_d
    peft = PeftFormat("VERA", {}, {"b": "vera_lambda_b", "d": "vera_lambda_d"})

    @classmethod
    def useful_rank(cls, out_f: int, in_f: int, **options: Any) -> None:
        """None: each extra rank adds a fixed random direction B[:, i] A[i] to combine, so a rank
        above min(out, in) still enlarges the reachable ΔW (PEFT's default r is 256)."""
        return None

    def __init__(
        self,
        base: nn.Linear,
        *,
        d_initial: float = 0.1,
        projection_seed: int = 0,
        projection_shape: tuple[int, int] | None = None,
        **common: Any,
    ) -> None:
        super().__init__(base, **common)
        own = (self.out_features, self.in_features)
        shape = own if projection_shape is None else tuple(int(v) for v in projection_shape)
        if len(shape) != 2 or shape[0] < own[0] or shape[1] < own[1]:
            raise ValueError(
                f"projection_shape={projection_shape!r} cannot be sliced to this {own[0]}x{own[1]} "
                "layer; pass (out_max, in_max) at least as large as every adapted layer, or None"
            )
        self.d_initial, self.projection_seed = float(d_initial), int(projection_seed)
        self.projection_shape = shape
        self._take_projections()
        # A and B are not in the state dict: a load (after model.to_empty, say) takes them again.
        self.register_load_state_dict_post_hook(_take_projections_after_load)
        self.d = nn.Parameter(torch.full_like(self._new(self.rank), self.d_initial))
        self.b = nn.Parameter(torch.zeros_like(self._new(self.out_features)))

    def _take_projections(self) -> None:
        """Set A, B to this layer's slices of the shared frozen pair, on the base weight's device
        and dtype."""
        w = self.base.weight
        A, B = projections(
            self.projection_seed, self.rank, *self.projection_shape, dtype=w.dtype, device=w.device
        )
        self.register_buffer("A", A[:, : self.in_features], persistent=False)
        self.register_buffer("B", B[: self.out_features, :], persistent=False)

    def delta_weight(self) -> Tensor:
        return (self.b[:, None] * self.B) @ (self.d[:, None] * self.A)

    def branch(self, x: Tensor) -> tuple[Tensor, Tensor, float]:
        # b ⊙ B(d ⊙ Ax) = (d ⊙ Ax)(b ⊙ B)ᵀ
        return self.d * F.linear(x, self.A), self.b[:, None] * self.B, 1.0

    def config(self) -> dict:
        return {
            **super().config(),
            "d_initial": self.d_initial,
            "projection_seed": self.projection_seed,
            "projection_shape": list(self.projection_shape),
        }

    @classmethod
    def trainable_shapes(cls, out_f: int, in_f: int, rank: int, bias: bool = True, **options: Any) -> Shapes:
        """d (r) and b (out): r + out; the frozen A, B are shared and never saved."""
        return {"d": (rank,), "b": (out_f,)}


def _take_projections_after_load(module: VeRA, incompatible_keys: Any) -> None:
    module._take_projections()
