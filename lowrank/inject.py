"""Wrap the matching ``nn.Linear`` modules of any model in adapters, in place.

Target matching follows PEFT's convention: a name matches a whole dot-separated trailing part of
a module's qualified name (``"q"`` matches ``layer.0.q``, not ``layer.0.query``;
``"attention.self.query"`` matches ``encoder.layer.0.attention.self.query``); a pattern
containing regex characters is also matched against the whole name with ``re.fullmatch``.
``"all-linear"`` takes the set PEFT's ``_maybe_include_all_linear_layers`` takes, restricted to
``nn.Linear``: every Linear except the model's output embedding layer (``get_output_embeddings()``
of a transformers model, e.g. a causal LM's ``lm_head``). As in PEFT, ``modules_to_save`` and
everything inside them are never targets, whatever the pattern. PEFT's ``task_type="SEQ_CLS"``
also leaves out the classifier head (and saves it whole): ``modules_to_save=["classifier"]`` (or
``["score"]``) gives the same set. PEFT's all-linear also takes transformers' ``Conv1D`` (GPT-2);
lowrank adapts ``nn.Linear`` only.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .adapters.base import Adapter
from .adapters.registry import grad_flags_kept_on_error, make, variant_class

_REGEX_CHARS = set(".^$*+?{}[]\\|()")


def _is_regex(pattern: str) -> bool:
    return any(c in _REGEX_CHARS for c in pattern)


def _matches(name: str, pattern: str) -> bool:
    if name == pattern or name.endswith("." + pattern):  # a whole trailing part, dots included
        return True
    return _is_regex(pattern) and re.fullmatch(pattern, name) is not None


def _named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every (name, module), a shared module under each of its names."""
    return {n: m for n, m in model.named_modules(remove_duplicate=False) if n}


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in _named_modules(model).items() if isinstance(m, nn.Linear)]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _layer_seed(seed: int, name: str) -> int:
    """A per-layer seed: stable under adding or removing other layers."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**31 - 1)


def _hint(model: nn.Module) -> str:
    names = _linear_names(model)
    if not names:
        return "the model has no nn.Linear modules"
    shown = ", ".join(names[:8]) + (f", … ({len(names)} in all)" if len(names) > 8 else "")
    return f"Linear modules are: {shown}"


def _output_layer(model: nn.Module) -> list[str]:
    """The names of the model's output embedding layer (``get_output_embeddings()``, which every
    transformers model has, e.g. ``lm_head``), which "all-linear" leaves out; [] when none."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    return [] if out is None else [n for n, m in _named_modules(model).items() if m is out]


def find_targets(
    model: nn.Module, targets: str | Iterable[str], modules_to_save: Iterable[str] = ()
) -> list[str]:
    """Qualified names of the Linear modules that ``targets`` selects (see the module docstring),
    leaving out ``modules_to_save`` and everything inside them."""
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise ValueError("targets is empty; name at least one module, e.g. targets=['query']")
    saved = find_modules(model, modules_to_save)
    modules = _named_modules(model)
    linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    free = {n for n in linear if not any(n == s or n.startswith(s + ".") for s in saved)}
    if targets == ["all-linear"]:
        if not linear:
            raise ValueError(
                "'all-linear' selects no module: the model has no nn.Linear modules "
                "(lowrank adapts nn.Linear only, not e.g. GPT-2's Conv1D)"
            )
        left_out = _output_layer(model)
        chosen = [n for n in linear if n in free and n not in left_out]
        if not chosen:
            why = ([f"the model's output layer ({', '.join(left_out)})"] if left_out else []) + (
                [f"inside modules_to_save ({', '.join(saved)})"] if saved else []
            )
            raise ValueError(
                f"'all-linear' selects no module: its nn.Linear modules are "
                f"{' or '.join(why)}, which it leaves out; name the targets explicitly"
            )
        return chosen
    chosen = []
    for pattern in targets:
        hits = [n for n in modules if _matches(n, pattern)]
        if not hits:
            raise ValueError(f"target {pattern!r} matches no module; {_hint(model)}")
        lin = [n for n in hits if isinstance(modules[n], nn.Linear)]
        if not lin:
            bad = hits[0]
            raise TypeError(
                f"target {pattern!r} matches {bad!r}, a {type(modules[bad]).__name__}, not an "
                f"nn.Linear; lowrank adapts Linear layers only ({_hint(model)})"
            )
        if free.isdisjoint(lin):
            raise ValueError(
                f"target {pattern!r} matches only modules inside modules_to_save ({', '.join(lin)}), "
                "which train whole and take no adapter; drop it from targets or from modules_to_save"
            )
        chosen += [n for n in lin if n in free and n not in chosen]
    return chosen


def inject(
    model: nn.Module,
    variant: str,
    targets: str | Iterable[str] = "all-linear",
    modules_to_save: Iterable[str] = (),
    seed: int = 0,
    **options: Any,
) -> nn.Module:
    """Replace every targeted ``nn.Linear`` of ``model`` by ``variant``'s adapter, in place.

    Everything else is frozen, except modules named in ``modules_to_save`` (same matching rules
    as ``targets``), which train fully and are never targets. A Linear shared by several parents
    is wrapped once and the same adapter is placed everywhere. Each layer's seed is derived from
    ``seed`` and its name. ``options`` go to the variant's constructor (``rank``, ``alpha``,
    ``dropout`` …). Every adapter is built before the model is touched, so a call that fails
    (a rank one layer cannot take, say) leaves the model as it was. Returns ``model``.

    On a model built on the meta device (``with torch.device("meta"): model = ...``) every
    adapter tensor is created on meta as well and no weight is read; pissa, milora and frobenius
    with ``init="closed_form"``, whose initialisation is an SVD of W₀, refuse in one sentence.
    As for any meta module (and PEFT's adapters on meta), ``model.to_empty(device=...)`` then
    leaves every tensor uninitialised, the adapters' own included: fill them with
    ``model.load_state_dict`` of an adapted model's state dict, or load the base weights first
    and then inject (or :func:`~lowrank.io.load_adapters` a saved adapter).
    """
    variant_class(variant)  # fail early with the list of names
    for name, module in model.named_modules():
        if isinstance(module, Adapter):
            raise ValueError(
                f"model already has adapters (e.g. {name!r}); call lr.strip(model) or start "
                "from a fresh model before injecting again"
            )
    names = find_targets(model, targets, modules_to_save)
    save_names = find_modules(model, modules_to_save)
    linears = {name: model.get_submodule(name) for name in names}
    wrapped: dict[int, Adapter] = {}
    with grad_flags_kept_on_error(model):
        model.requires_grad_(False)  # before building: full turns its own layer's flags back on
        for name, linear in linears.items():
            if id(linear) not in wrapped:
                wrapped[id(linear)] = make(variant, linear, seed=_layer_seed(seed, name), **options)
    for name, linear in linears.items():
        _set_module(model, name, wrapped[id(linear)])
    for name in save_names:
        model.get_submodule(name).requires_grad_(True)
    model.lowrank_modules_to_save = save_names  # remembered for save_adapters
    return model


def find_modules(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Names of the modules matched by ``patterns`` (``modules_to_save`` rules); errors on none."""
    modules = list(_named_modules(model))
    out: list[str] = []
    for p in [patterns] if isinstance(patterns, str) else patterns:
        hits = [n for n in modules if _matches(n, p)]
        if not hits:
            raise ValueError(f"modules_to_save entry {p!r} matches no module; {_hint(model)}")
        out += [n for n in hits if n not in out and not any(n.startswith(o + ".") for o in out)]
    return out


def adapters(model: nn.Module) -> dict[str, Adapter]:
    """{qualified name: Adapter} for every adapter in ``model`` (shared ones listed once)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Adapter)}


def num_trainable(model: nn.Module) -> int:
    """Σ numel(p) over the parameters of ``model`` with ``requires_grad`` (shared ones counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_all(model: nn.Module) -> nn.Module:
    """Merge every adapter of ``model``; returns ``model``."""
    for ad in adapters(model).values():
        ad.merge()
    return model


def unmerge_all(model: nn.Module) -> nn.Module:
    """Unmerge every adapter of ``model``; returns ``model``."""
    for ad in adapters(model).values():
        ad.unmerge()
    return model


@torch.no_grad()
def strip(model: nn.Module) -> nn.Module:
    """Replace every adapter by a plain ``nn.Linear`` holding its merged weight (in place).

    The result has the base model's architecture and speed and no adapter state.
    """
    plain: dict[int, nn.Linear] = {}
    for name, ad in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(ad, Adapter):
            continue
        if id(ad) not in plain:
            w = ad.merged_weight().detach() if not ad.merged else ad.base.weight.detach()
            b = ad.base.bias
            lin = nn.Linear(
                ad.in_features, ad.out_features, bias=b is not None, device=w.device, dtype=w.dtype
            )
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
            plain[id(ad)] = lin
        _set_module(model, name, plain[id(ad)])
    return model
