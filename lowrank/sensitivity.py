"""The learning-rate sensitivity figure every tuned study draws (``<figure>_lr``): the dev and test
score of each search group against every learning rate its search tried, the chosen rate marked,
so a reader sees whether a variant's result survives another learning rate."""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from . import plots  # plots.save by attribute, so one patch of it sees every figure
from .plots import label, legend_below, letter_panels, metric_label, panels, style_for
from .sweep import best_lr, chosen_on, groups

LOG_METRICS = {"delta_error", "mse", "rel_mse", "perplexity", "bits_per_char"}  # drawn on log y


def lr_sensitivity(
    df: pd.DataFrame,
    stem: str | os.PathLike,
    row: str = "task",
    col: str = "rank",
    search_seed: int = 0,
    max_cols: int = 4,
) -> list[Path]:
    """The learning-rate search of a tuned sweep: for every search group (a variant at one rank
    and configuration), the metric its rate was chosen on, on dev (solid) and on test (dashed),
    against every learning rate tried at ``search_seed``, the chosen rate
    (:func:`lowrank.sweep.best_lr`) filled and outlined. ``df`` is the whole results table.

    One panel per value of the column ``col`` (default: the rank) within each value of ``row``
    (default: the task), which share a y range; a row whose ``col`` is missing (a variant
    without a rank) is drawn in every panel of its ``row``. At most ``max_cols`` panels a line.
    """
    runs = df[(df["seed"] == search_seed) & df["lr"].notna()]  # a probe has no learning rate
    if runs.empty:
        raise ValueError(f"no runs at the search seed {search_seed} to draw; run the sweep first")
    runs = runs.assign(group=groups)
    chosen = best_lr(df[df["lr"].notna()], search_seed).set_index("group")["lr"]
    on = chosen_on(runs)
    records = runs.to_dict("records")
    runs = runs.assign(
        _on=on.to_numpy(),
        _dev=[r.get(f"dev_{m}", np.nan) for r, m in zip(records, on)],
        _test=[r.get(f"test_{m}", np.nan) for r, m in zip(records, on)],
    )
    layout = {}  # row value → its panels' col values, in order ([None]: one panel, no col)
    for key, sub in runs.groupby(row, sort=False):
        values = list(dict.fromkeys(sub[col].dropna()))
        layout[key] = (sorted(values) if col == "rank" else values) or [None]
    width = max(len(values) for values in layout.values())
    ncols = math.ceil(width / math.ceil(width / max_cols))  # a long row wraps into even lines
    lines = [
        (key, values[i : i + ncols]) for key, values in layout.items() for i in range(0, len(values), ncols)
    ]
    styles = style_for(runs["variant"].unique())
    with panels(len(lines), ncols, 1.9 * len(lines) + 1.0) as (fig, axes):
        for (key, chunk), line in zip(lines, axes):
            mine = runs[runs[row] == key]
            scores = pd.concat([mine["_dev"], mine["_test"]]).dropna()
            metric = mine["_on"].iloc[0]
            for ax, value in zip(line, chunk):
                _lr_panel(
                    ax,
                    mine if value is None else mine[mine[col].isna() | (mine[col] == value)],
                    chosen,
                    styles,
                )
                ax.set_xscale("log")
                ax.set_xlabel("learning rate")
                lo, hi = (scores.min(), scores.max()) if len(scores) else (np.nan, np.nan)
                if metric in LOG_METRICS:
                    ax.set_yscale("log")
                    lo, hi = lo / 2, hi * 2
                else:
                    pad = 0.05 * (hi - lo) or 0.05
                    lo, hi = lo - pad, hi + pad
                if len(scores):  # the same range along the row (none when every run diverged)
                    ax.set_ylim(lo, hi)
                where = None if value is None else f"r = {value:g}" if col == "rank" else value
                ax.set_title(f"{key}, {where}" if where is not None else str(key))
            line[0].set_ylabel(metric_label(metric).removeprefix("test "))
            for ax in line[1:]:
                ax.tick_params(labelleft=False)
            for ax in line[len(chunk) :]:
                ax.set_visible(False)
        first = axes.flat[0]
        first.plot([], [], color="0.3", lw=1.0, label="dev score (solid)")
        first.plot([], [], color="0.3", ls="--", lw=0.7, label="test score (dashed)")
        first.plot(
            [],
            [],
            ls="none",
            marker="o",
            color="0.3",
            ms=5.5,
            markeredgecolor="black",
            markeredgewidth=0.6,
            label="chosen rate: best dev score (outlined)",
        )
        if runs["_dev"].isna().any():
            first.plot([], [], ls="none", marker="x", color="0.3", label="diverged: no score")
        letter_panels(axes)
        legend_below(fig, axes, max_cols=4)
        return plots.save(fig, stem)


def _lr_panel(ax: plt.Axes, runs: pd.DataFrame, chosen: pd.Series, styles: dict[str, dict[str, str]]) -> None:
    """One panel of :func:`lr_sensitivity`: a dev and a test line per search group of ``runs``."""
    several = runs.groupby("variant")["group"].nunique()
    for group, g in runs.groupby("group", sort=False):
        g = g.sort_values("lr")
        v, rank = g["variant"].iloc[0], g["rank"].iloc[0]
        st = styles[v]
        text = label(v) if several[v] == 1 else label(v, rank)
        ax.plot(
            g["lr"],
            g["_dev"],
            color=st["color"],
            marker=st["marker"],
            ms=3,
            markerfacecolor="white",
            lw=1.0,
            label=text,
        )
        ax.plot(g["lr"], g["_test"], color=st["color"], ls="--", lw=0.7)
        best = g[g["lr"] == chosen.get(group)]
        ax.plot(
            best["lr"],
            best["_dev"],
            ls="none",
            color=st["color"],
            marker=st["marker"],
            ms=5.5,
            markeredgecolor="black",
            markeredgewidth=0.6,
            zorder=3,
            gid="chosen",
        )
        ax.plot(best["lr"], best["_test"], ls="none", color=st["color"], marker=st["marker"], ms=3.5)
        lost = g[g["_dev"].isna()]  # diverged: no score, a cross on the lower edge
        if len(lost):  # (an empty line off the clip box would break the layout)
            ax.plot(
                lost["lr"],
                np.zeros(len(lost)),
                ls="none",
                marker="x",
                color=st["color"],
                transform=ax.get_xaxis_transform(),
                clip_on=False,
            )
