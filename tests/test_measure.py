"""Measurements a sweep row can carry after training (RunSpec.measure): the per-layer weight
report and the robust accuracies, each checked against an independent computation."""

import json
from dataclasses import asdict

import pytest
import torch
from torch import nn

import lowrank as lr
from lowrank import analysis as an
from lowrank.sweep import (
    MEASURES,
    RunSpec,
    decode_correct,
    encode_correct,
    read_results,
    run_one,
    write_atomic,
)
from lowrank.train import TrainConfig, fgsm, pgd, robust_accuracy, train


def test_an_empty_measure_keeps_the_run_id_of_specs_written_before_it_existed():
    spec = RunSpec("digits", "lora", 4, 0, 1e-2, train={"steps": 5})
    old = {k: v for k, v in asdict(spec).items() if k != "measure"}
    assert spec.canonical() == json.dumps(old, sort_keys=True, default=str)
    measured = RunSpec("digits", "lora", 4, 0, 1e-2, train={"steps": 5}, measure=("weights",))
    assert measured.run_id != spec.run_id


def test_weight_report_of_a_planted_update():
    """B·A with B, A set by hand: ΔW = u vᵀ·3 + u₂ v₂ᵀ·1, so σ = (3, 1, 0, …)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    lr.inject(model, "lora", targets=["0"], rank=2)
    ad = lr.adapters(model)["0"]
    with torch.no_grad():
        ad.A.zero_()
        ad.B.zero_()
        ad.A[0, 0], ad.A[1, 1] = 3.0, 1.0
        ad.B[2, 0], ad.B[3, 1] = 1.0, 1.0
    rep = an.weight_report(model)["0"]
    assert rep["variant"] == "lora" and rep["rank"] == 2 and rep["shape"] == [5, 6]
    assert rep["sv"][:2] == pytest.approx([3.0, 1.0], abs=1e-12) and max(rep["sv"][2:]) < 1e-12
    assert rep["fro_norm"] == pytest.approx(10**0.5, rel=1e-12)
    assert rep["stable_rank"] == pytest.approx(10 / 9, rel=1e-12)
    assert rep["energy_in_rank"] == pytest.approx(1.0, rel=1e-12)
    assert rep["rank90"] == 1  # 9 of 10 is exactly 90 %
    W0 = ad.base.weight.detach().double()
    assert rep["w0_norm"] == pytest.approx(float(W0.norm()), rel=1e-12)
    dW = ad.delta_weight().detach().double()
    assert rep["intruders"] == an.intruder_dimensions(W0 + dW, W0)
    assert (rep["delta_magnitude"], rep["delta_direction"]) == pytest.approx(
        an.magnitude_direction(W0 + dW, W0), rel=1e-12
    )


def test_weight_report_of_full_fine_tuning_is_w_minus_w0():
    model = nn.Sequential(nn.Linear(4, 4))
    lr.inject(model, "full", targets=["0"])
    with torch.no_grad():
        model[0].base.weight.add_(torch.eye(4) * 0.5)
    rep = an.weight_report(model)["0"]
    assert rep["sv"] == pytest.approx([0.5] * 4, abs=1e-7)
    assert rep["effective_rank"] == pytest.approx(4.0, rel=1e-6)


@pytest.fixture(scope="module")
def trained_digits():
    task = lr.tasks.get("digits")
    model = lr.inject(task.pretrained(), "lora", targets=task.targets, rank=4, seed=0)
    train(model, task, TrainConfig(steps=200, lr=3e-2, quiet=True))
    return task, model


def test_robust_accuracy_without_attack_is_the_task_accuracy(trained_digits):
    task, model = trained_digits
    assert robust_accuracy(model, task, "test", None) == pytest.approx(
        task.evaluate(model, "test")["accuracy"], abs=1e-6
    )  # the task's mean is float32
    assert robust_accuracy(model, task, "test", fgsm(0.0)) == robust_accuracy(model, task, "test", None)


def test_attacks_lower_accuracy_and_pgd_is_at_least_as_strong(trained_digits):
    task, model = trained_digits
    clean = robust_accuracy(model, task, "test", None)
    weak = robust_accuracy(model, task, "test", fgsm(0.02))
    strong = robust_accuracy(model, task, "test", fgsm(0.2))
    p = robust_accuracy(model, task, "test", pgd(0.2, 10))
    assert clean > 0.8 and strong < weak <= clean
    assert p <= strong + 0.02  # PGD from a random start: at least FGSM's damage, up to noise
    assert model.training  # the model's mode is restored


def test_run_one_adds_the_measured_columns():
    spec = RunSpec("digits", "lora", 2, 0, 1e-2, train={"steps": 10}, measure=("weights", "robustness"))
    row = run_one(spec)
    report = json.loads(row["weights"])
    assert set(report) == {"fc1", "fc2"} and report["fc1"]["rank"] == 2
    assert len(report["fc2"]["sv"]) == 64  # the top 64 of min(128, 128)
    assert row["test_clean_accuracy"] == pytest.approx(row["test_accuracy"], abs=1e-6)
    assert row["test_pgd_accuracy"] <= row["test_clean_accuracy"]
    assert row["robust_eps"] == TrainConfig().adv_eps


def test_an_unknown_measure_is_one_sentence():
    with pytest.raises(ValueError, match=r"measure \['spectra'\] is unknown; choose from weights"):
        run_one(RunSpec("digits", "lora", 2, 0, 1e-2, measure=("spectra",)))
    assert set(MEASURES) == {"weights", "robustness", "predictions"}


def test_every_row_carries_its_dev_curve():
    spec = RunSpec("digits", "lora", 2, 0, 1e-2, train={"steps": 30, "batch_size": 64, "eval_every": 10})
    row = run_one(spec)
    curve = json.loads(row["dev_curve"])
    assert [step for step, _ in curve] == [10, 20, 30]  # each evaluation, the last at the end
    assert curve[-1][1] == pytest.approx(row["dev_accuracy"], rel=1e-5)  # 6 significant digits
    assert all(0 <= acc <= 1 for _, acc in curve)


def test_predictions_are_the_test_split_scored_example_by_example():
    spec = RunSpec("digits", "lora", 4, 0, 3e-2, train={"steps": 60}, measure=("predictions",))
    row = run_one(spec)
    task = lr.tasks.get("digits")
    scores = decode_correct(row["test_correct"])
    assert len(scores) == len(task.split("test")) == 179 and set(scores) == {0.0, 1.0}
    # test_accuracy is a float32 mean of the same 0/1 scores: within float32's rounding of k/n
    assert row["test_accuracy"] == pytest.approx(scores.mean(), abs=1e-7)
    assert len(row["test_correct"]) == len(scores)  # one byte per example
    assert spec.run_id != RunSpec("digits", "lora", 4, 0, 3e-2, train={"steps": 60}).run_id


def test_scores_survive_the_csv_with_their_leading_zeros(tmp_path):
    import pandas as pd

    text = encode_correct(torch.tensor([False, False, True, True, False]))
    assert text == "00110"
    write_atomic(pd.DataFrame({"run_id": ["a", "b"], "test_correct": [text, None]}), tmp_path / "r.csv")
    df = read_results(tmp_path / "r.csv")
    assert df["test_correct"].iloc[0] == "00110" and pd.isna(df["test_correct"].iloc[1])
    assert decode_correct(df["test_correct"].iloc[0]).tolist() == [0, 0, 1, 1, 0]
    naive = pd.read_csv(tmp_path / "r.csv")["test_correct"].iloc[0]  # pandas alone: the number 110
    with pytest.raises(
        ValueError,
        match=r"test_correct=.* is not a string of 0s and 1s; read the CSV "
        r"with lowrank.sweep.read_results",
    ):
        decode_correct(naive)


def test_a_task_without_per_example_scores_says_so_before_training(monkeypatch):
    import lowrank.sweep.run as run

    monkeypatch.setattr(run, "train", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(
        ValueError,
        match="measure 'predictions' needs per-example test scores, which "
        "task 'synthetic' .* classification task: digits, mnist, text",
    ):
        run_one(RunSpec("synthetic", "lora", 2, 0, 1e-2, measure=("predictions",)))
