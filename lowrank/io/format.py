"""lowrank's adapter file format: a directory with ``adapter.safetensors`` and ``adapter_config.json``.

The config lists every adapted layer (variant, options, shape, tensor shapes) and the
``modules_to_save``; the tensors are keyed ``<layer>::<name>`` (``adapter_state()`` names, or a
module's ``state_dict()`` keys). Reading validates it as a file format only; whether it fits a
model is :mod:`lowrank.io.load`'s question. The directory helpers here serve PEFT's format too.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .._version import __version__
from ..adapters.base import Adapter
from ..files import atomic_path
from ..inject import adapters

FORMAT = "lowrank-adapter"
FORMAT_VERSION = 1
TENSORS = "adapter.safetensors"
CONFIG = "adapter_config.json"


class AdapterFileError(ValueError):
    """An adapter directory that cannot be loaded into this model."""


# --------------------------------------------------------------------------- directories
def _writable(
    model: nn.Module, path: str | os.PathLike, overwrite: bool, verb: str
) -> tuple[Path, dict[str, Adapter]]:
    """The adapters to write and the destination, refusing an empty model, a path that is a
    file or, without ``overwrite``, an existing path."""
    ads = adapters(model)
    if not ads:
        raise ValueError(f"the model has no adapters to {verb}; call lr.inject(model, ...) first")
    path = Path(path)
    if path.is_file():
        raise FileExistsError(f"{path} is a file, not an adapter directory; choose another path")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True or choose another path")
    return path, ads


def _host(t: torch.Tensor, label: str) -> torch.Tensor:
    """``t`` as a contiguous CPU tensor to write, refusing a meta tensor (which has no data)."""
    if t.is_meta:
        raise ValueError(
            f"tensor {label} is on the meta device and has no data yet; materialise the model "
            "first (e.g. model.to_empty(device='cpu') and load its weights), then save"
        )
    return t.detach().contiguous().cpu()


def _saved_tensors(model: nn.Module, label: Callable[[str, str], str]) -> dict[str, torch.Tensor]:
    """The tensors of the model's ``modules_to_save``, keyed by ``label(module, key)``."""
    out = {}
    for name in getattr(model, "lowrank_modules_to_save", []):
        for k, v in model.get_submodule(name).state_dict().items():
            out[label(name, k)] = _host(v, label(name, k))
    return out


def _write_dir(path: Path, files: dict[str, Any]) -> Path:
    """Write ``files`` ({name: tensor dict (safetensors) or JSON object}) as the directory
    ``path`` atomically (:func:`lowrank.files.atomic_path`), replacing an existing ``path``.
    Every file gets the permissions of a file Python creates under the umask (the JSON's):
    safetensors writes its own private (0600) file."""
    tensors = {name for name in files if name.endswith(".safetensors")}
    with atomic_path(path) as tmp:
        tmp.mkdir()
        for name in files.keys() - tensors:
            (tmp / name).write_text(json.dumps(files[name], indent=2, sort_keys=True))
        mode = stat.S_IMODE((tmp / next(iter(files.keys() - tensors))).stat().st_mode)
        for name in tensors:
            save_file(files[name], tmp / name)
            os.chmod(tmp / name, mode)
    return path


def _read_dir(
    path: Path, config_name: str, tensors_name: str, kind: str, writer: str
) -> tuple[Any, dict[str, torch.Tensor]]:
    """(parsed JSON config, tensors) of an adapter directory; one sentence for each way it
    can be broken (missing files, invalid JSON, damaged safetensors)."""
    if not (path / config_name).is_file() or not (path / tensors_name).is_file():
        raise AdapterFileError(
            f"{path} is not a {kind} adapter directory (needs {config_name} and {tensors_name}); "
            f"pass the directory written by {writer}"
        )
    try:
        config = json.loads((path / config_name).read_text())
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{path / config_name} is not valid JSON ({e}); re-save the adapter") from e
    try:
        tensors = load_file(path / tensors_name)
    except (SafetensorError, OSError) as e:
        raise AdapterFileError(f"{path / tensors_name} is damaged ({e}); re-save the adapter") from e
    return config, tensors


# --------------------------------------------------------------------------- lowrank's format
def save_adapters(model: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write every adapter of ``model`` (and its ``modules_to_save``) to the directory ``path``.

    The directory is written next to its destination and renamed into place, so a crash never
    leaves a half-written adapter. An existing ``path`` is replaced only with ``overwrite=True``.
    """
    path, ads = _writable(model, path, overwrite, "save")
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
        tensors.update({f"{name}::{k}": _host(v, f"{name}::{k}") for k, v in state.items()})
    tensors.update(_saved_tensors(model, lambda name, k: f"{name}::{k}"))
    config = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "lowrank_version": __version__,
        "layers": layers,
        "modules_to_save": list(getattr(model, "lowrank_modules_to_save", [])),
    }
    return _write_dir(path, {TENSORS: tensors, CONFIG: config})


# Each field of a layer's entry in adapter_config.json, its type, and how to say it.
_LAYER_FIELDS = {
    "variant": (str, "a variant name"),
    "options": (dict, "a mapping of options"),
    "in_features": (int, "an integer"),
    "out_features": (int, "an integer"),
    "tensors": (dict, "a mapping of tensor names to shapes"),
}


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    )


def _check_layer(name: str, spec: Any, bad: Callable[[str], AdapterFileError]) -> None:
    """One layer's entry: a mapping with every field of :data:`_LAYER_FIELDS` and shapes."""
    if not isinstance(spec, dict):
        raise bad(f"layer {name!r} is {spec!r}, not a mapping")
    for key, (kind, what) in _LAYER_FIELDS.items():
        if key not in spec:
            raise bad(f"layer {name!r} has no {key!r}")
        if not isinstance(spec[key], kind) or isinstance(spec[key], bool):
            raise bad(f"layer {name!r} has {key}={spec[key]!r}, not {what}")
    for k, shape in spec["tensors"].items():
        if not _is_shape(shape):
            raise bad(f"tensor {name}::{k} has shape {shape!r}, not a list of sizes")


def _check_schema(config: dict[str, Any], where: Path) -> None:
    """The structure and types of a lowrank adapter_config.json, one sentence per defect."""

    def bad(what: str) -> AdapterFileError:
        return AdapterFileError(f"{where}: {what}; re-save the adapter with lr.save_adapters")

    if "layers" not in config:
        raise bad("has no 'layers'")
    if not isinstance(config["layers"], dict):
        raise bad(f"'layers' is {config['layers']!r}, not a mapping of layer names")
    for name, spec in config["layers"].items():
        _check_layer(name, spec, bad)
    saved = config.get("modules_to_save", [])
    if not (isinstance(saved, list) and all(isinstance(n, str) for n in saved)):
        raise bad(f"modules_to_save is {saved!r}, not a list of module names")


def _check_listing(config: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> None:
    """The tensors file holds exactly the tensors the config lists (plus modules_to_save's)."""
    listed = {
        f"{name}::{k}": shape
        for name, spec in config["layers"].items()
        for k, shape in spec["tensors"].items()
    }
    saved = set(config.get("modules_to_save", []))
    for key, shape in listed.items():
        if key not in tensors:
            raise AdapterFileError(
                f"{path / TENSORS} lacks tensor {key!r}, which {CONFIG} lists; "
                "re-save the adapter with lr.save_adapters"
            )
        if list(tensors[key].shape) != shape:
            raise AdapterFileError(
                f"tensor {key!r} is {tuple(tensors[key].shape)} in {TENSORS} but {tuple(shape)} in "
                f"{CONFIG}; re-save the adapter with lr.save_adapters"
            )
    for key in tensors:
        if key not in listed and key.partition("::")[0] not in saved:
            raise AdapterFileError(
                f"{path / TENSORS} holds tensor {key!r}, which {CONFIG} does not list; re-save "
                "the adapter with lr.save_adapters"
            )


def read_adapter_dir(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The (config, tensors) of a saved adapter directory, validated as a file format: the
    config's structure and types, and tensors that are exactly the ones it lists."""
    path = Path(path)
    config, tensors = _read_dir(path, CONFIG, TENSORS, "lowrank", "lr.save_adapters")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise AdapterFileError(f"{path / CONFIG} is not a lowrank adapter config; re-save it")
    if config.get("version") != FORMAT_VERSION:
        raise AdapterFileError(
            f"{path} uses adapter format version {config.get('version')!r}, this lowrank "
            f"({__version__}) reads version {FORMAT_VERSION}; upgrade lowrank or re-save"
        )
    _check_schema(config, path / CONFIG)
    _check_listing(config, tensors, path)
    return config, tensors
