"""Save and load adapters: a directory with ``adapter.safetensors`` and ``adapter_config.json``.

Nothing is ever unpickled. Loading checks the format version, every layer's name, variant and
shape, and every tensor's shape before touching the model, so a mismatched file leaves the
model in memory as it was.
"""

from __future__ import annotations

import json
import os
import re
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


def _writable(model: nn.Module, path: str | os.PathLike, overwrite: bool, verb: str
              ) -> tuple[Path, dict[str, Adapter]]:
    """The adapters to write and the destination, refusing an empty model or, without
    ``overwrite``, an existing path."""
    ads = adapters(model)
    if not ads:
        raise ValueError(f"the model has no adapters to {verb}; call lr.inject(model, ...) first")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True or choose another path")
    return path, ads


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
    return _write_dir(path, {TENSORS: tensors, CONFIG: config})


def _write_dir(path: Path, files: dict[str, Any]) -> Path:
    """Write ``files`` ({name: tensor dict (safetensors) or JSON object}) as the directory
    ``path``: built next to it and renamed into place, replacing an existing ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        for name, content in files.items():
            if name.endswith(".safetensors"):
                save_file(content, tmp / name)
            else:
                (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True))
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


def _read_dir(path: Path, config_name: str, tensors_name: str, kind: str, writer: str
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


def read_adapter_dir(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The (config, tensors) of a saved adapter directory, validated as a file format."""
    path = Path(path)
    config, tensors = _read_dir(path, CONFIG, TENSORS, "lowrank", "lr.save_adapters")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise AdapterFileError(f"{path / CONFIG} is not a lowrank adapter config; re-save it")
    if config.get("version") != FORMAT_VERSION:
        raise AdapterFileError(
            f"{path} uses adapter format version {config.get('version')!r}, this lowrank "
            f"({__version__}) reads version {FORMAT_VERSION}; upgrade lowrank or re-save"
        )
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
    return _load(model, config, tensors)


@torch.no_grad()
def _load(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Check, then wrap and fill ``model`` from a lowrank (config, tensors) pair."""
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


# --------------------------------------------------------------------------- PEFT interop
# PEFT's adapter format, read and written directly (PEFT itself is not imported):
# adapter_config.json + adapter_model.safetensors with keys
#   base_model.model.<layer>.lora_A.weight (r × in), .lora_B.weight (out × r),
#   base_model.model.<layer>.lora_magnitude_vector (out; DoRA),
#   base_model.model.<layer>.vera_lambda_b (out), .vera_lambda_d (r),
#   base_model.vera_A (r × in_max), base_model.vera_B (out_max × r) (VeRA, save_projection),
#   base_model.model.<module>.<param> for modules_to_save.
PEFT_CONFIG = "adapter_config.json"
PEFT_TENSORS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_LORA_KEYS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "m"}
_VERA_KEYS = {"vera_lambda_b": "b", "vera_lambda_d": "d"}
# Config fields of PEFT extensions that lowrank has no equivalent for (refused when set).
_UNSUPPORTED = ("layers_to_transform", "layer_replication", "alpha_pattern", "target_parameters",
                "trainable_token_indices", "use_qalora", "alora_invocation_tokens", "lora_bias",
                "use_bdlora", "arrow_config", "monteclora_config")
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq")


def _read_peft_dir(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config, tensors = _read_dir(path, PEFT_CONFIG, PEFT_TENSORS, "PEFT",
                                "PeftModel.save_pretrained")
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path / PEFT_CONFIG} is not a PEFT adapter config")
    return config, tensors


def _check_peft_config(config: dict[str, Any]) -> None:
    """Refuse, in one sentence each, the PEFT options lowrank cannot represent."""
    if config.get("bias", "none") != "none":
        raise AdapterFileError(
            f"the PEFT adapter trains biases (bias={config['bias']!r}), which lowrank adapters do "
            "not hold; use an adapter trained with bias='none'"
        )
    if config.get("fan_in_fan_out"):
        raise AdapterFileError(
            "the PEFT adapter has fan_in_fan_out=True (transposed Conv1D weights, as in GPT-2); "
            "lowrank adapts nn.Linear layers only"
        )
    for key in _UNSUPPORTED:
        if config.get(key):
            raise AdapterFileError(
                f"the PEFT adapter sets {key}={config[key]!r}, which lowrank does not support; "
                "use an adapter trained without it"
            )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
        raise AdapterFileError(
            f"the PEFT adapter was initialised with init_lora_weights={init!r}, so it belongs to "
            "a modified base model; convert it to a plain LoRA first (PEFT's "
            "path_initial_model_for_weight_conversion)"
        )


def _peft_layers(tensors: dict[str, torch.Tensor], keys: dict[str, str]
                 ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Split PEFT's tensors into {layer: {our name: tensor}} and the remaining tensors."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        for suffix, ours in keys.items():
            if key.startswith(_PREFIX) and key.endswith("." + suffix):
                layers.setdefault(key[len(_PREFIX):-len(suffix) - 1], {})[ours] = t
                break
        else:
            rest[key] = t
    if not layers:
        raise AdapterFileError("the PEFT adapter file holds no adapter tensors for nn.Linear layers")
    return layers, rest


def _saved_modules(model: nn.Module, config: dict[str, Any], rest: dict[str, torch.Tensor]
                   ) -> tuple[list[str], dict[str, torch.Tensor]]:
    """modules_to_save: the modules PEFT saved whole, and their tensors in lowrank's keys."""
    from .inject import find_modules

    names = find_modules(model, config.get("modules_to_save") or [])
    out: dict[str, torch.Tensor] = {}
    for name in names:
        for k in model.get_submodule(name).state_dict():
            t = rest.pop(f"{_PREFIX}{name}.{k}", None)
            if t is not None:
                out[f"{name}::{k}"] = t
    if rest:
        raise AdapterFileError(
            f"the PEFT adapter file holds tensors lowrank cannot map (e.g. {next(iter(rest))!r}); "
            "only LoRA, rsLoRA, DoRA and VeRA adapters on nn.Linear layers are supported"
        )
    return names, out


def from_peft(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Load a PEFT LoRA / rsLoRA / DoRA / VeRA adapter directory into ``model`` (in place).

    ``model`` is the plain base model the adapter was trained on. Every adapted layer becomes
    the matching lowrank adapter (``lora``, ``rslora``, ``dora`` or ``vera``) holding PEFT's
    tensors, so its outputs equal the PEFT model's and every lowrank analysis applies. Each
    layer's rank is read from its tensors (so PEFT's ``rank_pattern`` is honoured). Adapters
    that need something lowrank has no equivalent for (biases, ``fan_in_fan_out``, a modified
    base from PiSSA/OLoRA initialisation, ``alpha_pattern`` ...) are refused before the model
    is touched. PEFT is not needed to read the files.
    """
    config, tensors = _read_peft_dir(Path(adapter_dir))
    _check_peft_config(config)
    kind = config.get("peft_type")
    modules = _named_modules(model)
    layers: dict[str, Any] = {}
    ours: dict[str, torch.Tensor] = {}
    if kind == "LORA":
        if config.get("use_dora") and config.get("use_rslora"):
            raise AdapterFileError("the PEFT adapter combines use_dora and use_rslora, which "
                                   "lowrank's dora (scale alpha/r) cannot represent")
        variant = "dora" if config.get("use_dora") else "rslora" if config.get("use_rslora") else "lora"
        found, rest = _peft_layers(tensors, _LORA_KEYS)
        for name, ts in found.items():
            need = {"A", "B", "m"} if variant == "dora" else {"A", "B"}
            if set(ts) != need:
                raise AdapterFileError(f"layer {name!r} has tensors {sorted(ts)} in the PEFT file "
                                       f"but a {variant} adapter needs {sorted(need)}")
            rank, in_f = ts["A"].shape
            options = {"rank": rank, "alpha": float(config.get("lora_alpha", 8)),
                       "dropout": float(config.get("lora_dropout", 0.0)), "seed": 0}
            layers[name] = {"variant": variant, "options": options, "in_features": in_f,
                            "out_features": ts["B"].shape[0],
                            "tensors": {k: list(t.shape) for k, t in ts.items()}}
            ours.update({f"{name}::{k}": t for k, t in ts.items()})
    elif kind == "VERA":
        found, rest = _peft_layers(tensors, _VERA_KEYS)
        shapes = {}
        for name in found:
            mod = modules.get(name)
            if not isinstance(mod, nn.Linear):
                raise AdapterFileError(f"the PEFT adapter adapts {name!r}, which is not an nn.Linear "
                                       "of this model; load it into the model it was trained on")
            shapes[name] = (mod.out_features, mod.in_features)
        proj = (max(o for o, _ in shapes.values()), max(i for _, i in shapes.values()))
        rank, seed = int(config.get("r", 256)), int(config.get("projection_prng_key", 0))
        _check_vera_projections(rest, seed, rank, proj)
        for name, ts in found.items():
            if set(ts) != {"b", "d"} or ts["d"].shape != (rank,):
                raise AdapterFileError(f"layer {name!r} needs vera_lambda_b and a vera_lambda_d of "
                                       f"length r={rank} in the PEFT file")
            options = {"rank": rank, "alpha": float(rank),
                       "dropout": float(config.get("vera_dropout", 0.0)), "seed": 0,
                       "d_initial": float(config.get("d_initial", 0.1)),
                       "projection_seed": seed, "projection_shape": list(proj)}
            layers[name] = {"variant": "vera", "options": options, "in_features": shapes[name][1],
                            "out_features": shapes[name][0],
                            "tensors": {k: list(t.shape) for k, t in ts.items()}}
            ours.update({f"{name}::{k}": t for k, t in ts.items()})
    else:
        raise AdapterFileError(
            f"peft_type {kind!r} is not supported; from_peft reads LORA (LoRA, rsLoRA, DoRA) and "
            "VERA adapters"
        )
    saved, saved_tensors = _saved_modules(model, config, rest)
    ours.update(saved_tensors)
    lowrank_config = {"format": FORMAT, "version": FORMAT_VERSION, "lowrank_version": __version__,
                      "layers": layers, "modules_to_save": saved}
    return _load(model, lowrank_config, ours)


def _check_vera_projections(rest: dict[str, torch.Tensor], seed: int, rank: int,
                            shape: tuple[int, int]) -> None:
    """Saved vera_A / vera_B (save_projection=True) must be the pair lowrank draws from the seed."""
    from .adapters.vera import projections

    A, B = projections(seed, rank, *shape)
    for key, mine in (("base_model.vera_A", A), ("base_model.vera_B", B)):
        theirs = rest.pop(key, None)
        if theirs is not None and (theirs.shape != mine.shape
                                   or not torch.allclose(theirs.float(), mine, atol=1e-6)):
            raise AdapterFileError(
                f"{key} in the PEFT file is not the projection drawn from projection_prng_key="
                f"{seed} for the adapted layers' shape {shape}; load it into the model it was "
                "trained on"
            )


def _uniform(ads: dict[str, Adapter], what: str, get: Any) -> Any:
    values = {name: get(ad) for name, ad in ads.items()}
    if len(set(map(str, values.values()))) > 1:
        raise ValueError(f"to_peft needs one {what} for every adapter, got {values}; "
                         "inject with a single setting")
    return next(iter(values.values()))


def to_peft(model: nn.Module, adapter_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the adapters of ``model`` as a PEFT adapter directory (``lora``, ``rslora``,
    ``dora`` or ``vera``, one variant, rank, alpha and dropout for all layers).

    ``PeftModel.from_pretrained(base, adapter_dir)`` then gives the same outputs. VeRA needs the
    shared projection PEFT would draw: inject it with ``projection_shape`` = the largest
    (out, in) among the adapted layers. The directory is written atomically; an existing one is
    replaced only with ``overwrite=True``.
    """
    path, ads = _writable(model, adapter_dir, overwrite, "export")
    variant = _uniform(ads, "variant", lambda ad: ad.name)
    if variant not in ("lora", "rslora", "dora", "vera"):
        raise ValueError(f"to_peft writes lora, rslora, dora and vera adapters, not {variant!r}; "
                         "PEFT has no equivalent format for it")
    rank = _uniform(ads, "rank", lambda ad: ad.rank)
    dropout = _uniform(ads, "dropout", lambda ad: ad.dropout_p)
    saved = list(getattr(model, "lowrank_modules_to_save", []))
    tensors: dict[str, torch.Tensor] = {}
    for name in saved:
        for k, v in model.get_submodule(name).state_dict().items():
            tensors[f"{_PREFIX}{name}.{k}"] = v.detach().contiguous().cpu()
    common = {"bias": "none", "fan_in_fan_out": False, "inference_mode": True, "r": rank,
              "modules_to_save": saved or None, "task_type": None,
              "base_model_name_or_path": None, "revision": None,
              # a regex matched with re.fullmatch: exactly these modules, nothing that ends alike
              "target_modules": "(?:" + "|".join(re.escape(n) for n in ads) + ")"}
    if variant == "vera":
        seed = _uniform(ads, "projection_seed", lambda ad: ad.projection_seed)
        shape = _uniform(ads, "projection_shape", lambda ad: tuple(ad.projection_shape))
        largest = (max(ad.out_features for ad in ads.values()),
                   max(ad.in_features for ad in ads.values()))
        if shape != largest:
            raise ValueError(
                f"the vera adapters use projection_shape={shape} but PEFT draws one of the largest "
                f"adapted shape {largest}; inject with projection_shape={largest}"
            )
        from .adapters.vera import projections

        A, B = projections(seed, rank, *shape)
        tensors["base_model.vera_A"], tensors["base_model.vera_B"] = A.contiguous(), B.contiguous()
        for name, ad in ads.items():
            tensors[f"{_PREFIX}{name}.vera_lambda_b"] = ad.b.detach().contiguous().cpu()
            tensors[f"{_PREFIX}{name}.vera_lambda_d"] = ad.d.detach().contiguous().cpu()
        config = {**common, "peft_type": "VERA", "projection_prng_key": seed,
                  "save_projection": True, "vera_dropout": dropout,
                  "d_initial": _uniform(ads, "d_initial", lambda ad: ad.d_initial),
                  "init_weights": True}
    else:
        alpha = _uniform(ads, "alpha", lambda ad: ad.alpha)
        for name, ad in ads.items():
            tensors[f"{_PREFIX}{name}.lora_A.weight"] = ad.A.detach().contiguous().cpu()
            tensors[f"{_PREFIX}{name}.lora_B.weight"] = ad.B.detach().contiguous().cpu()
            if variant == "dora":
                tensors[f"{_PREFIX}{name}.lora_magnitude_vector"] = ad.m.detach().contiguous().cpu()
        config = {**common, "peft_type": "LORA", "lora_alpha": alpha, "lora_dropout": dropout,
                  "use_rslora": variant == "rslora", "use_dora": variant == "dora",
                  "init_lora_weights": True}
    return _write_dir(path, {PEFT_TENSORS: tensors, PEFT_CONFIG: config})
