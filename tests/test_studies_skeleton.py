"""The skeleton every study stands on (lowrank.study): one command line with the same outputs,
presets and checks, one (variant, rank) grid, one finish step."""

import argparse
import re
import time
from pathlib import Path

import pandas as pd
import pytest
from studyutil import load_study, stand_in_row

import lowrank as lr
from lowrank import ablation, plots, sensitivity, study
from lowrank.sweep import read_results

ROOT = Path(__file__).resolve().parent.parent
STUDIES = [
    "continual",
    "downstream",
    "overhead",
    "rank_ablation",
    "reconstruction",
    "robustness",
    "spectra",
    "subspace",
]


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


@pytest.mark.parametrize(
    ("name", "argv", "key", "value"),
    [
        ("robustness", ["--seeds", "3"], "seeds", 3),  # 3 is also the default
        ("overhead", ["--ranks", "4"], "ranks", [4]),
        ("subspace", ["--steps", "500"], "steps", 500),
        ("rank_ablation", ["--task", "digits"], "task", ["digits"]),
    ],
)
def test_an_option_given_explicitly_beats_the_preset(name, argv, key, value):
    assert getattr(parse(name, ["--quick", *argv, "--plot-only"]), key) == value


def test_a_preset_changes_only_the_defaults_it_names():
    args = parse("rank_ablation", ["--quick"])
    for key, value in ablation.QUICK.items():
        assert getattr(args, key) == value
    assert args.batch_size == ablation.DEFAULTS["batch_size"] and args.workers == 2


@pytest.mark.parametrize(
    "name", ["continual", "downstream", "overhead", "rank_ablation", "robustness", "spectra"]
)
def test_every_study_refuses_an_unknown_variant_with_the_same_sentence(name, capsys):
    with pytest.raises(SystemExit) as e:
        parse(name, ["--variants", "lora", "lorax"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"{name}.py: error: argument --variants: unknown variant 'lorax'; "
        f"choose from {', '.join(lr.variants())}"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "0"], "argument --seeds: 0 must be at least 1"),
        (["--ranks", "2", "-1"], "argument --ranks: -1 must be at least 1"),
        (["--steps", "1.5"], "argument --steps: '1.5' is not a whole number"),
        (["--lr-grid", "1e-2", "0"], "argument --lr-grid: 0 is not a learning rate"),
        (["--lr-grid", "nan"], "argument --lr-grid: nan is not a learning rate"),
        (["--task", "text2"], "argument --task: unknown task 'text2'; choose from charlm"),
        (["--task-options", "[1]"], "argument --task-options: '[1]' is not a JSON object"),
        (["--lr-extend", "-1"], "argument --lr-extend: -1 must be at least 0"),
        (
            ["--lr-grid", "auto", "1e-3"],
            "--lr-grid auto 0.001: auto stands alone; pass either auto or learning rates",
        ),
    ],
)
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
    args = argparse.Namespace(
        out=tmp_path / "r" / "t.csv",
        figure=tmp_path / "f" / "t",
        table=tmp_path / "t.md",
        start=time.perf_counter(),
    )
    drawn = []

    def figure(df, stem, scale=1.0):
        drawn.append((df, stem, scale))
        return [stem.with_suffix(".pdf"), stem.with_suffix(".png")]

    assert study.finish(args, figure, rows, write=True, table="| a |", scale=2.0) == 0
    pd.testing.assert_frame_equal(pd.read_csv(args.out), rows)
    assert args.table.read_text() == "| a |"
    assert drawn == [(rows, args.figure, 2.0)]
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [
        f"results: {args.out}",
        f"table: {args.table}",
        f"figure: {args.figure}.pdf, {args.figure}.png",
    ]
    assert re.fullmatch(r"elapsed \d+\.\d s, peak memory of one process \d+ MiB", lines[3])
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["t.csv", "t.md"]


GENERIC = [
    "plots.py",
    "sensitivity.py",
    "study.py",
    "arguments.py",
    "cli.py",
    "inspection.py",
    "train.py",
    "analysis.py",
    "sweep",
    "io",
]  # modules (or packages) that know no variant (a study's defaults may name some)
GENERIC_FILES = sorted(
    p.relative_to(ROOT / "lowrank").as_posix()
    for name in GENERIC
    for p in ([ROOT / "lowrank" / name] if name.endswith(".py") else (ROOT / "lowrank" / name).glob("*.py"))
)


@pytest.mark.parametrize("module", GENERIC_FILES)
def test_the_shared_style_and_the_skeleton_name_no_variant(module):
    """What each variant is lives in its class: the figures, the skeleton, the command line, the
    trainer, the sweep, the analysis and the file formats name no variant (the registry and the
    classes' attributes tell them what they need)."""
    text = (ROOT / "lowrank" / module).read_text()
    named = [v for v in lr.variants() if re.search(rf"[\"']{v}[\"']", text)]
    assert named == []


def searched_rows() -> pd.DataFrame:
    """A tuned sweep's whole table: every rate at seed 0, the chosen one again at seed 1 (with
    other scores, which the learning-rate figure must not draw); the dev optimum of lora is at
    1e-2, of vera at 1e-1, of full at 1e-3; a diverged lora run at lr 1 in task b."""
    import math

    peak = {"lora": 1e-2, "vera": 1e-1, "full": 1e-3}
    rows = []
    for task in ("a", "b"):
        for variant, rank in (("lora", 1), ("lora", 4), ("vera", 4), ("full", None)):
            for seed, rates in ((0, [1e-3, 1e-2, 1e-1]), (1, [peak[variant]])):
                for rate in rates:
                    dev = 0.9 - 0.2 * abs(math.log10(rate / peak[variant])) - 0.5 * seed
                    rows.append(
                        {
                            "task": task,
                            "variant": variant,
                            "rank": rank,
                            "seed": seed,
                            "lr": rate,
                            "group_id": f"{task}{variant}{rank}",
                            "status": "ok",
                            "task_options": "{}",
                            "variant_options": "{}",
                            "metric": "accuracy",
                            "selection_metric": "accuracy",
                            "higher_is_better": True,
                            "dev_accuracy": dev,
                            "test_accuracy": dev - 0.05,
                        }
                    )
    rows.append(
        {
            **rows[0],
            "task": "b",
            "lr": 1.0,
            "group_id": "blora1",
            "status": "diverged",
            "dev_accuracy": float("nan"),
            "test_accuracy": float("nan"),
        }
    )
    rows.append({**rows[0], "variant": "probe", "rank": None, "lr": None, "group_id": None})
    return pd.DataFrame(rows)


def drawn(monkeypatch, **kw):
    """lr_sensitivity's figure, kept open: {panel title: axes}."""
    figs = []
    monkeypatch.setattr(plots, "save", lambda fig, stem: figs.append(fig) or [])
    sensitivity.lr_sensitivity(kw.pop("df", None) if "df" in kw else searched_rows(), "unused", **kw)
    return {ax.get_title() or ax.get_title(loc="left"): ax for ax in figs[0].axes if ax.get_visible()}


def test_lr_figure_draws_every_rate_at_the_search_seed_and_fills_the_chosen_one(monkeypatch):
    panels = drawn(monkeypatch)
    assert list(panels) == ["a, r = 1", "a, r = 4", "b, r = 1", "b, r = 4"]
    for title, ax in panels.items():
        labelled = {ln.get_label(): ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}
        variants = {"LoRA", "full fine-tuning"} | ({"VeRA"} if title.endswith("4") else set())
        keys = {
            "dev score (solid)",
            "test score (dashed)",
            "chosen rate: best dev score (outlined)",
            "diverged: no score",
        }
        assert set(labelled) - keys == variants  # full in every panel
        vera = labelled.get("VeRA")
        if vera is not None:  # seed 0's rates and dev scores, not seed 1's
            assert list(vera.get_xdata()) == [1e-3, 1e-2, 1e-1]
            assert list(vera.get_ydata()) == pytest.approx([0.5, 0.7, 0.9])  # 0.9 − 0.2 per decade
        chosen = [ln for ln in ax.get_lines() if ln.get_gid() == "chosen"]
        assert sorted(float(ln.get_xdata()[0]) for ln in chosen) == sorted(
            {1e-2, 1e-3} | ({1e-1} if title.endswith("4") else set())
        )
        assert all(ln.get_ydata()[0] == pytest.approx(0.9) for ln in chosen)
        assert ax.get_xscale() == "log" and ax.get_xlabel() == "learning rate"
    assert panels["a, r = 1"].get_ylabel() == "accuracy" and panels["a, r = 4"].get_ylabel() == ""
    assert panels["a, r = 1"].get_ylim() == panels["a, r = 4"].get_ylim()  # a task's panels share y
    crosses = [ln for ln in panels["b, r = 1"].get_lines() if ln.get_marker() == "x"]
    assert [list(ln.get_xdata()) for ln in crosses] == [[1.0]]  # the diverged run, on the edge


def test_lr_figure_panels_follow_the_columns_given(monkeypatch):
    df = searched_rows()
    df["training"] = ["plain" if r % 2 else "adversarial" for r in range(len(df))]
    df["group_id"] = df["group_id"] + df["training"]
    panels = drawn(monkeypatch, df=df, col="training")
    assert sorted(panels) == ["a, adversarial", "a, plain", "b, adversarial", "b, plain"]


def test_finish_draws_the_lr_figure_of_a_tuned_study_beside_its_figure(tmp_path, capsys):
    args = argparse.Namespace(out=tmp_path / "t.csv", figure=tmp_path / "f" / "t", start=time.perf_counter())
    figure = lambda df, stem: []  # noqa: E731 — the study's own figure is not the point here
    assert study.finish(args, figure, searched_rows(), lr_search=searched_rows()) == 0
    out = capsys.readouterr().out
    assert f"figure: {args.figure}_lr.pdf, {args.figure}_lr.png" in out
    from studyutil import assert_figure

    assert_figure(tmp_path / "f" / "t_lr")
    assert study.finish(args, figure, searched_rows(), lr_search=pd.DataFrame()) == 0
    assert "no learning-rate search in the results to draw" in capsys.readouterr().err


def test_the_auto_grid_is_centred_on_the_task_centre_times_the_variant_scale():
    # three rates half a decade apart (6 significant digits) around 1e-2 × 0.03, 3e-2 × 3, 3e-2 × 1
    assert study.auto_grid(lr.sweep.RunSpec("text", "full", None, 0, 0.0)) == [9.48683e-5, 3e-4, 9.48683e-4]
    assert study.auto_grid(lr.sweep.RunSpec("digits", "vera", 4, 0, 0.0)) == lr.sweep.log_grid(0.09, 3)
    assert study.auto_grid(lr.sweep.RunSpec("synthetic", "lora", 4, 0, 0.0)) == [9.48683e-3, 3e-2, 9.48683e-2]
    assert study.search_grid([1e-3, 1e-2]) == [1e-3, 1e-2] and study.search_grid("auto") is study.auto_grid


@pytest.mark.parametrize("name", ["continual", "downstream", "rank_ablation", "robustness", "spectra"])
def test_every_tuned_study_searches_the_auto_grid_with_extensions_by_default(name, capsys):
    args = parse(name, ["--plot-only"])
    assert args.lr_extend == 3 and args.lr_grid == "auto"
    args = parse(name, ["--plot-only", "--lr-grid", "1e-3", "1e-2", "--lr-extend", "0"])
    assert args.lr_extend == 0 and args.lr_grid == [1e-3, 1e-2]
    with pytest.raises(SystemExit):
        parse(name, ["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--lr-extend N" in help_text and "or auto: for each variant three rates" in help_text


def test_the_ablation_searches_auto_grids_and_follows_an_optimum_past_them(tmp_path, monkeypatch):
    """A stand-in run whose dev accuracy peaks at lr 1 for every variant: lora's auto grid on the
    synthetic task (9.5e-3 … 9.5e-2) has it past its top edge, full's (2.8e-4 … 2.8e-3) far past."""
    import math

    import lowrank.sweep.results as results

    def run(spec):
        return stand_in_row(spec, -abs(math.log10(spec.lr)))

    monkeypatch.setattr(results, "run_one", run)
    rows = ablation.run_ablation(
        tmp_path / "r.csv", task=["synthetic"], variants=["lora", "full"], ranks=[4], seeds=1, progress=False
    )  # the defaults: auto, 3
    df = read_results(tmp_path / "r.csv")
    tried = {v: sorted(g["lr"]) for v, g in df.groupby("variant")}
    # 0.0949 is the top edge → 0.3, 0.949, 3.0: now 0.949 is interior
    assert tried["lora"] == [9.48683e-3, 3e-2, 9.48683e-2, 0.3, 0.948684, 3.0]
    assert tried["full"][:3] == lr.sweep.log_grid(3e-2 * 0.03, 3) and len(tried["full"]) == 6
    said = dict(zip(rows["variant"], rows["lr_selection"]))
    assert said["lora"].endswith("; interior")
    assert said["full"].endswith("; capped at the high edge after 3 extensions")
