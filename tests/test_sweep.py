"""Sweeps: one row per run, atomic writes, resume after a crash, executors, lr selection."""

import re

import pandas as pd
import pytest
from studyutil import stand_in_row

from lowrank import sweep as sw
from lowrank.sweep import RunSpec, best_lr, read_results, sweep, tuned_sweep

TRAIN = {"steps": 5, "batch_size": 32}


def fake_row(spec: RunSpec) -> dict:
    """A deterministic stand-in for a training run: dev metric peaks at lr = 1e-2."""
    score = -abs(__import__("math").log10(spec.lr) + 2) + 0.01 * (spec.rank or 0)
    return stand_in_row(spec, score, test_accuracy=score + spec.seed)


def grid(n_ranks=3):
    return [RunSpec("synthetic", "lora", r, seed=0, lr=0.0, train=TRAIN) for r in range(1, n_ranks + 1)]


def test_run_id_is_a_stable_function_of_the_whole_spec():
    a = RunSpec("synthetic", "lora", 4, 0, 1e-3, train=TRAIN)
    assert a.run_id == RunSpec("synthetic", "lora", 4, 0, 1e-3, train=dict(TRAIN)).run_id
    assert a.run_id != RunSpec("synthetic", "lora", 4, 1, 1e-3, train=TRAIN).run_id
    assert a.run_id != RunSpec("synthetic", "lora", 4, 0, 1e-3, train={"steps": 6}).run_id


# run_id and group_id of specs as the studies build them, computed before sweep.py became a
# package. Every results CSV resumes on these hashes: if one changes, re-running a study re-runs
# all its committed runs instead of skipping them. The first three are rows of the committed
# results/rank_ablation.csv (synthetic lora r=4, digits full) and results/spectra_runs.csv.
STUDY_TRAIN = {"steps": 300, "batch_size": 64, "eval_every": 300}
PINNED = [
    (
        RunSpec("synthetic", "lora", 4, seed=0, lr=0.01, train=STUDY_TRAIN),
        "b1f13037039f2ea7",
        "6a139ae65b879878",
    ),
    (
        RunSpec("digits", "full", None, seed=0, lr=0.003, train=STUDY_TRAIN),
        "d05c465822ddd28c",
        "d8c052ea5b859159",
    ),
    (
        RunSpec("digits", "rslora", 64, seed=0, lr=0.003, train=STUDY_TRAIN, measure=("weights",)),
        "1e6a72b68399e4b0",
        "a259aff804779ce8",
    ),
    (
        RunSpec(
            "digits",
            "dora",
            16,
            seed=1,
            lr=3e-2,
            task_options={"targets": ["fc1", "fc2"]},
            variant_options={"alpha": 32, "dropout": 0.1},
            train={"steps": 300},
            measure=("weights", "robustness"),
        ),
        "3f6a462d9f8e6952",
        "8504f87b2635e5b9",
    ),
    (RunSpec("t", "lora", 1, 0, 1e-2), "d32fe11246da525c", "fc5dfd96fa51c90f"),
]


@pytest.mark.parametrize(("spec", "run_id", "group_id"), PINNED)
def test_run_and_group_ids_are_those_the_committed_csvs_resume_on(spec, run_id, group_id):
    assert (spec.run_id, spec.group_id) == (run_id, group_id)


def test_saved_results_of_a_missing_or_empty_table_raises_naming_the_path(tmp_path):
    missing = tmp_path / "none.csv"
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(str(missing))} does not exist$"):
        sw.saved_results(missing)
    empty = tmp_path / "empty.csv"
    empty.write_text("run_id,task\n")
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(str(empty))} holds no rows$"):
        sw.saved_results(empty)
    empty.write_text("run_id,task\nabc,t\n")
    assert sw.saved_results(empty)["run_id"].tolist() == ["abc"]


def test_sweep_resumes_after_a_crash_without_losing_or_duplicating_rows(tmp_path, monkeypatch):
    out = tmp_path / "r.csv"
    specs = [RunSpec("t", "lora", r, 0, 1e-2) for r in range(1, 7)]
    calls = []

    def crashing(spec):
        calls.append(spec.rank)
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the 4th run
        return fake_row(spec)

    monkeypatch.setattr(sw.results, "run_one", crashing)
    with pytest.raises(KeyboardInterrupt):
        sweep(specs, out, progress=False)
    assert len(pd.read_csv(out)) == 3  # the three finished runs are on disk, complete
    monkeypatch.setattr(sw.results, "run_one", fake_row)
    df = sweep(specs, out, progress=False)
    on_disk = pd.read_csv(out)
    assert len(df) == len(on_disk) == 6
    assert on_disk[sw.KEY].is_unique
    assert sorted(on_disk["rank"]) == [1, 2, 3, 4, 5, 6]
    again = sweep(specs, out, progress=False)  # nothing left to do
    assert len(again) == 6


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    out = tmp_path / "r.csv"
    monkeypatch.setattr(sw.results, "run_one", fake_row)
    sweep([RunSpec("t", "lora", 1, 0, 1e-2)], out, progress=False)
    before = out.read_bytes()

    def broken(self, path, **kw):
        with open(path, "w") as f:
            f.write("run_id,task\ntruncat")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken)
    with pytest.raises(OSError, match="disk full"):
        sweep([RunSpec("t", "lora", 2, 0, 1e-2)], out, progress=False)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]  # no temporary file left


def test_a_csv_not_written_by_lowrank_is_never_overwritten(tmp_path):
    out = tmp_path / "mine.csv"
    out.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not written by a lowrank sweep"):
        sweep([RunSpec("t", "lora", 1, 0, 1e-2)], out, progress=False)
    assert out.read_text() == "a,b\n1,2\n"


def test_tuned_sweep_picks_the_dev_best_lr_and_reuses_it_for_other_seeds(tmp_path, monkeypatch):
    monkeypatch.setattr(sw.results, "run_one", fake_row)
    out = tmp_path / "r.csv"
    res = tuned_sweep(grid(2), [1e-3, 1e-2, 1e-1], [0, 1, 2], out, progress=False)
    assert set(res["lr"]) == {1e-2}
    assert len(res) == 2 * 3  # ranks × seeds
    assert len(read_results(out)) == 2 * 3 + 2 * 2  # + the search runs at other lrs, seed 0
    assert res["lr_selection"].str.contains("seed 0").all()
    on_disk = read_results(out)  # the CSV itself says which rows are reported, and how
    assert set(on_disk.loc[on_disk["lr_selected"], sw.KEY]) == set(res[sw.KEY])
    assert on_disk.loc[on_disk["lr_selected"], "lr_selection"].str.contains("best dev").all()


def test_best_lr_counts_diverged_runs_as_worst():
    rows = [fake_row(RunSpec("t", "lora", 1, 0, lr)) for lr in (1e-3, 1e-1)]
    rows.append(
        {**fake_row(RunSpec("t", "lora", 1, 0, 1e-2)), "status": "diverged", "dev_accuracy": float("nan")}
    )
    assert best_lr(pd.DataFrame(rows))["lr"].tolist() == [1e-3]  # tie at |log10 lr + 2| = 1


def test_lower_is_better_metrics_choose_the_minimum():
    rows = [
        {
            **fake_row(RunSpec("t", "lora", 1, 0, lr)),
            "metric": "mse",
            "higher_is_better": False,
            "dev_mse": lr,
        }
        for lr in (1e-3, 1e-2, 1e-1)
    ]
    assert best_lr(pd.DataFrame(rows))["lr"].tolist() == [1e-3]


def test_selection_metric_overrides_the_headline_metric():
    # headline metric favours lr=1e-1, the selection metric (what choices are made on) 1e-3
    rows = [
        {
            **fake_row(RunSpec("t", "lora", 1, 0, lr)),
            "metric": "delta_error",
            "higher_is_better": False,
            "selection_metric": "mse",
            "dev_delta_error": 1 / lr,
            "dev_mse": lr,
        }
        for lr in (1e-3, 1e-2, 1e-1)
    ]
    assert best_lr(pd.DataFrame(rows))["lr"].tolist() == [1e-3]


def test_chosen_on_is_the_selection_metric_with_the_headline_one_for_older_rows():
    mixed = pd.DataFrame({"metric": ["delta_error", "accuracy"], "selection_metric": ["mse", None]})
    assert sw.chosen_on(mixed).tolist() == ["mse", "accuracy"]
    assert sw.chosen_on(mixed.drop(columns="selection_metric")).tolist() == ["delta_error", "accuracy"]


def test_training_configurations_of_one_variant_get_their_own_learning_rate(tmp_path, monkeypatch):
    """Two training configs of the same (task, variant, rank) in one CSV: two searches, and
    neither un-marks the other's reported rows."""
    import math

    def row(spec):  # the dev optimum is at 1e-2 for 5 steps and at 1e-1 for 50 steps
        best = -2 if spec.train["steps"] == 5 else -1
        return {**fake_row(spec), "dev_accuracy": -abs(math.log10(spec.lr) - best)}

    monkeypatch.setattr(sw.results, "run_one", row)
    out, lrs = tmp_path / "r.csv", [1e-3, 1e-2, 1e-1]
    short = tuned_sweep(
        [RunSpec("t", "lora", 1, 0, 0.0, train={"steps": 5})], lrs, [0, 1], out, progress=False
    )
    long = tuned_sweep(
        [RunSpec("t", "lora", 1, 0, 0.0, train={"steps": 50})], lrs, [0, 1], out, progress=False
    )
    assert set(short["lr"]) == {1e-2} and set(long["lr"]) == {1e-1}
    df = read_results(out)
    assert df["lr_selected"].sum() == 4 and df[sw.GROUP].nunique() == 2
    assert sorted(sw.tuned_rows(df)["lr"]) == [1e-2, 1e-2, 1e-1, 1e-1]


def test_a_wider_grid_moves_the_mark_to_the_new_best_rate(tmp_path, monkeypatch):
    monkeypatch.setattr(sw.results, "run_one", fake_row)  # dev optimum at 1e-2
    out = tmp_path / "r.csv"
    tuned_sweep(grid(1), [1e-3], [0, 1], out, progress=False)
    tuned_sweep(grid(1), [1e-3, 1e-2], [0, 1], out, progress=False)
    df = read_results(out)
    assert set(df.loc[df["lr_selected"], "lr"]) == {1e-2} and df["lr_selected"].sum() == 2
    assert df.loc[~df["lr_selected"], "lr_selection"].isna().all()


def test_group_id_ignores_only_seed_and_lr():
    a = RunSpec("t", "lora", 1, 0, 1e-3, train={"steps": 5})
    assert a.group_id == RunSpec("t", "lora", 1, 2, 1e-1, train={"steps": 5}).group_id
    assert a.group_id != RunSpec("t", "lora", 1, 0, 1e-3, train={"steps": 6}).group_id
    assert a.group_id != RunSpec("t", "lora", 1, 0, 1e-3, train={"steps": 5}, measure=("weights",)).group_id


def test_each_spec_can_search_its_own_grid(tmp_path, monkeypatch):
    monkeypatch.setattr(sw.results, "run_one", fake_row)  # dev optimum at 1e-2
    out = tmp_path / "r.csv"
    specs = [RunSpec("t", "lora", 1, 0, 0.0), RunSpec("t", "full", None, 0, 0.0)]
    grids = {"lora": [1e-3, 1e-2, 1e-1], "full": [1e-5, 1e-4, 1e-3]}
    res = tuned_sweep(specs, lambda s: grids[s.variant], [0, 1], out, progress=False)
    assert dict(zip(res["variant"], res["lr"])) == {"lora": 1e-2, "full": 1e-3}
    df = read_results(out)
    assert {v: sorted(g["lr"].unique()) for v, g in df.groupby("variant")} == grids
    said = dict(zip(res["variant"], res["lr_selection"]))
    assert "lr 0.001/0.01/0.1 " in said["lora"] and "lr 1e-05/0.0001/0.001 " in said["full"]
    with pytest.raises(ValueError, match="grid of full .* is empty"):
        tuned_sweep(
            specs, lambda s: grids[s.variant] if s.variant == "lora" else [], [0], out, progress=False
        )


def peaked_at(best: float, calls: list | None = None):
    """A stand-in run whose dev accuracy peaks at lr = ``best`` (−|log10 lr − log10 best|)."""
    import math

    def row(spec):
        if calls is not None:
            calls.append(spec.lr)
        return {**fake_row(spec), "dev_accuracy": -abs(math.log10(spec.lr / best))}

    return row


def test_log_grid_is_half_decades_around_the_centre():
    assert sw.log_grid(1e-2) == [1e-3, 0.00316228, 1e-2, 0.0316228, 1e-1]
    assert sw.log_grid(1e-3, points=3, step=10) == [1e-4, 1e-3, 1e-2]
    with pytest.raises(ValueError, match="centre > 0"):
        sw.log_grid(0.0)


def test_an_optimum_past_the_grid_is_followed_until_it_is_interior(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sw.results, "run_one", peaked_at(0.3, calls))
    out = tmp_path / "r.csv"
    res = tuned_sweep(grid(1), [1e-2, 3e-2, 1e-1], [0, 1], out, extend=3, progress=False)
    # 0.1 is the top edge → 0.1²/0.03 = 0.333 is tried; it is the best and again an edge →
    # 0.333²/0.1 = 1.11 is tried; now 0.333 is interior and the search stops
    assert sorted(set(read_results(out).query("seed == 0")["lr"])) == [1e-2, 3e-2, 1e-1, 0.333333, 1.11111]
    assert set(res["lr"]) == {0.333333} and len(res) == 2
    assert res["lr_selection"].str.endswith("; interior").all()
    status = sw.search_status(read_results(out))
    assert status["status"].tolist() == ["interior"] and status["lr"].tolist() == [0.333333]
    n = len(calls)
    tuned_sweep(grid(1), [1e-2, 3e-2, 1e-1], [0, 1], out, extend=3, progress=False)
    assert len(calls) == n  # resumed: every extension was already in the CSV


def test_an_optimum_beyond_the_cap_is_reported_as_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(sw.results, "run_one", peaked_at(1e-5))
    out = tmp_path / "r.csv"
    res = tuned_sweep(grid(1), [1e-2, 3e-2, 1e-1], [0], out, extend=2, progress=False)
    tried = sorted(set(read_results(out)["lr"]))
    assert tried == [0.00111111, 0.00333333, 1e-2, 3e-2, 1e-1]  # two steps down, then the cap
    assert res["lr"].tolist() == [0.00111111]
    assert res["lr_selection"].str.endswith("; capped at the low edge after 2 extensions").all()
    assert sw.search_status(read_results(out))["status"].tolist() == ["low edge"]


def test_a_capped_search_resumes_without_stepping_further(tmp_path, monkeypatch):
    """Resuming repeats the first call's extensions from the CSV: a capped group is not
    extended again each time the study is re-run, and it is reported the same."""
    calls = []
    monkeypatch.setattr(sw.results, "run_one", peaked_at(1e-5, calls))
    out = tmp_path / "r.csv"
    first = tuned_sweep(grid(1), [1e-2, 3e-2, 1e-1], [0, 1], out, extend=2, progress=False)
    n, rows = len(calls), len(read_results(out))
    again = tuned_sweep(grid(1), [1e-2, 3e-2, 1e-1], [0, 1], out, extend=2, progress=False)
    assert len(calls) == n and len(read_results(out)) == rows
    assert again["lr"].tolist() == first["lr"].tolist() == [0.00111111] * 2
    assert again["lr_selection"].tolist() == first["lr_selection"].tolist()


def test_a_flat_search_is_reported_flat_and_not_extended(tmp_path, monkeypatch):
    """Every rate scoring the same (a variant that learns nothing at any of them) points to
    neither edge: the search is not stepped down by the tie-break, and says it is flat."""
    calls = []

    def flat(spec):
        calls.append(spec.lr)
        return {**fake_row(spec), "dev_accuracy": 0.0}

    monkeypatch.setattr(sw.results, "run_one", flat)
    out = tmp_path / "r.csv"
    res = tuned_sweep(grid(1), [1e-2, 3e-2, 1e-1], [0, 1], out, extend=3, progress=False)
    assert sorted(set(read_results(out)["lr"])) == [1e-2, 3e-2, 1e-1]  # nothing added
    assert res["lr"].tolist() == [1e-2, 1e-2]  # the tie goes to the lowest rate
    assert (
        res["lr_selection"]
        .str.endswith("; flat: every rate tried scored the same, so no rate is better and none was added")
        .all()
    )
    assert sw.search_status(read_results(out))["status"].tolist() == ["flat"]
    assert len(calls) == 4  # three searched, one more seed


def test_a_search_that_diverged_everywhere_steps_down(tmp_path, monkeypatch):
    """All rates diverging is not flat: the scores (all worst) leave the lowest rate chosen
    at the low edge, and the search goes lower."""

    def diverges_above(spec):
        row = fake_row(spec)
        return row if spec.lr < 1e-3 else {**row, "status": "diverged", "dev_accuracy": float("nan")}

    monkeypatch.setattr(sw.results, "run_one", diverges_above)
    out = tmp_path / "r.csv"
    res = tuned_sweep(grid(1), [1e-2, 3e-2, 1e-1], [0], out, extend=3, progress=False)
    assert min(read_results(out)["lr"]) < 1e-3 and res["lr"].tolist()[0] < 1e-3


def test_without_extension_the_grid_and_its_wording_are_as_before(tmp_path, monkeypatch):
    monkeypatch.setattr(sw.results, "run_one", peaked_at(1e-5))
    out = tmp_path / "r.csv"
    res = tuned_sweep(grid(1), [1e-2, 1e-1], [0], out, progress=False)
    assert sorted(set(read_results(out)["lr"])) == [1e-2, 1e-1]
    # the sentence every committed CSV holds, unchanged, so resumed studies rewrite nothing
    assert res["lr_selection"].tolist() == [
        "best dev accuracy of lr 0.01/0.1 at seed 0, reused for the other seeds"
    ]
    with pytest.raises(ValueError, match="extend=-1"):
        tuned_sweep(grid(1), [1e-2], [0], out, extend=-1, progress=False)


def test_the_search_summary_counts_where_each_choice_sits_and_what_it_cost():
    """Four searches (interior at 3 rates, interior at 5, at the low edge, flat), a second seed
    and a probe without a learning rate: only the seed-0 runs with a rate count."""
    dev = {
        "a": {1e-3: 0.5, 1e-2: 0.9, 1e-1: 0.4},
        "b": {1e-4: 0.1, 1e-3: 0.5, 1e-2: 0.6, 1e-1: 0.9, 1.0: 0.3},
        "c": {1e-3: 0.9, 1e-2: 0.8, 1e-1: 0.2},
        "d": {1e-3: 0.7, 1e-2: 0.7, 1e-1: 0.7},
    }
    base = {"task": "text", "rank": 8, "task_options": "{}", "variant_options": "{}", "metric": "accuracy"}
    rows = [
        base
        | {"group_id": g, "variant": g, "seed": 0, "lr": lr, "dev_accuracy": acc, "higher_is_better": True}
        for g, scores in dev.items()
        for lr, acc in scores.items()
    ]
    rows += [base | {"group_id": "a", "variant": "a", "seed": 1, "lr": 1e-2, "dev_accuracy": 0.8}]
    rows += [base | {"group_id": None, "variant": "probe", "seed": 0, "lr": None, "dev_accuracy": 0.6}]
    df = pd.DataFrame(rows).assign(higher_is_better=True)
    assert sw.search_summary(df) == (
        "4 learning-rate choices: 2 interior, 1 at the low edge, 1 flat; "
        "14 search runs at seed 0, 3–5 rates each"
    )
    assert sw.search_summary(df[df["group_id"] == "a"]) == (
        "1 learning-rate choice: 1 interior; 3 search runs at seed 0, 3 rates each"
    )
    assert sw.search_summary(df[df["seed"] == 1], search_seed=0) == "no learning-rate search at seed 0"
    twice = pd.concat([df, df]).assign(run_id=lambda d: [f"r{i % len(df)}" for i in range(len(d))])
    assert sw.search_summary(twice) == sw.search_summary(df)  # a run listed twice counts once
