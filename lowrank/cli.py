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
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from . import ablation, arguments, study
from .files import atomic_path
from .inspection import (
    format_inspection,
    format_reconstruction,
    inspect_adapter,
    matrices,
    reconstruction_errors,
    skipped_summary,
)
from .io import AdapterFileError
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


# --------------------------------------------------------------------------- parser
def parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lowrank`` command."""
    p = argparse.ArgumentParser(
        prog="lowrank",
        description="LoRA and the other low-rank adaptation methods: studies, "
        "figures and inspection of saved adapters.",
        epilog="Exit codes: 0 success, 1 runtime failure, 2 usage error.",
    )
    sub = p.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        help="what to do; `lowrank COMMAND --help` lists its options",
    )
    sub.add_parser(
        "ablate",
        add_help=False,
        help="run the rank ablation",
        description="Run the rank ablation (lowrank.ablation, as studies/rank_ablation.py does) "
        "with the remaining arguments: every variant across ranks and seeds at its dev-tuned "
        "learning rate, written to a resumable CSV and a figure under the current directory. "
        "`lowrank ablate --help` shows its own options (--quick, --out, --figure, --plot-only ...).",
    )
    pp = sub.add_parser(
        "plot",
        help="redraw the rank-ablation figure from a results CSV",
        description="Redraw the rank-ablation figure (PDF and PNG) from a results CSV of `lowrank "
        "ablate` at each variant and rank's dev-chosen learning rate, training nothing.",
    )
    pp.add_argument("csv", type=Path, metavar="CSV", help="results CSV of a rank ablation")
    pp.add_argument(
        "--figure",
        type=Path,
        default=None,
        metavar="STEM",
        help="figure path without extension (default: the CSV's path without .csv)",
    )
    pi = sub.add_parser(
        "inspect",
        help="summarise a saved adapter directory",
        description="Summarise an adapter directory written by lr.save_adapters or by PEFT's "
        "save_pretrained (read as lr.from_peft reads it), without the model: format and version, "
        "and per layer the variant, shape, rank, trainable parameter count (from the tensors) "
        "and the spectrum of ΔW (Frobenius norm, effective rank, stable rank, rank for 90% "
        "energy) where the saved tensors determine it (a note says why where ΔW needs the base "
        "weight, which the file does not hold).",
    )
    pi.add_argument("path", type=Path, metavar="PATH", help="adapter directory (lowrank's or PEFT's)")
    pi.add_argument("--json", action="store_true", help="machine-readable JSON output")
    pr = sub.add_parser(
        "reconstruct",
        help="low-rank reconstruction error of every matrix in a safetensors file",
        description="For every 2-D tensor of a safetensors file, the relative Frobenius error "
        "‖W − W_r‖_F / ‖W‖_F of its best rank-r approximation W_r (Eckart–Young); the other "
        "tensors (not 2-D, or not floating-point) are listed as skipped on stderr. Only "
        "safetensors is read: nothing is unpickled.",
    )
    pr.add_argument("weights", type=Path, metavar="WEIGHTS", help="a .safetensors file")
    pr.add_argument(
        "--ranks", type=study.positive_int, nargs="+", required=True, metavar="R", help="ranks r to evaluate"
    )
    pr.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write a tidy CSV here (atomically) instead of printing a table",
    )
    pr.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    for sp in (pi, pr):  # many small SVDs: more threads only wait on each other (and on a busy
        # machine's other work: lowrank inspect took 11 s with 1 thread, over 580 s with 2)
        sp.add_argument(
            "--threads",
            **{**arguments.COMMON["threads"], "help": "torch threads for the SVDs (default: %(default)s)"},
        )
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
        raise CLIError(
            f"{args.weights} holds no 2-D floating-point tensor to reconstruct; "
            f"it has {skipped_summary(skipped)}"
        )
    if skipped:
        print(
            f"lowrank: skipped {len(skipped)} tensors that are not 2-D floating-point matrices: "
            f"{skipped_summary(skipped)}",
            file=sys.stderr,
        )
    rows = reconstruction_errors(tensors, args.ranks)
    if args.out is None:
        print(format_reconstruction(rows, args.ranks))
    else:
        write_csv_atomic(rows, args.out, args.force)
        print(f"wrote {len(rows)} rows to {args.out}")


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "plot": _plot,
    "inspect": _inspect,
    "reconstruct": _reconstruct,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lowrank`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    try:
        if argv and argv[0] == "ablate":  # everything after it belongs to the study's parser
            return ablate(argv[1:])
        args = p.parse_args(argv)
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        COMMANDS[args.command](args)
    except SystemExit as e:  # argparse: --help (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else 1
    except (CLIError, AdapterFileError, ValueError, OSError) as e:
        message = " ".join(str(e).split())
        print(f"lowrank: error: {message}", file=sys.stderr)
        return 1
    return 0
