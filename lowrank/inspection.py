"""What a saved adapter or a weights file holds, without the model: the ``lowrank inspect`` and
``lowrank reconstruct`` commands' computations and tables.

:func:`inspect_adapter` reads an adapter directory (lowrank's or PEFT's) and summarises each layer
from what its variant's class says; :func:`reconstruction_errors` gives the Eckart–Young error of
the best rank-r approximation of every matrix of a safetensors file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from . import analysis
from .adapters.registry import variant_class
from .io import CONFIG, PEFT_CONFIG, PEFT_TENSORS, TENSORS, read_adapter_dir, read_peft_dir


class InspectionError(ValueError):
    """A file or directory that cannot be inspected: one sentence saying why and what to pass."""


# --------------------------------------------------------------------------- inspect
def read_any_adapter_dir(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The (config, tensors) of a lowrank adapter directory, or of a PEFT one as ``lr.from_peft``
    reads it (:func:`lowrank.io.read_peft_dir`, without the model)."""
    if (path / TENSORS).is_file():
        return read_adapter_dir(path)
    if (path / PEFT_TENSORS).is_file():
        return read_peft_dir(path)
    raise InspectionError(
        f"{path} is not an adapter directory: it holds neither {CONFIG} and {TENSORS} "
        f"(lr.save_adapters) nor {PEFT_CONFIG} and {PEFT_TENSORS} (PEFT's "
        "save_pretrained); pass such a directory"
    )


def inspect_adapter(path: str | os.PathLike, k: int = 8) -> dict[str, Any]:
    """A summary of a saved adapter directory (lowrank's or PEFT's): format, versions, and per
    layer the variant, shape, rank, trainable parameter count (from the tensors) and ΔW's
    spectrum summary."""
    config, tensors = read_any_adapter_dir(Path(path))
    layers = [_inspect_layer(name, spec, tensors, k) for name, spec in config["layers"].items()]
    saved = config.get("modules_to_save", [])
    saved_params = sum(v.numel() for key, v in tensors.items() if key.split("::")[0] in saved)
    return {
        "path": str(path),
        "format": config["format"],
        "format_version": config["version"],
        "lowrank_version": config.get("lowrank_version"),
        "writer": config.get("writer") or f"lowrank {config.get('lowrank_version')}",
        "layers": layers,
        "modules_to_save": saved,
        "modules_to_save_params": saved_params,
        "trainable_params": sum(r["trainable_params"] for r in layers) + saved_params,
    }


def _inspect_layer(name: str, spec: dict[str, Any], tensors: dict[str, Tensor], k: int) -> dict[str, Any]:
    """One layer of :func:`inspect_adapter`, from what its variant's class says: the adapter
    rebuilt on a stand-in of the saved shape tells its rank and which saved tensors train, and
    ΔW comes from the saved tensors wherever they determine it."""
    options, shape = spec["options"], (spec["out_features"], spec["in_features"])
    mine = {key: tensors[f"{name}::{key}"] for key in spec["tensors"]}
    try:
        cls = variant_class(spec["variant"])
        ad = cls.stand_in(*shape, **options)
        rank, trained = ad.rank, ad.trainable_keys()
        dW = ad.loaded_delta(mine)  # the same stand-in: one construction (one SVD for pissa)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InspectionError(
            f"layer {name!r} does not rebuild as a {spec['variant']!r} adapter with the "
            f"file's options {options} ({e}); inspect it with the lowrank that saved it"
        ) from e
    return {
        "name": name,
        "variant": cls.name,
        "out_features": shape[0],
        "in_features": shape[1],
        "rank": rank,
        "trainable_params": sum(mine[key].numel() for key in trained if key in mine),
        "delta": None if dW is None else analysis.spectrum_summary(dW, k),
        "note": cls.delta_needs_w0,
    }


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [
        [
            "—" if v is None else v if isinstance(v, str) else f"{v:.4g}" if isinstance(v, float) else str(v)
            for v in r
        ]
        for r in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_inspection(info: dict[str, Any]) -> str:
    """The summary of :func:`inspect_adapter` as a readable table."""
    version = "" if info["format_version"] is None else f" v{info['format_version']}"
    head = (
        f"{info['path']}: {info['format']} format{version}, written by {info['writer']}; "
        f"{len(info['layers'])} adapted layers, {info['trainable_params']} trainable parameters"
    )
    rows = []
    notes = []
    for r in info["layers"]:
        d = r["delta"] or {}
        rows.append(
            [
                r["name"],
                r["variant"],
                f"{r['out_features']}x{r['in_features']}",
                r["rank"],
                r["trainable_params"],
                d.get("fro_norm"),
                d.get("effective_rank"),
                d.get("stable_rank"),
                d.get("rank90"),
            ]
        )
        if r["note"]:
            notes.append(f"{r['name']}: {r['note']}")
    table = _table(
        ["layer", "variant", "shape", "rank", "trainable", "‖ΔW‖_F", "eff. rank", "stable rank", "rank90"],
        rows,
    )
    out = [head, "", table]
    if info["modules_to_save"]:
        out += [
            "",
            f"modules_to_save: {', '.join(info['modules_to_save'])} "
            f"({info['modules_to_save_params']} parameters, trained fully)",
        ]
    if notes:
        out += ["", "ΔW not shown (—):", *notes]
    return "\n".join(out)


# --------------------------------------------------------------------------- reconstruct
def matrices(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The 2-D floating-point tensors of the safetensors file ``path`` by name, and why each
    other tensor is skipped (``"1-D"``, ``"torch.int64"``)."""
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise InspectionError(f"{path} is not a readable safetensors file ({e})") from e
    kept, skipped = {}, {}
    for name in sorted(tensors):
        W = tensors[name]
        if W.ndim != 2:
            skipped[name] = f"{W.ndim}-D"
        elif not W.is_floating_point():
            skipped[name] = str(W.dtype)
        else:
            kept[name] = W
    return kept, skipped


def skipped_summary(skipped: Mapping[str, str], shown: int = 5) -> str:
    """``skipped`` ({tensor: why}) in words, grouped by why: ``bias, norm (1-D); ids (torch.int64)``,
    at most ``shown`` names per group."""
    by_why: dict[str, list[str]] = {}
    for name, why in skipped.items():
        by_why.setdefault(why, []).append(name)
    return "; ".join(
        ", ".join(names[:shown]) + (f", … ({len(names)} in all)" if len(names) > shown else "") + f" ({why})"
        for why, names in by_why.items()
    )


def reconstruction_errors(tensors: Mapping[str, Tensor], ranks: Sequence[int]) -> list[dict[str, Any]]:
    """Relative Frobenius error ‖W − W_r‖_F / ‖W‖_F of the best rank-r approximation W_r
    (Eckart–Young: √(Σ_{i>r} σᵢ²) / √(Σ σᵢ²)) for every matrix W of ``tensors`` and every r in
    ``ranks``; 0 for r ≥ rank(W) and for W = 0."""
    rows = []
    for name, W in tensors.items():
        s2 = analysis.singular_values(W) ** 2  # one SVD per tensor, every rank from it
        total = float(s2.sum())
        for r in ranks:
            err = 0.0 if total == 0 else math.sqrt(float(s2[r:].sum()) / total)
            rows.append(
                {
                    "tensor": name,
                    "out_features": W.shape[0],
                    "in_features": W.shape[1],
                    "rank": r,
                    "relative_error": err,
                }
            )
    return rows


def format_reconstruction(rows: list[dict[str, Any]], ranks: Sequence[int]) -> str:
    """One line per tensor, one column per rank."""
    by_tensor: dict[str, dict[str, Any]] = {}
    for r in rows:
        t = by_tensor.setdefault(r["tensor"], {"shape": f"{r['out_features']}x{r['in_features']}"})
        t[r["rank"]] = r["relative_error"]
    table = [[name, t["shape"], *(t[r] for r in ranks)] for name, t in by_tensor.items()]
    return "relative Frobenius error of the best rank-r approximation\n" + _table(
        ["tensor", "shape", *(f"r={r}" for r in ranks)], table
    )
