"""DoRA, VeRA, AdaLoRA, LoHa and LoKr: the contract identities, and agreement with PEFT.

PEFT is a test-only dependency. For each variant the same small model is adapted by lowrank and
by PEFT, every tensor is copied from lowrank's adapter into PEFT's (zero-initialised ones made
nonzero first), and the outputs must agree to 1e-5 relative to the output scale.
"""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lokr.layer import factorization as peft_factorization
from safetensors.torch import load_file
from torch import nn

import lowrank as lr
from lowrank.adapters.lokr import factorization, lokr_shapes
from lowrank.adapters.vera import projections

FAMILY = ["adalora", "dora", "loha", "lokr", "vera"]
IN, OUT, R = 16, 12, 2


def linear(dtype=torch.float32, in_f=IN, out_f=OUT, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f).to(dtype)


@torch.no_grad()
def perturb(module: nn.Module, seed: int = 1, size: float = 0.5) -> None:
    """Move every trainable tensor away from its (often zero) initial value."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        if p.requires_grad:
            p.add_(size * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p))


def expected_trainable(name: str, out_f: int, in_f: int, r: int, **opts) -> int:
    if name == "dora":
        return r * (in_f + out_f) + out_f
    if name == "vera":
        return r + out_f
    if name == "adalora":
        return r * (in_f + out_f + 1)
    if name == "loha":
        return 2 * r * (in_f + out_f)
    (a, c), (b, d) = lokr_shapes(out_f, in_f, opts.get("factor", -1), r)
    return a * c + r * (b + d)


# --------------------------------------------------------------------------- contract identities
def test_registered():
    assert set(FAMILY) <= set(lr.variants())


@pytest.mark.parametrize("name", FAMILY)
def test_identity_at_init(name):
    lin = linear()
    x = torch.randn(5, IN)
    ad = lr.make(name, copy.deepcopy(lin), rank=R)
    assert torch.equal(ad(x), lin(x))
    ad.eval()
    assert torch.equal(ad(x), lin(x))
    assert torch.count_nonzero(ad.delta_weight()) == 0


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("name", FAMILY)
def test_merge_equivalence(name, dtype, tol):
    ad = lr.make(name, linear(dtype), rank=R, alpha=3.0)
    perturb(ad)
    ad.eval()
    x = torch.randn(7, 3, IN, dtype=dtype)
    w0 = ad.base.weight.detach().clone()
    unmerged = ad(x)
    ref = F.linear(x, ad.merged_weight(), ad.base.bias)
    scale = ref.abs().max()
    assert (unmerged - ref).abs().max() <= tol * scale
    ad.merge()
    assert ad.merged
    assert (ad(x) - ref).abs().max() <= tol * scale
    ad.unmerge()
    assert torch.equal(ad.base.weight, w0)
    assert torch.equal(ad(x), unmerged)


@pytest.mark.parametrize("name", FAMILY)
def test_hundred_merge_cycles_f64_exact(name):
    ad = lr.make(name, linear(torch.float64), rank=R)
    perturb(ad)
    w0 = ad.base.weight.detach().clone()
    merged = ad.merged_weight().detach().clone()
    for _ in range(100):
        ad.merge()
        assert torch.equal(ad.base.weight, merged)
        ad.unmerge()
    assert torch.equal(ad.base.weight, w0)


@pytest.mark.parametrize("name", FAMILY)
def test_delta_is_merged_minus_w0(name):
    ad = lr.make(name, linear(), rank=R, alpha=4.0)
    perturb(ad)
    w0 = ad.base.weight.detach().clone()
    torch.testing.assert_close(ad.delta_weight(), ad.merged_weight() - w0, rtol=0, atol=1e-6)
    ad.merge()  # still relative to the pretrained W₀ once merged
    torch.testing.assert_close(ad.delta_weight(), ad.merged_weight() - w0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", FAMILY)
def test_grads_only_on_trainable_and_base_frozen(name):
    ad = lr.make(name, linear(), rank=R)
    perturb(ad)
    w0, b0 = ad.base.weight.detach().clone(), ad.base.bias.detach().clone()
    opt = torch.optim.SGD([p for p in ad.parameters() if p.requires_grad], lr=0.1)
    ad(torch.randn(4, IN)).square().sum().add(ad.penalty()).backward()
    for n, p in ad.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
        assert not n.startswith("base.") or not p.requires_grad, n
    opt.step()
    assert torch.equal(ad.base.weight, w0) and torch.equal(ad.base.bias, b0)


@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("shape", [(12, 16), (24, 16), (16, 30)])
def test_num_trainable_formula(name, shape):
    out_f, in_f = shape
    ad = lr.make(name, nn.Linear(in_f, out_f), rank=2)
    assert ad.num_trainable() == expected_trainable(name, out_f, in_f, 2)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(IN, 24), nn.Tanh(), nn.Linear(24, OUT)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def net() -> Net:
    torch.manual_seed(0)
    return Net()


OPTIONS = {"vera": {"projection_shape": (24, 24), "projection_seed": 3}, "lokr": {"factor": 2}}


@pytest.mark.parametrize("name", FAMILY)
def test_save_load_round_trip(name, tmp_path):
    model = lr.inject(net(), name, targets=["fc1", "fc2"], rank=R, alpha=3.0, **OPTIONS.get(name, {}))
    perturb(model)
    model.eval()
    x = torch.randn(6, IN)
    y = model(x)
    lr.save_adapters(model, tmp_path / "ad")
    if name == "vera":  # only d and b are saved; loading redraws A and B from the seed
        assert {k.split("::")[1] for k in load_file(tmp_path / "ad" / "adapter.safetensors")} == {"d", "b"}
    fresh = lr.load_adapters(net(), tmp_path / "ad").eval()
    assert torch.equal(fresh(x), y)
    for n, ad in lr.adapters(fresh).items():
        assert ad.config() == lr.adapters(model)[n].config()


# --------------------------------------------------------------------------- agreement with PEFT
def peft_config(name: str, alpha: float):
    targets = ["fc1", "fc2"]
    if name == "dora":
        return peft.LoraConfig(r=R, lora_alpha=alpha, target_modules=targets, use_dora=True)
    if name == "vera":
        return peft.VeraConfig(r=R, target_modules=targets, projection_prng_key=3)
    if name == "adalora":
        return peft.AdaLoraConfig(
            init_r=R, target_r=1, lora_alpha=alpha, target_modules=targets, total_step=10
        )
    if name == "loha":
        return peft.LoHaConfig(r=R, alpha=alpha, target_modules=targets)
    return peft.LoKrConfig(r=R, alpha=alpha, target_modules=targets, decompose_factor=2)


@torch.no_grad()
def copy_into_peft(name: str, ad: lr.Adapter, layer: nn.Module) -> None:
    """Copy lowrank's tensors into the PEFT layer (the mapping documented in each variant)."""
    if name == "dora":
        pairs = [
            (layer.lora_A["default"].weight, ad.A),
            (layer.lora_B["default"].weight, ad.B),
            (layer.lora_magnitude_vector["default"].weight, ad.m),
        ]
    elif name == "vera":
        # the frozen projections are not copied: both sides must have drawn the same ones
        assert torch.equal(layer.vera_A["default"][:, : ad.in_features], ad.A)
        assert torch.equal(layer.vera_B["default"][: ad.out_features], ad.B)
        pairs = [(layer.vera_lambda_d["default"], ad.d), (layer.vera_lambda_b["default"], ad.b)]
    elif name == "adalora":
        pairs = [
            (layer.lora_A["default"], ad.Q),
            (layer.lora_E["default"], ad.lam[:, None]),
            (layer.lora_B["default"], ad.P),
        ]
    elif name == "loha":
        pairs = [
            (layer.hada_w1_a["default"], ad.B1),
            (layer.hada_w1_b["default"], ad.A1),
            (layer.hada_w2_a["default"], ad.B2),
            (layer.hada_w2_b["default"], ad.A2),
        ]
    else:
        assert "default" not in layer.lokr_w2  # low-rank w2, as here
        pairs = [
            (layer.lokr_w1["default"], ad.C),
            (layer.lokr_w2_a["default"], ad.B),
            (layer.lokr_w2_b["default"], ad.A),
        ]
    for theirs, ours in pairs:
        assert theirs.shape == ours.shape
        theirs.copy_(ours)


def peft_pair(name: str, alpha: float = 3.0, dropout: float = 0.0):
    base = net()
    opts = {"alpha": alpha, "dropout": dropout, **OPTIONS.get(name, {})}
    ours = lr.inject(copy.deepcopy(base), name, targets=["fc1", "fc2"], rank=R, **opts)
    perturb(ours)
    cfg = peft_config(name, alpha)
    if dropout:
        cfg.lora_dropout = dropout
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    for layer_name, ad in lr.adapters(ours).items():
        copy_into_peft(name, ad, theirs.base_model.model.get_submodule(layer_name))
    return ours, theirs


def max_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    return (a - b).abs().max().item(), b.abs().max().item()


@pytest.mark.parametrize("name", FAMILY)
def test_agrees_with_peft(name):
    ours, theirs = peft_pair(name)
    ours.eval(), theirs.eval()
    x = torch.randn(32, IN)
    with torch.no_grad():
        y_ours, y_peft, y_base = ours(x), theirs(x), net()(x)
    diff, scale = max_diff(y_ours, y_peft)
    assert diff <= 1e-5 * scale, (name, diff, scale)
    assert (y_ours - y_base).abs().max() > 1e-2 * scale  # the adapters really act
    # PEFT's merged model agrees too
    merged = theirs.merge_and_unload()
    diff, scale = max_diff(lr.merge_all(ours)(x), merged(x))
    assert diff <= 1e-5 * scale, (name, diff, scale)


def test_dora_dropout_follows_peft_in_training():
    ours, theirs = peft_pair("dora", dropout=0.3)
    ours.train(), theirs.train()
    x = torch.randn(32, IN)
    torch.manual_seed(5)
    y_ours = ours(x)
    torch.manual_seed(5)
    y_peft = theirs(x)
    diff, scale = max_diff(y_ours, y_peft)
    assert diff <= 1e-5 * scale


def test_dora_gradients_follow_peft():
    ours, theirs = peft_pair("dora")
    x = torch.randn(32, IN)
    ours(x).square().mean().backward()
    theirs(x).square().mean().backward()
    for layer_name, ad in lr.adapters(ours).items():
        layer = theirs.base_model.model.get_submodule(layer_name)
        for g_ours, g_peft in [
            (ad.A.grad, layer.lora_A["default"].weight.grad),
            (ad.B.grad, layer.lora_B["default"].weight.grad),
            (ad.m.grad, layer.lora_magnitude_vector["default"].weight.grad),
        ]:
            torch.testing.assert_close(g_ours, g_peft, rtol=1e-5, atol=1e-7)


def test_peft_init_conventions_as_documented():
    """The docstrings say which factor each library zeroes; keep them honest."""
    base = net()
    loha = peft.get_peft_model(copy.deepcopy(base), peft_config("loha", 2.0)).base_model.model
    assert torch.count_nonzero(loha.fc1.hada_w2_b["default"]) == 0  # r×in factor = our A2
    lokr = peft.get_peft_model(copy.deepcopy(base), peft_config("lokr", 2.0)).base_model.model
    assert torch.count_nonzero(lokr.fc1.lokr_w1["default"]) == 0  # PEFT zeros C; we zero B
    assert peft.AdaLoraConfig(total_step=1).orth_reg_weight == 0.5  # ours: 0.1 (paper)
    assert peft.VeraConfig().d_initial == 0.1


# --------------------------------------------------------------------------- DoRA details
def test_dora_norm_detached_and_paper_gradient():
    ad = lr.make("dora", linear(torch.float64), rank=R, alpha=4.0)
    perturb(ad)
    x = torch.randn(5, IN, dtype=torch.float64)
    ad(x).sum().backward()
    got = [ad.A.grad, ad.B.grad, ad.m.grad]
    A, B, m = (t.detach().clone().requires_grad_() for t in (ad.A, ad.B, ad.m))
    v = ad.base.weight + ad.scale * B @ A
    w = m[:, None] * v / torch.linalg.vector_norm(v, dim=1).detach()[:, None]
    F.linear(x, w, ad.base.bias).sum().backward()
    for g, ref in zip(got, [A.grad, B.grad, m.grad], strict=True):
        torch.testing.assert_close(g, ref)


def test_dora_eval_caches_norm_and_notices_updates():
    ad = lr.make("dora", linear(), rank=R)
    perturb(ad)
    x = torch.randn(3, IN)
    ad.eval()
    n1 = ad.weight_norm()
    assert ad.weight_norm() is n1  # cached: no recomputation in eval
    ad(x)
    assert ad.weight_norm() is n1
    with torch.no_grad():
        ad.B.add_(1.0)  # an optimizer-style in-place update
    n2 = ad.weight_norm()
    assert n2 is not n1 and not torch.equal(n1, n2)
    torch.testing.assert_close(ad(x), F.linear(x, ad.merged_weight(), ad.base.bias))
    ad.train()
    assert ad.weight_norm() is not ad.weight_norm()  # training: always fresh


def test_dora_magnitude_init_is_row_norm():
    lin = linear()
    ad = lr.make("dora", lin, rank=R)
    torch.testing.assert_close(ad.m.detach(), lin.weight.detach().norm(dim=1), rtol=0, atol=0)


# --------------------------------------------------------------------------- VeRA details
def test_vera_projections_shared_and_not_saved():
    model = lr.inject(net(), "vera", targets=["fc1", "fc2"], rank=R, projection_shape=(24, 24))
    ads = list(lr.adapters(model).values())
    A, B = projections(0, R, 24, 24)
    for ad in ads:
        assert ad.A.untyped_storage().data_ptr() == A.untyped_storage().data_ptr()
        assert ad.B.untyped_storage().data_ptr() == B.untyped_storage().data_ptr()
        assert set(ad.adapter_state()) == {"d", "b"}
        assert torch.equal(ad.d, torch.full((R,), 0.1)) and not ad.b.any()
    bound = math.sqrt(6 / 24)
    assert A.abs().max() <= bound and B.abs().max() <= math.sqrt(6 / R)


def test_vera_projection_shape_too_small():
    with pytest.raises(ValueError, match="projection_shape"):
        lr.make("vera", linear(), rank=R, projection_shape=(OUT - 1, IN))


def test_vera_projection_seed_independent_of_layer_seed():
    a = lr.make("vera", linear(), rank=R, seed=1)
    b = lr.make("vera", linear(), rank=R, seed=2)
    c = lr.make("vera", linear(), rank=R, projection_seed=1)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    assert not torch.equal(a.A, c.A)


# --------------------------------------------------------------------------- LoKr details
@pytest.mark.parametrize("factor", [-1, 1, 2, 3, 4, 5, 8])
def test_lokr_factorization_matches_peft(factor):
    for dim in range(1, 200):
        assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


def test_lokr_automatic_split_is_peft_when_the_rank_fits():
    for out_f in range(1, 70):
        for in_f in range(1, 70, 7):
            (a, c), (b, d) = lokr_shapes(out_f, in_f, -1, 1)
            assert ((a, b), (c, d)) == (peft_factorization(out_f), peft_factorization(in_f))


def test_lokr_automatic_split_makes_room_for_the_rank():
    lin = nn.Linear(16, 12)  # 12 = 3·4, 16 = 4·4: PEFT's low-rank block is 4x4
    assert lr.make("lokr", lin, rank=4).kron_shapes == ((3, 4), (4, 4))
    assert lr.make("lokr", lin, rank=6).kron_shapes == ((2, 2), (6, 8))
    assert lr.make("lokr", lin, rank=12).kron_shapes == ((1, 1), (12, 16))
    for r in range(1, 13):
        (a, c), (b, d) = lr.make("lokr", lin, rank=r).kron_shapes
        assert a * b == 12 and c * d == 16 and min(b, d) >= r
    with pytest.warns(lr.RankWarning, match="12x16 layer with variant 'lokr' is over-complete"):
        assert lr.make("lokr", lin, rank=13).kron_shapes == ((1, 1), (12, 16))


def test_lokr_rank_above_its_block_is_over_complete():
    lin = nn.Linear(16, 12)
    assert lr.make("lokr", lin, rank=2, factor=2).kron_shapes == ((2, 2), (6, 8))
    # B A is 6x8 with factor=2: any rank is legal (PEFT takes it), above 6 it adds nothing
    with pytest.warns(lr.RankWarning, match=r"as expressive at rank 6 as at any larger rank"):
        assert lr.make("lokr", lin, rank=7, factor=2).kron_shapes == ((2, 2), (6, 8))
    with pytest.raises(ValueError, match="factor"):
        lr.make("lokr", lin, rank=1, factor=0)


def test_lokr_forward_route_equals_kron():
    ad = lr.make("lokr", nn.Linear(30, 24), rank=2, factor=3)
    perturb(ad)
    x = torch.randn(2, 5, 30)
    torch.testing.assert_close(ad.adapter_forward(x), F.linear(x, ad.delta_weight()))


# --------------------------------------------------------------------------- AdaLoRA details
def test_adalora_penalty():
    ad = lr.make("adalora", linear(), rank=R, orth_reg_weight=0.3)
    perturb(ad)
    eye = torch.eye(R)
    ref = 0.3 * ((ad.P.T @ ad.P - eye).norm() ** 2 + (ad.Q @ ad.Q.T - eye).norm() ** 2)
    torch.testing.assert_close(ad.penalty(), ref)
    with torch.no_grad():
        ad.P.copy_(torch.linalg.qr(torch.randn(OUT, R))[0])
        ad.Q.copy_(torch.linalg.qr(torch.randn(IN, R))[0].T)
    assert ad.penalty().item() < 1e-10


def test_adalora_scale_is_peft_convention():
    ad = lr.make("adalora", linear(), rank=4, alpha=8.0)
    assert ad.scale == 8.0 / (4 + 1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_dora_inference_path_equals_the_autograd_path(bias):
    """Under no_grad DoRA takes an in-place route; it must give the autograd route's output
    (float32: both sum the same products in another order, so 1e-6 relative), and the base
    layer's output exactly at initialisation (B = 0, m = ‖W₀‖)."""
    torch.manual_seed(0)
    base = nn.Linear(24, 16, bias=bias)
    x = torch.randn(32, 24)
    ad = lr.make("dora", base, rank=4).eval()
    with torch.no_grad():
        assert torch.equal(ad(x), base(x))
        ad.B.normal_(std=0.1)
        ad.m.mul_(1.3)
        fast = ad(x)
    slow = ad(x)
    assert slow.requires_grad and not fast.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-6, atol=1e-6)
