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
import sys
import time
from pathlib import Path

import pandas as pd
import torch

import lowrank as lr
from lowrank import plots
from lowrank.sweep import saved_results, write_atomic
from lowrank.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64],
                   help="LoRA ranks trained at seed 0 (amplification per rank)")
    p.add_argument("--small", type=int, default=8, help="the small rank of φ (trained at 2 seeds)")
    p.add_argument("--large", type=int, default=64, help="the large rank of φ")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=None, help="results CSV")
    p.add_argument("--figure", type=Path, default=None, help="figure path without extension")
    p.add_argument("--quick", action="store_true", help="ranks 2 8 16, φ between 8 and 16, 60 steps")
    p.add_argument("--plot-only", action="store_true", help="redraw the figure from the CSV")
    args = p.parse_args(argv)
    if args.quick:
        args.ranks, args.large, args.steps = [2, 8, 16], 16, 60
    name = "subspace_quick" if args.quick else "subspace"
    args.out = args.out or ROOT / "results" / f"{name}.csv"
    args.figure = args.figure or ROOT / "paper_figures" / name
    if min(args.ranks) < 1 or args.steps < 1 or not 1 <= args.small <= args.large:
        p.error("--ranks and --steps must be ≥ 1 and 1 ≤ --small ≤ --large")
    args.ranks = sorted(set(args.ranks) | {args.small, args.large})
    return args


def run_lora(task, rank: int, seed: int, args: argparse.Namespace) -> tuple[dict, dict]:
    """Train LoRA at ``rank``; return {layer: adapter} and the test metrics."""
    model = lr.inject(task.pretrained(), "lora", targets=task.targets, rank=rank, seed=seed)
    res = train(model, task, TrainConfig(steps=args.steps, lr=args.lr, seed=seed,
                                         batch_size=args.batch_size, quiet=True))
    return lr.adapters(model), res.metrics


def phi_rows(a1: dict, a2: dict, pair: str) -> list[dict]:
    rows = []
    for layer in a1:
        A1, A2 = a1[layer].A.detach(), a2[layer].A.detach()
        for i in range(1, min(A1.shape) + 1):
            for j in range(1, min(A2.shape) + 1):
                rows.append({"kind": "phi", "pair": pair, "layer": layer, "i": i, "j": j,
                             "in_features": A1.shape[1],
                             "phi": lr.analysis.subspace_similarity(A1, A2, i, j)})
    return rows


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
                rows.append({"kind": "amplification", "layer": layer, "rank": rank, "seed": seed,
                             "amplification": lr.analysis.amplification(dW, W0, rank),
                             "dW_norm": float(dW.norm()),
                             "projected_W_norm": float((U[:, :rank].mT @ W0.double()
                                                        @ Vh[:rank].mT).norm()),
                             "W_norm": float(W0.norm()),
                             "test_accuracy": metrics.get("test_accuracy"),
                             "seconds": time.perf_counter() - t})
            print(f"r={rank} seed={seed} done ({time.perf_counter() - start:.0f} s)",
                  file=sys.stderr)
        rows += phi_rows(runs[args.small, 0], runs[args.large, 0], f"r{args.small} vs r{args.large}")
        rows += phi_rows(runs[args.small, 0], runs[args.small, 1], f"r{args.small} seed 0 vs 1")
        df = pd.DataFrame(rows)
        write_atomic(df, args.out)
    paths = plots.subspace(df, args.figure)
    phi = df[df["kind"] == "phi"]
    with pd.option_context("display.width", 120):
        for (pair, layer), g in phi.groupby(["pair", "layer"], sort=False):
            grid = g.astype({"i": int, "j": int}).pivot(index="i", columns="j", values="phi")
            cols = [c for c in (1, 2, 4, 8, 16, 32, 64) if c in grid.columns]
            print(f"φ {pair}, {layer}:\n{grid[cols].round(3).to_string()}")
        amp = df[df["kind"] == "amplification"]
        print("amplification ‖ΔW‖_F / ‖U_rᵀ W₀ V_r‖_F by rank:")
        print(amp.astype({"rank": int, "seed": int}).pivot_table(index=["rank", "seed"], columns="layer",
                              values=["amplification", "test_accuracy"]).round(3).to_string())
    print(f"results: {args.out}\nfigure: {', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
