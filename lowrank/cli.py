"""The ``lowrank`` command (also ``python -m lowrank``).

    lowrank ablate --quick                      # the rank ablation (lowrank.ablation)
    lowrank plot results/rank_ablation.csv      # redraw the rank-ablation figure from a CSV
    lowrank inspect runs/adapter [--json]       # what a saved adapter (or PEFT's) holds, without the model
    lowrank reconstruct w.safetensors --ranks 1 2 4 8 [--out errors.csv]

Exit codes: 0 success, 1 runtime failure (one sentence on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from . import ablation, analysis, study
from .adapters.registry import variant_class
from .files import atomic_path
from .io import CONFIG, PEFT_CONFIG, PEFT_TENSORS, TENSORS, AdapterFileError, read_adapter_dir, read_peft_dir
from .sweep import KEY, read_results, tuned_rows


class CLIError(Exception):
    """A runtime failure reported as one sentence on stderr (exit code 1)."""


# --------------------------------------------------------------------------- ablate / plot
def ablate(argv: Sequence[str]) -> int:
    """Run the rank ablation with the command line ``argv`` (``lowrank ablate --help`` lists every
    option), its outputs under the current directory."""
    return ablation.main(argv, root=Path.cwd(), prog="lowrank ablate")


def results_csv(csv: Path) -> pd.DataFrame:
    """The rows of the results CSV ``csv``; one sentence naming it when it is missing, empty, or
    not a CSV that a lowrank sweep wrote (a figure, a text file, another program's table)."""
    expected = "expected the results CSV that lowrank ablate writes (its --out)"
    try:
        df = read_results(csv, key=None)
    except pd.errors.EmptyDataError:  # an empty file: no rows
        df = pd.DataFrame()
    except UnicodeDecodeError as e:
        raise CLIError(f"{csv} is not a CSV file but binary data; {expected}") from e
    except (ValueError, OSError) as e:  # pandas' parser errors, a directory
        raise CLIError(f"{csv} does not read as a CSV file ({e}); {expected}") from e
    if len(df.columns) and KEY not in df.columns:
        raise CLIError(f"{csv} has no {KEY!r} column, so no lowrank sweep wrote it; {expected}")
    if df.empty:
        raise CLIError(f"{csv} does not exist or has no rows; run lowrank ablate first")
    return df


def plot(csv: Path, figure: Path | None) -> list[Path]:
    """Redraw the rank-ablation figure from ``csv`` at the dev-chosen learning rates."""
    rows = tuned_rows(results_csv(csv))
    if rows.empty:
        raise CLIError(f"{csv} has no finished runs at a dev-chosen learning rate to plot")
    paths = ablation.figure(rows, figure or csv.with_suffix(""))
    for p in paths:
        print(p)
    return paths


# --------------------------------------------------------------------------- inspect
def read_any_adapter_dir(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The (config, tensors) of a lowrank adapter directory, or of a PEFT one as ``lr.from_peft``
    reads it (:func:`lowrank.io.read_peft_dir`, without the model)."""
    if (path / TENSORS).is_file():
        return read_adapter_dir(path)
    if (path / PEFT_TENSORS).is_file():
        return read_peft_dir(path)
    raise CLIError(f"{path} is not an adapter directory: it holds neither {CONFIG} and {TENSORS} "
                   f"(lr.save_adapters) nor {PEFT_CONFIG} and {PEFT_TENSORS} (PEFT's "
                   "save_pretrained); pass such a directory")


def inspect_adapter(path: str | os.PathLike, k: int = 8) -> dict[str, Any]:
    """A summary of a saved adapter directory (lowrank's or PEFT's): format, versions, and per
    layer the variant, shape, rank, trainable parameter count (from the tensors) and ΔW's
    spectrum summary."""
    config, tensors = read_any_adapter_dir(Path(path))
    layers = [_inspect_layer(name, spec, tensors, k) for name, spec in config["layers"].items()]
    saved = config.get("modules_to_save", [])
    saved_params = sum(v.numel() for key, v in tensors.items()
                       if key.split("::")[0] in saved)
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


def _inspect_layer(name: str, spec: dict[str, Any], tensors: dict[str, Tensor], k: int
                   ) -> dict[str, Any]:
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
        raise CLIError(f"layer {name!r} does not rebuild as a {spec['variant']!r} adapter with the "
                       f"file's options {options} ({e}); inspect it with the lowrank that saved it"
                       ) from e
    return {"name": name, "variant": cls.name, "out_features": shape[0], "in_features": shape[1],
            "rank": rank,
            "trainable_params": sum(mine[key].numel() for key in trained if key in mine),
            "delta": None if dW is None else analysis.spectrum_summary(dW, k),
            "note": cls.delta_needs_w0}


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [["—" if v is None else v if isinstance(v, str) else
                         f"{v:.4g}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_inspection(info: dict[str, Any]) -> str:
    """The summary of :func:`inspect_adapter` as a readable table."""
    version = "" if info["format_version"] is None else f" v{info['format_version']}"
    head = (f"{info['path']}: {info['format']} format{version}, written by {info['writer']}; "
            f"{len(info['layers'])} adapted layers, {info['trainable_params']} trainable parameters")
    rows = []
    notes = []
    for r in info["layers"]:
        d = r["delta"] or {}
        rows.append([r["name"], r["variant"], f"{r['out_features']}x{r['in_features']}", r["rank"],
                     r["trainable_params"], d.get("fro_norm"), d.get("effective_rank"),
                     d.get("stable_rank"), d.get("rank90")])
        if r["note"]:
            notes.append(f"{r['name']}: {r['note']}")
    table = _table(["layer", "variant", "shape", "rank", "trainable", "‖ΔW‖_F", "eff. rank",
                    "stable rank", "rank90"], rows)
    out = [head, "", table]
    if info["modules_to_save"]:
        out += ["", f"modules_to_save: {', '.join(info['modules_to_save'])} "
                    f"({info['modules_to_save_params']} parameters, trained fully)"]
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
        raise CLIError(f"{path} is not a readable safetensors file ({e})") from e
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
    return "; ".join(", ".join(names[:shown]) + (f", … ({len(names)} in all)" if len(names) > shown
                                                 else "") + f" ({why})" for why, names in by_why.items())


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
            rows.append({"tensor": name, "out_features": W.shape[0], "in_features": W.shape[1],
                         "rank": r, "relative_error": err})
    return rows


def refuse_existing(out: Path, force: bool) -> None:
    """One sentence when ``out`` exists and ``force`` is not given."""
    if out.exists() and not force:
        raise CLIError(f"{out} exists; pass --force to overwrite it or choose another --out")


def write_csv_atomic(rows: list[dict[str, Any]], out: Path, force: bool) -> None:
    """Write ``rows`` as CSV to ``out`` via a temporary file and a rename; an existing ``out``
    is replaced only with ``force``."""
    refuse_existing(out, force)
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def format_reconstruction(rows: list[dict[str, Any]], ranks: Sequence[int]) -> str:
    """One line per tensor, one column per rank."""
    by_tensor: dict[str, dict[str, Any]] = {}
    for r in rows:
        t = by_tensor.setdefault(r["tensor"], {"shape": f"{r['out_features']}x{r['in_features']}"})
        t[r["rank"]] = r["relative_error"]
    table = [[name, t["shape"], *(t[r] for r in ranks)] for name, t in by_tensor.items()]
    return ("relative Frobenius error of the best rank-r approximation\n"
            + _table(["tensor", "shape", *(f"r={r}" for r in ranks)], table))


# --------------------------------------------------------------------------- parser
def parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lowrank`` command."""
    p = argparse.ArgumentParser(
        prog="lowrank", description="LoRA and the other low-rank adaptation methods: studies, "
        "figures and inspection of saved adapters.",
        epilog="Exit codes: 0 success, 1 runtime failure, 2 usage error.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           help="what to do; `lowrank COMMAND --help` lists its options")
    sub.add_parser(
        "ablate", add_help=False, help="run the rank ablation",
        description="Run the rank ablation (lowrank.ablation, as studies/rank_ablation.py does) "
        "with the remaining arguments: every variant across ranks and seeds at its dev-tuned "
        "learning rate, written to a resumable CSV and a figure under the current directory. "
        "`lowrank ablate --help` shows its own options (--quick, --out, --figure, --plot-only ...).")
    pp = sub.add_parser(
        "plot", help="redraw the rank-ablation figure from a results CSV",
        description="Redraw the rank-ablation figure (PDF and PNG) from a results CSV of `lowrank "
        "ablate` at each variant and rank's dev-chosen learning rate, training nothing.")
    pp.add_argument("csv", type=Path, metavar="CSV", help="results CSV of a rank ablation")
    pp.add_argument("--figure", type=Path, default=None, metavar="STEM",
                    help="figure path without extension (default: the CSV's path without .csv)")
    pi = sub.add_parser(
        "inspect", help="summarise a saved adapter directory",
        description="Summarise an adapter directory written by lr.save_adapters or by PEFT's "
        "save_pretrained (read as lr.from_peft reads it), without the model: format and version, "
        "and per layer the variant, shape, rank, trainable parameter count (from the tensors) "
        "and the spectrum of ΔW (Frobenius norm, effective rank, stable rank, rank for 90% "
        "energy) where the saved tensors determine it (a note says why where ΔW needs the base "
        "weight, which the file does not hold).")
    pi.add_argument("path", type=Path, metavar="PATH",
                    help="adapter directory (lowrank's or PEFT's)")
    pi.add_argument("--json", action="store_true", help="machine-readable JSON output")
    pr = sub.add_parser(
        "reconstruct", help="low-rank reconstruction error of every matrix in a safetensors file",
        description="For every 2-D tensor of a safetensors file, the relative Frobenius error "
        "‖W − W_r‖_F / ‖W‖_F of its best rank-r approximation W_r (Eckart–Young); the other "
        "tensors (not 2-D, or not floating-point) are listed as skipped on stderr. Only "
        "safetensors is read: nothing is unpickled.")
    pr.add_argument("weights", type=Path, metavar="WEIGHTS", help="a .safetensors file")
    pr.add_argument("--ranks", type=study.positive_int, nargs="+", required=True, metavar="R",
                    help="ranks r to evaluate")
    pr.add_argument("--out", type=Path, default=None,
                    help="write a tidy CSV here (atomically) instead of printing a table")
    pr.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    return p


def _plot(args: argparse.Namespace) -> None:
    plot(args.csv, args.figure)


def _inspect(args: argparse.Namespace) -> None:
    info = inspect_adapter(args.path)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))


def _reconstruct(args: argparse.Namespace) -> None:
    if args.out is not None:
        refuse_existing(args.out, args.force)  # before the SVDs, not after
    tensors, skipped = matrices(args.weights)
    if not tensors:
        raise CLIError(f"{args.weights} holds no 2-D floating-point tensor to reconstruct; "
                       f"it has {skipped_summary(skipped)}")
    if skipped:
        print(f"lowrank: skipped {len(skipped)} tensors that are not 2-D floating-point matrices: "
              f"{skipped_summary(skipped)}", file=sys.stderr)
    rows = reconstruction_errors(tensors, args.ranks)
    if args.out is None:
        print(format_reconstruction(rows, args.ranks))
    else:
        write_csv_atomic(rows, args.out, args.force)
        print(f"wrote {len(rows)} rows to {args.out}")


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "plot": _plot, "inspect": _inspect, "reconstruct": _reconstruct}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lowrank`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    try:
        if argv and argv[0] == "ablate":  # everything after it belongs to the study's parser
            return ablate(argv[1:])
        args = p.parse_args(argv)
        COMMANDS[args.command](args)
    except SystemExit as e:  # argparse: --help (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else 1
    except (CLIError, AdapterFileError, ValueError, OSError) as e:
        message = " ".join(str(e).split())
        print(f"lowrank: error: {message}", file=sys.stderr)
        return 1
    return 0
