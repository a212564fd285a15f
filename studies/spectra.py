"""Singular spectra and effective rank of learned updates ΔW, per variant, rank and layer.

How much of its allotted rank r does each variant use, and how does that compare with the
update full fine-tuning learns? For every trained adapter, ΔW = delta_weight() (s·BA for LoRA,
W − W₀ for full fine-tuning, always measured from the pretrained W₀): singular values σ₁ ≥ σ₂ ≥ …
(the top 64 are stored), effective rank exp(−Σ pᵢ log pᵢ), pᵢ = σᵢ/Σσ (Roy & Vetterli, 2007),
stable rank ‖ΔW‖²_F/σ₁², rank90 = min k with Σ_{i≤k} σᵢ² ≥ 0.9‖ΔW‖²_F, and the numerical rank
#{i: σᵢ > 1e-5·σ₁} (float32 rounding of a rank-r product leaves σ_{r+1}/σ₁ ≤ 4e-8 here). Compare the
LoRA paper's observation that the learned ΔW has a very low "intrinsic rank" (Hu et al., 2021,
§7) and intruder dimensions (Shuttleworth et al., 2024).

Trains every variant on the digits task (fc1, fc2 adapted) through tuned_sweep with
measure=("weights",), so each (variant, rank) has its own dev-chosen learning rate; runs go to
results/spectra_runs.csv (resumable). Text-task rows come from other sweeps' CSVs given with
--include (default: results/downstream_paper.csv, else results/downstream.csv): their dev-tuned
rows that carry a `weights` column are folded in. Writes the tidy table results/spectra.csv
(kind "layer": one row per run and layer with the summaries; kind "sv": one row per run, layer
and index i with σᵢ, σᵢ/σ₁ and the cumulative energy Σ_{j≤i}σⱼ²/‖ΔW‖²_F) and
paper_figures/spectra.{pdf,png}.

    python studies/spectra.py                  # digits, 12 variants × ranks 1 4 16 64, 3 seeds
    python studies/spectra.py --quick          # < 1 min smoke run
    python studies/spectra.py --include results/downstream.csv results/other.csv
    python studies/spectra.py --plot-only      # redraw the figure from results/spectra.csv
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import pandas as pd
import torch

import lowrank as lr
from lowrank import plots
from lowrank.sweep import RunSpec, read_results, saved_results, tuned_rows, tuned_sweep, write_atomic

ROOT = Path(__file__).resolve().parent.parent
# the text rows: the full-size downstream run when there is one, else the reduced default
DEFAULT_INCLUDES = [ROOT / "results" / "downstream_paper.csv", ROOT / "results" / "downstream.csv"]
ALL_VARIANTS = ["full", "lora", "rslora", "pissa", "milora", "random_alignment", "frobenius",
                "dora", "vera", "adalora", "loha", "lokr"]
DEFAULTS = {"task": ["digits"], "variants": ALL_VARIANTS, "ranks": [1, 4, 16, 64], "seeds": 3,
            "lr_grid": [3e-3, 1e-2, 3e-2, 1e-1, 3e-1], "steps": 300}
QUICK = {"variants": ["full", "lora", "pissa", "vera", "adalora", "dora", "loha"],
         "ranks": [1, 4], "seeds": 1, "lr_grid": [3e-2], "steps": 100}
NUMERICAL_TOL = 1e-5  # σᵢ/σ₁ above this counts towards the numerical rank
LAYER_COLUMNS = ["effective_rank", "eff_rank_over_r", "rank90", "stable_rank", "energy_in_rank",
                 "numerical_rank", "fro_norm", "w0_norm", "intruders", "test_score"]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="The default run takes 435 CPU seconds: about 4 minutes on "
                                       "2 idle cores.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", nargs="+", default=DEFAULTS["task"],
                   help=f"tasks trained here (from {', '.join(lr.tasks.names())})")
    p.add_argument("--variants", nargs="+", default=None,
                   help="variants (default: all twelve; --quick: full lora pissa vera adalora "
                        "dora loha)")
    p.add_argument("--ranks", nargs="+", type=int, default=None,
                   help=f"ranks r (default {' '.join(map(str, DEFAULTS['ranks']))})")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (0 … n−1); default 3")
    p.add_argument("--lr-grid", nargs="+", type=float, default=None,
                   help="learning rates searched per variant and rank on dev at seed 0 "
                        "(default 3e-3 … 3e-1)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per run (default 300)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--spectrum-rank", type=int, default=16,
                   help="the rank whose spectra the figure draws (the nearest rank present)")
    p.add_argument("--include", nargs="*", type=Path, default=None, metavar="CSV",
                   help="other sweep CSVs whose dev-tuned rows with a `weights` column are folded "
                        "in (default: results/downstream_paper.csv, else results/downstream.csv, "
                        "if either exists; none with --quick)")
    p.add_argument("--workers", type=int, default=2, help="parallel processes")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the main process (runs there when --workers 1); small "
                        "MLPs gain nothing from more, and on a busy machine lose a lot")
    p.add_argument("--out", type=Path, default=None,
                   help="tidy table (default results/spectra.csv, results/spectra_quick.csv with "
                        "--quick); the sweep CSV is written next to it as <name>_runs.csv")
    p.add_argument("--figure", type=Path, default=None,
                   help="figure path without extension (default paper_figures/spectra)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (< 1 min)")
    p.add_argument("--plot-only", action="store_true", help="redraw the figure from --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    preset = {**DEFAULTS, **(QUICK if args.quick else {})}
    for key in ("variants", "ranks", "seeds", "lr_grid", "steps"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    name = "spectra_quick" if args.quick else "spectra"
    args.out = args.out or ROOT / "results" / f"{name}.csv"
    args.runs = args.out.with_name(f"{args.out.stem}_runs.csv")
    args.figure = args.figure or ROOT / "paper_figures" / name
    for t in args.task:
        if t not in lr.tasks.names():
            p.error(f"unknown task {t!r}; choose from {', '.join(lr.tasks.names())}")
    for v in args.variants:
        if v not in lr.variants():
            p.error(f"unknown variant {v!r}; choose from {', '.join(lr.variants())}")
    if min(args.seeds, args.steps, args.workers, args.threads, *args.ranks) < 1:
        p.error("--seeds, --steps, --workers, --threads and every --ranks value must be at least 1")
    if args.spectrum_rank < 1 or min(args.lr_grid) <= 0:
        p.error("--spectrum-rank must be at least 1 and every --lr-grid value positive")
    if args.include is None:
        found = [path for path in DEFAULT_INCLUDES if path.exists()]
        args.include = [] if args.quick else found[:1]
        if not (args.quick or args.plot_only or args.include):
            print(f"note: neither {' nor '.join(map(str, DEFAULT_INCLUDES))} exists; no text "
                  "rows to fold in", file=sys.stderr)
    for path in args.include:
        if not path.is_file():
            p.error(f"--include {path} does not exist; pass the CSV of a sweep run with "
                    "measure=('weights',)")
    return args


def specs(args: argparse.Namespace) -> list[RunSpec]:
    train = {"steps": args.steps, "batch_size": args.batch_size, "eval_every": args.steps}
    return [RunSpec(task, variant, rank, seed=0, lr=0.0, train=train, measure=("weights",))
            for task in args.task for variant in args.variants
            for rank in ([None] if variant == "full" else args.ranks)]


def selected_rows(path: Path) -> pd.DataFrame:
    """The finished, dev-tuned rows of a sweep CSV that carry a ``weights`` report."""
    df = read_results(path)
    if "weights" not in df.columns:
        print(f"note: {path} has no weights column; nothing folded in from it", file=sys.stderr)
        return df.iloc[:0]
    if "lr_selected" in df.columns:
        df = df[df["lr_selected"].map(lambda v: v is True or str(v) == "True")]
    else:
        df = tuned_rows(df)
    df = df[(df["status"] == "ok") & df["weights"].notna()]
    print(f"{path}: {len(df)} dev-tuned rows with weights folded in", file=sys.stderr)
    return df


def _dataset(task_options: str) -> str:
    try:
        return str(json.loads(task_options).get("dataset", "")) if isinstance(task_options, str) else ""
    except (json.JSONDecodeError, AttributeError):
        return ""


def spectra_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The tidy table of the sweep rows ``runs`` (see the module docstring): one "layer" row
    per run and layer, one "sv" row per run, layer and stored singular value."""
    out = []
    for row in runs.to_dict("records"):
        rank = None if pd.isna(row["rank"]) else int(row["rank"])
        key = {"task": row["task"], "dataset": _dataset(row.get("task_options")),
               "variant": row["variant"], "rank": rank, "seed": int(row["seed"]),
               "lr": row["lr"], "run_id": row["run_id"]}
        score = row.get(f"test_{row['metric']}", math.nan)
        for layer, rep in json.loads(row["weights"]).items():
            sv = rep["sv"]
            total = rep["fro_norm"] ** 2
            base = {**key, "layer": layer, "out_features": rep["shape"][0],
                    "in_features": rep["shape"][1]}
            numerical = sum(s > NUMERICAL_TOL * sv[0] for s in sv) if sv and sv[0] > 0 else 0
            out.append({**base, "kind": "layer", "n_sv": len(sv),
                        **{k: rep[k] for k in ("effective_rank", "rank90", "stable_rank",
                                               "fro_norm", "w0_norm", "intruders")},
                        # the adapter's own r; full's report counts all min(out, in) directions
                        "energy_in_rank": rep["energy_in_rank"] if rank else math.nan,
                        "eff_rank_over_r": rep["effective_rank"] / rank if rank else math.nan,
                        "numerical_rank": numerical, "metric": row["metric"], "test_score": score})
            cum = 0.0
            for i, s in enumerate(sv, start=1):
                cum += s * s
                out.append({**base, "kind": "sv", "i": i, "sigma": s,
                            "sigma_rel": s / sv[0] if sv[0] > 0 else 0.0,
                            "energy": cum / total if total > 0 else 1.0})
    return pd.DataFrame(out)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per task, variant, rank and layer: mean over seeds of the layer rows."""
    layers = table[table["kind"] == "layer"]
    return (layers.groupby(["task", "dataset", "variant", "rank", "layer"], dropna=False, sort=False)
            [LAYER_COLUMNS].mean().assign(seeds=layers.groupby(
                ["task", "dataset", "variant", "rank", "layer"], dropna=False, sort=False).size()))


def full_energy(table: pd.DataFrame, ranks: list[int]) -> pd.DataFrame:
    """Full fine-tuning's share of ‖ΔW‖²_F in its top r directions, per r (mean over seeds)."""
    sv = table[(table["kind"] == "sv") & (table["variant"] == "full") & table["i"].isin(ranks)]
    return sv.pivot_table(index=["task", "dataset", "layer"], columns="i", values="energy",
                          aggfunc="mean")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.plot_only:
        try:
            table = saved_results(args.out, key=None)
        except FileNotFoundError as e:
            print(f"{e}; run without --plot-only first", file=sys.stderr)
            return 1
    else:
        rows = tuned_sweep(specs(args), args.lr_grid, list(range(args.seeds)), args.runs,
                           workers=args.workers, progress=not args.quiet)
        rows = rows[rows["status"] == "ok"]
        extra = [selected_rows(path) for path in args.include]
        runs = pd.concat([rows, *extra], ignore_index=True).drop_duplicates("run_id")
        table = spectra_table(runs)
        write_atomic(table, args.out)
    paths = plots.spectra(table, args.figure, spectrum_rank=args.spectrum_rank)
    with pd.option_context("display.max_rows", 500, "display.width", 160):
        print("per layer, mean over seeds:")
        print(summary(table).round(3).to_string())
        ranks = sorted({int(r) for r in table["rank"].dropna()})
        if ranks and (table["variant"] == "full").any():
            print("full fine-tuning: share of ‖ΔW‖²_F in the top r directions:")
            print(full_energy(table, ranks).round(3).to_string())
    print(f"results: {args.out}\nfigure: {', '.join(map(str, paths))}")
    print(f"elapsed {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
