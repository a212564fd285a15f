"""The ``lowrank`` command: every subcommand through ``lowrank.cli.main`` (in process, so it
is fast), plus one real ``python -m lowrank`` to check the module entry point."""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from adapter_cases import IN, OUT, RANK, TinyNet, build, perturb
from safetensors.torch import save_file

import lowrank as lr
from lowrank.cli import main

ROOT = Path(__file__).resolve().parent.parent


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- help and usage
@pytest.mark.parametrize(
    ("command", "words"),
    [
        ("ablate", ["--quick", "--plot-only", "--out", "--figure"]),
        ("plot", ["CSV", "--figure", "dev-chosen learning rate"]),
        ("inspect", ["PATH", "--json", "effective rank", "trainable"]),
        ("reconstruct", ["WEIGHTS", "--ranks", "--out", "--force", "Eckart"]),
    ],
)
def test_every_subcommand_explains_itself(capsys, command, words):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    text = " ".join(out.split())
    for w in words:
        assert w in text, f"{command} --help does not mention {w!r}"


def test_python_m_lowrank_lists_the_subcommands():
    res = subprocess.run(
        [sys.executable, "-m", "lowrank", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert res.returncode == 0
    for command in ("ablate", "plot", "inspect", "reconstruct"):
        assert command in res.stdout


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["reconstruct", "w.safetensors"],
        ["reconstruct", "w.safetensors", "--ranks", "0"],
        ["inspect"],
        ["inspect", "x", "--bogus"],
        ["ablate", "--ranks", "one"],
    ],
)
def test_bad_usage_exits_2(capsys, argv):
    code, _, err = run(capsys, *argv)
    assert code == 2 and "usage:" in err


# --------------------------------------------------------------------------- inspect
@pytest.fixture()
def saved_lora(tmp_path):
    model = lr.inject(TinyNet(), "lora", targets=["q", "v"], rank=3, alpha=6, modules_to_save=["out"])
    perturb(model)
    return model, lr.save_adapters(model, tmp_path / "lora-r3")


def test_inspect_reports_ranks_counts_and_spectra(capsys, saved_lora):
    model, path = saved_lora
    code, out, _ = run(capsys, "inspect", str(path), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["format_version"] == 1 and info["lowrank_version"] == lr.__version__
    layers = {row["name"]: row for row in info["layers"]}
    assert set(layers) == {"q", "v"}
    for name, ad in lr.adapters(model).items():
        row = layers[name]
        assert (row["variant"], row["rank"]) == ("lora", 3)
        assert (row["out_features"], row["in_features"]) == (ad.out_features, ad.in_features)
        assert row["trainable_params"] == ad.num_trainable() == 3 * (ad.in_features + 10)
        dW = ad.delta_weight().detach()
        assert row["delta"]["effective_rank"] == pytest.approx(lr.analysis.effective_rank(dW), rel=1e-5)
        assert row["delta"]["fro_norm"] == pytest.approx(float(dW.norm()), rel=1e-5)
        assert row["delta"]["rank90"] == lr.analysis.rank_for_energy(dW, 0.9)
    assert info["modules_to_save"] == ["out"] and info["modules_to_save_params"] == 33
    total = sum(ad.num_trainable() for ad in lr.adapters(model).values()) + 33
    assert info["trainable_params"] == total
    assert total == sum(p.numel() for p in model.parameters() if p.requires_grad)

    code, out, _ = run(capsys, "inspect", str(path))
    assert code == 0
    assert f"{total} trainable parameters" in out
    table = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.split()[:2] in (["q", "lora"], ["v", "lora"])
    }
    ad = lr.adapters(model)["q"]
    eff = lr.analysis.effective_rank(ad.delta_weight().detach())
    assert table["q"][2:5] == ["10x8", "3", str(ad.num_trainable())]
    assert float(table["q"][6]) == pytest.approx(eff, rel=1e-3)


@pytest.mark.parametrize(("given", "used"), [([], 1), (["--threads", "2"], 2)])
def test_inspect_and_reconstruct_run_their_svds_on_threads_threads(
    capsys, monkeypatch, saved_lora, given, used
):
    """One torch thread unless --threads says otherwise: many small SVDs gain nothing from more,
    and on a busy machine lose (11 s against over 580 s for a MiniLM adapter)."""
    import torch

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    _, path = saved_lora
    assert run(capsys, "inspect", str(path), *given)[0] == 0
    weights = next(path.glob("*.safetensors"))
    assert run(capsys, "reconstruct", str(weights), "--ranks", "1", *given)[0] == 0
    assert calls == [used, used]


@pytest.mark.parametrize("variant", lr.variants())
def test_inspect_agrees_with_the_adapter_for_every_variant(capsys, tmp_path, variant):
    """Trainable counts from the file equal num_trainable(); ΔW from the file alone equals
    delta_weight() wherever it can be computed without W₀, and where not the note says why."""
    ad, *_ = build(variant, {}, dtype=torch.float32)
    perturb(ad)
    model = torch.nn.Sequential(ad)
    lr.save_adapters(model, tmp_path / variant)
    code, out, _ = run(capsys, "inspect", str(tmp_path / variant), "--json")
    assert code == 0
    (row,) = json.loads(out)["layers"]
    assert (row["out_features"], row["in_features"]) == (OUT, IN)
    assert row["trainable_params"] == ad.num_trainable()
    if lr.variant_class(variant).delta_needs_w0:
        assert row["delta"] is None and row["note"] == lr.variant_class(variant).delta_needs_w0
        assert "W₀" in row["note"]
    else:
        assert row["note"] == ""
        dW = ad.delta_weight().detach()
        assert float(dW.norm()) > 0.01
        expected = lr.analysis.spectrum_summary(dW)
        for key in ("fro_norm", "effective_rank", "stable_rank"):
            assert row["delta"][key] == pytest.approx(expected[key], rel=1e-5), key
    assert row["rank"] == ad.rank == (RANK if lr.variant_class(variant).takes_rank else min(OUT, IN))


def test_inspect_a_layer_its_options_do_not_rebuild_fails_with_one_line(capsys, tmp_path):
    """A file from another lowrank (an option this one does not know) is refused in one sentence
    that names the layer and the option, not with a traceback."""
    model = lr.inject(TinyNet(), "vera", targets=["q"], rank=2)
    path = lr.save_adapters(model, tmp_path / "vera")
    config = json.loads((path / "adapter_config.json").read_text())
    config["layers"]["q"]["options"]["bogus"] = 1
    (path / "adapter_config.json").write_text(json.dumps(config))
    code, out, err = run(capsys, "inspect", str(path))
    assert code == 1 and out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("lowrank: error: layer 'q' does not rebuild as a 'vera' adapter") and "bogus" in err


def test_inspect_a_damaged_adapter_fails_with_one_line(capsys, saved_lora):
    _, path = saved_lora
    (path / "adapter.safetensors").write_bytes(b"not a safetensors file")
    code, out, err = run(capsys, "inspect", str(path))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "damaged" in err and "Traceback" not in err
    code, _, err = run(capsys, "inspect", str(path.parent / "nowhere"))
    assert code == 1 and "is not an adapter directory" in err


# --------------------------------------------------------------------------- reconstruct
MATRICES = {
    "diag": torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])),
    "wide": torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]]),
    "zero": torch.zeros(2, 2),
}
# Hand-computed: diag(4, 3, 2, 1) has σ = 4, 3, 2, 1 and ‖W‖²_F = 30, so the best rank-r
# approximation leaves √(Σ_{i>r} σᵢ²/30); "wide" has σ = 2, 1 (‖W‖²_F = 5); r ≥ rank(W) and
# W = 0 leave nothing.
EXPECTED = {
    ("diag", 1): math.sqrt(14 / 30),
    ("diag", 2): math.sqrt(5 / 30),
    ("diag", 3): math.sqrt(1 / 30),
    ("diag", 4): 0.0,
    ("diag", 6): 0.0,
    ("wide", 1): math.sqrt(1 / 5),
    ("wide", 2): 0.0,
    ("wide", 3): 0.0,
    ("wide", 4): 0.0,
    ("wide", 6): 0.0,
    **{("zero", r): 0.0 for r in (1, 2, 3, 4, 6)},
}


@pytest.fixture()
def weights(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(
        {
            **MATRICES,
            "bias": torch.ones(4),  # 1-D: not a matrix, skipped
            "ids": torch.arange(4).reshape(2, 2),
        },
        path,
    )  # integer: skipped
    return path


def test_reconstruct_table_and_csv_match_hand_computed_errors(capsys, tmp_path, weights):
    code, out, _ = run(capsys, "reconstruct", str(weights), "--ranks", "1", "2", "3", "4", "6")
    assert code == 0
    rows = {line.split()[0]: line.split()[2:] for line in out.splitlines()[3:]}
    assert set(rows) == {"diag", "wide", "zero"}
    assert [float(v) for v in rows["diag"]] == pytest.approx(
        [EXPECTED["diag", r] for r in (1, 2, 3, 4, 6)], abs=1e-4
    )

    out_csv = tmp_path / "errors.csv"
    code, _, _ = run(
        capsys, "reconstruct", str(weights), "--ranks", "1", "2", "3", "4", "6", "--out", str(out_csv)
    )
    assert code == 0
    df = pd.read_csv(out_csv)
    assert list(df.columns) == ["tensor", "out_features", "in_features", "rank", "relative_error"]
    got = {(t, r): e for t, r, e in zip(df["tensor"], df["rank"], df["relative_error"])}
    assert set(got) == set(EXPECTED)
    for (name, r), value in EXPECTED.items():
        assert got[name, r] == pytest.approx(value, abs=1e-12), (name, r)
        W = MATRICES[name].double()
        if r <= min(W.shape) and name != "zero":  # the library's Eckart–Young error agrees
            ey = float(lr.linalg.eckart_young_error(W, r)) / float(W.square().sum())
            assert got[name, r] == pytest.approx(math.sqrt(ey), abs=1e-12)


def test_reconstruct_refuses_to_overwrite_without_force(capsys, tmp_path, weights):
    out_csv = tmp_path / "mine.csv"
    out_csv.write_text("precious\n")
    code, _, err = run(capsys, "reconstruct", str(weights), "--ranks", "1", "--out", str(out_csv))
    assert code == 1 and "--force" in err and err.count("\n") == 1
    assert out_csv.read_text() == "precious\n"
    code, _, _ = run(capsys, "reconstruct", str(weights), "--ranks", "1", "--out", str(out_csv), "--force")
    assert code == 0 and len(pd.read_csv(out_csv)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.csv", "w.safetensors"]


def test_reconstruct_a_damaged_file_fails_with_one_line(capsys, tmp_path, weights):
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    code, out, err = run(capsys, "reconstruct", str(weights), "--ranks", "1")
    assert code == 1 and out == ""
    assert err.startswith("lowrank: error: ") and err.count("\n") == 1
    assert "not a readable safetensors file" in err and "Traceback" not in err
    code, _, err = run(capsys, "reconstruct", str(tmp_path / "missing.safetensors"), "--ranks", "1")
    assert code == 1 and err.count("\n") == 1


# --------------------------------------------------------------------------- ablate and plot
def test_ablate_quick_then_plot_redraws_from_the_csv(capsys, tmp_path):
    out, fig = tmp_path / "ra.csv", tmp_path / "ra"
    code, stdout, err = run(
        capsys,
        "ablate",
        "--quick",
        "--quiet",
        "--workers",
        "1",
        "--ranks",
        "1",
        "--steps",
        "50",
        "--out",
        str(out),
        "--figure",
        str(fig),
    )
    assert code == 0, err
    df = pd.read_csv(out)
    assert set(df["variant"]) == {"full", "lora"} and (df["status"] == "ok").all()
    assert fig.with_suffix(".png").stat().st_size > 10_000
    fig2 = tmp_path / "again"
    code, stdout, _ = run(capsys, "plot", str(out), "--figure", str(fig2))
    assert code == 0 and str(fig2.with_suffix(".pdf")) in stdout
    assert fig2.with_suffix(".pdf").read_bytes().startswith(b"%PDF")
    assert len(pd.read_csv(out)) == len(df)  # nothing was trained


def test_plot_the_committed_results_without_touching_them(capsys, tmp_path):
    csv = ROOT / "results" / "rank_ablation.csv"
    before = hashlib.sha256(csv.read_bytes()).hexdigest()
    code, _, err = run(capsys, "plot", str(csv), "--figure", str(tmp_path / "fig"))
    assert code == 0, err
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    assert hashlib.sha256(csv.read_bytes()).hexdigest() == before


def test_plot_without_results_fails_with_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "plot", str(tmp_path / "none.csv"))
    assert code == 1 and "does not exist" in err and err.count("\n") == 1


def test_ablate_runs_from_the_package_alone_under_the_current_directory(tmp_path):
    """The ablation is part of the library: an installed package (lowrank/ without the studies/
    folder beside it) runs it, names itself `lowrank ablate` and writes under the working
    directory."""
    shutil.copytree(ROOT / "lowrank", tmp_path / "site" / "lowrank")
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    cmd = [sys.executable, "-m", "lowrank", "ablate"]
    res = subprocess.run([*cmd, "--help"], capture_output=True, text=True, cwd=work, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: lowrank ablate ") and "--plot-only" in res.stdout
    res = subprocess.run(
        [*cmd, "--quick", "--quiet", "--workers", "1", "--ranks", "1", "--steps", "20", "--lr-grid", "1e-2"],
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (work / "results" / "rank_ablation_quick.csv").exists()
    assert (work / "paper_figures" / "rank_ablation_quick.png").exists()


def test_ablate_plot_only_reads_the_csv_it_is_given(capsys, tmp_path):
    csv = ROOT / "results" / "rank_ablation.csv"
    code, out, err = run(
        capsys, "ablate", "--plot-only", "--out", str(csv), "--figure", str(tmp_path / "fig")
    )
    assert code == 0, err
    assert f"figure: {tmp_path / 'fig.pdf'}" in out and (tmp_path / "fig.png").exists()
