"""What a reviewer checks in every paper figure, checked on every study's figure function: each
panel has axis labels (and a bold panel letter when there are several), legends and tick labels
name variants by their display name (never the registry's code name), no two texts overlap, and
an axis in MiB starts at 0. Also: a variant needs a display name of its own to be registered,
and a study's --out that is not a CSV is one sentence, not a traceback."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.text import Text
from studyutil import load_study
from torch import nn

import lowrank as lr
from lowrank import plots
from lowrank.adapters import registry

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"


def _drawn_ticks(axis) -> list[Text]:
    """The tick labels ``axis`` draws: those of ticks inside its view interval."""
    lo, hi = sorted(axis.get_view_interval())
    pad = 1e-9 * max(abs(lo), abs(hi), 1.0)
    return [
        label
        for tick in axis.get_major_ticks() + axis.get_minor_ticks()
        if lo - pad <= tick.get_loc() <= hi + pad
        for label in (tick.label1, tick.label2)
    ]


def _texts(fig: plt.Figure) -> list[Text]:
    """Every visible, non-empty text that ``fig`` draws: titles, axis labels, drawn tick labels,
    annotations and panel letters, legend entries."""
    texts = list(fig.texts)
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        texts += [ax.title, ax._left_title, ax._right_title, *ax.texts]
        if ax.axison:
            texts += [ax.xaxis.label, ax.yaxis.label, *_drawn_ticks(ax.xaxis), *_drawn_ticks(ax.yaxis)]
        if ax.get_legend():
            texts += ax.get_legend().get_texts()
    for legend in fig.legends:
        texts += legend.get_texts()
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def _panels(fig: plt.Figure) -> list[plt.Axes]:
    """The data panels of ``fig``: visible axes with a frame, not colour bars."""
    return [ax for ax in fig.axes if ax.get_visible() and ax.axison and ax.get_label() != "<colorbar>"]


def code_names_in(text: str) -> list[str]:
    """The registry code names that ``text`` uses as words once every display name (and the
    names of rows that are not variants) is taken out of it."""
    for name in sorted(
        [lr.variant_class(v).display_name for v in lr.variants()] + list(plots.OTHER_NAMES.values()),
        key=len,
        reverse=True,
    ):
        text = text.replace(name, " ")
    return [v for v in lr.variants() if re.search(rf"(?<![\w-]){re.escape(v)}(?![\w-])", text)]


def _axis_problems(panels: list[plt.Axes]) -> list[str]:
    """Panels without an x label, or showing y values without a y label; memory axes that do
    not start at 0."""
    out = []
    for i, ax in enumerate(panels):
        name = f"panel {i} ({ax.get_title(loc='left') or ax.get_title()!r})"
        if not ax.get_xlabel().strip():
            out.append(f"{name} has no x label")
        shows_y = any(t.get_visible() and t.get_text() for t in ax.get_yticklabels())
        if shows_y and not ax.get_ylabel().strip():  # a panel sharing its neighbour's y may not
            out.append(f"{name} has no y label")
        for axis, text, lim in (("x", ax.get_xlabel(), ax.get_xlim()), ("y", ax.get_ylabel(), ax.get_ylim())):
            if "MiB" in text and min(lim) != 0:
                out.append(f"{name}: its memory axis ({axis}) starts at {min(lim):g}, not 0")
    return out


def _letter_problems(fig: plt.Figure, panels: list[plt.Axes]) -> list[str]:
    """A figure of several panels without one bold letter a, b, … per panel."""
    if len(panels) < 2:
        return []
    letters = sorted(
        t.get_text()
        for t in _texts(fig)
        if re.fullmatch(r"[a-z]", t.get_text()) and t.get_fontweight() in ("bold", 700)
    )
    want = [chr(ord("a") + i) for i in range(len(panels))]
    return [] if letters == want else [f"panel letters {letters}, expected {want}"]


def _name_problems(fig: plt.Figure, panels: list[plt.Axes]) -> list[str]:
    """Legend entries and tick labels that name a variant by its code name."""
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    shown = [
        *(t.get_text() for leg in legends for t in leg.get_texts()),
        *(t.get_text() for ax in panels for t in ax.get_yticklabels() + ax.get_xticklabels()),
    ]
    return [
        f"{text!r} names a variant by its code name {code_names_in(text)}"
        for text in shown
        if code_names_in(text)
    ]


def _overlap_problems(fig: plt.Figure) -> list[str]:
    """Pairs of drawn texts whose boxes overlap (by more than half a pixel each way)."""
    renderer = fig.canvas.get_renderer()
    boxes = [(t, t.get_window_extent(renderer)) for t in _texts(fig)]
    out = []
    for i, (t, a) in enumerate(boxes):
        for u, b in boxes[i + 1 :]:
            if min(a.x1, b.x1) - max(a.x0, b.x0) > 0.5 and min(a.y1, b.y1) - max(a.y0, b.y0) > 0.5:
                out.append(f"{t.get_text()!r} overlaps {u.get_text()!r}")
    return out


def problems(fig: plt.Figure) -> list[str]:
    """Everything a reviewer would send back about ``fig``, one line each (empty: accepted)."""
    fig.canvas.draw()
    panels = _panels(fig)
    return [
        *_axis_problems(panels),
        *_letter_problems(fig, panels),
        *_name_problems(fig, panels),
        *_overlap_problems(fig),
    ]


@pytest.fixture()
def reviewed(monkeypatch) -> dict[str, list[str]]:
    """{figure stem name: its problems} of every figure saved while the test runs (checked just
    before saving, in the paper style)."""
    found: dict[str, list[str]] = {}
    save = plots.save

    def checked(fig, stem):
        found[Path(stem).name] = problems(fig)
        return save(fig, stem)

    monkeypatch.setattr(plots, "save", checked)
    return found


def _small_csv(name: str, tmp_path: Path, keep: dict | None = None) -> Path:
    """results/<name>.csv, or the rows of it with ``keep`` {column: values}, in ``tmp_path``."""
    df = pd.read_csv(RESULTS / f"{name}.csv", low_memory=False)
    for col, values in (keep or {}).items():
        df = df[df[col].isin(values) | df[col].isna()] if col == "rank" else df[df[col].isin(values)]
    out = tmp_path / f"{name}.csv"
    df.to_csv(out, index=False)
    return out


# (study, rows of its committed CSV to keep): small, and still every kind of panel
STUDIES = [
    ("rank_ablation", {"variant": ["full", "lora", "vera", "random_alignment", "frobenius"]}),
    ("reconstruction", None),
    ("subspace", None),
    ("overhead", {"d": [768]}),
    ("spectra", {"variant": ["full", "lora", "pissa", "vera", "loha", "dora"]}),
    ("downstream", None),
    ("continual", {"variant": ["full", "lora", "vera", "pissa"]}),
    ("robustness", {"variant": ["full", "lora", "vera"]}),
]


@pytest.mark.parametrize(("name", "keep"), STUDIES, ids=[s for s, _ in STUDIES])
def test_every_study_figure_is_one_a_reviewer_accepts(name, keep, tmp_path, reviewed):
    csv = _small_csv(name, tmp_path, keep)
    if name == "spectra":  # its learning-rate figure reads the sweep beside the table
        shutil.copy(RESULTS / "spectra_runs.csv", tmp_path / "spectra_runs.csv")
    extra = ["--table", str(tmp_path / "t.md")] if name == "downstream" else []
    assert (
        load_study(f"{name}.py").main(
            ["--plot-only", "--out", str(csv), "--figure", str(tmp_path / name), *extra]
        )
        == 0
    )
    assert name in reviewed
    assert {k: v for k, v in reviewed.items() if v} == {}


def test_a_cluster_of_points_gets_labels_that_do_not_overlap(tmp_path, reviewed):
    """Twelve variants a few per cent apart at one budget (the downstream figure's crowd near
    8e4 parameters), some at another rank: every rank tag legible."""
    ds = load_study("downstream.py")
    rng = np.random.default_rng(0)
    rows = [
        {
            "dataset": "movies",
            "variant": v,
            "rank": r,
            "seed": s,
            "test_accuracy": 0.75 + 0.002 * i + 0.01 * rng.random(),
            "trainable_params": 74_000 + 500 * i,
            "peak_mem_mb": 1900 + 5 * i,
        }
        for i, (v, r) in enumerate(
            [(v, 8) for v in lr.variants() if v != "full"]
            + [("loha", 4), ("lokr", 49), ("random_alignment", 16), ("vera", 384)]
        )
        for s in range(2)
    ]
    rows += [
        {
            "dataset": "movies",
            "variant": "full",
            "rank": None,
            "seed": s,
            "test_accuracy": 0.8,
            "trainable_params": 10_638_338,
            "peak_mem_mb": 1980,
        }
        for s in range(2)
    ]
    ds.figure(pd.DataFrame(rows), tmp_path / "crowd")
    assert reviewed == {"crowd": []}


def test_the_review_catches_what_it_is_about(tmp_path):
    """The checks fail on a figure with each fault: no labels, no letters, a code name in the
    legend, two texts on top of each other, a memory axis that does not start at 0."""
    with plots.panels(1, 2, 2.0) as (fig, axes):
        a, b = axes[0]
        a.plot([1, 2], [1, 2], label="lora")
        a.annotate("here", (1.5, 1.5))
        a.annotate("here too", (1.5, 1.5))
        b.plot([1000, 1100], [0.5, 0.6])
        b.set_xlabel("peak memory (MiB)")
        b.set_ylabel("accuracy")
        plots.legend_below(fig, axes)
        found = problems(fig)
        plt.close(fig)
    assert "panel 0 ('') has no x label" in found and "panel 0 ('') has no y label" in found
    assert any(p.startswith("panel letters [], expected ['a', 'b']") for p in found)
    assert "'lora' names a variant by its code name ['lora']" in found
    assert "'here' overlaps 'here too'" in found
    assert any("memory axis (x) starts at" in p for p in found)


def test_labels_are_display_names():
    assert plots.label("lora") == "LoRA" and plots.label("lora", 8) == "LoRA r=8"
    assert plots.label("full", float("nan")) == "full fine-tuning"
    assert plots.label("probe") == "linear probe" and plots.label("unknown") == "unknown"
    names = [lr.variant_class(v).display_name for v in lr.variants()]
    assert all(names) and len(set(names)) == len(names)
    assert code_names_in("LoRA r=8, full fine-tuning, random alignment") == []
    assert code_names_in("random_alignment r8") == ["random_alignment"]


def test_a_variant_needs_a_display_name_of_its_own(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    class Unnamed(lr.variant_class("lora")):  # inherits LoRA's display name, sets none itself
        name = "unnamed_for_test"

    with pytest.raises(
        ValueError,
        match=r"^variant 'unnamed_for_test' \(.*Unnamed\) has no "
        r"display_name of its own; set the class attribute",
    ):
        lr.register(Unnamed)

    class Twin(lr.variant_class("lora")):
        name = "twin_for_test"
        display_name = "DoRA"

    with pytest.raises(
        ValueError,
        match=r"^variant 'twin_for_test' has display_name 'DoRA', which "
        r"variant 'dora' already uses; give it a display_name",
    ):
        lr.register(Twin)
    assert "unnamed_for_test" not in lr.variants() and "twin_for_test" not in lr.variants()

    class Named(lr.variant_class("lora")):
        name = "named_for_test"
        display_name = "named LoRA (test)"

    lr.register(Named)
    assert plots.label("named_for_test") == "named LoRA (test)"
    assert lr.make("named_for_test", nn.Linear(4, 4), rank=2).num_trainable() == 16


@pytest.mark.parametrize("name", [s for s, _ in STUDIES])
def test_an_out_that_is_not_a_csv_is_one_sentence(name, tmp_path, capsys):
    png = tmp_path / "some.png"
    png.write_bytes(b"\x89PNG")  # an existing figure: reading it as a CSV was a traceback
    with pytest.raises(SystemExit) as stop:
        load_study(f"{name}.py").main(["--plot-only", "--out", str(png)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        f"error: --out {png} is not a .csv file: --out is the results CSV (e.g. results/{name}.csv), "
        "and the figure's path goes to --figure, without an extension" in err
    )


def test_the_dev_curves_figure_is_one_a_reviewer_accepts(tmp_path, reviewed):
    """Every variant's dev curve on two datasets, two of them at a second rank (the downstream
    --paper run's 16 lines a panel): labelled, lettered, named by display name, no overlaps."""
    from lowrank import convergence

    rng = np.random.default_rng(0)
    runs = [(v, None if v == "full" else 8) for v in lr.variants()] + [("vera", 384), ("loha", 4)]
    rows = pd.DataFrame(
        [
            {
                "dataset": d,
                "variant": v,
                "rank": r,
                "seed": s,
                "metric": "accuracy",
                "dev_curve": json.dumps(
                    [[k, float(0.9 - 0.3 / k**0.5 + 0.01 * rng.random())] for k in range(100, 700, 100)]
                ),
            }
            for d in ("movies", "trec")
            for v, r in runs
            for s in range(3)
        ]
    )
    convergence.curves_figure(rows, tmp_path / "downstream_curves", by="dataset")
    assert reviewed == {"downstream_curves": []}


def test_a_curve_keeps_its_name_and_line_style_in_every_panel(tmp_path, monkeypatch):
    """LoHa at r=4 and r=8 on one dataset and only at r=8 on the other (a run in progress): the
    r=8 line is dashed and named "LoHa r=8" in both panels, so the shared legend has one entry
    per (variant, rank), each true of every panel it appears in."""
    from lowrank import convergence

    runs = {"movies": [("loha", 4), ("loha", 8), ("lora", 8)], "trec": [("loha", 8), ("lora", 8)]}
    rows = pd.DataFrame(
        [
            {"dataset": d, "variant": v, "rank": r, "seed": 0, "metric": "accuracy"}
            | {"dev_curve": json.dumps([[100, 0.8], [200, 0.85]])}
            for d, rs in runs.items()
            for v, r in rs
        ]
    )
    seen = {}
    monkeypatch.setattr(plots, "save", lambda fig, stem: seen.setdefault("fig", fig) and [])
    convergence.curves_figure(rows, tmp_path / "curves", by="dataset")
    fig = seen["fig"]
    entries = [t.get_text() for t in fig.legends[0].get_texts()]
    assert entries.count("LoHa r=8") == 1 and "LoHa" not in entries
    styles = {
        (ax.get_ylabel().split(":")[0], line.get_label()): line.get_linestyle()
        for ax in fig.axes
        for line in ax.get_lines()
    }
    assert styles == {
        ("movies", "LoHa r=4"): "-",
        ("movies", "LoHa r=8"): "--",
        ("movies", "LoRA"): "-",
        ("trec", "LoHa r=8"): "--",
        ("trec", "LoRA"): "-",
    }
