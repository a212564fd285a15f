"""PEFT's adapter format: its files, the keys of its tensors, and each ``peft_type``'s fields.

A directory with adapter_config.json and adapter_model.safetensors, keyed
base_model.model.<layer>.<name> (the names each variant declares in its
:attr:`~lowrank.Adapter.peft`), base_model.vera_A (r × in_max) and base_model.vera_B
(out_max × r) for VeRA saved with save_projection, base_model.model.<module>.<param> for
modules_to_save. Per ``peft_type`` ("LORA", "VERA"): the config fields that become lowrank's
options of each layer and back, and the submodules PEFT creates in an adapted layer.
PEFT itself is not imported.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.base import Adapter, PeftFormat
from ..adapters.vera import projections
from ..inject import _named_modules
from .format import AdapterFileError, _read_dir

PEFT_CONFIG = "adapter_config.json"
PEFT_TENSORS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# The submodules PEFT creates inside each adapted layer, per peft_type (PEFT 0.21).
_PEFT_INNER = {
    "LORA": (
        "base_layer",
        "lora_A",
        "lora_A.default",
        "lora_B",
        "lora_B.default",
        "lora_dropout",
        "lora_dropout.default",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_magnitude_vector",
        "lora_magnitude_vector.default",
    ),
    "VERA": (
        "base_layer",
        "vera_A",
        "vera_B",
        "vera_dropout",
        "vera_dropout.default",
        "vera_lambda_b",
        "vera_lambda_d",
    ),
}
# Config fields of PEFT extensions that lowrank has no equivalent for (refused when set).
_UNSUPPORTED = (
    "layers_to_transform",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "use_qalora",
    "alora_invocation_tokens",
    "lora_bias",
    "use_bdlora",
    "arrow_config",
    "monteclora_config",
)
# init_lora_weights that start from a modified base (PiSSA, OLoRA, CorDA, LoftQ; pissa_niter_16 ...)
_RESIDUAL_INITS = re.compile("pissa|olora|corda|loftq")
# What Adapter.peft_export gives: (format, tensors by lowrank's names, PEFT's r, PEFT's alpha).
Exported = tuple[PeftFormat, dict[str, torch.Tensor], int, float]

Json = dict[str, Any]  # a parsed adapter_config.json
Tensors = dict[str, torch.Tensor]  # by name, as a safetensors file holds them
Layers = dict[str, dict[str, Any]]  # layer name → its options and shape, as lowrank's config holds them


def _read_peft_dir(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config, tensors = _read_dir(path, PEFT_CONFIG, PEFT_TENSORS, "PEFT", "PeftModel.save_pretrained")
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path / PEFT_CONFIG} is not a PEFT adapter config")
    return config, tensors


def _refuse_unsupported(config: dict[str, Any]) -> None:
    """One sentence for each PEFT option that lowrank cannot represent."""
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
    if isinstance(init, str) and _RESIDUAL_INITS.match(init.lower()):
        raise AdapterFileError(
            f"the PEFT adapter was initialised with init_lora_weights={init!r}, so it belongs to "
            "a modified base model; convert it to a plain LoRA first (PEFT's "
            "path_initial_model_for_weight_conversion)"
        )


def _peft_pattern(pattern: dict[str, Any] | None, name: str, default: Any) -> Any:
    r"""A layer's value under PEFT's ``rank_pattern`` / ``alpha_pattern``: that of the first
    key k with ``re.match(rf"(.*\.)?({k})$", name)`` (PEFT's ``get_pattern_key``), else
    ``default``."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _lora_layers(
    cls: type[Adapter], config: Json, found: dict[str, Tensors], model: nn.Module | None, rest: Tensors
) -> Layers:
    """The layers of a LORA file: each layer's rank from its tensors, which must be PEFT's
    ``r`` / ``rank_pattern`` for it, and its alpha ``lora_alpha`` / ``alpha_pattern``."""
    names, layers = cls.peft.tensors, {}
    for name, ts in found.items():
        if set(ts) != set(names) or ts["A"].dim() != 2 or ts["B"].dim() != 2:
            raise AdapterFileError(
                f"layer {name!r} has {sorted(names[k] for k in ts)} in the PEFT file but a "
                f"{cls.name} adapter needs {sorted(names.values())} (2-D lora_A and lora_B)"
            )
        rank, in_f = ts["A"].shape
        r = _peft_pattern(config.get("rank_pattern"), name, config.get("r", 8))
        if rank != r:
            raise AdapterFileError(
                f"{_PREFIX}{name}.lora_A.weight has rank {rank} but the PEFT config gives the "
                f"layer r={r} (r / rank_pattern), so PEFT cannot load the file either; "
                "re-save it with PeftModel.save_pretrained"
            )
        alpha = _peft_pattern(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
        options = {
            "rank": rank,
            "alpha": float(alpha),
            "dropout": float(config.get("lora_dropout", 0.0)),
            "seed": 0,
        }
        layers[name] = {"options": options, "in_features": in_f, "out_features": ts["B"].shape[0]}
    return layers


def _vera_layers(
    cls: type[Adapter], config: Json, found: dict[str, Tensors], model: nn.Module | None, rest: Tensors
) -> Layers:
    """The layers of a VERA file: one rank ``r`` and one projection pair, drawn from
    ``projection_prng_key`` at the largest adapted shape (checked against the saved pair).
    Each layer's input size is the model's alone (the file does not record it)."""
    if model is None:
        raise AdapterFileError(
            "a PEFT VeRA file does not record the adapted layers' input sizes, "
            "which only the base model has; load it with lr.from_peft(model, path)"
        )
    modules, shapes = _named_modules(model), {}
    for name in found:
        mod = modules.get(name)
        if not isinstance(mod, nn.Linear):
            raise AdapterFileError(
                f"the PEFT adapter adapts {name!r}, which is not an nn.Linear "
                "of this model; load it into the model it was trained on"
            )
        shapes[name] = (mod.out_features, mod.in_features)
    proj = (max(o for o, _ in shapes.values()), max(i for _, i in shapes.values()))
    rank, seed = int(config.get("r", 256)), int(config.get("projection_prng_key", 0))
    _check_vera_projections(rest, seed, rank, proj)
    options = {
        "rank": rank,
        "alpha": float(rank),
        "dropout": float(config.get("vera_dropout", 0.0)),
        "seed": 0,
        "d_initial": float(config.get("d_initial", 0.1)),
        "projection_seed": seed,
        "projection_shape": list(proj),
    }
    return {
        name: {"options": dict(options), "in_features": i, "out_features": o}
        for name, (o, i) in shapes.items()
    }


def _check_vera_projections(
    rest: dict[str, torch.Tensor], seed: int, rank: int, shape: tuple[int, int]
) -> None:
    """Saved vera_A / vera_B (save_projection=True) must be the pair lowrank draws from the seed."""
    A, B = projections(seed, rank, *shape)
    for key, mine in (("base_model.vera_A", A), ("base_model.vera_B", B)):
        theirs = rest.pop(key, None)
        if theirs is not None and (
            theirs.shape != mine.shape or not torch.allclose(theirs.float(), mine, atol=1e-6)
        ):
            raise AdapterFileError(
                f"{key} in the PEFT file is not the projection drawn from projection_prng_key="
                f"{seed} for the adapted layers' shape {shape}; load it into the model it was "
                "trained on"
            )


# Each peft_type's layer entries (lowrank's options) from its config fields.
_READ_LAYERS = {"LORA": _lora_layers, "VERA": _vera_layers}


def _uniform(values: dict[str, Any], what: str) -> Any:
    """The one value every adapter has (``values``: by layer), refusing several."""
    if len(set(map(str, values.values()))) > 1:
        raise ValueError(
            f"to_peft needs one {what} for every adapter, got {values}; inject with a single setting"
        )
    return next(iter(values.values()))


def _pattern(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    r"""PEFT's (default, pattern) for per-layer values: the most common value, and every other
    keyed ``^<escaped name>``, which PEFT's ``re.match(rf"(.*\.)?({key})$", name)`` matches
    for that module only (PEFT's documented form)."""
    common = Counter(values.values()).most_common(1)[0][0]
    return common, {"^" + re.escape(n): v for n, v in values.items() if v != common}


def _lora_fields(
    ads: dict[str, Adapter], exported: dict[str, Exported], dropout: float
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A LORA file's own config fields (ranks and alphas as PEFT's patterns where they differ)."""
    r, rank_pattern = _pattern({name: rank for name, (_, _, rank, _) in exported.items()})
    alpha, alpha_pattern = _pattern({name: a for name, (_, _, _, a) in exported.items()})
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": dropout,
        "init_lora_weights": True,
    }, {}


def _vera_fields(
    ads: dict[str, Adapter], exported: dict[str, Exported], dropout: float
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A VERA file's own config fields and the shared projections it saves, which PEFT draws at
    the largest adapted shape: every adapter must use that pair."""
    rank = _uniform({n: ad.rank for n, ad in ads.items()}, "rank")
    seed = _uniform({n: ad.projection_seed for n, ad in ads.items()}, "projection_seed")
    shape = _uniform({n: tuple(ad.projection_shape) for n, ad in ads.items()}, "projection_shape")
    largest = (max(ad.out_features for ad in ads.values()), max(ad.in_features for ad in ads.values()))
    if shape != largest:
        raise ValueError(
            f"the vera adapters use projection_shape={shape} but PEFT draws one of the largest "
            f"adapted shape {largest}; inject with projection_shape={largest}"
        )
    A, B = projections(seed, rank, *shape)
    config = {
        "r": rank,
        "projection_prng_key": seed,
        "save_projection": True,
        "vera_dropout": dropout,
        "d_initial": _uniform({n: ad.d_initial for n, ad in ads.items()}, "d_initial"),
        "init_weights": True,
    }
    return config, {"base_model.vera_A": A.contiguous(), "base_model.vera_B": B.contiguous()}


# Each peft_type's own config fields (and shared tensors) from the exported adapters.
_WRITE_FIELDS = {"LORA": _lora_fields, "VERA": _vera_fields}
