"""Save and load adapters: a directory with ``adapter.safetensors`` and ``adapter_config.json``.

Nothing is ever unpickled. Loading checks the format version, every layer's name, variant and
shape, and every tensor's shape before touching the model, so a mismatched file leaves the
model in memory as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .adapters.base import Adapter, make
from .inject import _named_modules, _set_module, adapters

FORMAT = "lowrank-adapter"
FORMAT_VERSION = 1
TENSORS = "adapter.safetensors"
CONFIG = "adapter_config.json"


class AdapterFileError(ValueError):
    """An adapter directory that cannot be loaded into this model."""


def save_adapters(model: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write every adapter of ``model`` (and its ``modules_to_save``) to the directory ``path``.

    The directory is written next to its destination and renamed into place, so a crash never
    leaves a half-written adapter. An existing ``path`` is replaced only with ``overwrite=True``.
    """
    path = Path(path)
    ads = adapters(model)
    if not ads:
        raise ValueError("the model has no adapters to save; call lr.inject(model, ...) first")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True or choose another path")
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for name, ad in ads.items():
        state = ad.adapter_state()
        layers[name] = {
            "variant": ad.name,
            "options": ad.config(),
            "in_features": ad.in_features,
            "out_features": ad.out_features,
            "tensors": {k: list(v.shape) for k, v in state.items()},
        }
        tensors.update({f"{name}::{k}": v.detach().contiguous().cpu() for k, v in state.items()})
    saved = list(getattr(model, "lowrank_modules_to_save", []))
    for name in saved:
        for k, v in model.get_submodule(name).state_dict().items():
            tensors[f"{name}::{k}"] = v.detach().contiguous().cpu()
    config = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "lowrank_version": __version__,
        "layers": layers,
        "modules_to_save": saved,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(tensors, tmp / TENSORS)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_adapter_dir(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The (config, tensors) of a saved adapter directory, validated as a file format."""
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / TENSORS).is_file():
        raise AdapterFileError(
            f"{path} is not a lowrank adapter directory (needs {CONFIG} and {TENSORS}); "
            "pass the directory written by lr.save_adapters"
        )
    try:
        config = json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{path / CONFIG} is not valid JSON ({e}); re-save the adapter") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise AdapterFileError(f"{path / CONFIG} is not a lowrank adapter config; re-save it")
    if config.get("version") != FORMAT_VERSION:
        raise AdapterFileError(
            f"{path} uses adapter format version {config.get('version')!r}, this lowrank "
            f"({__version__}) reads version {FORMAT_VERSION}; upgrade lowrank or re-save"
        )
    try:
        tensors = load_file(path / TENSORS)
    except (SafetensorError, OSError) as e:
        raise AdapterFileError(f"{path / TENSORS} is damaged ({e}); re-save the adapter") from e
    return config, tensors


def _check(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    modules = _named_modules(model)
    for name, spec in config["layers"].items():
        mod = modules.get(name)
        if mod is None:
            raise AdapterFileError(
                f"the file adapts layer {name!r}, which this model does not have; load it into "
                "the model it was trained on"
            )
        if not isinstance(mod, (nn.Linear, Adapter)):
            raise AdapterFileError(f"layer {name!r} is a {type(mod).__name__}, not a Linear")
        shape = (mod.out_features, mod.in_features)
        if shape != (spec["out_features"], spec["in_features"]):
            raise AdapterFileError(
                f"layer {name!r} is {shape[0]}x{shape[1]} here but "
                f"{spec['out_features']}x{spec['in_features']} in the file; load it into the "
                "model it was trained on"
            )
        if isinstance(mod, Adapter) and mod.name != spec["variant"]:
            raise AdapterFileError(
                f"layer {name!r} holds a {mod.name!r} adapter but the file has {spec['variant']!r}; "
                "load into a model without adapters or with the same variant"
            )
        for k, shp in spec["tensors"].items():
            t = tensors.get(f"{name}::{k}")
            if t is None or list(t.shape) != shp:
                raise AdapterFileError(f"tensor {name}::{k} is missing or misshapen in the file")
        if isinstance(mod, Adapter):
            mine = {k: v for k, v in mod.config().items() if k != "seed"}
            theirs = {k: v for k, v in spec["options"].items() if k != "seed"}
            if mine != theirs:
                diff = {k: (mine.get(k), theirs.get(k)) for k in mine.keys() | theirs.keys()
                        if mine.get(k) != theirs.get(k)}
                raise AdapterFileError(
                    f"layer {name!r} holds a {mod.name!r} adapter but the file has other options "
                    f"(here vs file: {diff}); load into a model without adapters, or inject "
                    "with the file's options first"
                )
    for name in config.get("modules_to_save", []):
        if name not in modules:
            raise AdapterFileError(f"modules_to_save entry {name!r} is not in this model")
        for k, v in modules[name].state_dict().items():
            t = tensors.get(f"{name}::{k}")
            if t is None or t.shape != v.shape:
                raise AdapterFileError(
                    f"tensor {name}::{k} has shape {None if t is None else tuple(t.shape)} in "
                    f"the file but {tuple(v.shape)} in the model; load into the matching model"
                )


@torch.no_grad()
def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a saved adapter directory into ``model`` (in place) and return it.

    Layers that are plain ``nn.Linear`` are wrapped with the saved variant and options first;
    layers that already hold an adapter must be of the same variant. Everything is checked
    before the model is modified.
    """
    config, tensors = read_adapter_dir(path)
    _check(model, config, tensors)
    modules = _named_modules(model)
    built = {
        name: make(spec["variant"], modules[name], **spec["options"])
        for name, spec in config["layers"].items()
        if not isinstance(modules[name], Adapter)
    }
    # Freeze what is outside the adapters (as inject does); adapters keep their own flags.
    inside = {id(p) for ad in adapters(model).values() for p in ad.parameters()}
    inside |= {id(p) for ad in built.values() for p in ad.parameters()}
    for p in model.parameters():
        if id(p) not in inside:
            p.requires_grad_(False)
    for name, spec in config["layers"].items():
        if name in built:  # a shared Linear gets the same adapter under every name
            linear = modules[name]
            for other, m in modules.items():
                if m is linear:
                    _set_module(model, other, built[name])
        mod = model.get_submodule(name)
        was_merged = mod.merged
        mod.unmerge()
        ref = mod.base.weight
        mod.load_adapter_state(
            {k: tensors[f"{name}::{k}"].to(device=ref.device, dtype=ref.dtype)
             for k in spec["tensors"]}
        )
        if was_merged:
            mod.merge()
    saved = config.get("modules_to_save", [])
    for name in saved:
        sub = model.get_submodule(name)
        sub.load_state_dict({k: tensors[f"{name}::{k}"] for k in sub.state_dict()})
        sub.requires_grad_(True)
    model.lowrank_modules_to_save = list(saved)
    return model
