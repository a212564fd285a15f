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

# Paul Tol's 12-colour qualitative scheme (SRON technical note SRON/EPS/TN/09-002, issue 2.2,
# 2012): his colour-blind-safe "muted" nine plus blue, brown and a red-purple, for one colour per
# variant that takes a rank. A variant's colour and marker are fixed by its position in
# lr.variants() among those variants (style()); the order below keeps the four red-purples and
# the three blues apart for the variants the studies draw together (positions 1, 2 and 5 to 10).
PALETTE = [
    "#AA4499",
    "#DDCC77",
    "#44AA99",
    "#6699CC",
    "#661100",
    "#332288",
    "#999933",
    "#CC6677",
    "#117733",
    "#88CCEE",
    "#882255",
    "#AA4466",
]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "d"]
# Full fine-tuning (no rank) is the reference every adapter is measured against: black, a star
# as a point and a dashed line over a grey band as a level.
REFERENCE = {"color": "black", "marker": "*"}
# Okabe–Ito, yellow last (hard to see on white): for categories that are not variants
OKABE_ITO = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]
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
    return {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[(i + i // len(PALETTE)) % len(MARKERS)]}


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
    return [
        ax.annotate(
            chr(ord("a") + i),
            (0, 1),
            xycoords="axes fraction",
            xytext=(-3, 5),
            textcoords="offset points",
            ha="right",
            va="bottom",
            fontweight="bold",
            fontsize=plt.rcParams["axes.titlesize"] + 1,
            gid="panel-letter",
        )
        for i, ax in enumerate(shown)
    ]


def _overlaps(a, b, pad: float = 1.0) -> bool:
    return a.x0 < b.x1 + pad and b.x0 < a.x1 + pad and a.y0 < b.y1 + pad and b.y0 < a.y1 + pad


# Where place_labels tries a label, in this order: (x, y offset in points, ha, va)
_SPOTS = [
    (3, 2, "left", "bottom"),
    (3, -2, "left", "top"),
    (-3, 2, "right", "bottom"),
    (-3, -2, "right", "top"),
]


def _put(t: plt.Text, spot: tuple[float, float, str, str], renderer) -> object:
    """Move the label ``t`` to ``spot`` (offset in points, alignment); its new box in pixels."""
    x, y, ha, va = spot
    t.set(ha=ha, va=va)
    t.xyann = (x, y)
    return t.get_window_extent(renderer)


def place_labels(
    ax: plt.Axes, xs: Iterable[float], ys: Iterable[float], texts: Iterable[str], fontsize: float = 5, **kw
) -> list[plt.Text]:
    """Label the points (``xs``, ``ys``) of ``ax`` with ``texts`` so that no label overlaps
    another or the panel's other texts (deterministic, greedy): in order of the points from
    left to right, each label takes the first of up-right, down-right, up-left and down-left of
    its point that is free and inside the panel, else the first inside the panel moved up (or,
    near the top of the panel, down) past what it touches. Call it after everything that sets
    the axes' limits and layout (legend, panel letters) has been drawn; it draws the figure to
    measure the texts, which take no part in the layout."""
    fig = ax.figure
    made = [
        ax.annotate(
            t,
            (x, y),
            xytext=_SPOTS[0][:2],
            textcoords="offset points",
            fontsize=fontsize,
            ha=_SPOTS[0][2],
            va=_SPOTS[0][3],
            gid="point-label",
            in_layout=False,
            **kw,
        )
        for x, y, t in zip(xs, ys, texts)
        if t
    ]
    if not made:
        return made
    fig.canvas.draw()  # the layout settles (the labels take no part in it)
    renderer = fig.canvas.get_renderer()
    pts = 72 / fig.dpi  # display pixels → points
    frame = ax.get_window_extent(renderer)
    placed = [t.get_window_extent(renderer) for t in [ax.title, *ax.texts] if t.get_text() and t not in made]
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
                dy = max(b.y1 for b in hit) + 1.5 - box.y0 if up else min(b.y0 for b in hit) - 1.5 - box.y1
                t.xyann = (t.xyann[0], t.xyann[1] + dy * pts)
                box = box.translated(0, dy)
        placed.append(box)
    return made


@contextmanager
def panels(nrows: int, ncols: int, height: float, **subplots) -> Iterator[tuple[plt.Figure, np.ndarray]]:
    """A FULL_WIDTH × ``height`` inch figure of nrows × ncols panels (a 2-D array of axes) in
    the paper style; draw and :func:`save` inside the ``with``, where the style applies."""
    with plt.rc_context(STYLE):
        yield plt.subplots(
            nrows, ncols, figsize=(FULL_WIDTH, height), squeeze=False, constrained_layout=True, **subplots
        )


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
    fig.legend(by.values(), by.keys(), loc="outside lower center", ncol=min(max_cols, len(by)), frameon=False)


def legend_in(blank: plt.Axes, axes: Iterable[plt.Axes] | np.ndarray, ncol: int = 1) -> None:
    """The legend of :func:`legend_below`, drawn instead in the empty panel ``blank`` (whose
    frame and ticks are turned off): for a grid whose last row has room to spare."""
    by = _entries(axes)
    blank.axis("off")
    blank.legend(by.values(), by.keys(), loc="center", ncol=ncol, frameon=False)


def reference(
    ax: plt.Axes,
    mean: float,
    std: float | None = None,
    label: str = "full fine-tuning",
    color: str = REFERENCE["color"],
    lw: float = 0.8,
) -> None:
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
