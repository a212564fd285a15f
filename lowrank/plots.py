"""Paper figures from tidy results tables: one style, one function per figure kind.

Vector PDF (TrueType fonts embedded) and PNG, Okabe–Ito colour-blind-safe palette with a
distinct marker per variant, sized for a two-column paper (7.0 in wide). Figures read only the
CSV, so they can be redrawn without training.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .files import atomic_path  # noqa: E402

# Okabe–Ito, yellow last: it is the one colour that is hard to see on white
OKABE_ITO = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
             "#F0E442"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "*", "h", "p"]
FULL_WIDTH = 7.0  # inches, two-column paper text width
MIN_BOUND = 1e-3  # ratios to an Eckart–Young error below this are left out of the means

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


def style_for(variants: Sequence[str]) -> dict[str, dict]:
    """A fixed colour and marker per variant (stable order: sorted names)."""
    return {v: {"color": OKABE_ITO[i % len(OKABE_ITO)], "marker": MARKERS[i % len(MARKERS)]}
            for i, v in enumerate(sorted(variants))}


def label(metric: str) -> str:
    return LABELS.get(metric, metric.replace("_", " "))


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


def legend_below(fig: plt.Figure, axes: np.ndarray, max_cols: int = 7) -> None:
    """One legend under the figure with every label of every panel once (its first handle)."""
    by: dict = {}
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            by.setdefault(lab, h)
    fig.legend(by.values(), by.keys(), loc="outside lower center", ncol=min(max_cols, len(by)),
               frameon=False)


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


def _summary(df: pd.DataFrame, col: str) -> pd.DataFrame:
    g = df.groupby(["variant", "rank"], dropna=False)
    return g.agg(mean=(col, "mean"), std=(col, "std"), n=(col, "size"),
                 params=("trainable_params", "mean")).reset_index()


def rank_ablation(df: pd.DataFrame, stem: str | os.PathLike) -> list[Path]:
    """Per task (row): metric vs rank (log₂), metric vs trainable parameters (log), and the
    Pareto front across variants and ranks. Mean ± std over seeds; full fine-tuning is a band."""
    df = df[df["status"] == "ok"]
    tasks = list(dict.fromkeys(df["task"]))
    if not tasks:
        raise ValueError("no finished runs to plot; run the sweep first")
    styles = style_for([v for v in df["variant"].unique() if v != "full"])  # full is the band
    styles["full"] = {"color": "0.4", "marker": "_"}
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(tasks), 3, figsize=(FULL_WIDTH, 2.2 * len(tasks)),
                                 squeeze=False, constrained_layout=True)
        for row, task in zip(axes, tasks):
            sub = df[df["task"] == task]
            metric = sub["metric"].iloc[0]
            higher = bool(sub["higher_is_better"].iloc[0])
            s = _summary(sub, f"test_{metric}")
            full = s[s["variant"] == "full"]
            ranked = s[s["variant"] != "full"].dropna(subset=["rank"])
            for ax in row[:2]:
                for _, f in full.iterrows():
                    lo, hi = f["mean"] - np.nan_to_num(f["std"]), f["mean"] + np.nan_to_num(f["std"])
                    ax.axhspan(lo, hi, color="0.85", zorder=0)
                    ax.axhline(f["mean"], color="0.4", lw=0.8, ls="--", zorder=0,
                               label="full fine-tuning")
            for variant, g in ranked.groupby("variant"):
                g = g.sort_values("rank")
                st = styles[variant]
                for ax, x in ((row[0], g["rank"]), (row[1], g["params"])):
                    ax.errorbar(x, g["mean"], yerr=g["std"].fillna(0), label=variant,
                                capsize=1.5, **st)
            row[0].set_xscale("log", base=2)
            row[0].set_xlabel("rank r")
            row[1].set_xscale("log")
            row[1].set_xlabel("trainable parameters")
            pts = s.dropna(subset=["mean"])
            x, y = pts["params"].to_numpy(float), pts["mean"].to_numpy(float)
            front = pareto_front(x, y, higher)
            for variant, g in pts.groupby("variant"):
                row[2].scatter(g["params"], g["mean"], s=10, alpha=0.5, color=styles[variant]["color"],
                               marker=styles[variant]["marker"], linewidths=0)
            row[2].step(x[front], y[front], where="post", color="0.2", lw=1.0,
                        label="Pareto front")
            for i in front:
                row[2].annotate(f"{pts['variant'].iloc[i]}"
                                + ("" if pd.isna(pts["rank"].iloc[i]) else f" r{int(pts['rank'].iloc[i])}"),
                                (x[i], y[i]), fontsize=5, xytext=(2, 2), textcoords="offset points")
            row[2].set_xscale("log")
            row[2].set_xlabel("trainable parameters")
            for ax in row:
                ax.set_ylabel(f"{task}: {label(metric)}")
                if metric in ("delta_error", "mse", "perplexity"):
                    ax.set_yscale("log")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        h1, l1 = axes[0, 2].get_legend_handles_labels()
        by = dict(zip(labels + l1, handles + h1))
        fig.legend(by.values(), by.keys(), loc="outside lower center", ncol=min(6, len(by)),
                   frameon=False)
        return save(fig, stem)


def overhead(df: pd.DataFrame, stem: str | os.PathLike) -> list[Path]:
    """Dot plot of time relative to the base Linear (median over rounds of the paired ratio),
    per configuration; one panel per measurement kind, one marker per (d, r) shape; the dashed
    line is the base layer."""
    shapes = [tuple(x) for x in df[["d", "rank"]].drop_duplicates().to_numpy()]
    configs = sorted(df["config"].unique(), key=lambda c: (c != "base", c))
    kinds = list(dict.fromkeys(df["kind"]))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(kinds), figsize=(FULL_WIDTH, 0.16 * len(configs) + 1.2),
                                 sharey=True, squeeze=False, constrained_layout=True)
        for ax, kind in zip(axes[0], kinds):
            sub = df[df["kind"] == kind]
            for j, (d, r) in enumerate(shapes):
                pts = sub[(sub["d"] == d) & (sub["rank"] == r)].set_index("config")
                ys = [i for i, c in enumerate(configs) if c in pts.index]
                xs = [pts.loc[c, "ratio_to_base"] for c in configs if c in pts.index]
                ax.scatter(xs, ys, s=12, color=OKABE_ITO[j % len(OKABE_ITO)],
                           marker=MARKERS[j % len(MARKERS)], label=f"d={d}, r={r}", zorder=3)
            ax.axvline(1.0, color="0.4", ls="--", lw=0.8)
            ax.set_xscale("log")
            ticks = [t for t in (0.9, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)
                     if sub["ratio_to_base"].min() * 0.95 <= t <= sub["ratio_to_base"].max() * 1.05]
            ax.set_xticks(ticks, [f"{t:g}×" for t in ticks])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(f"{kind}: time / base Linear")
            ax.set_yticks(range(len(configs)), configs)
        axes[0, 0].invert_yaxis()  # shared y: once for all panels; base on top
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=min(5, len(labels)),
                   frameon=False)
        return save(fig, stem)


def _method_label(method: str, lam_rel: float) -> str:
    return method if method not in ("gd_uv", "closed_form") else f"{method} λ={lam_rel:g}σ₁"


def reconstruction(df: pd.DataFrame, stem: str | os.PathLike,
                   matrices: Sequence[str] | None = None) -> list[Path]:
    """Relative error ‖W − Ŵ_r‖_F/‖W‖_F vs rank for a few matrices (the Eckart–Young bound a
    black line, closed forms dashed in their gradient-descent colour), then a summary panel:
    mean ratio to Eckart–Young per method over every matrix and rank where the bound is at
    least ``MIN_BOUND`` (below it the ratio of two tiny errors is dominated by the step budget)."""
    if matrices is None:  # the synthetic spectra, then the first attention and MLP matrix
        names = list(dict.fromkeys(df["matrix"]))
        syn = [n for n in names if n.startswith("synthetic.")]
        attn = [n for n in names if ".attention." in n][:1]
        mlp = [n for n in names if n.startswith("minilm.") and ".attention." not in n][:1]
        matrices = syn + attn + mlp
    df = df.assign(label=[_method_label(m, c) for m, c in zip(df["method"], df["lam_rel"])])
    gd = [_method_label("gd_uv", c) for c in sorted(df.loc[df["method"] == "gd_uv", "lam_rel"].unique())]
    others = [m for m in ("svd", "randomized_svd", "random_projection", "lora_adam")
              if m in set(df["method"])]
    palette = [c for c in OKABE_ITO if c != "#000000"]  # black is the Eckart–Young line
    styles = {m: {"color": palette[i % len(palette)], "marker": MARKERS[i]}
              for i, m in enumerate(others + gd)}
    for g in gd:
        styles[g.replace("gd_uv", "closed_form")] = {"color": styles[g]["color"], "ls": "--",
                                                     "marker": "", "lw": 0.8}
    styles["svd"] |= {"ls": "", "marker": "o", "mfc": "none", "markersize": 6}
    n = len(matrices) + 1
    cols = 3
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(FULL_WIDTH, 2.1 * ((n + 2) // 3)),
                                 squeeze=False, constrained_layout=True)
        flat = axes.ravel()
        for ax, name in zip(flat, matrices):
            sub = df[df["matrix"] == name]
            ey = sub.groupby("rank")["eckart_young"].first()
            ax.plot(ey.index, ey.to_numpy(), color="black", lw=1.6, label="Eckart–Young bound",
                    zorder=1)
            for lab, st in styles.items():
                g = sub[sub["label"] == lab].sort_values("rank")
                if len(g) and not (lab.startswith("closed_form") and g["lam_rel"].iloc[0] == 0):
                    ax.plot(g["rank"], g["error"], label=lab, zorder=2, **st)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            short = name.replace("minilm.layer.", "MiniLM L").replace("attention.self.", "")
            ax.set_title(f"{short} ({sub['rows'].iloc[0]}×{sub['cols'].iloc[0]})")
            ax.set_xlabel("rank r")
            ax.set_ylabel(r"$\|W-\hat W_r\|_F/\|W\|_F$")
        ax = flat[len(matrices)]
        mean = df[df["eckart_young"] >= MIN_BOUND].groupby("label")["ratio"].mean()
        order = [lab for lab in styles if lab in mean.index]
        ax.barh(range(len(order)), [mean[lab] for lab in order],
                color=[styles[lab]["color"] for lab in order])
        ax.set_yticks(range(len(order)), order)
        ax.invert_yaxis()
        for y, lab in enumerate(order):
            ax.annotate(f"{mean[lab]:.3f}", (mean[lab], y), xytext=(2, 0), fontsize=6,
                        textcoords="offset points", va="center")
        ax.axvline(1.0, color="black", lw=1.0)
        ax.set_xscale("log")
        ax.set_xlim(0.9, mean.max() * 2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(f"mean error / Eckart–Young (bound ≥ {MIN_BOUND:g})")
        for extra in flat[n:]:
            extra.set_visible(False)
        handles, labels = flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=4, frameon=False)
        return save(fig, stem)


def subspace(df: pd.DataFrame, stem: str | os.PathLike) -> list[Path]:
    """One row per adapted layer: φ(i, j) heat maps for each pair of runs (LoRA paper Figs. 3–4,
    i down, j across, colour 0…1), then the amplification factor ‖ΔW‖_F/‖U_rᵀW₀V_r‖_F vs rank."""
    phi, amp = df[df["kind"] == "phi"], df[df["kind"] == "amplification"]
    layers = list(dict.fromkeys(phi["layer"]))
    pairs = list(dict.fromkeys(phi["pair"]))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(layers), len(pairs) + 1,
                                 figsize=(FULL_WIDTH, 1.9 * len(layers) + 0.3), squeeze=False,
                                 constrained_layout=True,
                                 gridspec_kw={"width_ratios": [2.2] + [1] * len(pairs)})
        image = None
        for row, layer in zip(axes, layers):
            for ax, pair in zip(row, pairs):
                grid = phi[(phi["layer"] == layer) & (phi["pair"] == pair)].pivot(
                    index="i", columns="j", values="phi")
                image = ax.imshow(grid.to_numpy(float), vmin=0, vmax=1, cmap="viridis",
                                  aspect="auto", interpolation="nearest",
                                  extent=(0.5, grid.columns.max() + 0.5, grid.index.max() + 0.5, 0.5))
                ax.grid(False)
                ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
                ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
                ax.set_title(f"{layer}: φ, {pair}")
                ax.set_xlabel("j")
                ax.set_ylabel("i")
            ax = row[-1]
            g = amp[(amp["layer"] == layer) & (amp["seed"] == 0)].sort_values("rank")
            ax.plot(g["rank"], g["amplification"], color=OKABE_ITO[0], marker=MARKERS[0])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("rank r")
            ax.set_ylabel(r"$\|\Delta W\|_F / \|U_r^\top W_0 V_r\|_F$")
            ax.set_title(f"{layer}: amplification")
        fig.colorbar(image, ax=axes[:, :-1].ravel().tolist(), label="φ", shrink=0.8)
        return save(fig, stem)


def downstream(df: pd.DataFrame, stem: str | os.PathLike) -> list[Path]:
    """Per dataset (row): test accuracy vs trainable parameters (log) and vs peak memory, mean ±
    std over seeds, the Pareto front over both; the linear probe is a dashed line."""
    datasets = list(dict.fromkeys(df["dataset"]))
    if not datasets:
        raise ValueError("no finished runs to plot; run the study first")
    styles = style_for([v for v in df["variant"].unique() if v != "probe"])
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(datasets), 2, figsize=(FULL_WIDTH, 2.4 * len(datasets)),
                                 squeeze=False, constrained_layout=True)
        for row, dataset in zip(axes, datasets):
            sub = df[df["dataset"] == dataset]
            s = (sub.groupby(["variant", "rank"], dropna=False)
                 .agg(mean=("test_accuracy", "mean"), std=("test_accuracy", "std"),
                      params=("trainable_params", "mean"), mem=("peak_mem_mb", "mean"))
                 .reset_index())
            probe = s[s["variant"] == "probe"]
            runs = s[s["variant"] != "probe"]
            for ax, col, xlabel in ((row[0], "params", "trainable parameters"),
                                    (row[1], "mem", "peak memory of the run (MiB)")):
                for _, p in probe.iterrows():
                    ax.axhline(p["mean"], color="0.4", lw=0.8, ls="--", zorder=0,
                               label="linear probe")
                for _, r in runs.iterrows():
                    ax.errorbar(r[col], r["mean"], yerr=np.nan_to_num(r["std"]), capsize=1.5,
                                label=r["variant"], ls="none", **styles[r["variant"]])
                    tag = "" if pd.isna(r["rank"]) else f"r{int(r['rank'])}"
                    ax.annotate(tag, (r[col], r["mean"]), fontsize=5, xytext=(2, -6),
                                textcoords="offset points")
                x, y = runs[col].to_numpy(float), runs["mean"].to_numpy(float)
                front = pareto_front(x, y, True)
                ax.step(x[front], y[front], where="post", color="0.2", lw=0.8, label="Pareto front")
                ax.set_xlabel(xlabel)
                ax.set_ylabel(f"{dataset}: test accuracy")
            row[0].set_xscale("log")
        legend_below(fig, axes, max_cols=7)
        return save(fig, stem)


def spectra(df: pd.DataFrame, stem: str | os.PathLike, spectrum_rank: int = 16) -> list[Path]:
    """One row per task: σᵢ/σ₁ of ΔW vs i at the rank nearest ``spectrum_rank`` for the B·A
    family and for the other variants (median over layers and seeds, interquartile band; full
    fine-tuning's W − W₀ in black), then effective rank and rank90 vs r (layer mean; mean ± std
    over seeds; full fine-tuning a band, y = r dotted). ``df`` is the spectra study's table."""
    # B·A adapters (rank ≤ r, ≤ 2r when B₀A₀ is subtracted); the rest get the second panel
    ba_family = ("lora", "rslora", "pissa", "milora", "random_alignment", "frobenius")
    lay, sv = df[df["kind"] == "layer"], df[df["kind"] == "sv"]
    names = [t if not isinstance(d, str) or not d else f"{t} ({d})"
             for t, d in zip(df["task"], df["dataset"])]
    df = df.assign(_task=names)
    lay, sv = df.loc[lay.index], df.loc[sv.index]
    tasks = list(dict.fromkeys(lay["_task"]))
    if not tasks:
        raise ValueError("no layer rows to plot; run the study first")
    ranked = sorted(v for v in lay["variant"].unique() if v != "full")
    # black is full fine-tuning's and yellow is faint: six colours, solid then dashed
    palette = [c for c in OKABE_ITO if c not in ("#000000", "#F0E442")]
    styles = {v: {"color": palette[i % len(palette)], "marker": MARKERS[i % len(MARKERS)],
                  "ls": "-" if i < len(palette) else "--"} for i, v in enumerate(ranked)}
    full = {"color": "black", "ls": "--", "lw": 1.0}
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(tasks), 4, figsize=(FULL_WIDTH, 2.0 * len(tasks) + 0.5),
                                 squeeze=False, constrained_layout=True)
        for row, task in zip(axes, tasks):
            L, S = lay[lay["_task"] == task], sv[sv["_task"] == task]
            ranks = sorted({int(r) for r in L["rank"].dropna()})
            r_star = min(ranks, key=lambda r: (abs(np.log2(r / spectrum_rank)), -r)) if ranks else None
            groups = [[v for v in ranked if v in ba_family], [v for v in ranked if v not in ba_family]]
            for ax, group, title in zip(row[:2], groups, ("B·A family", "others")):
                for v in ["full", *group]:
                    g = S[(S["variant"] == v) & ((S["rank"] == r_star) if v != "full" else True)]
                    if g.empty:
                        continue
                    q = g.groupby("i")["sigma_rel"].quantile([0.25, 0.5, 0.75]).unstack().clip(lower=1e-9)
                    st = full if v == "full" else {"color": styles[v]["color"], "ls": styles[v]["ls"],
                                                   "marker": styles[v]["marker"], "markevery": 8,
                                                   "markersize": 3}
                    ax.plot(q.index, q[0.5], label="full fine-tuning" if v == "full" else v, **st)
                    ax.fill_between(q.index, q[0.25], q[0.75], color=st["color"], alpha=0.15, lw=0)
                if r_star:
                    ax.axvline(r_star, color="0.5", ls=":", lw=0.8)
                ax.set_yscale("log")
                ax.set_ylim(1e-9, 2)
                ax.set_xlabel("index i")
                ax.set_ylabel(r"$\sigma_i/\sigma_1$ of $\Delta W$")
                ax.set_title(f"{task}: {title}, r = {r_star}")
            for ax, col, ylab in ((row[2], "effective_rank", "effective rank of ΔW"),
                                  (row[3], "rank90", "rank for 90 % energy")):
                per_run = L.groupby(["variant", "rank", "seed"], dropna=False)[col].mean().reset_index()
                s = per_run.groupby(["variant", "rank"], dropna=False)[col].agg(["mean", "std"]).reset_index()
                for _, f in s[s["variant"] == "full"].iterrows():
                    sd = 0.0 if pd.isna(f["std"]) else f["std"]
                    ax.axhspan(f["mean"] - sd, f["mean"] + sd, color="0.85", zorder=0)
                    ax.axhline(f["mean"], zorder=0, label="full fine-tuning", **full)
                for v in ranked:
                    g = s[s["variant"] == v].sort_values("rank")
                    if len(g):
                        ax.errorbar(g["rank"], g["mean"], yerr=g["std"].fillna(0), capsize=1.5,
                                    label=v, color=styles[v]["color"], ls=styles[v]["ls"],
                                    marker=styles[v]["marker"])
                if ranks:
                    ax.plot(ranks, ranks, color="0.5", ls=":", lw=0.8, label="y = r")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log", base=2)
                ax.set_xlabel("allotted rank r")
                ax.set_ylabel(ylab)
                ax.set_title(f"{task}, layer mean")
        legend_below(fig, axes, max_cols=7)
        return save(fig, stem)


def robustness(df: pd.DataFrame, stem: str | os.PathLike) -> list[Path]:
    """Per task (row) three panels, test accuracy clean, under FGSM and under PGD at the runs' ε;
    one line per variant (and rank), one marker per training mode (plain, FGSM- or PGD-regularised),
    mean ± std over seeds as horizontal error bars."""
    df = df[df["status"] == "ok"].assign(mode=lambda d: d["adversarial"].fillna("none").astype(str))
    tasks = list(dict.fromkeys(df["task"]))
    if not tasks:
        raise ValueError("no finished runs to plot; run the sweep first")
    modes = [m for m in ("none", "fgsm", "pgd") if m in set(df["mode"])]
    names = {"none": "plain fine-tuning", "fgsm": "FGSM training", "pgd": "PGD training"}
    evals = [("test_clean_accuracy", "clean"), ("test_fgsm_accuracy", "FGSM"),
             ("test_pgd_accuracy", "PGD-10")]
    df = df.assign(config=[v if pd.isna(r) else f"{v} r{int(r)}" for v, r in zip(df["variant"], df["rank"])])
    configs = sorted(dict.fromkeys(df["config"]), key=lambda c: c != "full")  # stable: full first
    offset = {m: (i - (len(modes) - 1) / 2) * 0.22 for i, m in enumerate(modes)}
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(tasks), 3, sharey=True, squeeze=False, constrained_layout=True,
                                 figsize=(FULL_WIDTH, 0.32 * len(configs) * len(tasks) + 1.0))
        for row, task in zip(axes, tasks):
            sub = df[df["task"] == task]
            eps = ", ".join(f"{e:g}" for e in sorted(sub["robust_eps"].unique()))
            for ax, (col, name) in zip(row, evals):
                for i, m in enumerate(modes):
                    g = sub[sub["mode"] == m].groupby("config")[col].agg(["mean", "std"])
                    ys = [configs.index(c) + offset[m] for c in g.index]
                    ax.errorbar(g["mean"], ys, xerr=g["std"].fillna(0), ls="", capsize=1.5,
                                color=OKABE_ITO[i], marker=MARKERS[i], label=names[m])
                ax.set_xlim(-0.02, 1.02)
                ax.set_xlabel(f"test accuracy, {name}" + ("" if name == "clean" else f" (ε = {eps})"))
                ax.set_title(f"{task}: {name}")
                ax.grid(axis="y", visible=False)
            row[0].set_yticks(range(len(configs)), configs)
        axes[0, 0].invert_yaxis()  # shared y: once for all panels; full on top
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=len(modes), frameon=False)
        return save(fig, stem)


def continual(df: pd.DataFrame, stem: str | os.PathLike, curve: pd.DataFrame | None = None,
              titles: dict[str, str] | None = None) -> list[Path]:
    """Per task (column): new-task test accuracy vs forgetting (old-task accuracy lost), one line
    per variant through its ranks (marker size grows with rank), full fine-tuning a grey star and,
    from ``curve``, full fine-tuning at every searched learning rate as a dotted line; below,
    intruder dimensions summed over the adapted layers vs rank, full fine-tuning as a band.
    Mean ± std over seeds. ``df`` needs test_accuracy, test_forgetting, test_old_accuracy,
    intruders and n_layers."""
    df = df[df["status"] == "ok"]
    tasks = list(dict.fromkeys(df["task"]))
    if not tasks:
        raise ValueError("no finished runs to plot; run the sweep first")
    titles = titles or {}
    styles = style_for([v for v in df["variant"].unique() if v != "full"])
    grey = "0.45"  # full fine-tuning
    stats = {"acc": "test_accuracy", "fgt": "test_forgetting", "intr": "intruders"}
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, len(tasks), figsize=(FULL_WIDTH, 5.2), squeeze=False,
                                 constrained_layout=True)
        for col, task in enumerate(tasks):
            sub = df[df["task"] == task]
            g = sub.groupby(["variant", "rank"], dropna=False)
            s = pd.concat({f"{k}{a}": g[c].agg(a) for k, c in stats.items()
                           for a in ("mean", "std")}, axis=1).fillna(0).reset_index()
            top, bottom = axes[0, col], axes[1, col]
            ranks = s.loc[s["variant"] != "full", "rank"].dropna()
            lo, hi = (np.log2(ranks.min()), np.log2(ranks.max())) if len(ranks) else (0, 1)

            def size(r: float, lo: float = lo, hi: float = hi) -> float:
                return 12 + 60 * (np.log2(r) - lo) / max(hi - lo, 1)

            # the panel spans the tuned runs; full FT runs far to their left are listed instead
            x0 = (s["accmean"] - s["accstd"]).min()
            x1 = (s["accmean"] + s["accstd"]).max()
            xlim = (x0 - 0.06 * (x1 - x0) - 0.01, min(1.0, x1 + 0.06 * (x1 - x0) + 0.01))
            ys = [s["fgtmean"] - s["fgtstd"], s["fgtmean"] + s["fgtstd"]]
            top.axhline((sub["test_old_accuracy"] + sub["test_forgetting"]).mean(), color="0.6",
                        lw=0.6, ls="--", zorder=0, label="all old-task accuracy lost")
            if curve is not None and len(c := curve[curve["task"] == task].sort_values("lr")):
                top.plot(c["test_accuracy"], c["test_forgetting"], ls=":", color=grey, lw=0.8,
                         marker=".", zorder=1, label="full FT, every searched lr (seed 0)")
                inside = c["test_accuracy"].between(*xlim)
                ys.append(c.loc[inside, "test_forgetting"])
                shown: list[tuple[float, float]] = []
                for x, y, rate in zip(c["test_accuracy"][inside], c["test_forgetting"][inside],
                                      c["lr"][inside]):
                    if all(abs(x - a) > 0.03 * (xlim[1] - xlim[0]) or abs(y - b) > 0.03
                           for a, b in shown):  # no label on top of another
                        top.annotate(f"{rate:g}", (x, y), fontsize=5, color=grey,
                                     xytext=(2, -6), textcoords="offset points")
                        shown.append((x, y))
                if (~inside).any():
                    off = ", ".join(f"{r:g}" for r in c.loc[~inside, "lr"])
                    top.text(0.02, 0.98, f"full FT at lr {off}: off the panel", fontsize=5,
                             color=grey, transform=top.transAxes, va="top")
            y = pd.concat(ys)
            pad = 0.06 * (y.max() - y.min()) + 0.01
            top.set_xlim(*xlim)
            top.set_ylim(y.min() - pad, y.max() + pad)
            for variant, v in s[s["variant"] != "full"].dropna(subset=["rank"]).groupby("variant"):
                v = v.sort_values("rank")
                st = styles[variant]
                top.errorbar(v["accmean"], v["fgtmean"], xerr=v["accstd"], yerr=v["fgtstd"],
                             color=st["color"], lw=0.7, alpha=0.8, capsize=1.2, zorder=2)
                top.scatter(v["accmean"], v["fgtmean"], s=[size(r) for r in v["rank"]],
                            color=st["color"], marker=st["marker"], zorder=3, linewidths=0,
                            label=variant)
                bottom.errorbar(v["rank"], v["intrmean"], yerr=v["intrstd"], label=variant,
                                capsize=1.5, **st)
            for _, f in s[s["variant"] == "full"].iterrows():
                top.errorbar(f["accmean"], f["fgtmean"], xerr=f["accstd"], yerr=f["fgtstd"],
                             color=grey, marker="*", markersize=10, ls="none", capsize=1.5,
                             zorder=4, label="full fine-tuning (tuned lr)")
                bottom.axhspan(f["intrmean"] - f["intrstd"], f["intrmean"] + f["intrstd"],
                               color="0.85", zorder=0)
                bottom.axhline(f["intrmean"], color=grey, lw=0.8, ls="--", zorder=0,
                               label="full fine-tuning (tuned lr)")
            top.set_title(titles.get(task, task) + " (marker size: rank)")
            top.set_xlabel("new-task test accuracy")
            top.set_ylabel("forgetting: old-task test accuracy lost")
            bottom.set_xscale("log", base=2)
            if len(ranks):
                ticks = sorted({int(r) for r in ranks})
                bottom.set_xticks(ticks, [str(t) for t in ticks])
                bottom.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            bottom.set_xlabel("rank r")
            n = int(sub["n_layers"].max())
            bottom.set_ylabel(f"intruder dimensions (sum over {n} layers)")
            bottom.set_ylim(bottom=0)
        legend_below(fig, axes, max_cols=6)
        return save(fig, stem)
