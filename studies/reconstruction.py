"""Reconstruction: how close each route to a rank-r matrix gets to the Eckart–Young bound.

For every matrix and rank r it measures the relative error ‖W − Ŵ_r‖_F / ‖W‖_F of
  svd               truncated SVD, exact (this is the Eckart–Young bound itself)
  randomized_svd    truncated SVD by randomized range finding (torch.svd_lowrank)
  gd_uv             gradient descent on ‖W − UVᵀ‖²_F + λ(‖U‖²_F + ‖V‖²_F), λ = c·σ₁
  closed_form       the same objective's optimum Σ_{i≤r} max(σᵢ − λ, 0) uᵢvᵢᵀ (gd_uv's target)
  random_projection W Q Qᵀ, Q an orthonormal basis of a seeded Gaussian (in × r)
  lora_adam         B A from LoRA's init (A kaiming-uniform, B = 0), Adam on ‖W − BA‖²_F
on every Linear weight of all-MiniLM-L6 (a sample by default, --all-layers for all 36) and on
256×256 synthetic spectra (power law σᵢ = i⁻¹, exponential 0.9ⁱ, flat) with random orthogonal
singular vectors. Everything is computed in float64, so the exact SVD meets the bound to
round-off even where it is 1e-6 (0.9ⁱ at r = 128). Writes results/reconstruction.csv (one row
per matrix × method × rank × λ) and paper_figures/reconstruction.{pdf,png}.

    python studies/reconstruction.py                # ≈ 10 min on one core
    python studies/reconstruction.py --quick        # < 30 s smoke run
    python studies/reconstruction.py --all-layers   # every MiniLM Linear (slower)
    python studies/reconstruction.py --plot-only    # redraw the figure from the CSV
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib import ticker

from lowrank import linalg, plots, study
from lowrank.sweep import write_atomic
from lowrank.tasks.text import model_path

SAMPLE = [
    "encoder.layer.0.attention.self.query",
    "encoder.layer.0.intermediate.dense",
    "encoder.layer.5.attention.self.value",
    "encoder.layer.5.output.dense",
]
SPECTRA = {
    "power_law": lambda i: 1.0 / i,
    "exponential": lambda i: 0.9**i,
    "flat": lambda i: torch.ones_like(i),
}
MIN_BOUND = 1e-3  # ratios to an Eckart–Young error below this are left out of the means
DEFAULTS = {
    "ranks": [1, 2, 4, 8, 16, 32, 64, 128],
    "lams": [0.0, 0.01, 0.1],
    "gd_steps": 300,
    "adam_steps": 300,
    "adam_lr": 1e-2,
    "size": 256,
    "seed": 0,
}
QUICK = {"ranks": [1, 4, 16], "size": 48, "gd_steps": 20, "adam_steps": 20}


PRESETS = {"quick": ("smoke run (< 30 s) on the synthetic spectra and one MiniLM matrix", QUICK)}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = study.parser(__file__, __doc__, defaults=DEFAULTS, presets=PRESETS)
    p.add_common("ranks")
    p.add_argument(
        "--lams",
        nargs="+",
        type=float,
        metavar="C",
        help="λ of the Frobenius-regularised objective, as multiples c of σ₁ of each matrix",
    )
    p.add_argument("--gd-steps", type=study.positive_int, help="gradient-descent steps of gd_uv")
    p.add_argument("--adam-steps", type=study.positive_int, help="Adam steps of lora_adam")
    p.add_argument("--adam-lr", type=study.learning_rate, help="Adam's rate (W is first scaled to unit RMS)")
    p.add_argument("--size", type=study.positive_int, help="side of the synthetic matrices")
    p.add_argument(
        "--all-layers",
        action="store_true",
        help="every Linear of all-MiniLM-L6 instead of the four sampled ones",
    )
    p.add_argument("--seed", type=int, help="seed of every random start and projection")
    p.add_common("threads")
    args = p.parse_args(argv)
    if min(args.lams) < 0:
        p.error(f"--lams {min(args.lams):g} is negative; λ/σ₁ must be at least 0")
    return args


def synthetic(kind: str, n: int, seed: int) -> torch.Tensor:
    """n×n matrix with the named spectrum and random orthogonal singular vectors."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    s = SPECTRA[kind](torch.arange(1, n + 1, dtype=torch.float64))
    return (U * s) @ V.mT


def minilm(all_layers: bool, quick: bool) -> dict[str, torch.Tensor]:
    """Linear weights of all-MiniLM-L6, read straight from its safetensors file."""
    from safetensors.torch import load_file

    weights = load_file(model_path() / "model.safetensors")
    names = sorted(
        k[: -len(".weight")]
        for k, v in weights.items()
        if k.endswith(".weight") and v.ndim == 2 and k.startswith("encoder.")
    )
    keep = names if all_layers else SAMPLE[:1] if quick else SAMPLE
    return {f"minilm.{n.removeprefix('encoder.')}": weights[f"{n}.weight"].double() for n in keep}


def lora_adam(W: torch.Tensor, r: int, steps: int, lr: float, seed: int) -> torch.Tensor:
    """B A from LoRA's init (A kaiming-uniform(a=√5), B = 0) after Adam on ‖W − BA‖²_F."""
    scale = W.pow(2).mean().sqrt()
    Wn = W / scale
    torch.manual_seed(seed)
    A = torch.nn.Parameter(torch.empty(r, W.shape[1], dtype=W.dtype))
    torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    B = torch.nn.Parameter(torch.zeros(W.shape[0], r, dtype=W.dtype))
    opt = torch.optim.Adam([A, B], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = (Wn - B @ A).square().mean()
        loss.backward()
        opt.step()
    return (B @ A).detach() * scale


def approximations(W: torch.Tensor, r: int, args: argparse.Namespace):
    """Yield (method, λ/σ₁, Ŵ, seconds) for every route to a rank-r matrix."""
    sigma1 = float(torch.linalg.matrix_norm(W, ord=2))

    def timed(fn):
        t = time.perf_counter()
        X = fn()
        return X, time.perf_counter() - t

    def from_svd(method):
        U, S, Vh = linalg.truncated_svd(W, r, method=method, seed=args.seed)
        return (U * S) @ Vh

    for method in ("exact", "randomized"):
        X, sec = timed(lambda m=method: from_svd(m))
        yield ("svd" if method == "exact" else "randomized_svd"), 0.0, X, sec
    for c in args.lams:
        X, sec = timed(lambda c=c: linalg.fit_uv(W, r, c * sigma1, steps=args.gd_steps, seed=args.seed).X)
        yield "gd_uv", c, X, sec
        X, sec = timed(lambda c=c: linalg.frobenius_lowrank(W, r, c * sigma1))
        yield "closed_form", c, X, sec
    X, sec = timed(lambda: linalg.random_projection_lowrank(W, r, seed=args.seed))
    yield "random_projection", 0.0, X, sec
    X, sec = timed(lambda: lora_adam(W, r, args.adam_steps, args.adam_lr, args.seed))
    yield "lora_adam", 0.0, X, sec


def measure(name: str, kind: str, W: torch.Tensor, args: argparse.Namespace) -> list[dict]:
    norm = float(W.norm())
    rows = []
    for r in [r for r in args.ranks if r <= min(W.shape)]:
        ey = math.sqrt(float(linalg.eckart_young_error(W, r))) / norm
        closed = {}
        for method, c, X, sec in approximations(W, r, args):
            err = float((W - X).norm()) / norm
            if method == "closed_form":
                closed[c] = err
            rows.append(
                {
                    "matrix": name,
                    "kind": kind,
                    "rows": W.shape[0],
                    "cols": W.shape[1],
                    "method": method,
                    "rank": r,
                    "lam_rel": c,
                    "error": err,
                    "eckart_young": ey,
                    "ratio": err / ey if ey > 0 else float("nan"),
                    "seconds": sec,
                    "steps": {"gd_uv": args.gd_steps, "lora_adam": args.adam_steps}.get(method, 0),
                }
            )
        for row in rows:  # gd_uv against its own closed-form optimum at the same λ
            if row["method"] == "gd_uv" and row["rank"] == r:
                row["closed_form_error"] = closed[row["lam_rel"]]
                row["gap_to_closed_form"] = row["error"] - closed[row["lam_rel"]]
    return rows


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Ratio to Eckart–Young per method and λ over matrices and ranks: the mean over the
    points where the bound is at least MIN_BOUND (below it the ratio of two tiny errors says
    little: 300 steps do not reach 1e-6), the median over all, and the mean excess error."""
    big = df[df["eckart_young"] >= MIN_BOUND]
    out = big.groupby(["method", "lam_rel"])["ratio"].agg(["mean", "max", "count"])
    out["median_all"] = df.groupby(["method", "lam_rel"])["ratio"].median()
    out["mean_excess"] = (df["error"] - df["eckart_young"]).groupby([df["method"], df["lam_rel"]]).mean()
    return out.sort_values("mean")


METHOD_LABELS = {
    "svd": "truncated SVD (exact: the bound)",
    "randomized_svd": "randomized SVD",
    "random_projection": "random projection W Q Qᵀ",
    "lora_adam": "LoRA init + Adam",
}
MATRIX_TITLES = {
    "synthetic.power_law": "synthetic σᵢ = 1/i",
    "synthetic.exponential": "synthetic σᵢ = 0.9ⁱ",
    "synthetic.flat": "synthetic σᵢ = 1",
}
MODULES = {"intermediate.dense": "FFN up", "output.dense": "FFN down"}  # MiniLM's BERT names


def _method_label(method: str, lam_rel: float) -> str:
    """How the figure names a method (at λ = ``lam_rel``·σ₁ for the two regularised ones)."""
    lam = "λ = 0" if lam_rel == 0 else f"λ = {lam_rel:g}σ₁"
    if method == "gd_uv":
        return f"GD on UVᵀ + λ‖·‖², {lam}"
    if method == "closed_form":
        return f"closed form ({lam})"
    return METHOD_LABELS.get(method, method)


def _matrix_title(name: str, rows: int, cols: int) -> str:
    """``minilm.layer.0.attention.self.query`` → "MiniLM L0 query, 384×384", the feed-forward
    layers as FFN up and down."""
    short = MATRIX_TITLES.get(name) or (
        name.replace("minilm.layer.", "MiniLM L", 1).replace("attention.self.", "").replace(".", " ", 1)
    )
    for part, plain in MODULES.items():
        short = short.replace(part, plain)
    return f"{short}, {rows}×{cols}"


def figure(df: pd.DataFrame, stem: str | os.PathLike, matrices: Sequence[str] | None = None) -> list[Path]:
    """Relative error ‖W − Ŵ_r‖_F/‖W‖_F vs rank for every matrix of ``df`` (or ``matrices``;
    the Eckart–Young bound a black line, closed forms dashed in their gradient-descent colour),
    then a summary panel: mean ratio to Eckart–Young per method over every matrix and rank where
    the bound is at least ``MIN_BOUND`` (below it the ratio of two tiny errors is dominated by
    the step budget)."""
    if matrices is None:  # the synthetic spectra, then the MiniLM weights, in the CSV's order
        names = list(dict.fromkeys(df["matrix"]))
        matrices = [n for n in names if n.startswith("synthetic.")] + [
            n for n in names if not n.startswith("synthetic.")
        ]
    df = df.assign(label=[_method_label(m, c) for m, c in zip(df["method"], df["lam_rel"])])
    lams = sorted(df.loc[df["method"] == "gd_uv", "lam_rel"].unique())
    gd = [_method_label("gd_uv", c) for c in lams]
    others = [
        m for m in ("svd", "randomized_svd", "random_projection", "lora_adam") if m in set(df["method"])
    ]
    palette = [c for c in plots.OKABE_ITO if c != "#000000"]  # black is the Eckart–Young line
    styles = {
        lab: {"color": palette[i % len(palette)], "marker": plots.MARKERS[i]}
        for i, lab in enumerate([_method_label(m, 0.0) for m in others] + gd)
    }
    for c, g in zip(lams, gd):
        styles[_method_label("closed_form", c)] = {
            "color": styles[g]["color"],
            "ls": "--",
            "marker": "",
            "lw": 0.8,
        }
    svd = _method_label("svd", 0.0)
    if svd in styles:
        styles[svd] |= {"ls": "", "marker": "o", "mfc": "none", "markersize": 6}
    cols = 3
    rows = -(-len(matrices) // cols)
    free = rows * cols - len(matrices)  # empty slots of the last row: the legend goes there
    with plots.panels(
        rows + 1, cols, 1.9 * rows + 1.9, gridspec_kw={"height_ratios": [1] * rows + [1.15]}
    ) as (fig, axes):
        flat = list(axes.ravel())
        for ax, name in zip(flat, matrices):
            sub = df[df["matrix"] == name]
            ey = sub.groupby("rank")["eckart_young"].first()
            ax.plot(ey.index, ey.to_numpy(), color="black", lw=1.6, label="Eckart–Young bound", zorder=1)
            for lab, st in styles.items():
                g = sub[sub["label"] == lab].sort_values("rank")
                if len(g) and not (g["method"].iloc[0] == "closed_form" and g["lam_rel"].iloc[0] == 0):
                    ax.plot(g["rank"], g["error"], label=lab, zorder=2, **st)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(_matrix_title(name, sub["rows"].iloc[0], sub["cols"].iloc[0]))
            ax.set_xlabel("rank r")
            ax.set_ylabel(r"$\|W-\hat W_r\|_F/\|W\|_F$")
        gs = axes[0, 0].get_subplotspec().get_gridspec()
        for extra in flat[len(matrices) :]:
            extra.remove()
        drawn = flat[: len(matrices)]
        blank = fig.add_subplot(gs[rows - 1, cols - free :]) if free else None
        ax = fig.add_subplot(gs[rows, 1:])  # its method names reach into the empty first column
        mean = df[df["eckart_young"] >= MIN_BOUND].groupby("label")["ratio"].mean()
        order = [lab for lab in styles if lab in mean.index]
        ax.barh(
            range(len(order)), [mean[lab] for lab in order], color=[styles[lab]["color"] for lab in order]
        )
        ax.set_yticks(range(len(order)), order)
        ax.invert_yaxis()
        for y, lab in enumerate(order):
            ax.annotate(
                f"{mean[lab]:.3f}",
                (mean[lab], y),
                xytext=(2, 0),
                fontsize=6,
                textcoords="offset points",
                va="center",
            )
        ax.axvline(1.0, color="black", lw=1.0)
        ax.set_xscale("log")
        ax.set_xlim(0.9, mean.max() * 2)
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel(f"mean error / Eckart–Young error (where the bound ≥ {MIN_BOUND:g})")
        ax.set_ylabel("method")
        ax.yaxis.set_in_layout(False)
        ax.set_title("every matrix and rank: ratio to the bound")
        plots.letter_panels([*drawn, ax])
        if blank is not None:
            plots.legend_in(blank, drawn, ncol=free)
        else:
            plots.legend_below(fig, np.array(drawn), max_cols=3)
        return plots.save(fig, stem)


def measure_all(args: argparse.Namespace) -> pd.DataFrame:
    """Every matrix's rows, the CSV rewritten after each matrix."""
    matrices = {f"synthetic.{k}": ("synthetic", synthetic(k, args.size, args.seed)) for k in SPECTRA}
    matrices |= {n: ("minilm", W) for n, W in minilm(args.all_layers, args.quick).items()}
    rows = []
    for name, (kind, W) in matrices.items():
        rows += measure(name, kind, W, args)
        write_atomic(pd.DataFrame(rows), args.out)
        if not args.quiet:
            print(f"{name} {tuple(W.shape)} done ({time.perf_counter() - args.start:.0f} s)", file=sys.stderr)
    return pd.DataFrame(rows)


def report(df: pd.DataFrame) -> None:
    """Print the ratios to Eckart–Young (:func:`summary`) and gd_uv's gap to its closed form."""
    with pd.option_context("display.width", 120):
        print("ratio of ‖W − Ŵ_r‖_F to the Eckart–Young error (1 = optimal)")
        print(summary(df).round(4).to_string())
        gd = df[df["method"] == "gd_uv"]
        print("gd_uv − closed form (relative error), by λ/σ₁:")
        print(gd.groupby("lam_rel")["gap_to_closed_form"].agg(["mean", "max"]).to_string())


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    df = study.results(args, lambda: measure_all(args), key=None)
    return study.finish(args, figure, df, report=report)


if __name__ == "__main__":
    sys.exit(main())
