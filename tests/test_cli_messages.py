"""What a new user meets at the command line: misspelt options, exit codes, --help, the files
`lowrank plot`, `inspect` and `reconstruct` are given, and the permissions of saved adapters.

Usage errors (a bad flag value, an unknown variant or task) exit 2 through argparse; runtime
failures exit 1 with one sentence on stderr and no traceback."""

import os
import pickle
import stat
import subprocess
import sys

import pytest
from adapter_cases import TinyNet, cases
from studyutil import STUDIES
from torch import nn

import lowrank as lr
from lowrank import cli
from lowrank.adapters import registry
from lowrank.sweep import RunSpec, sweep
from lowrank.sweep import results as sweep_results

SCRIPTS = sorted(p.name for p in STUDIES.glob("*.py"))
TRAIN = {"steps": 5, "batch_size": 16, "eval_every": 5}


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_sentence(err: str) -> bool:
    """``err`` is one line, without a traceback."""
    return err.count("\n") == 1 and "Traceback" not in err


# --------------------------------------------------------------------------- misspelt options
@pytest.mark.parametrize("variant", lr.variants())
def test_a_misspelt_option_names_the_valid_ones(variant):
    """lr.make refuses an option the constructor does not take in one sentence listing the valid
    ones: every option the variant's config() saves, and nothing internal."""
    with pytest.raises(lr.OptionError) as e:
        lr.make(variant, nn.Linear(8, 8), rank=2, alhpa=16)
    assert isinstance(e.value, TypeError)  # what Python raises for an unknown keyword
    message = str(e.value)
    head, _, listed = message.partition("; valid: ")
    assert head == f"unknown option 'alhpa' for {variant} (did you mean 'alpha'?)"
    valid = listed.split(", ")
    ad = lr.make(variant, nn.Linear(8, 8), rank=2)
    assert set(ad.config()) <= set(valid) and {"rank", "alpha", "dropout", "seed"} <= set(valid)
    assert not {"base", "self", "rank_options"} & set(valid)


@pytest.mark.parametrize(("variant", "options"), cases())
def test_every_listed_option_is_accepted(variant, options):
    """The options the suite builds each variant with pass the check (nothing valid is refused)."""
    registry.check_options(variant, {"rank": 2, "alpha": 4.0, "seed": 1, **options})


def test_the_valid_options_come_from_the_constructor(monkeypatch):
    """A variant registered with an option of its own lists it, with no table to update."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @lr.register
    class Scaled(lr.variant_class("lora")):
        name = "scaled_for_test"

        def __init__(self, base, rank=8, alpha=None, dropout=0.0, seed=0, gain=1.0):
            super().__init__(base, rank, alpha, dropout, seed)
            self.gain = gain

    with pytest.raises(lr.OptionError, match=r"'gian' for scaled_for_test \(did you mean 'gain'\?\); "
                                             r"valid: rank, alpha, dropout, seed, gain$"):
        lr.make("scaled_for_test", nn.Linear(4, 4), gian=2.0)
    assert lr.make("scaled_for_test", nn.Linear(4, 4), rank=2, gain=2.0).gain == 2.0


def test_the_sweep_checks_options_before_any_run(monkeypatch, tmp_path):
    def no_runs(*args, **kwargs):
        raise AssertionError("a run started")

    monkeypatch.setattr(sweep_results, "execute", no_runs)
    specs = [RunSpec("synthetic", "lora", 1, 0, 1e-2, train=TRAIN),
             RunSpec("synthetic", "lora", 2, 0, 1e-2, train=TRAIN, variant_options={"alhpa": 16})]
    with pytest.raises(lr.OptionError, match="unknown option 'alhpa' for lora"):
        sweep(specs, tmp_path / "r.csv", workers=2)
    assert not (tmp_path / "r.csv").exists()


def test_the_error_crosses_a_process_boundary_intact():
    """A run that skips the sweep's check fails in its worker with the same error, which the
    pool sends back pickled."""
    with pytest.raises(lr.OptionError) as e:
        lr.make("lora", nn.Linear(4, 4), alhpa=16)
    again = pickle.loads(pickle.dumps(e.value))
    assert type(again) is lr.OptionError and str(again) == str(e.value)


def test_ablate_with_a_misspelt_option_says_so_in_one_sentence(capsys, tmp_path):
    """Through the sweep's worker processes (--workers 2): one sentence, exit 1, nothing run."""
    out = tmp_path / "ra.csv"
    code, _, err = run(capsys, "ablate", "--quick", "--quiet", "--workers", "2", "--out", str(out),
                       "--figure", str(tmp_path / "ra"), "--variant-options", '{"alhpa": 16}')
    assert code == 1 and one_sentence(err), err
    assert "unknown option 'alhpa'" in err and "valid: rank, alpha, dropout, seed" in err
    assert not out.exists()


def test_the_study_script_with_a_misspelt_option_says_so_in_one_sentence(tmp_path):
    res = subprocess.run([sys.executable, str(STUDIES / "rank_ablation.py"), "--quick", "--quiet",
                          "--workers", "2", "--out", str(tmp_path / "ra.csv"), "--figure",
                          str(tmp_path / "ra"), "--variant-options", '{"dropuot": 0.1}'],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and one_sentence(res.stderr), res.stderr[-3000:]
    assert "unknown option 'dropuot'" in res.stderr and "did you mean 'dropout'?" in res.stderr


# --------------------------------------------------------------------------- permissions
@pytest.mark.parametrize(("save", "tensors"), [(lr.save_adapters, lr.io.TENSORS),
                                               (lr.to_peft, lr.io.PEFT_TENSORS)])
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_tensors_file_gets_the_config_file_s_permissions(tmp_path, save, tensors, umask):
    model = lr.inject(TinyNet(), "lora", targets=["q"], rank=2)
    old = os.umask(umask)
    try:
        path = save(model, tmp_path / "ad")
    finally:
        os.umask(old)
    mode = {f.name: stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()}
    assert mode == {tensors: 0o666 & ~umask, "adapter_config.json": 0o666 & ~umask}
