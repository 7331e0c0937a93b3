"""Atomic files, output folders written as a unit, one writer per folder, write errors as one
line (eexit/files.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from eexit.errors import EexitError
from eexit.files import (
    COMPLETE_MARKER,
    FolderLock,
    atomic_write,
    output_folder,
    write_error,
)


def test_atomic_write_replaces_or_leaves_the_old_file(tmp_path):
    f = tmp_path / "a.txt"
    atomic_write(f, "old")
    with pytest.raises(RuntimeError):
        with open(f, "rb"):
            from eexit.files import atomic_file

            with atomic_file(f) as tmp:
                tmp.write_text("half")
                raise RuntimeError("crash mid-write")
    assert f.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    atomic_write(f, b"new")
    assert f.read_text() == "new"


def test_output_folder_swaps_in_only_a_complete_run(tmp_path):
    out = tmp_path / "res"
    with output_folder(out, overwrite=False) as d:
        (d / "table.md").write_text("first")
        assert not out.exists()  # nothing visible until the run completes
    assert (out / "table.md").read_text() == "first"
    assert json.loads((out / COMPLETE_MARKER).read_text())["complete"] is True
    with pytest.raises(RuntimeError, match="the run failed"):
        with output_folder(out, overwrite=True) as d:
            (d / "table.md").write_text("second, half done")
            raise RuntimeError("the run failed")
    assert (out / "table.md").read_text() == "first"  # the failed run changed nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]  # no staging left behind
    with output_folder(out, overwrite=True) as d:
        (d / "table.md").write_text("second")
    assert (out / "table.md").read_text() == "second"


def test_output_folder_refusals(tmp_path):
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "x").write_text("keep")
    with pytest.raises(EexitError, match="already exists; pass --overwrite"):
        with output_folder(tmp_path / "res", overwrite=False):
            pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(EexitError, match="is a file, not a folder"):
        with output_folder(tmp_path / "file", overwrite=True):
            pass
    with pytest.raises(EexitError, match="is a file, not a folder"):
        with output_folder(tmp_path / "file" / "sub", overwrite=True):
            pass
    assert (tmp_path / "res" / "x").read_text() == "keep"


def test_second_writer_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "res"
    with FolderLock(out):
        with pytest.raises(EexitError, match=f"being written by process {os.getpid()}"):
            with output_folder(out, overwrite=True):
                pass
    # a lock left by a process that no longer exists
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    lock = FolderLock(out)
    lock.path.write_text(json.dumps({"pid": int(dead), "host": os.uname().nodename}))
    with output_folder(out, overwrite=True) as d:
        (d / "t").write_text("ok")
    assert (out / "t").read_text() == "ok" and not lock.path.exists()


def test_write_errors_are_one_line():
    e = write_error(OSError(28, "No space left on device", "/x/y.json"))
    assert str(e) == (
        "cannot write /x/y.json: no space left on the device; nothing that existed before was "
        "replaced"
    )
