"""Bad input fails with one clear sentence that names the offending value and the fix."""

import json
import re

import pytest
import torch
from adapter_cases import IN, OUT, TinyNet, formula, perturb, pretrained_linear
from torch import nn

import lowrank as lr
from lowrank import linalg as la

# ----------------------------------------------------------------------------- ranks


@pytest.mark.parametrize("rank", [0, -1, 2.5])
@pytest.mark.parametrize("name", lr.variants())
def test_invalid_rank(name, rank):
    # ranks above min(out, in): tests/test_overcomplete.py
    lin = pretrained_linear()
    if not lr.variant_class(name).takes_rank:
        # documented: rank is accepted for a uniform interface and ignored
        ad = lr.make(name, lin, rank=rank)
        assert ad.num_trainable() == sum(
            torch.Size(s).numel() for s in formula(name)(OUT, IN, 1, True).values()
        )
        return
    msg = (
        rf"rank={re.escape(repr(rank))} is invalid for a {OUT}x{IN} layer with variant "
        rf"'{name}'; choose an integer rank (of at least 1|between 1 and \d+)$"
    )
    with pytest.raises(ValueError, match=msg):
        lr.make(name, lin, rank=rank)
    with pytest.raises(ValueError, match=rf"rank={rank!r} is invalid for a 10x8 layer"):
        lr.inject(TinyNet(), name, targets=["q"], rank=rank)


@pytest.mark.parametrize("name", lr.variants())
def test_largest_rank_is_accepted(name):
    lr.make(name, pretrained_linear(), rank=min(OUT, IN))


def test_invalid_rank_in_linalg():
    W = torch.randn(5, 3, dtype=torch.float64)
    for fn in (la.truncated_svd, la.eckart_young_error):
        with pytest.raises(ValueError, match=r"rank r=4 is invalid for a 5x3 matrix.*1 and 3"):
            fn(W, 4)
        with pytest.raises(ValueError, match=r"rank r=0 is invalid"):
            fn(W, 0)
    with pytest.raises(ValueError, match=r"rank r=0 is invalid"):
        la.fit_uv(W, 0, 0.1)


# ----------------------------------------------------------------------------- other options


def test_invalid_options():
    lin = pretrained_linear()
    with pytest.raises(ValueError, match=r"dropout=1.5 is not in \[0, 1\)"):
        lr.make("lora", lin, rank=2, dropout=1.5)
    with pytest.raises(ValueError, match=r"alpha=-1 must be a positive number"):
        lr.make("lora", lin, rank=2, alpha=-1)
    with pytest.raises(ValueError, match=r"svd='qr' is unknown; use 'exact' or 'randomized'"):
        lr.make("pissa", lin, rank=2, svd="qr")
    with pytest.raises(ValueError, match=r"randomized.*largest triplets only"):
        lr.make("milora", lin, rank=2, svd="randomized")
    with pytest.raises(ValueError, match=r"init='svd' is unknown"):
        lr.make("frobenius", lin, rank=2, init="svd")
    with pytest.raises(ValueError, match=r"lam=-0.1 must be a non-negative"):
        lr.make("frobenius", lin, rank=2, lam=-0.1)
    with pytest.raises(ValueError, match=r"lam=-1 must be a non-negative"):
        la.frobenius_lowrank(torch.eye(3), 1, -1)
    with pytest.raises(ValueError, match=r"tau=-1 must be a non-negative"):
        la.svt(torch.eye(3), -1)
    with pytest.raises(ValueError, match=r"method='qr' is unknown"):
        la.truncated_svd(torch.eye(3), 1, method="qr")


# ----------------------------------------------------------------------------- variant names


def test_unknown_variant_lists_the_known_names():
    names = lr.variants()
    assert names == sorted(names) and "lora" in names
    listing = re.escape(", ".join(names))
    with pytest.raises(ValueError, match=rf"unknown variant 'lorax'; choose one of: {listing}"):
        lr.make("lorax", pretrained_linear())
    model = TinyNet()
    with pytest.raises(ValueError, match=rf"unknown variant 'lorax'.*{listing}"):
        lr.inject(model, "lorax", targets=["q"])
    assert not lr.adapters(model)


# ----------------------------------------------------------------------------- targets


class WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.conv = nn.Conv1d(4, 4, 1)
        self.out = nn.Linear(4, 2)


def test_target_matching_nothing_lists_the_linear_modules():
    model = TinyNet()
    with pytest.raises(
        ValueError,
        match=r"target 'query' matches no module; "
        r"Linear modules are: q, v, out",
    ):
        lr.inject(model, "lora", targets=["query"])
    pattern = r"x\.\d"
    with pytest.raises(
        ValueError, match=re.escape(f"target {pattern!r} matches no module; Linear modules are: q, v, out")
    ):
        lr.inject(model, "lora", targets=[pattern])
    with pytest.raises(ValueError, match=r"targets is empty"):
        lr.inject(model, "lora", targets=[])
    with pytest.raises(ValueError, match=r"modules_to_save entry 'head' matches no module"):
        lr.inject(model, "lora", targets=["q"], modules_to_save=["head"])
    assert not lr.adapters(model), "a failed inject left adapters behind"
    assert all(p.requires_grad for p in model.parameters()), "a failed inject froze the model"


@pytest.mark.parametrize(("target", "kind"), [("norm", "LayerNorm"), ("conv", "Conv1d")])
def test_non_linear_target(target, kind):
    model = WithNorm()
    with pytest.raises(
        TypeError,
        match=rf"target '{target}' matches '{target}', a {kind}, "
        r"not an nn.Linear.*Linear modules are: q, out",
    ):
        lr.inject(model, "lora", targets=["q", target])
    assert not lr.adapters(model)


@pytest.mark.parametrize("name", lr.variants())
def test_make_refuses_a_non_linear_module(name):
    with pytest.raises(TypeError, match=r"wraps an nn.Linear, got Conv2d; pass a Linear layer"):
        lr.make(name, nn.Conv2d(3, 4, 3))


def test_all_linear_that_selects_nothing():
    with pytest.raises(
        ValueError,
        match=r"'all-linear' selects no module: the model has no "
        r"nn.Linear modules \(lowrank adapts nn.Linear only",
    ):
        lr.inject(nn.Sequential(nn.Conv1d(3, 3, 1)), "lora", targets="all-linear", rank=1)
    model = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(
        ValueError,
        match=r"'all-linear' selects no module: its nn.Linear modules "
        r"are inside modules_to_save \(0\), which it leaves "
        r"out; name the targets explicitly",
    ):
        lr.inject(model, "lora", targets="all-linear", modules_to_save=["0"], rank=1)
    assert type(model[0]) is nn.Linear and model[0].weight.requires_grad


def test_inject_twice():
    model = lr.inject(TinyNet(), "lora", targets=["q"], rank=2)
    with pytest.raises(ValueError, match=r"already has adapters \(e.g. 'q'\).*lr.strip\(model\)"):
        lr.inject(model, "lora", targets=["v"], rank=2)
    assert sorted(lr.adapters(model)) == ["q"]


# ----------------------------------------------------------------------------- adapter files


def saved(tmp_path, name="lora", rank=2, model=None):
    model = model or TinyNet()
    lr.inject(model, name, targets=["q", "v"], rank=rank)
    perturb(model)
    return lr.save_adapters(model, tmp_path / f"{name}-r{rank}")


def snapshot(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    return state, grads, type(model.q), type(model.v)


def assert_unchanged(model, snap):
    state, grads, tq, tv = snap
    assert (type(model.q), type(model.v)) == (tq, tv), "a failed load replaced modules"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads, (
        "a failed load changed which parameters train"
    )
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state), "a failed load changed tensors"


def test_load_for_other_shapes(tmp_path):
    path = saved(tmp_path)  # TinyNet(d=8): q is 10x8
    other = TinyNet(d=5)
    snap = snapshot(other)
    with pytest.raises(
        lr.AdapterFileError, match=r"layer 'q' is 10x5 here but 10x8 in the file; load it into the model"
    ):
        lr.load_adapters(other, path)
    assert_unchanged(other, snap)


def test_load_into_a_model_without_the_layer(tmp_path):
    path = saved(tmp_path)
    other = nn.Sequential()
    other.add_module("v", nn.Linear(10, 10))
    with pytest.raises(lr.AdapterFileError, match=r"adapts layer 'q', which this model does not"):
        lr.load_adapters(other, path)


@pytest.mark.parametrize("name", lr.variants())
def test_load_for_another_variant(name, tmp_path):
    path = saved(tmp_path, name)
    other_name = next(v for v in lr.variants() if v != name)
    model = lr.inject(TinyNet(), other_name, targets=["q", "v"], rank=2)
    snap = snapshot(model)
    with pytest.raises(
        lr.AdapterFileError, match=rf"layer 'q' holds a '{other_name}' adapter but the file has '{name}'"
    ):
        lr.load_adapters(model, path)
    assert_unchanged(model, snap)


def test_load_for_another_rank(tmp_path):
    path = saved(tmp_path, "lora", rank=2)
    model = lr.inject(TinyNet(), "lora", targets=["q", "v"], rank=3)
    snap = snapshot(model)
    with pytest.raises(lr.AdapterFileError, match=r"layer 'q' holds a 'lora' adapter.*but the file has"):
        lr.load_adapters(model, path)
    assert_unchanged(model, snap)


def corrupt_truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def corrupt_garbage(p):
    p.write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00{not json at all}" + bytes(64))


def corrupt_empty(p):
    p.write_bytes(b"")


def corrupt_huge_header(p):
    p.write_bytes((2**62).to_bytes(8, "little") + b"{}")


@pytest.mark.parametrize(
    "corrupt",
    [corrupt_truncate, corrupt_garbage, corrupt_empty, corrupt_huge_header],
    ids=["truncated", "garbage", "empty", "huge-header"],
)
def test_damaged_safetensors_file(corrupt, tmp_path):
    path = saved(tmp_path)
    corrupt(path / "adapter.safetensors")
    model = TinyNet()
    snap = snapshot(model)
    with pytest.raises(lr.AdapterFileError, match=r"adapter.safetensors is damaged.*re-save"):
        lr.load_adapters(model, path)
    assert_unchanged(model, snap)


def test_damaged_or_missing_config(tmp_path):
    path = saved(tmp_path)
    cfg = path / "adapter_config.json"
    good = cfg.read_text()
    cfg.write_text(good[: len(good) // 2])
    with pytest.raises(lr.AdapterFileError, match=r"adapter_config.json is not valid JSON"):
        lr.load_adapters(TinyNet(), path)
    cfg.write_text(json.dumps({**json.loads(good), "version": 99}))
    with pytest.raises(lr.AdapterFileError, match=r"format version 99.*upgrade lowrank or re-save"):
        lr.load_adapters(TinyNet(), path)
    cfg.write_text(json.dumps({"hello": 1}))
    with pytest.raises(lr.AdapterFileError, match=r"is not a lowrank adapter config"):
        lr.load_adapters(TinyNet(), path)
    cfg.unlink()
    with pytest.raises(lr.AdapterFileError, match=r"is not a lowrank adapter directory"):
        lr.load_adapters(TinyNet(), path)
    with pytest.raises(lr.AdapterFileError, match=r"is not a lowrank adapter directory"):
        lr.load_adapters(TinyNet(), tmp_path / "nowhere")


def test_save_without_adapters(tmp_path):
    with pytest.raises(ValueError, match=r"no adapters to save; call lr.inject"):
        lr.save_adapters(TinyNet(), tmp_path / "ad")
    assert not (tmp_path / "ad").exists()


# ----------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_matrix(bad):
    W = torch.randn(6, 4, dtype=torch.float64)
    W[2, 1] = bad
    for call in (
        lambda: la.fit_uv(W, 2, 0.1, steps=10),
        lambda: la.truncated_svd(W, 2),
        lambda: la.svt(W, 0.1),
        lambda: la.frobenius_lowrank(W, 2, 0.1),
        lambda: la.nuclear_norm(W),
        lambda: la.eckart_young_error(W, 2),
    ):
        with pytest.raises(ValueError, match=r"W contains NaN or inf; clean the matrix"):
            call()


def test_fit_uv_bad_settings():
    W = torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"steps=0 must be a positive integer"):
        la.fit_uv(W, 2, 0.1, steps=0)
    with pytest.raises(ValueError, match=r"lr=-1 must be a positive step size"):
        la.fit_uv(W, 2, 0.1, lr=-1)
    with pytest.raises(FloatingPointError, match=r"fit_uv diverged.*use a smaller lr"):
        la.fit_uv(W, 2, 0.1, lr=10.0, steps=200)
    with pytest.raises(ValueError, match=r"must be a 2-D tensor, got \(6, 4, 1\)"):
        la.fit_uv(W[..., None], 2, 0.1)
