"""The Adapter contract (the registry is :mod:`.registry`, the tensor helpers :mod:`.ops`).

An :class:`Adapter` wraps one frozen ``nn.Linear`` with pretrained weight W₀ and adds a
learned update ΔW:  y = W₀x + b + ΔW x.  Every variant defines ΔW in exactly one place,
:meth:`Adapter.delta_weight`; forward passes may take a cheaper route (x → A → B) but must
equal ``F.linear(x, merged_weight(), base.bias)`` in eval mode, which the test suite checks
for every registered variant.

One forward serves every variant: the base layer computes y = W₀x + b, and
:meth:`Adapter.add_adapter` adds the adapter branch, which a variant supplies as a product s·h Mᵀ
(:meth:`Adapter.branch`: (x, ΔW, 1) by default, (Ax, B, s) for the low-rank ones), in one GEMM.
A hook on the base layer sees W₀x + b: the sum is written into y only when no hook can see it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import add_product, runs_without_hooks, widen
from .ranks import warn_once


def _generator(seed: int, device: torch.device) -> torch.Generator:
    # CPU generator: initialisation is reproducible across devices; tensors are moved after.
    del device
    return torch.Generator().manual_seed(int(seed) % (2**63))


Shapes = dict[str, tuple[int, ...]]  # tensor name → shape, as trainable_shapes gives them


@dataclass(frozen=True)
class PeftFormat:
    """How PEFT stores a variant (:attr:`Adapter.peft`): PEFT's ``peft_type``, the ``config``
    fields that pick the variant within that type (``to_peft`` writes them; ``from_peft`` reads
    a file as the variant whose fields it has, an absent field being False) and PEFT's name for
    each tensor of :meth:`Adapter.adapter_state` (saved as ``base_model.model.<layer>.<name>``)."""

    peft_type: str
    config: Mapping[str, Any]
    tensors: Mapping[str, str]


class Adapter(nn.Module):
    """Base class: one frozen ``nn.Linear`` plus a learned update ΔW = ``delta_weight()``.

    Parameters
    ----------
    base : nn.Linear
        The pretrained layer, W₀ ∈ ℝ^{out×in}. Its parameters are frozen (except for ``full``);
        its tensors are never modified in place except by :meth:`merge`.
    rank : int
        r ≥ 1. Above :meth:`useful_rank` (min(out, in) for most variants) it is legal, as in PEFT,
        and warns once (:class:`RankWarning`); above :meth:`max_rank` (where the variant's maths
        cannot take it, e.g. SVD-initialised factors) it is an error. Variants with
        ``takes_rank = False`` (``full``) ignore it and ``alpha``; their ``rank`` is min(out, in),
        the largest rank their ΔW can reach.
    alpha : float, optional
        Scale numerator; s = alpha / r. Defaults to ``rank`` (s = 1).
    dropout : float
        Dropout probability on the adapter branch's input (training only).
    seed : int
        Seed of the adapter's own random initialisation (independent of the global RNG).
    rank_options : dict, optional
        The variant's own options that its rank bounds read (lokr's ``factor``, frobenius's
        ``init``), passed on by the subclass's constructor.

    Merging folds ΔW into ``base.weight`` in place and keeps a copy of W₀, so that
    :meth:`unmerge` restores W₀ bit for bit; the memory cost is one (out × in) tensor per
    merged layer. :func:`lowrank.strip` merges and drops that copy.
    """

    name: ClassVar[str] = ""
    # How figures and tables name the variant (lowrank.plots.label): short enough for a legend,
    # unique among registered variants; every registered class sets its own.
    display_name: ClassVar[str] = ""
    peft: ClassVar[PeftFormat | None] = None  # how PEFT stores the variant, if it has it
    # Why ΔW cannot be computed from a saved adapter_state() without the base weight W₀, in one
    # sentence (lowrank inspect shows it); "" when the adapter's own tensors and config() fix ΔW.
    delta_needs_w0: ClassVar[str] = ""
    # Constructor options besides the defaults that change the maths (another initialisation),
    # which the identity suite covers too.
    test_options: ClassVar[tuple[dict[str, Any], ...]] = ()
    takes_rank: ClassVar[bool] = True  # False for variants without a rank (full)
    max_rank_reason: ClassVar[str] = ""  # why max_rank() bounds the rank, where it does
    # The variant's learning rate relative to LoRA's on the same task: its default search grid
    # is centred on the task's lr_centre × lr_scale (lowrank.arguments.auto_grid, --lr-grid auto).
    lr_scale: ClassVar[float] = 1.0

    def __init__(
        self,
        base: nn.Linear,
        rank: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        seed: int = 0,
        *,
        rank_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"{type(self).__name__} wraps an nn.Linear, got {type(base).__name__}; "
                "pass a Linear layer (use lr.inject to pick them out of a model)"
            )
        out_f, in_f = base.weight.shape
        if self.takes_rank:
            rank = self.check_rank(rank, out_f, in_f, **(rank_options or {}))
        else:
            rank, alpha = min(out_f, in_f), None
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} is not in [0, 1); pass a probability")
        if alpha is not None and not (isinstance(alpha, (int, float)) and alpha > 0):
            raise ValueError(f"alpha={alpha!r} must be a positive number (or None for alpha=rank)")
        self.base = base
        self.base.requires_grad_(False)
        self.in_features, self.out_features = in_f, out_f
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.seed = int(seed)
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    # ----------------------------------------------------------------- construction help
    @classmethod
    def max_rank(cls, out_f: int, in_f: int, **options: Any) -> int | None:
        """The largest rank the variant's maths admits on an (out_f × in_f) layer, None for any
        rank (above it :meth:`check_rank` raises, giving :attr:`max_rank_reason`)."""
        return None

    @classmethod
    def useful_rank(cls, out_f: int, in_f: int, **options: Any) -> int | None:
        """The rank from which a larger one adds parameters but no expressiveness (warned once);
        None when every extra rank adds some. min(out, in) here: factors of that rank already
        reach every (out_f × in_f) matrix."""
        return min(out_f, in_f)

    @classmethod
    def check_rank(cls, rank: int, out_f: int, in_f: int, **options: Any) -> int:
        """``rank`` if the variant admits it on an (out_f × in_f) layer with these ``options``
        (constructor options); one-sentence ``ValueError`` otherwise, :class:`RankWarning` (once
        per variant, shape and rank) above :meth:`useful_rank`."""
        hi = cls.max_rank(out_f, in_f, **options)
        where = f"for a {out_f}x{in_f} layer with variant {cls.name!r}"
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            span = "of at least 1" if hi is None else f"between 1 and {hi}"
            raise ValueError(f"rank={rank!r} is invalid {where}; choose an integer rank {span}")
        if hi is not None and rank > hi:
            raise ValueError(
                f"rank={rank} is invalid {where}, as {cls.max_rank_reason}; choose "
                f"an integer rank between 1 and {hi}"
            )
        useful = cls.useful_rank(out_f, in_f, **options)
        if useful is not None and rank > useful:
            warn_once(
                (cls.name, out_f, in_f, rank, useful),
                f"rank={rank} {where} is over-complete: the update is as expressive at rank "
                f"{useful} as at any larger rank, so the extra rank adds parameters only; "
                f"pass rank <= {useful}, or filter lr.RankWarning to keep it (warned once)",
            )
        return rank

    def _weight_values(self, init: str) -> Tensor:
        """W₀ in float64 for an initialisation (``init``) that reads it: one sentence when the
        weight has no values (the meta device)."""
        w = self.base.weight
        if w.is_meta:
            raise RuntimeError(
                f"{init} reads the layer's weight, which is on the meta device and holds no "
                "values; load the real weights first (model.to_empty(device=...) and "
                "load_state_dict), then inject"
            )
        return w.detach().to(torch.float64)

    @property
    def scale(self) -> float:
        """s = alpha / r."""
        return self.alpha / self.rank

    def _new(self, *shape: int) -> Tensor:
        """An empty tensor on the base layer's device and dtype."""
        w = self.base.weight
        return torch.empty(*shape, dtype=w.dtype, device=w.device)

    def _generator(self) -> torch.Generator:
        return _generator(self.seed, self.base.weight.device)

    def _kaiming(self, *shape: int, gen: torch.Generator) -> Tensor:
        """kaiming-uniform(a=√5), the nn.Linear default, drawn on CPU then moved."""
        t = torch.empty(*shape, dtype=torch.float64)
        nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen)
        return t.to(self.base.weight)

    def config(self) -> dict[str, Any]:
        """Constructor options that rebuild this adapter (saved next to its tensors)."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout_p, "seed": self.seed}

    # ----------------------------------------------------------------- the maths
    @property
    def base_weight(self) -> Tensor:
        """The frozen base layer's own (unmerged) weight, detached, whatever the merge state."""
        return (self._w0_copy if self.merged else self.base.weight).detach()

    @property
    def w0(self) -> Tensor:
        """The pretrained weight W₀ that ΔW is measured from (detached)."""
        return self.base_weight

    def delta_weight(self) -> Tensor:
        """ΔW, shape (out, in), measured from W₀: the single source of truth of the variant's maths."""
        raise NotImplementedError

    def merged_weight(self) -> Tensor:
        """W₀ + ΔW, accumulated in at least float32 and cast once to the layer's dtype."""
        w0 = self.w0
        return (widen(w0) + widen(self.delta_weight())).to(w0.dtype)

    def penalty(self) -> Tensor:
        """Regulariser to add to the loss (0 when the variant has none)."""
        return self.base.weight.new_zeros(())

    def num_trainable(self) -> int:
        """Number of trainable scalars of this adapter."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ----------------------------------------------------------------- forward
    def branch(self, x: Tensor) -> tuple[Tensor, Tensor, float]:
        """(h, M, s) with the adapter branch s·h Mᵀ for the (dropped-out) input x: by default
        (x, ΔW, 1); low-rank variants return (x Aᵀ, B, s), so the branch costs O(r) per token."""
        return x, self.delta_weight(), 1.0

    def adapter_forward(self, x: Tensor) -> Tensor:
        """The adapter branch alone, (merged_weight() − base.weight)·x: ΔW x, or s·BAx on a
        residual base (pissa)."""
        h, M, s = self.branch(x)
        return F.linear(h, M) * s

    def add_adapter(self, y: Tensor, x: Tensor) -> Tensor:
        """y + the adapter branch for x, in y's dtype, for y = W₀x + b the base layer's output.

        One GEMM: the branch's last product adds into y. If a hook can see y (a probe on the base
        layer) the sum goes to a new tensor and y stays W₀x + b; otherwise y is this call's own
        temporary and the sum is written into it, which saves a pass over the output.
        """
        return add_product(y, *self.branch(x), inplace=runs_without_hooks(self.base))

    def forward(self, x: Tensor) -> Tensor:
        """The base layer's output plus the adapter branch of dropout(x) (W₀x + b + ΔW x without
        dropout); once merged, the base layer alone."""
        y = self.base(x)
        if self.merged:
            return y
        return self.add_adapter(y, self.dropout(x))

    # ----------------------------------------------------------------- merge
    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into ``base.weight`` (keeps W₀ for an exact :meth:`unmerge`). Idempotent."""
        if self.merged:
            return
        merged = self.merged_weight()
        self.register_buffer("_w0_copy", self.base.weight.detach().clone(), persistent=False)
        self.base.weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W₀ exactly. Idempotent."""
        if not self.merged:
            return
        self.base.weight.copy_(self._w0_copy)
        del self._w0_copy
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"variant={self.name!r}, in={self.in_features}, out={self.out_features}, "
            f"rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"
        )

    # ----------------------------------------------------------------- persistence
    def adapter_state(self) -> dict[str, Tensor]:
        """Tensors that, with :meth:`config`, restore this adapter on the same base layer."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, Tensor]) -> None:
        """Inverse of :meth:`adapter_state`; shapes are checked by the caller."""
        self.load_state_dict(state, strict=False)

    def peft_export(self) -> tuple[PeftFormat, dict[str, Tensor], int, float] | None:
        """(format, tensors by :meth:`adapter_state`'s names, PEFT's r, PEFT's alpha) from which
        PEFT computes this adapter's ΔW over the unmodified W₀, or None where PEFT has no
        equivalent: the variant's own :attr:`peft` and state by default."""
        if self.peft is None:
            return None
        return self.peft, self.adapter_state(), self.rank, self.alpha

    # ----------------------------------------------------------------- without the base layer
    @classmethod
    def trainable_shapes(cls, out_f: int, in_f: int, rank: int, bias: bool = True, **options: Any) -> Shapes:
        """{parameter name: shape} of what trains on an (out_f × in_f) layer, with a bias or not, at
        ``rank`` with the constructor ``options``: the variant's parameter formula, stated beside
        its maths (the test suite checks it against the adapter's ``named_parameters()``)."""
        raise NotImplementedError(
            f"variant {cls.name!r} states no parameter formula; define {cls.__name__}.trainable_shapes"
        )

    @classmethod
    def stand_in(cls, out_f: int, in_f: int, **options: Any) -> Adapter:
        """The variant built with ``options`` on a stand-in for an (out_f × in_f) layer that is not
        at hand (``lowrank inspect`` reads a file without its model): weight and bias zero, in
        float64. What trains does not depend on W₀, so :meth:`trainable_keys` holds for it."""
        linear = nn.Linear(in_f, out_f, device="cpu", dtype=torch.float64)
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
        return cls(linear, **options)

    def trainable_keys(self) -> list[str]:
        """The keys of :meth:`adapter_state` whose tensors are trainable parameters."""
        trained = {n for n, p in self.named_parameters() if p.requires_grad}
        return [k for k in self.adapter_state() if k in trained]

    @classmethod
    def delta_from_state(
        cls, state: dict[str, Tensor], out_f: int, in_f: int, **options: Any
    ) -> Tensor | None:
        """ΔW (float64) of a saved layer from its :meth:`adapter_state` and :meth:`config` alone:
        :meth:`loaded_delta` of a :meth:`stand_in`; None where ΔW needs W₀ (:attr:`delta_needs_w0`)."""
        return None if cls.delta_needs_w0 else cls.stand_in(out_f, in_f, **options).loaded_delta(state)

    def loaded_delta(self, state: dict[str, Tensor]) -> Tensor | None:
        """ΔW (float64) of this :meth:`stand_in` after it loads ``state``; None where ΔW needs W₀.
        The variants' ΔW reads their own tensors only, and a residual base W₀ − s·B₀A₀ is rebuilt
        from W₀ = 0, which leaves ΔW = s·(BA − B₀A₀)."""
        if self.delta_needs_w0:
            return None
        self.load_adapter_state({k: v.to(torch.float64) for k, v in state.items()})
        return self.delta_weight().detach()
