"""Meta-device models (issue 12, item 8): ``with torch.device("meta")`` builds a model without
memory or values; ``lr.inject`` must then build every adapter on meta too, reading no weight, and
refuse in one sentence where the initialisation needs W₀'s values (an SVD). After
``model.to_empty`` every tensor is uninitialised, the adapters' included (as in PEFT); loading an
adapted model's state dict restores everything.
"""

import copy

import pytest
import torch
from adapter_cases import TinyNet, perturb
from torch import nn

import lowrank as lr

SVD_INIT = [("pissa", {}), ("milora", {}), ("frobenius", {"init": "closed_form"})]
META_OK = [v for v in lr.variants() if v not in ("pissa", "milora")]
TARGETS = ["q", "v"]
X = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))


def meta_tinynet():
    with torch.device("meta"):
        return TinyNet()


@pytest.mark.parametrize("name", META_OK)
def test_inject_on_meta_reads_no_weight_and_allocates_nothing(name):
    model = lr.inject(meta_tinynet(), name, targets=TARGETS, rank=2)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert all(t.is_meta for t in tensors.values()), [n for n, t in tensors.items() if not t.is_meta]
    real = lr.inject(TinyNet(), name, targets=TARGETS, rank=2)
    for n in TARGETS:  # same shapes, same trainable tensors as on real weights
        assert lr.adapters(model)[n].num_trainable() == lr.adapters(real)[n].num_trainable()
    assert {n: t.shape for n, t in tensors.items()} == {
        n: t.shape for n, t in [*real.named_parameters(), *real.named_buffers()]
    }


@pytest.mark.parametrize(("name", "options"), SVD_INIT)
def test_svd_initialisations_need_real_weights(name, options):
    what = "frobenius's init='closed_form'" if options else f"{name}'s initialisation"
    model = meta_tinynet()
    with pytest.raises(
        RuntimeError,
        match=rf"^{what} \(an SVD of W₀\) reads the layer's weight, "
        r"which is on the meta device and holds no values; "
        r"load the real weights first \(model.to_empty\("
        r"device=...\) and load_state_dict\), then inject$",
    ):
        lr.inject(model, name, targets=TARGETS, rank=2, **options)
    assert not lr.adapters(model) and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", ["pissa", "milora"])
def test_milora_refuses_a_non_finite_weight_as_pissa_does(name):
    lin = nn.Linear(8, 6)
    with torch.no_grad():
        lin.weight[1, 2] = float("nan")
    with pytest.raises(
        ValueError,
        match=r"^W contains NaN or inf; clean the matrix before "
        r"factorising it$",
    ):
        lr.make(name, lin, rank=2)
    assert lin.weight.requires_grad


@pytest.mark.parametrize("name", META_OK)
def test_to_empty_then_loading_an_adapted_state_dict_restores_the_model(name):
    ref = lr.inject(TinyNet(), name, targets=TARGETS, rank=2)
    perturb(ref)  # ΔW ≠ 0, so the adapters' own tensors matter
    model = lr.inject(meta_tinynet(), name, targets=TARGETS, rank=2)
    model.to_empty(device="cpu")  # every tensor now uninitialised memory
    model.load_state_dict(ref.state_dict())  # vera's projections, not in it, are redrawn
    with torch.no_grad():
        assert torch.equal(model.eval()(X), ref.eval()(X)), name  # same values, same operations
        for n, ad in lr.adapters(model).items():
            assert torch.equal(ad.delta_weight(), lr.adapters(ref)[n].delta_weight()), n


def test_meta_built_lora_loads_real_base_weights_and_a_saved_adapter(tmp_path):
    pretrained = TinyNet()
    ref = lr.inject(copy.deepcopy(pretrained), "lora", targets=TARGETS, rank=2)
    perturb(ref)
    lr.save_adapters(ref, tmp_path / "ad")
    model = lr.inject(meta_tinynet(), "lora", targets=TARGETS, rank=2)
    model.to_empty(device="cpu")
    # the base weights, under the adapted model's names (q.weight -> q.base.weight)
    ours = {
        k.replace("q.", "q.base.").replace("v.", "v.base."): v for k, v in pretrained.state_dict().items()
    }
    missing, unexpected = model.load_state_dict(ours, strict=False)
    assert not unexpected and sorted(missing) == ["q.A", "q.B", "v.A", "v.B"]
    lr.load_adapters(model, tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(model.eval()(X), ref.eval()(X))
