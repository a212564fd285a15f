"""Tasks: registry, splits, pretrained copies, one adapted training step, metrics, cache, safety.

Every task is built with options that make pretraining tiny, in a temporary cache directory.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import lowrank as lr
import lowrank.tasks as tasks
from lowrank.tasks.base import split_indices

TINY = {
    "synthetic": {"n_train": 512, "n_dev": 128, "n_test": 128},
    "digits": {"pretrain_steps": 30},
    "mnist": {"n_train": 256, "n_eval": 200, "pretrain_steps": 20, "hidden": 64},
    "text": {"max_train": 12, "max_eval": 10, "max_length": 16},
    "charlm": {
        "max_chars": 20_000,
        "seq_len": 16,
        "embed_dim": 8,
        "hidden": 16,
        "pretrain_steps": 5,
        "n_train": 64,
    },
}
HEADLINE = {
    "synthetic": "delta_error",
    "digits": "accuracy",
    "mnist": "accuracy",
    "text": "accuracy",
    "charlm": "perplexity",
}


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory):
    """A fresh, empty weight cache for this module."""
    path = tmp_path_factory.mktemp("lowrank-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOWRANK_CACHE", str(path))
        yield path


_built: dict[str, tasks.Task] = {}


def tiny(name: str) -> tasks.Task:
    """The task with tiny options, built once per test session."""
    if name not in _built:
        _built[name] = tasks.get(name, **TINY[name])
    return _built[name]


# ---------------------------------------------------------------------- registry and options
def test_registry_names_and_unknown_name():
    assert tasks.names() == ["charlm", "digits", "mnist", "synthetic", "text"]
    with pytest.raises(ValueError, match="unknown task 'nope'.*charlm, digits, mnist"):
        tasks.get("nope")


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("synthetic", {"bogus": 1}, "option 'bogus' is unknown for task 'synthetic'"),
        ("synthetic", {"planted_rank": 0}, "planted_rank=0"),
        ("synthetic", {"planted_rank": 65}, "planted_rank=65"),
        ("synthetic", {"layers": ["fc9"]}, "layers="),
        ("synthetic", {"scale": -1.0}, "scale=-1.0"),
        ("digits", {"pretrain_steps": 0}, "pretrain_steps=0"),
        ("mnist", {"shift": "flip"}, "shift='flip' is unknown; choose one of 'rotate', 'permute'"),
        ("mnist", {"n_train": 60_000}, "n_train=60000"),
        ("text", {"dataset": "imdb"}, "dataset='imdb'"),
        ("charlm", {"source": "news", "target": "news"}, "both 'news'"),
        ("charlm", {"target": "kites"}, "target='kites'"),
    ],
)
def test_bad_options_fail_with_one_clear_sentence(name, options, match):
    with pytest.raises(ValueError, match=match):
        tasks.get(name, **options)


def test_unknown_split_name():
    with pytest.raises(ValueError, match="split 'val' is unknown; use one of train, dev, test"):
        tiny("synthetic").split("val")


# ---------------------------------------------------------------------- every task
@pytest.mark.parametrize("name", sorted(TINY))
def test_interface_attributes(name):
    task = tiny(name)
    assert task.name == name and task.metric == HEADLINE[name]
    assert isinstance(task.higher_is_better, bool)
    assert isinstance(task.targets, (str, list)) and isinstance(task.modules_to_save, list)
    assert lr.find_targets(task.pretrained(), task.targets)  # the default targets resolve


@pytest.mark.parametrize("name", sorted(TINY))
def test_splits_are_deterministic_and_sized(name):
    a, b = tiny(name), tasks.get(name, **TINY[name])
    sizes = []
    for split in ("train", "dev", "test"):
        da, db = a.split(split), b.split(split)
        assert isinstance(da, torch.utils.data.TensorDataset) and len(da) > 0
        assert all(torch.equal(x, y) for x, y in zip(da.tensors, db.tensors, strict=True))
        sizes.append(len(da))
    assert a.split("train") is a.split("train")  # built once


@pytest.mark.parametrize("name", sorted(TINY))
def test_pretrained_returns_fresh_identical_copies(name):
    task = tiny(name)
    torch.manual_seed(123)  # the run seed must not matter
    m1 = task.pretrained()
    torch.manual_seed(456)
    m2 = task.pretrained()
    assert m1 is not m2 and m1.training and m2.training
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    p1 = next(m1.parameters())
    with torch.no_grad():
        p1.add_(1.0)
    assert not torch.equal(p1, next(m2.parameters()))
    assert torch.equal(next(task.pretrained().parameters()), next(m2.parameters()))


@pytest.mark.parametrize("name", sorted(TINY))
def test_one_lora_step_changes_loss_and_evaluate_reports_metric(name):
    task = tiny(name)
    model = lr.inject(
        task.pretrained(), "lora", targets=task.targets, modules_to_save=task.modules_to_save, rank=2
    )
    model.eval()  # no dropout: the two losses are comparable
    batch = tuple(t[:8] for t in task.split("train").tensors)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    loss0 = task.loss(model, batch)
    assert loss0.ndim == 0 and torch.isfinite(loss0)
    loss0.backward()
    opt.step()
    with torch.no_grad():
        loss1 = task.loss(model, batch)
    assert loss1.item() < loss0.item()
    model.train()
    next(iter(lr.adapters(model).values())).eval()  # a mixed state
    modes = [m.training for m in model.modules()]
    result = task.evaluate(model, "dev", batch_size=64)
    assert [m.training for m in model.modules()] == modes  # restored per module
    assert task.metric in result
    assert all(isinstance(v, float) and math.isfinite(v) for v in result.values())


@pytest.mark.parametrize("name", [n for n in sorted(TINY) if HEADLINE[n] == "accuracy"])
def test_classifiers_score_every_example_in_split_order_and_accuracy_is_their_mean(name):
    task = tiny(name)
    model = task.pretrained()
    if name == "text":  # the fresh head barely separates the classes; a random one does
        torch.nn.init.normal_(model.classifier.weight, std=1.0, generator=torch.Generator().manual_seed(0))
    tensors = task.split("test").tensors
    with torch.no_grad():  # one batch, split order, no length sorting: the independent answer
        direct = model.eval()(*tensors[:-1]).argmax(-1)
    pred = task.predict(model.train(), "test", batch_size=4)  # several chunks
    assert len(set(direct.tolist())) > 1  # predictions vary, so a shuffled order would show
    assert torch.equal(pred, direct)
    correct = task.correct(model, "test", batch_size=4)
    assert correct.dtype == torch.bool and torch.equal(correct, direct == tensors[-1])
    # the same scores behind both: equal as floats, not merely close
    assert task.evaluate(model, "test", batch_size=4)["accuracy"] == float(correct.float().mean())
    assert model.training  # modes restored


def test_only_classifiers_have_per_example_scores():
    for name in sorted(TINY):
        assert isinstance(tiny(name), tasks.HasPerExampleScores) == (HEADLINE[name] == "accuracy")


@pytest.mark.parametrize("name", sorted(TINY))
def test_loss_with_perturbation_moves_z(name):
    task = tiny(name)
    model = task.pretrained().eval()
    batch = tuple(t[:4] for t in task.split("train").tensors)
    seen = {}

    def perturb(z, loss_of):
        seen["z"] = z
        probe = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_of(probe), probe)
        return z + 0.1 * g.sign()

    clean, adv = task.loss(model, batch), task.loss(model, batch, perturb=perturb)
    assert seen["z"].is_floating_point() and adv.item() > clean.item()


# ---------------------------------------------------------------------- synthetic
def test_synthetic_delta_error_one_at_init_zero_when_planted_exactly():
    task = tiny("synthetic")
    k = task.planted_rank
    model = lr.inject(task.pretrained(), "lora", targets=task.targets, rank=k)
    assert task.analysis(model)["delta_error"] == pytest.approx(1.0)
    assert task.evaluate(model, "test")["rel_mse"] == pytest.approx(1.0)
    with torch.no_grad():
        for layer, dw in task.planted.items():
            ad = lr.adapters(model)[layer]
            U, S, Vh = torch.linalg.svd(dw.double())
            ad.B.copy_(U[:, :k] * S[:k].sqrt())
            ad.A.copy_(S[:k].sqrt()[:, None] * Vh[:k])
    assert task.analysis(model)["delta_error"] < 1e-5
    assert task.evaluate(model, "test")["mse"] < 1e-9
    lr.strip(model)  # plain Linear layers: ΔW = W − W₀
    assert task.analysis(model)["delta_error"] < 1e-5


def test_synthetic_planted_rank_scale_and_eckart_young_floor():
    task = tiny("synthetic")
    ((layer, dw),) = task.planted.items()
    assert layer == "fc2" and task.targets == ["fc2"]
    assert torch.linalg.matrix_rank(dw).item() == task.planted_rank
    assert dw.norm() / task.w0["fc2"].norm() == pytest.approx(task.scale, rel=1e-5)
    assert task.floor(0) == pytest.approx(1.0) and task.floor(task.planted_rank) < 1e-6
    # the best rank-(k-1) update, written into an adapter, sits exactly on the floor
    r = task.planted_rank - 1
    model = lr.inject(task.pretrained(), "lora", targets=task.targets, rank=r)
    U, S, Vh = torch.linalg.svd(dw.double())
    with torch.no_grad():
        lr.adapters(model)[layer].B.copy_(U[:, :r] * S[:r])
        lr.adapters(model)[layer].A.copy_(Vh[:r])
    assert task.analysis(model)["delta_error"] == pytest.approx(task.floor(r), rel=1e-5)


def test_synthetic_splits_disjoint_and_several_layers():
    task = tiny("synthetic")
    xs = torch.cat([task.split(s).tensors[0] for s in ("train", "dev", "test")])
    assert len(torch.unique(xs, dim=0)) == len(xs)
    two = tasks.get("synthetic", layers=["fc1", "fc2"], n_train=8, n_dev=8, n_test=8)
    out = two.analysis(two.pretrained())
    assert set(out) == {"delta_error", "delta_error_fc1", "delta_error_fc2"}
    assert not torch.equal(two.planted["fc1"][:4, :4], two.planted["fc2"][:4, :4])


def test_synthetic_lora_recovers_planted_update_quickly():
    task = tiny("synthetic")
    x, y = task.split("train").tensors
    errors = {}
    for rank in (2, 4):
        model = lr.inject(task.pretrained(), "lora", targets=task.targets, rank=rank)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=3e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 300)
        gen = torch.Generator().manual_seed(0)
        for _ in range(300):
            idx = torch.randint(0, len(x), (64,), generator=gen)
            loss = task.loss(model, (x[idx], y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        errors[rank] = task.analysis(model)["delta_error"]
    assert errors[4] < 0.05
    assert errors[2] > task.floor(2) - 1e-3 and errors[2] > 0.5


# ---------------------------------------------------------------------- digits
def test_digits_split_classes_and_forgetting():
    from lowrank.tasks.digits import NEW, OLD, _load, _stratified

    _, y = _load()
    for classes in (OLD, NEW):
        parts = _stratified(y, classes)
        allidx = torch.cat(list(parts.values()))
        assert len(torch.unique(allidx)) == len(allidx) == int(sum((y == c).sum() for c in classes))
    task = tiny("digits")
    assert set(task.split("train").tensors[1].tolist()) == set(NEW)
    assert set(task.old["test"].tensors[1].tolist()) == set(OLD)
    x = task.split("train").tensors[0]
    assert x.min() >= 0 and x.max() <= 1
    result = task.evaluate(task.pretrained(), "test")
    assert result["forgetting"] == 0.0 and result["old_accuracy"] > 0.5


def test_pretrained_weights_are_cached_atomically(cache, monkeypatch):
    import lowrank.tasks.digits as digits

    tiny("digits").pretrained()
    files = sorted(p.name for p in Path(cache).iterdir())
    assert any(f.startswith("digits-") and f.endswith(".safetensors") for f in files)
    assert not any(f.endswith(".tmp") for f in files)

    def refuse(*args, **kwargs):
        raise AssertionError("pretrained again although the cache has the weights")

    monkeypatch.setattr(digits, "pretrain", refuse)
    again = tasks.get("digits", **TINY["digits"]).pretrained()
    ref = tiny("digits").pretrained().state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in again.state_dict().items())
    with pytest.raises(AssertionError, match="pretrained again"):  # other options: new key
        tasks.get("digits", pretrain_steps=31).pretrained()


def test_unreadable_cache_file_is_rebuilt(cache):
    task = tasks.get("digits", pretrain_steps=7)
    ref = task.pretrained().state_dict()
    (path,) = [p for p in Path(cache).glob("digits-*.safetensors") if 'pretrain_steps": 7' in _metadata(p)]
    path.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable"):
        again = tasks.get("digits", pretrain_steps=7).pretrained().state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in again.items())


def _metadata(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.metadata()["key"]


# ---------------------------------------------------------------------- mnist and the unpickler
class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval"])
def test_restricted_unpickler_refuses_code(tmp_path, payload):
    from lowrank.tasks.mnist import load_array_pickle

    marker = tmp_path / "pwned"
    obj = _Evil(marker) if payload == "os.system" else _EvalPayload()
    path = tmp_path / "evil.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(([np.zeros(3)], obj), f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load the global"):
        load_array_pickle(path)
    assert not marker.exists()


class _EvalPayload:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_restricted_unpickler_reads_numpy_arrays(tmp_path):
    from lowrank.tasks.mnist import load_array_pickle

    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64))
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(arrays, protocol=4))  # py3 protocol 2 would need _codecs
    got = load_array_pickle(path)
    for a, b in zip(got, arrays, strict=True):
        assert np.array_equal(a, b) and a.dtype == b.dtype


def test_mnist_data_and_shifts():
    from lowrank.tasks.mnist import load_mnist

    data = load_mnist()
    assert {k: len(v[0]) for k, v in data.items()} == {"train": 50_000, "valid": 10_000, "test": 10_000}
    task = tiny("mnist")
    x = task.split("train").tensors[0]
    assert len(x) == 256 and x.min() >= 0 and x.max() <= 1
    assert len(task.split("test")) == 200
    old = task._old["train"].tensors[0]
    assert not torch.allclose(x, old)  # rotated
    perm = tasks.get("mnist", shift="permute", n_train=16, n_eval=16, pretrain_steps=20, hidden=64)
    xp, xo = perm.split("train").tensors[0], perm._old["train"].tensors[0]
    assert torch.equal(xp.sort(1).values, xo.sort(1).values) and not torch.equal(xp, xo)
    sub = tasks.get("mnist", n_train=300, n_eval=16, pretrain_steps=20, hidden=64)
    assert torch.equal(sub.split("train").tensors[1][:256], task.split("train").tensors[1])
    result = task.evaluate(task.pretrained(), "test")
    assert set(result) == {"accuracy", "old_accuracy", "forgetting"}


# ---------------------------------------------------------------------- text
def test_text_data_and_targets():
    from lowrank.tasks.text import read_dataset

    sentences, labels, classes = read_dataset("movies")
    assert len(sentences) == 10_605 and classes == ["negative", "positive"]
    q, qlabels, qclasses = read_dataset("trec")
    assert qclasses == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert len(set(q)) == len(q) > 5000
    idx = split_indices(len(sentences), (0.1, 0.1), 0)
    assert sum(map(len, idx.values())) == len(torch.unique(torch.cat(list(idx.values()))))
    task = tiny("text")
    ids, mask, y = task.split("train").tensors
    assert ids.shape == mask.shape and ids.shape[1] <= 16 and len(y) == 12
    model = task.pretrained()
    assert task.modules_to_save == ["classifier"]
    assert len(lr.find_targets(model, task.targets)) == 12  # query and value of 6 layers
    every = lr.find_targets(
        model, tasks.get("text", targets="all-linear").targets, modules_to_save=task.modules_to_save
    )
    assert "classifier" not in every and len(every) == 36


# ---------------------------------------------------------------------- charlm
def test_charlm_text_and_windows():
    from lowrank.tasks.charlm import VOCAB, encode, windows

    ids = encode("Héllo,\tWorld!\u2603")
    assert "".join(VOCAB[i] for i in ids.tolist()) == "hello,\x00world!\x00"
    x, y = windows(torch.arange(10), 3)
    assert x.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]] and torch.equal(y, x + 1)
    task = tiny("charlm")
    assert len(task.split("train")) == 64
    assert len(task.old["dev"]) == len(task.old["test"]) > 0
    result = task.evaluate(task.pretrained(), "test")
    assert 1 < result["perplexity"] < len(VOCAB) + 1 and result["old_perplexity"] > 1
