"""The downstream text study: budget matching against a brute-force count, and --quick end to end."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from studyutil import assert_figure, load_study

from lowrank.sweep import encode_correct, read_results

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "studies" / "downstream.py"


def study():
    return load_study("downstream.py")


@pytest.mark.parametrize(
    "variant", ["lora", "dora", "vera", "loha", "lokr", "random_alignment", "adalora", "pissa"]
)
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
    args = [
        "--quick",
        "--quiet",
        "--workers",
        "1",
        "--out",
        str(out),
        "--table",
        str(table),
        "--figure",
        str(fig),
    ]
    res = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    df = pd.read_csv(out)
    assert set(df["variant"]) == {"lora", "vera", "probe"} and (df["status"] == "ok").all()
    runs = df[df["variant"] != "probe"]
    assert runs["weights"].notna().all()  # spectra recorded for studies/spectra.py
    # VeRA cannot reach LoRA r=2's budget on 384×384 layers (r + out per layer): its largest rank
    assert set(runs.loc[runs["variant"] == "vera", "rank"]) == {384}
    md = table.read_text()
    assert "| VeRA | 384 | budget of LoRA r=2 (closest it can reach) |" in md
    assert "| linear probe | — | baseline |" in md
    assert "† the best of the searched learning rates is at the edge of those tried (the grid 0.003)." in md
    assert "Test set: 48 sentences." in md  # --max-eval 48 of TREC's 538
    # where every choice sits among the rates tried, under the table and once in the output
    summary = re.search(r"\n\n(\d+ learning-rate choices: .*)\.\n$", md)
    assert summary and res.stdout.count(summary[1]) == 1
    assert re.fullmatch(
        r"(\d+) learning-rate choices: \1 with a single rate; \1 search runs at seed 0, 1 rate each",
        summary[1],
    )
    for ext in ("pdf", "png"):
        assert fig.with_suffix(f".{ext}").stat().st_size > 10_000
    assert b"/FontFile2" in fig.with_suffix(".pdf").read_bytes()
    fig.with_suffix(".png").unlink()
    res = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--plot-only"], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert fig.with_suffix(".png").exists() and len(pd.read_csv(out)) == len(df)
    assert table.read_text() == md
    # an epoch is the training split, which can hold fewer sentences than --max-train asks for
    quick = study().parse(args)
    rows = study().reported(read_results(out), study().plan(quick)[0], quick, {"trec": 16})
    runs = rows[rows["variant"] != "probe"]
    assert len(runs) == 2 and (runs["epochs"] == 4 * 16 / 16).all()  # 4 steps × 16, 16 sentences
    assert np.allclose(runs["seconds_per_epoch"], runs["train_seconds"] / 4)

    # --intervals: the same plan with per-example predictions (new runs beside the old ones)
    res = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--intervals"], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    new = read_results(out)
    assert len(new) == len(df) + 2 and new["test_correct"].notna().sum() == 2
    assert {len(c) for c in new["test_correct"].dropna()} == {48}  # every test sentence
    shown = table.read_text()
    assert "| test accuracy | Δ vs LoRA [95 % CI] | p (Holm) | test macro-F1 |" in shown
    assert re.search(r"\| LoRA \| 2 \| budget of LoRA r=2 \|.*\| reference \| — \|", shown)
    assert re.search(
        r"\| VeRA \| 384 \|.*\| [+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\] \| "
        r"(\d\.\d{3}|< 0\.001)\*? \|",
        shown,
    )
    assert_figure(fig.with_name("d_intervals"))
    # without the flag the table is drawn from the runs without predictions, as before
    res = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--plot-only"], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0 and table.read_text() == md, res.stderr[-3000:]

    # --budget-check: LoRA again at its chosen rate for twice the steps; the table says the gain
    res = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--intervals", "--budget-check"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    longer = read_results(tmp_path / "d_budget.csv")
    assert len(read_results(out)) == len(new)  # nothing added to the study's own CSV
    assert longer[["variant", "rank", "seed", "steps", "lr"]].values.tolist() == [["lora", 2, 0, 8, 3e-3]]
    reference = new[(new["variant"] == "lora") & new["test_correct"].notna()].iloc[0]
    line = (
        f"Budget check: trained for 8 steps instead of 4 at the same learning rate, LoRA r=2 "
        f"reaches dev {longer['dev_accuracy'][0]:.3f} and test {longer['test_accuracy'][0]:.3f}, "
        f"against {reference['dev_accuracy']:.3f} and {reference['test_accuracy']:.3f} (1 seed); "
        f"test Δ {100 * (longer['test_accuracy'][0] - reference['test_accuracy']):+.1f} ["
    )
    assert line in table.read_text()


def test_help_and_bad_input():
    res = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    for flag in ("--budgets", "--ranks", "--paper", "--quick", "--plot-only", "--lr-grid"):
        assert flag in res.stdout
    res = subprocess.run([sys.executable, str(SCRIPT), "--variants", "lorax"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown variant 'lorax'; choose from adalora" in res.stderr


def test_paper_preset_searches_each_variant_around_its_own_centre_and_groups_batches_by_length():
    ds = study()
    args = ds.parse(["--paper"])
    assert ds.lr_grid(args, "full") == [9.48683e-5, 3e-4, 9.48683e-4]  # 1e-2 × 0.03
    assert ds.lr_grid(args, "vera") == [9.48683e-3, 3e-2, 9.48683e-2]  # 1e-2 × 3
    assert ds.lr_grid(args, "dora") == [3.16228e-3, 1e-2, 3.16228e-2]
    assert ds.lr_grid(ds.parse(["--paper", "--lr-grid", "1e-3", "1e-2"]), "full") == [1e-3, 1e-2]
    assert not ds.parse([]).group_by_length
    # --paper checks its budget: LoRA r=8 also at 1,200 steps, in a CSV --fresh also sets aside
    assert args.budget_check and not ds.parse([]).budget_check
    assert args.budget_out == args.out.with_name("downstream_paper_budget.csv")
    assert args.resumes == [args.out, args.budget_out] and ds.parse([]).resumes == [ds.parse([]).out]
    assert ds.parse(["--paper", "--no-group-by-length"]).group_by_length is False
    specs, _, _, references = ds.plan(ds.parse(["--paper", "--variants", "lora", "full", "vera", "--ranks"]))
    assert [s.train["group_by_length"] for s in specs] == [True] * 6  # 2 datasets × 3 methods
    assert references == {("full", None): 8, ("vera", 384): 8}  # each against LoRA at r = 8
    assert {s.measure for s in specs} == {("weights", "predictions")}  # --paper: --intervals
    plain = ds.plan(ds.parse(["--variants", "lora", "--ranks"]))[0]
    assert {s.measure for s in plain} == {("weights",)}
    assert not any("group_by_length" in s.train for s in ds.plan(ds.parse(["--quick"]))[0])
    rows = pd.DataFrame(
        {
            "dataset": "trec",
            "variant": ["full", "dora", "vera"],
            "rank": [None, 8, 384],
            "seed": 0,
            "test_accuracy": [0.9, 0.8, 0.7],
            "test_macro_f1": 0.5,
            "trainable_params": 100,
            "lr": [3e-5, 3e-3, 1e-2],
            "lr_status": ["low edge", "interior", "interior"],
            "seconds_per_epoch": 1.0,
            "peak_mem_mb": 1.0,
        }
    )
    md = ds.table(rows, {}, 10_000, args)
    assert "| 3e-05† |" in md and "| 0.003 |" in md and "| 0.01 |" in md  # edges of what was tried
    assert "(--lr-grid auto: 3 rates half a decade apart around 0.01 × the variant's lr_scale)" in md


def test_seconds_per_epoch_is_the_median_over_seeds():
    ds = study()
    rows = pd.DataFrame(
        {
            "dataset": "trec",
            "variant": "lora",
            "rank": 8,
            "seed": [0, 1, 2],
            "test_accuracy": 0.8,
            "test_macro_f1": 0.8,
            "trainable_params": 10,
            "lr": 1e-3,
            "lr_status": "interior",
            "seconds_per_epoch": [60.0, 62.0, 150.0],  # one run slowed
            "peak_mem_mb": 1.0,
        }
    )
    assert "| 62 | 1 | 3 |" in ds.table(rows, {}, 1000, ds.parse(["--lr-grid", "1e-4", "1e-3", "1e-2"]))


def scored_rows(correct: dict) -> pd.DataFrame:
    """Table rows of one dataset with ``test_correct``: {(variant, rank): [scores per seed]}."""
    rows = [
        {
            "dataset": "movies",
            "variant": v,
            "rank": r,
            "seed": seed,
            "test_correct": encode_correct(c),
            "test_accuracy": 0.8,
            "test_macro_f1": 0.5,
            "trainable_params": 100,
            "lr": 1e-2,
            "lr_status": "interior",
            "seconds_per_epoch": 1.0,
            "peak_mem_mb": 1.0,
        }
        for (v, r), seeds in correct.items()
        for seed, c in enumerate(seeds)
    ]
    return pd.DataFrame(rows)


def test_differences_from_lora_are_zero_for_identical_predictions_and_marked_for_a_planted_gap(tmp_path):
    ds = study()
    rng = np.random.default_rng(0)
    lora = [rng.random(2000) < 0.8 for _ in range(3)]
    better = []
    for c in lora:  # 100 of the examples LoRA gets wrong made right: +5 points in every seed
        c = c.copy()
        c[rng.choice(np.flatnonzero(~c), 100, replace=False)] = True
        better.append(c)
    rows = scored_rows(
        {
            ("lora", 8): lora,
            ("dora", 8): [c.copy() for c in lora],
            ("vera", 384): better,
            ("loha", 8): lora[:2],
        }
    )
    references = {("dora", 8): 8, ("vera", 384): 8, ("loha", 8): 8, ("full", None): 8}
    diffs = ds.comparisons(rows, references).set_index("variant")
    assert set(diffs.index) == {"dora", "vera", "loha"}  # full has no runs here
    assert diffs.loc["dora", ["diff", "low", "high"]].tolist() == [0.0, 0.0, 0.0]
    assert diffs.loc["dora", "p_holm"] == 1.0 and not diffs.loc["dora", "significant"]
    assert diffs.loc["loha", "seeds"] == 2 and diffs.loc["loha", "diff"] == 0.0  # paired seeds only
    assert diffs.loc["vera", "diff"] == pytest.approx(5.0, abs=1e-9)  # 100/2000 exactly, in points
    assert 0 < diffs.loc["vera", "low"] < 5.0 < diffs.loc["vera", "high"]
    # no replicate reaches 0: p = 1/(1 + 10,000) before Holm's factor of 3
    assert diffs.loc["vera", "p_holm"] == pytest.approx(3 / 10_001) and diffs.loc["vera", "significant"]
    args = ds.parse(["--lr-grid", "1e-2"])
    md = ds.table(rows, {}, 10_000, args, ds.comparisons(rows, references))
    assert "| DoRA | 8 |  | 100 | 1.000 | 0.800 ± 0.000 | +0.0 [+0.0, +0.0] | 1.000 | 0.500 ±" in md
    assert re.search(r"\| VeRA \| 384 \|.*\| \+5\.0 \[\+\d\.\d, \+\d\.\d\] \| < 0\.001\* \|", md)
    assert "| LoRA | 8 |" in md and "| reference | — |" in md
    assert "Holm-adjusted over the 3 comparisons of each dataset; * p < 0.05." in md
    plain = rows.drop(columns="test_correct")  # runs without predictions: the table as before
    assert ds.table(plain, {}, 10_000, args, ds.comparisons(plain, references)) == ds.table(
        plain, {}, 10_000, args
    )
    assert "Δ vs LoRA" not in ds.table(plain, {}, 10_000, args)
    paths = ds.figure(rows, tmp_path / "d", diffs=ds.comparisons(rows, references))
    assert [p.name for p in paths] == ["d.pdf", "d.png", "d_intervals.pdf", "d_intervals.png"]
    assert_figure(tmp_path / "d_intervals")


def test_budget_gain_pairs_seeds_and_bounds_a_planted_gain():
    """Trained longer, LoRA is right on 100 more of 2,000 test sentences at each of 2 seeds (+5
    points): the interval holds +5 and excludes 0; a seed only the longer runs have is left out."""
    ds = study()
    args = ds.parse(["--budgets", "8"])
    rng = np.random.default_rng(0)
    short, long_ = [], []
    for seed in (0, 1):
        base = (rng.random(2000) < 0.8).astype(int)
        gained = base.copy()
        gained[np.flatnonzero(base == 0)[:100]] = 1
        common = {"variant": "lora", "rank": 8, "seed": seed, "dev_accuracy": 0.7 + seed / 10}
        short.append(
            {
                **common,
                "dataset": "trec",
                "steps": 600,
                "test_accuracy": base.mean(),
                "test_correct": encode_correct(base),
            }
        )
        long_.append(
            {**common, "steps": 1200, "test_accuracy": gained.mean(), "test_correct": encode_correct(gained)}
        )
    long_.append({**long_[0], "seed": 2})
    longer = pd.DataFrame(long_).assign(status="ok", task_options='{"dataset": "trec"}')
    g = ds.budget_gain(pd.DataFrame(short), longer, args).iloc[0]
    assert (g["steps"], g["long_steps"], g["seeds"]) == (600, 1200, 2)
    assert g["diff"] == pytest.approx(5.0, abs=1e-9) and g["low"] > 0 and g["low"] < 5 < g["high"]
    assert g["dev"] == g["dev_long"] == pytest.approx(0.75)
    assert ds.budget_gain(pd.DataFrame(short), longer.iloc[2:], args).empty  # no seed in common


def test_the_auto_grid_and_the_extension_are_what_the_table_says():
    ds = study()
    args = ds.parse(["--lr-extend", "2"])
    assert ds.lr_grid(args, "lora") == [3.16228e-3, 1e-2, 3.16228e-2]
    rows = pd.DataFrame(
        {
            "dataset": "trec",
            "variant": ["full", "lora"],
            "rank": [None, 8],
            "seed": 0,
            "test_accuracy": 0.9,
            "test_macro_f1": 0.5,
            "trainable_params": 100,
            "lr": [3e-5, 0.316228],
            "lr_status": ["interior", "high edge"],
            "seconds_per_epoch": 1.0,
            "peak_mem_mb": 1.0,
        }
    )
    md = ds.table(rows, {}, 10_000, args)
    assert "| 3e-05 |" in md and "| 0.32† |" in md  # edges of the rates tried, not of the grid
    assert (
        "† the best of the searched learning rates is at the edge of those tried (--lr-grid "
        "auto: 3 rates half a decade apart around 0.01 × the variant's lr_scale). A search "
        "whose best rate was at an edge stepped past it, up to 2 times;"
    ) in md
    # with every rate interior there is no † in the table, so no † footnote: only how it searched
    interior = ds.table(rows.assign(lr_status="interior"), {}, 10_000, args)
    assert "†" not in interior
    assert (
        "Learning rates searched on dev: --lr-grid auto: 3 rates half a decade apart around 0.01 × "
        "the variant's lr_scale. A search whose best rate was at an edge stepped past it, up to 2 times."
    ) in interior


def test_the_table_says_each_test_set_size_and_marks_a_flat_search():
    """A test split smaller than --max-eval asks for (TREC's 538 of 1,000) is said under its
    heading; a flat search's rate is marked ‡ with its own footnote, not † (an edge)."""
    ds = study()
    args = ds.parse(["--max-eval", "1000"])
    rows = pd.DataFrame(
        {
            "dataset": ["movies", "movies", "trec"],
            "variant": ["lora", "lokr", "lora"],
            "rank": [8, 8, 8],
            "seed": 0,
            "test_accuracy": 0.9,
            "test_macro_f1": 0.5,
            "trainable_params": 100,
            "lr": [1e-2, 3e-3, 1e-2],
            "lr_status": ["interior", "flat", "low edge"],
            "seconds_per_epoch": 1.0,
            "peak_mem_mb": 1.0,
        }
    )
    md = ds.table(rows, {}, 10_000, args, test_sizes={"movies": 1000, "trec": 538})
    assert "### movies\n\nTest set: 1,000 sentences.\n" in md
    assert "### trec\n\nTest set: 538 sentences (its whole test split: fewer than the 1,000 asked for)." in md
    assert "| 0.003‡ |" in md and "| 0.01† |" in md and "| 0.01 |" in md
    assert "‡ every learning rate the search tried gave the same dev accuracy" in md
    assert "‡" not in ds.table(rows[rows["lr_status"] != "flat"], {}, 10_000, args)
