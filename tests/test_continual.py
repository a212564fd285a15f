"""The continual study end to end (--quick), and its measurements recomputed independently:
forgetting from the pretrained model, the full fine-tuning ΔW spectrum and intruder count from
W − W₀ of a retrained run, and the rank of LoRA's ΔW."""

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from studyutil import RUN_COLUMNS, TUNED_FLAGS, assert_figure, load_study, run_study

import lowrank as lr
from lowrank.tasks.mnist import load_mnist
from lowrank.train import TrainConfig, seed_everything, train

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "studies" / "continual.py"
COLUMNS = RUN_COLUMNS | {
    "task_options",
    "test_accuracy",
    "test_old_accuracy",
    "test_forgetting",
    "dev_accuracy",
    "weights",
    "lr_selected",
    "lr_selection",
    "trainable_params",
    "steps",
    "batch_size",
}


def run(*args: str) -> subprocess.CompletedProcess:
    # a guard against a hang, not a speed test: on a fresh cache the first run pretrains the MNIST
    # model (270 s on one idle core), and CI's other test processes share the cores
    return run_study("continual.py", *args, timeout=900)


def study():
    return load_study("continual.py")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    d = tmp_path_factory.mktemp("continual")
    out, fig = d / "c.csv", d / "c"
    res = run("--quick", "--quiet", "--workers", "1", "--out", out, "--figure", fig)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, fig, res.stdout, pd.read_csv(out)


def test_quick_writes_csv_and_figure_and_redraws(quick):
    out, fig, stdout, df = quick
    assert COLUMNS <= set(df.columns) and (df["status"] == "ok").all()
    assert set(df["task"]) == {"digits", "mnist"} and set(df["variant"]) == {"full", "lora"}
    assert set(df["rank"].dropna()) == {1, 4}
    assert "forgetting at matched new-task accuracy" in stdout and "intruders" in stdout
    assert_figure(fig)
    before = out.stat().st_mtime_ns
    for ext in (".pdf", ".png"):
        fig.with_suffix(ext).unlink()
    assert study().main(["--quick", "--plot-only", "--out", str(out), "--figure", str(fig)]) == 0
    assert_figure(fig)
    assert out.stat().st_mtime_ns == before and len(pd.read_csv(out)) == len(df)


def test_plot_only_without_a_csv_says_so_in_one_line(tmp_path, capsys):
    code = study().main(["--plot-only", "--out", str(tmp_path / "none.csv"), "--figure", str(tmp_path / "f")])
    err = capsys.readouterr().err
    assert code == 1 and err.strip().count("\n") == 0
    assert "does not exist; run without --plot-only first" in err


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        study().parse(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for flag in (*TUNED_FLAGS, "--task-options"):
        assert flag in out


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--task", "mnist", "--ranks", "16"],
            "rank 16 is invalid for task mnist, whose adapted layer out (10×256) admits ranks up to 10",
        ),
        (["--variants", "lorax"], "unknown variant 'lorax'"),
        (["--task", "digits", "--task-options", '{"mnist": {}}'], "names task 'mnist', which is not"),
        (["--task", "mnist", "--task-options", '{"mnist": {"shift": "flip"}}'], "shift='flip' is unknown"),
    ],
)
def test_bad_input_is_refused_with_one_sentence(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        study().parse(args)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and message in last
    assert last.count(". ") == 0  # one sentence


def old_test_set(task_name: str, options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The old task's test split, read without the task's evaluation code."""
    if task_name == "digits":
        return lr.tasks.get("digits").old["test"].tensors
    x, y = load_mnist()["test"]
    n = options.get("n_eval") or len(y)
    return x[:n], y[:n]


def test_forgetting_is_the_pretrained_old_accuracy_minus_the_adapted_one(quick):
    df = quick[3]
    for (task_name, opts), rows in df.groupby(["task", "task_options"]):
        options = json.loads(opts)
        x, y = old_test_set(task_name, options)
        base = lr.tasks.get(task_name, **options).pretrained()
        with torch.no_grad():
            before = (base(x).argmax(-1) == y).double().mean().item()
        assert before > 0.9  # the pretrained model does solve its old task
        # accuracies are k/n in float32: exact to ~1e-7
        assert (rows["test_forgetting"] - (before - rows["test_old_accuracy"])).abs().max() < 1e-6
        assert rows["test_old_accuracy"].between(0, 1).all()


def test_intruder_counts_are_per_layer_integers_and_lora_updates_have_rank_r(quick):
    df = quick[3]
    for row in df.to_dict("records"):
        for layer, rep in json.loads(row["weights"]).items():
            assert isinstance(rep["intruders"], int) and 0 <= rep["intruders"] <= min(10, *rep["shape"])
            sv = torch.tensor(rep["sv"])
            assert (sv[:-1] >= sv[1:]).all()
            if row["variant"] == "lora":  # ΔW = s·BA: nothing beyond σ_r but float32 rounding
                r = int(row["rank"])
                assert sv[r - 1] > 0 and sv[r:].max() < 1e-4 * sv[0], (layer, r, sv[: r + 2])


def intruders(W: torch.Tensor, W0: torch.Tensor, k: int = 10, eps: float = 0.5) -> int:
    """Top-k left singular vectors of W whose best |cos| with W₀'s left singular vectors < ε."""
    U = torch.linalg.svd(W.double())[0][:, :k]
    U0 = torch.linalg.svd(W0.double())[0]
    return int(((U.T @ U0).abs().max(dim=1).values < eps).sum())


def test_full_fine_tuning_spectrum_is_that_of_w_minus_w0(quick):
    """Retrain the quick digits full fine-tuning run and read W − W₀ off the plain layers."""
    row = quick[3].query("task == 'digits' and variant == 'full'").iloc[0]
    task = lr.tasks.get("digits")
    config = TrainConfig(
        steps=int(row["steps"]),
        batch_size=int(row["batch_size"]),
        lr=float(row["lr"]),
        seed=int(row["seed"]),
        warmup=float(row["warmup"]),
        clip=float(row["clip"]),
        weight_decay=float(row["weight_decay"]),
        eval_every=int(row["eval_every"]),
        quiet=True,
    )
    seed_everything(config.seed)
    model = lr.inject(task.pretrained(), "full", targets=task.targets, seed=config.seed)
    metrics = train(model, task, config).metrics
    assert metrics["test_accuracy"] == pytest.approx(row["test_accuracy"], abs=1e-6)
    fresh = task.pretrained()
    report = json.loads(row["weights"])
    assert set(report) == {"fc1", "fc2"}
    for name, rep in report.items():
        W, W0 = model.get_submodule(name).base.weight.detach(), fresh.get_submodule(name).weight
        sv = torch.linalg.svdvals((W - W0).double())
        assert rep["rank"] == min(W.shape)
        # same run, same thread count: only the float64 SVD's rounding differs
        reported = torch.tensor(rep["sv"], dtype=torch.float64)
        torch.testing.assert_close(reported, sv[:64], rtol=1e-5, atol=1e-7)
        assert rep["intruders"] == intruders(W, W0)
