"""The paper style every figure shares: palette and markers, panels with bold letters a, b, …,
variant names (:func:`label`: each variant's ``display_name``, never its code name), axis
labels, one legend under the figure, a baseline as a reference line or band, the Pareto front,
point labels that do not overprint each other (:func:`place_labels`), and saving.

Vector PDF (TrueType fonts embedded) and PNG, one colour-blind-safe colour and one marker per
variant, the same in every figure (full fine-tuning, the reference, in black), sized for a
two-column paper (7.0 in wide). Each figure is drawn by its study from the study's CSV alone
(studies/<study>.py; the rank ablation's by :func:`lowrank.ablation.figure`), so every figure
can be redrawn without training.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .adapters import variant_class, variants  # noqa: E402
from .files import atomic_path  # noqa: E402
from .sweep import best_lr, groups  # noqa: E402

# Paul Tol's 12-colour qualitative scheme (SRON technical note SRON/EPS/TN/09-002, issue 2.2,
# 2012): his colour-blind-safe "muted" nine plus blue, brown and a red-purple, for one colour per
# variant that takes a rank. A variant's colour and marker are fixed by its position in
# lr.variants() among those variants (style()); the order below keeps the four red-purples and
# the three blues apart for the variants the studies draw together (positions 1, 2 and 5 to 10).
PALETTE = ["#AA4499", "#DDCC77", "#44AA99", "#6699CC", "#661100", "#332288", "#999933", "#CC6677",
           "#117733", "#88CCEE", "#882255", "#AA4466"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "d"]
# Full fine-tuning (no rank) is the reference every adapter is measured against: black, a star
# as a point and a dashed line over a grey band as a level.
REFERENCE = {"color": "black", "marker": "*"}
# Okabe–Ito, yellow last (hard to see on white): for categories that are not variants
OKABE_ITO = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
             "#F0E442"]
FULL_WIDTH = 7.0  # inches, two-column paper text width

LABELS = {
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    "mse": "test MSE",
    "delta_error": r"$\|\Delta W-\Delta W^*\|_F/\|\Delta W^*\|_F$",
    "perplexity": "perplexity",
    "forgetting": "forgetting (accuracy drop)",
}

STYLE = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.2,
    "lines.markersize": 4,
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "savefig.bbox": "tight",
    "figure.dpi": 100,
}


def style(variant: str) -> dict[str, str]:
    """The colour and marker of ``variant`` in every figure: :data:`REFERENCE` for a variant
    without a rank (full fine-tuning), else from its position among the ranked variants of
    lr.variants() (the marker shifts when a 13th variant wraps around the palette)."""
    if not variant_class(variant).takes_rank:
        return dict(REFERENCE)
    i = [v for v in variants() if variant_class(v).takes_rank].index(variant)
    return {"color": PALETTE[i % len(PALETTE)],
            "marker": MARKERS[(i + i // len(PALETTE)) % len(MARKERS)]}


def style_for(names: Iterable[str]) -> dict[str, dict[str, str]]:
    """:func:`style` of each variant in ``names``."""
    return {v: style(v) for v in names}


def metric_label(metric: str) -> str:
    """The axis label of a metric column (``test_<metric>``)."""
    return LABELS.get(metric, metric.replace("_", " "))


# What figures call the rows that are not variants of the registry
OTHER_NAMES = {"probe": "linear probe", "base": "base Linear"}


def label(variant: str, rank: float | None = None) -> str:
    """What figures and tables call ``variant``: its class's ``display_name`` (LoRA's is "LoRA";
    a name outside the registry from :data:`OTHER_NAMES`, else unchanged), with the rank when
    one is given (LoRA at rank 8: "LoRA r=8"; a NaN rank is none)."""
    try:
        text = variant_class(variant).display_name
    except ValueError:
        text = OTHER_NAMES.get(variant, variant)
    return text if rank is None or pd.isna(rank) else f"{text} r={int(rank)}"


def letter_panels(axes: Iterable[plt.Axes] | np.ndarray) -> list[plt.Text]:
    """Bold panel letters a, b, … at the top-left corner of each visible panel of ``axes``
    (row by row), just outside the axes, each panel's title moved to start beside its letter;
    none for a figure of one panel."""
    shown = [ax for ax in np.ravel(axes) if ax.get_visible()]
    if len(shown) < 2:
        return []
    for ax in shown:  # titles start where the letter ends, so that the two never collide
        title = ax.get_title()
        if title:
            ax.set_title("")
            ax.set_title(title, loc="left")
    return [ax.annotate(chr(ord("a") + i), (0, 1), xycoords="axes fraction", xytext=(-3, 5),
                        textcoords="offset points", ha="right", va="bottom", fontweight="bold",
                        fontsize=plt.rcParams["axes.titlesize"] + 1, gid="panel-letter")
            for i, ax in enumerate(shown)]


def _overlaps(a, b, pad: float = 1.0) -> bool:
    return a.x0 < b.x1 + pad and b.x0 < a.x1 + pad and a.y0 < b.y1 + pad and b.y0 < a.y1 + pad


# Where place_labels tries a label, in this order: (x, y offset in points, ha, va)
_SPOTS = [(3, 2, "left", "bottom"), (3, -2, "left", "top"), (-3, 2, "right", "bottom"),
          (-3, -2, "right", "top")]


def _put(t: plt.Text, spot: tuple[float, float, str, str], renderer) -> object:
    """Move the label ``t`` to ``spot`` (offset in points, alignment); its new box in pixels."""
    x, y, ha, va = spot
    t.set(ha=ha, va=va)
    t.xyann = (x, y)
    return t.get_window_extent(renderer)


def place_labels(ax: plt.Axes, xs: Iterable[float], ys: Iterable[float], texts: Iterable[str],
                 fontsize: float = 5, **kw) -> list[plt.Text]:
    """Label the points (``xs``, ``ys``) of ``ax`` with ``texts`` so that no label overlaps
    another or the panel's other texts (deterministic, greedy): in order of the points from
    left to right, each label takes the first of up-right, down-right, up-left and down-left of
    its point that is free and inside the panel, else the first inside the panel moved up (or,
    near the top of the panel, down) past what it touches. Call it after everything that sets
    the axes' limits and layout (legend, panel letters) has been drawn; it draws the figure to
    measure the texts, which take no part in the layout."""
    fig = ax.figure
    made = [ax.annotate(t, (x, y), xytext=_SPOTS[0][:2], textcoords="offset points",
                        fontsize=fontsize, ha=_SPOTS[0][2], va=_SPOTS[0][3], gid="point-label",
                        in_layout=False, **kw)
            for x, y, t in zip(xs, ys, texts) if t]
    if not made:
        return made
    fig.canvas.draw()  # the layout settles (the labels take no part in it)
    renderer = fig.canvas.get_renderer()
    pts = 72 / fig.dpi  # display pixels → points
    frame = ax.get_window_extent(renderer)
    placed = [t.get_window_extent(renderer) for t in [ax.title, *ax.texts]
              if t.get_text() and t not in made]
    for t in sorted(made, key=lambda t: tuple(ax.transData.transform(t.xy))):
        fits = []  # the spots that keep the label inside the panel
        for spot in _SPOTS:
            box = _put(t, spot, renderer)
            if frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1:
                fits.append(spot)
                if not any(_overlaps(box, b) for b in placed):
                    break
        else:  # no free spot: the first inside the panel, moved up (down near the top) past the rest
            box = _put(t, fits[0] if fits else _SPOTS[0], renderer)
            up = box.y1 < frame.y1 - 3 * box.height
            while hit := [b for b in placed if _overlaps(box, b)]:
                dy = (max(b.y1 for b in hit) + 1.5 - box.y0 if up
                      else min(b.y0 for b in hit) - 1.5 - box.y1)
                t.xyann = (t.xyann[0], t.xyann[1] + dy * pts)
                box = box.translated(0, dy)
        placed.append(box)
    return made


@contextmanager
def panels(nrows: int, ncols: int, height: float, **subplots) -> Iterator[tuple[plt.Figure, np.ndarray]]:
    """A FULL_WIDTH × ``height`` inch figure of nrows × ncols panels (a 2-D array of axes) in
    the paper style; draw and :func:`save` inside the ``with``, where the style applies."""
    with plt.rc_context(STYLE):
        yield plt.subplots(nrows, ncols, figsize=(FULL_WIDTH, height), squeeze=False,
                           constrained_layout=True, **subplots)


def save(fig: plt.Figure, stem: str | os.PathLike) -> list[Path]:
    """Write ``stem``.pdf and ``stem``.png atomically (temp file, then rename)."""
    stem = Path(stem)
    out = []
    # no creation date in the PDF: redrawing the same data gives the same file
    for ext, kw in (("pdf", {"metadata": {"CreationDate": None}}), ("png", {"dpi": 200})):
        path = stem.with_suffix(f".{ext}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, **kw)
        out.append(path)
    plt.close(fig)
    return out


def _entries(axes: Iterable[plt.Axes] | np.ndarray) -> dict:
    """Every label of every panel once, with its first handle (a :func:`reference` line drawn
    over its band: both)."""
    by: dict = {}
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            band = getattr(h, "band", None)
            by.setdefault(lab, h if band is None else (band, h))
    return by


def legend_below(fig: plt.Figure, axes: np.ndarray, max_cols: int = 7) -> None:
    """One legend under the figure with every label of every panel once (its first handle; a
    :func:`reference` line drawn over its band shows both)."""
    by = _entries(axes)
    fig.legend(by.values(), by.keys(), loc="outside lower center", ncol=min(max_cols, len(by)),
               frameon=False)


def legend_in(blank: plt.Axes, axes: Iterable[plt.Axes] | np.ndarray, ncol: int = 1) -> None:
    """The legend of :func:`legend_below`, drawn instead in the empty panel ``blank`` (whose
    frame and ticks are turned off): for a grid whose last row has room to spare."""
    by = _entries(axes)
    blank.axis("off")
    blank.legend(by.values(), by.keys(), loc="center", ncol=ncol, frameon=False)


def reference(ax: plt.Axes, mean: float, std: float | None = None, label: str = "full fine-tuning",
              color: str = REFERENCE["color"], lw: float = 0.8) -> None:
    """A baseline across the panel: a dashed line at ``mean`` over a light band mean ± ``std``
    (no band without ``std``; a NaN std, from a single seed, is a band of width 0). With a band
    the legend entry (:func:`legend_below`) shows line and band and says what the band is."""
    band = None
    if std is not None:
        sd = 0.0 if pd.isna(std) else std
        band = ax.axhspan(mean - sd, mean + sd, color="0.85", zorder=0)
        label = f"{label} ± std over seeds"
    line = ax.axhline(mean, color=color, lw=lw, ls="--", zorder=0, label=label)
    line.band = band


def pareto_front(x: np.ndarray, y: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Indices of the points not dominated by any other (fewer params and a better metric)."""
    order = np.lexsort((-y if higher_is_better else y, x))
    front, best = [], -np.inf
    for i in order:
        score = y[i] if higher_is_better else -y[i]
        if score > best:
            front.append(i)
            best = score
    return np.array(front, dtype=int)


LOG_METRICS = {"delta_error", "mse", "rel_mse", "perplexity", "bits_per_char"}  # drawn on log y


def lr_sensitivity(df: pd.DataFrame, stem: str | os.PathLike, row: str = "task", col: str = "rank",
                   search_seed: int = 0, max_cols: int = 4) -> list[Path]:
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
    on = runs["selection_metric"].fillna(runs["metric"]) if "selection_metric" in runs else runs["metric"]
    records = runs.to_dict("records")
    runs = runs.assign(_on=on.to_numpy(),
                       _dev=[r.get(f"dev_{m}", np.nan) for r, m in zip(records, on)],
                       _test=[r.get(f"test_{m}", np.nan) for r, m in zip(records, on)])
    layout = {}  # row value → its panels' col values, in order ([None]: one panel, no col)
    for key, sub in runs.groupby(row, sort=False):
        values = list(dict.fromkeys(sub[col].dropna()))
        layout[key] = (sorted(values) if col == "rank" else values) or [None]
    width = max(len(values) for values in layout.values())
    ncols = math.ceil(width / math.ceil(width / max_cols))  # a long row wraps into even lines
    lines = [(key, values[i:i + ncols]) for key, values in layout.items()
             for i in range(0, len(values), ncols)]
    styles = style_for(runs["variant"].unique())
    with panels(len(lines), ncols, 1.9 * len(lines) + 1.0) as (fig, axes):
        for (key, chunk), line in zip(lines, axes):
            mine = runs[runs[row] == key]
            scores = pd.concat([mine["_dev"], mine["_test"]]).dropna()
            metric = mine["_on"].iloc[0]
            for ax, value in zip(line, chunk):
                _lr_panel(ax, mine if value is None else mine[mine[col].isna() | (mine[col] == value)],
                          chosen, styles)
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
            for ax in line[len(chunk):]:
                ax.set_visible(False)
        first = axes.flat[0]
        first.plot([], [], color="0.3", lw=1.0, label="dev score (solid)")
        first.plot([], [], color="0.3", ls="--", lw=0.7, label="test score (dashed)")
        first.plot([], [], ls="none", marker="o", color="0.3", ms=5.5, markeredgecolor="black",
                   markeredgewidth=0.6, label="chosen rate: best dev score (outlined)")
        if runs["_dev"].isna().any():
            first.plot([], [], ls="none", marker="x", color="0.3", label="diverged: no score")
        letter_panels(axes)
        legend_below(fig, axes, max_cols=4)
        return save(fig, stem)


def _lr_panel(ax: plt.Axes, runs: pd.DataFrame, chosen: pd.Series,
              styles: dict[str, dict[str, str]]) -> None:
    """One panel of :func:`lr_sensitivity`: a dev and a test line per search group of ``runs``."""
    several = runs.groupby("variant")["group"].nunique()
    for group, g in runs.groupby("group", sort=False):
        g = g.sort_values("lr")
        v, rank = g["variant"].iloc[0], g["rank"].iloc[0]
        st = styles[v]
        text = label(v) if several[v] == 1 else label(v, rank)
        ax.plot(g["lr"], g["_dev"], color=st["color"], marker=st["marker"], ms=3,
                markerfacecolor="white", lw=1.0, label=text)
        ax.plot(g["lr"], g["_test"], color=st["color"], ls="--", lw=0.7)
        best = g[g["lr"] == chosen.get(group)]
        ax.plot(best["lr"], best["_dev"], ls="none", color=st["color"], marker=st["marker"], ms=5.5,
                markeredgecolor="black", markeredgewidth=0.6, zorder=3, gid="chosen")
        ax.plot(best["lr"], best["_test"], ls="none", color=st["color"], marker=st["marker"], ms=3.5)
        lost = g[g["_dev"].isna()]  # diverged: no score, a cross on the lower edge
        if len(lost):  # (an empty line off the clip box would break the layout)
            ax.plot(lost["lr"], np.zeros(len(lost)), ls="none", marker="x", color=st["color"],
                    transform=ax.get_xaxis_transform(), clip_on=False)
