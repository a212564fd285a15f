"""inject / find_targets / adapters / num_trainable / merge_all / unmerge_all / strip on a nested model."""

import pytest
import torch
from adapter_cases import Net, assert_close, perturb
from torch import nn

import lowrank as lr


def x_in(dtype=torch.float64):
    return torch.randn(5, 4, generator=torch.Generator().manual_seed(11), dtype=dtype)


def all_linear_sites(model):
    """(qualified name, module) of every place that holds a Linear or an Adapter, duplicates kept."""
    return [
        (n, m)
        for n, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, (nn.Linear, lr.Adapter)) and not n.endswith(".base")
    ]


# ----------------------------------------------------------------------------- matching


def test_suffix_target_matches_whole_trailing_parts_only():
    net = Net()
    assert lr.find_targets(net, "q") == ["blocks.0.q", "blocks.1.q"]
    assert lr.find_targets(net, ["query"]) == ["blocks.0.query", "blocks.1.query"]
    lr.inject(net, "lora", targets=["q"], rank=2)
    for block in net.blocks:
        assert isinstance(block.q, lr.Adapter)
        assert type(block.query) is nn.Linear, "'q' must not match 'query'"
        assert type(block.v) is nn.Linear
    assert sorted(lr.adapters(net)) == ["blocks.0.q", "blocks.1.q"]


def test_regex_target_uses_fullmatch():
    net = Net()
    assert lr.find_targets(net, r"blocks\.\d+\.mlp\.0") == ["blocks.0.mlp.0", "blocks.1.mlp.0"]
    assert lr.find_targets(net, r"blocks\.0\.(q|v)") == ["blocks.0.q", "blocks.0.v"]
    # a search would find 'mlp.0' inside 'blocks.0.mlp.0'; fullmatch must not
    with pytest.raises(ValueError, match=r"matches no module"):
        lr.find_targets(net, r"mlp\.0")
    lr.inject(net, "lora", targets=[r"blocks\.\d+\.mlp\.0"], rank=2)
    assert sorted(lr.adapters(net)) == ["blocks.0.mlp.0", "blocks.1.mlp.0"]
    assert type(net.blocks[0].mlp[2]) is nn.Linear


def test_all_linear_takes_every_linear_but_modules_to_save():
    # A plain nn.Module has no output embedding layer: PEFT's all-linear then takes every Linear,
    # the last one included (the Hugging Face models are in tests/test_all_linear.py).
    net = Net()
    linear = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    assert linear[-1] == "head"
    assert lr.find_targets(net, "all-linear") == linear
    assert lr.find_targets(net, "all-linear", modules_to_save=["head"]) == linear[:-1]
    assert lr.find_targets(net, "all-linear", modules_to_save=["blocks"]) == ["embed", "head"]
    lr.inject(net, "lora", targets="all-linear", modules_to_save=["head"], rank=2)
    assert sorted(lr.adapters(net)) == sorted(linear[:-1])
    assert type(net.head) is nn.Linear and net.head.weight.requires_grad


def test_modules_to_save_are_never_targets():
    # PEFT: "Adapters should never match on modules to save" -- a pattern that also hits a module
    # inside modules_to_save takes the others; one that hits nothing else is an error.
    net = Net()
    assert lr.find_targets(net, ["q", "0"], modules_to_save=["blocks.1"]) == ["blocks.0.q", "blocks.0.mlp.0"]
    with pytest.raises(
        ValueError,
        match=r"target '1.q' matches only modules inside "
        r"modules_to_save \(blocks.1.q\), which train whole",
    ):
        lr.inject(net, "lora", targets=["1.q"], modules_to_save=["blocks.1"], rank=2)
    assert not lr.adapters(net)


def test_shared_linear_is_wrapped_once_and_used_everywhere():
    pristine = Net(share=True)
    assert pristine.blocks[0].shared is pristine.blocks[1].shared
    net = Net(share=True)
    x = x_in()
    lr.inject(net, "lora", targets=["shared"], rank=2)
    a0, a1 = net.blocks[0].shared, net.blocks[1].shared
    assert isinstance(a0, lr.Adapter) and isinstance(a1, lr.Adapter), (
        f"the shared Linear is wrapped at blocks.0 ({type(a0).__name__}) but blocks.1 holds "
        f"a {type(a1).__name__}: both uses must hold the same adapter"
    )
    assert a0 is a1
    assert len(lr.adapters(net)) == 1
    perturb(net)
    # the adapter's ΔW acts at both places: compare with the plain model given W₀ + ΔW
    with torch.no_grad():
        pristine.blocks[0].shared.weight.copy_(a0.merged_weight())
        assert_close(net.eval()(x), pristine.eval()(x), torch.float64, "shared adapter")


def test_shared_linear_with_all_linear_is_wrapped_everywhere():
    net = Net(share=True)
    lr.inject(net, "lora", targets="all-linear", modules_to_save=["head"], rank=2)
    plain = [n for n, m in all_linear_sites(net) if type(m) is nn.Linear]
    assert plain == ["head"], f"Linear sites left unwrapped by 'all-linear': {plain}"


# ----------------------------------------------------------------------------- freezing


def test_modules_to_save_train_fully_and_everything_else_is_frozen():
    net = Net()
    out = lr.inject(net, "lora", targets=["q", "v"], modules_to_save=["head"], rank=2)
    assert out is net
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    expected = {f"blocks.{i}.{t}.{f}" for i in (0, 1) for t in ("q", "v") for f in ("A", "B")}
    expected |= {"head.weight", "head.bias"}
    assert trainable == expected
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    perturb(net)  # B ≠ 0 so that A trains as well
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    net(x_in()).square().sum().backward()
    opt.step()
    for n, p in net.named_parameters():
        assert (not torch.equal(p, before[n])) is (n in expected), n


def test_num_trainable_counts_adapters_and_modules_to_save_once_each():
    net = Net(share=True)  # d = 6, 3 classes; one Linear shared by both blocks
    assert lr.num_trainable(net) == sum(p.numel() for p in net.parameters())  # nothing frozen yet
    lr.inject(net, "lora", targets=["shared"], modules_to_save=["head"], rank=2)
    lora = 2 * (6 + 6)  # A: r×in, B: out×r, once for the shared adapter, not per use
    head = 6 * 3 + 3
    assert lr.num_trainable(net) == lora + head
    assert lr.num_trainable(net) == sum(a.num_trainable() for a in lr.adapters(net).values()) + head


def test_inject_passes_options_and_derives_distinct_layer_seeds():
    net = Net()
    lr.inject(net, "lora", targets=["q"], rank=3, alpha=12, seed=5)
    a0, a1 = net.blocks[0].q, net.blocks[1].q
    assert a0.rank == a1.rank == 3 and a0.scale == 4.0
    assert not torch.equal(a0.A, a1.A), "two layers of one shape got the same random init"
    again = lr.inject(Net(), "lora", targets=["q"], rank=3, alpha=12, seed=5)
    assert torch.equal(again.blocks[0].q.A, a0.A), "inject is not reproducible for a seed"


# ----------------------------------------------------------------------------- whole model


@pytest.mark.parametrize("name", lr.variants())
def test_merge_all_unmerge_all_and_strip(name):
    net = Net()
    x = x_in()
    lr.inject(net, name, targets="all-linear", rank=2)
    ads = lr.adapters(net)
    assert ads and all(isinstance(a, lr.Adapter) and a.name == name for a in ads.values())
    perturb(net)
    net.eval()
    with torch.no_grad():
        y = net(x)
        weights = {n: a.base.weight.detach().clone() for n, a in ads.items()}
        assert lr.merge_all(net) is net
        assert all(a.merged for a in ads.values())
        assert_close(net(x), y, torch.float64, "merge_all")
        assert lr.unmerge_all(net) is net
        assert not any(a.merged for a in ads.values())
        for n, a in ads.items():
            assert torch.equal(a.base.weight, weights[n]), n
        assert torch.equal(net(x), y)
        merged = {n: a.merged_weight().clone() for n, a in ads.items()}
        assert lr.strip(net) is net
    assert not lr.adapters(net)
    assert not any(isinstance(m, lr.Adapter) for m in net.modules())
    for n in ads:
        lin = net.get_submodule(n)
        assert type(lin) is nn.Linear
        assert torch.equal(lin.weight, merged[n]), n
    with torch.no_grad():
        assert_close(net(x), y, torch.float64, "strip")


@pytest.mark.parametrize("name", lr.variants())
def test_strip_of_a_merged_model(name):
    net = Net()
    x = x_in()
    lr.inject(net, name, targets=["q", r"blocks\.\d\.mlp\.2"], rank=2)
    perturb(net)
    net.eval()
    with torch.no_grad():
        y = net(x)
        lr.merge_all(net)
        lr.strip(net)
        assert not lr.adapters(net)
        assert_close(net(x), y, torch.float64, "strip after merge_all")


def test_a_dotted_trailing_part_matches_as_a_suffix():
    import torch.nn as nn

    model = nn.Module()
    model.enc = nn.Module()
    model.enc.attention = nn.Module()
    model.enc.attention.query = nn.Linear(4, 4)
    model.enc.query = nn.Linear(4, 4)
    model.head = nn.Linear(4, 2)
    lr.inject(model, "lora", targets=["attention.query"], rank=1)
    assert list(lr.adapters(model)) == ["enc.attention.query"]
