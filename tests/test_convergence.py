"""Dev curves: the mean, range and seed count per (variant, rank) and step are those of the
runs' recorded curves; a study draws ``<figure>_curves`` exactly when its runs evaluated dev
during training; the downstream table states LoRA's curve at the first budget."""

import json

import numpy as np
import pandas as pd
import pytest
from studyutil import load_study

from lowrank import convergence


def rows_with_curves(curves: dict[tuple, list[list[float]]], dataset: str = "trec") -> pd.DataFrame:
    """One row per (variant, rank, seed) → its dev curve [[step, score], …]."""
    return pd.DataFrame(
        [
            {
                "dataset": dataset,
                "task": "text",
                "variant": v,
                "rank": r,
                "seed": s,
                "metric": "accuracy",
                "dev_curve": json.dumps(c),
            }
            for (v, r, s), c in curves.items()
        ]
    )


def test_mean_curves_are_the_mean_and_range_over_seeds_at_each_step():
    rows = rows_with_curves(
        {
            ("lora", 8, 0): [[100, 0.5], [200, 0.7]],
            ("lora", 8, 1): [[100, 0.6], [200, 0.9]],
            ("lora", 8, 2): [[100, 0.7]],  # stopped early: counted at step 100 only
            ("full", np.nan, 0): [[100, 0.4], [200, 0.8]],
        }
    )
    rows.loc[len(rows)] = {"dataset": "trec", "variant": "probe", "seed": 0, "dev_curve": None}
    got = convergence.mean_curves(rows, "dataset").set_index(["variant", "step"])
    assert got.loc[("lora", 100), ["mean", "low", "high", "seeds"]].tolist() == pytest.approx(
        [0.6, 0.5, 0.7, 3]
    )
    assert got.loc[("lora", 200), ["mean", "low", "high", "seeds"]].tolist() == pytest.approx(
        [0.8, 0.7, 0.9, 2]
    )
    assert got.loc[("full", 200), "mean"] == 0.8 and np.isnan(got.loc[("full", 200), "rank"])
    assert "probe" not in got.index.get_level_values("variant")  # no curve: left out


def test_only_runs_evaluated_during_training_count_as_recorded(tmp_path):
    once = rows_with_curves({("lora", 8, 0): [[600, 0.9]]})
    assert not convergence.recorded(once)
    assert not convergence.recorded(once.drop(columns="dev_curve"))
    assert convergence.recorded(rows_with_curves({("lora", 8, 0): [[300, 0.8], [600, 0.9]]}))
    with pytest.raises(ValueError, match="no run recorded a dev curve; run with --eval-every"):
        convergence.curves_figure(once.iloc[:0], tmp_path / "c")


def test_the_downstream_table_states_loras_dev_curve_at_the_first_budget():
    ds = load_study("downstream.py")
    args = ds.parse(["--budgets", "8"])
    rows = rows_with_curves(
        {
            ("lora", 8, 0): [[100, 0.80], [200, 0.84]],
            ("lora", 8, 1): [[100, 0.82], [200, 0.86]],
            ("vera", 384, 0): [[100, 0.5], [200, 0.6]],
        }
    ).assign(
        test_accuracy=0.9,
        test_macro_f1=0.5,
        trainable_params=100,
        lr=1e-2,
        lr_status="interior",
        seconds_per_epoch=1.0,
        peak_mem_mb=1.0,
    )
    md = ds.table(rows, {}, 10_000, args)
    assert (
        "Convergence: LoRA r=8's dev accuracy by training step, mean over 2 seeds: 100 0.810, 200 0.850"
    ) in md
    assert "Convergence" not in ds.table(rows[rows["variant"] != "lora"], {}, 10_000, args)
