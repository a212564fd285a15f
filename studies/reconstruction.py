"""Reconstruction: how close each route to a rank-r matrix gets to the Eckart–Young bound.

For every matrix and rank r it measures the relative error ‖W − Ŵ_r‖_F / ‖W‖_F of
  svd               truncated SVD, exact (this is the Eckart–Young bound itself)
  randomized_svd    truncated SVD by randomized range finding (torch.svd_lowrank)
  gd_uv             seed 000: gradient descent on ‖W − UVᵀ‖²_F + λ(‖U‖²_F + ‖V‖²_F), λ = c·σ₁
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
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from lowrank import linalg, plots
from lowrank.sweep import saved_results, write_atomic
from lowrank.tasks.text import model_path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ["encoder.layer.0.attention.self.query", "encoder.layer.0.intermediate.dense",
          "encoder.layer.5.attention.self.value", "encoder.layer.5.output.dense"]
SPECTRA = {"power_law": lambda i: 1.0 / i, "exponential": lambda i: 0.9**i,
           "flat": lambda i: torch.ones_like(i)}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64, 128])
    p.add_argument("--lams", nargs="+", type=float, default=[0.0, 0.01, 0.1],
                   help="λ of the seed-000 objective, as multiples of σ₁ of each matrix")
    p.add_argument("--gd-steps", type=int, default=300, help="gradient-descent steps of gd_uv")
    p.add_argument("--adam-steps", type=int, default=300, help="Adam steps of lora_adam")
    p.add_argument("--adam-lr", type=float, default=1e-2,
                   help="Adam learning rate (W is scaled to unit RMS entries first)")
    p.add_argument("--size", type=int, default=256, help="side of the synthetic matrices")
    p.add_argument("--all-layers", action="store_true",
                   help="every Linear of all-MiniLM-L6 instead of the four sampled ones")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=None, help="results CSV")
    p.add_argument("--figure", type=Path, default=None, help="figure path without extension")
    p.add_argument("--quick", action="store_true",
                   help="48×48 synthetic + one MiniLM matrix, ranks 1 4 16, 20 steps (< 30 s)")
    p.add_argument("--plot-only", action="store_true", help="redraw the figure from the CSV")
    args = p.parse_args(argv)
    if args.quick:
        args.ranks, args.size, args.gd_steps, args.adam_steps = [1, 4, 16], 48, 20, 20
    name = "reconstruction_quick" if args.quick else "reconstruction"
    args.out = args.out or ROOT / "results" / f"{name}.csv"
    args.figure = args.figure or ROOT / "paper_figures" / name
    if min(args.ranks) < 1 or args.gd_steps < 1 or args.adam_steps < 1 or min(args.lams) < 0:
        p.error("--ranks, --gd-steps and --adam-steps must be ≥ 1 and --lams ≥ 0")
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
    names = sorted(k[:-len(".weight")] for k, v in weights.items()
                   if k.endswith(".weight") and v.ndim == 2 and k.startswith("encoder."))
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
        X, sec = timed(lambda c=c: linalg.fit_uv(W, r, c * sigma1, steps=args.gd_steps,
                                                 seed=args.seed).X)
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
            rows.append({"matrix": name, "kind": kind, "rows": W.shape[0], "cols": W.shape[1],
                         "method": method, "rank": r, "lam_rel": c, "error": err,
                         "eckart_young": ey, "ratio": err / ey if ey > 0 else float("nan"),
                         "seconds": sec,
                         "steps": {"gd_uv": args.gd_steps, "lora_adam": args.adam_steps}.get(method, 0)})
        for row in rows:  # gd_uv against its own closed-form optimum at the same λ
            if row["method"] == "gd_uv" and row["rank"] == r:
                row["closed_form_error"] = closed[row["lam_rel"]]
                row["gap_to_closed_form"] = row["error"] - closed[row["lam_rel"]]
    return rows


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Ratio to Eckart–Young per method and λ over matrices and ranks: the mean over the
    points where the bound is at least MIN_BOUND (below it the ratio of two tiny errors says
    little: 300 steps do not reach 1e-6), the median over all, and the mean excess error."""
    big = df[df["eckart_young"] >= plots.MIN_BOUND]
    out = big.groupby(["method", "lam_rel"])["ratio"].agg(["mean", "max", "count"])
    out["median_all"] = df.groupby(["method", "lam_rel"])["ratio"].median()
    out["mean_excess"] = (df["error"] - df["eckart_young"]).groupby(
        [df["method"], df["lam_rel"]]).mean()
    return out.sort_values("mean")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.plot_only:
        try:
            df = saved_results(args.out, key=None)
        except FileNotFoundError as e:
            print(f"{e}; run without --plot-only first", file=sys.stderr)
            return 1
    else:
        start = time.perf_counter()
        matrices = {f"synthetic.{k}": ("synthetic", synthetic(k, args.size, args.seed))
                    for k in SPECTRA}
        matrices |= {n: ("minilm", W) for n, W in minilm(args.all_layers, args.quick).items()}
        rows = []
        for name, (kind, W) in matrices.items():
            rows += measure(name, kind, W, args)
            df = pd.DataFrame(rows)
            write_atomic(df, args.out)
            print(f"{name} {tuple(W.shape)} done ({time.perf_counter() - start:.0f} s)",
                  file=sys.stderr)
    paths = plots.reconstruction(df, args.figure)
    with pd.option_context("display.width", 120):
        print("ratio of ‖W − Ŵ_r‖_F to the Eckart–Young error (1 = optimal)")
        print(summary(df).round(4).to_string())
        gd = df[df["method"] == "gd_uv"]
        print("gd_uv − closed form (relative error), by λ/σ₁:")
        print(gd.groupby("lam_rel")["gap_to_closed_form"].agg(["mean", "max"]).to_string())
    print(f"results: {args.out}\nfigure: {', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
