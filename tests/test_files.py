"""Atomic writes (lowrank.files.atomic_path): the target is the old version or the complete new
one, never a partial file, and no temporary file or directory is left behind."""

import os
import stat
from pathlib import Path

import pytest

import lowrank.files
from lowrank import cli
from lowrank.files import atomic_path


def listing(d):
    return sorted(p.name for p in d.iterdir())


def test_a_finished_block_replaces_the_file_and_leaves_nothing_else(tmp_path):
    out = tmp_path / "sub" / "r.csv"  # parents are created
    with atomic_path(out) as tmp:
        assert tmp.name == out.name and not tmp.exists() and tmp.parent.parent == out.parent
        tmp.write_text("old")
    with atomic_path(out) as tmp:
        tmp.write_text("new")
    assert out.read_text() == "new"
    assert listing(out.parent) == ["r.csv"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failure_mid_write_leaves_the_old_file_and_no_temporary(tmp_path, error):
    out = tmp_path / "r.csv"
    out.write_text("run_id\nabc\n")
    with pytest.raises(type(error)), atomic_path(out) as tmp:
        tmp.write_text("run_id\nab")  # half of the new file
        raise error
    assert out.read_text() == "run_id\nabc\n"
    assert listing(tmp_path) == ["r.csv"]


def test_a_failure_before_anything_exists_leaves_no_file(tmp_path):
    with pytest.raises(ValueError), atomic_path(tmp_path / "r.csv") as tmp:
        tmp.write_text("partial")
        raise ValueError("bad row")
    assert listing(tmp_path) == []


def test_a_directory_replaces_a_directory_or_is_rolled_back(tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    for text in ("old", "new"):
        with atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "config.json").write_text(text)
    assert listing(out) == ["config.json"] and (out / "config.json").read_text() == "new"
    assert listing(tmp_path) == ["adapter"]

    real = os.replace

    def second_rename_fails(src, dst):  # the old directory is moved aside, the new one is not
        if Path(dst) == out and Path(src).name == "adapter":
            raise OSError("rename failed")
        real(src, dst)

    monkeypatch.setattr(lowrank.files.os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="rename failed"), atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("newer")
    assert (out / "config.json").read_text() == "new"  # moved back into place
    assert listing(tmp_path) == ["adapter"]


def plain_mode(tmp_path):
    """Permission bits of a file created by open(): what the umask allows."""
    (tmp_path / "plain").write_text("")
    return stat.S_IMODE((tmp_path / "plain").stat().st_mode)


def test_files_get_the_permissions_of_a_plain_open(tmp_path):
    with atomic_path(tmp_path / "r.csv") as tmp:
        tmp.write_text("x")
    assert stat.S_IMODE((tmp_path / "r.csv").stat().st_mode) == plain_mode(tmp_path)


def test_the_cli_csv_is_not_private_to_its_owner(tmp_path):
    """``lowrank reconstruct --out`` wrote through tempfile.mkstemp, whose 0600 file was renamed
    into place: a CSV the other users of a shared machine could not read."""
    out = tmp_path / "errors.csv"
    cli.write_csv_atomic([{"tensor": "w", "rank": 1}], out, force=False)
    assert out.read_text().splitlines() == ["tensor,rank", "w,1"]
    assert stat.S_IMODE(out.stat().st_mode) == plain_mode(tmp_path)
