"""Loading adapters into a model, all or nothing: the same for lowrank's files and PEFT's.

Every layer's name, variant and shape and every tensor's name and shape (against the adapter
the file's options build) are checked, and every new adapter is built on the side, before the
model is touched; a file that fails leaves the model in memory as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..adapters.base import Adapter
from ..adapters.registry import make, variants
from ..inject import _named_modules, _set_module, adapters
from .format import AdapterFileError, read_adapter_dir

# How the file names a tensor, for messages: label(layer or module, key).
Label = Callable[[str, str], str]


def _lowrank_label(owner: str, key: str) -> str:
    return f"{owner}::{key}"


def _same_tensors(
    have: dict[str, torch.Tensor], want: dict[str, torch.Tensor], owner: str, what: str, label: Label
) -> None:
    """The file's tensors ``have`` for ``owner`` must be ``want``'s names and shapes exactly."""
    for k in [*want, *(k for k in have if k not in want)]:
        mine = tuple(want[k].shape) if k in want else None
        theirs = tuple(have[k].shape) if k in have else None
        if mine != theirs:
            raise AdapterFileError(
                f"tensor {label(owner, k)} is {theirs or 'absent'} in the file but "
                f"{mine or 'absent'} in {what}; the file does not fit this model (load it into "
                "the model it was trained on, or re-save it)"
            )


def _build(name: str, spec: dict[str, Any], linear: nn.Linear) -> Adapter:
    """The adapter the file describes for ``linear``, built on the side (the model is not
    changed, except for ``linear``'s requires_grad flags, which the caller restores)."""
    try:
        return make(spec["variant"], linear, **spec["options"])
    except (TypeError, ValueError) as e:
        raise AdapterFileError(
            f"layer {name!r}: the file's options {spec['options']} do not build a "
            f"{spec['variant']!r} adapter ({e}); re-save the adapter"
        ) from e


def _layer_module(name: str, spec: dict[str, Any], modules: dict[str, nn.Module]) -> nn.Linear | Adapter:
    """The model's module that the file's layer ``name`` adapts: a Linear (or an adapter) of
    the file's shape, with a variant this lowrank has."""
    mod = modules.get(name)
    if mod is None:
        raise AdapterFileError(
            f"the file adapts layer {name!r}, which this model does not have; load it into "
            "the model it was trained on"
        )
    if not isinstance(mod, (nn.Linear, Adapter)):
        raise AdapterFileError(
            f"layer {name!r} is a {type(mod).__name__}, not a Linear; load "
            "the file into the model it was trained on"
        )
    shape = (mod.out_features, mod.in_features)
    if shape != (spec["out_features"], spec["in_features"]):
        raise AdapterFileError(
            f"layer {name!r} is {shape[0]}x{shape[1]} here but "
            f"{spec['out_features']}x{spec['in_features']} in the file; load it into the "
            "model it was trained on"
        )
    if spec["variant"] not in variants():
        raise AdapterFileError(
            f"layer {name!r} uses variant {spec['variant']!r}, which this lowrank "
            f"({__version__}) does not have (it has {', '.join(variants())}); upgrade lowrank"
        )
    return mod


def _prepare(
    model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor], label: Label
) -> tuple[dict[str, Adapter], dict[int, Adapter]]:
    """Check everything against ``model`` and build the new adapters, without changing the
    model: ({layer: the adapter to load}, {id(Linear): its new adapter})."""
    modules = _named_modules(model)
    targets: dict[str, Adapter] = {}
    new: dict[int, Adapter] = {}  # one adapter per Linear, even if it has several names
    for name, spec in config["layers"].items():
        mod = _layer_module(name, spec, modules)
        if isinstance(mod, Adapter):
            _same_variant(name, mod, spec)
            targets[name] = mod
        else:
            if id(mod) not in new:
                new[id(mod)] = _build(name, spec, mod)
            targets[name] = new[id(mod)]
        have = {k: tensors[f"{name}::{k}"] for k in spec["tensors"]}
        _same_tensors(
            have,
            targets[name].adapter_state(),
            name,
            f"a {spec['variant']!r} adapter with the file's options {spec['options']}",
            label,
        )
    for name in config.get("modules_to_save", []):
        if name not in modules:
            raise AdapterFileError(
                f"modules_to_save entry {name!r} is not in this model; load "
                "the file into the model it was trained on"
            )
        have = {k.partition("::")[2]: t for k, t in tensors.items() if k.partition("::")[0] == name}
        _same_tensors(have, modules[name].state_dict(), name, "the model", label)
    return targets, new


def _same_variant(name: str, mod: Adapter, spec: dict[str, Any]) -> None:
    """A layer that already holds an adapter takes only a file of its variant and options."""
    if mod.name != spec["variant"]:
        raise AdapterFileError(
            f"layer {name!r} holds a {mod.name!r} adapter but the file has {spec['variant']!r}; "
            "load into a model without adapters or with the same variant"
        )
    mine = {k: v for k, v in mod.config().items() if k != "seed"}
    theirs = {k: v for k, v in spec["options"].items() if k != "seed"}
    if mine != theirs:
        diff = {
            k: (mine.get(k), theirs.get(k))
            for k in mine.keys() | theirs.keys()
            if mine.get(k) != theirs.get(k)
        }
        raise AdapterFileError(
            f"layer {name!r} holds a {mod.name!r} adapter but the file has other options "
            f"(here vs file: {diff}); load into a model without adapters, or inject "
            "with the file's options first"
        )


@torch.no_grad()
def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a saved adapter directory into ``model`` (in place) and return it.

    Layers that are plain ``nn.Linear`` are wrapped with the saved variant and options first;
    layers that already hold an adapter must be of the same variant. Loading is all or
    nothing: the file is checked (structure, every tensor's name and shape against the
    adapter its options build) and every new adapter is built before the model is touched,
    so a file that fails leaves the model's tensors, modules and ``requires_grad`` flags as
    they were.
    """
    config, tensors = read_adapter_dir(path)
    return _load(model, config, tensors)


def _freeze_and_swap(model: nn.Module, new: dict[int, Adapter]) -> None:
    """Freeze what is outside the adapters (as inject does; adapters keep their own flags) and
    put each new adapter in its Linear's place (a shared Linear under every name)."""
    inside = {id(p) for ad in [*adapters(model).values(), *new.values()] for p in ad.parameters()}
    for p in model.parameters():
        if id(p) not in inside:
            p.requires_grad_(False)
    for name, mod in _named_modules(model).items():
        if id(mod) in new:
            _set_module(model, name, new[id(mod)])


@torch.no_grad()
def _load(
    model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor], label: Label = _lowrank_label
) -> nn.Module:
    """Check and build on the side (:func:`_prepare`), then freeze, swap in and fill ``model``
    from a lowrank (config, tensors) pair; ``label`` names the file's tensors in messages."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        targets, new = _prepare(model, config, tensors, label)
    except BaseException:
        for p, flag in flags:  # building an adapter sets its Linear's flags
            p.requires_grad_(flag)
        raise
    # Nothing below can fail on the file's account.
    _freeze_and_swap(model, new)
    for name, spec in config["layers"].items():
        ad = targets[name]
        was_merged = ad.merged
        ad.unmerge()
        ref = ad.base.weight
        ad.load_adapter_state(
            {k: tensors[f"{name}::{k}"].to(device=ref.device, dtype=ref.dtype) for k in spec["tensors"]}
        )
        if was_merged:
            ad.merge()
    saved = config.get("modules_to_save", [])
    for name in saved:
        sub = model.get_submodule(name)
        sub.load_state_dict({k: tensors[f"{name}::{k}"] for k in sub.state_dict()})
        sub.requires_grad_(True)
    model.lowrank_modules_to_save = list(saved)
    return model
