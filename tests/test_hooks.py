"""Hooks on an adapter's base layer see the base layer's own output, W₀x + b.

Probing and activation-capture tools register a forward hook on the wrapped Linear and keep the
tensor it returns; the adapter must not write its update into that tensor afterwards. Backward
hooks on the base layer (which route its output through a custom autograd Function) must work
too. Every registered variant (and its extra options), unmerged, in every mode the forward has:
training with and without dropout, eval with autograd, under no_grad and under inference_mode,
and training under bfloat16 autocast.

Without any hook the base layer's output is a temporary of the call, and the low-rank variants
add their branch into it in place; with a hook the sum goes to a new tensor. Both routes must
give the same outputs and gradients, bit for bit.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from adapter_cases import base_trains, build, cases, inputs, perturb
from torch import nn

import lowrank as lr

MODES = {  # name: (training?, dropout, grad mode)
    "train": (True, 0.0, contextlib.nullcontext),
    "train-dropout": (True, 0.3, contextlib.nullcontext),
    "eval": (False, 0.0, contextlib.nullcontext),
    "eval-no_grad": (False, 0.0, torch.no_grad),
    "eval-inference_mode": (False, 0.0, torch.inference_mode),
    "train-autocast": (True, 0.0, lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
}


def adapter(name: str, options: dict, mode: str) -> lr.Adapter:
    training, dropout, _ = MODES[mode]
    ad, *_ = build(name, {**options, "dropout": dropout}, dtype=torch.float32)
    perturb(ad)  # ΔW ≠ 0: an update written into the base's output would show
    return ad.train(training)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("name", "options"), cases())
def test_forward_hook_on_base_sees_w0x_plus_b(name, options, mode):
    ad = adapter(name, options, mode)
    seen = []
    ad.base.register_forward_hook(lambda module, args, out: seen.append(out))  # no clone
    x = inputs(dtype=torch.float32)
    torch.manual_seed(0)
    with MODES[mode][2]():
        y = ad(x)
        expected = F.linear(x, ad.base.weight, ad.base.bias)  # the same call the base makes
    assert len(seen) == 1, f"{name}: the base layer's forward hook ran {len(seen)} times"
    assert torch.equal(seen[0], expected), f"{name} ({mode}): the hook's tensor was modified"
    if not base_trains(name, **options):  # full fine-tuning's update is the base weight itself
        assert not torch.equal(y, expected), f"{name}: the adapter added nothing"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("name", "options"), cases())
def test_global_forward_hook_sees_w0x_plus_b(name, options, mode):
    ad = adapter(name, options, mode)
    seen = {}
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.setdefault(id(module), out)
    )
    try:
        with MODES[mode][2]():
            x = inputs(dtype=torch.float32)
            ad(x)
            expected = F.linear(x, ad.base.weight, ad.base.bias)
    finally:
        handle.remove()
    assert torch.equal(seen[id(ad.base)], expected), f"{name} ({mode})"


@pytest.mark.parametrize(("name", "options"), cases())
def test_backward_hook_on_base_leaves_gradients_unchanged(name, options):
    """A full backward hook on the base layer runs once and changes no gradient (it makes the
    base's output a view returned by a custom Function, which must not be modified in place)."""
    grads = []
    for hooked in (False, True):
        ad = adapter(name, options, "train")
        seen = []
        if hooked:
            ad.base.register_full_backward_hook(lambda m, gin, gout, seen=seen: seen.append(gout[0]))
        x = inputs(dtype=torch.float32).requires_grad_()  # as inside a network
        y = ad(x)
        y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
        grads.append({"x": x.grad, **{n: p.grad for n, p in ad.named_parameters() if p.requires_grad}})
        if hooked:
            assert len(seen) == 1 and seen[0].shape == y.shape, name
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), (name, n)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("name", "options"), cases())
def test_a_hook_changes_neither_output_nor_gradients(name, options, mode):
    training, _, grad_mode = MODES[mode]
    results = []
    for hooked in (False, True):
        ad = adapter(name, options, mode)
        if hooked:
            ad.base.register_forward_hook(lambda module, args, out: None)
        x = inputs(dtype=torch.float32).requires_grad_(training)
        torch.manual_seed(0)  # the same dropout mask on both routes
        with grad_mode():
            y = ad(x)
        if training:
            y.float().square().sum().backward()
        grads = [x.grad] + [p.grad for p in ad.parameters() if p.requires_grad] if training else []
        results.append((y, grads))
    (y0, g0), (y1, g1) = results
    assert y0.dtype == y1.dtype and torch.equal(y0, y1), f"{name} ({mode})"
    assert len(g0) == len(g1) and all(torch.equal(a, b) for a, b in zip(g0, g1)), name
