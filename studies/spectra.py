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
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import lowrank as lr
from lowrank import plots, study
from lowrank.sweep import RunSpec, read_results, tuned_rows

# the text rows, in results/: the full-size downstream run when there is one, else the default
DEFAULT_INCLUDES = ["downstream_paper.csv", "downstream.csv"]
DEFAULTS = {
    "task": ["digits"],
    "variants": lr.variants(),
    "ranks": [1, 4, 16, 64],
    "seeds": 3,
    "steps": 300,
    "batch_size": 64,
}
QUICK = {
    "variants": ["full", "lora", "pissa", "vera", "adalora", "dora", "loha"],
    "ranks": [1, 4],
    "seeds": 1,
    "lr_grid": [3e-2],
    "steps": 100,
}
NUMERICAL_TOL = 1e-5  # σᵢ/σ₁ above this counts towards the numerical rank
# full fine-tuning's W − W₀ (and any variant without a rank) in every panel
FULL_STYLE = {"color": plots.REFERENCE["color"], "ls": "--", "lw": 1.0}
LAYER_COLUMNS = [
    "effective_rank",
    "eff_rank_over_r",
    "rank90",
    "stable_rank",
    "energy_in_rank",
    "numerical_rank",
    "fro_norm",
    "w0_norm",
    "intruders",
    "test_score",
]


PRESETS = {"quick": ("tiny smoke run (< 1 min), no text rows", QUICK)}
OUT = "tidy table, with the sweep CSV beside it as <name>_runs.csv"
EPILOG = "The default run takes 435 CPU seconds: about 4 minutes on 2 idle cores."


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = study.parser(__file__, __doc__, defaults=DEFAULTS, presets=PRESETS, out=OUT, epilog=EPILOG)
    p.add_argument(
        "--task",
        nargs="+",
        type=study.task,
        metavar="TASK",
        help=f"tasks trained here, from {', '.join(lr.tasks.names())}",
    )
    p.add_common("variants", "ranks", "seeds", "lr_grid", "steps", "batch_size")
    p.add_argument(
        "--spectrum-rank",
        type=study.positive_int,
        default=16,
        help="the rank whose spectra the figure draws (the nearest rank present)",
    )
    p.add_argument(
        "--include",
        nargs="*",
        type=Path,
        default=None,
        metavar="CSV",
        help="other sweep CSVs whose dev-tuned rows with a `weights` column are folded "
        f"in (default: results/{DEFAULT_INCLUDES[0]}, else "
        f"results/{DEFAULT_INCLUDES[1]}, if either exists; none with --quick)",
    )
    p.add_common(
        "workers",
        threads="torch threads of the main process (runs there when --workers "
        "1); small MLPs gain nothing from more, and on a busy machine "
        "lose a lot",
    )
    args = p.parse_args(argv)
    args.runs = args.out.with_name(f"{args.out.stem}_runs.csv")
    args.resumes.append(args.runs)
    if args.include is None:
        defaults = [p.results / name for name in DEFAULT_INCLUDES]
        args.include = [] if args.quick else [path for path in defaults if path.exists()][:1]
        if not (args.quick or args.plot_only or args.include):
            print(
                f"note: neither {' nor '.join(map(str, defaults))} exists; no text rows to fold in",
                file=sys.stderr,
            )
    for path in args.include:
        if not path.is_file():
            p.error(f"--include {path} does not exist; pass the CSV of a sweep run with measure=('weights',)")
    return args


def specs(args: argparse.Namespace) -> list[RunSpec]:
    train = {"steps": args.steps, "batch_size": args.batch_size, "eval_every": args.steps}
    grids = [study.search_specs(t, args.variants, args.ranks, train, measure=("weights",)) for t in args.task]
    return [s for g in grids for s in g]


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
        key = {
            "task": row["task"],
            "dataset": _dataset(row.get("task_options")),
            "variant": row["variant"],
            "rank": rank,
            "seed": int(row["seed"]),
            "lr": row["lr"],
            "run_id": row["run_id"],
        }
        score = row.get(f"test_{row['metric']}", math.nan)
        for layer, rep in json.loads(row["weights"]).items():
            sv = rep["sv"]
            total = rep["fro_norm"] ** 2
            base = {**key, "layer": layer, "out_features": rep["shape"][0], "in_features": rep["shape"][1]}
            numerical = sum(s > NUMERICAL_TOL * sv[0] for s in sv) if sv and sv[0] > 0 else 0
            out.append(
                {
                    **base,
                    "kind": "layer",
                    "n_sv": len(sv),
                    **{
                        k: rep[k]
                        for k in (
                            "effective_rank",
                            "rank90",
                            "stable_rank",
                            "fro_norm",
                            "w0_norm",
                            "intruders",
                        )
                    },
                    # the adapter's own r; full's report counts all min(out, in) directions
                    "energy_in_rank": rep["energy_in_rank"] if rank else math.nan,
                    "eff_rank_over_r": rep["effective_rank"] / rank if rank else math.nan,
                    "numerical_rank": numerical,
                    "metric": row["metric"],
                    "test_score": score,
                }
            )
            cum = 0.0
            for i, s in enumerate(sv, start=1):
                cum += s * s
                out.append(
                    {
                        **base,
                        "kind": "sv",
                        "i": i,
                        "sigma": s,
                        "sigma_rel": s / sv[0] if sv[0] > 0 else 0.0,
                        "energy": cum / total if total > 0 else 1.0,
                    }
                )
    return pd.DataFrame(out)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per task, variant, rank and layer: mean over seeds of the layer rows."""
    layers = table[table["kind"] == "layer"]
    return (
        layers.groupby(["task", "dataset", "variant", "rank", "layer"], dropna=False, sort=False)[
            LAYER_COLUMNS
        ]
        .mean()
        .assign(
            seeds=layers.groupby(
                ["task", "dataset", "variant", "rank", "layer"], dropna=False, sort=False
            ).size()
        )
    )


def full_energy(table: pd.DataFrame, ranks: list[int]) -> pd.DataFrame:
    """Full fine-tuning's share of ‖ΔW‖²_F in its top r directions, per r (mean over seeds)."""
    free = table["variant"].isin(study.rank_free(table["variant"]))
    sv = table[(table["kind"] == "sv") & free & table["i"].isin(ranks)]
    return sv.pivot_table(index=["task", "dataset", "layer"], columns="i", values="energy", aggfunc="mean")


def ba_family(names: list[str]) -> list[str]:
    """The variants among ``names`` whose ΔW is the B·A family's s·(BA − B₀A₀)
    (``LowRankAdapter.delta_weight``): of rank ≤ r, or ≤ 2r when B₀A₀ is subtracted."""
    return [v for v in names if lr.variant_class(v).delta_weight is lr.LowRankAdapter.delta_weight]


def _spectrum_panel(
    ax, S: pd.DataFrame, names: list[str], free: set[str], styles: dict, r_star: int | None, title: str
) -> None:
    """σᵢ/σ₁ vs i of the variants ``names`` at rank ``r_star`` (the rank-free ones at theirs):
    median over layers and seeds, interquartile band."""
    for v in names:
        g = S[(S["variant"] == v) & ((S["rank"] == r_star) if v not in free else True)]
        if g.empty:
            continue
        q = g.groupby("i")["sigma_rel"].quantile([0.25, 0.5, 0.75]).unstack().clip(lower=1e-9)
        st = FULL_STYLE if v in free else {**styles[v], "markevery": 8, "markersize": 3}
        ax.plot(q.index, q[0.5], label=plots.label(v), **st)
        ax.fill_between(q.index, q[0.25], q[0.75], color=st["color"], alpha=0.15, lw=0)
    if r_star:
        ax.axvline(r_star, color="0.5", ls=":", lw=0.8, label="i = r (rank drawn)")
    ax.fill_between([], [], [], color="0.5", alpha=0.3, lw=0, label="σ band: quartiles over layers, seeds")
    ax.set_yscale("log")
    ax.set_ylim(1e-9, 2)
    ax.set_xlabel("index i")
    ax.set_ylabel(r"$\sigma_i/\sigma_1$ of $\Delta W$")
    ax.set_title(title)


def _rank_panel(
    ax,
    L: pd.DataFrame,
    col: str,
    ranked: list[str],
    free: set[str],
    styles: dict,
    ranks: list[int],
    ylabel: str,
    title: str,
) -> None:
    """``col`` (layer mean) vs the allotted rank r: mean ± std over seeds, the rank-free variants
    a band, y = r dotted."""
    per_run = L.groupby(["variant", "rank", "seed"], dropna=False)[col].mean().reset_index()
    s = per_run.groupby(["variant", "rank"], dropna=False)[col].agg(["mean", "std"]).reset_index()
    for _, f in s[s["variant"].isin(free)].iterrows():
        plots.reference(
            ax,
            f["mean"],
            f["std"],
            label=plots.label(f["variant"]),
            color=FULL_STYLE["color"],
            lw=FULL_STYLE["lw"],
        )
    for v in ranked:
        g = s[s["variant"] == v].sort_values("rank")
        if len(g):
            ax.errorbar(
                g["rank"], g["mean"], yerr=g["std"].fillna(0), capsize=1.5, label=plots.label(v), **styles[v]
            )
    if ranks:
        ax.plot(ranks, ranks, color="0.5", ls=":", lw=0.8, label="y = r")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("allotted rank r")
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def spectrum_rank_of(L: pd.DataFrame, spectrum_rank: int) -> int | None:
    """The rank whose spectra a row of the figure draws: of the ranks that the most variants of
    the layer rows ``L`` were run at, the one nearest ``spectrum_rank`` (on a log scale; ties: the
    larger). A sweep of several ranks per variant gives ``spectrum_rank`` if it ran it; one that
    ran most variants at a single rank (the downstream runs: r = 8) gives that rank, not the one
    rank a single variant's budget came to."""
    counts = L.dropna(subset=["rank"]).groupby("rank")["variant"].nunique()
    if counts.empty:
        return None
    best = [int(r) for r, n in counts.items() if n == counts.max()]
    return min(best, key=lambda r: (abs(np.log2(r / spectrum_rank)), -r))


def figure(df: pd.DataFrame, stem: str | os.PathLike, spectrum_rank: int = 16) -> list[Path]:
    """One row per task: σᵢ/σ₁ of ΔW vs i for the B·A family (:func:`ba_family`) and for the
    other variants, each panel at the rank :func:`spectrum_rank_of` picks for its variants (median
    over layers and seeds, interquartile band; full fine-tuning's W − W₀ in black), then effective
    rank and rank90 vs r (layer mean; mean ± std over seeds; full fine-tuning a band, y = r
    dotted). ``df`` is the spectra study's table."""
    lay, sv = df[df["kind"] == "layer"], df[df["kind"] == "sv"]
    names = [t if not isinstance(d, str) or not d else str(d) for t, d in zip(df["task"], df["dataset"])]
    df = df.assign(_task=names)
    lay, sv = df.loc[lay.index], df.loc[sv.index]
    tasks = list(dict.fromkeys(lay["_task"]))
    if not tasks:
        raise ValueError("no layer rows to plot; run the study first")
    free = study.rank_free(lay["variant"])
    ranked = sorted(v for v in lay["variant"].unique() if v not in free)
    family = ba_family(ranked)
    groups = [family, [v for v in ranked if v not in family]]
    styles = plots.style_for(ranked)
    with plots.panels(len(tasks), 4, 2.0 * len(tasks) + 0.5) as (fig, axes):
        for row, task in zip(axes, tasks):
            L, S = lay[lay["_task"] == task], sv[sv["_task"] == task]
            ranks = sorted({int(r) for r in L["rank"].dropna()})
            for ax, group, title in zip(row[:2], groups, ("B·A family", "others")):  # each its own rank
                r_star = spectrum_rank_of(L[L["variant"].isin(group)], spectrum_rank)
                _spectrum_panel(
                    ax, S, [*sorted(free), *group], free, styles, r_star, f"{task}: {title}, r = {r_star}"
                )
            for ax, col, ylabel, title in (
                (row[2], "effective_rank", "effective rank of ΔW", "effective rank"),
                (row[3], "rank90", "rank for 90 % energy", "rank90"),
            ):
                _rank_panel(ax, L, col, ranked, free, styles, ranks, ylabel, f"{task}: {title}")
        plots.letter_panels(axes)
        plots.legend_below(fig, axes, max_cols=5)
        return plots.save(fig, stem)


def run(args: argparse.Namespace) -> pd.DataFrame:
    """The sweep (resumed from --out's _runs.csv) and the included rows, as the tidy table."""
    rows = study.tuned(args, specs(args), out=args.runs)
    extra = [selected_rows(path) for path in args.include]
    runs = pd.concat([rows[rows["status"] == "ok"], *extra], ignore_index=True)
    return spectra_table(runs.drop_duplicates("run_id"))


def report(table: pd.DataFrame) -> None:
    """Print the layer summaries (:func:`summary`) and full fine-tuning's energy in r directions."""
    with pd.option_context("display.max_rows", 500, "display.width", 160):
        print("per layer, mean over seeds:")
        print(summary(table).round(3).to_string())
        ranks = sorted({int(r) for r in table["rank"].dropna()})
        if ranks and study.rank_free(table["variant"]):
            print("full fine-tuning: share of ‖ΔW‖²_F in the top r directions:")
            print(full_energy(table, ranks).round(3).to_string())


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    table = study.results(args, lambda: run(args), key=None)
    return study.finish(
        args,
        figure,
        table,
        report=report,
        write=not args.plot_only,
        lr_search=read_results(args.runs),
        spectrum_rank=args.spectrum_rank,
    )


if __name__ == "__main__":
    sys.exit(main())
