"""save_adapters / load_adapters: exact round trips for every variant, the file format, overwrite."""

import json

import pytest
import torch
from adapter_cases import Net, TinyNet, cases, fresh_copy, perturb
from safetensors import safe_open

import lowrank as lr

CASES = cases()
X = torch.randn(7, 8, generator=torch.Generator().manual_seed(5))


def trained(name, options, seed=0, pristine=None):
    """(pristine model, adapted model with every trainable tensor moved off its init)."""
    pristine = pristine or TinyNet()
    model = fresh_copy(pristine)
    lr.inject(model, name, targets=["q", "v"], modules_to_save=["out"], rank=2, alpha=4.0,
              seed=seed, **options)
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
    other = lr.inject(fresh_copy(pristine), name, targets=["q", "v"], modules_to_save=["out"],
                      rank=2, alpha=4.0, seed=1, **options)
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
        "after load_adapters the model must train what the saved model trained (to resume)")


@pytest.mark.parametrize("name", lr.variants())
def test_load_into_same_variant_with_other_alpha_is_exact_or_refused(name, tmp_path):
    """The file records alpha; an adapter built with another alpha must not silently use its own
    scale (the outputs would differ from the saved model's)."""
    _, model = trained(name, {})
    with torch.no_grad():
        y = model(X)
    lr.save_adapters(model, tmp_path / "ad")
    other = lr.inject(TinyNet(), name, targets=["q", "v"], modules_to_save=["out"],
                      rank=2, alpha=1.0)
    try:
        lr.load_adapters(other, tmp_path / "ad")
    except lr.AdapterFileError as e:
        assert "alpha" in str(e)
        return
    with torch.no_grad():
        got = other.eval()(X)
    assert torch.equal(got, y), (
        f"loaded into a {name!r} adapter with alpha=1 from a file saved with alpha=4: outputs "
        f"differ by {float((got - y).abs().max()):.3g} and no error was raised")


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
