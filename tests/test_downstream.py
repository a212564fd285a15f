"""The downstream text study: budget matching against a brute-force count, and --quick end to end."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from studyutil import load_study

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "studies" / "downstream.py"


def study():
    return load_study("downstream.py")


@pytest.mark.parametrize("variant", ["lora", "dora", "vera", "loha", "lokr", "random_alignment",
                                     "adalora", "pissa"])
@pytest.mark.parametrize("shapes", [[(24, 16)] * 3, [(24, 16), (16, 40)]])
def test_matched_rank_is_the_closest_count_found_by_scanning_every_rank(variant, shapes):
    ds = study()
    budget = ds.adapter_params("lora", shapes, 3)
    counts = {r: ds.adapter_params(variant, shapes, r) for r in range(1, 17)}
    counts = {r: n for r, n in counts.items() if n is not None}
    gap = min(abs(n - budget) for n in counts.values())
    best = max(r for r, n in counts.items() if abs(n - budget) == gap)  # ties: the larger rank
    assert ds.matched_rank(variant, shapes, budget) == best


def test_adapter_params_counts_what_inject_trains():
    """The budget arithmetic (meta-device adapters on bare Linears) against a real injection."""
    import torch
    from torch import nn

    import lowrank as lr

    ds = study()
    for variant in ("lora", "dora", "vera", "lokr", "pissa"):
        model = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 16), nn.Linear(16, 2))
        torch.manual_seed(0)
        lr.inject(model, variant, targets=["0", "1"], rank=4)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert ds.adapter_params(variant, [(24, 16), (16, 24)], 4) == trained, variant


def test_quick_run_writes_csv_table_and_figure_and_redraws(tmp_path):
    out, table, fig = tmp_path / "d.csv", tmp_path / "d.md", tmp_path / "d"
    args = ["--quick", "--quiet", "--workers", "1", "--out", str(out), "--table", str(table),
            "--figure", str(fig)]
    res = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    df = pd.read_csv(out)
    assert set(df["variant"]) == {"lora", "vera", "probe"} and (df["status"] == "ok").all()
    runs = df[df["variant"] != "probe"]
    assert runs["weights"].notna().all()  # spectra recorded for studies/spectra.py
    # VeRA cannot reach LoRA r=2's budget on 384×384 layers (r + out per layer): its largest rank
    assert set(runs.loc[runs["variant"] == "vera", "rank"]) == {384}
    md = table.read_text()
    assert "| vera | 384 | budget of LoRA r=2 (closest it can reach) |" in md
    assert "| probe | — | baseline |" in md
    assert "† the best of the searched learning rates (0.003) is at the edge" in md
    for ext in ("pdf", "png"):
        assert fig.with_suffix(f".{ext}").stat().st_size > 10_000
    assert b"/FontFile2" in fig.with_suffix(".pdf").read_bytes()
    fig.with_suffix(".png").unlink()
    res = subprocess.run([sys.executable, str(SCRIPT), *args, "--plot-only"], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert fig.with_suffix(".png").exists() and len(pd.read_csv(out)) == len(df)


def test_help_and_bad_input():
    res = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    for flag in ("--budgets", "--ranks", "--paper", "--quick", "--plot-only", "--lr-grid"):
        assert flag in res.stdout
    res = subprocess.run([sys.executable, str(SCRIPT), "--variants", "lorax"], capture_output=True,
                         text=True)
    assert res.returncode == 2 and "unknown variant 'lorax'; choose from adalora" in res.stderr


def test_paper_preset_gives_each_variant_its_grid_and_groups_batches_by_length():
    ds = study()
    args = ds.parse(["--paper"])
    assert ds.lr_grid(args, "full") == [3e-5, 1e-4, 3e-4]
    assert ds.lr_grid(args, "vera") == [3e-3, 1e-2, 3e-2]
    assert ds.lr_grid(args, "dora") == [1e-3, 3e-3, 1e-2]
    assert ds.parse(["--paper", "--lr-grid", "1e-3", "1e-2"]).lr_grid == {"*": [1e-3, 1e-2]}
    assert not ds.parse([]).group_by_length
    assert ds.parse(["--paper", "--no-group-by-length"]).group_by_length is False
    specs, _, _ = ds.plan(ds.parse(["--paper", "--variants", "lora", "full", "--ranks"]))
    assert [s.train["group_by_length"] for s in specs] == [True] * 4  # 2 datasets × 2 methods
    assert not any("group_by_length" in s.train for s in ds.plan(ds.parse(["--quick"]))[0])
    rows = pd.DataFrame({"dataset": "trec", "variant": ["full", "dora", "vera"],
                         "rank": [None, 8, 384], "seed": 0, "test_accuracy": [0.9, 0.8, 0.7],
                         "test_macro_f1": 0.5, "trainable_params": 100, "lr": [3e-5, 3e-3, 1e-2],
                         "seconds_per_epoch": 1.0, "peak_mem_mb": 1.0})
    md = ds.table(rows, {}, 10_000, args)
    assert "| 3e-05† |" in md and "| 0.003 |" in md and "| 0.01 |" in md  # edges of own grid
    assert "its variant's grid (full: 3e-05, 0.0001, 0.0003; vera:" in md


def test_seconds_per_epoch_is_the_median_over_seeds():
    ds = study()
    rows = pd.DataFrame({"dataset": "trec", "variant": "lora", "rank": 8, "seed": [0, 1, 2],
                         "test_accuracy": 0.8, "test_macro_f1": 0.8, "trainable_params": 10,
                         "lr": 1e-3, "seconds_per_epoch": [60.0, 62.0, 150.0],  # one run slowed
                         "peak_mem_mb": 1.0})
    assert "| 62 | 1 | 3 |" in ds.table(rows, {}, 1000, ds.parse(["--lr-grid", "1e-4", "1e-3",
                                                                 "1e-2"]))
