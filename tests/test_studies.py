"""Study scripts end to end (their --quick mode), and the executors on a real task."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from studyutil import RUN_COLUMNS, assert_figure, run_study

import lowrank as lr
from lowrank.sweep import RunSpec, sweep

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = RUN_COLUMNS | {
    "trainable_params",
    "train_seconds",
    "peak_mem_mb",
    "torch_version",
    "lowrank_version",
    "git_commit",
    "cpu",
    "threads",
    "dtype",
    "steps",
    "batch_size",
}


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    res = run_study(script, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_rank_ablation_quick_writes_csv_and_figure_and_redraws(tmp_path):
    out, fig = tmp_path / "ra.csv", tmp_path / "ra"
    res = run(
        "rank_ablation.py", "--quick", "--quiet", "--workers", "1", "--out", str(out), "--figure", str(fig)
    )
    assert "elapsed" in res.stdout
    df = pd.read_csv(out)
    assert COLUMNS <= set(df.columns)
    assert "test_delta_error" in df.columns and (df["status"] == "ok").all()
    assert set(df["variant"]) == {"lora", "full"}
    # the planted rank-4 update: LoRA at r = 4 ≥ k recovers it, at r = 1 < k it cannot go
    # below the Eckart–Young floor (0.762 for this ΔW*)
    err = df[df["variant"] == "lora"].set_index("rank")["test_delta_error"]
    assert err[4] < 0.05 < 0.7 < err[1]
    assert_figure(fig)
    fig.with_suffix(".png").unlink()
    run("rank_ablation.py", "--quick", "--plot-only", "--out", str(out), "--figure", str(fig))
    assert_figure(fig)
    assert len(pd.read_csv(out)) == len(df)  # redrawing trains nothing


def test_rank_ablation_help_explains_the_options():
    res = run("rank_ablation.py", "--help")
    assert res.stdout.startswith("usage: rank_ablation.py ")  # the script's name, not the library's
    for flag in ("--quick", "--plot-only", "--workers", "--lr-grid", "--executor"):
        assert flag in res.stdout


def test_rank_ablation_rejects_unknown_names():
    res = subprocess.run(
        [sys.executable, str(ROOT / "studies" / "rank_ablation.py"), "--variants", "lorax"],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "unknown variant 'lorax'" in res.stderr


def test_overhead_quick_measures_every_variant_and_redraws(tmp_path):
    out, fig = tmp_path / "o.csv", tmp_path / "o"
    res = run("overhead.py", "--quick", "--quiet", "--no-peft", "--out", str(out), "--figure", str(fig))
    assert " done (" not in res.stderr  # --quiet: no progress lines
    df = pd.read_csv(out)
    merged = {f"{v} (merged)" for v in lr.variants() if v != "full"}
    assert set(df["config"]) == {"base", *lr.variants(), *merged}  # full has nothing to merge
    assert (df["ratio_to_base"] > 0).all() and set(df["d"]) == {128}
    assert_figure(fig)
    fig.with_suffix(".png").unlink()
    run("overhead.py", "--quick", "--plot-only", "--out", str(out), "--figure", str(fig))
    assert_figure(fig)


SPECS = [RunSpec("synthetic", "lora", r, 0, 1e-2, train={"steps": 10, "batch_size": 32}) for r in (1, 2)]


def _metrics(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values("rank")[["run_id", "test_delta_error", "dev_delta_error"]].reset_index(drop=True)


@pytest.mark.parametrize("executor", ["local", "dask"])
def test_parallel_executors_give_the_serial_results(tmp_path, executor):
    serial = sweep(SPECS, tmp_path / "serial.csv", progress=False)
    par = sweep(SPECS, tmp_path / "par.csv", workers=2, executor=executor, progress=False)
    pd.testing.assert_frame_equal(_metrics(serial), _metrics(par))


def test_dask_executor_on_an_external_scheduler(tmp_path):
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster:
        df = sweep(
            SPECS, tmp_path / "d.csv", executor="dask", scheduler=cluster.scheduler_address, progress=False
        )
    assert len(df) == 2 and (df["status"] == "ok").all()


def test_submitit_executor_with_its_local_cluster(tmp_path):
    df = sweep(SPECS, tmp_path / "s.csv", executor="submitit", scheduler="local", progress=False)
    serial = sweep(SPECS, tmp_path / "serial.csv", progress=False)
    pd.testing.assert_frame_equal(_metrics(df), _metrics(serial))
