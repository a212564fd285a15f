"""The reconstruction and subspace studies end to end (--quick), and random-projection
approximation against the Eckart–Young bound."""

import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from studyutil import assert_figure, load_study, run_study

from lowrank import linalg

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    res = run_study(script, *args, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def redraws_without_recomputing(script: str, out: Path, fig: Path) -> None:
    before = out.stat().st_mtime_ns
    for ext in (".pdf", ".png"):
        fig.with_suffix(ext).unlink()
    assert load_study(script).main(["--quick", "--plot-only", "--out", str(out), "--figure", str(fig)]) == 0
    assert_figure(fig)
    assert out.stat().st_mtime_ns == before


def test_reconstruction_quick_writes_csv_and_figure_and_redraws(tmp_path):
    out, fig = tmp_path / "rec.csv", tmp_path / "rec"
    res = run("reconstruction.py", "--quick", "--out", str(out), "--figure", str(fig))
    assert "Eckart–Young" in res.stdout
    df = pd.read_csv(out)
    assert {
        "matrix",
        "kind",
        "method",
        "rank",
        "lam_rel",
        "error",
        "eckart_young",
        "ratio",
        "seconds",
        "closed_form_error",
        "gap_to_closed_form",
    } <= set(df.columns)
    assert set(df["method"]) == {
        "svd",
        "randomized_svd",
        "gd_uv",
        "closed_form",
        "random_projection",
        "lora_adam",
    }
    assert {"synthetic", "minilm"} == set(df["kind"])
    svd = df[df["method"] == "svd"]
    assert (svd["ratio"] - 1).abs().max() < 1e-4  # the exact SVD is the bound
    assert (df["ratio"] > 1 - 1e-4).all()  # nothing beats Eckart–Young
    assert_figure(fig)
    redraws_without_recomputing("reconstruction.py", out, fig)


def test_subspace_quick_writes_csv_and_figure_and_redraws(tmp_path):
    out, fig = tmp_path / "sub.csv", tmp_path / "sub"
    run("subspace.py", "--quick", "--out", str(out), "--figure", str(fig))
    df = pd.read_csv(out)
    assert {"kind", "layer", "pair", "i", "j", "phi", "rank", "seed", "amplification"} <= set(df.columns)
    phi = df[df["kind"] == "phi"]
    assert set(phi["pair"]) == {"r8 vs r16", "r8 seed 0 vs 1"}
    assert set(phi["layer"]) == {"fc1", "fc2"} and phi["phi"].between(0, 1 + 1e-9).all()
    assert phi["i"].max() == 8 and phi["j"].max() == 16
    amp = df[df["kind"] == "amplification"]
    assert set(amp["rank"]) == {2, 8, 16} and (amp["amplification"] > 0).all()
    assert_figure(fig)
    redraws_without_recomputing("subspace.py", out, fig)


@pytest.mark.parametrize("script", ["reconstruction.py", "subspace.py"])
def test_study_help_lists_the_conventions(script, capsys):
    with pytest.raises(SystemExit) as exit_:
        load_study(script).parse(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--quick", "--plot-only", "--out", "--figure"):
        assert flag in text


def with_spectrum(s, m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))[0]
    return (U * torch.as_tensor(s, dtype=torch.float64)) @ V.mT


@pytest.mark.parametrize("r", [1, 3, 7])
def test_random_projection_is_rank_r_and_never_beats_eckart_young(r):
    W = with_spectrum(0.8 ** torch.arange(12.0), 30, 20)
    X = linalg.random_projection_lowrank(W, r, seed=1)
    assert torch.linalg.matrix_rank(X) <= r
    err = float((W - X).square().sum())
    assert err >= float(linalg.eckart_young_error(W, r)) * (1 - 1e-12)
    assert torch.equal(X, linalg.random_projection_lowrank(W, r, seed=1))  # seeded
    assert not torch.equal(X, linalg.random_projection_lowrank(W, r, seed=2))


def test_random_projection_is_exact_when_the_subspace_holds_the_row_space():
    W = with_spectrum([3.0, 2.0, 1.0], 30, 20)  # rank 3: any rank-20 subspace holds its rows
    X = linalg.random_projection_lowrank(W, 20, seed=0)
    torch.testing.assert_close(X, W, rtol=0, atol=1e-12)
    W4 = with_spectrum([3.0, 2.0, 1.0, 0.5], 30, 5)  # r = in: Q is a basis of the whole space
    err = float((W4 - linalg.random_projection_lowrank(W4, 5)).square().sum())
    assert err == pytest.approx(float(linalg.eckart_young_error(W4, 5)), abs=1e-20)


def test_random_projection_rejects_a_bad_rank():
    with pytest.raises(ValueError, match="rank r=0"):
        linalg.random_projection_lowrank(torch.ones(4, 3), 0)
