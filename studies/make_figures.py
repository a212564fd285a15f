"""Redraw every paper figure (and the downstream table) from the CSVs in results/, training nothing.

Each study draws its own figure from its own CSV (`--plot-only`); this script runs them all in
one go, so the figures in paper_figures/ always match the committed results. A study whose CSV
is missing is reported and skipped; the exit code is 1 if any figure could not be drawn (the
full-size downstream run, ``downstream --paper``, is optional: hours of CPU).

    python studies/make_figures.py              # every figure whose CSV exists
    python studies/make_figures.py --only spectra downstream
    python studies/make_figures.py --check      # is every committed row made by the code at hand?
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# (study script, extra arguments, its results CSV relative to the repository); OPTIONAL: a missing
# CSV is reported without failing
FIGURES = [
    ("rank_ablation", [], "results/rank_ablation.csv"),
    ("reconstruction", [], "results/reconstruction.csv"),
    ("subspace", [], "results/subspace.csv"),
    ("overhead", [], "results/overhead.csv"),
    ("spectra", [], "results/spectra.csv"),
    ("downstream", [], "results/downstream.csv"),
    ("downstream", ["--paper"], "results/downstream_paper.csv"),
    ("continual", [], "results/continual.csv"),
    ("robustness", [], "results/robustness.csv"),
]
OPTIONAL = {("downstream", "--paper")}
# CSVs a study resumes from besides the one it draws (checked by --check, not drawn)
RESUMED = [
    ("spectra", [], "results/spectra_runs.csv"),
    ("downstream", ["--paper"], "results/downstream_paper_budget.csv"),
]
# the lowrank module (beside the run code) that makes the rows a study computes itself, where
# that is not the study's script: the downstream study's linear probes
OWN_ROWS = {"downstream": "probe"}


def load(name: str):
    """The study script ``studies/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f"study_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check(names: list[str]) -> int:
    """Print, per results CSV of ``names``, how many of its rows the code at hand did not make
    (:func:`lowrank.sweep.fingerprint.stale`: neither the run code nor, for the rows a study
    computes itself, its script or the module :data:`OWN_ROWS` names); 1 if any, else 0."""
    from lowrank.sweep.fingerprint import code_fingerprint, stale
    from lowrank.sweep.results import read_results

    print(f"code fingerprint of runs: {code_fingerprint()}")
    bad = 0
    for name, extra, csv in [*FIGURES, *RESUMED]:
        path = ROOT.parent / csv
        if name in names and path.exists():
            df = read_results(path, key=None)
            own = (
                importlib.import_module(f"lowrank.{OWN_ROWS[name]}").__file__
                if name in OWN_ROWS
                else ROOT / f"{name}.py"
            )
            n = int(stale(df, own).sum())
            bad += n
            rerun = " ".join([f"studies/{name}.py", *extra])
            print(f"{csv}: {n} of {len(df)} rows made by other code" + (f"; re-run {rerun}" if n else ""))
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    names = sorted({name for name, _, _ in FIGURES})
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--only",
        nargs="+",
        choices=names,
        default=names,
        metavar="STUDY",
        help=f"studies to redraw (default all: {', '.join(names)})",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="draw nothing; list the CSVs holding rows that the code at hand did not make "
        "(their code_fingerprint differs) and exit 1 if there are any",
    )
    args = p.parse_args(argv)
    if args.check:
        return check(args.only)
    failed = []
    for name, extra, csv in FIGURES:
        if name not in args.only:
            continue
        label = " ".join([name, *extra])
        if not (ROOT.parent / csv).exists():
            print(f"skipped {label}: {csv} does not exist (run studies/{name}.py {' '.join(extra)})")
            if (name, *extra) not in OPTIONAL:
                failed.append(label)
            continue
        start, log = time.perf_counter(), io.StringIO()
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                code = load(name).main(["--plot-only", *extra])
        except Exception as e:  # one broken study must not stop the others
            code, log = 1, io.StringIO(f"{type(e).__name__}: {e}")
        if code:
            print(f"FAILED {label}:\n{log.getvalue()[-2000:]}")
            failed.append(label)
        else:
            drawn = [ln for ln in log.getvalue().splitlines() if ln.startswith(("figure:", "table:"))]
            print(f"redrew {label} in {time.perf_counter() - start:.1f} s: {'; '.join(drawn)}")
    if failed:
        print(f"not drawn: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
