"""save_adapters / load_adapters: exact round trips for every variant, the file format, overwrite."""

import json
import stat
from collections import OrderedDict

import pytest
import torch
from adapter_cases import Net, TinyNet, cases, fresh_copy, perturb
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lowrank as lr

CASES = cases()
X = torch.randn(7, 8, generator=torch.Generator().manual_seed(5))


def trained(name, options, seed=0, pristine=None):
    """(pristine model, adapted model with every trainable tensor moved off its init)."""
    pristine = pristine or TinyNet()
    model = fresh_copy(pristine)
    lr.inject(
        model, name, targets=["q", "v"], modules_to_save=["out"], rank=2, alpha=4.0, seed=seed, **options
    )
    perturb(model)
    return pristine, model.eval()


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("name", "options"), CASES)
def test_save_then_load_into_a_fresh_model_is_exact(name, options, tmp_path):
    pristine, model = trained(name, options)
    with torch.no_grad():
        y = model(X)
    lr.save_adapters(model, tmp_path / "ad")
    fresh = fresh_copy(pristine)
    assert lr.load_adapters(fresh, tmp_path / "ad") is fresh
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(X), y)
    assert sorted(lr.adapters(fresh)) == sorted(lr.adapters(model)) == ["q", "v"]
    for n, ad in lr.adapters(fresh).items():
        assert ad.name == name
        assert torch.equal(ad.delta_weight(), lr.adapters(model)[n].delta_weight())


@pytest.mark.parametrize(("name", "options"), CASES)
def test_load_into_a_model_with_the_same_variant_injected(name, options, tmp_path):
    pristine, model = trained(name, options, seed=0)
    with torch.no_grad():
        y = model(X)
    lr.save_adapters(model, tmp_path / "ad")
    # the same variant and options but another seed: a different initialisation to overwrite
    other = lr.inject(
        fresh_copy(pristine),
        name,
        targets=["q", "v"],
        modules_to_save=["out"],
        rank=2,
        alpha=4.0,
        seed=1,
        **options,
    )
    lr.load_adapters(other, tmp_path / "ad").eval()
    with torch.no_grad():
        assert torch.equal(other(X), y)


@pytest.mark.parametrize("into", ["fresh", "injected"])
@pytest.mark.parametrize("name", lr.variants())
def test_loaded_model_trains_the_same_parameters_as_the_saved_one(name, into, tmp_path):
    pristine, model = trained(name, {})
    lr.save_adapters(model, tmp_path / "ad")
    target = fresh_copy(pristine)
    if into == "injected":
        lr.inject(target, name, targets=["q", "v"], modules_to_save=["out"], rank=2, alpha=4.0)
    lr.load_adapters(target, tmp_path / "ad")
    assert trainable_names(target) == trainable_names(model), (
        "after load_adapters the model must train what the saved model trained (to resume)"
    )


@pytest.mark.parametrize("name", lr.variants())
def test_load_into_same_variant_with_other_alpha_is_exact_or_refused(name, tmp_path):
    """The file records alpha; an adapter built with another alpha must not silently use its own
    scale (the outputs would differ from the saved model's)."""
    _, model = trained(name, {})
    with torch.no_grad():
        y = model(X)
    lr.save_adapters(model, tmp_path / "ad")
    other = lr.inject(TinyNet(), name, targets=["q", "v"], modules_to_save=["out"], rank=2, alpha=1.0)
    try:
        lr.load_adapters(other, tmp_path / "ad")
    except lr.AdapterFileError as e:
        assert "alpha" in str(e)
        return
    with torch.no_grad():
        got = other.eval()(X)
    assert torch.equal(got, y), (
        f"loaded into a {name!r} adapter with alpha=1 from a file saved with alpha=4: outputs "
        f"differ by {float((got - y).abs().max()):.3g} and no error was raised"
    )


@pytest.mark.parametrize("name", lr.variants())
def test_save_while_merged_and_load_is_exact(name, tmp_path):
    pristine, model = trained(name, {})
    lr.merge_all(model)
    with torch.no_grad():
        y = model(X)
    lr.save_adapters(model, tmp_path / "ad")
    fresh = lr.load_adapters(fresh_copy(pristine), tmp_path / "ad").eval()
    with torch.no_grad():
        assert torch.allclose(fresh(X), y, rtol=0, atol=1e-5)  # merged vs unmerged route (f32)
        lr.merge_all(fresh)
        assert torch.equal(fresh(X), y)


def test_files_are_safetensors_and_json(tmp_path):
    _, model = trained("lora", {})
    path = lr.save_adapters(model, tmp_path / "ad")
    assert sorted(p.name for p in path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    config = json.loads((path / "adapter_config.json").read_text())
    assert set(config["layers"]) == {"q", "v"}
    assert config["layers"]["q"]["variant"] == "lora"
    assert config["layers"]["q"]["options"]["rank"] == 2
    assert config["layers"]["q"]["options"]["alpha"] == 4.0
    assert config["modules_to_save"] == ["out"]
    with safe_open(str(path / "adapter.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert torch.equal(f.get_tensor("q::A"), model.q.A.detach())
        assert torch.equal(f.get_tensor("q::B"), model.q.B.detach())
    assert keys == {"q::A", "q::B", "v::A", "v::B", "out::weight", "out::bias"}


def test_save_refuses_to_overwrite_without_permission(tmp_path):
    _, model = trained("lora", {})
    path = lr.save_adapters(model, tmp_path / "ad")
    before = (path / "adapter.safetensors").read_bytes()
    with torch.no_grad():
        model.q.B.add_(1.0)
    with pytest.raises(FileExistsError, match=r"overwrite=True"):
        lr.save_adapters(model, path)
    assert (path / "adapter.safetensors").read_bytes() == before, "refused save changed the file"
    lr.save_adapters(model, path, overwrite=True)
    assert (path / "adapter.safetensors").read_bytes() != before
    fresh = lr.load_adapters(TinyNet(), path)
    assert torch.equal(fresh.q.B, model.q.B)
    # no temporary or backup directory is left next to the destination
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


def test_save_refuses_an_existing_plain_directory(tmp_path):
    _, model = trained("lora", {})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"exists; pass overwrite=True"):
        lr.save_adapters(model, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_saving_over_a_file_is_refused_and_keeps_the_file(tmp_path):
    """overwrite=True replaces an adapter directory, not a file: the file was renamed aside
    and the save then failed on it, leaving a hidden copy and the adapter in its place."""
    (tmp_path / "ad").write_text("keep me")
    model = lr.inject(TinyNet(), "lora", targets=["q", "v"], rank=2)
    for save in (lr.save_adapters, lr.io.to_peft):
        with pytest.raises(FileExistsError, match=r"ad is a file, not an adapter directory"):
            save(model, tmp_path / "ad", overwrite=True)
    assert (tmp_path / "ad").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


def test_save_load_with_a_shared_linear(tmp_path):
    pristine = Net(share=True)
    model = lr.inject(fresh_copy(pristine), "lora", targets=["shared", "q"], rank=2)
    perturb(model)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        y = model.eval()(x)
    lr.save_adapters(model, tmp_path / "ad")
    fresh = lr.load_adapters(fresh_copy(pristine), tmp_path / "ad").eval()
    assert fresh.blocks[0].shared is fresh.blocks[1].shared
    with torch.no_grad():
        assert torch.equal(fresh(x), y)


# ----------------------------------------------------------------------------- damaged configs
def _pop(*keys):
    """Remove config[keys[0]]...[keys[-1]]."""

    def damage(cfg):
        for k in keys[:-1]:
            cfg = cfg[k]
        cfg.pop(keys[-1])

    return damage


def _set(value, *keys):
    def damage(cfg):
        for k in keys[:-1]:
            cfg = cfg[k]
        cfg[keys[-1]] = value

    return damage


DAMAGED = {
    "no-layers": (_pop("layers"), r"has no 'layers'"),
    "layers-not-a-mapping": (_set([1], "layers"), r"'layers' is \[1\], not a mapping of layer names"),
    "layer-not-a-mapping": (_set(3, "layers", "v"), r"layer 'v' is 3, not a mapping"),
    **{
        f"no-{key}": (_pop("layers", "v", key), rf"layer 'v' has no '{key}'")
        for key in ("variant", "options", "in_features", "out_features", "tensors")
    },
    "in_features-not-an-integer": (
        _set("10", "layers", "v", "in_features"),
        r"layer 'v' has in_features='10', not an integer",
    ),
    "options-not-a-mapping": (
        _set(None, "layers", "v", "options"),
        r"layer 'v' has options=None, not a mapping of options",
    ),
    "shape-not-sizes": (
        _set([2, "x"], "layers", "v", "tensors", "A"),
        r"tensor v::A has shape \[2, 'x'\], not a list of sizes",
    ),
    "modules_to_save-not-a-list": (
        _set("out", "modules_to_save"),
        r"modules_to_save is 'out', not a list of module names",
    ),
}


@pytest.mark.parametrize("kind", DAMAGED)
def test_a_damaged_config_names_the_key_and_the_fix(kind, tmp_path):
    """One AdapterFileError sentence naming the file, the key and the fix (not a bare KeyError),
    from load_adapters and from `lowrank inspect`, which reads the same files."""
    from lowrank.inspection import inspect_adapter

    damage, message = DAMAGED[kind]
    _, model = trained("lora", {})
    path = lr.save_adapters(model, tmp_path / "ad")
    cfg = json.loads((path / "adapter_config.json").read_text())
    damage(cfg)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    full = rf"adapter_config.json: {message}; re-save the adapter with lr.save_adapters$"
    with pytest.raises(lr.AdapterFileError, match=full):
        lr.load_adapters(TinyNet(), path)
    with pytest.raises(lr.AdapterFileError, match=full):
        inspect_adapter(path)


def test_a_file_with_tensors_its_config_does_not_list_is_refused(tmp_path):
    """Extra tensors used to load silently (and be ignored)."""
    _, model = trained("lora", {})
    path = lr.save_adapters(model, tmp_path / "ad")
    tensors = load_file(path / "adapter.safetensors")
    save_file({**tensors, "v::extra": torch.zeros(3)}, path / "adapter.safetensors")
    with pytest.raises(
        lr.AdapterFileError, match=r"holds tensor 'v::extra', which adapter_config.json does not list"
    ):
        lr.load_adapters(TinyNet(), path)


# ----------------------------------------------------------------------------- meta device
def test_saving_a_meta_model_says_it_has_no_data_and_writes_nothing(tmp_path):
    with torch.device("meta"):
        model = nn.Sequential(OrderedDict(q=nn.Linear(8, 10), v=nn.Linear(10, 10)))
    lr.inject(model, "lora", targets=["q", "v"], rank=2)
    assert model.q.A.is_meta
    fix = r"has no data yet; materialise the model first \(e.g. model.to_empty\(device='cpu'\)"
    with pytest.raises(ValueError, match=rf"tensor q::A is on the meta device and {fix}"):
        lr.save_adapters(model, tmp_path / "ad")
    with pytest.raises(ValueError, match=r"base_model.model.q.lora_A.weight is on the meta device"):
        lr.io.to_peft(model, tmp_path / "peft")
    assert list(tmp_path.iterdir()) == [], "a refused save left files behind"
    model.to_empty(device="cpu")  # the fix: real storage (then load the weights into it)
    assert lr.save_adapters(model, tmp_path / "ad").is_dir()


def test_saved_directories_get_the_permissions_of_a_plain_mkdir(tmp_path):
    """Both writers built the directory with tempfile.mkdtemp, whose 0700 was renamed into
    place: an adapter the other users of a shared machine could not read."""
    (tmp_path / "plain").mkdir()
    plain = stat.S_IMODE((tmp_path / "plain").stat().st_mode)  # what the umask allows
    model = lr.inject(TinyNet(), "lora", targets=["q", "v"], rank=2)
    for path in (lr.save_adapters(model, tmp_path / "ad"), lr.io.to_peft(model, tmp_path / "peft")):
        assert stat.S_IMODE(path.stat().st_mode) == plain, path.name
