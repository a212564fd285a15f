"""AdaLoRA's RankAllocator: cubic budget schedule, pruning to the target, agreement with PEFT."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import lowrank as lr
from lowrank.adapters.adalora import RankAllocator

INIT, TARGET = 6, 2


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 12)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def net() -> Net:
    torch.manual_seed(0)
    return Net()


def adalora_net() -> nn.Module:
    return lr.inject(net(), "adalora", targets=["fc1", "fc2"], rank=INIT)


def peft_adalora(base: nn.Module, t_init: int, t_final: int, total: int):
    cfg = peft.AdaLoraConfig(
        init_r=INIT,
        target_r=TARGET,
        tinit=t_init,
        tfinal=t_final,
        total_step=total,
        deltaT=1,
        target_modules=["fc1", "fc2"],
        lora_alpha=INIT,
    )
    return peft.get_peft_model(base, cfg)


def test_budget_schedule_is_cubic():
    alloc = RankAllocator(adalora_net(), TARGET, INIT, t_init=10, t_final=20, total_steps=100)
    b0, bT = 2 * INIT, 2 * TARGET  # two adapted layers
    assert (alloc.init_budget, alloc.target_budget) == (b0, bT)
    expected = {
        0: b0,
        10: b0,
        11: int(bT + (b0 - bT) * (1 - 1 / 70) ** 3),
        45: int(bT + (b0 - bT) * 0.5**3),
        79: int(bT + (b0 - bT) * (1 / 70) ** 3),
        80: bT,
        100: bT,
    }
    assert {t: alloc.budget(t) for t in expected} == expected
    assert expected[45] == 5 and expected[11] == 11
    budgets = [alloc.budget(t) for t in range(101)]
    assert all(a >= b for a, b in zip(budgets, budgets[1:], strict=False))  # never increases


def test_budget_schedule_matches_peft():
    theirs = peft_adalora(net(), t_init=10, t_final=20, total=100)
    ours = RankAllocator(adalora_net(), TARGET, INIT, t_init=10, t_final=20, total_steps=100)
    for t in range(0, 101):
        assert ours.budget(t) == theirs.base_model.rankallocator.budget_schedule(t)[0], t


def lambdas(model: nn.Module) -> torch.Tensor:
    return torch.cat([ad.lam.detach() for ad in lr.adapters(model).values()])


def train(model, alloc, steps, seed=0):
    """Yield (step, budget) after each step of a small regression run with the allocator."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 16, generator=gen), torch.randn(64, 12, generator=gen)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps + 1):
        loss = (model(x) - y).square().mean()
        for ad in lr.adapters(model).values():
            loss = loss + ad.penalty()
        loss.backward()
        opt.step()
        budget = alloc.step(model, step)
        opt.zero_grad()
        yield step, budget


def test_prunes_to_target_and_masked_triplets_stay_zero():
    t_init, t_final, total = 5, 10, 40
    model = adalora_net()
    alloc = RankAllocator(model, TARGET, INIT, t_init, t_final, total)
    final_mask = None
    for step, budget in train(model, alloc, total):
        nonzero = lambdas(model) != 0
        assert int(nonzero.sum()) <= budget
        if step > t_init:
            assert int(nonzero.sum()) == budget  # the kept ones have trained away from 0
        if step == total - t_final:
            final_mask = nonzero.clone()
            assert int(final_mask.sum()) == alloc.target_budget
        if final_mask is not None:  # the allocation is frozen: pruned stay 0, kept stay alive
            assert torch.equal(nonzero, final_mask)
    assert int((lambdas(model) != 0).sum()) == alloc.target_budget == 2 * TARGET
    assert sum(alloc.rank_pattern().values()) == alloc.target_budget


def test_allocation_agrees_with_peft():
    t_init, t_final, total = 3, 5, 20
    base = net()
    ours = lr.inject(copy.deepcopy(base), "adalora", targets=["fc1", "fc2"], rank=INIT)
    theirs = peft_adalora(copy.deepcopy(base), t_init, t_final, total)
    with torch.no_grad():
        for name, ad in lr.adapters(ours).items():
            layer = theirs.base_model.model.get_submodule(name)
            layer.lora_A["default"].copy_(ad.Q)
            layer.lora_B["default"].copy_(ad.P)
            layer.lora_E["default"].zero_()
    alloc = RankAllocator(ours, TARGET, INIT, t_init, t_final, total)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 16, generator=gen), torch.randn(64, 12, generator=gen)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (ours, theirs)]
    for step in range(total + 1):
        for m, opt in zip((ours, theirs), opts, strict=True):
            (m(x) - y).square().mean().backward()
            opt.step()
        alloc.step(ours, step)
        theirs.base_model.update_and_allocate(step)
        for opt in opts:
            opt.zero_grad()
        peft_lam = torch.cat(
            [theirs.base_model.model.get_submodule(n).lora_E["default"].view(-1) for n in lr.adapters(ours)]
        )
        assert torch.equal(lambdas(ours) == 0, peft_lam == 0), step
        torch.testing.assert_close(lambdas(ours), peft_lam.detach(), rtol=1e-4, atol=1e-6)


def test_errors_tell_the_fix():
    model = adalora_net()
    with pytest.raises(ValueError, match="init_rank=4"):
        RankAllocator(model, TARGET, 4, 0, 0, 10)
    with pytest.raises(ValueError, match="no budgeting phase"):
        RankAllocator(model, TARGET, INIT, 5, 5, 10)
    with pytest.raises(ValueError, match="no adalora adapters"):
        RankAllocator(net(), TARGET, INIT, 0, 0, 10)
    alloc = RankAllocator(model, TARGET, INIT, 0, 0, 10)
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        alloc.step(model, 0)


def test_the_training_loop_runs_the_allocator_down_to_the_target_rank():
    """lowrank.train calls AdaLoRA.training_hooks' allocator: after training, each layer keeps
    on average target_rank non-zero λ."""
    from torch.utils.data import TensorDataset

    from lowrank.sweep import training_hooks
    from lowrank.train import TrainConfig, train

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 12, generator=g), torch.randn(256, 8, generator=g)

    class Task:
        def split(self, name):
            return TensorDataset(x, y)

        def loss(self, model, batch, perturb=None):
            return ((model(batch[0]) - batch[1]) ** 2).mean()

        def evaluate(self, model, split, batch_size=512):
            return {"mse": float(((model(x) - y) ** 2).mean().detach())}

    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 8))
    lr.inject(model, "adalora", targets=["0", "2"], rank=6, target_rank=2)
    hooks = training_hooks(model, "adalora", 50)
    assert len(hooks) == 1
    train(model, Task(), TrainConfig(steps=50, lr=1e-2, quiet=True, batch_size=32), hooks=hooks)
    kept = sum(int((ad.lam != 0).sum()) for ad in lr.adapters(model).values())
    assert kept == 2 * 2  # target_rank × layers
