"""AdaLoRA: adaptive budget allocation over SVD triplets (Zhang et al., 2023, arXiv 2303.10512).

ΔW = P diag(λ) Q · α/(r + 1e-5), with P ∈ ℝ^{out×r}, λ ∈ ℝ^r, Q ∈ ℝ^{r×in} (PEFT's scaling:
``lora_alpha / (ranknum + 1e-5)`` with ranknum the initial rank, never changed by pruning).
:class:`RankAllocator` prunes the least important triplets (P[:, i], λ_i, Q[i]) during training.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Adapter, Shapes
from .registry import register


@register
class AdaLoRA(Adapter):
    """AdaLoRA: ΔW = α/(r+1e-5) · P diag(λ) Q (Zhang et al., 2023, arXiv 2303.10512).

    PEFT's names: ``lora_B`` = P, ``lora_E`` = λ as an (r, 1) column, ``lora_A`` = Q,
    ``scaling`` = ``lora_alpha``; output ``dropout(x) @ (A*E).T @ B.T * scaling / (r + 1e-5)``.
    Init as PEFT: P, Q ~ N(0, 0.02²), λ = 0. ``rank`` is the initial rank r (default 8; PEFT's
    ``init_r`` default is 12), α = r by default; ``target_rank`` is the average rank the
    allocator of :meth:`training_hooks` prunes to (default ⌊2r/3⌋). :meth:`penalty` is the
    paper's orthogonality regulariser ``orth_reg_weight``·(‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F),
    weight 0.1 (the paper's value; PEFT adds ``orth_reg_weight`` (default 0.5) × the mean over
    all P and Q matrices of the *unsquared* ‖·−I‖_F instead). Trainable: r(out + in + 1).
    Above min(out, in) the rank is legal (warned) but the penalty has a floor: PᵀP (r × r)
    has rank ≤ out, so ‖PᵀP − I‖²_F ≥ r − out (likewise for Q and in).
    """

    name = "adalora"
    display_name = "AdaLoRA"

    @classmethod
    def trainable_shapes(cls, out_f: int, in_f: int, rank: int, bias: bool = True, **options: Any) -> Shapes:
        """P (out × r), λ (r), Q (r × in): r(out + in + 1)."""
        return {"P": (out_f, rank), "lam": (rank,), "Q": (rank, in_f)}

    def __init__(
        self, base: nn.Linear, *, orth_reg_weight: float = 0.1, target_rank: int | None = None, **common: Any
    ) -> None:
        super().__init__(base, **common)
        if not (isinstance(orth_reg_weight, (int, float)) and orth_reg_weight >= 0):
            raise ValueError(f"orth_reg_weight={orth_reg_weight!r} must be a number >= 0")
        if target_rank is not None and not 1 <= target_rank <= self.rank:
            raise ValueError(f"target_rank={target_rank!r} must be between 1 and rank={self.rank}")
        self.orth_reg_weight = float(orth_reg_weight)
        self.target_rank = int(target_rank or max(1, (2 * self.rank) // 3))
        gen = self._generator()
        w = base.weight
        self.Q = nn.Parameter(
            (0.02 * torch.randn(self.rank, self.in_features, generator=gen, dtype=torch.float64)).to(w)
        )
        self.P = nn.Parameter(
            (0.02 * torch.randn(self.out_features, self.rank, generator=gen, dtype=torch.float64)).to(w)
        )
        self.lam = nn.Parameter(torch.zeros_like(self._new(self.rank)))

    @property
    def scale(self) -> float:
        """α / (r + 1e-5), PEFT's AdaLoRA convention."""
        return self.alpha / (self.rank + 1e-5)

    def delta_weight(self) -> Tensor:
        return (self.P * self.lam) @ self.Q * self.scale

    def branch(self, x: Tensor) -> tuple[Tensor, Tensor, float]:
        return F.linear(x, self.Q) * self.lam, self.P, self.scale

    def penalty(self) -> Tensor:
        eye = torch.eye(self.rank, dtype=self.P.dtype, device=self.P.device)
        return self.orth_reg_weight * (
            (self.P.mT @ self.P - eye).square().sum() + (self.Q @ self.Q.mT - eye).square().sum()
        )

    def config(self) -> dict:
        return {**super().config(), "orth_reg_weight": self.orth_reg_weight, "target_rank": self.target_rank}

    @classmethod
    def training_hooks(cls, model: nn.Module, total_steps: int) -> list:
        """The rank allocator the training loop calls after each optimiser step: budget from
        ``rank`` down to ``target_rank`` (default ⌊2r/3⌋, PEFT's 12 → 8) per layer, with 10 % of
        the steps at the full budget first and the last 20 % frozen (PEFT's t_init, t_final)."""
        ads = [m for m in model.modules() if isinstance(m, cls)]
        t_init, t_final = total_steps // 10, total_steps // 5
        if not ads or total_steps - t_final <= t_init:
            return []
        alloc = RankAllocator(
            model,
            target_rank=ads[0].target_rank,
            init_rank=ads[0].rank,
            t_init=t_init,
            t_final=t_final,
            total_steps=total_steps,
        )
        return [alloc.step]


class RankAllocator:
    """AdaLoRA's importance scores and cubic budget schedule (paper §3.2–3.3, as PEFT).

    Call ``allocator.step(model, global_step)`` once per training step, after
    ``optimizer.step()`` and before ``optimizer.zero_grad()`` (it reads the gradients).

    Parameters
    ----------
    model : nn.Module
        A model holding ``adalora`` adapters (``lr.inject(model, "adalora", rank=init_rank)``).
    target_rank : int
        Average rank per adapted layer at the end: final budget b(T) = target_rank × layers.
    init_rank : int
        The adapters' rank r; initial budget b(0) = init_rank × layers (checked).
    t_init, t_final, total_steps : int
        Warm-up steps at the full budget; final steps with the allocation frozen; total steps.
    beta1, beta2 : float
        EMA factors of the sensitivity Ī and of its uncertainty Ū (default 0.85 each).
    delta_t : int
        Re-allocate every ``delta_t`` steps during the budgeting phase (default 1).

    Sensitivity of each entry of P, λ, Q is I = |θ·∇θ|; Ī ← β₁Ī + (1−β₁)I, Ū ← β₂Ū + (1−β₂)|I − Ī|;
    triplet i scores s(λ_i) + mean_k s(P_ki) + mean_j s(Q_ij) with s = Ī·Ū. The budget is
    b(t) = b(0) for t ≤ t_init, b(T) for t ≥ total_steps − t_final, and in between
    ⌊b(T) + (b(0) − b(T))(1 − (t − t_init)/(total_steps − t_final − t_init))³⌋. At an allocation
    step (every ``delta_t`` steps in between, and once, finally, at the first call with
    t ≥ total_steps − t_final) the b(t) best triplets over all layers are kept; the others get
    λ = 0 and are set to 0 again at every later call, so they stay zero (a pruned triplet may
    return at a later re-allocation if its score rises, as in the paper). PEFT keeps the triplets
    scoring above the (b(0) − b(t))-th smallest score: the same set unless scores tie.
    """

    def __init__(
        self,
        model: nn.Module,
        target_rank: int,
        init_rank: int,
        t_init: int,
        t_final: int,
        total_steps: int,
        beta1: float = 0.85,
        beta2: float = 0.85,
        delta_t: int = 1,
    ) -> None:
        layers = self._layers(model)
        if not layers:
            raise ValueError(
                "the model has no adalora adapters; call lr.inject(model, 'adalora', rank=init_rank) first"
            )
        ranks = {a.rank for a in layers.values()}
        if ranks != {init_rank}:
            raise ValueError(
                f"init_rank={init_rank} but the adapters have rank(s) "
                f"{sorted(ranks)}; pass the rank given to lr.inject"
            )
        if not 1 <= target_rank <= init_rank:
            raise ValueError(f"target_rank={target_rank} must be between 1 and init_rank={init_rank}")
        if not 0 <= t_init < total_steps - t_final:
            raise ValueError(
                f"t_init={t_init}, t_final={t_final}, total_steps={total_steps} leave "
                "no budgeting phase; need 0 <= t_init < total_steps - t_final"
            )
        if not (0 < beta1 < 1 and 0 < beta2 < 1 and delta_t >= 1):
            raise ValueError("beta1 and beta2 must lie in (0, 1) and delta_t must be >= 1")
        self.t_init, self.t_final, self.total_steps = t_init, t_final, total_steps
        self.beta1, self.beta2, self.delta_t = beta1, beta2, delta_t
        self.init_budget = init_rank * len(layers)
        self.target_budget = target_rank * len(layers)
        self.ipt: dict[str, Tensor] = {}  # EMA sensitivity Ī, keyed "layer.param"
        self.unc: dict[str, Tensor] = {}  # EMA uncertainty Ū
        self.masks = {n: torch.ones(a.rank, dtype=torch.bool) for n, a in layers.items()}
        self.final = False  # the allocation is frozen once the final phase begins

    @staticmethod
    def _layers(model: nn.Module) -> dict[str, AdaLoRA]:
        return {n: m for n, m in model.named_modules() if isinstance(m, AdaLoRA)}

    def budget(self, step: int) -> int:
        """b(step): the number of triplets kept over all layers."""
        end = self.total_steps - self.t_final
        if step <= self.t_init:
            return self.init_budget
        if step >= end:
            return self.target_budget
        frac = 1 - (step - self.t_init) / (end - self.t_init)
        return int((self.init_budget - self.target_budget) * frac**3 + self.target_budget)

    @torch.no_grad()
    def _update_scores(self, layers: dict[str, AdaLoRA]) -> None:
        for name, ad in layers.items():
            for pname in ("P", "lam", "Q"):
                p = getattr(ad, pname)
                if p.grad is None:
                    raise RuntimeError(
                        f"{name}.{pname} has no gradient; call allocator.step after "
                        "loss.backward() and optimizer.step(), before optimizer.zero_grad()"
                    )
                key, sens = f"{name}.{pname}", (p * p.grad).abs()
                ipt = self.ipt.get(key, torch.zeros_like(sens))
                self.ipt[key] = ipt = self.beta1 * ipt + (1 - self.beta1) * sens
                unc = self.unc.get(key, torch.zeros_like(sens))
                self.unc[key] = self.beta2 * unc + (1 - self.beta2) * (sens - ipt).abs()

    def _triplet_scores(self, name: str) -> Tensor:
        s = {p: self.ipt[f"{name}.{p}"] * self.unc[f"{name}.{p}"] for p in ("P", "lam", "Q")}
        return s["lam"] + s["P"].mean(dim=0) + s["Q"].mean(dim=1)

    def _allocate(self, layers: dict[str, AdaLoRA], budget: int) -> None:
        names = list(layers)
        scores = torch.cat([self._triplet_scores(n).float().cpu() for n in names])
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[scores.argsort(descending=True, stable=True)[:budget]] = True
        for n, part in zip(names, keep.split([layers[n].rank for n in names]), strict=True):
            self.masks[n] = part

    @torch.no_grad()
    def step(self, model: nn.Module, global_step: int) -> int:
        """Update the scores, re-allocate when due, zero the pruned λ; returns b(global_step)."""
        layers = self._layers(model)
        if set(layers) != set(self.masks):
            raise ValueError(
                "the model's adalora layers differ from those this allocator was "
                "built on; make a new RankAllocator for this model"
            )
        end = self.total_steps - self.t_final
        if global_step < end:
            self._update_scores(layers)
        budget = self.budget(global_step)
        due = self.t_init < global_step < end and global_step % self.delta_t == 0
        if (due or (global_step >= end and not self.final)) and self.ipt:
            self._allocate(layers, budget)
            self.final = global_step >= end
        for n, ad in layers.items():
            ad.lam.masked_fill_(~self.masks[n].to(ad.lam.device), 0.0)
        return budget

    def rank_pattern(self) -> dict[str, int]:
        """Current number of kept triplets per layer."""
        return {n: int(m.sum()) for n, m in self.masks.items()}
