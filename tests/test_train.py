"""The training loop: schedule values, determinism, penalties, hooks, non-finite losses."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lowrank as lr
from lowrank.tasks.protocols import HasAnalysis, HasInputBounds, HasLengths, TrainTask
from lowrank.train import (
    NonFiniteLossError,
    TrainConfig,
    fgsm,
    length_grouped,
    pgd,
    train,
    warmup_linear,
)


class TinyRegression:
    """y = W* x with W* = W₀ + a rank-2 ΔW*; a one-layer model starting at W₀."""

    name, metric, higher_is_better = "tiny", "mse", False
    targets, modules_to_save = ["lin"], []

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.w0 = torch.randn(6, 10, generator=g)
        delta = torch.randn(6, 2, generator=g) @ torch.randn(2, 10, generator=g)
        x = torch.randn(300, 10, generator=g)
        y = x @ (self.w0 + delta).T
        self.data = {
            "train": TensorDataset(x[:200], y[:200]),
            "dev": TensorDataset(x[200:250], y[200:250]),
            "test": TensorDataset(x[250:], y[250:]),
        }

    def pretrained(self) -> nn.Module:
        model = nn.Sequential()
        model.add_module("lin", nn.Linear(10, 6, bias=False))
        model.lin.weight.data.copy_(self.w0)
        return model

    def split(self, name):
        return self.data[name]

    def embed(self, model, batch):
        return batch[0]

    def head(self, model, z, batch):
        return model(z)

    def criterion(self, out, batch):
        return ((out - batch[1]) ** 2).mean()

    def loss(self, model, batch, perturb=None):
        z = self.embed(model, batch)
        if perturb is not None:
            z = perturb(z, lambda z_: self.criterion(self.head(model, z_, batch), batch))
        return self.criterion(self.head(model, z, batch), batch)

    @torch.no_grad()
    def evaluate(self, model, split, batch_size=512):
        x, y = self.data[split].tensors
        return {"mse": float(((model(x) - y) ** 2).mean())}


def _run(variant="lora", options=None, **cfg):
    task = TinyRegression()
    torch.manual_seed(0)
    model = lr.inject(task.pretrained(), variant, targets=task.targets, rank=2, seed=0, **(options or {}))
    return model, train(model, task, TrainConfig(quiet=True, **cfg))


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 0.1), (4, 0.5), (9, 1.0), (10, 1.0), (55, 0.5), (99, 1 / 90), (100, 0.0)],
)
def test_warmup_then_linear_decay(step, expected):
    # 100 steps, 10 % warm-up: ramps over steps 0..9, then decays linearly to 0 at step 100.
    assert warmup_linear(step, 100, 0.1) == pytest.approx(expected, abs=1e-12)


def test_scheduler_drives_the_optimizer_lr():
    task = TinyRegression()
    model = lr.inject(task.pretrained(), "lora", targets=["lin"], rank=2)
    seen = []
    cfg = TrainConfig(steps=20, lr=0.01, warmup=0.25, quiet=True, batch_size=16)
    opt_lrs = []

    def hook(m, step):
        seen.append(step)

    # read the learning rate actually used at each step through the scheduler's formula
    for s in range(cfg.steps):
        opt_lrs.append(cfg.lr * warmup_linear(s, cfg.steps, cfg.warmup))
    train(model, task, cfg, hooks=[hook])
    assert seen == list(range(20))
    assert opt_lrs[0] == pytest.approx(0.002) and opt_lrs[4] == pytest.approx(0.01)
    assert opt_lrs[-1] == pytest.approx(0.01 / 15)


def test_training_learns_and_is_deterministic():
    _, a = _run(steps=150, lr=0.05)
    _, b = _run(steps=150, lr=0.05)
    assert a.metrics == b.metrics  # same seed → bit-identical metrics
    assert (
        a.metrics["test_mse"] < 0.2 * TinyRegression().evaluate(TinyRegression().pretrained(), "test")["mse"]
    )
    assert a.trainable_params == 2 * (10 + 6)
    assert a.peak_mem_mb > 0 and a.train_seconds > 0


def test_other_seed_gives_other_run():
    _, a = _run(steps=30, lr=0.05, seed=0)
    _, b = _run(steps=30, lr=0.05, seed=1)
    assert a.metrics["test_mse"] != b.metrics["test_mse"]


def test_penalty_is_added_to_the_loss():
    # λ(‖U‖² + ‖V‖²) with a large λ must keep ΔW far smaller than with λ = 0, same seed.
    free, _ = _run("frobenius", {"lam": 0.0}, steps=100, lr=0.05)
    shrunk, _ = _run("frobenius", {"lam": 5.0}, steps=100, lr=0.05)
    norm = {
        k: float(lr.adapters(m)["lin"].delta_weight().detach().norm())
        for k, m in (("free", free), ("shrunk", shrunk))
    }
    assert norm["shrunk"] < 0.5 * norm["free"]


def test_nonfinite_loss_stops_the_run():
    with pytest.raises(NonFiniteLossError, match="lower the learning rate"):
        _run(steps=50, lr=1e12, clip=None)


def test_bad_config_is_one_clear_sentence():
    with pytest.raises(ValueError, match="lr=-1"):
        TrainConfig(lr=-1)
    with pytest.raises(ValueError, match="adversarial='cw'"):
        TrainConfig(adversarial="cw")


def test_fgsm_moves_each_coordinate_by_eps_uphill():
    z = torch.randn(4, 5)
    target = torch.randn(4, 5)
    loss = lambda v: ((v - target) ** 2).sum()  # noqa: E731
    adv = fgsm(0.1)(z, loss)
    assert torch.allclose((adv - z).abs(), torch.full_like(z, 0.1))
    assert loss(adv) > loss(z)


def test_pgd_stays_in_the_ball_and_beats_fgsm_where_fgsm_overshoots():
    # loss −(v − 0.1)² peaks inside the ball: FGSM jumps to the boundary (v = 0.3),
    # PGD's small projected steps settle near the peak.
    z = torch.zeros(3, 4)
    loss = lambda v: -((v - 0.1) ** 2).sum()  # noqa: E731
    eps = 0.3
    adv = pgd(eps, steps=10)(z, loss)
    assert float((adv - z).abs().max()) <= eps + 1e-7
    assert loss(adv) > loss(fgsm(eps)(z, loss))


@pytest.mark.parametrize("mode", ["fgsm", "pgd"])
def test_adversarial_training_runs_and_differs_from_clean(mode):
    _, clean = _run(steps=40, lr=0.05)
    _, adv = _run(steps=40, lr=0.05, adversarial=mode, adv_eps=0.1)
    assert math.isfinite(adv.metrics["test_mse"])
    assert adv.metrics["test_mse"] != clean.metrics["test_mse"]


def test_attacks_stay_inside_the_input_box():
    z = torch.rand(64, 10)  # pixels in [0, 1]
    target = torch.randn(64, 10) * 3  # pulls many coordinates past the box
    loss = lambda v: ((v - target) ** 2).sum()  # noqa: E731
    for adv in (fgsm(0.3, (0.0, 1.0))(z, loss), pgd(0.3, 5, bounds=(0.0, 1.0))(z, loss)):
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
        assert float((adv - z).abs().max()) <= 0.3 + 1e-6
    unboxed = fgsm(0.3)(z, loss)
    assert float(unboxed.min()) < 0.0 or float(unboxed.max()) > 1.0  # the box was binding


def test_pgd_draws_a_fresh_random_start_per_call_reproducibly():
    z = torch.zeros(2, 3)
    flat = lambda v: (v * 0).sum()  # noqa: E731  (zero gradient: the result is the random start)
    attack = pgd(0.5, steps=1, seed=3)
    first, second = attack(z, flat), attack(z, flat)
    assert not torch.equal(first, second)
    again = pgd(0.5, steps=1, seed=3)
    assert torch.equal(again(z, flat), first) and torch.equal(again(z, flat), second)


# ---------------------------------------------------------------------- length grouping
def _epoch(lengths, batch_size, seed=0):
    """One epoch of grouped batches (as index lists) from a fresh generator."""
    gen = torch.Generator().manual_seed(seed)
    perm = length_grouped(torch.randperm(len(lengths), generator=gen), lengths, batch_size, gen)
    n = len(lengths) // batch_size * batch_size
    return perm, [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def test_length_grouping_keeps_every_example_once_and_cuts_padding():
    lengths = torch.randint(3, 65, (1000,), generator=torch.Generator().manual_seed(1))
    perm, batches = _epoch(lengths, 32)
    assert sorted(perm.tolist()) == list(range(1000))  # a permutation: nothing lost or repeated
    padded = lambda bs: sum(int(lengths[b].max()) * len(b) for b in bs)  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    plain = torch.randperm(1000, generator=gen)
    shuffled = [plain[i : i + 32] for i in range(0, 992, 32)]
    # uniform lengths 3…64: a random batch of 32 pads to ≈ 62, a sorted run of 256 to within
    # ≈ 61/8 of its own lengths, so the grouped epoch has far fewer padded tokens
    assert padded(batches) < 0.7 * padded(shuffled)
    assert _epoch(lengths, 32)[0].equal(perm)  # reproducible from the seed
    assert not _epoch(lengths, 32, seed=1)[0].equal(perm)
    # batch order is shuffled: lengths do not just fall within each run of 8 batches
    first = [float(lengths[b].max()) for b in batches]
    assert first != sorted(first, reverse=True)


def test_length_grouping_with_fewer_examples_than_a_batch():
    lengths = torch.tensor([5, 1, 3])
    perm, _ = _epoch(lengths, 8)
    assert sorted(perm.tolist()) == [0, 1, 2]


def test_group_by_length_trains_text_and_refuses_fixed_size_inputs():
    task = lr.tasks.get("text", dataset="trec", max_train=64, max_eval=16, max_length=24)
    torch.manual_seed(0)
    model = lr.inject(task.pretrained(), "lora", targets=task.targets, rank=2, seed=0)
    cfg = dict(steps=3, batch_size=16, quiet=True)
    out = train(model, task, TrainConfig(group_by_length=True, **cfg))
    assert 0 <= out.metrics["test_accuracy"] <= 1
    with pytest.raises(ValueError, match="group_by_length=True needs inputs of varying length"):
        _run(steps=2, group_by_length=True)


def test_every_task_is_a_train_task_with_the_capabilities_it_declares():
    """The loop's optional capabilities are typed protocols: exactly the text task has lengths
    (group_by_length), exactly the synthetic task an analysis (ΔW against the planted ΔW*),
    every Task declares input bounds (None for ℝ)."""
    classes = {name: lr.tasks.task_class(name) for name in lr.tasks.names()}
    assert all(issubclass(c, TrainTask) and issubclass(c, lr.tasks.Task) for c in classes.values())
    assert {n for n, c in classes.items() if issubclass(c, HasLengths)} == {"text"}
    assert {n for n, c in classes.items() if issubclass(c, HasAnalysis)} == {"synthetic"}
    assert all(hasattr(c, "input_bounds") for c in classes.values())


def test_a_task_with_only_the_required_members_trains_and_an_analysis_joins_the_metrics():
    task = TinyRegression()
    assert isinstance(task, TrainTask)
    assert not isinstance(task, HasLengths | HasAnalysis | HasInputBounds)
    _, plain = _run(steps=5)
    assert {k.split("_")[0] for k in plain.metrics} == {"dev", "test"}

    class Analysed(TinyRegression):
        def analysis(self, model):
            return {"delta_norm": float(lr.adapters(model)["lin"].delta_weight().detach().norm())}

    model = lr.inject(Analysed().pretrained(), "lora", targets=["lin"], rank=2, seed=0)
    out = train(model, Analysed(), TrainConfig(steps=5, quiet=True))
    trained = float(lr.adapters(model)["lin"].delta_weight().detach().norm())
    assert out.metrics["delta_norm"] == trained > 0  # of the trained model (ΔW = 0 at init)
