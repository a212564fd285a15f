"""The robustness study end to end (--quick), its input checks, and the properties it is about:
attacks cannot raise accuracy, PGD is at least as strong as FGSM, adversarial training buys
robust accuracy, and at ε = 0 every robust accuracy is the clean one."""

import subprocess
from pathlib import Path

import pandas as pd
import pytest
from studyutil import RUN_COLUMNS, TUNED_FLAGS, load_study, run_study

from lowrank.sweep import RunSpec, run_one

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "studies" / "robustness.py"
COLUMNS = RUN_COLUMNS | {
    "adversarial",
    "adv_eps",
    "adv_weight",
    "adv_steps",
    "robust_eps",
    "test_accuracy",
    "test_clean_accuracy",
    "test_fgsm_accuracy",
    "test_pgd_accuracy",
    "lr_selected",
    "lr_selection",
    "git_commit",
}


robustness = load_study("robustness.py")


def study(*args: str) -> subprocess.CompletedProcess:
    return run_study("robustness.py", *args)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The --quick run: mnist (2k train, 1k test images), full and lora r8, trained plainly, with
    FGSM and with PGD (ε = 0.1), 150 steps, one seed."""
    tmp = tmp_path_factory.mktemp("robustness")
    out, fig = tmp / "r.csv", tmp / "r"
    res = study("--quick", "--quiet", "--workers", "1", "--out", str(out), "--figure", str(fig))
    assert res.returncode == 0, res.stderr[-3000:]
    return res, pd.read_csv(out), out, fig


def test_quick_writes_csv_and_figure_and_redraws(quick):
    res, df, out, fig = quick
    assert "elapsed" in res.stdout and "clean_cost" in res.stdout
    assert COLUMNS <= set(df.columns) and (df["status"] == "ok").all()
    assert set(df["variant"]) == {"full", "lora"} and len(df) == 6  # 2 variants × 3 modes
    assert set(df["adversarial"].fillna("none")) == {"none", "fgsm", "pgd"}
    assert (df["robust_eps"] == 0.1).all() and (df["adv_eps"] == 0.1).all()
    assert not list(out.parent.glob(f".{out.stem}.*.csv"))  # the per-mode shards were merged
    for ext, check in (
        ("pdf", lambda b: b.startswith(b"%PDF") and b"/FontFile2" in b),
        ("png", lambda b: len(b) > 10_000),
    ):
        path = fig.with_suffix(f".{ext}")
        assert check(path.read_bytes())
        path.unlink()
    redraw = study("--quick", "--plot-only", "--out", str(out), "--figure", str(fig))
    assert redraw.returncode == 0, redraw.stderr[-3000:]
    assert fig.with_suffix(".pdf").exists() and fig.with_suffix(".png").stat().st_size > 10_000
    again = study("--quick", "--quiet", "--workers", "1", "--out", str(out), "--figure", str(fig))
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(pd.read_csv(out)) == len(df)  # redrawing and resuming train nothing


def test_clean_column_is_the_task_accuracy_and_attacks_do_not_help(quick):
    df = quick[1]
    # the same predictions counted twice; the task's mean is float32, hence 1e-6
    assert (df["test_clean_accuracy"] - df["test_accuracy"]).abs().max() < 1e-6
    # An attack could flip a wrong prediction to right, but ascent on the loss at ε = 0.1 does
    # so for a handful of the 1,000 test images at most: 1 % slack. PGD-10 (random start, step
    # 0.25ε) is not stronger than FGSM on every image, but in aggregate it was 0.05–0.11 lower in
    # the trained-robust rows and both are near 0 in the others: 2 % slack.
    assert (df["test_fgsm_accuracy"] <= df["test_clean_accuracy"] + 0.01).all()
    assert (df["test_pgd_accuracy"] <= df["test_fgsm_accuracy"] + 0.02).all()


def test_adversarial_training_buys_robust_accuracy(quick):
    """Under the attack it was trained against, each variant trained adversarially keeps far more
    test accuracy than when trained plainly (plain: ≤ 4 %; adversarial: 20–60 % at this size,
    so a margin of 10 points is well clear of seed noise on 1,000 images, σ ≈ 1.6 points)."""
    df = quick[1].assign(mode=lambda d: d["adversarial"].fillna("none"))
    acc = df.set_index(["variant", "mode"])
    for variant in ("full", "lora"):
        for attack in ("fgsm", "pgd"):
            col = f"test_{attack}_accuracy"
            assert acc.loc[(variant, attack), col] > acc.loc[(variant, "none"), col] + 0.10, variant


def test_at_zero_radius_every_robust_accuracy_is_the_clean_one():
    spec = RunSpec(
        "digits",
        "lora",
        4,
        0,
        1e-2,
        measure=("robustness",),
        train={"steps": 20, "adversarial": "pgd", "adv_eps": 0.0},
    )
    row = run_one(spec)
    assert row["robust_eps"] == 0.0
    assert row["test_fgsm_accuracy"] == row["test_pgd_accuracy"] == row["test_clean_accuracy"]


def test_help_lists_the_options():
    res = study("--help")
    assert res.returncode == 0
    for flag in (*TUNED_FLAGS, "--eps", "--modes"):
        assert flag in res.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ranks", "16"], "--ranks 16 is too large for mnist"),
        (["--modes", "trades"], "unknown training mode 'trades'"),
        (["--eps", "8"], "--eps 8.0 is not a pixel radius"),
        (["--variants", "lorax"], "unknown variant 'lorax'"),
        (["--task", "text"], "task 'text' is not supported here"),
        (["--task-options", '{"angel": 30}'], "--task-options key 'angel' is unknown for task 'mnist'"),
    ],
)
def test_bad_input_is_refused_in_one_sentence(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        robustness.parse(args)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and message in err
    assert err.count(". ") == 0  # one sentence


def test_plot_only_without_a_csv_says_so(tmp_path, capsys):
    assert (
        robustness.main(
            ["--plot-only", "--out", str(tmp_path / "missing.csv"), "--figure", str(tmp_path / "f")]
        )
        == 1
    )
    assert "does not exist; run without --plot-only first" in capsys.readouterr().err
    assert not (tmp_path / "f.png").exists()
