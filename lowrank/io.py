"""Save and load adapters: a directory with ``adapter.safetensors`` and ``adapter_config.json``.

Nothing is ever unpickled. Loading is all or nothing: the config's structure, every layer's
name, variant and shape, and every tensor's name and shape (against the adapter the file's
options build) are checked, and every new adapter is built on the side, before the model is
touched; a file that fails leaves the model in memory as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ._version import __version__
from .adapters.base import Adapter, make, variants
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


def _host(t: torch.Tensor, label: str) -> torch.Tensor:
    """``t`` as a contiguous CPU tensor to write, refusing a meta tensor (which has no data)."""
    if t.is_meta:
        raise ValueError(
            f"tensor {label} is on the meta device and has no data yet; materialise the model "
            "first (e.g. model.to_empty(device='cpu') and load its weights), then save"
        )
    return t.detach().contiguous().cpu()


def _saved_tensors(model: nn.Module, label: Callable[[str, str], str]
                   ) -> dict[str, torch.Tensor]:
    """The tensors of the model's ``modules_to_save``, keyed by ``label(module, key)``."""
    out = {}
    for name in getattr(model, "lowrank_modules_to_save", []):
        for k, v in model.get_submodule(name).state_dict().items():
            out[label(name, k)] = _host(v, label(name, k))
    return out


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


# Each field of a layer's entry in adapter_config.json, its type, and how to say it.
_LAYER_FIELDS = {"variant": (str, "a variant name"), "options": (dict, "a mapping of options"),
                 "in_features": (int, "an integer"), "out_features": (int, "an integer"),
                 "tensors": (dict, "a mapping of tensor names to shapes")}


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)


def _check_schema(config: dict[str, Any], where: Path) -> None:
    """The structure and types of a lowrank adapter_config.json, one sentence per defect."""
    def bad(what: str) -> AdapterFileError:
        return AdapterFileError(f"{where}: {what}; re-save the adapter with lr.save_adapters")

    if "layers" not in config:
        raise bad("has no 'layers'")
    if not isinstance(config["layers"], dict):
        raise bad(f"'layers' is {config['layers']!r}, not a mapping of layer names")
    for name, spec in config["layers"].items():
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
    saved = config.get("modules_to_save", [])
    if not (isinstance(saved, list) and all(isinstance(n, str) for n in saved)):
        raise bad(f"modules_to_save is {saved!r}, not a list of module names")


def _check_listing(config: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> None:
    """The tensors file holds exactly the tensors the config lists (plus modules_to_save's)."""
    listed = {f"{name}::{k}": shape for name, spec in config["layers"].items()
              for k, shape in spec["tensors"].items()}
    saved = set(config.get("modules_to_save", []))
    for key, shape in listed.items():
        if key not in tensors:
            raise AdapterFileError(f"{path / TENSORS} lacks tensor {key!r}, which {CONFIG} lists; "
                                   "re-save the adapter with lr.save_adapters")
        if list(tensors[key].shape) != shape:
            raise AdapterFileError(
                f"tensor {key!r} is {tuple(tensors[key].shape)} in {TENSORS} but {tuple(shape)} in "
                f"{CONFIG}; re-save the adapter with lr.save_adapters")
    for key in tensors:
        if key not in listed and key.partition("::")[0] not in saved:
            raise AdapterFileError(
                f"{path / TENSORS} holds tensor {key!r}, which {CONFIG} does not list; re-save "
                "the adapter with lr.save_adapters")


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


def _label(layer: str, key: str, peft: dict[str, str] | None) -> str:
    """How the file names a tensor, for messages: lowrank's ``layer::key`` or, for a PEFT
    file (``peft`` = our names to PEFT's), ``base_model.model.<layer>.<PEFT's name>``."""
    return f"{layer}::{key}" if peft is None else f"{_PREFIX}{layer}.{peft.get(key, key)}"


def _same_tensors(have: dict[str, torch.Tensor], want: dict[str, torch.Tensor], owner: str,
                  what: str, peft: dict[str, str] | None) -> None:
    """The file's tensors ``have`` for ``owner`` must be ``want``'s names and shapes exactly."""
    for k in [*want, *(k for k in have if k not in want)]:
        mine = tuple(want[k].shape) if k in want else None
        theirs = tuple(have[k].shape) if k in have else None
        if mine != theirs:
            raise AdapterFileError(
                f"tensor {_label(owner, k, peft)} is {theirs or 'absent'} in the file but "
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


def _prepare(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor],
             peft: dict[str, str] | None) -> tuple[dict[str, Adapter], dict[int, Adapter]]:
    """Check everything against ``model`` and build the new adapters, without changing the
    model: ({layer: the adapter to load}, {id(Linear): its new adapter})."""
    modules = _named_modules(model)
    targets: dict[str, Adapter] = {}
    new: dict[int, Adapter] = {}  # one adapter per Linear, even if it has several names
    for name, spec in config["layers"].items():
        mod = modules.get(name)
        if mod is None:
            raise AdapterFileError(
                f"the file adapts layer {name!r}, which this model does not have; load it into "
                "the model it was trained on"
            )
        if not isinstance(mod, (nn.Linear, Adapter)):
            raise AdapterFileError(f"layer {name!r} is a {type(mod).__name__}, not a Linear; load "
                                   "the file into the model it was trained on")
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
        if isinstance(mod, Adapter):
            _same_variant(name, mod, spec)
            targets[name] = mod
        else:
            if id(mod) not in new:
                new[id(mod)] = _build(name, spec, mod)
            targets[name] = new[id(mod)]
        have = {k: tensors[f"{name}::{k}"] for k in spec["tensors"]}
        _same_tensors(have, targets[name].adapter_state(), name,
                      f"a {spec['variant']!r} adapter with the file's options {spec['options']}", peft)
    for name in config.get("modules_to_save", []):
        if name not in modules:
            raise AdapterFileError(f"modules_to_save entry {name!r} is not in this model; load "
                                   "the file into the model it was trained on")
        have = {k.partition("::")[2]: t for k, t in tensors.items() if k.partition("::")[0] == name}
        _same_tensors(have, modules[name].state_dict(), name, "the model",
                      None if peft is None else {})
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
        diff = {k: (mine.get(k), theirs.get(k)) for k in mine.keys() | theirs.keys()
                if mine.get(k) != theirs.get(k)}
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


@torch.no_grad()
def _load(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor],
          peft: dict[str, str] | None = None) -> nn.Module:
    """Check and build on the side (:func:`_prepare`), then freeze, swap in and fill ``model``
    from a lowrank (config, tensors) pair; ``peft`` names the tensors in messages."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        targets, new = _prepare(model, config, tensors, peft)
    except BaseException:
        for p, flag in flags:  # building an adapter sets its Linear's flags
            p.requires_grad_(flag)
        raise
    # Nothing below can fail on the file's account. Freeze what is outside the adapters (as
    # inject does); adapters keep their own flags.
    inside = {id(p) for ad in [*adapters(model).values(), *new.values()] for p in ad.parameters()}
    for p in model.parameters():
        if id(p) not in inside:
            p.requires_grad_(False)
    for name, mod in _named_modules(model).items():
        if id(mod) in new:  # a shared Linear gets the same adapter under every name
            _set_module(model, name, new[id(mod)])
    for name, spec in config["layers"].items():
        ad = targets[name]
        was_merged = ad.merged
        ad.unmerge()
        ref = ad.base.weight
        ad.load_adapter_state(
            {k: tensors[f"{name}::{k}"].to(device=ref.device, dtype=ref.dtype)
             for k in spec["tensors"]}
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


# --------------------------------------------------------------------------- PEFT interop
# PEFT's adapter format, read and written directly (PEFT itself is not imported):
# adapter_config.json + adapter_model.safetensors with keys base_model.model.<layer>.<name>
# (the names of _PEFT_NAMES), base_model.vera_A (r × in_max) and base_model.vera_B
# (out_max × r) (VeRA with save_projection), base_model.model.<module>.<param> for
# modules_to_save.
PEFT_CONFIG = "adapter_config.json"
PEFT_TENSORS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_LORA_NAMES = {"A": "lora_A.weight", "B": "lora_B.weight"}
# The one map between lowrank's adapter_state() names and PEFT's tensor names, per PEFT
# adapter type (its "flavour"); from_peft reads and to_peft writes through it.
_PEFT_NAMES = {"lora": _LORA_NAMES, "rslora": _LORA_NAMES,
               "dora": {**_LORA_NAMES, "m": "lora_magnitude_vector"},
               "vera": {"b": "vera_lambda_b", "d": "vera_lambda_d"}}
# The PEFT flavour each exportable variant is written as (the B A family as plain LoRA).
_PEFT_FLAVOUR = {"lora": "lora", "pissa": "lora", "milora": "lora", "frobenius": "lora",
                 "random_alignment": "lora", "rslora": "rslora", "dora": "dora", "vera": "vera"}
# The submodules PEFT creates inside each adapted layer, per flavour (PEFT 0.21).
_PEFT_INNER = {"lora": ("base_layer", "lora_A", "lora_A.default", "lora_B", "lora_B.default",
                        "lora_dropout", "lora_dropout.default", "lora_embedding_A",
                        "lora_embedding_B", "lora_magnitude_vector",
                        "lora_magnitude_vector.default"),
               "vera": ("base_layer", "vera_A", "vera_B", "vera_dropout", "vera_dropout.default",
                        "vera_lambda_b", "vera_lambda_d")}
# Config fields of PEFT extensions that lowrank has no equivalent for (refused when set).
_UNSUPPORTED = ("layers_to_transform", "layer_replication", "target_parameters",
                "trainable_token_indices", "use_qalora", "alora_invocation_tokens", "lora_bias",
                "use_bdlora", "arrow_config", "monteclora_config")
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq")


def _read_peft_dir(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config, tensors = _read_dir(path, PEFT_CONFIG, PEFT_TENSORS, "PEFT",
                                "PeftModel.save_pretrained")
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path / PEFT_CONFIG} is not a PEFT adapter config")
    return config, tensors


def _peft_flavour(config: dict[str, Any]) -> str:
    """The lowrank variant a PEFT config reads as, refusing (one sentence each) the PEFT
    options lowrank cannot represent."""
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
    kind = config.get("peft_type")
    if kind == "VERA":
        return "vera"
    if kind != "LORA":
        raise AdapterFileError(
            f"peft_type {kind!r} is not supported; from_peft reads LORA (LoRA, rsLoRA, DoRA) and "
            "VERA adapters"
        )
    if config.get("use_dora") and config.get("use_rslora"):
        raise AdapterFileError("the PEFT adapter combines use_dora and use_rslora, which "
                               "lowrank's dora (scale alpha/r) cannot represent")
    return "dora" if config.get("use_dora") else "rslora" if config.get("use_rslora") else "lora"


def _peft_layers(tensors: dict[str, torch.Tensor], names: dict[str, str]
                 ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Split PEFT's tensors into {layer: {our name: tensor}} (``names``: ours to PEFT's) and
    the remaining tensors."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        for ours, suffix in names.items():
            if key.startswith(_PREFIX) and key.endswith("." + suffix):
                layers.setdefault(key[len(_PREFIX):-len(suffix) - 1], {})[ours] = t
                break
        else:
            rest[key] = t
    if not layers:
        raise AdapterFileError("the PEFT adapter file holds no adapter tensors for nn.Linear layers")
    return layers, rest


def _peft_pattern(pattern: dict[str, Any] | None, name: str, default: Any) -> Any:
    r"""A layer's value under PEFT's ``rank_pattern`` / ``alpha_pattern``: that of the first
    key k with ``re.match(rf"(.*\.)?({k})$", name)`` (PEFT's ``get_pattern_key``), else
    ``default``."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _peft_saved_modules(model: nn.Module, config: dict[str, Any], rest: dict[str, torch.Tensor]
                        ) -> tuple[list[str], dict[str, torch.Tensor]]:
    """modules_to_save as PEFT resolves it, and the tensors it saved for them in lowrank's keys.

    PEFT (``_set_trainable``) takes every module whose name ends with an entry (a plain string
    suffix) and skips an entry that names no module: a ``task_type="SEQ_CLS"`` adapter lists
    both ``classifier`` and ``score`` whatever the head is called. Modules without tensors
    (a matched dropout) and those inside an already matched one are left out.
    """
    entries = config.get("modules_to_save") or []
    names: list[str] = []
    for name, mod in _named_modules(model).items():
        if (any(name.endswith(e) for e in entries) and mod.state_dict()
                and not any(name.startswith(n + ".") for n in names)):
            names.append(name)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        for k in model.get_submodule(name).state_dict():
            if f"{_PREFIX}{name}.{k}" in rest:  # a missing one is reported by _load
                out[f"{name}::{k}"] = rest.pop(f"{_PREFIX}{name}.{k}")
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
    layer's rank is read from its tensors and must be the one PEFT's ``r`` / ``rank_pattern``
    give it; its alpha is PEFT's ``lora_alpha`` / ``alpha_pattern``, so each layer's scale is
    PEFT's. ``modules_to_save`` is resolved as PEFT resolves it: every module whose name ends
    with an entry, an entry that names no module skipped (a ``task_type="SEQ_CLS"`` adapter
    names ``classifier`` and ``score``); ``lr.inject``'s own ``modules_to_save`` stays strict.
    Adapters that need something lowrank has no equivalent for (biases, ``fan_in_fan_out``, a
    modified base from PiSSA/OLoRA initialisation, ``layers_to_transform`` ...) are refused,
    and loading is all or nothing as in :func:`load_adapters`. PEFT is not needed to read the
    files.
    """
    config, tensors = _read_peft_dir(Path(adapter_dir))
    variant = _peft_flavour(config)
    names = _PEFT_NAMES[variant]
    found, rest = _peft_layers(tensors, names)
    layers: dict[str, Any] = {}
    if variant == "vera":
        modules = _named_modules(model)
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
        for name in found:
            options = {"rank": rank, "alpha": float(rank),
                       "dropout": float(config.get("vera_dropout", 0.0)), "seed": 0,
                       "d_initial": float(config.get("d_initial", 0.1)),
                       "projection_seed": seed, "projection_shape": list(proj)}
            layers[name] = {"variant": "vera", "options": options, "in_features": shapes[name][1],
                            "out_features": shapes[name][0]}
    else:
        for name, ts in found.items():
            if set(ts) != set(names) or ts["A"].dim() != 2 or ts["B"].dim() != 2:
                raise AdapterFileError(
                    f"layer {name!r} has {sorted(names[k] for k in ts)} in the PEFT file but a "
                    f"{variant} adapter needs {sorted(names.values())} (2-D lora_A and lora_B)")
            rank, in_f = ts["A"].shape
            r = _peft_pattern(config.get("rank_pattern"), name, config.get("r", 8))
            if rank != r:
                raise AdapterFileError(
                    f"{_PREFIX}{name}.lora_A.weight has rank {rank} but the PEFT config gives the "
                    f"layer r={r} (r / rank_pattern), so PEFT cannot load the file either; "
                    "re-save it with PeftModel.save_pretrained")
            alpha = _peft_pattern(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
            options = {"rank": rank, "alpha": float(alpha),
                       "dropout": float(config.get("lora_dropout", 0.0)), "seed": 0}
            layers[name] = {"variant": variant, "options": options, "in_features": in_f,
                            "out_features": ts["B"].shape[0]}
    ours: dict[str, torch.Tensor] = {}
    for name, ts in found.items():
        layers[name]["tensors"] = {k: list(t.shape) for k, t in ts.items()}
        ours.update({f"{name}::{k}": t for k, t in ts.items()})
    saved, saved_tensors = _peft_saved_modules(model, config, rest)
    ours.update(saved_tensors)
    lowrank_config = {"format": FORMAT, "version": FORMAT_VERSION, "lowrank_version": __version__,
                      "layers": layers, "modules_to_save": saved}
    return _load(model, lowrank_config, ours, peft=names)


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


def _pattern(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    r"""PEFT's (default, pattern) for per-layer values: the most common value, and every other
    keyed ``^<escaped name>``, which PEFT's ``re.match(rf"(.*\.)?({key})$", name)`` matches
    for that module only (PEFT's documented form)."""
    common = Counter(values.values()).most_common(1)[0][0]
    return common, {"^" + re.escape(n): v for n, v in values.items() if v != common}


def _peft_state(ad: Adapter) -> tuple[dict[str, torch.Tensor], int, float]:
    """(adapter_state in PEFT's terms, PEFT rank, PEFT alpha) of one adapter.

    A B A adapter that started from factors B₀A₀ (PiSSA, MiLoRA, Frobenius ``closed_form``)
    trains on the residual W₀ − s·B₀A₀, which PEFT's base model does not have. Its update
    ΔW = s·(B A − B₀A₀) = s·[B, −B₀][A; A₀] is a rank-2r LoRA over the unmodified W₀, with
    α' = 2α so that PEFT's scale α'/(2r) is s.
    """
    state = dict(ad.adapter_state())
    if state.get("A0") is None:
        return state, ad.rank, ad.alpha
    A0, B0 = state.pop("A0"), state.pop("B0")
    state["A"], state["B"] = torch.cat([state["A"], A0]), torch.cat([state["B"], -B0], dim=1)
    return state, 2 * ad.rank, 2 * ad.alpha


def _check_peft_saved(model: nn.Module, ads: dict[str, Adapter], saved: list[str],
                      flavour: str) -> None:
    """PEFT takes every module whose name ends with a modules_to_save entry (a plain string
    suffix): refuse an entry that would also take another module of the base model that has
    tensors, or one of PEFT's own submodules (``out`` ends ``q.lora_dropout``)."""
    inner = _PEFT_INNER["vera" if flavour == "vera" else "lora"]
    names = [n for n, m in _named_modules(model).items()
             if m.state_dict() and not any(n.startswith(a + ".") for a in ads)]
    names += [f"{a}.{x}" for a in ads for x in inner]
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
    the same outputs. ``lora``, ``rslora`` and ``dora`` are written as PEFT LoRA (with
    ``use_rslora`` / ``use_dora``), ``vera`` as PEFT VeRA, and ``pissa``, ``milora``,
    ``frobenius`` and ``random_alignment`` as plain PEFT LoRA with the same ΔW: those that
    train on a residual W₀ − s·B₀A₀ (PiSSA, MiLoRA, Frobenius ``closed_form``) as the rank-2r
    LoRA ΔW = s·[B, −B₀][A; A₀] over W₀ itself. Their variant name does not survive
    (``from_peft`` reads them back as ``lora`` adapters with the same outputs), nor does what
    only shapes training: random alignment's frozen A becomes trainable in PEFT, Frobenius's
    penalty is not in the file. All layers must share one PEFT type and one dropout; ranks
    and alphas may differ (written as PEFT's ``rank_pattern`` / ``alpha_pattern``). VeRA needs
    one rank and the shared projection PEFT would draw: inject it with ``projection_shape`` =
    the largest (out, in) among the adapted layers. A ``modules_to_save`` name that PEFT's
    suffix matching would also apply to another module is refused. The directory is written
    atomically; an existing one is replaced only with ``overwrite=True``.
    """
    path, ads = _writable(model, adapter_dir, overwrite, "export")
    bad = sorted({ad.name for ad in ads.values()} - set(_PEFT_FLAVOUR))
    if bad:
        raise ValueError(f"to_peft writes {', '.join(sorted(_PEFT_FLAVOUR))} adapters, not "
                         f"{bad[0]!r}; PEFT has no equivalent format for it")
    flavour = _uniform(ads, "PEFT adapter type (lora, rslora, dora or vera)",
                       lambda ad: _PEFT_FLAVOUR[ad.name])
    dropout = _uniform(ads, "dropout", lambda ad: ad.dropout_p)
    names = _PEFT_NAMES[flavour]
    exported = {name: _peft_state(ad) for name, ad in ads.items()}
    tensors = _saved_tensors(model, lambda name, k: f"{_PREFIX}{name}.{k}")
    for name, (state, _, _) in exported.items():
        for ours, theirs in names.items():
            key = f"{_PREFIX}{name}.{theirs}"
            tensors[key] = _host(state[ours], key)
    saved = list(getattr(model, "lowrank_modules_to_save", []))
    _check_peft_saved(model, ads, saved, flavour)
    common = {"bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "modules_to_save": saved or None, "task_type": None,
              "base_model_name_or_path": None, "revision": None,
              # a regex matched with re.fullmatch: exactly these modules, nothing that ends alike
              "target_modules": "(?:" + "|".join(re.escape(n) for n in ads) + ")"}
    if flavour == "vera":
        rank = _uniform(ads, "rank", lambda ad: ad.rank)
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
        config = {**common, "peft_type": "VERA", "r": rank, "projection_prng_key": seed,
                  "save_projection": True, "vera_dropout": dropout,
                  "d_initial": _uniform(ads, "d_initial", lambda ad: ad.d_initial),
                  "init_weights": True}
    else:
        r, rank_pattern = _pattern({name: rank for name, (_, rank, _) in exported.items()})
        alpha, alpha_pattern = _pattern({name: a for name, (_, _, a) in exported.items()})
        config = {**common, "peft_type": "LORA", "r": r, "lora_alpha": alpha,
                  "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
                  "lora_dropout": dropout, "use_rslora": flavour == "rslora",
                  "use_dora": flavour == "dora", "init_lora_weights": True}
    return _write_dir(path, {PEFT_TENSORS: tensors, PEFT_CONFIG: config})
