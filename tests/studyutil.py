"""What the study tests share: run a study script, load it as a module, check a paper figure."""

import importlib.util
import subprocess
import sys
from pathlib import Path

STUDIES = Path(__file__).resolve().parent.parent / "studies"


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
