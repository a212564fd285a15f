"""Which code made a row: the fingerprint covers what a run executes, ignores layout, and a sweep
re-runs the rows that other code made."""

import argparse
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd

import lowrank
from lowrank import study
from lowrank.sweep import RunSpec, run_one
from lowrank.sweep.fingerprint import COLUMN, PACKAGE, code_fingerprint, run_files, stale

SPEC = RunSpec("synthetic", "lora", 2, 0, 1e-2, train={"steps": 3, "batch_size": 16})


def test_the_fingerprint_covers_every_lowrank_file_a_run_executes():
    """Trace every Python call while one run trains: each lowrank file with code that ran must be
    hashed (lowrank/__init__.py only re-exports and runs nothing during a run)."""
    run_one(SPEC)  # imports done and caches filled: what remains is what a run executes
    ran: set[str] = set()

    def profile(frame, event, arg):
        if event == "call":
            ran.add(frame.f_code.co_filename)

    sys.setprofile(profile)
    try:
        run_one(
            RunSpec(
                "synthetic", "dora", 2, 1, 1e-2, train={"steps": 3, "batch_size": 16}, measure=("weights",)
            )
        )
    finally:
        sys.setprofile(None)
    executed = {Path(f).resolve() for f in ran if Path(f).resolve().is_relative_to(PACKAGE)}
    assert executed, "the trace saw no lowrank code"
    assert executed - {PACKAGE / "__init__.py"} <= set(run_files())


def test_figures_and_the_command_line_are_outside_the_fingerprint():
    names = {p.relative_to(PACKAGE).as_posix() for p in run_files()}
    assert {"train.py", "sweep/run.py", "adapters/lora.py", "tasks/text.py"} <= names
    assert not names & {"plots.py", "sensitivity.py", "cli.py", "study.py", "__init__.py", "sweep/tuning.py"}


def _copy(tmp_path: Path) -> Path:
    """A copy of the lowrank package to change, importable from the returned folder."""
    root = tmp_path / "src"
    shutil.copytree(PACKAGE, root / "lowrank", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _python(root: Path, code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout + out.stderr


def _fingerprint(root: Path) -> str:
    return _python(root, "from lowrank.sweep.fingerprint import code_fingerprint as f; print(f())").strip()


def test_layout_comments_and_docstrings_leave_the_fingerprint_alone_behaviour_changes_it(tmp_path):
    root = _copy(tmp_path)
    train = root / "lowrank" / "train.py"
    before = _fingerprint(root)
    assert before == code_fingerprint()
    source = train.read_text()
    reformatted = source.replace('"""', '"""Another docstring line.\n', 1).replace(
        "\nclass TrainConfig", "\n# a comment\n\n\nclass TrainConfig"
    )
    train.write_text(reformatted)
    assert _fingerprint(root) == before
    train.write_text(source.replace("clip: float | None = 1.0", "clip: float | None = 0.5"))
    assert _fingerprint(root) != before


def test_a_sweep_reuses_its_own_rows_and_re_runs_the_rows_of_other_code(tmp_path):
    """Change the trainer's behaviour (its default gradient clip) in a copy of the package: the
    same run_id is run again, its row replaced, and the sweep says so."""
    root, out = _copy(tmp_path), tmp_path / "runs.csv"
    code = f"""
        from lowrank.sweep import RunSpec, sweep
        specs = [RunSpec("synthetic", "lora", r, 0, 1e-2, train={{"steps": 3, "batch_size": 16}})
                 for r in (1, 2)]
        sweep(specs, {str(out)!r}, progress=True)
    """
    first = _python(root, code)
    assert "0 runs reused" in first and "2 new" in first
    made = pd.read_csv(out)
    again = _python(root, code)
    assert "2 runs reused" in again and "0 stale" in again
    assert pd.read_csv(out).equals(made)  # nothing re-run, file unchanged
    train = root / "lowrank" / "train.py"
    train.write_text(train.read_text().replace("clip: float | None = 1.0", "clip: float | None = 0.5"))
    changed = _python(root, code)
    assert "0 runs reused" in changed and "2 stale runs (other code) re-run" in changed
    now = pd.read_csv(out)
    assert len(now) == 2 and list(now["run_id"]) == list(made["run_id"])
    assert (now["clip"] == 0.5).all() and (made["clip"] == 1.0).all()
    assert now[COLUMN].nunique() == 1 and now[COLUMN][0] != made[COLUMN][0]


def test_stale_marks_rows_without_or_with_another_fingerprint():
    here = code_fingerprint()
    script = Path(study.__file__)  # any file stands in for a study script
    df = pd.DataFrame({COLUMN: [here, code_fingerprint(script), "0123456789ab", None]})
    assert stale(df, script).tolist() == [False, False, True, True]
    assert stale(pd.DataFrame({"x": [1, 2]})).tolist() == [True, True]


def test_a_study_table_is_stamped_with_its_script_and_fresh_sets_the_old_csv_aside(tmp_path):
    out = tmp_path / "t.csv"
    out.write_text("old,rows\n1,2\n")
    args = argparse.Namespace(
        plot_only=False, fresh=True, resumes=[out], out=out, script=Path(study.__file__)
    )
    df = study.results(args, lambda: pd.DataFrame({"x": [1.0, 2.0]}), key=None)
    assert (df[COLUMN] == code_fingerprint(study.__file__)).all()
    assert pd.read_csv(out)[COLUMN].tolist() == df[COLUMN].tolist()
    assert (tmp_path / "t.previous.csv").read_text() == "old,rows\n1,2\n"


def test_make_figures_check_names_each_csv_with_rows_of_other_code(tmp_path, monkeypatch, capsys):
    spec = __import__("importlib.util").util.spec_from_file_location(
        "make_figures", Path(lowrank.__file__).parent.parent / "studies" / "make_figures.py"
    )
    mf = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(mf)
    (tmp_path / "results").mkdir()
    (tmp_path / "studies").mkdir()
    for script in Path(spec.origin).parent.glob("*.py"):
        (tmp_path / "studies" / script.name).symlink_to(script)
    pd.DataFrame({"run_id": ["a", "b"], COLUMN: [code_fingerprint(), "other"]}).to_csv(
        tmp_path / "results" / "robustness.csv", index=False
    )
    pd.DataFrame({"run_id": ["a"], COLUMN: [code_fingerprint()]}).to_csv(
        tmp_path / "results" / "continual.csv", index=False
    )
    # the downstream study's own rows (its probes) carry lowrank.probe's fingerprint, not its script's
    from lowrank import probe

    made = [code_fingerprint(), probe.fingerprint()]
    downstream = tmp_path / "results" / "downstream.csv"
    pd.DataFrame({"run_id": ["a", "p"], COLUMN: made}).to_csv(downstream, index=False)
    monkeypatch.setattr(mf, "ROOT", tmp_path / "studies")
    assert mf.main(["--check", "--only", "downstream"]) == 0
    script = code_fingerprint(tmp_path / "studies" / "downstream.py")
    assert script != probe.fingerprint()
    pd.DataFrame({"run_id": ["a", "p"], COLUMN: [made[0], script]}).to_csv(downstream, index=False)
    assert mf.main(["--check", "--only", "downstream"]) == 1
    assert "results/downstream.csv: 1 of 2 rows made by other code" in capsys.readouterr().out
    downstream.unlink()
    assert mf.main(["--check", "--only", "continual"]) == 0
    assert mf.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "results/robustness.csv: 1 of 2 rows made by other code; re-run studies/robustness.py" in out
    assert "results/continual.csv: 0 of 1 rows" in out


def test_every_study_offers_a_fresh_run():
    p = study.parser(str(Path(lowrank.__file__).parent.parent / "studies" / "x.py"), "doc", presets={})
    assert p.parse_args(["--fresh"]).fresh and not p.parse_args([]).fresh
