"""Shared cases for the core tests: every registered variant, small layers, seeded data.

The general identities are parametrised over ``lr.variants()`` so that a newly registered
variant is covered without touching the tests. What differs between variants (which
parameters train, how many) lives in the dicts below, keyed by variant name; a variant
missing from :data:`TRAINABLE_SHAPES` fails ``test_every_variant_has_a_parameter_formula``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lowrank as lr
from lowrank.adapters.lokr import lokr_shapes

OUT, IN, RANK, ALPHA = 6, 9, 3, 6.0  # s = α/r = 2: a scale ≠ 1 so scaling bugs show

# Trainable tensors of each variant for one (out × in) layer at rank r, as
# {parameter name: shape}; their total is the variant's parameter formula.
TRAINABLE_SHAPES = {
    "lora": lambda o, i, r, bias: {"A": (r, i), "B": (o, r)},  # r(in + out)
    "rslora": lambda o, i, r, bias: {"A": (r, i), "B": (o, r)},  # r(in + out)
    "pissa": lambda o, i, r, bias: {"A": (r, i), "B": (o, r)},  # r(in + out)
    "milora": lambda o, i, r, bias: {"A": (r, i), "B": (o, r)},  # r(in + out)
    "frobenius": lambda o, i, r, bias: {"A": (r, i), "B": (o, r)},  # r(in + out)
    "random_alignment": lambda o, i, r, bias: {"B": (o, r)},  # out·r
    "full": lambda o, i, r, bias: {  # out·in + out
        "base.weight": (o, i), **({"base.bias": (o,)} if bias else {})},
    "dora": lambda o, i, r, bias: {"A": (r, i), "B": (o, r), "m": (o,)},  # r(in + out) + out
    "vera": lambda o, i, r, bias: {"d": (r,), "b": (o,)},  # r + out
    "adalora": lambda o, i, r, bias: {"P": (o, r), "lam": (r,), "Q": (r, i)},  # r(in + out + 1)
    "loha": lambda o, i, r, bias: {  # 2r(in + out)
        "B1": (o, r), "A1": (r, i), "B2": (o, r), "A2": (r, i)},
    "lokr": lambda o, i, r, bias: _lokr(o, i, r),  # a·c + r(b + d), out = a·b, in = c·d
}


def _lokr(o, i, r):
    (a, c), (b, d) = lokr_shapes(o, i, -1, r)
    assert a * b == o and c * d == i
    return {"C": (a, c), "B": (b, r), "A": (r, d)}

# Variants whose wrapped layer's own weight (and bias) train; every other variant must keep
# the base layer frozen.
BASE_TRAINS = {"full"}

# Variants that take no rank (it is accepted for a uniform interface and ignored).
RANK_FREE = {"full"}

# Cases whose ΔW is exactly zero at init *and* whose base layer is the caller's untouched
# W₀, so the output at init is bit-identical to the base layer's (B = 0 adds exact zeros).
EXACT_AT_INIT = {"lora", "rslora", "frobenius", "random_alignment", "full",
                 "dora", "vera", "adalora", "loha", "lokr"}

# Non-default constructor options worth covering: the residual initialisations.
EXTRA_OPTIONS = {
    "frobenius": [{"init": "closed_form", "lam": 0.05}],
    "pissa": [{"svd": "randomized"}],
}


def formula(name: str):
    """The trainable-shape formula of ``name``, failing with what to do when it is missing."""
    if name not in TRAINABLE_SHAPES:
        pytest.fail(
            f"variant {name!r} is registered but has no entry in TRAINABLE_SHAPES "
            "(tests/adapter_cases.py): add its parameter formula"
        )
    return TRAINABLE_SHAPES[name]


def case_id(name: str, options: dict) -> str:
    return "-".join([name, *(f"{k}={v}" for k, v in sorted(options.items()))])


def cases() -> list:
    """pytest params (name, options) for every registered variant plus the extra options."""
    out = []
    for name in lr.variants():
        for options in [{}, *EXTRA_OPTIONS.get(name, [])]:
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
            self.blocks = nn.ModuleList(
                [Block(d, shared if share else nn.Linear(d, d)) for _ in range(2)])
            self.head = nn.Linear(d, classes)
        self.to(dtype)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def fresh_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
