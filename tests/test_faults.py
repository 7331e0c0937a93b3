"""Fault injection in real processes: a run killed in the middle of a checkpoint save, a full
disk (a file-size limit), two concurrent writers of one folder, Ctrl-C during training."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import message_lines, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
EEXIT = [sys.executable, "-m", "eexit.cli"]


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def one_error_line(proc) -> str:
    lines = message_lines(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


KILL_IN_SAVE = """
import os, sys
import eexit.training.checkpointing as checkpointing
real = checkpointing.atomic_json
def dying_save(path, obj):
    if "checkpoint-6" in str(path):
        os._exit(137)  # killed: no cleanup, no finally, the lock file stays behind
    real(path, obj)
checkpointing.atomic_json = dying_save
from eexit.cli import main
sys.argv = ["eexit"] + sys.argv[1:]
main()
"""


def test_killed_during_a_checkpoint_save_then_resumed_equals_uninterrupted(tmp_path):
    args = tiny_overrides("train.steps=9", "train.save_every=3")
    killed = subprocess.run(
        [sys.executable, "-c", KILL_IN_SAVE, "train", *args, "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=300,
    )
    assert killed.returncode == 137
    run = tmp_path / "run"
    assert (run / "checkpoint-3").is_dir() and not (run / "checkpoint-6").exists()
    assert (tmp_path / ".run.lock").exists()  # left behind by the killed process
    resumed = subprocess.run(
        [*EEXIT, "train", *args, "--out", str(run), "--resume"],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr  # the stale lock was taken over
    whole = subprocess.run(
        [*EEXIT, "train", *args, "--out", str(tmp_path / "whole")],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=300,
    )
    assert whole.returncode == 0, whole.stderr
    a = (run / "model.safetensors").read_bytes()
    assert a == (tmp_path / "whole" / "model.safetensors").read_bytes()


def test_full_disk_leaves_the_old_results_untouched(tmp_path, tiny_checkpoint):
    out = tmp_path / "res"
    first = subprocess.run(
        [
            *EEXIT,
            "sweep",
            "-m",
            str(tiny_checkpoint),
            "--thresholds",
            "0.3,0.6",
            "--max-tokens",
            "256",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr
    before = tree(tmp_path)
    cmd = [
        *EEXIT,
        "sweep",
        "-m",
        str(tiny_checkpoint),
        "--thresholds",
        "0.3,0.6",
        "--max-tokens",
        "256",
        "--out",
        str(out),
        "--overwrite",
    ]
    limited = subprocess.run(
        ["bash", "-c", 'ulimit -f 8; exec "$@"', "bash", *cmd],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=300,
    )
    assert limited.returncode == 2, limited.stderr
    assert "file too large" in one_error_line(limited)
    assert tree(tmp_path) == before  # sweep.png, tables and provenance as they were


def test_two_writers_of_one_folder(tmp_path):
    out = tmp_path / "run"
    args = tiny_overrides("train.steps=60", "train.save_every=30", "train.eval_every=30")
    first = subprocess.Popen(
        [*EEXIT, "train", *args, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        cwd=ROOT,
    )
    lock = tmp_path / ".run.lock"
    deadline = time.time() + 120
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert lock.exists(), "the first run never took the lock"
    second = subprocess.run(
        [*EEXIT, "train", *args, "--out", str(out), "--overwrite"],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=300,
    )
    assert second.returncode == 2
    assert f"being written by process {first.pid}" in one_error_line(second)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    log = (out / "train_log.jsonl").read_text().splitlines()
    assert [int(x.split('"step": ')[1].split(",")[0].rstrip("}")) for x in log][-1] == 60
    assert not lock.exists()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_says_where_training_stopped(tmp_path):
    out = tmp_path / "run"
    args = tiny_overrides("train.steps=100000", "train.save_every=3", "train.eval_every=1000")
    proc = subprocess.Popen(
        [*EEXIT, "train", *args, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        cwd=ROOT,
    )
    deadline = time.time() + 120
    while not list(out.glob("checkpoint-*")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    lines = message_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: training interrupted: the newest checkpoint is ")
    assert "--resume" in lines[0]
    assert not (tmp_path / ".run.lock").exists()
    shutil.rmtree(out)
