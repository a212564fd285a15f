"""Rank ablation: every variant across ranks and seeds, each at its own dev-tuned learning rate.

Writes one row per run to results/rank_ablation.csv (resumable: re-running skips finished runs)
and draws paper_figures/rank_ablation.{pdf,png}: test metric vs rank, vs trainable parameters,
and the Pareto front, mean ± std over seeds, full fine-tuning as a band. The study itself is
the library's lowrank.ablation (also the `lowrank ablate` command).

    python studies/rank_ablation.py                 # embedded default: synthetic + digits
    python studies/rank_ablation.py --quick         # < 1 min smoke run
    python studies/rank_ablation.py --task text --variants lora full --ranks 8
    python studies/rank_ablation.py --plot-only     # redraw the figure from the CSV
"""

from __future__ import annotations

import sys
from pathlib import Path

from lowrank import ablation


def main(argv: list[str] | None = None) -> int:
    return ablation.main(argv, root=Path(__file__).resolve().parent.parent, prog=Path(__file__).name)


if __name__ == "__main__":
    sys.exit(main())
