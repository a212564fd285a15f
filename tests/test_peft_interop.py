"""PEFT interop: adapters trained with PEFT load into lowrank, and lowrank's load into PEFT.

PEFT is imported here only (a test dependency); lowrank.io reads and writes its files directly.
Both directions are checked on outputs of a small float32 model with nonzero adapter weights:
the two sides compute the same maths in a different order, which costs a few float32
roundings (~1e-6 at these sizes); the tolerance is 1e-5.
"""

import copy
import json
from collections import OrderedDict
from pathlib import Path

import peft
import pytest
import torch
from adapter_cases import ALPHA as CASE_ALPHA
from adapter_cases import RANK as CASE_RANK
from adapter_cases import cases, perturb, pretrained_linear
from peft import LoraConfig, PeftModel, VeraConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from safetensors.torch import load_file
from tinymodels import tiny_bert
from torch import nn

import lowrank as lr

TOL = 1e-5
R, ALPHA = 4, 8  # scale 2 (rsLoRA 4): a scaling mismatch shows
X = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))


class Net(nn.Module):
    """Two adapted Linear layers of different shapes and a head that may train fully."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.q = nn.Linear(8, 12)
        self.v = nn.Linear(12, 10)
        self.head = nn.Linear(10, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.head(torch.tanh(self.v(torch.tanh(self.q(x)))))


def peft_config(variant, **extra):
    if variant == "vera":
        return VeraConfig(r=R, target_modules=["q", "v"], save_projection=True, **extra)
    return LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        target_modules=["q", "v"],
        lora_dropout=0.0,
        use_rslora=variant == "rslora",
        use_dora=variant == "dora",
        **extra,
    )


def diff(a, b):
    return float((a - b).detach().abs().max())


def outputs_agree(ours, theirs, base, x, label):
    """Eval outputs of ``ours`` and ``theirs`` on ``x`` agree to TOL while the adapters move
    the output away from ``base``'s (by > 0.1, so nothing trivial is compared); returns ours."""
    with torch.no_grad():
        y_ours, y_theirs = ours.eval()(x), theirs.eval()(x)
    d = diff(y_ours, y_theirs)
    print(f"\n{label}: max abs output diff {d:.2e}")
    assert diff(y_ours, base(x)) > 0.1 and d < TOL
    return y_ours


VARIANTS = ["lora", "rslora", "dora", "vera"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_peft_trained_adapter_loads_into_lowrank(tmp_path, variant):
    base = Net()
    theirs = get_peft_model(copy.deepcopy(base), peft_config(variant, modules_to_save=["head"]))
    with torch.no_grad():
        perturb(theirs)  # every trainable tensor (A, B, magnitude, λ's, head) moves
    theirs.save_pretrained(tmp_path / "peft")
    ours = lr.io.from_peft(copy.deepcopy(base), tmp_path / "peft")
    assert {ad.name for ad in lr.adapters(ours).values()} == {variant}
    assert set(lr.adapters(ours)) == {"q", "v"}
    assert ours.lowrank_modules_to_save == ["head"]
    outputs_agree(ours, theirs, base, X, f"PEFT {peft.__version__} {variant} -> lowrank")
    # the trained head came along and trains
    assert torch.equal(ours.head.weight, theirs.base_model.model.head.modules_to_save["default"].weight)
    assert ours.head.weight.requires_grad


@pytest.mark.parametrize("variant", VARIANTS)
def test_lowrank_adapter_loads_into_peft(tmp_path, variant):
    base = Net()
    options = {"projection_shape": (12, 12)} if variant == "vera" else {"alpha": ALPHA}
    ours = lr.inject(
        copy.deepcopy(base), variant, targets=["q", "v"], rank=R, modules_to_save=["head"], **options
    )
    with torch.no_grad():
        perturb(ours)
    lr.io.to_peft(ours, tmp_path / "peft")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    y_ours = outputs_agree(ours, theirs, base, X, f"lowrank {variant} -> PEFT {peft.__version__}")
    # and back again: the exported directory reads into lowrank unchanged
    again = lr.io.from_peft(copy.deepcopy(base), tmp_path / "peft")
    assert diff(again.eval()(X), y_ours) < TOL


def test_peft_rank_pattern_gives_each_layer_its_own_rank(tmp_path):
    base = Net()
    theirs = get_peft_model(copy.deepcopy(base), peft_config("lora", rank_pattern={"v": 2}))
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = lr.io.from_peft(copy.deepcopy(base), tmp_path)
    assert {n: ad.rank for n, ad in lr.adapters(ours).items()} == {"q": R, "v": 2}
    assert lr.adapters(ours)["v"].scale == ALPHA / 2  # PEFT: alpha over the layer's own rank
    with torch.no_grad():
        assert diff(ours.eval()(X), theirs.eval()(X)) < TOL


@pytest.mark.parametrize("variant", ["lora", "rslora"])
def test_peft_alpha_pattern_gives_each_layer_peft_s_scale(tmp_path, variant):
    base = Net()
    theirs = get_peft_model(
        copy.deepcopy(base), peft_config(variant, rank_pattern={"v": 2}, alpha_pattern={"v": 3})
    )
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = lr.io.from_peft(copy.deepcopy(base), tmp_path)
    for name, ad in lr.adapters(ours).items():
        layer = theirs.base_model.model.get_submodule(name)
        assert (ad.rank, ad.alpha) == (layer.r["default"], layer.lora_alpha["default"])
        assert ad.scale == layer.scaling["default"]  # the same formula on the same numbers
    assert lr.adapters(ours)["v"].alpha == 3 and lr.adapters(ours)["q"].alpha == ALPHA
    with torch.no_grad():
        assert diff(ours.eval()(X), theirs.eval()(X)) < TOL


class Suffixed(nn.Module):
    """Layers whose names end alike ("q" and "block.q"): a rank_pattern key "q" would give
    PEFT's "block.q" q's rank too."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.q = nn.Linear(8, 12)
        self.block = nn.Module()
        self.block.q = nn.Linear(12, 12)
        self.block.v = nn.Linear(12, 10)
        self.head = nn.Linear(10, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))

    def forward(self, x):
        h = torch.tanh(self.block.q(torch.tanh(self.q(x))))
        return self.head(torch.tanh(self.block.v(h)))


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_to_peft_with_mixed_ranks_and_alphas_writes_patterns_peft_applies(tmp_path, variant):
    base = Suffixed()
    ours = copy.deepcopy(base).requires_grad_(False)  # only the adapters train
    for name, rank, alpha in [("q", 3, 8.0), ("block.q", 2, 4.0), ("block.v", 2, 2.0)]:
        parent, _, child = name.rpartition(".")
        holder = ours.get_submodule(parent) if parent else ours
        setattr(holder, child, lr.make(variant, getattr(holder, child), rank=rank, alpha=alpha))
    perturb(ours)
    lr.io.to_peft(ours, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    # the most common rank is the default; the others are keyed for exactly their module
    assert (cfg["r"], cfg["rank_pattern"]) == (2, {"^q": 3})
    assert (cfg["lora_alpha"], cfg["alpha_pattern"]) == (8.0, {r"^block\.q": 4.0, r"^block\.v": 2.0})
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    for name, ad in lr.adapters(ours).items():
        layer = theirs.base_model.model.get_submodule(name)
        assert (layer.r["default"], layer.scaling["default"]) == (ad.rank, ad.scale), name
    y_ours = outputs_agree(ours, theirs, base, X, f"lowrank {variant} mixed ranks/alphas -> PEFT")
    again = lr.io.from_peft(copy.deepcopy(base), tmp_path / "peft")
    assert {n: (a.rank, a.scale) for n, a in lr.adapters(again).items()} == {
        n: (a.rank, a.scale) for n, a in lr.adapters(ours).items()
    }
    assert diff(again.eval()(X), y_ours) < TOL


# Variants exported as plain PEFT LoRA, and whether they train on a residual (rank-2r form).
AS_LORA = [
    ("pissa", {}, True),
    ("milora", {}, True),
    ("pissa", {"svd": "randomized"}, True),
    ("frobenius", {"init": "closed_form", "lam": 0.05}, True),
    ("frobenius", {}, False),
    ("random_alignment", {}, False),
]


@pytest.mark.parametrize(
    ("variant", "options", "residual"),
    AS_LORA,
    ids=[v + "-" + "-".join(map(str, o.values())) for v, o, _ in AS_LORA],
)
def test_b_a_family_exports_as_peft_lora_on_the_unmodified_base(tmp_path, variant, options, residual):
    base = Net()
    ours = lr.inject(
        copy.deepcopy(base),
        variant,
        targets=["q", "v"],
        rank=R,
        alpha=ALPHA,
        modules_to_save=["head"],
        **options,
    )
    perturb(ours)
    lr.io.to_peft(ours, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    # ΔW = s·(BA − B₀A₀) = (2α/2r)·[B, −B₀][A; A₀]: rank 2r, alpha 2α, the same scale
    k = 2 if residual else 1
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"]) == (k * R, k * ALPHA, {})
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")  # W₀ as it was
    y_ours = outputs_agree(ours, theirs, base, X, f"lowrank {variant} {options} -> PEFT LoRA r={k * R}")
    for name, ad in lr.adapters(ours).items():
        layer = theirs.base_model.model.get_submodule(name)
        assert diff(layer.get_delta_weight("default"), ad.delta_weight()) < TOL
    # back through from_peft: a plain lora adapter (the variant name does not survive)
    again = lr.io.from_peft(copy.deepcopy(base), tmp_path / "peft")
    assert {ad.name for ad in lr.adapters(again).values()} == {"lora"}
    assert diff(again.eval()(X), y_ours) < TOL
    for name, ad in lr.adapters(again).items():
        assert diff(ad.delta_weight(), lr.adapters(ours)[name].delta_weight()) < TOL


# ----------------------------------------------------------------------------- SEQ_CLS on BERT
IDS = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(4))
MASK = torch.ones_like(IDS).index_fill_(1, torch.tensor([7, 8]), 0)


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS, attention_mask=MASK).logits


def test_peft_seq_cls_adapter_loads_with_its_trained_head(tmp_path):
    """PEFT's SEQ_CLS adds modules_to_save ["classifier", "score"]; BERT has no "score", which
    PEFT skips and so does from_peft, while the trained classifier comes along. Logits agree to
    1e-5: the LoRA branch is summed in another order than PEFT's (a few float32 roundings,
    ~1e-7 relative, through two layers of O(1) activations)."""
    base = tiny_bert()
    theirs = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(task_type="SEQ_CLS", r=R, lora_alpha=ALPHA, target_modules=["query", "value"]),
    )
    assert theirs.peft_config["default"].modules_to_save == ["classifier", "score"]
    perturb(theirs)  # lora_A, lora_B and PEFT's trainable copy of the classifier
    theirs.save_pretrained(tmp_path)
    ours = lr.io.from_peft(copy.deepcopy(base), tmp_path)
    assert ours.lowrank_modules_to_save == ["classifier"]
    assert len(lr.adapters(ours)) == 4
    trained = theirs.base_model.model.classifier.modules_to_save["default"]
    assert torch.equal(ours.classifier.weight, trained.weight) and ours.classifier.weight.requires_grad
    d = diff(logits(ours), logits(theirs))
    print(f"\nPEFT {peft.__version__} SEQ_CLS BERT -> lowrank: max abs logit diff {d:.2e}")
    assert diff(logits(ours), logits(base)) > 0.1 and d < TOL


def test_lowrank_adapter_with_a_trained_classifier_loads_into_peft(tmp_path):
    base = tiny_bert()
    ours = lr.inject(
        copy.deepcopy(base),
        "lora",
        targets=["query", "value"],
        rank=R,
        alpha=ALPHA,
        modules_to_save=["classifier"],
    )
    perturb(ours)
    lr.io.to_peft(ours, tmp_path / "peft")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    assert torch.equal(
        theirs.base_model.model.classifier.modules_to_save["default"].weight, ours.classifier.weight
    )
    d = diff(logits(ours), logits(theirs))
    print(f"\nlowrank BERT + classifier -> PEFT {peft.__version__}: max abs logit diff {d:.2e}")
    assert diff(logits(ours), logits(base)) > 0.1 and d < TOL


def test_inject_keeps_a_strict_modules_to_save():
    """Only PEFT files get PEFT's skipping: a name the user typed must match a module."""
    with pytest.raises(ValueError, match=r"modules_to_save entry 'score' matches no module"):
        lr.inject(tiny_bert(), "lora", targets=["query"], modules_to_save=["classifier", "score"])


def test_to_peft_refuses_overwrite_and_what_peft_cannot_hold(tmp_path):
    model = lr.inject(Net(), "lora", targets=["q"], rank=2)
    lr.io.to_peft(model, tmp_path / "a")
    with pytest.raises(FileExistsError):
        lr.io.to_peft(model, tmp_path / "a")
    lr.io.to_peft(model, tmp_path / "a", overwrite=True)
    with pytest.raises(ValueError, match="not 'loha'"):
        lr.io.to_peft(lr.inject(Net(), "loha", targets=["q"], rank=2), tmp_path / "b")
    two_types = Net()
    two_types.q = lr.make("lora", two_types.q, rank=2)
    two_types.v = lr.make("dora", two_types.v, rank=2)
    with pytest.raises(ValueError, match=r"one PEFT adapter type .* got \{'q': 'lora', 'v': 'dora'\}"):
        lr.io.to_peft(two_types, tmp_path / "c")
    two_dropouts = Net()
    two_dropouts.q = lr.make("lora", two_dropouts.q, rank=2, dropout=0.1)
    two_dropouts.v = lr.make("pissa", two_dropouts.v, rank=2)
    with pytest.raises(ValueError, match="one dropout"):
        lr.io.to_peft(two_dropouts, tmp_path / "d")
    vera = lr.inject(Net(), "vera", targets=["q", "v"], rank=2)  # per-shape projections
    with pytest.raises(ValueError, match="projection_shape"):
        lr.io.to_peft(vera, tmp_path / "e")
    assert not any((tmp_path / n).exists() for n in "bcde")


def test_to_peft_refuses_a_modules_to_save_name_peft_would_also_match_elsewhere(tmp_path):
    """PEFT matches modules_to_save entries as plain suffixes (str.endswith): a head called
    "out" would also take PEFT's own "q.lora_dropout" (a ModuleDict, which PEFT then refuses
    with a TypeError at load), and "head" any other module whose name ends in it."""
    from adapter_cases import TinyNet

    model = lr.inject(TinyNet(), "lora", targets=["q", "v"], rank=2, modules_to_save=["out"])
    with pytest.raises(ValueError, match=r"entry 'out' would also take 'q.lora_dropout' in PEFT"):
        lr.io.to_peft(model, tmp_path / "a")
    with pytest.raises(TypeError, match="modules_to_save cannot be applied"):  # PEFT itself
        get_peft_model(TinyNet(), LoraConfig(r=2, target_modules=["q", "v"], modules_to_save=["out"]))
    other = Net()
    other.extra = nn.Module()
    other.extra.head = nn.Linear(3, 3)  # "extra.head" ends with "head" too
    model = lr.inject(other, "lora", targets=["q"], rank=2, modules_to_save=["^head$"])
    assert model.lowrank_modules_to_save == ["head"]
    with pytest.raises(ValueError, match=r"entry 'head' would also take 'extra.head' in PEFT"):
        lr.io.to_peft(model, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "config",
    [LoraConfig(r=2, target_modules=["q"], use_dora=True), VeraConfig(r=2, target_modules=["q", "v"])],
    ids=["lora", "vera"],
)
def test_peft_inner_module_names_are_peft_s(config):
    """io's list of the submodules PEFT creates inside an adapted layer is PEFT's."""
    theirs = get_peft_model(Net(), config)
    inner = {n.split(".q.", 1)[1] for n, _ in theirs.named_modules() if ".q." in n}
    assert inner == set(lr.io.peft_format._PEFT_INNER[config.peft_type])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bias": "all"}, "bias"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"init_lora_weights": "pissa"}, "modified base model"),
        ({"use_dora": True, "use_rslora": True}, "use_rslora"),
        ({"layers_to_transform": [0]}, "layers_to_transform"),
        ({"peft_type": "LOHA"}, "not supported"),
    ],
)
def test_from_peft_refuses_what_lowrank_cannot_represent(tmp_path, change, message):
    theirs = get_peft_model(Net(), peft_config("lora" if "use_dora" not in change else "dora"))
    theirs.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    model = Net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(lr.AdapterFileError, match=message):
        lr.io.from_peft(model, tmp_path)
    assert not lr.adapters(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_from_peft_on_the_wrong_model_or_a_damaged_file(tmp_path):
    get_peft_model(Net(), peft_config("lora")).save_pretrained(tmp_path)
    wrong = nn.Sequential(nn.Linear(8, 12))
    with pytest.raises(lr.AdapterFileError, match="does not have"):
        lr.io.from_peft(wrong, tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(lr.AdapterFileError, match="damaged"):
        lr.io.from_peft(Net(), tmp_path)
    with pytest.raises(lr.AdapterFileError, match="not a PEFT adapter directory"):
        lr.io.from_peft(Net(), tmp_path / "missing")


def test_io_does_not_import_peft():
    import lowrank.io

    for module in Path(lowrank.io.__file__).parent.glob("*.py"):  # every module of the package
        source = module.read_text()
        assert "import peft" not in source and "from peft" not in source, module.name


# ----------------------------------------------------------------------------- the variants' formats
def test_the_variants_with_a_peft_format_are_those_peft_trains():
    """Every variant that declares a PEFT format gets this module's PEFT round trips."""
    assert [n for n in lr.variants() if lr.variant_class(n).peft is not None] == sorted(VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_variant_s_peft_format_is_what_peft_writes(tmp_path, variant):
    """Adapter.peft is PEFT's own: a PEFT model built from the format's peft_type and config
    fields saves them as given and, for an adapted layer, exactly the tensors the format names,
    each of the shape of the lowrank tensor it maps; from_peft reads that file as the variant."""
    fmt = lr.variant_class(variant).peft
    config = PEFT_TYPE_TO_CONFIG_MAPPING[fmt.peft_type](r=R, target_modules=["q"], **fmt.config)
    get_peft_model(Net(), config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == fmt.peft_type
    assert {k: saved[k] for k in fmt.config} == fmt.config
    prefix = "base_model.model.q."
    theirs = {
        k.removeprefix(prefix): tuple(t.shape)
        for k, t in load_file(tmp_path / "adapter_model.safetensors").items()
        if k.startswith(prefix)
    }
    ours = lr.make(variant, Net().q, rank=R).adapter_state()  # r = 4 ≠ out = 12: a swap shows
    assert theirs == {fmt.tensors[k]: tuple(t.shape) for k, t in ours.items()}
    assert {ad.name for ad in lr.adapters(lr.io.from_peft(Net(), tmp_path)).values()} == {variant}


@pytest.mark.parametrize(("name", "options"), cases())
def test_every_variant_goes_to_peft_with_its_outputs_or_is_refused(tmp_path, name, options):
    """to_peft asks each adapter (Adapter.peft_export): a registered variant that exports loads
    into PEFT with the same outputs (to 1e-5, as above), one that does not is refused with its
    name and nothing is written."""
    base = nn.Sequential(OrderedDict(q=pretrained_linear(dtype=torch.float32)))
    ours = lr.inject(copy.deepcopy(base), name, targets=["q"], rank=CASE_RANK, alpha=CASE_ALPHA, **options)
    perturb(ours)
    x = torch.randn(5, base.q.in_features, generator=torch.Generator().manual_seed(2))
    if ours.q.peft_export() is None:
        with pytest.raises(ValueError, match=rf"not {name!r}; save it with lr.save_adapters"):
            lr.io.to_peft(ours, tmp_path / "peft")
        assert not (tmp_path / "peft").exists()
        return
    lr.io.to_peft(ours, tmp_path / "peft")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    outputs_agree(ours, theirs, base, x, f"lowrank {name} {options} -> PEFT")
