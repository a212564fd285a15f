"""What the study tests share: run a study script, load it as a module, check a paper figure."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from lowrank.sweep import GROUP, KEY, RunSpec
from lowrank.sweep.fingerprint import COLUMN, code_fingerprint

STUDIES = Path(__file__).resolve().parent.parent / "studies"
# the options every tuned study's --help lists
TUNED_FLAGS = ("--quick", "--plot-only", "--out", "--figure", "--workers", "--quiet", "--lr-grid", "--ranks")
# the columns that say which run a sweep row is, in every study's CSV
RUN_COLUMNS = {"run_id", "task", "variant", "rank", "seed", "lr", "status"}


def load_study(script: str):
    """``studies/<script>`` as a module, to call its functions in this process."""
    spec = importlib.util.spec_from_file_location(f"{Path(script).stem}_study", STUDIES / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_study(script: str, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``studies/<script> args…`` in a fresh interpreter; the caller checks the exit code."""
    return subprocess.run(
        [sys.executable, str(STUDIES / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_figure(stem: Path) -> None:
    """``stem``.pdf is vector with TrueType fonts embedded, ``stem``.png a real image."""
    pdf, png = stem.with_suffix(".pdf"), stem.with_suffix(".png")
    assert png.stat().st_size > 10_000
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF") and b"/FontFile2" in data


def stand_in_row(spec: RunSpec, dev: float, **columns) -> dict:
    """The row a run of ``spec`` would give, with a made-up dev accuracy ``dev`` (test accuracy
    the same unless ``columns`` say otherwise): a stand-in for ``run_one`` in tests of the
    learning-rate search, which needs only the scores."""
    return {
        KEY: spec.run_id,
        GROUP: spec.group_id,
        "task": spec.task,
        "variant": spec.variant,
        "rank": spec.rank,
        "seed": spec.seed,
        "lr": spec.lr,
        "status": "ok",
        "metric": "accuracy",
        "higher_is_better": True,
        "task_options": json.dumps(spec.task_options),
        "variant_options": json.dumps(spec.variant_options),
        "dev_accuracy": dev,
        "test_accuracy": dev,
        COLUMN: code_fingerprint(),
        **columns,
    }
