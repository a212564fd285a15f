"""A new variant is its own class and nothing else (issue 13): a toy variant, defined and
registered in this file alone, passes the identity suite, trains through a sweep, saves and
loads, is read by ``lowrank inspect``, and is drawn by the spectra and rank-ablation figures in
the shared style.

The toy is registered only where it is used, so no other test sees it: in a subprocess that runs
the real suite filtered to it (this module is loaded there as a plugin, ``-p test_toy_variant``,
whose ``pytest_configure`` registers it before the test modules parametrise over
``lr.variants()``), and in this process for one test at a time (the ``toy`` fixture).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from adapter_cases import TinyNet, fresh_copy, perturb
from studyutil import assert_figure, load_study
from torch import Tensor, nn

import lowrank as lr
from lowrank import cli, plots
from lowrank.adapters import registry
from lowrank.sweep import RunSpec, tuned_sweep

NAME = "toy_diagonal"
TESTS = Path(__file__).resolve().parent
# The suites parametrised over lr.variants(): the contract identities, save/load, the command
# line, bad input, inject/merge/strip, half precision and the meta device.
SUITE = [
    "test_adapters.py",
    "test_io.py",
    "test_cli.py",
    "test_bad_input.py",
    "test_inject.py",
    "test_mixed_precision.py",
    "test_meta_device.py",
]


class Diagonal(lr.Adapter):
    """Toy: ΔW = s·diag(d) on the first r diagonal entries of the (out × in) layer, s = α/r;
    d ∈ ℝ^r starts at 0. Trainable: r."""

    name = NAME
    display_name = "toy diagonal"
    max_rank_reason = "ΔW has min(out, in) diagonal entries"

    @classmethod
    def max_rank(cls, out_f: int, in_f: int, **options: Any) -> int:
        return min(out_f, in_f)

    @classmethod
    def trainable_shapes(
        cls, out_f: int, in_f: int, rank: int, bias: bool = True, **options: Any
    ) -> dict[str, tuple[int, ...]]:
        return {"d": (rank,)}

    def __init__(self, base: nn.Linear, **common: Any) -> None:
        super().__init__(base, **common)
        self.d = nn.Parameter(torch.zeros_like(self._new(self.rank)))

    def delta_weight(self) -> Tensor:
        r = self.rank
        return F.pad(torch.diag(self.d), (0, self.in_features - r, 0, self.out_features - r)) * self.scale


def pytest_configure(config: pytest.Config) -> None:
    """Loaded as a plugin (the subprocess of :func:`test_the_identity_suite_passes_on_the_toy`):
    register the toy there. A test module's own hooks are not called, so this process never
    registers it here."""
    lr.register(Diagonal)


@pytest.fixture()
def toy(monkeypatch: pytest.MonkeyPatch) -> type[Diagonal]:
    """The toy registered for one test; the registry is the original one again afterwards."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    lr.register(Diagonal)
    return Diagonal


def test_the_toy_is_registered_only_where_it_is_used(toy):
    assert NAME in lr.variants() and lr.variant_class(NAME) is Diagonal


def test_the_toy_is_not_registered_outside_its_fixture():
    assert NAME not in lr.variants()


def test_the_identity_suite_passes_on_the_toy(tmp_path):
    """The real suites, filtered to the toy's cases and, for comparison, LoHa's (a variant with
    no test_options): every case passes, none is skipped, and the toy gets exactly LoHa's cases."""
    report = tmp_path / "suite.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-n",
        "0",
        "-p",
        "no:randomly",
        "-p",
        "no:cacheprovider",
        "-p",
        "test_toy_variant",
        "-k",
        f"{NAME} or loha",
        f"--junitxml={report}",
        *(str(TESTS / f) for f in SUITE),
    ]
    res = subprocess.run(cmd, cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    cases = list(ET.parse(report).getroot().iter("testcase"))
    for case in cases:
        assert not [c.tag for c in case], f"{case.get('name')}: {[c.tag for c in case]}"
    ids = {(case.get("classname").rpartition(".")[2], case.get("name")) for case in cases}
    mine = {i for i in ids if NAME in i[1]}
    assert mine == {(f, name.replace("loha", NAME)) for f, name in ids - mine}
    assert {f for f, _ in mine} == {f.removesuffix(".py") for f in SUITE}
    assert {
        "test_merge_equivalence[toy_diagonal-f32]",
        "test_identity_at_init[toy_diagonal-f64]",
        "test_gradients_reach_only_trainable_parameters[toy_diagonal]",
        "test_save_then_load_into_a_fresh_model_is_exact[toy_diagonal]",
        "test_inspect_agrees_with_the_adapter_for_every_variant[toy_diagonal]",
    } <= {name for _, name in mine}


def test_save_load_and_inspect(toy, tmp_path, capsys):
    pristine = TinyNet()
    model = lr.inject(fresh_copy(pristine), NAME, targets=["q", "v"], rank=3, alpha=6.0)
    perturb(model)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    path = lr.save_adapters(model.eval(), tmp_path / "toy")
    fresh = lr.load_adapters(fresh_copy(pristine), path).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert cli.main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for row in info["layers"]:
        ad = lr.adapters(model)[row["name"]]
        assert (row["variant"], row["rank"], row["note"]) == (NAME, 3, "")
        assert row["trainable_params"] == ad.num_trainable() == 3
        dW = ad.delta_weight().detach().double()
        assert row["delta"]["fro_norm"] == pytest.approx(float(dW.norm()), rel=1e-6)  # f32 values
        assert row["delta"]["rank90"] == lr.analysis.rank_for_energy(dW, 0.9)
    assert info["trainable_params"] == 6
    assert cli.main(["inspect", str(path)]) == 0
    table = [line.split()[:4] for line in capsys.readouterr().out.splitlines()]
    assert ["q", NAME, "10x8", "3"] in table and ["v", NAME, "10x10", "3"] in table


@pytest.fixture()
def toy_runs(toy, tmp_path) -> pd.DataFrame:
    """A real sweep of the toy, LoRA and full fine-tuning on the synthetic task, weights measured."""
    train = {"steps": 30, "batch_size": 32, "eval_every": 30}
    specs = [
        RunSpec("synthetic", v, r, 0, 0.0, train=train, measure=("weights",))
        for v, r in [(NAME, 1), (NAME, 2), ("lora", 1), ("lora", 2), ("full", None)]
    ]
    rows = tuned_sweep(specs, [1e-2], [0, 1], tmp_path / "runs.csv", progress=False)
    assert (rows["status"] == "ok").all() and set(rows["variant"]) == {NAME, "lora", "full"}
    return rows


def test_the_spectra_figure_draws_the_toy_among_the_others(toy_runs, tmp_path, monkeypatch):
    spectra = load_study("spectra.py")
    table = spectra.spectra_table(toy_runs)
    assert set(table["variant"]) == {NAME, "lora", "full"}
    assert spectra.ba_family([NAME, "lora"]) == ["lora"]  # ΔW = s·diag(d) is not s·(BA − B₀A₀)
    drawn = []
    save = plots.save
    monkeypatch.setattr(plots, "save", lambda fig, stem: drawn.append(fig) or save(fig, stem))
    spectra.figure(table, tmp_path / "spectra", spectrum_rank=2)
    assert_figure(tmp_path / "spectra")
    (fig,) = drawn
    labels = [{line.get_label() for line in ax.get_lines()} for ax in fig.axes[:4]]
    toy = Diagonal.display_name  # legends name variants by their display names
    assert "LoRA" in labels[0] and toy not in labels[0]  # B·A family
    assert toy in labels[1] and "LoRA" not in labels[1]  # others
    assert "full fine-tuning" in labels[0] & labels[1]


def test_the_rank_ablation_figure_and_the_style_take_the_toy(toy_runs, tmp_path, capsys):
    styles = plots.style_for([NAME, "lora", "full"])
    assert styles[NAME] != styles["lora"] and styles["full"] == plots.REFERENCE
    assert styles[NAME]["color"] in plots.PALETTE
    stem = tmp_path / "ablation"
    assert cli.main(["plot", str(tmp_path / "runs.csv"), "--figure", str(stem)]) == 0
    assert_figure(stem)
