"""The spectra study end to end (--quick, with another sweep's CSV folded in), and the rank
bounds of the learned updates it reports."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from studyutil import assert_figure, load_study

from lowrank.sweep import RunSpec, tuned_sweep

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "studies" / "spectra.py"
# σᵢ/σ₁ above which a direction counts. A float32 product of rank-r factors is rank r up to
# rounding, σ_{r+1}/σ₁ of the order of u = 6e-8 (at most 4e-8 over the 144 bounded layers of the
# default run): 250× headroom, while a direction the bound rules out but the adapter had learned
# would stand orders of magnitude above 1e-5.
TOL = 1e-5


def study():
    return load_study("spectra.py")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    d = tmp_path_factory.mktemp("spectra")
    other = d / "other.csv"  # a real sweep of another task, two learning rates, weights measured
    tuned_sweep(
        [
            RunSpec(
                "synthetic", "lora", 2, 0, 0.0, train={"steps": 40, "batch_size": 32}, measure=("weights",)
            )
        ],
        [1e-2, 1e-1],
        [0],
        other,
        progress=False,
    )
    out, fig = d / "sp.csv", d / "sp"
    res = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--quiet",
            "--workers",
            "1",
            "--include",
            str(other),
            "--out",
            str(out),
            "--figure",
            str(fig),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return {
        "stdout": res.stdout,
        "table": pd.read_csv(out),
        "runs": pd.read_csv(d / "sp_runs.csv"),
        "other": pd.read_csv(other),
        "out": out,
        "fig": fig,
    }


def test_quick_writes_the_sweep_the_table_and_the_figure(quick):
    runs, table = quick["runs"], quick["table"]
    assert {
        "run_id",
        "variant",
        "rank",
        "seed",
        "lr",
        "status",
        "weights",
        "lr_selected",
        "test_accuracy",
    } <= set(runs.columns)
    assert (runs["status"] == "ok").all()
    assert {
        "task",
        "dataset",
        "variant",
        "rank",
        "seed",
        "run_id",
        "layer",
        "kind",
        "i",
        "sigma",
        "sigma_rel",
        "energy",
        "effective_rank",
        "eff_rank_over_r",
        "rank90",
        "stable_rank",
        "energy_in_rank",
        "numerical_rank",
        "test_score",
    } <= set(table.columns)
    assert set(table["task"]) == {"digits", "synthetic"}
    assert set(table.loc[table["task"] == "digits", "variant"]) == {
        "full",
        "lora",
        "pissa",
        "vera",
        "adalora",
        "dora",
        "loha",
    }
    assert "per layer, mean over seeds" in quick["stdout"] and "top r directions" in quick["stdout"]
    assert_figure(quick["fig"])


def test_only_the_dev_tuned_rows_of_an_included_sweep_are_folded_in(quick):
    other = quick["other"]
    assert len(other) == 2  # one run per learning rate
    chosen = set(other.loc[other["lr_selected"].astype(bool), "run_id"])
    assert len(chosen) == 1
    assert set(quick["table"].loc[quick["table"]["task"] == "synthetic", "run_id"]) == chosen


def test_the_table_round_trips_the_weight_reports_exactly(quick):
    table = quick["table"]
    runs = pd.concat([quick["runs"], quick["other"]])
    runs = runs[runs["run_id"].isin(set(table["run_id"]))]
    assert len(runs) == table["run_id"].nunique() == 13 + 1
    for row in runs.to_dict("records"):
        for layer, rep in json.loads(row["weights"]).items():
            t = table[(table["run_id"] == row["run_id"]) & (table["layer"] == layer)]
            sv = t[t["kind"] == "sv"].sort_values("i")
            assert sv["sigma"].tolist() == rep["sv"]  # exact: CSV floats are written in repr
            lay = t[t["kind"] == "layer"].iloc[0]
            for key in ("effective_rank", "rank90", "stable_rank", "fro_norm", "intruders"):
                assert lay[key] == rep[key]
            assert sv["energy"].is_monotonic_increasing and sv["energy"].iloc[-1] <= 1 + 1e-12
            if min(rep["shape"]) <= len(rep["sv"]):  # every σ stored: the summaries follow from them
                p = sv["sigma"].to_numpy() / sv["sigma"].sum()
                p = p[p > 0]
                assert np.exp(-(p * np.log(p)).sum()) == pytest.approx(rep["effective_rank"], rel=1e-9)
                assert sv["energy"].iloc[-1] == pytest.approx(1.0, rel=1e-9)


def bound(variant: str, r: int) -> int | None:
    """Largest rank ΔW can have: r for s·BA, Λ_b B Λ_d A and P diag(λ) Q; 2r for PiSSA's
    s·(BA − B₀A₀); r² for LoHa's Hadamard product; none for DoRA and full fine-tuning."""
    return {"lora": r, "vera": r, "adalora": r, "pissa": 2 * r, "loha": r * r}.get(variant)


def test_every_low_rank_update_has_at_most_its_bound_of_directions(quick):
    sv = quick["table"]
    sv = sv[(sv["kind"] == "sv") & (sv["task"] == "digits")]
    checked = 0
    for (variant, rank, layer), g in sv.groupby(["variant", "rank", "layer"]):
        b = bound(variant, int(rank))
        if b is None or b >= len(g):
            continue
        rel = g.sort_values("i")["sigma_rel"].to_numpy()
        assert rel[b:].max() < TOL, (variant, rank, layer, rel[b])
        checked += 1
    assert checked == 5 * 2 * 2  # five bounded variants, ranks 1 and 4, fc1 and fc2


def test_adalora_keeps_at_most_its_target_budget(quick):
    """AdaLoRA prunes from r to target_rank = max(1, ⌊2r/3⌋) per layer on average: the
    numerical ranks of its layers add up to at most target_rank × layers."""
    lay = quick["table"]
    lay = lay[(lay["kind"] == "layer") & (lay["variant"] == "adalora")]
    for rank, g in lay.groupby("rank"):
        assert g["numerical_rank"].sum() <= max(1, 2 * int(rank) // 3) * len(g)


def test_full_fine_tuning_and_dora_are_not_low_rank(quick):
    """W − W₀ of full fine-tuning and DoRA's (g − 1)⊙W₀ + g⊙sBA spread over many directions:
    at the largest quick rank r = 4, σ_{r+1}/σ₁ is far above rounding and rank90 exceeds r."""
    t = quick["table"]
    t = t[t["task"] == "digits"]
    for variant in ("full", "dora"):
        sv = t[(t["kind"] == "sv") & (t["variant"] == variant) & (t["i"] == 5)]
        assert (sv["sigma_rel"] > 1e-2).all(), variant
        lay = t[(t["kind"] == "layer") & (t["variant"] == variant)]
        assert (lay["rank90"] > 4).all() and (lay["numerical_rank"] >= 32).all(), variant


def test_plot_only_redraws_without_training(quick, capsys):
    out, fig = quick["out"], quick["fig"]
    runs = out.with_name("sp_runs.csv")
    before = (out.stat().st_mtime_ns, runs.stat().st_mtime_ns)
    for ext in (".pdf", ".png"):
        fig.with_suffix(ext).unlink()
    assert study().main(["--quick", "--plot-only", "--out", str(out), "--figure", str(fig)]) == 0
    assert_figure(fig)
    assert (out.stat().st_mtime_ns, runs.stat().st_mtime_ns) == before
    assert study().main(["--plot-only", "--out", str(out.with_name("none.csv"))]) == 1
    assert "does not exist; run without --plot-only first" in capsys.readouterr().err


def test_help_lists_the_options():
    res = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    for flag in (
        "--quick",
        "--plot-only",
        "--include",
        "--workers",
        "--out",
        "--figure",
        "--spectrum-rank",
        "--quiet",
    ):
        assert flag in res.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--include", "no/such.csv"], "--include no/such.csv does not exist"),
        (["--variants", "lorax"], "unknown variant 'lorax'"),
        (["--ranks", "0"], "must be at least 1"),
    ],
)
def test_bad_input_is_refused_with_one_sentence(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        study().parse(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err and err.count(". ") == 0


def test_text_rows_come_from_the_full_size_downstream_run_when_there_is_one(tmp_path, monkeypatch, capsys):
    sp = study()
    paper, default = tmp_path / "downstream_paper.csv", tmp_path / "downstream.csv"
    monkeypatch.setattr(sp, "DEFAULT_INCLUDES", [paper, default])
    assert sp.parse([]).include == [] and "no text rows to fold in" in capsys.readouterr().err
    default.write_text("run_id\n")
    assert sp.parse([]).include == [default]
    paper.write_text("run_id\n")
    assert sp.parse([]).include == [paper]  # not both: their text runs differ in size
    assert sp.parse(["--quick"]).include == []
