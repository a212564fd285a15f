"""Adversarial robustness: clean, FGSM and PGD test accuracy of every variant trained with and without
adversarial regularisation, each (variant, rank, training mode) at its own dev-tuned learning rate.

Training minimises (1 − w)·L(x) + w·L(x + δ), δ the FGSM step ε·sign(∇ₓL) (Goodfellow et al. 2015,
arXiv 1412.6572) or 3-step PGD in the L∞ ball of radius ε (Madry et al. 2018, arXiv 1706.06083);
the test set is then attacked at the same ε by FGSM and by 10-step PGD with a random start.
Default task: the MNIST MLP (784→256→256→10) adapted to 45°-rotated MNIST, 300 steps, w = 0.5.
The task adapts fc1, fc2 and out, so ranks are at most 10 (out is 10×256); at r = 8 the rank
constraint binds in fc1 (256×784) and fc2 (256×256). ε = 0.1 in pixel units (pixels in [0, 1];
the MNIST model does not rescale its input, so this is also its input scale): at 0.1 every plainly
fine-tuned model falls to ≤ 2 % FGSM accuracy, a common floor, while 300 steps of adversarial full
fine-tuning recover ≈ 60 %, so the radius separates the variants (Madry's 0.3 is for CNNs trained
adversarially from scratch). The attacks do not clip x + δ to [0, 1], so robust accuracies are
lower bounds for valid images. The learning rate is chosen on clean dev accuracy.
random_alignment trains only B in a frozen random orthonormal row space A.

Writes one row per run to results/robustness.csv (resumable) and draws
paper_figures/robustness.{pdf,png}: test accuracy clean / under FGSM / under PGD per variant, one
marker per training mode, mean ± std over seeds.

    python studies/robustness.py                 # 6 variants × 3 modes × (5 lrs + 2 seeds): 126 runs
    python studies/robustness.py --quick         # < 1 min smoke run
    python studies/robustness.py --task digits --eps 0.05 --ranks 4 16
    python studies/robustness.py --plot-only     # redraw the figure from the CSV
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from pathlib import Path

import pandas as pd
import torch

import lowrank as lr
from lowrank import plots, study
from lowrank.sweep import RunSpec, read_results

MODES = ("none", "fgsm", "pgd")  # training modes: plain fine-tuning, FGSM or PGD regularisation
MODE_NAMES = {"none": "plain fine-tuning", "fgsm": "FGSM training", "pgd": "PGD training"}
TASKS = ("mnist", "digits")  # the tasks whose input (pixels in [0, 1]) an L∞ ε is meaningful for
MAX_RANK = {"mnist": 10, "digits": 64}  # smallest side of an adapted layer (mnist: out 10×256)
TASK_OPTIONS = {"mnist": {"shift": "rotate", "angle": 45.0, "n_train": 10_000, "n_eval": 5_000}, "digits": {}}
DEFAULTS = {
    "task": ["mnist"],
    "variants": ["full", "lora", "pissa", "random_alignment", "dora", "vera"],
    "ranks": [8],
    "modes": list(MODES),
    "seeds": 3,
    "steps": 300,
    "batch_size": 64,
}
QUICK = {"variants": ["full", "lora"], "seeds": 1, "lr_grid": [1e-2], "steps": 150}
QUICK_TASK_OPTIONS = {"mnist": {**TASK_OPTIONS["mnist"], "n_train": 2_000, "n_eval": 1_000}, "digits": {}}
COLUMNS = {"clean": "test_clean_accuracy", "fgsm": "test_fgsm_accuracy", "pgd": "test_pgd_accuracy"}


PRESETS = {"quick": ("smoke run (< 1 min) on 2k/1k MNIST images", QUICK)}
EPILOG = "The default took 28 min on 2 CPU cores shared with other jobs (an estimated 6 min on idle cores)."


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = study.parser(__file__, __doc__, defaults=DEFAULTS, presets=PRESETS, epilog=EPILOG)
    p.add_argument("--task", nargs="+", help=f"tasks, from {', '.join(TASKS)}")
    p.add_argument(
        "--task-options",
        type=study.json_object,
        default={},
        metavar="JSON",
        help="options for every task on top of the study's (mnist: "
        f'{json.dumps(TASK_OPTIONS["mnist"])}), e.g. \'{{"shift": "permute"}}\'',
    )
    p.add_common("variants", ranks="ranks r (mnist: at most 10, its output layer is 10×256)")
    p.add_argument(
        "--modes",
        nargs="+",
        metavar="MODE",
        help=f"training modes, from {', '.join(MODES)} (none: no adversarial term)",
    )
    p.add_argument(
        "--eps",
        type=float,
        default=0.1,
        help="L∞ radius ε in pixel units (pixels in [0, 1]) for training and attacks",
    )
    p.add_argument(
        "--adv-weight",
        type=float,
        default=0.5,
        help="weight w of the adversarial loss: (1 − w)·clean + w·adversarial",
    )
    p.add_argument("--adv-steps", type=study.positive_int, default=3, help="PGD steps during training")
    p.add_common(
        "seeds",
        "lr_grid",
        "steps",
        "batch_size",
        "workers",
        "threads",
        lr_grid="learning rates searched per (variant, rank, mode) on dev clean accuracy",
        threads="torch threads of this process (with --workers 1 the runs happen here)",
    )
    args = p.parse_args(argv)
    for m in args.modes:
        if m not in MODES:
            p.error(f"unknown training mode {m!r}; choose from {', '.join(MODES)}")
    for t in args.task:
        if t not in TASKS:
            p.error(f"task {t!r} is not supported here; choose from {', '.join(TASKS)}")
        valid = set(inspect.signature(lr.tasks.task_class(t).__init__).parameters) - {"self"}
        bad = sorted(set(args.task_options) - valid)
        if bad:
            p.error(
                f"--task-options key {bad[0]!r} is unknown for task {t!r}; "
                f"valid keys: {', '.join(sorted(valid))}"
            )
        if max(args.ranks) > MAX_RANK[t]:
            p.error(
                f"--ranks {max(args.ranks)} is too large for {t}, whose smallest adapted layer "
                f"has {MAX_RANK[t]} rows or columns; choose ranks ≤ {MAX_RANK[t]}"
            )
    if not 0 <= args.eps <= 1:
        p.error(f"--eps {args.eps} is not a pixel radius; choose ε in [0, 1], such as 0.1")
    if not 0 <= args.adv_weight <= 1:
        p.error(f"--adv-weight {args.adv_weight} is out of range; choose w in [0, 1]")
    return args


def specs(args: argparse.Namespace, mode: str) -> list[RunSpec]:
    """One spec per (task, variant, rank) in training ``mode``, measuring robust accuracy."""
    # dev is evaluated once, after the last step: the learning rate is chosen on the final model
    train = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "eval_every": args.steps,
        "adversarial": None if mode == "none" else mode,
        "adv_eps": args.eps,
        "adv_weight": args.adv_weight,
        "adv_steps": args.adv_steps,
    }
    out = []
    for task in args.task:
        options = {**(QUICK_TASK_OPTIONS if args.quick else TASK_OPTIONS)[task], **args.task_options}
        out += study.search_specs(
            task, args.variants, args.ranks, train, task_options=options, measure=("robustness",)
        )
    return out


def mode_of(df: pd.DataFrame) -> pd.Series:
    """The training mode of each row: ``none``, ``fgsm`` or ``pgd``."""
    return df["adversarial"].fillna("none").astype(str)


def run(args: argparse.Namespace) -> pd.DataFrame:
    """One tuned sweep over every training mode: the training configuration is part of each
    run's search group, so every (task, variant, rank, mode) gets its own learning rate."""
    base = [s for mode in args.modes for s in specs(args, mode)]
    return study.tuned(args, base)


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of clean / FGSM / PGD test accuracy per (task, variant, rank, mode)."""
    ok = rows[rows["status"] == "ok"].assign(mode=mode_of)
    ok["rank"] = ["-" if pd.isna(r) else str(int(r)) for r in ok["rank"]]  # full has no rank
    ok["mode"] = pd.Categorical(ok["mode"], categories=MODES, ordered=True)
    g = ok.groupby(["task", "variant", "rank", "mode"], observed=True)
    out = g[list(COLUMNS.values())].agg(["mean", "std"])
    out.columns = [f"{c.removeprefix('test_').removesuffix('_accuracy')}_{s}" for c, s in out.columns]
    return out.assign(n=g.size(), lr=g["lr"].first())


def effects(table: pd.DataFrame) -> pd.DataFrame:
    """Per (task, variant, rank): what FGSM / PGD training buys in robust accuracy under the same
    attack and what it costs in clean accuracy, relative to plain fine-tuning (differences of means)."""
    out = {}
    for (task, variant, rank), g in table.groupby(level=[0, 1, 2], sort=False):
        g = g.droplevel([0, 1, 2])
        if "none" not in g.index:
            continue
        base = g.loc["none"]
        row = {}
        for m in ("fgsm", "pgd"):
            if m in g.index:
                row[f"{m}_gain"] = g.loc[m, f"{m}_mean"] - base[f"{m}_mean"]
                row[f"{m}_clean_cost"] = base["clean_mean"] - g.loc[m, "clean_mean"]
        out[(task, variant, rank)] = row
    return pd.DataFrame.from_dict(out, orient="index")


def figure(df: pd.DataFrame, stem: str | os.PathLike) -> list[Path]:
    """Per task (row) three panels, test accuracy clean, under FGSM and under PGD at the runs' ε;
    one line per variant (and rank), one marker per training mode (plain, FGSM- or PGD-regularised),
    mean ± std over seeds as horizontal error bars."""
    df = df[df["status"] == "ok"].assign(mode=lambda d: d["adversarial"].fillna("none").astype(str))
    tasks = list(dict.fromkeys(df["task"]))
    if not tasks:
        raise ValueError("no finished runs to plot; run the sweep first")
    modes = [m for m in ("none", "fgsm", "pgd") if m in set(df["mode"])]
    evals = [
        ("test_clean_accuracy", "clean"),
        ("test_fgsm_accuracy", "FGSM"),
        ("test_pgd_accuracy", "PGD-10"),
    ]
    free = study.rank_free(df["variant"])
    df = df.assign(
        config=[plots.label(v, r) for v, r in zip(df["variant"], df["rank"])], free=df["variant"].isin(free)
    )
    configs = list(
        dict.fromkeys(  # full fine-tuning first
            df.sort_values("free", ascending=False, kind="stable")["config"]
        )
    )
    offset = {m: (i - (len(modes) - 1) / 2) * 0.22 for i, m in enumerate(modes)}
    with plots.panels(len(tasks), 3, 0.32 * len(configs) * len(tasks) + 1.0, sharey=True) as (fig, axes):
        for row, task in zip(axes, tasks):
            sub = df[df["task"] == task]
            eps = ", ".join(f"{e:g}" for e in sorted(sub["robust_eps"].unique()))
            for ax, (col, name) in zip(row, evals):
                for i, m in enumerate(modes):
                    g = sub[sub["mode"] == m].groupby("config")[col].agg(["mean", "std"])
                    ys = [configs.index(c) + offset[m] for c in g.index]
                    ax.errorbar(
                        g["mean"],
                        ys,
                        xerr=g["std"].fillna(0),
                        ls="",
                        capsize=1.5,
                        color=plots.OKABE_ITO[i],
                        marker=plots.MARKERS[i],
                        label=MODE_NAMES[m],
                    )
                ax.set_xlim(-0.02, 1.02)
                ax.set_xlabel(f"test accuracy, {name}" + ("" if name == "clean" else f" (ε = {eps})"))
                ax.set_title(f"{task}: {name}")
                ax.grid(axis="y", visible=False)
            row[0].set_yticks(range(len(configs)), configs)
            row[0].set_ylabel("variant (trained with each mode)")
        axes[0, 0].invert_yaxis()  # shared y: once for all panels; full on top
        axes[0, 0].plot(
            [], [], ls="none", marker="_", color="0.3", markersize=8, label="error bars: ± std over seeds"
        )
        plots.letter_panels(axes)
        plots.legend_below(fig, axes, max_cols=len(modes) + 1)
        return plots.save(fig, stem)


def searched(path: os.PathLike) -> pd.DataFrame:
    """Every run of the CSV at ``path`` (every learning rate tried), its training mode in words
    in ``training``: what the learning-rate figure draws, one panel per mode."""
    df = read_results(path)
    return df.assign(training=mode_of(df).map(MODE_NAMES)) if len(df) else df


def report(rows: pd.DataFrame) -> None:
    """Print the accuracies (:func:`summary`) and what adversarial training changes (:func:`effects`)."""
    table = summary(rows)
    with pd.option_context("display.max_rows", 200, "display.width", 150):
        print(
            "test accuracy, mean and std over seeds (robust_eps = "
            f"{', '.join(f'{e:g}' for e in sorted(rows['robust_eps'].unique()))}):"
        )
        print(table.round(3).to_string())
        fx = effects(table)
        if len(fx):
            print(
                "\nadversarial training vs plain fine-tuning (gain: robust accuracy under the "
                "training attack; clean_cost: clean accuracy lost):"
            )
            print(fx.round(3).to_string())


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    rows = study.results(args, lambda: run(args), tuned=True)  # each (…, mode) at its own lr
    return study.finish(
        args, figure, rows, report=report, lr_search=searched(args.out), lr_panels={"col": "training"}
    )


if __name__ == "__main__":
    sys.exit(main())
