"""Continual adaptation: new-task accuracy vs old-task forgetting, and intruder dimensions.

A model pretrained on an old task is adapted to a new one with every variant and rank, each at
its own dev-tuned learning rate (chosen on new-task dev accuracy only), and then measured on both:
  accuracy      new-task test accuracy (digits 5–9; rotated MNIST)
  forgetting    acc_old(W₀) − acc_old(W₀ + ΔW) on the old task's test split (digits 0–4; MNIST)
  intruders     per adapted layer, how many of the top-10 left singular vectors of W₀ + ΔW have
                max |cos| < 0.5 with every singular vector of W₀, summed over layers
Biderman et al. 2024 (arXiv 2405.09673) report that LoRA "learns less and forgets less" than full
fine-tuning; Shuttleworth et al. 2024 (arXiv 2410.21228) that LoRA's ΔW brings intruder
dimensions that full fine-tuning's does not. Full fine-tuning at every searched learning rate
(seed 0) gives its own accuracy–forgetting trade-off curve, so LoRA can also be compared with full
fine-tuning at matched new-task accuracy: the least forgetting any full run reaches while
matching at least LoRA's accuracy (an upper bound on full fine-tuning's forgetting there: its
least-forgetting run may sit at the grid's smallest rate). The grid spans 3e-4 … 1 because VeRA,
DoRA and random alignment prefer rates of 0.3 and more and full fine-tuning far smaller ones.

Tasks: `digits` (MLP 64→128→128→10 pretrained on 0–4, adapted to 5–9; fc1 and fc2 adapted,
head frozen: ranks up to 64 fit every layer) and `mnist` (MLP 784→256→256→10 pretrained on
MNIST, adapted to MNIST rotated by 45°; the task adapts fc1, fc2 and the 10×256 head `out`, and
has no option to leave the head out, so its ranks are capped at 10: default 1, 2, 4, 8). Ranks
given with --ranks apply to every task and are checked against each task's smallest layer.

Writes one row per run to results/continual.csv (resumable; the `weights` column holds every
layer's ΔW spectrum and intruder count) and paper_figures/continual.{pdf,png}.

    python studies/continual.py                 # 580 runs, ≈ 1000 CPU-s: ≈ 9 min on 2 idle cores
    python studies/continual.py --quick         # < 1 min smoke run
    python studies/continual.py --task mnist --task-options '{"mnist": {"shift": "permute"}}'
    python studies/continual.py --plot-only     # redraw the figure from the CSV
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from matplotlib import ticker

import lowrank as lr
from lowrank import plots, study
from lowrank.inject import find_targets
from lowrank.sweep import RunSpec, read_results

if TYPE_CHECKING:
    from matplotlib.axes import Axes

TASKS = ("digits", "mnist")
RANKS = {"digits": [1, 4, 16, 64], "mnist": [1, 2, 4, 8]}
TASK_OPTIONS = {"digits": {}, "mnist": {"shift": "rotate", "angle": 45.0}}
DEFAULTS = {
    "task": list(TASKS),
    "variants": ["full", "lora", "rslora", "pissa", "milora", "dora", "vera", "random_alignment"],
    "seeds": 3,
    "steps": 300,
    "batch_size": 64,
}
QUICK = {"variants": ["full", "lora"], "ranks": [1, 4], "seeds": 1, "lr_grid": [1e-2], "steps": 60}
QUICK_TASK_OPTIONS = {"mnist": {"n_train": 2000, "n_eval": 2000}}
TITLES = {"digits": "digits 0–4 → 5–9"}


def max_rank(task: lr.tasks.Task) -> tuple[int, str]:
    """The largest rank every adapted layer of ``task`` admits, and that layer's description."""
    model = task.pretrained()
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in find_targets(model, task.targets)}
    name = min(shapes, key=lambda n: min(shapes[n]))
    return min(shapes[name]), f"{name} ({shapes[name][0]}×{shapes[name][1]})"


PRESETS = {"quick": ("tiny smoke run (< 1 min) on 2000 MNIST images", QUICK)}
EPILOG = "Defaults: 580 runs, about 1000 CPU-seconds (about 9 minutes on 2 idle cores)."


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = study.parser(__file__, __doc__, defaults=DEFAULTS, presets=PRESETS, epilog=EPILOG)
    p.add_argument("--task", nargs="+", choices=TASKS, help="tasks to run")
    p.add_argument(
        "--task-options",
        type=study.json_object,
        default=None,
        metavar="JSON",
        help="per-task options over the defaults "
        f"{json.dumps(TASK_OPTIONS)}, e.g. "
        '\'{"mnist": {"shift": "permute", "n_train": 5000}}\'',
    )
    p.add_common(
        "variants",
        "ranks",
        "seeds",
        "lr_grid",
        "steps",
        "batch_size",
        "workers",
        ranks="ranks for every task (default: "
        + ", ".join(f"{t} {' '.join(map(str, r))}" for t, r in RANKS.items())
        + ")",
        lr_grid="learning rates searched per variant and rank on new-task dev accuracy at seed 0",
    )
    args = p.parse_args(argv)
    if args.plot_only:
        return args
    given = {} if args.task_options is None else args.task_options
    if not all(isinstance(o, dict) for o in given.values()):
        p.error(f"--task-options takes a JSON object of objects keyed by task, got {given!r}")
    unknown = sorted(set(given) - set(args.task))
    if unknown:
        p.error(
            f"--task-options names task {unknown[0]!r}, which is not in --task; "
            f"use one of {', '.join(args.task)}"
        )
    quick = QUICK_TASK_OPTIONS if args.quick else {}
    args.options, args.rank_lists = {}, {}
    for task in args.task:
        args.options[task] = {**TASK_OPTIONS[task], **quick.get(task, {}), **given.get(task, {})}
        try:
            built = lr.tasks.get(task, **args.options[task])
        except ValueError as e:
            p.error(f"--task-options for {task}: {e}")
        ranks = args.ranks or RANKS[task]
        hi, layer = max_rank(built)
        if max(ranks) > hi:
            p.error(
                f"rank {max(ranks)} is invalid for task {task}, whose adapted layer {layer} "
                f"admits ranks up to {hi}; pass --ranks ≤ {hi} or run the tasks separately"
            )
        args.rank_lists[task] = sorted(set(ranks))
    return args


def specs(args: argparse.Namespace) -> list[RunSpec]:
    # dev is evaluated once, after the last step: the learning rate is chosen on the final model
    train = {"steps": args.steps, "batch_size": args.batch_size, "eval_every": args.steps}
    return [
        s
        for t in args.task
        for s in study.search_specs(
            t, args.variants, args.rank_lists[t], train, task_options=args.options[t], measure=("weights",)
        )
    ]


def with_intruders(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` plus ``intruders`` (summed over adapted layers), ``intruders_<layer>``, ``n_layers``,
    and means over layers of ``rank90`` (the rank holding 90 % of ‖ΔW‖²_F) and ``rel_change``
    (‖ΔW‖_F / ‖W₀‖_F), from ``weights``."""
    reports = [json.loads(w) for w in df["weights"]]
    layers = list(dict.fromkeys(k for rep in reports for k in rep))
    extra = pd.DataFrame(
        {
            "intruders": [sum(r["intruders"] for r in rep.values()) for rep in reports],
            "n_layers": [len(rep) for rep in reports],
            "rank90": [sum(r["rank90"] for r in rep.values()) / len(rep) for rep in reports],
            "rel_change": [
                sum(r["fro_norm"] / r["w0_norm"] for r in rep.values()) / len(rep) for rep in reports
            ],
            **{
                f"intruders_{k}": [rep[k]["intruders"] if k in rep else float("nan") for rep in reports]
                for k in layers
            },
        },
        index=df.index,
    )
    return pd.concat([df, extra], axis=1)


def titles(rows: pd.DataFrame) -> dict[str, str]:
    out = dict(TITLES)
    for opts in rows.loc[rows["task"] == "mnist", "task_options"].unique():
        o = {**TASK_OPTIONS["mnist"], **json.loads(opts)}
        out["mnist"] = (
            "MNIST → rotated by " + f"{o['angle']:g}°"
            if o["shift"] == "rotate"
            else "MNIST → permuted pixels"
        )
    return out


def full_curve(df: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """Full fine-tuning at every searched learning rate, seed 0, for the tasks of ``rows``."""
    free = df["variant"].isin(study.rank_free(df["variant"]))
    ok = df[free & (df["seed"] == 0) & (df["status"] == "ok")]
    keys = rows[["task", "task_options"]].drop_duplicates()
    return ok.merge(keys, on=["task", "task_options"]).sort_values(["task", "lr"])


def matched(rows: pd.DataFrame, curve: pd.DataFrame) -> pd.DataFrame:
    """Per (task, variant, rank): mean accuracy and forgetting over seeds, and the least
    forgetting full fine-tuning reaches at any searched learning rate (seed 0) with at least
    that accuracy (NaN if no full run is that accurate)."""
    g = (
        rows[~rows["variant"].isin(study.rank_free(rows["variant"]))]
        .groupby(["task", "variant", "rank"])[["test_accuracy", "test_forgetting"]]
        .mean()
        .reset_index()
    )
    best = []
    for r in g.itertuples():
        c = curve[(curve["task"] == r.task) & (curve["test_accuracy"] >= r.test_accuracy)]
        best.append(c["test_forgetting"].min() if len(c) else float("nan"))
    return g.assign(
        full_forgetting_at_matched=best, difference=g["test_forgetting"] - pd.Series(best, index=g.index)
    )


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over seeds per (task, variant, rank)."""
    cols = {
        "accuracy": "test_accuracy",
        "old_accuracy": "test_old_accuracy",
        "forgetting": "test_forgetting",
        "intruders": "intruders",
        "rank90": "rank90",
        "|ΔW|/|W0|": "rel_change",
    }
    g = rows.groupby(["task", "variant", "rank"], dropna=False)
    out = pd.DataFrame(
        {
            name: [f"{m:.3f} ± {0 if pd.isna(s) else s:.3f}" for m, s in zip(g[c].mean(), g[c].std())]
            for name, c in cols.items()
        },
        index=g.size().index,
    )
    layers = [c for c in rows.columns if c.startswith("intruders_")]
    out["intruders per layer"] = [
        " ".join(f"{x:.1f}" for x in v[~pd.isna(v)]) for v in g[layers].mean().to_numpy()
    ]
    out["n"] = g.size()
    return out


def _means(sub: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, rank) of one task's rows: mean and std over seeds of accuracy (acc…),
    forgetting (fgt…) and intruders (intr…), a NaN std (one seed) as 0."""
    g = sub.groupby(["variant", "rank"], dropna=False)
    stats = {"acc": "test_accuracy", "fgt": "test_forgetting", "intr": "intruders"}
    return (
        pd.concat({f"{k}{a}": g[c].agg(a) for k, c in stats.items() for a in ("mean", "std")}, axis=1)
        .fillna(0)
        .reset_index()
    )


def _tuned(s: pd.DataFrame, free: set[str]) -> Iterator[tuple[str, pd.DataFrame]]:
    """Each variant of ``s`` that takes a rank, with its rows sorted by rank."""
    for variant, v in s[~s["variant"].isin(free)].dropna(subset=["rank"]).groupby("variant"):
        yield variant, v.sort_values("rank")


def _marker_size(r: float, lo: float, hi: float) -> float:
    """Marker area growing linearly in log₂ r from 12 at log₂ r = lo to 72 at hi."""
    return 12 + 60 * (np.log2(r) - lo) / max(hi - lo, 1)


def _full_curve(ax: Axes, c: pd.DataFrame, xlim: tuple[float, float]) -> pd.DataFrame:
    """Full fine-tuning at every searched learning rate (``c``) as a dotted line, the rates
    outside ``xlim`` listed; returns the points inside, which the caller labels with their rate
    once the layout is final (:func:`lowrank.plots.place_labels`)."""
    ref = plots.REFERENCE["color"]
    ax.plot(
        c["test_accuracy"],
        c["test_forgetting"],
        ls=":",
        color=ref,
        lw=0.8,
        marker=".",
        zorder=1,
        label="full fine-tuning at each searched lr (labelled), seed 0",
    )
    inside = c["test_accuracy"].between(*xlim)
    if (~inside).any():
        off = ", ".join(f"{r:g}" for r in c.loc[~inside, "lr"])
        ax.text(
            0.02,
            0.98,
            f"full fine-tuning at lr {off}: off the panel",
            fontsize=5,
            color=ref,
            transform=ax.transAxes,
            va="top",
        )
    return c.loc[inside]


def _close_rates(
    c: pd.DataFrame, xlim: tuple[float, float], ylim: tuple[float, float], near: float = 0.04
) -> list[tuple[float, float, str]]:
    """The learning-rate labels of the full fine-tuning curve ``c``: (x, y, text) per group of
    points within ``near`` of the panel's width and height of the group's first point, in
    order of the rate, the group's rates in one label ("0.03, 0.1, 1")."""
    groups: list[tuple[float, float, list[str]]] = []
    w, h = xlim[1] - xlim[0], ylim[1] - ylim[0]
    for x, y, rate in zip(c["test_accuracy"], c["test_forgetting"], c["lr"]):
        for gx, gy, rates in groups:
            if abs(x - gx) < near * w and abs(y - gy) < near * h:
                rates.append(f"{rate:g}")
                break
        else:
            groups.append((x, y, [f"{rate:g}"]))
    return [(x, y, ", ".join(rates)) for x, y, rates in groups]


def _trade_off(
    ax: Axes,
    sub: pd.DataFrame,
    s: pd.DataFrame,
    c: pd.DataFrame | None,
    ranks: pd.Series,
    free: set[str],
    styles: dict[str, dict[str, str]],
    title: str,
) -> pd.DataFrame:
    """One task's accuracy-vs-forgetting panel: each tuned variant through its ranks (marker size:
    rank), full fine-tuning a black star, full fine-tuning at every searched rate from ``c``;
    returns the points of that curve inside the panel (to label with their rates)."""
    lo, hi = (np.log2(ranks.min()), np.log2(ranks.max())) if len(ranks) else (0, 1)
    # the panel spans the tuned runs; full FT runs far to their left are listed instead
    x0 = (s["accmean"] - s["accstd"]).min()
    x1 = (s["accmean"] + s["accstd"]).max()
    xlim = (x0 - 0.06 * (x1 - x0) - 0.01, min(1.0, x1 + 0.06 * (x1 - x0) + 0.01))
    ys = [s["fgtmean"] - s["fgtstd"], s["fgtmean"] + s["fgtstd"]]
    ax.axhline(
        (sub["test_old_accuracy"] + sub["test_forgetting"]).mean(),
        color="0.6",
        lw=0.6,
        ls="--",
        zorder=0,
        label="old task wholly forgotten",
    )
    shown = c.iloc[:0] if c is not None else pd.DataFrame()
    if c is not None and len(c):
        shown = _full_curve(ax, c, xlim)
        ys.append(shown["test_forgetting"])
    y = pd.concat(ys)
    pad = 0.06 * (y.max() - y.min()) + 0.01
    ax.set_xlim(*xlim)
    ax.set_ylim(y.min() - pad, y.max() + pad)
    for variant, v in _tuned(s, free):
        st = styles[variant]
        ax.errorbar(
            v["accmean"],
            v["fgtmean"],
            xerr=v["accstd"],
            yerr=v["fgtstd"],
            color=st["color"],
            lw=0.7,
            alpha=0.8,
            capsize=1.2,
            zorder=2,
        )
        ax.scatter(
            v["accmean"],
            v["fgtmean"],
            s=[_marker_size(r, lo, hi) for r in v["rank"]],
            color=st["color"],
            marker=st["marker"],
            zorder=3,
            linewidths=0,
            label=plots.label(variant),
        )
    for _, f in s[s["variant"].isin(free)].iterrows():
        ax.errorbar(
            f["accmean"],
            f["fgtmean"],
            xerr=f["accstd"],
            yerr=f["fgtstd"],
            **plots.REFERENCE,
            markersize=10,
            ls="none",
            capsize=1.5,
            zorder=4,
            label="full fine-tuning (tuned lr)",
        )
    ax.set_title(title + " (marker size: rank)")
    ax.set_xlabel("new-task test accuracy")
    ax.set_ylabel("forgetting: old-task test accuracy lost")
    return shown


def _intruder_panel(
    ax: Axes,
    s: pd.DataFrame,
    ranks: pd.Series,
    free: set[str],
    styles: dict[str, dict[str, str]],
    n_layers: int,
    title: str,
) -> None:
    """One task's intruder dimensions (summed over its ``n_layers`` layers) vs rank (log₂), one
    line per tuned variant, full fine-tuning a band."""
    for variant, v in _tuned(s, free):
        ax.errorbar(
            v["rank"],
            v["intrmean"],
            yerr=v["intrstd"],
            label=plots.label(variant),
            capsize=1.5,
            **styles[variant],
        )
    for _, f in s[s["variant"].isin(free)].iterrows():
        plots.reference(
            ax, f["intrmean"], f["intrstd"], "full fine-tuning (tuned lr)", color=plots.REFERENCE["color"]
        )
    ax.set_xscale("log", base=2)
    if len(ranks):
        ticks = sorted({int(r) for r in ranks})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlabel("rank r")
    ax.set_ylabel(f"intruder dimensions (sum over {n_layers} layers)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{title}: intruder dimensions")


def figure(
    df: pd.DataFrame,
    stem: str | os.PathLike,
    curve: pd.DataFrame | None = None,
    titles: dict[str, str] | None = None,
) -> list[Path]:
    """Per task (column): new-task test accuracy vs forgetting (old-task accuracy lost), one line
    per variant through its ranks (marker size grows with rank), full fine-tuning a black star and,
    from ``curve``, full fine-tuning at every searched learning rate as a dotted line; below,
    intruder dimensions summed over the adapted layers vs rank, full fine-tuning as a band.
    Mean ± std over seeds. ``df`` needs test_accuracy, test_forgetting, test_old_accuracy,
    intruders and n_layers."""
    df = df[df["status"] == "ok"]
    tasks = list(dict.fromkeys(df["task"]))
    if not tasks:
        raise ValueError("no finished runs to plot; run the sweep first")
    titles = titles or {}
    free = study.rank_free(df["variant"])
    styles = plots.style_for(df["variant"].unique())
    with plots.panels(2, len(tasks), 5.4) as (fig, axes):
        rates = []
        for col, task in enumerate(tasks):
            sub = df[df["task"] == task]
            s = _means(sub)
            ranks = s.loc[~s["variant"].isin(free), "rank"].dropna()
            c = None if curve is None else curve[curve["task"] == task].sort_values("lr")
            title = titles.get(task, task)
            rates.append((axes[0, col], _trade_off(axes[0, col], sub, s, c, ranks, free, styles, title)))
            _intruder_panel(axes[1, col], s, ranks, free, styles, int(sub["n_layers"].max()), title)
        plots.letter_panels(axes)
        plots.legend_below(fig, axes, max_cols=3)
        for ax, c in rates:
            groups = _close_rates(c, ax.get_xlim(), ax.get_ylim())
            plots.place_labels(
                ax,
                [x for x, _, _ in groups],
                [y for _, y, _ in groups],
                [text for _, _, text in groups],
                color=plots.REFERENCE["color"],
            )
        return plots.save(fig, stem)


def report(rows: pd.DataFrame, curve: pd.DataFrame) -> None:
    """Print the old task's accuracy before adaptation, :func:`summary`, full fine-tuning's
    ``curve`` and :func:`matched`."""
    before = (rows["test_old_accuracy"] + rows["test_forgetting"]).groupby(rows["task"]).mean()
    with pd.option_context("display.max_rows", 300, "display.width", 160):
        print("pretrained old-task test accuracy: " + ", ".join(f"{t} {a:.4f}" for t, a in before.items()))
        print(summary(rows).to_string())
        print("\nfull fine-tuning at every searched learning rate (seed 0):")
        print(curve[["task", "lr", "test_accuracy", "test_forgetting"]].round(4).to_string(index=False))
        print(
            "\nforgetting at matched new-task accuracy (variant mean over seeds vs the least "
            "forgetting of a full run at least as accurate):"
        )
        print(matched(rows, curve).round(4).to_string(index=False))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.workers == 1:
        torch.set_num_threads(1)
    rows = study.results(args, lambda: study.tuned(args, specs(args)), tuned=True)
    if rows is None:
        return 1
    rows = with_intruders(rows[rows["status"] == "ok"]).astype({"rank": "Int64"})
    searched = read_results(args.out)
    curve = full_curve(searched, rows)
    return study.finish(
        args,
        figure,
        rows,
        report=lambda rows: report(rows, curve),
        curve=curve,
        titles=titles(rows),
        lr_search=searched,
    )


if __name__ == "__main__":
    sys.exit(main())
