"""PEFT interop: adapters trained with PEFT load into lowrank, and lowrank's load into PEFT.

PEFT is imported here only (a test dependency); lowrank.io reads and writes its files directly.
Both directions are checked on outputs of a small float32 model with nonzero adapter weights:
the two sides compute the same maths in a different order, which costs a few float32
roundings (~1e-6 at these sizes); the tolerance is 1e-5.
"""

import copy
import json

import peft
import pytest
import torch
from adapter_cases import perturb
from peft import LoraConfig, PeftModel, VeraConfig, get_peft_model
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
    return LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q", "v"], lora_dropout=0.0,
                      use_rslora=variant == "rslora", use_dora=variant == "dora", **extra)


def diff(a, b):
    return float((a - b).detach().abs().max())


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
    with torch.no_grad():
        y_theirs, y_ours = theirs.eval()(X), ours.eval()(X)
    d = diff(y_ours, y_theirs)
    print(f"\nPEFT {peft.__version__} {variant} -> lowrank: max abs output diff {d:.2e}")
    assert diff(y_ours, base(X)) > 0.1 and d < TOL
    # the trained head came along and trains
    assert torch.equal(ours.head.weight, theirs.base_model.model.head.modules_to_save["default"].weight)
    assert ours.head.weight.requires_grad


@pytest.mark.parametrize("variant", VARIANTS)
def test_lowrank_adapter_loads_into_peft(tmp_path, variant):
    base = Net()
    options = {"projection_shape": (12, 12)} if variant == "vera" else {"alpha": ALPHA}
    ours = lr.inject(copy.deepcopy(base), variant, targets=["q", "v"], rank=R,
                     modules_to_save=["head"], **options)
    with torch.no_grad():
        perturb(ours)
    lr.io.to_peft(ours, tmp_path / "peft")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        y_theirs, y_ours = theirs.eval()(X), ours.eval()(X)
    d = diff(y_ours, y_theirs)
    print(f"\nlowrank {variant} -> PEFT {peft.__version__}: max abs output diff {d:.2e}")
    assert diff(y_ours, base(X)) > 0.1 and d < TOL
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


def test_to_peft_refuses_overwrite_and_what_peft_cannot_hold(tmp_path):
    model = lr.inject(Net(), "lora", targets=["q"], rank=2)
    lr.io.to_peft(model, tmp_path / "a")
    with pytest.raises(FileExistsError):
        lr.io.to_peft(model, tmp_path / "a")
    lr.io.to_peft(model, tmp_path / "a", overwrite=True)
    with pytest.raises(ValueError, match="not 'loha'"):
        lr.io.to_peft(lr.inject(Net(), "loha", targets=["q"], rank=2), tmp_path / "b")
    two_ranks = Net()
    two_ranks.q = lr.make("lora", two_ranks.q, rank=2)
    two_ranks.v = lr.make("lora", two_ranks.v, rank=3)
    with pytest.raises(ValueError, match="one rank"):
        lr.io.to_peft(two_ranks, tmp_path / "c")
    vera = lr.inject(Net(), "vera", targets=["q", "v"], rank=2)  # per-shape projections
    with pytest.raises(ValueError, match="projection_shape"):
        lr.io.to_peft(vera, tmp_path / "d")
    assert not any((tmp_path / n).exists() for n in "bcd")


@pytest.mark.parametrize(
    ("change", "message"),
    [({"bias": "all"}, "bias"),
     ({"fan_in_fan_out": True}, "fan_in_fan_out"),
     ({"init_lora_weights": "pissa"}, "modified base model"),
     ({"use_dora": True, "use_rslora": True}, "use_rslora"),
     ({"alpha_pattern": {"q": 4}}, "alpha_pattern"),
     ({"peft_type": "LOHA"}, "not supported")],
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

    source = open(lowrank.io.__file__).read()
    assert "import peft" not in source and "from peft" not in source
