"""CPU bfloat16 autocast: every variant trains and evaluates under ``torch.autocast``, agrees with
its own float32 output, and agrees with PEFT's (or, for full fine-tuning, the plain model's)
under the same autocast.

Tolerance. bfloat16 keeps 8 significant bits: one rounding moves a value by up to
u = 2⁻⁸ ≈ 0.0039 of itself. Under autocast every Linear rounds its input and weight to bf16,
accumulates in float32 and rounds its output; an adapter adds the rounding of its branch's
factors and of its own output. Through TinyNet's three layers that is about ten roundings,
each at most u of a value no larger than the output scale (tanh between the layers is
1-Lipschitz and the weights are O(1)), so a route under autocast stays within ~10u ≈ 0.04 of the
output scale from float32, and two routes (ours and PEFT's, which round in different places)
within twice that. The tolerance is 8u = 0.03 against float32 and 16u = 0.06 against PEFT. A
real error (a wrong scale, a missing term, a factor in the wrong dtype) is O(1).
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from adapter_cases import TinyNet, base_trains, perturb
from test_family import copy_into_peft

import lowrank as lr

U = 2.0**-8  # bf16 unit roundoff
TOL_F32, TOL_PEFT = 8 * U, 16 * U
R, ALPHA = 2, 6.0  # s = 3 (rsLoRA 6/√2): a scaling mismatch shows; r = 2 keeps PEFT's LoKr low-rank
TARGETS = ["q", "v"]  # TinyNet's 8→10 and 10→10 layers
OPTIONS = {"vera": {"projection_shape": (10, 10)}}  # PEFT's shared pair: the largest layer
X = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(11))  # (batch, tokens, d)


def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def ours(name: str) -> torch.nn.Module:
    model = lr.inject(TinyNet(), name, targets=TARGETS, rank=R, alpha=ALPHA, **OPTIONS.get(name, {}))
    perturb(model)  # ΔW ≠ 0 everywhere, so a missing term shows
    return model


def scale_of(y: torch.Tensor) -> float:
    return max(float(y.abs().max()), 1.0)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| relative to the output scale of b."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max()) / scale_of(b)


# ----------------------------------------------------------------------------- PEFT references
def _peft_lora(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """PEFT LoRA (rsLoRA for rslora) on the same frozen bases (pissa's residual) and factors."""
    base = TinyNet()
    with torch.no_grad():
        for t, ad in lr.adapters(model).items():
            base.get_submodule(t).weight.copy_(ad.base.weight)
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, use_rslora=name == "rslora")
    theirs = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        for t, ad in lr.adapters(model).items():
            layer = theirs.base_model.model.get_submodule(t)
            assert layer.scaling["default"] == pytest.approx(ad.scale)
            layer.lora_A["default"].weight.copy_(ad.A)
            layer.lora_B["default"].weight.copy_(ad.B)
    return theirs


def _peft_family(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """PEFT's own DoRA, VeRA, AdaLoRA, LoHa or LoKr holding our tensors (test_family's mapping)."""
    common = {"target_modules": TARGETS}
    cfg = {
        "dora": lambda: peft.LoraConfig(r=R, lora_alpha=ALPHA, use_dora=True, **common),
        "vera": lambda: peft.VeraConfig(r=R, **common),
        "adalora": lambda: peft.AdaLoraConfig(
            init_r=R, target_r=1, lora_alpha=ALPHA, total_step=10, **common
        ),
        "loha": lambda: peft.LoHaConfig(r=R, alpha=ALPHA, **common),
        "lokr": lambda: peft.LoKrConfig(r=R, alpha=ALPHA, **common),
    }[name]()
    theirs = peft.get_peft_model(TinyNet(), cfg)
    for t, ad in lr.adapters(model).items():
        copy_into_peft(name, ad, theirs.base_model.model.get_submodule(t))
    return theirs


def _plain(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """Full fine-tuning: the plain network holding the trained weights."""
    return lr.strip(copy.deepcopy(model))


REFERENCE = {
    "lora": _peft_lora,
    "rslora": _peft_lora,
    "pissa": _peft_lora,
    "milora": _peft_lora,
    "random_alignment": _peft_lora,
    "frobenius": _peft_lora,
    "dora": _peft_family,
    "vera": _peft_family,
    "adalora": _peft_family,
    "loha": _peft_family,
    "lokr": _peft_family,
    "full": _plain,
}


@pytest.mark.parametrize("name", lr.variants())
def test_every_variant_has_an_autocast_reference(name):
    assert name in REFERENCE, f"add a reference for {name!r} to REFERENCE in tests/test_autocast.py"


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("name", lr.variants())
def test_trains_under_autocast(name):
    model = ours(name).train()
    with torch.no_grad():
        y32 = model(X)
    dtypes = {}  # each adapted layer returns what the Linear it wraps returns under autocast
    for t, ad in lr.adapters(model).items():
        ad.register_forward_hook(lambda m, args, out, t=t: dtypes.__setitem__(t, out.dtype))
    with autocast():
        y = model(X)
    assert dtypes == {t: torch.bfloat16 for t in TARGETS}, name
    assert rel_diff(y, y32) <= TOL_F32, name
    y.float().square().mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for n, p in trainable:
        assert p.grad is not None, f"{name}: {n} got no gradient under autocast"
        assert p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), (name, n)
    adapted = {
        f"{t}.{k}"
        for t, ad in lr.adapters(model).items()
        for k, q in ad.named_parameters()
        if q.requires_grad
    }
    assert all(p.grad.abs().sum() > 0 for n, p in trainable if n in adapted), name


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("name", lr.variants())
def test_eval_under_autocast_agrees_with_float32_and_reference(name, grad_mode):
    model = ours(name).eval()
    reference = REFERENCE[name](model, name).eval()
    with grad_mode():
        y32, base32 = model(X), TinyNet()(X)
        with autocast():
            y, ref = model(X), reference(X)
    assert y.dtype == torch.bfloat16
    # the adapters act: far more than bf16 noise separates the adapted model from the base one
    assert rel_diff(y32, base32) > 0.1, name
    to_f32, to_ref = rel_diff(y, y32), rel_diff(y, ref)
    print(
        f"\n{name}: autocast vs own float32 {to_f32:.2e}, vs reference {to_ref:.2e} "
        "(max abs diff / output scale)"
    )
    assert to_f32 <= TOL_F32, (name, to_f32)
    assert to_ref <= TOL_PEFT, (name, to_ref)


@pytest.mark.parametrize("name", [n for n in lr.variants() if not base_trains(n)])
def test_merged_under_autocast_agrees_with_unmerged(name):
    """The merged layer is a plain Linear under autocast; the unmerged route must agree with it."""
    model = ours(name).eval()
    with torch.no_grad(), autocast():
        y = model(X)
        lr.merge_all(model)
        merged = model(X)
    assert rel_diff(y, merged) <= TOL_PEFT, name


def test_dora_norm_cached_under_autocast_is_the_float32_norm():
    """DoRA caches ‖W₀ + sBA‖_row in eval mode; an autocast forward must not leave a bf16-rounded
    norm behind for later float32 calls: the norm is a property of the weights."""
    ad = lr.adapters(ours("dora"))["v"].eval()
    with autocast():
        ad(torch.randn(3, 10))  # caches the norm
    cached = ad.weight_norm()
    ad.clear_cache()
    assert torch.equal(cached, ad.weight_norm())
