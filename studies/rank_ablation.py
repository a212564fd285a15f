"""Rank ablation: every variant across ranks and seeds, each at its own dev-tuned learning rate.

Writes one row per run to results/rank_ablation.csv (resumable: re-running skips finished runs)
and draws paper_figures/rank_ablation.{pdf,png}: test metric vs rank, vs trainable parameters,
and the Pareto front, mean ± std over seeds, full fine-tuning as a band.

    python studies/rank_ablation.py                 # embedded default: synthetic + digits
    python studies/rank_ablation.py --quick         # < 1 min smoke run
    python studies/rank_ablation.py --task text --variants lora full --ranks 8
    python studies/rank_ablation.py --plot-only     # redraw the figure from the CSV
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import pandas as pd

import lowrank as lr
from lowrank import plots
from lowrank.sweep import RunSpec, saved_results, tuned_rows, tuned_sweep

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VARIANTS = ["full", "lora", "rslora", "pissa", "random_alignment", "frobenius", "dora",
                    "vera"]
DEFAULTS = {
    "task": ["synthetic", "digits"],
    "ranks": [1, 2, 4, 8, 16, 32],
    "seeds": 3,
    "lr_grid": [3e-3, 1e-2, 3e-2, 1e-1],
    "steps": 300,
    "batch_size": 64,
}
QUICK = {"task": ["synthetic"], "variants": ["full", "lora"], "ranks": [1, 4], "seeds": 1,
         "lr_grid": [3e-2], "steps": 200}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Defaults finish in about 10 minutes on 2 CPU cores.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", nargs="+", default=None,
                   help=f"tasks to run (from {', '.join(lr.tasks.names())}); "
                        f"default {' '.join(DEFAULTS['task'])}")
    p.add_argument("--task-options", type=json.loads, default={}, metavar="JSON",
                   help='options for every task, e.g. \'{"targets": "all-linear"}\' or '
                        '\'{"max_train": 2000}\' (see each task\'s docstring)')
    p.add_argument("--variant-options", type=json.loads, default={}, metavar="JSON",
                   help='options for every variant, e.g. \'{"alpha": 16, "dropout": 0.1}\'')
    p.add_argument("--variants", nargs="+", default=None,
                   help="variants (default: those of full, lora, rslora, pissa, random_alignment, "
                        "frobenius, dora, vera that are registered)")
    p.add_argument("--ranks", nargs="+", type=int, default=None, help="ranks r (default 1 … 32)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (0 … n−1); default 3")
    p.add_argument("--lr-grid", nargs="+", type=float, default=None,
                   help="learning rates searched per variant and rank on the dev split at seed 0")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per run (default 300)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--workers", type=int, default=2, help="parallel processes")
    p.add_argument("--executor", choices=["local", "dask", "submitit"], default="local",
                   help="local process pool, a dask.distributed cluster, or SLURM via submitit")
    p.add_argument("--scheduler", default=None,
                   help="dask scheduler address (--executor dask; default: a private local "
                        "cluster), or submitit cluster 'slurm' or 'local' (default: SLURM if "
                        "present)")
    p.add_argument("--out", type=Path, default=None,
                   help="results CSV (default results/rank_ablation.csv, "
                        "results/rank_ablation_quick.csv with --quick)")
    p.add_argument("--figure", type=Path, default=None,
                   help="figure path without extension (default paper_figures/rank_ablation)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (< 1 min)")
    p.add_argument("--plot-only", action="store_true", help="redraw the figure from the CSV")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    preset = {**DEFAULTS, **(QUICK if args.quick else {})}
    for key in ("task", "ranks", "seeds", "lr_grid", "steps"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.variants is None:
        args.variants = preset.get("variants") or [v for v in DEFAULT_VARIANTS
                                                   if v in lr.variants()]
    name = "rank_ablation_quick" if args.quick else "rank_ablation"
    args.out = args.out or ROOT / "results" / f"{name}.csv"
    args.figure = args.figure or ROOT / "paper_figures" / name
    for v in args.variants:
        lr.variant_class(v)  # unknown names fail here, listing the known ones
    for t in args.task:
        if t not in lr.tasks.names():
            p.error(f"unknown task {t!r}; choose from {', '.join(lr.tasks.names())}")
    for opts in (args.task_options, args.variant_options):
        if not isinstance(opts, dict):
            p.error(f"--task-options and --variant-options take a JSON object, got {opts!r}")
    if args.seeds < 1 or args.steps < 1 or args.workers < 1 or min(args.ranks) < 1:
        p.error("--seeds, --steps, --workers and every --ranks value must be at least 1")
    return args


def specs(args: argparse.Namespace) -> list[RunSpec]:
    # dev is evaluated once, after the last step: the learning rate is chosen on the final model
    train = {"steps": args.steps, "batch_size": args.batch_size, "eval_every": args.steps}
    out = []
    for task in args.task:
        for variant in args.variants:
            for rank in ([None] if variant == "full" else args.ranks):
                out.append(RunSpec(task, variant, rank, seed=0, lr=0.0, train=train,
                                   task_options=args.task_options,
                                   variant_options=args.variant_options))
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
        rows = tuned_sweep(specs(args), args.lr_grid, list(range(args.seeds)), args.out,
                           workers=args.workers, executor=args.executor,
                           scheduler=args.scheduler, progress=not args.quiet)
    paths = plots.rank_ablation(rows, args.figure)
    ok = rows[rows["status"] == "ok"]
    summary = (ok.assign(m=[r[f"test_{r['metric']}"] for r in ok.to_dict("records")])
               .groupby(["task", "variant", "rank"], dropna=False)["m"]
               .agg(["mean", "std", "count"]))
    with pd.option_context("display.max_rows", 200, "display.width", 120):
        print(summary.round(4).to_string())
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    print(f"results: {args.out}\nfigure: {', '.join(map(str, paths))}")
    print(f"elapsed {time.perf_counter() - start:.1f} s, peak memory of one process {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
