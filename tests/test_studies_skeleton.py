"""The skeleton every study stands on (lowrank.study): one command line with the same outputs,
presets and checks, one (variant, rank) grid, one finish step."""

import argparse
import re
import time
from pathlib import Path

import pandas as pd
import pytest
from studyutil import load_study

import lowrank as lr
from lowrank import ablation, study

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ["continual", "downstream", "overhead", "rank_ablation", "reconstruction", "robustness",
           "spectra", "subspace"]


def parse(name: str, argv: list[str]) -> argparse.Namespace:
    """Study ``name``'s parsed command line (the rank ablation's parser lives in the library)."""
    if name == "rank_ablation":
        return ablation.parser(ROOT, "rank_ablation.py").parse_args(argv)
    return load_study(f"{name}.py").parse(argv)


@pytest.mark.parametrize("name", STUDIES)
def test_every_study_names_its_outputs_after_itself_and_its_preset(name):
    for argv, run in (([], name), (["--quick"], f"{name}_quick")):
        args = parse(name, [*argv, "--plot-only"])  # --plot-only: no task is built
        assert args.out == ROOT / "results" / f"{run}.csv"
        assert args.figure == ROOT / "paper_figures" / run


@pytest.mark.parametrize("name", STUDIES)
def test_every_study_help_names_the_script_and_the_shared_options(name, capsys):
    with pytest.raises(SystemExit) as e:
        parse(name, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {name}.py ")
    for flag in ("--out", "--figure", "--quick", "--plot-only", "--quiet"):
        assert flag in out


@pytest.mark.parametrize(("name", "argv", "key", "value"), [
    ("robustness", ["--seeds", "3"], "seeds", 3),  # 3 is also the default
    ("overhead", ["--ranks", "4"], "ranks", [4]),
    ("subspace", ["--steps", "500"], "steps", 500),
    ("rank_ablation", ["--task", "digits"], "task", ["digits"]),
])
def test_an_option_given_explicitly_beats_the_preset(name, argv, key, value):
    assert getattr(parse(name, ["--quick", *argv, "--plot-only"]), key) == value


def test_a_preset_changes_only_the_defaults_it_names():
    args = parse("rank_ablation", ["--quick"])
    for key, value in ablation.QUICK.items():
        assert getattr(args, key) == value
    assert args.batch_size == ablation.DEFAULTS["batch_size"] and args.workers == 2


@pytest.mark.parametrize("name", ["continual", "downstream", "overhead", "rank_ablation",
                                  "robustness", "spectra"])
def test_every_study_refuses_an_unknown_variant_with_the_same_sentence(name, capsys):
    with pytest.raises(SystemExit) as e:
        parse(name, ["--variants", "lora", "lorax"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"{name}.py: error: argument --variants: unknown variant 'lorax'; "
                   f"choose from {', '.join(lr.variants())}")


@pytest.mark.parametrize(("argv", "message"), [
    (["--seeds", "0"], "argument --seeds: 0 must be at least 1"),
    (["--ranks", "2", "-1"], "argument --ranks: -1 must be at least 1"),
    (["--steps", "1.5"], "argument --steps: '1.5' is not a whole number"),
    (["--lr-grid", "1e-2", "0"], "argument --lr-grid: 0 is not a learning rate"),
    (["--lr-grid", "nan"], "argument --lr-grid: nan is not a learning rate"),
    (["--task", "text2"], "argument --task: unknown task 'text2'; choose from charlm"),
    (["--task-options", "[1]"], "argument --task-options: '[1]' is not a JSON object"),
])
def test_bad_numbers_and_names_are_refused_in_one_sentence(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse("rank_ablation", argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and message in err and err.count(". ") == 0


def test_the_grid_runs_a_variant_without_a_rank_once():
    assert study.grid(["full", "lora"], [1, 4]) == [("full", None), ("lora", 1), ("lora", 4)]
    pairs = study.grid(lr.variants(), [2])
    assert len(pairs) == len(lr.variants())
    free = {v for v, r in pairs if r is None}
    assert free == study.rank_free(lr.variants()) == {"full"}
    with pytest.raises(ValueError, match="unknown variant 'lorax'"):
        study.grid(["lorax"], [1])


def test_finish_writes_the_outputs_and_prints_what_make_figures_reads(tmp_path, capsys):
    rows = pd.DataFrame({"variant": ["lora", "full"], "rank": [4, None], "score": [0.5, 0.25]})
    args = argparse.Namespace(out=tmp_path / "r" / "t.csv", figure=tmp_path / "f" / "t",
                              table=tmp_path / "t.md", start=time.perf_counter())
    drawn = []

    def figure(df, stem, scale=1.0):
        drawn.append((df, stem, scale))
        return [stem.with_suffix(".pdf"), stem.with_suffix(".png")]

    assert study.finish(args, figure, rows, write=True, table="| a |", scale=2.0) == 0
    pd.testing.assert_frame_equal(pd.read_csv(args.out), rows)
    assert args.table.read_text() == "| a |"
    assert drawn == [(rows, args.figure, 2.0)]
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [f"results: {args.out}", f"table: {args.table}",
                         f"figure: {args.figure}.pdf, {args.figure}.png"]
    assert re.fullmatch(r"elapsed \d+\.\d s, peak memory of one process \d+ MiB", lines[3])
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["t.csv", "t.md"]


@pytest.mark.parametrize("module", ["plots.py", "study.py"])
def test_the_shared_style_and_the_skeleton_name_no_variant(module):
    """Which variants take a rank, and so are drawn as curves, comes from the registry."""
    text = (ROOT / "lowrank" / module).read_text()
    named = [v for v in lr.variants() if re.search(rf"[\"']{v}[\"']", text)]
    assert named == []
