"""Shared cases for the core tests: every registered variant, small layers, seeded data.

The general identities are parametrised over ``lr.variants()`` so that a newly registered
variant is covered without touching the tests. What differs between variants is what each
variant's class states: its parameter formula (``trainable_shapes``, which the suite checks
against the constructed adapter), whether it takes a rank (``takes_rank``) and the
non-default options worth covering (``test_options``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import lowrank as lr

OUT, IN, RANK, ALPHA = 6, 9, 3, 6.0  # s = α/r = 2: a scale ≠ 1 so scaling bugs show


def formula(name: str) -> Callable[..., dict[str, tuple[int, ...]]]:
    """The parameter formula of variant ``name``: ``(out, in, rank, bias, **options) ->
    {parameter name: shape}`` of what trains (:meth:`lowrank.Adapter.trainable_shapes`)."""
    return lr.variant_class(name).trainable_shapes


def base_trains(name: str, **options) -> bool:
    """Whether the variant trains the wrapped layer's own weight, by its parameter formula."""
    return "base.weight" in formula(name)(OUT, IN, RANK, True, **options)


def case_id(name: str, options: dict) -> str:
    return "-".join([name, *(f"{k}={v}" for k, v in sorted(options.items()))])


def cases() -> list:
    """pytest params (name, options) for every registered variant: its defaults and its
    ``test_options``."""
    out = []
    for name in lr.variants():
        for options in [{}, *lr.variant_class(name).test_options]:
            out.append(pytest.param(name, options, id=case_id(name, options)))
    return out


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pretrained_linear(out=OUT, in_=IN, dtype=torch.float64, bias=True, seed=0) -> nn.Linear:
    """A 'pretrained' Linear with a generic spectrum (distinct singular values)."""
    g = seeded(seed)
    lin = nn.Linear(in_, out, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out, in_, generator=g, dtype=torch.float64) / math.sqrt(in_))
        if bias:
            lin.bias.copy_(torch.randn(out, generator=g, dtype=torch.float64))
    return lin


def inputs(n=5, in_=IN, dtype=torch.float64, seed=1) -> torch.Tensor:
    return torch.randn(n, in_, generator=seeded(seed), dtype=torch.float64).to(dtype)


def build(name, options, dtype=torch.float64, bias=True, seed=0, rank=RANK, alpha=ALPHA):
    """(adapter, the caller's Linear, a clone of W₀, a clone of the bias)."""
    lin = pretrained_linear(dtype=dtype, bias=bias, seed=seed)
    w0 = lin.weight.detach().clone()
    b0 = None if lin.bias is None else lin.bias.detach().clone()
    ad = lr.make(name, lin, rank=rank, alpha=alpha, seed=seed, **options)
    return ad, lin, w0, b0


@torch.no_grad()
def perturb(module: nn.Module, seed: int = 7, size: float = 0.3) -> None:
    """Move every trainable parameter away from its init, so that ΔW ≠ 0."""
    g = seeded(seed)
    for p in module.parameters():
        if p.requires_grad:
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p)
            p.add_(size * noise)


def rel_tol(dtype: torch.dtype) -> float:
    """Tolerance relative to the output scale for results computed by different routes.

    Two mathematically equal expressions evaluated in a different order (W x + s·B(A x)
    against (W + s·B A) x, a residual base plus B₀A₀ against W₀ ...) differ by a few
    rounding errors per term: about k·ε·‖W‖‖x‖ for inner dimension k ≈ 10 here. With
    ε = 1.2e-7 (float32) that is ~1e-6 of the output scale, so 1e-5 leaves a 10x margin;
    with ε = 2.2e-16 (float64) it is ~1e-14, so 1e-12 leaves a 100x margin while still
    catching any real error (a wrong scale or a missing term is O(1)).
    """
    return {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]


def assert_close(actual, expected, dtype, what=""):
    scale = max(float(expected.abs().max()), 1.0)
    err = float((actual - expected).abs().max())
    tol = rel_tol(dtype) * scale
    assert err <= tol, f"{what}: max abs diff {err:.3e} > {tol:.1e} (output scale {scale:.3g})"


class TinyNet(nn.Module):
    """Three named Linear layers (q, v, out) with a nonlinearity between."""

    def __init__(self, d=8, hidden=10, classes=3, seed=0, dtype=torch.float32):
        super().__init__()
        g = seeded(seed)
        self.q = nn.Linear(d, hidden, dtype=dtype)
        self.v = nn.Linear(hidden, hidden, dtype=dtype)
        self.out = nn.Linear(hidden, classes, dtype=dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)

    def forward(self, x):
        return self.out(torch.tanh(self.v(torch.tanh(self.q(x)))))


class Block(nn.Module):
    def __init__(self, d: int, shared: nn.Linear) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.query = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.shared = shared

    def forward(self, x):
        h = self.norm(x)
        x = x + torch.tanh(self.q(h) + 0.5 * self.query(h) + self.v(h))
        x = x + self.mlp(x)
        return x + torch.tanh(self.shared(x))


class Net(nn.Module):
    """Module ⊃ ModuleList of Blocks ⊃ Sequential; optionally one Linear shared by both blocks."""

    def __init__(self, d=6, classes=3, share=False, dtype=torch.float64, seed=0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            shared = nn.Linear(d, d) if share else None
            self.embed = nn.Linear(4, d)
            self.blocks = nn.ModuleList([Block(d, shared if share else nn.Linear(d, d)) for _ in range(2)])
            self.head = nn.Linear(d, classes)
        self.to(dtype)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def fresh_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
