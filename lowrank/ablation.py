"""Rank ablation: every variant across ranks and seeds, each at its own dev-tuned learning rate.

For every task, variant and rank, a learning rate is chosen on the dev split at seed 0 from a
grid and reused for the other seeds (:func:`lowrank.sweep.tuned_sweep`); one row per run goes
to a resumable CSV. The figure shows, per task, the test metric against the rank and against
the trainable parameters, and the Pareto front over both, mean ± std over seeds, full
fine-tuning (which takes no rank) as a band. :func:`main` is the command line of
``studies/rank_ablation.py`` and of ``lowrank ablate``; :func:`run_ablation` the sweep and
:func:`figure` the figure (``lowrank plot``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from . import plots, study, tasks
from .sweep import read_results, tuned_sweep

if TYPE_CHECKING:
    from matplotlib.axes import Axes

DEFAULT_VARIANTS = ["full", "lora", "rslora", "pissa", "random_alignment", "frobenius", "dora", "vera"]
DEFAULTS = {
    "task": ["synthetic", "digits"],
    "variants": DEFAULT_VARIANTS,
    "ranks": [1, 2, 4, 8, 16, 32],
    "seeds": 3,
    "steps": 300,
    "batch_size": 64,
}
QUICK = {
    "task": ["synthetic"],
    "variants": ["full", "lora"],
    "ranks": [1, 4],
    "seeds": 1,
    "lr_grid": [3e-2],
    "steps": 200,
}


# run_ablation's options that the command line gives under the same names
RUN_OPTIONS = (
    "task",
    "variants",
    "ranks",
    "seeds",
    "lr_grid",
    "steps",
    "batch_size",
    "task_options",
    "variant_options",
)


def run_ablation(
    out: str | os.PathLike,
    task: Sequence[str] = DEFAULTS["task"],
    variants: Sequence[str] = DEFAULTS["variants"],
    ranks: Sequence[int] = DEFAULTS["ranks"],
    seeds: int = DEFAULTS["seeds"],
    lr_grid: Sequence[float] | str = study.AUTO,
    steps: int = DEFAULTS["steps"],
    batch_size: int = DEFAULTS["batch_size"],
    task_options: dict | None = None,
    variant_options: dict | None = None,
    extend: int = 3,
    **execute: Any,
) -> pd.DataFrame:
    """Run the ablation into the CSV ``out``, skipping the runs it already holds, and return
    the rows at each (task, variant, rank)'s dev-chosen learning rate, every seed 0 … seeds−1.
    ``lr_grid``: rates, or ``"auto"`` (the default: :func:`lowrank.arguments.auto_grid`); ``extend``:
    how often a search may step past the edge of its rates (:func:`lowrank.sweep.tuned_sweep`).
    ``execute`` goes to the sweep: ``workers``, ``executor``, ``scheduler``, ``progress``."""
    # dev is evaluated once, after the last step: the learning rate is chosen on the final model
    train = {"steps": steps, "batch_size": batch_size, "eval_every": steps}
    fields = {"task_options": task_options or {}, "variant_options": variant_options or {}}
    specs = [s for t in task for s in study.search_specs(t, variants, ranks, train, **fields)]
    return tuned_sweep(specs, study.search_grid(lr_grid), list(range(seeds)), out, extend=extend, **execute)


def _summary(df: pd.DataFrame, col: str) -> pd.DataFrame:
    g = df.groupby(["variant", "rank"], dropna=False)
    return g.agg(
        mean=(col, "mean"), std=(col, "std"), n=(col, "size"), params=("trainable_params", "mean")
    ).reset_index()


def _metric_vs_size(
    row: Sequence[Axes], s: pd.DataFrame, free: set[str], styles: dict[str, dict[str, str]]
) -> None:
    """The first two panels of a task's row: the summary ``s``'s metric vs rank (log₂) and vs
    trainable parameters (log), one line per variant, the rank-free variants as bands."""
    for ax in row[:2]:
        for _, f in s[s["variant"].isin(free)].iterrows():
            plots.reference(ax, f["mean"], f["std"], label=plots.label(f["variant"]))
    for variant, g in s[~s["variant"].isin(free)].dropna(subset=["rank"]).groupby("variant"):
        g = g.sort_values("rank")
        for ax, x in ((row[0], g["rank"]), (row[1], g["params"])):
            ax.errorbar(
                x,
                g["mean"],
                yerr=g["std"].fillna(0),
                label=plots.label(variant),
                capsize=1.5,
                **styles[variant],
            )
    row[0].set_xscale("log", base=2)
    row[0].set_xlabel("rank r")
    row[1].set_xscale("log")
    row[1].set_xlabel("trainable parameters")


def _pareto(
    ax: Axes, s: pd.DataFrame, higher: bool, styles: dict[str, dict[str, str]]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every (variant, rank) of the summary ``s`` at its trainable parameters (log), and the
    Pareto front over both (:func:`lowrank.plots.pareto_front`), its points outlined; returns
    the front's points and their labels (variant and rank), placed once the layout is final."""
    pts = s.dropna(subset=["mean"])
    x, y = pts["params"].to_numpy(float), pts["mean"].to_numpy(float)
    front = plots.pareto_front(x, y, higher)
    for variant, g in pts.groupby("variant"):
        ax.scatter(
            g["params"],
            g["mean"],
            s=10,
            alpha=0.5,
            color=styles[variant]["color"],
            marker=styles[variant]["marker"],
            linewidths=0,
        )
    ax.step(x[front], y[front], where="post", color="0.2", lw=1.0, label="Pareto front")
    on = pts.iloc[front]
    for variant, g in on.groupby("variant"):
        ax.scatter(
            g["params"],
            g["mean"],
            s=14,
            color=styles[variant]["color"],
            zorder=3,
            marker=styles[variant]["marker"],
            edgecolors="black",
            linewidths=0.5,
        )
    ax.scatter(
        [], [], s=14, color="0.6", edgecolors="black", linewidths=0.5, label="on the Pareto front (outlined)"
    )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    return x[front], y[front], [plots.label(v, r) for v, r in zip(on["variant"], on["rank"])]


def figure(df: pd.DataFrame, stem: str | os.PathLike) -> list[Path]:
    """Per task (row): metric vs rank (log₂), metric vs trainable parameters (log), and the
    Pareto front across variants and ranks. Mean ± std over seeds; full fine-tuning is a band."""
    df = df[df["status"] == "ok"]
    tasks = list(dict.fromkeys(df["task"]))
    if not tasks:
        raise ValueError("no finished runs to plot; run the sweep first")
    free = study.rank_free(df["variant"])  # drawn as bands
    styles = plots.style_for(df["variant"].unique())
    with plots.panels(len(tasks), 3, 2.4 * len(tasks) + 0.3) as (fig, axes):
        labels = []
        for row, task in zip(axes, tasks):
            sub = df[df["task"] == task]
            metric = sub["metric"].iloc[0]
            s = _summary(sub, f"test_{metric}")
            _metric_vs_size(row, s, free, styles)
            labels.append((row[2], *_pareto(row[2], s, bool(sub["higher_is_better"].iloc[0]), styles)))
            for ax, title in zip(row, ("by rank", "by size", "Pareto front")):
                ax.set_ylabel(plots.metric_label(metric))
                ax.set_title(f"{task}: {title}")
                if metric in ("delta_error", "mse", "perplexity"):
                    ax.set_yscale("log")
        plots.letter_panels(axes)
        plots.legend_below(fig, axes, max_cols=5)
        for ax, x, y, texts in labels:
            plots.place_labels(ax, x, y, texts)
        return plots.save(fig, stem)


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    """The test metric's mean, std and count over seeds per (task, variant, rank)."""
    ok = rows[rows["status"] == "ok"]
    return (
        ok.assign(m=[r[f"test_{r['metric']}"] for r in ok.to_dict("records")])
        .groupby(["task", "variant", "rank"], dropna=False)["m"]
        .agg(["mean", "std", "count"])
    )


def report(rows: pd.DataFrame) -> None:
    """Print :func:`summary`."""
    with pd.option_context("display.max_rows", 200, "display.width", 120):
        print(summary(rows).round(4).to_string())


def parser(root: str | os.PathLike = ".", prog: str | None = None) -> study.StudyParser:
    """The ablation's command line; its outputs go under ``root`` (results/, paper_figures/)."""
    p = study.StudyParser(
        "rank_ablation",
        __doc__,
        root,
        prog=prog,
        defaults=DEFAULTS,
        presets={"quick": ("tiny smoke run (< 1 min)", QUICK)},
        epilog="Defaults finish in about 10 minutes on 2 CPU cores.",
    )
    p.add_argument(
        "--task",
        nargs="+",
        type=study.task,
        metavar="TASK",
        help=f"tasks to run, from {', '.join(tasks.names())}",
    )
    p.add_argument(
        "--task-options",
        type=study.json_object,
        default={},
        metavar="JSON",
        help='options for every task, e.g. \'{"targets": "all-linear"}\' or '
        "'{\"max_train\": 2000}' (see each task's docstring)",
    )
    p.add_argument(
        "--variant-options",
        type=study.json_object,
        default={},
        metavar="JSON",
        help='options for every variant, e.g. \'{"alpha": 16, "dropout": 0.1}\'',
    )
    p.add_common("variants", "ranks", "seeds", "lr_grid", "steps", "batch_size", "workers", "executor")
    return p


def main(argv: Sequence[str] | None = None, root: str | os.PathLike = ".", prog: str | None = None) -> int:
    """Run (or with --plot-only, read) the ablation given by the command line ``argv``, print
    the summary and draw the figure; returns the exit code."""
    args = parser(root, prog).parse_args(argv)
    options = {k: getattr(args, k) for k in RUN_OPTIONS} | study.sweep_options(args)
    rows = study.results(args, lambda: run_ablation(args.out, **options), tuned=True)
    return study.finish(args, figure, rows, report=report, lr_search=read_results(args.out))
