"""PEFT's adapter files to lowrank adapters and back: from_peft and to_peft.

Which variant a file holds, and what each adapter writes, the variants declare
(:attr:`~lowrank.Adapter.peft`, :meth:`~lowrank.Adapter.peft_export`); PEFT's files and
fields are :mod:`~lowrank.io.peft_format`'s; a file loads all or nothing through
:mod:`~lowrank.io.load`. PEFT itself is not imported.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.base import Adapter
from ..adapters.registry import variant_class, variants
from ..inject import _named_modules
from .format import AdapterFileError, _host, _saved_tensors, _writable, _write_dir
from .load import _load
from .peft_format import (
    _PEFT_INNER,
    _PREFIX,
    _READ_LAYERS,
    _WRITE_FIELDS,
    PEFT_CONFIG,
    PEFT_TENSORS,
    _read_peft_dir,
    _refuse_unsupported,
    _uniform,
)


def _peft_variants() -> list[type[Adapter]]:
    """The registered variants that PEFT stores (those with a :attr:`~lowrank.Adapter.peft`)."""
    return [variant_class(n) for n in variants() if variant_class(n).peft is not None]


def _with(flags: dict[str, Any]) -> str:
    """The flags a PEFT config sets, for messages: `` with use_dora``."""
    on = " and ".join(k for k, v in sorted(flags.items()) if v is True)
    return f" with {on}" if on else ""


def _supported() -> str:
    kinds = [f"{c.peft.peft_type}{_with(c.peft.config)} (as {c.name})" for c in _peft_variants()]
    return ", ".join(kinds[:-1]) + " and " + kinds[-1]


# --------------------------------------------------------------------------- reading
def _reader(config: dict[str, Any]) -> type[Adapter]:
    """The variant a PEFT config holds: the one whose :attr:`~lowrank.Adapter.peft` has the
    config's peft_type and flags (an absent flag being False)."""
    for cls in _peft_variants():
        if cls.peft.peft_type == config.get("peft_type") and all(
            config.get(k, False) == v for k, v in cls.peft.config.items()
        ):
            return cls
    flags = {k: config.get(k) for cls in _peft_variants() for k in cls.peft.config}
    raise AdapterFileError(
        f"peft_type {config.get('peft_type')!r}{_with(flags)} is not supported; "
        f"from_peft reads {_supported()}"
    )


def _peft_layers(
    tensors: dict[str, torch.Tensor], names: dict[str, str]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Split PEFT's tensors into {layer: {our name: tensor}} (``names``: ours to PEFT's) and
    the remaining tensors."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        for ours, suffix in names.items():
            if key.startswith(_PREFIX) and key.endswith("." + suffix):
                layers.setdefault(key[len(_PREFIX) : -len(suffix) - 1], {})[ours] = t
                break
        else:
            rest[key] = t
    if not layers:
        raise AdapterFileError("the PEFT adapter file holds no adapter tensors for nn.Linear layers")
    return layers, rest


def _owners(model: nn.Module | None, rest: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """{module name: the names of its tensors}, parents first: the model's modules that hold
    tensors, or without a model every leading part of the PEFT file's remaining tensor names
    (a module's tensors being the names under it)."""
    if model is not None:
        return {n: list(sd) for n, m in _named_modules(model).items() if (sd := m.state_dict())}
    owners: dict[str, list[str]] = {}
    for key in (k[len(_PREFIX) :] for k in rest if k.startswith(_PREFIX)):
        parts = key.split(".")
        for i in range(1, len(parts)):
            owners.setdefault(".".join(parts[:i]), []).append(".".join(parts[i:]))
    return owners


def _peft_saved_modules(
    model: nn.Module | None, config: dict[str, Any], rest: dict[str, torch.Tensor]
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """modules_to_save as PEFT resolves it, and the tensors it saved for them in lowrank's keys.

    PEFT (``_set_trainable``) takes every module whose name ends with an entry (a plain string
    suffix) and skips an entry that names no module: a ``task_type="SEQ_CLS"`` adapter lists
    both ``classifier`` and ``score`` whatever the head is called. Modules without tensors
    (a matched dropout) and those inside an already matched one are left out. Without the
    model (``model`` None) the modules are read off the file's tensor names (:func:`_owners`).
    """
    entries = config.get("modules_to_save") or []
    owners = _owners(model, rest)
    names: list[str] = []
    for name in owners:
        if any(name.endswith(e) for e in entries) and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        for k in owners[name]:
            if f"{_PREFIX}{name}.{k}" in rest:  # a missing one is reported by _load
                out[f"{name}::{k}"] = rest.pop(f"{_PREFIX}{name}.{k}")
    if rest:
        raise AdapterFileError(
            f"the PEFT adapter file holds tensors lowrank cannot map (e.g. {next(iter(rest))!r}); "
            "from_peft reads only the adapter tensors of nn.Linear layers and those of modules_to_save"
        )
    return names, out


def read_peft_dir(
    adapter_dir: str | os.PathLike, model: nn.Module | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A PEFT adapter directory as lowrank's (config, tensors) pair, what :func:`from_peft`
    loads: each adapted layer as the variant whose :attr:`~lowrank.Adapter.peft` has the file's
    peft_type and flags, with PEFT's tensors under lowrank's names. ``model`` (the base model)
    resolves modules_to_save as PEFT does; without it (``lowrank inspect``) they are read off
    the tensor names, and a VeRA file, whose layers' input sizes only the model knows, is refused.
    The config's ``format`` is ``PEFT <peft_type>`` and its ``writer`` the PEFT version."""
    config, tensors = _read_peft_dir(Path(adapter_dir))
    _refuse_unsupported(config)
    cls = _reader(config)
    found, rest = _peft_layers(tensors, cls.peft.tensors)
    layers = _READ_LAYERS[cls.peft.peft_type](cls, config, found, model, rest)
    ours: dict[str, torch.Tensor] = {}
    for name, ts in found.items():
        layers[name] = {
            "variant": cls.name,
            **layers[name],
            "tensors": {k: list(t.shape) for k, t in ts.items()},
        }
        ours.update({f"{name}::{k}": t for k, t in ts.items()})
    saved, saved_tensors = _peft_saved_modules(model, config, rest)
    ours.update(saved_tensors)
    return {
        "format": f"PEFT {cls.peft.peft_type}",
        "version": None,
        "writer": f"PEFT {config.get('peft_version', '(version not recorded)')}",
        "lowrank_version": None,
        "layers": layers,
        "modules_to_save": saved,
    }, ours


def from_peft(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Load a PEFT LoRA / rsLoRA / DoRA / VeRA adapter directory into ``model`` (in place).

    ``model`` is the plain base model the adapter was trained on. Every adapted layer becomes
    the matching lowrank adapter (``lora``, ``rslora``, ``dora`` or ``vera``: the variant whose
    :attr:`~lowrank.Adapter.peft` has the file's peft_type and flags) holding PEFT's tensors, so
    its outputs equal the PEFT model's and every lowrank analysis applies. Each layer's rank is
    read from its tensors and must be the one PEFT's ``r`` / ``rank_pattern`` give it; its
    alpha is PEFT's ``lora_alpha`` / ``alpha_pattern``, so each layer's scale is PEFT's.
    ``modules_to_save`` is resolved as PEFT resolves it: every module whose name ends with an
    entry, an entry that names no module skipped (a ``task_type="SEQ_CLS"`` adapter names
    ``classifier`` and ``score``); ``lr.inject``'s own ``modules_to_save`` stays strict.
    Adapters that need something lowrank has no equivalent for (biases, ``fan_in_fan_out``, a
    modified base from PiSSA/OLoRA initialisation, ``layers_to_transform`` ...) are refused,
    and loading is all or nothing as in :func:`~lowrank.io.load_adapters`. PEFT is not needed
    to read the files (:func:`read_peft_dir` reads them).
    """
    config, tensors = read_peft_dir(adapter_dir, model)
    layers = config["layers"]
    names = variant_class(next(iter(layers.values()))["variant"]).peft.tensors

    def label(owner: str, key: str) -> str:  # the file's own name of a tensor, for messages
        return f"{_PREFIX}{owner}.{names.get(key, key) if owner in layers else key}"

    return _load(model, config, tensors, label)


# --------------------------------------------------------------------------- writing
def _check_peft_saved(model: nn.Module, ads: dict[str, Adapter], saved: list[str], peft_type: str) -> None:
    """PEFT takes every module whose name ends with a modules_to_save entry (a plain string
    suffix): refuse an entry that would also take another module of the base model that has
    tensors, or one of PEFT's own submodules (``out`` ends ``q.lora_dropout``)."""
    names = [
        n
        for n, m in _named_modules(model).items()
        if m.state_dict() and not any(n.startswith(a + ".") for a in ads)
    ]
    names += [f"{a}.{x}" for a in ads for x in _PEFT_INNER[peft_type]]
    for entry in saved:
        for n in names:
            if n.endswith(entry) and not any(n == s or n.startswith(s + ".") for s in saved):
                raise ValueError(
                    f"modules_to_save entry {entry!r} would also take {n!r} in PEFT, which matches "
                    "these entries as plain name suffixes; rename the module or leave it out of "
                    "modules_to_save"
                )


def to_peft(model: nn.Module, adapter_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the adapters of ``model`` as a PEFT adapter directory.

    ``PeftModel.from_pretrained(base, adapter_dir)`` on the unmodified base model then gives
    the same outputs. Each adapter is written as its :meth:`~lowrank.Adapter.peft_export` says:
    ``lora``, ``rslora`` and ``dora`` as PEFT LoRA (with ``use_rslora`` / ``use_dora``), ``vera``
    as PEFT VeRA, and ``pissa``, ``milora``, ``frobenius`` and ``random_alignment`` as plain PEFT
    LoRA with the same ΔW: those that train on a residual W₀ − s·B₀A₀ (PiSSA, MiLoRA, Frobenius
    ``closed_form``) as the rank-2r LoRA ΔW = s·[B, −B₀][A; A₀] over W₀ itself. Their variant
    name does not survive (``from_peft`` reads them back as ``lora`` adapters with the same
    outputs), nor does what only shapes training: random alignment's frozen A becomes trainable
    in PEFT, Frobenius's penalty is not in the file. All layers must share one PEFT type and one
    dropout; ranks and alphas may differ (written as PEFT's ``rank_pattern`` /
    ``alpha_pattern``). VeRA needs one rank and the shared projection PEFT would draw: inject it
    with ``projection_shape`` = the largest (out, in) among the adapted layers. A
    ``modules_to_save`` name that PEFT's suffix matching would also apply to another module is
    refused. The directory is written atomically; an existing one is replaced only with
    ``overwrite=True``.
    """
    path, ads = _writable(model, adapter_dir, overwrite, "export")
    exported = {name: ad.peft_export() for name, ad in ads.items()}
    bad = sorted({ads[name].name for name, e in exported.items() if e is None})
    if bad:
        raise ValueError(
            f"to_peft writes only adapters that PEFT has a format for, not {bad[0]!r}; "
            "save it with lr.save_adapters instead"
        )
    readers = [c.name for c in _peft_variants()]
    _uniform(
        {n: _reader({"peft_type": f.peft_type, **f.config}).name for n, (f, _, _, _) in exported.items()},
        f"PEFT adapter type ({', '.join(readers[:-1])} or {readers[-1]})",
    )
    fmt = next(iter(exported.values()))[0]
    dropout = _uniform({n: ad.dropout_p for n, ad in ads.items()}, "dropout")
    tensors = _saved_tensors(model, lambda name, k: f"{_PREFIX}{name}.{k}")
    for name, (_, state, _, _) in exported.items():
        for ours, theirs in fmt.tensors.items():
            key = f"{_PREFIX}{name}.{theirs}"
            tensors[key] = _host(state[ours], key)
    saved = list(getattr(model, "lowrank_modules_to_save", []))
    _check_peft_saved(model, ads, saved, fmt.peft_type)
    own, shared = _WRITE_FIELDS[fmt.peft_type](ads, exported, dropout)
    config = {
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": saved or None,
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        # a regex matched with re.fullmatch: exactly these modules, nothing that ends alike
        "target_modules": "(?:" + "|".join(re.escape(n) for n in ads) + ")",
        "peft_type": fmt.peft_type,
        **fmt.config,
        **own,
    }
    return _write_dir(path, {PEFT_TENSORS: {**tensors, **shared}, PEFT_CONFIG: config})
