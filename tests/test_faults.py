"""Faults: interrupt or kill a running sweep, then resume — every finished run is in the CSV
exactly once and no partial CSV or figure is left behind."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
ARGS = [
    "--task",
    "synthetic",
    "--variants",
    "lora",
    "--ranks",
    "1",
    "2",
    "4",
    "--seeds",
    "2",
    "--lr-grid",
    "1e-2",
    "--steps",
    "1000",
    "--workers",
    "2",
    "--quiet",
]
N_RUNS = 3 * 2  # about 1 s each: the sweep is still running seconds after the rows a test waits for


def _default_sigint() -> None:
    """Give the study Ctrl-C's default effect: a job a non-interactive shell starts in the
    background inherits SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "studies" / "rank_ablation.py"),
            *ARGS,
            "--out",
            str(out),
            "--figure",
            str(out.with_suffix("")),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def wait_for_rows(out: Path, proc: subprocess.Popen, n: int, timeout: float = 240) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if out.exists() and len(pd.read_csv(out)) >= n:
            return len(pd.read_csv(out))
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"no {n} rows after {timeout} s")


def children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid and b"resource_tracker" not in cmd:
                kids.append(int(entry.name))
    return kids


def assert_clean(out: Path) -> pd.DataFrame:
    df = pd.read_csv(out)  # parses: never a truncated file
    assert df["run_id"].is_unique
    assert (df["status"] == "ok").all()
    leftovers = [p.name for p in out.parent.iterdir() if ".tmp" in p.name]
    assert not leftovers, leftovers
    return df


def resume_and_check(out: Path) -> None:
    done = start(out)
    stdout, stderr = done.communicate(timeout=600)
    assert done.returncode == 0, stderr[-2000:]
    df = assert_clean(out)
    assert len(df) == N_RUNS
    for ext in (".pdf", ".png"):
        assert out.with_suffix(ext).stat().st_size > 1000


def test_sigint_to_the_parent_then_resume(tmp_path):
    out = tmp_path / "r.csv"
    proc = start(out)
    wait_for_rows(out, proc, 2)
    assert proc.poll() is None, "the sweep finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    before = assert_clean(out)
    assert 2 <= len(before) < N_RUNS
    resume_and_check(out)
    assert set(before["run_id"]) <= set(pd.read_csv(out)["run_id"])


def test_sigkill_a_worker_then_resume(tmp_path):
    out = tmp_path / "r.csv"
    proc = start(out)
    wait_for_rows(out, proc, 1)
    workers = children(proc.pid)
    assert workers, "the sweep runs no worker processes"
    os.kill(workers[0], signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0  # a broken pool stops the sweep, loudly
    before = assert_clean(out)
    resume_and_check(out)
    assert set(before["run_id"]) <= set(pd.read_csv(out)["run_id"])
