"""The results CSV: read it (refusing files lowrank did not write), rewrite it atomically, and
:func:`sweep`, which runs only the specs whose ``run_id`` it does not hold yet."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ..adapters.registry import check_options
from ..files import atomic_path
from .executors import execute
from .fingerprint import COLUMN, code_fingerprint
from .run import run_one
from .spec import KEY, RunSpec

# Columns that look like numbers but are not: per-example scores as "0110…" (read as text, or
# pandas turns them into one large float).
TEXT_COLUMNS = {"test_correct": str}


def read_results(path: str | os.PathLike, key: str | None = KEY) -> pd.DataFrame:
    """The results CSV as a DataFrame (empty when the file does not exist). With ``key``, a
    file without that column is refused: it was not written by lowrank and must not be
    overwritten."""
    path = Path(path)
    if not path.exists():
        return pd.DataFrame()
    df = pd.read_csv(path, dtype=TEXT_COLUMNS)
    if key is not None and key not in df.columns:
        raise ValueError(
            f"{path} exists but was not written by a lowrank sweep (no {key!r} column); "
            "choose another output path so it is not overwritten"
        )
    return df


def saved_results(path: str | os.PathLike, key: str | None = KEY) -> pd.DataFrame:
    """:func:`read_results` of a table that must hold rows already (to redraw a figure from);
    raises FileNotFoundError naming ``path`` when it does not exist or holds no rows."""
    df = read_results(path, key=key)
    if df.empty:
        state = "holds no rows" if Path(path).exists() else "does not exist"
        raise FileNotFoundError(f"{path} {state}")
    return df


def write_atomic(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write ``df`` as CSV (no index) through :func:`lowrank.files.atomic_path`."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def sweep(
    specs: Iterable[RunSpec],
    out: str | os.PathLike,
    workers: int = 1,
    executor: str = "local",
    scheduler: str | None = None,
    progress: bool = True,
    desc: str = "runs",
) -> pd.DataFrame:
    """Run every spec that ``out`` holds no row of made by this code; append each row as it
    finishes.

    A row is reused when its run_id and its ``code_fingerprint``
    (:func:`lowrank.sweep.fingerprint.code_fingerprint`) match; a row of the same run made by
    other code is stale: it is run again and its row replaced. One line on stderr says how many
    rows are reused, stale and new. After each run the whole CSV is rewritten atomically, so the
    file on disk is always complete and a sweep resumes after a crash or Ctrl-C with nothing lost
    or duplicated; a stale row stays until its run is replaced. ``desc`` labels the progress bar.
    ``executor``, ``workers`` and ``scheduler``: see :func:`lowrank.sweep.executors.execute`.
    Every pending spec's variant options are checked before the first run starts
    (:class:`~lowrank.adapters.registry.OptionError`). Returns the whole table (old and new rows).
    """
    df = read_results(out)
    specs = list(dict.fromkeys(specs))
    current = code_fingerprint()
    made = df[COLUMN] if COLUMN in df else pd.Series("", index=df.index, dtype=object)
    reusable = set(df.loc[made == current, KEY]) if len(df) else set()
    wanted = {s.run_id for s in specs}
    stale = (wanted & set(df[KEY] if len(df) else ())) - reusable
    pending = [s for s in specs if s.run_id not in reusable]
    for s in pending:  # a misspelt option fails here, at once, not in a worker mid-sweep
        check_options(s.variant, s.variant_options)
    if progress and specs:
        print(
            f"{Path(out).name}, {desc}: {len(wanted) - len(pending)} runs reused (made by this code, "
            f"{current}), {len(stale)} stale runs (other code) re-run, "
            f"{len(pending) - len(stale)} new",
            file=sys.stderr,
        )
    rows = {row[KEY]: row for row in df.to_dict("records")} if len(df) else {}
    bar = tqdm(total=len(pending), desc=desc, disable=not progress or not pending, file=sys.stderr)
    logs = Path(out).parent / f".{Path(out).stem}.submitit"  # submitit's job folder
    for row in execute(run_one, pending, workers, executor, scheduler, logs):
        rows[row[KEY]] = row  # in place of a stale row of the same run
        write_atomic(pd.DataFrame(list(rows.values())), out)
        bar.update()
    bar.close()
    return pd.DataFrame(list(rows.values())) if rows else df
