"""The Adapter contract, proved for every registered variant (parametrised over lr.variants()).

Merge equivalence, identity at init, gradients only where they belong, parameter counts,
a frozen base, ΔW measured from the pretrained W₀, and the caller's Linear left untouched.
"""

import pytest
import torch
import torch.nn.functional as F
from adapter_cases import (
    ALPHA,
    IN,
    OUT,
    RANK,
    assert_close,
    base_trains,
    build,
    cases,
    formula,
    inputs,
    perturb,
)

import lowrank as lr

CASES = cases()
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]


@pytest.mark.parametrize("name", lr.variants())
def test_every_variant_has_a_parameter_formula(name):
    # Adapter.trainable_shapes raises "states no parameter formula" for a variant without one
    shapes = formula(name)(OUT, IN, RANK, True)
    assert shapes and all(isinstance(s, tuple) for s in shapes.values())


# ----------------------------------------------------------------------------- 1. merge


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "options"), CASES)
def test_merge_equivalence(name, options, dtype):
    ad, _, _, _ = build(name, options, dtype=dtype)
    perturb(ad)
    ad.eval()
    x = inputs(dtype=dtype)
    with torch.no_grad():
        assert float(ad.delta_weight().abs().max()) > 1e-3, "perturbation left ΔW = 0"
        y_unmerged = ad(x)
        y_formula = F.linear(x, ad.merged_weight(), ad.base.bias)
        w_before = ad.base.weight.detach().clone()
        assert ad.merged is False
        ad.merge()
        assert ad.merged is True
        y_merged = ad(x)
        y_formula_merged = F.linear(x, ad.merged_weight(), ad.base.bias)
    assert y_unmerged.dtype == y_merged.dtype == dtype
    assert_close(y_unmerged, y_formula, dtype, "unmerged vs F.linear(x, merged_weight(), b)")
    assert_close(y_merged, y_formula, dtype, "merged vs F.linear(x, merged_weight(), b)")
    assert_close(y_merged, y_unmerged, dtype, "merged vs unmerged")
    # merged_weight() is a function of the adapter's state, not of the merge state
    assert_close(y_formula_merged, y_formula, dtype, "merged_weight() changed by merge()")
    ad.unmerge()
    assert ad.merged is False
    assert torch.equal(ad.base.weight, w_before), "unmerge() did not restore base.weight exactly"


@pytest.mark.parametrize(("name", "options"), CASES)
def test_merge_and_unmerge_are_idempotent(name, options):
    ad, _, _, _ = build(name, options, dtype=torch.float32)
    perturb(ad)
    ad.eval()
    w_before = ad.base.weight.detach().clone()
    ad.unmerge()  # unmerging an unmerged adapter is a no-op
    assert ad.merged is False and torch.equal(ad.base.weight, w_before)
    ad.merge()
    w_merged = ad.base.weight.detach().clone()
    ad.merge()
    assert ad.merged is True
    assert torch.equal(ad.base.weight, w_merged), "a second merge() changed the weight"
    ad.unmerge()
    assert ad.merged is False
    assert torch.equal(ad.base.weight, w_before), "one unmerge() after two merges is not W₀"
    ad.unmerge()
    assert torch.equal(ad.base.weight, w_before)


@pytest.mark.parametrize(("name", "options"), CASES)
def test_hundred_merge_unmerge_cycles_do_not_drift(name, options):
    ad, _, _, _ = build(name, options, dtype=torch.float64)
    perturb(ad)
    ad.eval()
    x = inputs()
    w_before = ad.base.weight.detach().clone()
    with torch.no_grad():
        y0 = ad(x)
        ad.merge()
        w_merged, y_merged = ad.base.weight.detach().clone(), ad(x)
        ad.unmerge()
        for _ in range(100):
            ad.merge()
            assert torch.equal(ad.base.weight, w_merged)
            ad.unmerge()
            assert torch.equal(ad.base.weight, w_before)
        assert torch.equal(ad(x), y0)
        ad.merge()
        assert torch.equal(ad(x), y_merged)


# ----------------------------------------------------------------------------- 2. identity


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "options"), CASES)
def test_identity_at_init(name, options, dtype):
    ad, lin, w0, b0 = build(name, options, dtype=dtype)
    ad.eval()
    x = inputs(dtype=dtype)
    with torch.no_grad():
        y = ad(x)
        y_base = F.linear(x, w0, b0)  # the pretrained layer, before wrapping
        dw = ad.delta_weight()
    assert_close(y, y_base, dtype, "output at init vs the base layer's")
    assert_close(dw, torch.zeros_like(dw), dtype, "ΔW at init")
    if ad.base is lin and not dw.any():
        # the caller's W₀ and an exact zero ΔW (B = 0 adds exact zeros): no rounding anywhere, so
        # the output is the base layer's bit for bit (a residual base, as pissa's, is rounded)
        assert torch.equal(y, y_base), "ΔW is exactly 0 at init, so the output should be exact"


# ----------------------------------------------------------------------------- 3. gradients


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(("name", "options"), CASES)
def test_num_trainable_matches_the_formula(name, options, bias):
    ad, _, _, _ = build(name, options, bias=bias)
    shapes = formula(name)(OUT, IN, RANK, bias, **options)
    trainable = {n: tuple(p.shape) for n, p in ad.named_parameters() if p.requires_grad}
    assert trainable == shapes
    assert ad.num_trainable() == sum(torch.Size(s).numel() for s in shapes.values())


def test_parameter_formulas_written_out():
    """The counts of the design table, spelled out for one layer (out=6, in=9, r=3)."""
    o, i, r = OUT, IN, RANK
    expected = {
        "lora": r * (i + o),
        "rslora": r * (i + o),
        "pissa": r * (i + o),
        "milora": r * (i + o),
        "frobenius": r * (i + o),
        "random_alignment": o * r,
        "full": o * i + o,
        "dora": r * (i + o) + o,
        "vera": r + o,
        "adalora": r * (i + o + 1),
        "loha": 2 * r * (i + o),
        "lokr": 2 * 3 + r * (3 + 3),
    }  # 6x9 = (2·3)x(3·3): C is 2x3, B A is 3x3
    for name, count in expected.items():
        if name in lr.variants():
            assert build(name, {})[0].num_trainable() == count, name


@pytest.mark.parametrize(("name", "options"), CASES)
def test_eval_mode_ignores_dropout(name, options):
    ad, _, _, _ = build(name, {**options, "dropout": 0.5})
    perturb(ad)
    ad.eval()
    x = inputs()
    with torch.no_grad():
        y = ad(x)
        assert torch.equal(ad(x), y), "eval output is not deterministic with dropout > 0"
        assert_close(
            y,
            F.linear(x, ad.merged_weight(), ad.base.bias),
            torch.float64,
            "eval output with dropout > 0 vs the merged weight",
        )


@pytest.mark.parametrize(("name", "options"), CASES)
def test_gradients_reach_only_trainable_parameters(name, options):
    ad, _, _, _ = build(name, options)
    perturb(ad)  # B ≠ 0, so A receives a nonzero gradient too
    ad.train()
    x = inputs().requires_grad_(True)
    loss = ad(x).square().sum() + ad.penalty()
    loss.backward()
    expected = set(formula(name)(OUT, IN, RANK, True, **options))
    for pname, p in ad.named_parameters():
        if pname in expected:
            assert p.requires_grad and p.grad is not None, f"{pname} got no gradient"
            assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, pname
        else:
            assert not p.requires_grad and p.grad is None, f"frozen {pname} got a gradient"
    trains = base_trains(name, **options)
    assert ad.base.weight.requires_grad is trains
    assert (ad.base.weight.grad is not None) is trains
    assert ad.base.bias.requires_grad is trains
    assert (ad.base.bias.grad is not None) is trains
    assert x.grad is not None  # the input gradient still flows through the adapter
    for bname, b in ad.named_buffers():
        assert not b.requires_grad, f"buffer {bname} requires grad"


@pytest.mark.parametrize(("name", "options"), CASES)
def test_penalty_is_a_scalar_tensor(name, options):
    ad, _, _, _ = build(name, options)
    p = ad.penalty()
    assert isinstance(p, torch.Tensor) and p.ndim == 0 and torch.isfinite(p)


def test_frobenius_penalty_is_lambda_times_factor_norms():
    ad, _, _, _ = build("frobenius", {"lam": 0.01})
    perturb(ad)
    s = ALPHA / RANK
    U, Vt = s**0.5 * ad.B, s**0.5 * ad.A  # U Vᵀ = s·B A
    assert torch.allclose(U @ Vt, ad.delta_weight(), rtol=0, atol=1e-12)
    expected = 0.01 * (U.square().sum() + Vt.square().sum())
    assert torch.allclose(ad.penalty(), expected, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- 4. frozen base


@pytest.mark.parametrize(("name", "options"), CASES)
def test_base_is_frozen_through_an_adamw_step(name, options):
    ad, _, _, _ = build(name, options, dtype=torch.float32)
    ad.train()
    w_before = ad.base.weight.detach().clone()
    b_before = ad.base.bias.detach().clone()
    params_before = {n: p.detach().clone() for n, p in ad.named_parameters()}
    buffers_before = {n: b.detach().clone() for n, b in ad.named_buffers()}
    # hand *every* parameter to the optimiser, as a user would with model.parameters()
    opt = torch.optim.AdamW(ad.parameters(), lr=1e-2, weight_decay=0.1)
    x = inputs(dtype=torch.float32)
    target = torch.randn(x.shape[0], OUT, generator=torch.Generator().manual_seed(3))
    loss = F.mse_loss(ad(x), target) + ad.penalty()
    assert float(loss.detach()) > 1e-3
    loss.backward()
    opt.step()
    trained = set(formula(name)(OUT, IN, RANK, True, **options))
    for n, p in ad.named_parameters():
        changed = not torch.equal(p.detach(), params_before[n])
        assert changed is (n in trained), f"{n}: changed={changed}, trainable={n in trained}"
    for n, b in ad.named_buffers():
        assert torch.equal(b, buffers_before[n]), f"buffer {n} changed in a training step"
    if base_trains(name, **options):
        assert not torch.equal(ad.base.weight, w_before)
        assert not torch.equal(ad.base.bias, b_before)
    else:
        assert torch.equal(ad.base.weight, w_before)
        assert torch.equal(ad.base.bias, b_before)


# ----------------------------------------------------------------------------- 5. ΔW and W₀


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "options"), CASES)
def test_delta_weight_is_measured_from_pretrained_w0(name, options, dtype):
    ad, _, w0, _ = build(name, options, dtype=dtype)
    perturb(ad)
    with torch.no_grad():
        dw, merged = ad.delta_weight(), ad.merged_weight()
        assert dw.shape == merged.shape == (OUT, IN)
        assert float(dw.abs().max()) > 1e-3
        # W₀ here is the original pretrained weight, cloned before wrapping
        assert_close(dw, merged - w0, dtype, "delta_weight() vs merged_weight() − W₀")
        assert_close(ad.w0, w0, dtype, "ad.w0 vs the pretrained weight")
        ad.merge()  # the same quantity, whatever the merge state
        assert_close(ad.delta_weight(), dw, dtype, "delta_weight() after merge")


@pytest.mark.parametrize(("name", "options"), CASES)
def test_callers_linear_is_never_mutated(name, options):
    ad, lin, w0, b0 = build(name, options)
    # construction (pissa/milora/closed_form build a residual: it must be a new tensor)
    assert torch.equal(lin.weight, w0) and torch.equal(lin.bias, b0)
    opt = torch.optim.AdamW(ad.parameters(), lr=1e-2)
    x = inputs()
    for _ in range(3):
        opt.zero_grad()
        (ad(x).square().mean() + ad.penalty()).backward()
        opt.step()
    if base_trains(name, **options):
        # full fine-tuning trains the wrapped layer's own weight, by design
        assert not torch.equal(lin.weight, w0)
        assert torch.equal(ad.w0, w0), "full must keep the pretrained W₀ for ΔW"
    else:
        assert torch.equal(lin.weight, w0), "training changed the caller's Linear weight"
        assert torch.equal(lin.bias, b0), "training changed the caller's Linear bias"


@pytest.mark.parametrize(("name", "options"), CASES)
def test_construction_is_deterministic_given_the_seed(name, options):
    a1, _, _, _ = build(name, options, seed=0)
    a2, _, _, _ = build(name, options, seed=0)
    torch.manual_seed(123)  # the global RNG must not matter
    a3, _, _, _ = build(name, options, seed=0)
    s1, s2, s3 = a1.state_dict(), a2.state_dict(), a3.state_dict()
    assert s1.keys() == s2.keys() == s3.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]) and torch.equal(s1[k], s3[k]), k


# ----------------------------------------------------------------------------- 6. without the base layer


@pytest.mark.parametrize(("name", "options"), CASES)
def test_trainable_keys_are_the_saved_tensors_that_train(name, options):
    """trainable_keys() names exactly the adapter_state() entries that are trainable parameters
    (the same storage), on the adapter and on a stand-in of its shape alike."""
    ad, *_ = build(name, options)
    state, keys = ad.adapter_state(), ad.trainable_keys()
    trained = {p.data_ptr() for p in ad.parameters() if p.requires_grad}
    assert {state[k].data_ptr() for k in keys} == trained
    assert sum(state[k].numel() for k in keys) == ad.num_trainable()
    assert type(ad).stand_in(OUT, IN, **ad.config()).trainable_keys() == keys


@pytest.mark.parametrize(("name", "options"), CASES)
def test_delta_from_state_is_the_adapters_or_declared_to_need_w0(name, options):
    """ΔW from the saved state alone (on a stand-in with W₀ = 0) is the adapter's ΔW, or the
    variant says why it needs W₀, and then the stand-in's ΔW is indeed not the adapter's."""
    ad, *_ = build(name, options)
    perturb(ad)
    cls, state, config = type(ad), ad.adapter_state(), ad.config()
    dw = ad.delta_weight().detach()
    got = cls.delta_from_state(state, OUT, IN, **config)
    if not cls.delta_needs_w0:
        assert got.dtype == torch.float64
        assert_close(got, dw, torch.float64, "ΔW from the saved state vs delta_weight()")
        return
    assert got is None and "W₀" in cls.delta_needs_w0
    on_zero = cls.stand_in(OUT, IN, **config)
    on_zero.load_adapter_state(state)
    assert float((on_zero.delta_weight().detach() - dw).abs().max()) > 0.1, "ΔW does not need W₀"
