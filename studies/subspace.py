"""Subspace similarity and amplification: the LoRA paper's Figures 3–4 and §7.3 on digits.

Trains LoRA on the digits task (pretrained on 0–4, adapted to 5–9; fc1 and fc2 adapted, head
frozen) at every rank in --ranks (seed 0) and a second seed at r = 8, then records per layer
  phi             φ(A_r8, A_r64, i, j) = ‖U_iᵀU_j‖²_F / min(i, j), i ≤ 8, j ≤ 64, U the right
                  singular vectors of A (LoRA §7.2, Fig. 3), and φ(A_r8 seed 0, A_r8 seed 1, i, j)
                  (Fig. 4); two random subspaces give φ ≈ max(i, j)/in
  amplification   ‖ΔW‖_F / ‖U_rᵀ W₀ V_r‖_F, U_r, V_r the top-r singular vectors of ΔW (§7.3)
Writes results/subspace.csv (tidy, a `kind` column per record type) and
paper_figures/subspace.{pdf,png}. fc1 has 64 inputs, so there A_r64 spans the whole input
space and φ(·, ·, i, 64) = 1 trivially; fc2 (128 inputs) has no such ceiling.

    python studies/subspace.py               # ranks 1 … 64, 1000 steps: ≈ 2 min
    python studies/subspace.py --quick       # < 30 s smoke run
    python studies/subspace.py --plot-only   # redraw the figure from the CSV
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from matplotlib import ticker

import lowrank as lr
from lowrank import plots, study
from lowrank.train import TrainConfig, train

DEFAULTS = {
    "ranks": [1, 2, 4, 8, 16, 32, 64],
    "small": 8,
    "large": 64,
    "steps": 1000,
    "lr": 1e-2,
    "batch_size": 64,
}
QUICK = {"ranks": [2, 8, 16], "large": 16, "steps": 60}


PRESETS = {"quick": ("smoke run (< 30 s), φ between r = 8 and 16", QUICK)}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = study.parser(__file__, __doc__, defaults=DEFAULTS, presets=PRESETS)
    p.add_common(ranks="LoRA ranks trained at seed 0 (amplification per rank)")
    p.add_argument("--small", type=study.positive_int, help="the small rank of φ (trained at 2 seeds)")
    p.add_argument("--large", type=study.positive_int, help="the large rank of φ")
    p.add_argument("--lr", type=study.learning_rate, help="learning rate of every run")
    p.add_common("steps", "batch_size", "threads")
    args = p.parse_args(argv)
    if args.small > args.large:
        p.error(
            f"--small {args.small} is above --large {args.large}; the small rank of φ must "
            "be at most the large one"
        )
    args.ranks = sorted(set(args.ranks) | {args.small, args.large})
    return args


def run_lora(task, rank: int, seed: int, args: argparse.Namespace) -> tuple[dict, dict]:
    """Train LoRA at ``rank``; return {layer: adapter} and the test metrics."""
    model = lr.inject(task.pretrained(), "lora", targets=task.targets, rank=rank, seed=seed)
    res = train(
        model,
        task,
        TrainConfig(steps=args.steps, lr=args.lr, seed=seed, batch_size=args.batch_size, quiet=True),
    )
    return lr.adapters(model), res.metrics


def phi_rows(a1: dict, a2: dict, pair: str) -> list[dict]:
    rows = []
    for layer in a1:
        A1, A2 = a1[layer].A.detach(), a2[layer].A.detach()
        for i in range(1, min(A1.shape) + 1):
            for j in range(1, min(A2.shape) + 1):
                rows.append(
                    {
                        "kind": "phi",
                        "pair": pair,
                        "layer": layer,
                        "i": i,
                        "j": j,
                        "in_features": A1.shape[1],
                        "phi": lr.analysis.subspace_similarity(A1, A2, i, j),
                    }
                )
    return rows


def figure(df: pd.DataFrame, stem: str | os.PathLike) -> list[Path]:
    """One row per adapted layer: φ(i, j) heat maps for each pair of runs (LoRA paper Figs. 3–4,
    i down, j across, colour 0…1), then the amplification factor ‖ΔW‖_F/‖U_rᵀW₀V_r‖_F vs rank."""
    phi, amp = df[df["kind"] == "phi"], df[df["kind"] == "amplification"]
    layers = list(dict.fromkeys(phi["layer"]))
    pairs = list(dict.fromkeys(phi["pair"]))
    with plots.panels(
        len(layers),
        len(pairs) + 1,
        1.9 * len(layers) + 0.3,
        gridspec_kw={"width_ratios": [2.2] + [1] * len(pairs)},
    ) as (fig, axes):
        image = None
        for row, layer in zip(axes, layers):
            for ax, pair in zip(row, pairs):
                grid = phi[(phi["layer"] == layer) & (phi["pair"] == pair)].pivot(
                    index="i", columns="j", values="phi"
                )
                image = ax.imshow(
                    grid.to_numpy(float),
                    vmin=0,
                    vmax=1,
                    cmap="viridis",
                    aspect="auto",
                    interpolation="nearest",
                    extent=(0.5, grid.columns.max() + 0.5, grid.index.max() + 0.5, 0.5),
                )
                ax.grid(False)
                ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
                ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
                first, second = _runs(pair)
                ax.set_title(f"{layer}: φ, {pair}")
                ax.set_xlabel(f"j: top-j directions of {second}")
                ax.set_ylabel(f"i: top-i directions of {first}")
            ax = row[-1]
            g = amp[(amp["layer"] == layer) & (amp["seed"] == 0)].sort_values("rank")
            ax.plot(g["rank"], g["amplification"], color=plots.OKABE_ITO[0], marker=plots.MARKERS[0])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("rank r")
            ax.set_ylabel(r"$\|\Delta W\|_F / \|U_r^\top W_0 V_r\|_F$")
            ax.set_title(f"{layer}: amplification")
        fig.colorbar(image, ax=axes[:, :-1].ravel().tolist(), label="subspace similarity φ(i, j)", shrink=0.8)
        plots.letter_panels(axes)
        return plots.save(fig, stem)


def _runs(pair: str) -> tuple[str, str]:
    """The two runs a φ pair compares, in words: "r8 vs r64" → ("r = 8", "r = 64"),
    "r8 seed 0 vs 1" → ("seed 0", "seed 1")."""
    a, b = pair.split(" vs ")
    if " seed " in a:
        return f"seed {a.split()[-1]}", f"seed {b}"
    return f"r = {a.removeprefix('r')}", f"r = {b.removeprefix('r')}"


def train_all(args: argparse.Namespace) -> pd.DataFrame:
    """LoRA at every rank (seed 0) and at the small rank again (seed 1); the φ and
    amplification rows."""
    task = lr.tasks.get("digits")
    runs, rows = {}, []
    for rank, seed in [(r, 0) for r in args.ranks] + [(args.small, 1)]:
        t = time.perf_counter()
        ads, metrics = run_lora(task, rank, seed, args)
        runs[rank, seed] = ads
        for layer, ad in ads.items():
            dW, W0 = ad.delta_weight().detach(), ad.base.weight.detach()
            if rank > min(dW.shape):
                continue
            U, _, Vh = torch.linalg.svd(dW.double(), full_matrices=False)
            rows.append(
                {
                    "kind": "amplification",
                    "layer": layer,
                    "rank": rank,
                    "seed": seed,
                    "amplification": lr.analysis.amplification(dW, W0, rank),
                    "dW_norm": float(dW.norm()),
                    "projected_W_norm": float((U[:, :rank].mT @ W0.double() @ Vh[:rank].mT).norm()),
                    "W_norm": float(W0.norm()),
                    "test_accuracy": metrics.get("test_accuracy"),
                    "seconds": time.perf_counter() - t,
                }
            )
        if not args.quiet:
            print(f"r={rank} seed={seed} done ({time.perf_counter() - args.start:.0f} s)", file=sys.stderr)
    rows += phi_rows(runs[args.small, 0], runs[args.large, 0], f"r{args.small} vs r{args.large}")
    rows += phi_rows(runs[args.small, 0], runs[args.small, 1], f"r{args.small} seed 0 vs 1")
    return pd.DataFrame(rows)


def report(df: pd.DataFrame) -> None:
    """Print φ at a few j per pair and layer, and the amplification per rank."""
    phi = df[df["kind"] == "phi"]
    with pd.option_context("display.width", 120):
        for (pair, layer), g in phi.groupby(["pair", "layer"], sort=False):
            grid = g.astype({"i": int, "j": int}).pivot(index="i", columns="j", values="phi")
            cols = [c for c in (1, 2, 4, 8, 16, 32, 64) if c in grid.columns]
            print(f"φ {pair}, {layer}:\n{grid[cols].round(3).to_string()}")
        amp = df[df["kind"] == "amplification"]
        print("amplification ‖ΔW‖_F / ‖U_rᵀ W₀ V_r‖_F by rank:")
        print(
            amp.astype({"rank": int, "seed": int})
            .pivot_table(index=["rank", "seed"], columns="layer", values=["amplification", "test_accuracy"])
            .round(3)
            .to_string()
        )


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    df = study.results(args, lambda: train_all(args), key=None)
    return study.finish(args, figure, df, report=report, write=not args.plot_only)


if __name__ == "__main__":
    sys.exit(main())
