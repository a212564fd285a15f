"""What a new user meets at the command line: misspelt options, exit codes, --help, the files
`lowrank plot`, `inspect` and `reconstruct` are given, and the permissions of saved adapters.

Usage errors (a bad flag value, an unknown variant or task) exit 2 through argparse; runtime
failures exit 1 with one sentence on stderr and no traceback."""

import argparse
import contextlib
import copy
import io
import json
import os
import pickle
import stat
import subprocess
import sys

import pytest
import torch
from adapter_cases import TinyNet, cases, perturb
from peft import get_peft_model
from safetensors.torch import save_file
from studyutil import STUDIES, load_study
from test_peft_interop import Net, peft_config
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
        display_name = "scaled LoRA (test)"

        def __init__(self, base, *, gain=1.0, **common):
            super().__init__(base, **common)
            self.gain = gain

    with pytest.raises(
        lr.OptionError,
        match=r"'gian' for scaled_for_test \(did you mean 'gain'\?\); "
        r"valid: rank, alpha, dropout, seed, gain$",
    ):
        lr.make("scaled_for_test", nn.Linear(4, 4), gian=2.0)
    assert lr.make("scaled_for_test", nn.Linear(4, 4), rank=2, gain=2.0).gain == 2.0


def test_the_sweep_checks_options_before_any_run(monkeypatch, tmp_path):
    def no_runs(*args, **kwargs):
        raise AssertionError("a run started")

    monkeypatch.setattr(sweep_results, "execute", no_runs)
    specs = [
        RunSpec("synthetic", "lora", 1, 0, 1e-2, train=TRAIN),
        RunSpec("synthetic", "lora", 2, 0, 1e-2, train=TRAIN, variant_options={"alhpa": 16}),
    ]
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
    code, _, err = run(
        capsys,
        "ablate",
        "--quick",
        "--quiet",
        "--workers",
        "2",
        "--out",
        str(out),
        "--figure",
        str(tmp_path / "ra"),
        "--variant-options",
        '{"alhpa": 16}',
    )
    assert code == 1 and one_sentence(err), err
    assert "unknown option 'alhpa'" in err and "valid: rank, alpha, dropout, seed" in err
    assert not out.exists()


def test_the_study_script_with_a_misspelt_option_says_so_in_one_sentence(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            str(STUDIES / "rank_ablation.py"),
            "--quick",
            "--quiet",
            "--workers",
            "2",
            "--out",
            str(tmp_path / "ra.csv"),
            "--figure",
            str(tmp_path / "ra"),
            "--variant-options",
            '{"dropuot": 0.1}',
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 1 and one_sentence(res.stderr), res.stderr[-3000:]
    assert "unknown option 'dropuot'" in res.stderr and "did you mean 'dropout'?" in res.stderr


# --------------------------------------------------------------------------- exit codes
def study_exit(script: str, *argv: str) -> tuple[int, str]:
    """(exit code, stderr) of ``studies/<script> argv`` run in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = load_study(script).main(list(argv))
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def takes(script: str, flag: str) -> bool:
    parser, _ = help_of(lambda: load_study(script).main(["--help"]))
    return any(flag in a.option_strings for a in parser._actions)


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--variants", "lorax", "unknown variant 'lorax'"),
        ("--task", "nope", "'nope'"),
        ("--ranks", "0", "must be at least 1"),
    ],
)
def test_a_bad_name_or_value_is_a_usage_error(flag, value, words, tmp_path):
    """In every study that takes ``flag``."""
    scripts = [s for s in SCRIPTS if takes(s, flag)]
    assert len(scripts) >= 2
    for script in scripts:
        code, err = study_exit(script, flag, value, "--out", str(tmp_path / "x.csv"))
        assert code == 2 and "usage:" in err and words in err, (script, err)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["ablate", "--variants", "lorax"], "unknown variant 'lorax'"),
        (["ablate", "--task", "nope"], "unknown task 'nope'"),
        (["ablate", "--workers", "0"], "0 must be at least 1"),
        (["reconstruct", "w.safetensors", "--ranks", "x"], "'x' is not a whole number"),
    ],
)
def test_the_command_s_usage_errors_exit_2(capsys, argv, words):
    code, _, err = run(capsys, *argv)
    assert code == 2 and "usage: lowrank " in err and words in err, err


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect", "nowhere"],
        ["plot", "nowhere.csv"],
        ["reconstruct", "nowhere.safetensors", "--ranks", "1"],
        ["ablate", "--plot-only", "--out", "nowhere.csv"],
    ],
)
def test_the_command_s_runtime_errors_exit_1_in_one_sentence(capsys, tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert code == 1 and one_sentence(err) and "nowhere" in err, err


# --------------------------------------------------------------------------- --help
def help_of(call) -> tuple[argparse.ArgumentParser, str]:
    """(the parser that printed --help, its text) for ``call()``, which prints it and exits 0."""
    shown = []
    format_help = argparse.ArgumentParser.format_help

    def record(self):
        shown.append(self)
        return format_help(self)

    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(argparse.ArgumentParser, "format_help", record)
        try:
            code = call()
        except SystemExit as e:
            code = e.code
    assert code == 0
    return shown[-1], out.getvalue()


HELPS = {**{f"lowrank {c}": [c] for c in ["ablate", "plot", "inspect", "reconstruct"]}, "lowrank": []}


@pytest.mark.parametrize("name", [*HELPS, *SCRIPTS])
def test_every_option_explains_itself(name):
    """Every option has help text, no help shows '(default: None)', and no argparse type
    function has a private name (argparse quotes it: 'invalid _positive value')."""
    if name in HELPS:
        parser, text = help_of(lambda: cli.main([*HELPS[name], "--help"]))
        assert text.startswith(f"usage: {name} ")
    else:
        parser, text = help_of(lambda: load_study(name).main(["--help"]))
    assert "(default: None)" not in text
    for action in parser._actions:
        assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
        kind = getattr(action.type, "__name__", "")
        assert not kind.startswith(("_", "<")), f"{name}: {action.option_strings} type {kind}"


def test_lowrank_ablate_help_names_the_command():
    res = subprocess.run(
        [sys.executable, "-m", "lowrank", "ablate", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=STUDIES.parent,
    )
    assert res.returncode == 0 and res.stdout.startswith("usage: lowrank ablate ")


# --------------------------------------------------------------------------- plot
@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("figure.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256))),
        ("notes.txt", b"hello, world\nsecond line\n"),
        ("other.csv", b"a,b\n1,2\n"),
    ],
)
def test_plot_on_a_file_that_is_not_a_results_csv(capsys, tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    code, out, err = run(capsys, "plot", str(path))
    assert code == 1 and out == "" and one_sentence(err), err
    assert str(path) in err and "expected the results CSV that lowrank ablate writes" in err


# --------------------------------------------------------------------------- inspect a PEFT directory
def test_inspect_a_peft_directory_reports_what_the_native_one_does(capsys, tmp_path):
    """A directory PEFT wrote, and the same adapter saved by lowrank after lr.from_peft: the same
    layers, ranks, parameter counts, spectra and modules_to_save."""
    base = Net()
    theirs = get_peft_model(copy.deepcopy(base), peft_config("lora", modules_to_save=["head"]))
    with torch.no_grad():
        perturb(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    native = lr.save_adapters(lr.from_peft(copy.deepcopy(base), tmp_path / "peft"), tmp_path / "ours")
    code, out, err = run(capsys, "inspect", str(tmp_path / "peft"), "--json")
    assert code == 0, err
    got = json.loads(out)
    _, out, _ = run(capsys, "inspect", str(native), "--json")
    want = json.loads(out)
    for key in ("layers", "modules_to_save", "modules_to_save_params", "trainable_params"):
        assert got[key] == want[key], key
    assert got["trainable_params"] == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert got["format"] == "PEFT LORA" and got["writer"].startswith("PEFT ")
    code, out, _ = run(capsys, "inspect", str(tmp_path / "peft"))
    assert code == 0 and out.startswith(f"{tmp_path / 'peft'}: PEFT LORA format, written by PEFT ")
    assert "modules_to_save: head" in out


def test_inspect_a_peft_vera_directory_says_it_needs_the_model(capsys, tmp_path):
    get_peft_model(Net(), peft_config("vera")).save_pretrained(tmp_path)
    code, _, err = run(capsys, "inspect", str(tmp_path))
    assert code == 1 and one_sentence(err) and "lr.from_peft(model, path)" in err, err


# --------------------------------------------------------------------------- reconstruct
def test_reconstruct_says_which_tensors_it_skipped(capsys, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(
        {
            "w": torch.randn(4, 3),
            "bias": torch.ones(4),
            "conv": torch.randn(2, 2, 3, 3),
            "ids": torch.arange(4).reshape(2, 2),
        },
        path,
    )
    code, out, err = run(capsys, "reconstruct", str(path), "--ranks", "1")
    assert code == 0 and [line.split()[0] for line in out.splitlines()[3:]] == ["w"]
    assert err == (
        "lowrank: skipped 3 tensors that are not 2-D floating-point matrices: "
        "bias (1-D); conv (4-D); ids (torch.int64)\n"
    )
    save_file({"bias": torch.ones(4)}, path)
    code, _, err = run(capsys, "reconstruct", str(path), "--ranks", "1")
    assert code == 1 and one_sentence(err) and "bias (1-D)" in err


# --------------------------------------------------------------------------- permissions
@pytest.mark.parametrize(
    ("save", "tensors"), [(lr.save_adapters, lr.io.TENSORS), (lr.to_peft, lr.io.PEFT_TENSORS)]
)
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
