"""What every study shares: its command line, its (variant, rank) grid and its last step.

A study trains or measures something, writes one tidy CSV to ``results/<name>.csv`` and draws
one figure to ``paper_figures/<name>.{pdf,png}``, where the name is the study's and gains the
preset's (``<name>_quick`` with ``--quick``). :func:`parser` gives every study script the same
output options (--out, --figure, --plot-only, --fresh, --quiet and the presets such as --quick, whose
values an option given explicitly overrides) and, on request (:meth:`StudyParser.add_common`),
the sweep's options: --variants (checked against the registry), --ranks, --seeds, --lr-grid
(rates, or ``auto``: :func:`lowrank.arguments.auto_grid`) with --lr-extend, --steps, --batch-size, --workers,
--executor with --scheduler, --threads. :func:`grid` lists a sweep's (variant, rank) pairs and
:func:`finish` writes the outputs (for a tuned study also the learning-rate sensitivity figure
``<name>_lr``) and prints the lines that ``studies/make_figures.py`` reports.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from . import convergence, sensitivity
from .adapters import OptionError, variant_class, variants
from .arguments import (  # noqa: F401
    AUTO,
    COMMON,
    auto_grid,
    count,
    json_object,
    learning_rate,
    positive_int,
    search_grid,
    task,
    variant,
)
from .files import atomic_path
from .sweep import KEY, RunSpec, saved_results, search_summary, tuned_rows, tuned_sweep, write_atomic
from .sweep.fingerprint import COLUMN, code_fingerprint

RESULTS, FIGURES = "results", "paper_figures"  # the folders of every study's CSV and figure


def _setting(key: str, value: Any) -> str:
    """``key`` set to ``value``, in the words of the command line."""
    flag = f"--{key.replace('_', '-')}"
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    if isinstance(value, dict):
        return f"{flag} {json.dumps(value)}"
    values = value if isinstance(value, (list, tuple)) else [value]
    return " ".join([flag, *(f"{v:g}" if isinstance(v, float) else str(v) for v in values)])


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, except the uninformative None and False."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class StudyParser(argparse.ArgumentParser):
    """The command line of the study ``name``: a description from ``doc``'s first paragraph,
    every default shown in --help, outputs under ``root``, and the presets ``presets``
    (``{"quick": (help, {option: value})}``): each is a flag that changes the defaults
    ``defaults`` (values given explicitly still win) and the name of the outputs."""

    def __init__(
        self,
        name: str,
        doc: str,
        root: str | os.PathLike,
        *,
        presets: dict[str, tuple[str, dict[str, Any]]],
        defaults: dict[str, Any] | None = None,
        prog: str | None = None,
        epilog: str | None = None,
        out: str = "results CSV",
        plot_only: str = "redraw the figure from the CSV, training nothing",
    ) -> None:
        super().__init__(prog=prog, description=doc.split("\n\n")[0], epilog=epilog, formatter_class=_Help)
        self.name, self.root, self.presets = name, Path(root), presets
        self.script: Path | None = None  # the study script, for the fingerprint of its own rows
        self.results = self.root / RESULTS
        self.defaults = dict(defaults or {})
        outputs = self.add_argument_group("outputs and presets")

        def default(folder: str, ext: str) -> str:
            return "default " + "; ".join(
                [f"{folder}/{name}{ext}", *(f"{folder}/{name}_{k}{ext} with --{k}" for k in presets)]
            )

        outputs.add_argument("--out", type=Path, help=f"{out} ({default(RESULTS, '.csv')})")
        outputs.add_argument(
            "--figure", type=Path, help=f"figure path without extension ({default(FIGURES, '')})"
        )
        modes = outputs.add_mutually_exclusive_group() if len(presets) > 1 else outputs
        for key, (text, values) in presets.items():
            changes = ", ".join(_setting(k, v) for k, v in values.items() if self.defaults.get(k) != v)
            modes.add_argument(
                f"--{key}",
                action="store_true",
                help=(f"{text}: {changes}" if changes else text).replace("%", "%%"),
            )
        outputs.add_argument("--plot-only", action="store_true", help=plot_only)
        outputs.add_argument(
            "--fresh",
            action="store_true",
            help="run everything again, even runs the CSV holds from this very "
            "code (without it, those are reused and rows of other code are "
            "re-run); the old CSV is kept as <name>.previous.csv",
        )
        outputs.add_argument("--quiet", action="store_true", help="no progress output")

    def add_common(self, *names: str, **helps: str) -> None:
        """Add the shared options ``names`` (keys of :data:`COMMON`, in this order; "executor"
        brings --scheduler, "lr_grid" brings --lr-extend); ``helps`` gives options their own
        help text (and adds those not in ``names``)."""
        brings = {"executor": ("executor", "scheduler"), "lr_grid": ("lr_grid", "lr_extend")}
        for name in [*names, *(k for k in helps if k not in names)]:
            for key in brings.get(name, (name,)):
                help = helps.get(key) or COMMON[key]["help"].format(variants=", ".join(variants()))
                if key == "lr_grid":
                    help += (
                        "; or auto: for each variant three rates half a decade apart around "
                        "the task's lr_centre × the variant's lr_scale, extended by --lr-extend"
                    )
                kw = {**COMMON[key], "help": help}
                self.add_argument(f"--{key.replace('_', '-')}", **kw)

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ):
        argv = list(sys.argv[1:] if args is None else args)
        flags = argparse.ArgumentParser(add_help=False)  # which preset sets the defaults
        for key in self.presets:
            flags.add_argument(f"--{key}", action="store_true")
        on = [k for k, v in vars(flags.parse_known_args(argv)[0]).items() if v]
        self.set_defaults(**{**self.defaults, **(self.presets[on[0]][1] if on else {})})
        ns, rest = super().parse_known_args(argv, namespace)
        grid = getattr(ns, "lr_grid", None)
        if isinstance(grid, list) and AUTO in grid:
            if len(grid) > 1:
                self.error(
                    f"--lr-grid {' '.join(map(str, grid))}: auto stands alone; pass either "
                    "auto or learning rates"
                )
            ns.lr_grid = AUTO
        ns.run_name = "_".join([self.name, *(k for k in self.presets if getattr(ns, k))])
        if ns.out is not None and ns.out.suffix.lower() != ".csv":
            self.error(
                f"--out {ns.out} is not a .csv file: --out is the results CSV (e.g. "
                f"results/{ns.run_name}.csv), and the figure's path goes to --figure, "
                "without an extension"
            )
        ns.out = ns.out or self.results / f"{ns.run_name}.csv"
        ns.figure = ns.figure or self.root / FIGURES / ns.run_name
        ns.script, ns.resumes = self.script, [ns.out]  # a study adds the other CSVs it resumes
        ns.start = time.perf_counter()
        return ns, rest


def parser(script: str, doc: str, **options: Any) -> StudyParser:
    """The :class:`StudyParser` of the study script at ``script`` (its ``__file__``): named
    after the file, with its outputs under the repository that holds the studies/ folder."""
    path = Path(script).resolve()
    p = StudyParser(path.stem, doc, path.parent.parent, prog=path.name, **options)
    p.script = path
    return p


def grid(names: Sequence[str], ranks: Sequence[int]) -> list[tuple[str, int | None]]:
    """The (variant, rank) pairs of a sweep: each variant at every rank, and a variant that
    takes no rank (full fine-tuning) once, at rank None."""
    return [(v, r) for v in names for r in (ranks if variant_class(v).takes_rank else [None])]


def search_specs(
    task_name: str, names: Sequence[str], ranks: Sequence[int], train: dict[str, Any], **fields: Any
) -> list[RunSpec]:
    """The seed-0 runs a tuned sweep searches on the task ``task_name``: one per (variant, rank) of
    :func:`grid`, each training with ``train`` and the other :class:`RunSpec` ``fields``
    (task_options, variant_options, measure); the sweep sets each learning rate."""
    return [RunSpec(task_name, v, r, seed=0, lr=0.0, train=train, **fields) for v, r in grid(names, ranks)]


def rank_free(names: Iterable[str]) -> set[str]:
    """The variants among ``names`` that take no rank (full fine-tuning): the reference that
    figures draw as a line or band rather than as a curve over ranks."""
    return {v for v in set(names) if not variant_class(v).takes_rank}


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """How the command line's runs are executed: --workers, --executor, --scheduler, and a
    progress bar unless --quiet (the keywords of :func:`lowrank.sweep.sweep`)."""
    return {
        "workers": args.workers,
        "progress": not args.quiet,
        "executor": getattr(args, "executor", "local"),
        "scheduler": getattr(args, "scheduler", None),
    }


def sweep_options(args: argparse.Namespace) -> dict[str, Any]:
    """How the command line's learning-rate search runs: --lr-extend and :func:`run_options`
    (the keywords of :func:`lowrank.sweep.tuned_sweep`)."""
    return {"extend": args.lr_extend, **run_options(args)}


def tuned(
    args: argparse.Namespace,
    specs: Sequence[RunSpec],
    out: str | os.PathLike | None = None,
    grid: Callable[[RunSpec], list[float]] | None = None,
) -> pd.DataFrame:
    """:func:`lowrank.sweep.tuned_sweep` of ``specs`` into ``out`` (default --out) with the command
    line's rates (--lr-grid, or ``grid``), seeds 0 … --seeds−1 and :func:`sweep_options`."""
    return tuned_sweep(
        specs,
        grid or search_grid(args.lr_grid),
        list(range(args.seeds)),
        args.out if out is None else out,
        **sweep_options(args),
    )


def results(
    args: argparse.Namespace, run: Callable[[], pd.DataFrame], key: str | None = KEY, tuned: bool = False
) -> pd.DataFrame | None:
    """The rows a study reports: ``run()``, or with --plot-only the CSV at --out (with ``tuned``,
    its rows at each search group's dev-chosen learning rate); None, after saying why on stderr
    in one sentence, when a variant option is unknown (the sweep checks them before any run) or
    that CSV holds no rows. With --fresh, the CSVs the study resumes from (``args.resumes``) are
    first moved aside (:func:`set_aside`). A table the study computes itself (``key`` None: not a
    sweep's rows, which carry their own) is stamped with the fingerprint of the code and the
    study script that made it (:func:`lowrank.sweep.fingerprint.code_fingerprint`) and written
    to --out."""
    if not args.plot_only:
        if args.fresh:
            set_aside(args.resumes)
        try:
            df = run()
        except OptionError as e:
            print(e, file=sys.stderr)
            return None
        if key is None and not df.empty:
            df[COLUMN] = code_fingerprint(*[s for s in [args.script] if s])
            write_atomic(df, args.out)
        return df
    try:
        df = saved_results(args.out, key=key)
    except FileNotFoundError as e:
        print(f"{e}; run without --plot-only first", file=sys.stderr)
        return None
    return tuned_rows(df) if tuned else df


def set_aside(paths: Iterable[str | os.PathLike]) -> None:
    """Move each existing CSV in ``paths`` to ``<name>.previous.csv`` (replacing an older one),
    so that a fresh run starts from nothing and the last results are still at hand."""
    for path in map(Path, paths):
        if path.exists():
            kept = path.with_name(f"{path.stem}.previous{path.suffix}")
            path.replace(kept)
            print(f"--fresh: moved {path} to {kept}", file=sys.stderr)


def finish(
    args: argparse.Namespace,
    figure: Callable[..., list[Path]],
    rows: pd.DataFrame | None,
    *,
    report: Callable[[pd.DataFrame], object] | None = None,
    write: bool = False,
    table: str | None = None,
    lr_search: pd.DataFrame | None = None,
    lr_panels: dict[str, str] | None = None,
    **options: Any,
) -> int:
    """A study's last step: ``report(rows)`` (its printed summary), ``rows`` written to --out
    (with ``write``; atomically) and the markdown ``table`` to ``args.table``, the figure
    ``figure(rows, --figure, **options)``; for a tuned study, from ``lr_search`` (its whole
    results table, every rate tried) the learning-rate sensitivity figure ``<--figure>_lr``
    (:func:`lowrank.sensitivity.lr_sensitivity`, panels by ``lr_panels``: its ``row`` and ``col``)
    and where each choice sits among the rates it tried (:func:`lowrank.sweep.search_summary`);
    when the runs evaluated dev during training, their dev curves ``<--figure>_curves``
    (:func:`lowrank.convergence.curves_figure`, a panel per value of the ``row``); and the
    ``results:``, ``table:`` and ``figure:`` lines, the elapsed time and the peak memory printed.
    Returns the exit code: 0, or 1 without ``rows`` (:func:`results` has said why)."""
    if rows is None:
        return 1
    if report is not None:
        report(rows)
    if write:
        write_atomic(rows, args.out)
    if table is not None:
        with atomic_path(args.table) as tmp:
            tmp.write_text(table)
    paths = figure(rows, args.figure, **options)
    if lr_search is not None and lr_search.empty:
        print("note: no learning-rate search in the results to draw", file=sys.stderr)
    elif lr_search is not None:
        paths += sensitivity.lr_sensitivity(lr_search, f"{args.figure}_lr", **(lr_panels or {}))
        print(search_summary(lr_search))
    if convergence.recorded(rows):
        by = (lr_panels or {}).get("row", "task")
        paths += convergence.curves_figure(rows, f"{args.figure}_curves", by=by)
    print(f"results: {args.out}")
    if table is not None:
        print(f"table: {args.table}")
    print(f"figure: {', '.join(map(str, paths))}")
    peak = (
        max(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
        )
        / 1024
    )
    print(f"elapsed {time.perf_counter() - args.start:.1f} s, peak memory of one process {peak:.0f} MiB")
    return 0
