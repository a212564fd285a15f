"""The linear-probe baseline's rows: fitted once per code, replaced when the code changes."""

import pandas as pd

from lowrank import probe
from lowrank.sweep import KEY, read_results
from lowrank.sweep.fingerprint import COLUMN


def test_a_probe_is_refitted_only_when_its_row_was_made_by_other_code(tmp_path, monkeypatch):
    fitted = []

    def fake_row(options):
        fitted.append(options["dataset"])
        return {KEY: probe.probe_id(options), "variant": "probe", COLUMN: probe.fingerprint()}

    monkeypatch.setattr(probe, "probe_row", fake_row)
    out = tmp_path / "r.csv"
    movies, trec = ({"dataset": d, "max_train": 64, "max_eval": 48} for d in ("movies", "trec"))
    run = {KEY: "run", "variant": "lora", COLUMN: "sweep"}
    stale = {KEY: probe.probe_id(trec), "variant": "probe", COLUMN: "older code"}
    pd.DataFrame([run, stale]).to_csv(out, index=False)
    probe.add_probes(out, [movies, trec])
    assert fitted == ["movies", "trec"]  # one missing, one made by other code
    df = read_results(out)
    assert df[KEY].tolist() == ["run", probe.probe_id(movies), probe.probe_id(trec)]
    assert (df.loc[df["variant"] == "probe", COLUMN] == probe.fingerprint()).all()
    probe.add_probes(out, [movies, trec])
    assert fitted == ["movies", "trec"] and read_results(out).equals(df)  # nothing to refit


def test_the_probe_id_is_the_one_the_committed_rows_carry():
    """The id hashes the options and the C grid as the first probe rows did (results/downstream.csv)."""
    options = {"dataset": "movies", "max_eval": 200, "max_train": 800}
    assert probe.probe_id(options) == "41df66bcf3dd92a8"
