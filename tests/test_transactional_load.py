"""Loading is all or nothing: a lowrank or PEFT adapter file that cannot be loaded raises
AdapterFileError and leaves the model exactly as it was — every state_dict tensor bit for bit,
the module tree (names and types), every requires_grad flag and the modules_to_save record.

Each failure kind below is one way a file can fail; most fail on the *last* adapted layer
("v"), after the first ("q") would already have been wrapped by a loader that changes the
model as it goes.
"""

import json

import pytest
import torch
from adapter_cases import TinyNet as _TinyNet
from adapter_cases import perturb
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import lowrank as lr

PEFT_TENSORS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
V_B = "base_model.model.v.lora_B.weight"


class TinyNet(_TinyNet):
    """adapter_cases' TinyNet with its head called ``head``: PEFT matches modules_to_save
    entries as plain suffixes, and ``out`` would also match PEFT's own ``q.lora_dropout``."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__(classes=classes)
        self.head = self.out
        del self.out

    def forward(self, x):
        return self.head(torch.tanh(self.v(torch.tanh(self.q(x)))))


def snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, type(m)) for n, m in model.named_modules(remove_duplicate=False)],
        {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)},
        getattr(model, "lowrank_modules_to_save", None),
    )


def assert_unchanged(model: nn.Module, before) -> None:
    state, tree, flags, saved = before
    after = snapshot(model)
    assert after[1] == tree, "a failed load changed the module tree"
    assert after[2] == flags, "a failed load changed requires_grad flags"
    assert after[3] == saved, "a failed load changed modules_to_save"
    assert after[0].keys() == state.keys()
    changed = [
        k for k in state if not (after[0][k].dtype == state[k].dtype and torch.equal(after[0][k], state[k]))
    ]
    assert not changed, f"a failed load changed {changed}"


# ----------------------------------------------------------------------------- file editing
def edit_json(path, change):
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


def edit_tensors(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def native(tmp_path):
    """A lowrank file: lora r=2, alpha=4 on q (10x8) and v (10x10), modules_to_save=["head"]."""
    model = lr.inject(TinyNet(), "lora", targets=["q", "v"], modules_to_save=["head"], rank=2, alpha=4.0)
    perturb(model)
    return lr.save_adapters(model, tmp_path / "ad")


def injected(**options):
    """A TinyNet with lora already on q and v (a different seed: other values to overwrite)."""
    return lr.inject(
        TinyNet(),
        "lora",
        targets=["q", "v"],
        modules_to_save=["head"],
        seed=5,
        **{"rank": 2, "alpha": 4.0, **options},
    )


def peft_file(tmp_path, **extra):
    """A PEFT file: LoRA r=2, alpha=4 on q and v, modules_to_save=["head"]."""
    theirs = get_peft_model(
        TinyNet(), LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], modules_to_save=["head"], **extra)
    )
    perturb(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft"


def non_linear_v():
    model = TinyNet()
    model.v = nn.Tanh()
    return model


# ----------------------------------------------------------------------------- native kinds
def n_missing_tensor(tmp_path):
    path = native(tmp_path)
    edit_tensors(path / "adapter.safetensors", lambda t: t.pop("v::B"))
    return TinyNet(), path, r"lacks tensor 'v::B', which adapter_config.json lists"


def n_missing_key(tmp_path):
    path = native(tmp_path)
    edit_tensors(path / "adapter.safetensors", lambda t: t.pop("v::B"))
    edit_json(path / CONFIG, lambda c: c["layers"]["v"]["tensors"].pop("B"))
    return TinyNet(), path, r"tensor v::B is absent in the file but \(10, 2\) in a 'lora' adapter"


def wrong_shape(path):
    edit_tensors(path / "adapter.safetensors", lambda t: t.update({"v::A": torch.zeros(3, 10)}))
    edit_json(path / CONFIG, lambda c: c["layers"]["v"]["tensors"].update(A=[3, 10]))


def n_wrong_shape(tmp_path):
    path = native(tmp_path)
    wrong_shape(path)
    return TinyNet(), path, r"tensor v::A is \(3, 10\) in the file but \(2, 10\) in a 'lora'"


def n_wrong_shape_into_merged_adapters(tmp_path):
    path = native(tmp_path)
    wrong_shape(path)
    model = lr.merge_all(injected())
    return model, path, r"tensor v::A is \(3, 10\) in the file but \(2, 10\)"


def n_extra_tensor(tmp_path):
    path = native(tmp_path)
    edit_tensors(path / "adapter.safetensors", lambda t: t.update({"v::C": torch.zeros(2)}))
    edit_json(path / CONFIG, lambda c: c["layers"]["v"]["tensors"].update(C=[2]))
    return TinyNet(), path, r"tensor v::C is \(2,\) in the file but absent in a 'lora' adapter"


def n_unlisted_tensor(tmp_path):
    path = native(tmp_path)
    edit_tensors(path / "adapter.safetensors", lambda t: t.update({"v::C": torch.zeros(2)}))
    return TinyNet(), path, r"holds tensor 'v::C', which adapter_config.json does not list"


def n_wrong_variant(tmp_path):
    model = lr.inject(TinyNet(), "dora", targets=["q", "v"], rank=2, alpha=4.0)
    return model, native(tmp_path), r"layer 'q' holds a 'dora' adapter but the file has 'lora'"


def n_unknown_variant(tmp_path):
    path = native(tmp_path)
    edit_json(path / CONFIG, lambda c: c["layers"]["v"].update(variant="nosuch"))
    return TinyNet(), path, r"layer 'v' uses variant 'nosuch', which this lowrank"


def n_no_rank_on_last_layer(tmp_path):
    path = native(tmp_path)
    edit_json(path / CONFIG, lambda c: c["layers"]["v"]["options"].pop("rank"))
    # the default rank 8 builds an A of (8, 10), not the file's (2, 10)
    return TinyNet(), path, r"tensor v::A is \(2, 10\) in the file but \(8, 10\) in a 'lora'"


def n_invalid_rank(tmp_path):
    path = native(tmp_path)
    edit_json(path / CONFIG, lambda c: c["layers"]["v"]["options"].update(rank=0))
    return TinyNet(), path, r"layer 'v': the file's options .* do not build a 'lora' adapter"


def n_unknown_option(tmp_path):
    path = native(tmp_path)
    edit_json(path / CONFIG, lambda c: c["layers"]["v"]["options"].update(colour="red"))
    return TinyNet(), path, r"layer 'v': the file's options .*colour.* do not build"


def n_other_options_than_injected(tmp_path):
    return (
        injected(alpha=1.0),
        native(tmp_path),
        r"layer 'q' holds a 'lora' adapter but the file has other options",
    )


def n_wrong_layer_name(tmp_path):
    path = native(tmp_path)

    def rename(c):
        c["layers"]["w"] = c["layers"].pop("v")

    edit_json(path / CONFIG, rename)
    edit_tensors(
        path / "adapter.safetensors",
        lambda t: t.update({k.replace("v::", "w::"): t.pop(k) for k in list(t) if k.startswith("v::")}),
    )
    return TinyNet(), path, r"the file adapts layer 'w', which this model does not have"


def n_non_linear(tmp_path):
    return non_linear_v(), native(tmp_path), r"layer 'v' is a Tanh, not a Linear"


def n_modules_to_save_shape(tmp_path):
    return (
        TinyNet(classes=5),
        native(tmp_path),
        r"tensor head::weight is \(3, 10\) in the file but \(5, 10\) in the model",
    )


def n_modules_to_save_missing(tmp_path):
    path = native(tmp_path)
    edit_json(path / CONFIG, lambda c: c.update(modules_to_save=["head", "tail"]))
    return TinyNet(), path, r"modules_to_save entry 'tail' is not in this model"


def n_no_in_features_on_last_layer(tmp_path):
    path = native(tmp_path)
    edit_json(path / CONFIG, lambda c: c["layers"]["v"].pop("in_features"))
    return TinyNet(), path, r"adapter_config.json: layer 'v' has no 'in_features'"


def n_damaged_json(tmp_path):
    path = native(tmp_path)
    text = (path / CONFIG).read_text()
    (path / CONFIG).write_text(text[: len(text) // 2])
    return TinyNet(), path, r"adapter_config.json is not valid JSON"


def n_damaged_safetensors(tmp_path):
    path = native(tmp_path)
    data = (path / "adapter.safetensors").read_bytes()
    (path / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    return TinyNet(), path, r"adapter.safetensors is damaged"


# ----------------------------------------------------------------------------- PEFT kinds
def p_wrong_shape(tmp_path):
    path = peft_file(tmp_path)
    edit_tensors(path / PEFT_TENSORS, lambda t: t.update({V_B: torch.zeros(10, 3)}))
    return TinyNet(), path, rf"tensor {V_B} is \(10, 3\) in the file but \(10, 2\) in a 'lora'"


def p_wrong_shape_into_adapters(tmp_path):
    model, path, match = p_wrong_shape(tmp_path)
    return injected(dropout=0.0), path, match


def p_rank_is_not_the_config_r(tmp_path):
    path = peft_file(tmp_path)
    edit_json(path / CONFIG, lambda c: c.update(r=3))
    return TinyNet(), path, r"lora_A.weight has rank 2 but the PEFT config gives the layer r=3"


def p_unsupported_option(tmp_path):
    path = peft_file(tmp_path)
    edit_json(path / CONFIG, lambda c: c.update(layers_to_transform=[0]))
    return TinyNet(), path, r"sets layers_to_transform=\[0\], which lowrank does not support"


def p_unknown_peft_type(tmp_path):
    path = peft_file(tmp_path)
    edit_json(path / CONFIG, lambda c: c.update(peft_type="LOHA"))
    return TinyNet(), path, r"peft_type 'LOHA' is not supported"


def p_wrong_layer_name(tmp_path):
    path = peft_file(tmp_path)
    edit_tensors(
        path / PEFT_TENSORS,
        lambda t: t.update({k.replace(".v.", ".w."): t.pop(k) for k in list(t) if ".v." in k}),
    )
    return TinyNet(), path, r"the file adapts layer 'w', which this model does not have"


def p_missing_tensor(tmp_path):
    path = peft_file(tmp_path)
    edit_tensors(path / PEFT_TENSORS, lambda t: t.pop(V_B))
    return TinyNet(), path, r"layer 'v' has \['lora_A.weight'\] in the PEFT file but a lora adapter needs"


def p_dora_missing_magnitude(tmp_path):
    path = peft_file(tmp_path, use_dora=True)
    edit_tensors(path / PEFT_TENSORS, lambda t: t.pop("base_model.model.v.lora_magnitude_vector"))
    return TinyNet(), path, r"layer 'v' has .* in the PEFT file but a dora adapter needs"


def p_unmappable_tensor(tmp_path):
    path = peft_file(tmp_path)
    edit_tensors(
        path / PEFT_TENSORS, lambda t: t.update({"base_model.model.v.lora_C.weight": torch.zeros(2)})
    )
    return TinyNet(), path, r"holds tensors lowrank cannot map \(e.g. 'base_model.model.v.lora_C.weight'\)"


def p_non_linear(tmp_path):
    return non_linear_v(), peft_file(tmp_path), r"layer 'v' is a Tanh, not a Linear"


def p_modules_to_save_shape(tmp_path):
    return (
        TinyNet(classes=5),
        peft_file(tmp_path),
        r"tensor base_model.model.head.weight is \(3, 10\) in the file but \(5, 10\) in the model",
    )


def p_modules_to_save_missing_tensor(tmp_path):
    path = peft_file(tmp_path)
    edit_tensors(path / PEFT_TENSORS, lambda t: t.pop("base_model.model.head.bias"))
    return TinyNet(), path, r"tensor base_model.model.head.bias is absent in the file but \(3,\) in the model"


def p_damaged_json(tmp_path):
    path = peft_file(tmp_path)
    (path / CONFIG).write_text("{")
    return TinyNet(), path, r"adapter_config.json is not valid JSON"


KINDS = [
    n_missing_tensor,
    n_missing_key,
    n_wrong_shape,
    n_wrong_shape_into_merged_adapters,
    n_extra_tensor,
    n_unlisted_tensor,
    n_wrong_variant,
    n_unknown_variant,
    n_no_rank_on_last_layer,
    n_invalid_rank,
    n_unknown_option,
    n_other_options_than_injected,
    n_wrong_layer_name,
    n_non_linear,
    n_modules_to_save_shape,
    n_modules_to_save_missing,
    n_no_in_features_on_last_layer,
    n_damaged_json,
    n_damaged_safetensors,
    p_wrong_shape,
    p_wrong_shape_into_adapters,
    p_rank_is_not_the_config_r,
    p_unsupported_option,
    p_unknown_peft_type,
    p_wrong_layer_name,
    p_missing_tensor,
    p_dora_missing_magnitude,
    p_unmappable_tensor,
    p_non_linear,
    p_modules_to_save_shape,
    p_modules_to_save_missing_tensor,
    p_damaged_json,
]


@pytest.mark.parametrize("kind", KINDS, ids=[k.__name__.replace("_", "-") for k in KINDS])
def test_a_failed_load_leaves_the_model_as_it_was(kind, tmp_path):
    model, path, match = kind(tmp_path)
    load = lr.io.from_peft if kind.__name__.startswith("p_") else lr.load_adapters
    before = snapshot(model)
    with pytest.raises(lr.AdapterFileError, match=match) as err:
        load(model, path)
    assert "\n" not in str(err.value)
    assert_unchanged(model, before)


def test_the_unedited_files_load(tmp_path):
    """The files the failure kinds start from are good: the failures come from the edits."""
    model = lr.load_adapters(TinyNet(), native(tmp_path))
    assert sorted(lr.adapters(model)) == ["q", "v"] and model.lowrank_modules_to_save == ["head"]
    for into in (TinyNet(), injected()):
        assert sorted(lr.adapters(lr.io.from_peft(into, peft_file(tmp_path / "p")))) == ["q", "v"]
    model = lr.load_adapters(lr.merge_all(injected()), native(tmp_path / "m"))
    assert all(ad.merged for ad in lr.adapters(model).values())
