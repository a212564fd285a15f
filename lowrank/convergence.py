"""Whether a step budget converged: the dev score each run recorded during training (its
``dev_curve``, every ``--eval-every`` steps), averaged over seeds per (variant, rank), as a
table (:func:`mean_curves`) and as the figure a study draws when its runs evaluated dev more
than once (``<figure>_curves``, :func:`curves_figure`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from . import plots  # plots.save by attribute, so one patch of it sees every figure
from .plots import label, legend_below, letter_panels, metric_label, panels, style_for
from .sweep import chosen_on

KEYS = ["variant", "rank"]


def mean_curves(rows: pd.DataFrame, by: str = "task") -> pd.DataFrame:
    """One row per (``by``, variant, rank, step): the dev score the runs of ``rows`` recorded
    at that step, its mean, minimum and maximum over seeds (``mean``, ``low``, ``high``) and how
    many seeds reached it (``seeds``). Rows without a ``dev_curve`` are left out."""
    runs = rows[rows["dev_curve"].notna()] if "dev_curve" in rows else rows.iloc[:0]
    points = [
        {
            by: r[by],
            "variant": r["variant"],
            "rank": r["rank"],
            "seed": r["seed"],
            "step": int(step),
            "score": score,
        }
        for r in runs.to_dict("records")
        for step, score in json.loads(r["dev_curve"])
    ]
    columns = [by, *KEYS, "step", "mean", "low", "high", "seeds"]
    if not points:
        return pd.DataFrame(columns=columns)
    g = pd.DataFrame(points).groupby([by, *KEYS, "step"], sort=False, dropna=False)["score"]
    out = g.agg(mean="mean", low="min", high="max", seeds="size").reset_index()
    return out[columns]


def recorded(rows: pd.DataFrame) -> bool:
    """Whether any run of ``rows`` evaluated dev during training (a ``dev_curve`` of more than
    its final point)."""
    curves = rows["dev_curve"].dropna() if "dev_curve" in rows else []
    return any(len(json.loads(c)) > 1 for c in curves)


def curves_figure(rows: pd.DataFrame, stem: str | os.PathLike, by: str = "task") -> list[Path]:
    """One panel (a full-width row) per value of ``by``: every (variant, rank)'s mean dev score
    over seeds against the training step, the range over seeds shaded (:func:`mean_curves`)."""
    curves = mean_curves(rows, by)
    if curves.empty:
        raise ValueError("no run recorded a dev curve; run with --eval-every to draw one")
    on = chosen_on(rows)
    metric = metric_label(on.dropna().iloc[0]).removeprefix("test ")
    keys = list(dict.fromkeys(curves[by]))
    styles = style_for(curves["variant"].unique())
    # a (variant, rank)'s name and line style hold across panels, so the shared legend is true of
    # every panel: a variant's first rank in the figure is solid, its next dashed, then dotted
    names = {v: list(dict.fromkeys(label(v, r) for r in c["rank"])) for v, c in curves.groupby("variant")}
    with panels(len(keys), 1, 2.4 * len(keys) + 0.8) as (fig, axes):
        for ax, key in zip(axes.flat, keys):
            mine = curves[curves[by] == key]
            for (variant, rank), c in mine.groupby(KEYS, sort=False, dropna=False):
                st, k = styles[variant], names[variant].index(label(variant, rank))
                name = label(variant) if len(names[variant]) == 1 else label(variant, rank)
                ax.plot(
                    c["step"],
                    c["mean"],
                    color=st["color"],
                    marker=st["marker"],
                    ms=2.5,
                    lw=0.9,
                    ls=["-", "--", ":"][min(k, 2)],
                    label=name,
                )
                ax.fill_between(c["step"], c["low"], c["high"], color=st["color"], alpha=0.12, lw=0)
            ax.set_xlabel("training step")
            ax.set_ylabel(f"{key}: dev {metric}")
            ax.set_title(f"{key}: dev {metric} during training")
        axes.flat[0].fill_between([], [], [], color="0.5", alpha=0.25, lw=0, label="range over seeds")
        letter_panels(axes)
        legend_below(fig, axes, max_cols=5)
        return plots.save(fig, stem)
