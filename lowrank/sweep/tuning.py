"""Fair learning rates: each search group (a run's ``group_id``: every field of its spec but
seed and lr) gets its own, chosen on the dev split from a grid at the first seed with the same
step budget as every other variant; the other seeds reuse it. The test split is never used for
a choice."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import pandas as pd

from .results import sweep, write_atomic
from .spec import GROUP, KEY, RunSpec

LEGACY_GROUP = ["task", "variant", "rank", "task_options", "variant_options"]


def groups(df: pd.DataFrame) -> pd.Series:
    """Each row's learning-rate search group: ``group_id`` (every field of the spec but seed and
    lr, so training configurations never share a search), or for rows written before that
    column existed, their (task, variant, rank, options)."""
    legacy = pd.Series(
        ["|".join(map(str, t)) for t in df[LEGACY_GROUP].itertuples(index=False)],
        index=df.index,
        dtype=object,
    )
    return df[GROUP].fillna(legacy) if GROUP in df else legacy


def chosen_on(df: pd.DataFrame) -> pd.Series:
    """The metric each row's learning rate is chosen on: its ``selection_metric``, or for a row
    without one (written before that column existed), its headline ``metric``."""
    return df["selection_metric"].fillna(df["metric"]) if "selection_metric" in df else df["metric"]


def _scored(df: pd.DataFrame, search_seed: int) -> pd.DataFrame:
    """The rows at ``search_seed`` with ``group`` (:func:`groups`) and ``_score``: the dev
    ``selection_metric`` (default: the headline metric) signed so lower is better; diverged runs
    score +inf (worst)."""
    df = df[df["seed"] == search_seed].assign(group=groups)
    metric = "dev_" + chosen_on(df)
    dev = [row.get(m, float("nan")) for row, m in zip(df.to_dict("records"), metric)]
    sign = df["higher_is_better"].map({True: -1.0, False: 1.0, "True": -1.0, "False": 1.0})
    return df.assign(_score=(pd.Series(dev, index=df.index, dtype=float) * sign).fillna(float("inf")))


def best_lr(df: pd.DataFrame, search_seed: int = 0) -> pd.DataFrame:
    """The learning rate each search group (:func:`groups`) reached its best dev
    ``selection_metric`` with (default: the headline metric), at ``search_seed``; diverged runs
    count as worst, ties go to the lowest rate. Columns: ``group``, the legacy group columns
    and ``lr``."""
    pick = _scored(df, search_seed).sort_values(["_score", "lr"]).groupby("group", sort=False).head(1)
    return pick[["group", *LEGACY_GROUP, "lr"]].reset_index(drop=True)


def log_grid(centre: float, points: int = 5, step: float = 10**0.5) -> list[float]:
    """``points`` learning rates centred on ``centre`` in geometric steps of ``step`` (default
    half a decade): log_grid(1e-2) = [1e-3, 3.16e-3, 1e-2, 3.16e-2, 1e-1]."""
    if not (centre > 0 and step > 1 and isinstance(points, int) and points >= 1):
        raise ValueError(
            f"log_grid(centre={centre!r}, points={points!r}, step={step!r}) needs "
            "centre > 0, an integer points >= 1 and step > 1"
        )
    return [float(f"{centre * step ** (k - (points - 1) / 2):.6g}") for k in range(points)]


def search_status(df: pd.DataFrame, search_seed: int = 0) -> pd.DataFrame:
    """Per search group: the chosen learning rate (:func:`best_lr`), every rate tried at
    ``search_seed`` (``tried``, sorted) and where the choice sits among them: ``"interior"``,
    ``"low edge"``, ``"high edge"``, ``"flat"`` (every rate tried scored the same, so the
    scores point nowhere) or ``"single rate"`` (nothing was searched)."""
    chosen = best_lr(df, search_seed)
    scored = _scored(df, search_seed)
    tried = scored.groupby("group")["lr"].apply(lambda s: sorted(set(s)))
    # one finite score at every rate (all diverged is not flat: the search goes lower)
    flat = scored.groupby("group")["_score"].agg(lambda s: s.nunique() == 1 and s.iloc[0] < float("inf"))
    chosen["tried"] = chosen["group"].map(tried)
    chosen["status"] = [
        "flat" if len(rates) > 1 and flat[g] else _where(lr, rates)
        for g, lr, rates in zip(chosen["group"], chosen["lr"], chosen["tried"])
    ]
    return chosen


def search_summary(df: pd.DataFrame, search_seed: int = 0) -> str:
    """One line on every search in ``df`` (:func:`search_status`): how many choices there are,
    how many sit where among the rates they tried, and how many runs and rates that took, e.g.
    ``"32 learning-rate choices: 30 interior, 2 at the low edge; 118 search runs at seed 0, 3–5
    rates each"``."""
    df = df[df["lr"].notna()]  # a baseline fitted without one (a linear probe) searched nothing
    df = df.drop_duplicates(KEY) if KEY in df else df  # a run drawn in two panels is one run
    status = search_status(df, search_seed)
    if status.empty:
        return f"no learning-rate search at seed {search_seed}"
    said = {
        "interior": "interior",
        "low edge": "at the low edge",
        "high edge": "at the high edge",
        "flat": "flat",
        "single rate": "with a single rate",
    }
    counts = status["status"].value_counts()
    parts = [f"{counts[k]} {text}" for k, text in said.items() if k in counts]
    n = status["tried"].map(len)
    rates = f"{n.min()}" if n.min() == n.max() else f"{n.min()}–{n.max()}"
    runs = int((df["seed"] == search_seed).sum())
    return (
        f"{len(status)} learning-rate choice{'s' * (len(status) != 1)}: {', '.join(parts)}; "
        f"{runs} search runs at seed {search_seed}, {rates} rate{'s' * (rates != '1')} each"
    )


def _where(lr: float, rates: Sequence[float]) -> str:
    if len(rates) == 1:
        return "single rate"
    return "low edge" if lr == rates[0] else "high edge" if lr == rates[-1] else "interior"


def _past_edge(status: str, rates: Sequence[float]) -> float | None:
    """One geometric step beyond the edge the choice sits at (the step of the two rates there),
    or None when the choice is interior, the search flat, or nothing was searched."""
    if status == "low edge":
        return float(f"{rates[0] ** 2 / rates[1]:.6g}")
    if status == "high edge":
        return float(f"{rates[-1] ** 2 / rates[-2]:.6g}")
    return None


def tuned_sweep(
    base: Sequence[RunSpec],
    lr_grid: Sequence[float] | Callable[[RunSpec], Sequence[float]],
    seeds: Sequence[int],
    out: str | os.PathLike,
    extend: int = 0,
    **execute: Any,
) -> pd.DataFrame:
    """Per-variant learning-rate search on dev at ``seeds[0]``, then the other seeds at the best
    learning rate. ``base`` holds one spec per (task, variant, rank, options, training config);
    its seed and lr are replaced. ``lr_grid`` is one grid for all, or a function giving each
    spec its own. With ``extend`` > 0, a group whose best dev score sits at an edge of the rates
    it tried gets one more rate, a step past that edge, and the search repeats until every
    choice is interior or a group has been extended ``extend`` times (then it is reported as
    capped). A flat search (every rate scored the same) is not extended: its scores point to
    neither side, and ``lr_selection`` says it is flat. Returns the rows of the chosen learning
    rates for every seed; in the CSV, ``lr_selected`` marks exactly those rows of these groups
    (a row chosen by an earlier, different grid loses the mark) and ``lr_selection`` says how
    they were chosen."""
    if not seeds:
        raise ValueError("seeds is empty; pass at least one seed")
    if not (isinstance(extend, int) and extend >= 0):
        raise ValueError(f"extend={extend!r}; pass the number of grid extensions, an integer >= 0")
    grids = {s.group_id: list(lr_grid(s) if callable(lr_grid) else lr_grid) for s in base}
    for s in base:
        if not grids[s.group_id]:
            raise ValueError(
                f"the learning-rate grid of {s.variant} (rank {s.rank}) is empty; give it at least one rate"
            )
    search: list[RunSpec] = []
    for i in range(extend + 1):
        search = [replace(s, seed=seeds[0], lr=x) for s in base for x in grids[s.group_id]]
        desc = f"lr search, seed {seeds[0]}" + (f", extension {i}" if i else "")
        df = _with_groups(sweep(search, out, desc=desc, **execute), search)
        # only the rates of this pass: a resumed search repeats the first one's steps exactly,
        # instead of stepping on from rates an earlier call already extended to (and capped at)
        ours = [lr in grids.get(g, ()) for g, lr in zip(df[GROUP], df["lr"])]
        status = search_status(df[ours], seeds[0]).set_index("group")
        beyond = {g: _past_edge(status.at[g, "status"], status.at[g, "tried"]) for g in grids}
        beyond = {g: x for g, x in beyond.items() if x is not None and x not in grids[g]}
        if not extend or not beyond:
            break
        for g, x in beyond.items():
            grids[g] = sorted([*grids[g], x])
    lookup = status["lr"].to_dict()
    final = [replace(s, seed=seed, lr=lookup[s.group_id]) for s in base for seed in seeds]
    desc = f"chosen lr, seeds {seeds[0]}–{seeds[-1]}" if len(seeds) > 1 else "chosen lr"
    df = _with_groups(sweep(final, out, desc=desc, **execute), search + final)
    selected = df[KEY].isin({s.run_id for s in final})
    earlier = df["lr_selected"].fillna(False).astype(bool) if "lr_selected" in df else False
    df["lr_selected"] = selected | (earlier & ~df[GROUP].isin(grids))
    if "lr_selection" not in df:
        df["lr_selection"] = None
    df["lr_selection"] = df["lr_selection"].astype(object).where(df["lr_selected"], None)
    df.loc[selected, "lr_selection"] = [
        f"best dev {m} of lr {'/'.join(f'{x:g}' for x in grids[g])} at seed {seeds[0]}, "
        f"reused for the other seeds{_verdict(status.at[g, 'status'], extend)}"
        for m, g in zip(chosen_on(df)[selected], df.loc[selected, GROUP])
    ]
    write_atomic(df, out)
    return df[selected].copy()


def _verdict(status: str, extend: int) -> str:
    """What ``lr_selection`` adds about the search: nothing for a plain grid (``extend`` = 0,
    as every committed CSV was made), else whether the choice is interior or capped."""
    if not extend:
        return ""
    if status in ("interior", "single rate"):
        return f"; {status}"
    if status == "flat":
        return "; flat: every rate tried scored the same, so no rate is better and none was added"
    return f"; capped at the {status} after {extend} extensions"


def _with_groups(df: pd.DataFrame, specs: Sequence[RunSpec]) -> pd.DataFrame:
    """``df`` with ``group_id`` filled in from ``specs`` by run_id (rows of older versions)."""
    known = {s.run_id: s.group_id for s in specs}
    filled = df[KEY].map(known)
    df[GROUP] = filled.fillna(df[GROUP]) if GROUP in df else filled
    return df


def tuned_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows run at each search group's dev-chosen learning rate (:func:`best_lr`), every
    seed: what the figures show."""
    best = best_lr(df)[["group", "lr"]]
    return df.assign(group=groups).merge(best, on=["group", "lr"], how="inner").drop(columns="group")
