"""studies/make_figures.py redraws the figures from results/ alone, deterministically, and says
which studies it could not draw."""

import shutil
import subprocess
import sys
from pathlib import Path

from studyutil import load_study

from lowrank import ablation

ROOT = Path(__file__).resolve().parent.parent


def test_redraws_from_results_alone_byte_for_byte_and_reports_missing_csvs(tmp_path):
    shutil.copytree(ROOT / "studies", tmp_path / "studies")
    (tmp_path / "results").mkdir()
    for name in ("subspace", "overhead"):
        shutil.copy(ROOT / "results" / f"{name}.csv", tmp_path / "results")
    cmd = [
        sys.executable,
        str(tmp_path / "studies" / "make_figures.py"),
        "--only",
        "subspace",
        "overhead",
        "robustness",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stdout + res.stderr  # robustness has no CSV here
    assert "skipped robustness: results/robustness.csv does not exist" in res.stdout
    figures = tmp_path / "paper_figures"
    first = {p.name: p.read_bytes() for p in figures.iterdir()}
    assert set(first) == {"subspace.pdf", "subspace.png", "overhead.pdf", "overhead.png"}
    res = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert {p.name: p.read_bytes() for p in figures.iterdir()} == first  # same data, same bytes


def test_the_optional_full_size_downstream_run_may_be_missing(tmp_path):
    shutil.copytree(ROOT / "studies", tmp_path / "studies")
    (tmp_path / "results").mkdir()
    shutil.copy(ROOT / "results" / "downstream.csv", tmp_path / "results")
    res = subprocess.run(
        [sys.executable, str(tmp_path / "studies" / "make_figures.py"), "--only", "downstream"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "skipped downstream --paper" in res.stdout
    assert (tmp_path / "paper_figures" / "downstream.png").exists()
    assert (tmp_path / "paper_figures" / "downstream_lr.png").exists()  # every rate it searched
    assert (tmp_path / "results" / "downstream.md").exists()


def test_every_variant_has_its_own_colour_and_marker_in_every_figure():
    """The style of a variant depends on the registry alone, not on which variants a figure
    shows; the variants that take a rank differ in colour and in marker, and full fine-tuning,
    the reference, is black."""
    import lowrank as lr
    from lowrank import plots

    every = plots.style_for(lr.variants())
    ranked = [v for v in lr.variants() if lr.variant_class(v).takes_rank]
    assert len({every[v]["color"] for v in ranked}) == len(ranked)
    assert len({every[v]["marker"] for v in ranked}) == len(ranked)
    assert every["full"] == plots.REFERENCE and plots.REFERENCE["color"] not in plots.PALETTE
    for v in lr.variants():
        assert plots.style_for([v, "lora"])[v] == every[v] == plots.style(v)


def test_every_committed_csv_was_made_by_the_code_at_hand():
    """``make_figures --check``: every row of every committed results CSV carries the fingerprint
    of the code at hand, so no committed number comes from other code."""
    res = subprocess.run(
        [sys.executable, str(ROOT / "studies" / "make_figures.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    checked = [line for line in res.stdout.splitlines() if line.startswith("results/")]
    committed = {
        p.name
        for p in (ROOT / "results").glob("*.csv")
        if not p.name.endswith((".previous.csv", "_quick.csv"))
    }  # those are .gitignored
    assert {line.split(":")[0].removeprefix("results/") for line in checked} == committed
    assert all(": 0 of " in line for line in checked), res.stdout


def test_every_csv_a_study_resumes_from_is_checked():
    """A CSV a study resumes from (``args.resumes``) but does not draw, like the downstream
    --paper budget check's, is in ``RESUMED``, so ``--check`` covers its rows too."""
    figures = load_study("make_figures.py")
    known = {ROOT / csv for _, _, csv in [*figures.FIGURES, *figures.RESUMED]}
    for name, extra, _ in figures.FIGURES:
        study = load_study(f"{name}.py")
        parse = getattr(study, "parse", None) or ablation.parser(ROOT).parse_args  # rank_ablation
        args = parse(extra)
        assert set(args.resumes) <= known, (name, extra, set(args.resumes) - known)
