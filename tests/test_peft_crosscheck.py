"""Cross-check against PEFT (a test-only dependency): same factors → same outputs and ΔW.

LoRA and rsLoRA: PEFT gets our A and B. PiSSA: both sides initialise from the same W and
must agree on A₀, B₀ (up to the sign of each singular pair), on the residual, and on outputs.
Tolerance: float32 everywhere; the layers are ≤ 10 wide with entries O(1), so the two routes
differ by a few float32 roundings (ε = 1.2e-7 times ~10 terms ≈ 1e-6); 1e-5 leaves a margin.
PiSSA's two SVDs differ too (PEFT's runs in float32, ours in float64), which costs another
~1e-6 relative, well inside 1e-5 for singular values as well separated as these.
"""

import copy

import peft
import pytest
import torch
from adapter_cases import TinyNet, perturb
from peft import LoraConfig, get_peft_model

import lowrank as lr

TOL = 1e-5
R, ALPHA = 4, 8  # s = 2 (rsLoRA: 8/√4 = 4), so a scaling mismatch is visible
X = torch.randn(16, 8, generator=torch.Generator().manual_seed(9))


def peft_layer(peft_model, name):
    return peft_model.base_model.model.get_submodule(name)


def both_sides(variant, **peft_options):
    base = TinyNet()
    ours = lr.inject(copy.deepcopy(base), variant, targets=["q", "v"], rank=R, alpha=ALPHA)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q", "v"], lora_dropout=0.0, **peft_options)
    theirs = get_peft_model(copy.deepcopy(base), config)  # PEFT mutates the model it is given
    return base, ours.eval(), theirs.eval()


def max_diff(a, b):
    return float((a - b).detach().abs().max())


@pytest.mark.parametrize(("variant", "use_rslora"), [("lora", False), ("rslora", True)])
def test_lora_and_rslora_agree_with_peft(variant, use_rslora):
    _, ours, theirs = both_sides(variant, use_rslora=use_rslora)
    perturb(ours)  # B ≠ 0: otherwise both sides are the base model and nothing is compared
    with torch.no_grad():
        for name in ("q", "v"):
            ad, layer = lr.adapters(ours)[name], peft_layer(theirs, name)
            assert layer.scaling["default"] == pytest.approx(ad.scale)
            layer.lora_A["default"].weight.copy_(ad.A)
            layer.lora_B["default"].weight.copy_(ad.B)
            assert max_diff(layer.get_delta_weight("default"), ad.delta_weight()) < TOL
        y_ours, y_theirs = ours(X), theirs(X)
    d = max_diff(y_ours, y_theirs)
    print(f"\n{variant} vs PEFT {peft.__version__}: max abs output diff {d:.2e}")
    assert y_ours.abs().max() > 0.1 and d < TOL


def align_signs(A_ours, B_ours, A_theirs):
    """Flip each of our singular pairs (row of A, column of B) to match PEFT's sign."""
    sign = torch.sign((A_ours * A_theirs).sum(dim=1))
    assert (sign != 0).all()
    return A_ours * sign[:, None], B_ours * sign[None, :]


def test_pissa_agrees_with_peft():
    base, ours, theirs = both_sides("pissa", init_lora_weights="pissa")
    with torch.no_grad():
        for name in ("q", "v"):
            ad, layer = lr.adapters(ours)[name], peft_layer(theirs, name)
            A_t, B_t = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            A0, B0 = align_signs(ad.A0, ad.B0, A_t)
            assert max_diff(A0, A_t) < TOL, f"{name}: A₀ differs from PEFT's"
            assert max_diff(B0, B_t) < TOL, f"{name}: B₀ differs from PEFT's"
            assert max_diff(ad.base.weight, layer.base_layer.weight) < TOL, f"{name}: residual"
            # both residuals add back to the same pretrained W₀
            assert max_diff(ad.w0, base.get_submodule(name).weight) < TOL
        assert max_diff(ours(X), theirs(X)) < TOL  # at init: both are the base model
        assert max_diff(ours(X), base(X)) < TOL
        # identical nonzero factors on both sides
        perturb(ours)
        for name in ("q", "v"):
            ad, layer = lr.adapters(ours)[name], peft_layer(theirs, name)
            layer.lora_A["default"].weight.copy_(ad.A)
            layer.lora_B["default"].weight.copy_(ad.B)
        y_ours, y_theirs = ours(X), theirs(X)
    d = max_diff(y_ours, y_theirs)
    print(f"\npissa vs PEFT {peft.__version__}: max abs output diff {d:.2e}")
    assert max_diff(y_ours, base(X)) > 0.1 and d < TOL
