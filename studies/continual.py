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
import math
import resource
import sys
import time
from pathlib import Path

import pandas as pd
import torch

import lowrank as lr
from lowrank import plots
from lowrank.inject import find_targets
from lowrank.sweep import RunSpec, read_results, saved_results, tuned_rows, tuned_sweep

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("digits", "mnist")
DEFAULT_VARIANTS = ["full", "lora", "rslora", "pissa", "milora", "dora", "vera", "random_alignment"]
RANKS = {"digits": [1, 4, 16, 64], "mnist": [1, 2, 4, 8]}
TASK_OPTIONS = {"digits": {}, "mnist": {"shift": "rotate", "angle": 45.0}}
DEFAULTS = {
    "task": list(TASKS),
    "variants": DEFAULT_VARIANTS,
    "seeds": 3,
    "lr_grid": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0],
    "steps": 300,
    "batch_size": 64,
}
QUICK = {"variants": ["full", "lora"], "ranks": [1, 4], "seeds": 1, "lr_grid": [1e-2],
         "steps": 60, "task_options": {"mnist": {"n_train": 2000, "n_eval": 2000}}}
TITLES = {"digits": "digits 0–4 → 5–9"}


def max_rank(task: lr.tasks.Task) -> tuple[int, str]:
    """The largest rank every adapted layer of ``task`` admits, and that layer's description."""
    model = task.pretrained()
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in find_targets(model, task.targets)}
    name = min(shapes, key=lambda n: min(shapes[n]))
    return min(shapes[name]), f"{name} ({shapes[name][0]}×{shapes[name][1]})"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Defaults: 580 runs, about 1000 CPU-seconds (about 9 minutes on 2 idle cores).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", nargs="+", default=DEFAULTS["task"], choices=TASKS,
                   help="tasks to run")
    p.add_argument("--task-options", type=json.loads, default=None, metavar="JSON",
                   help="per-task options over the defaults "
                        f"{json.dumps(TASK_OPTIONS)}, e.g. "
                        '\'{"mnist": {"shift": "permute", "n_train": 5000}}\'')
    p.add_argument("--variants", nargs="+", default=None,
                   help=f"variants (default: {' '.join(DEFAULT_VARIANTS)})")
    p.add_argument("--ranks", nargs="+", type=int, default=None,
                   help="ranks for every task (default: digits 1 4 16 64, mnist 1 2 4 8)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (0 … n−1); default 3")
    p.add_argument("--lr-grid", nargs="+", type=float, default=None,
                   help="learning rates searched per variant and rank on new-task dev accuracy "
                        "at seed 0 (default 3e-4 1e-3 3e-3 1e-2 3e-2 1e-1 3e-1 1)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per run (default 300)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--workers", type=int, default=2, help="parallel processes")
    p.add_argument("--out", type=Path, default=None,
                   help="results CSV (default results/continual.csv, results/continual_quick.csv "
                        "with --quick)")
    p.add_argument("--figure", type=Path, default=None,
                   help="figure path without extension (default paper_figures/continual)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (< 1 min)")
    p.add_argument("--plot-only", action="store_true", help="redraw the figure from the CSV")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    preset = {**DEFAULTS, **(QUICK if args.quick else {})}
    for key in ("seeds", "lr_grid", "steps", "variants"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    name = "continual_quick" if args.quick else "continual"
    args.out = args.out or ROOT / "results" / f"{name}.csv"
    args.figure = args.figure or ROOT / "paper_figures" / name
    if args.plot_only:
        return args
    for v in args.variants:
        if v not in lr.variants():
            p.error(f"unknown variant {v!r}; choose from {', '.join(lr.variants())}")
    given = {} if args.task_options is None else args.task_options
    if not (isinstance(given, dict) and all(isinstance(o, dict) for o in given.values())):
        p.error(f"--task-options takes a JSON object of objects keyed by task, got {given!r}")
    unknown = sorted(set(given) - set(args.task))
    if unknown:
        p.error(f"--task-options names task {unknown[0]!r}, which is not in --task; "
                f"use one of {', '.join(args.task)}")
    if args.seeds < 1 or args.steps < 1 or args.workers < 1 or args.batch_size < 1:
        p.error("--seeds, --steps, --workers and --batch-size must be at least 1")
    if not all(x > 0 and math.isfinite(x) for x in args.lr_grid):
        p.error(f"--lr-grid {args.lr_grid} must hold positive finite learning rates")
    if args.ranks is not None and min(args.ranks) < 1:
        p.error(f"--ranks {args.ranks} must all be at least 1")
    quick = QUICK["task_options"] if args.quick else {}
    args.options, args.rank_lists = {}, {}
    for task in args.task:
        args.options[task] = {**TASK_OPTIONS[task], **quick.get(task, {}), **given.get(task, {})}
        try:
            built = lr.tasks.get(task, **args.options[task])
        except ValueError as e:
            p.error(f"--task-options for {task}: {e}")
        ranks = args.ranks if args.ranks is not None else (preset.get("ranks") or RANKS[task])
        hi, layer = max_rank(built)
        if max(ranks) > hi:
            p.error(f"rank {max(ranks)} is invalid for task {task}, whose adapted layer {layer} "
                    f"admits ranks up to {hi}; pass --ranks ≤ {hi} or run the tasks separately")
        args.rank_lists[task] = sorted(set(ranks))
    return args


def specs(args: argparse.Namespace) -> list[RunSpec]:
    # dev is evaluated once, after the last step: the learning rate is chosen on the final model
    train = {"steps": args.steps, "batch_size": args.batch_size, "eval_every": args.steps}
    out = []
    for task in args.task:
        for variant in args.variants:
            for rank in ([None] if variant == "full" else args.rank_lists[task]):
                out.append(RunSpec(task, variant, rank, seed=0, lr=0.0, train=train,
                                   task_options=args.options[task], measure=("weights",)))
    return out


def with_intruders(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` plus ``intruders`` (summed over adapted layers), ``intruders_<layer>``, ``n_layers``,
    and means over layers of ``rank90`` (the rank holding 90 % of ‖ΔW‖²_F) and ``rel_change``
    (‖ΔW‖_F / ‖W₀‖_F), from ``weights``."""
    reports = [json.loads(w) for w in df["weights"]]
    layers = list(dict.fromkeys(k for rep in reports for k in rep))
    extra = pd.DataFrame({
        "intruders": [sum(r["intruders"] for r in rep.values()) for rep in reports],
        "n_layers": [len(rep) for rep in reports],
        "rank90": [sum(r["rank90"] for r in rep.values()) / len(rep) for rep in reports],
        "rel_change": [sum(r["fro_norm"] / r["w0_norm"] for r in rep.values()) / len(rep)
                       for rep in reports],
        **{f"intruders_{k}": [rep[k]["intruders"] if k in rep else float("nan") for rep in reports]
           for k in layers},
    }, index=df.index)
    return pd.concat([df, extra], axis=1)


def titles(rows: pd.DataFrame) -> dict[str, str]:
    out = dict(TITLES)
    for opts in rows.loc[rows["task"] == "mnist", "task_options"].unique():
        o = {**TASK_OPTIONS["mnist"], **json.loads(opts)}
        out["mnist"] = ("MNIST → rotated by " + f"{o['angle']:g}°" if o["shift"] == "rotate"
                        else "MNIST → permuted pixels")
    return out


def full_curve(df: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """Full fine-tuning at every searched learning rate, seed 0, for the tasks of ``rows``."""
    ok = df[(df["variant"] == "full") & (df["seed"] == 0) & (df["status"] == "ok")]
    keys = rows[["task", "task_options"]].drop_duplicates()
    return ok.merge(keys, on=["task", "task_options"]).sort_values(["task", "lr"])


def matched(rows: pd.DataFrame, curve: pd.DataFrame) -> pd.DataFrame:
    """Per (task, variant, rank): mean accuracy and forgetting over seeds, and the least
    forgetting full fine-tuning reaches at any searched learning rate (seed 0) with at least
    that accuracy (NaN if no full run is that accurate)."""
    g = (rows[rows["variant"] != "full"]
         .groupby(["task", "variant", "rank"])[["test_accuracy", "test_forgetting"]].mean()
         .reset_index())
    best = []
    for r in g.itertuples():
        c = curve[(curve["task"] == r.task) & (curve["test_accuracy"] >= r.test_accuracy)]
        best.append(c["test_forgetting"].min() if len(c) else float("nan"))
    return g.assign(full_forgetting_at_matched=best,
                    difference=g["test_forgetting"] - pd.Series(best, index=g.index))


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over seeds per (task, variant, rank)."""
    cols = {"accuracy": "test_accuracy", "old_accuracy": "test_old_accuracy",
            "forgetting": "test_forgetting", "intruders": "intruders", "rank90": "rank90",
            "|ΔW|/|W0|": "rel_change"}
    g = rows.groupby(["task", "variant", "rank"], dropna=False)
    out = pd.DataFrame({name: [f"{m:.3f} ± {0 if pd.isna(s) else s:.3f}" for m, s in
                               zip(g[c].mean(), g[c].std())] for name, c in cols.items()},
                       index=g.size().index)
    layers = [c for c in rows.columns if c.startswith("intruders_")]
    out["intruders per layer"] = [" ".join(f"{x:.1f}" for x in v[~pd.isna(v)])
                                  for v in g[layers].mean().to_numpy()]
    out["n"] = g.size()
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    start = time.perf_counter()
    if args.plot_only:
        try:
            df = saved_results(args.out)
        except FileNotFoundError as e:
            print(f"{e}; run without --plot-only first", file=sys.stderr)
            return 1
        rows = tuned_rows(df)
    else:
        if args.workers == 1:
            torch.set_num_threads(1)
        rows = tuned_sweep(specs(args), args.lr_grid, list(range(args.seeds)), args.out,
                           workers=args.workers, progress=not args.quiet)
        df = read_results(args.out)
    rows = with_intruders(rows[rows["status"] == "ok"]).astype({"rank": "Int64"})
    curve = full_curve(df, rows)
    paths = plots.continual(rows, args.figure, curve=curve, titles=titles(rows))
    before = (rows["test_old_accuracy"] + rows["test_forgetting"]).groupby(rows["task"]).mean()
    with pd.option_context("display.max_rows", 300, "display.width", 160):
        print("pretrained old-task test accuracy: "
              + ", ".join(f"{t} {a:.4f}" for t, a in before.items()))
        print(summary(rows).to_string())
        print("\nfull fine-tuning at every searched learning rate (seed 0):")
        print(curve[["task", "lr", "test_accuracy", "test_forgetting"]].round(4)
              .to_string(index=False))
        print("\nforgetting at matched new-task accuracy (variant mean over seeds vs the least "
              "forgetting of a full run at least as accurate):")
        print(matched(rows, curve).round(4).to_string(index=False))
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    print(f"results: {args.out}\nfigure: {', '.join(map(str, paths))}")
    print(f"elapsed {time.perf_counter() - start:.1f} s, peak memory of one process {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
