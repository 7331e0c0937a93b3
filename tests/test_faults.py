"""Fault injection in real processes: a run killed in the middle of a checkpoint save, a full
disk (a file-size limit) for results and inside accelerate's save_state, two concurrent writers
of one folder, Ctrl-C during training, and what killed runs leave behind (staging folders,
unfinished checkpoints, empty or stale locks) cleared by the next run without touching a live
process's work."""

from __future__ import annotations

import hashlib
import json
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


NINE = tiny_overrides("train.steps=9", "train.save_every=3")


def cli(*args, limit_kb: int | None = None, timeout: int = 300):
    """`eexit ARGS` in a subprocess, under a file-size limit (`ulimit -f`) when given."""
    cmd = [*EEXIT, *args]
    if limit_kb is not None:
        cmd = ["bash", "-c", f'ulimit -f {limit_kb}; exec "$@"', "bash", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The 9-step run that interrupted and resumed runs must equal, bit for bit."""
    out = tmp_path_factory.mktemp("whole") / "whole"
    done = cli("train", *NINE, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


def test_killed_during_a_checkpoint_save_then_resumed_equals_uninterrupted(tmp_path, uninterrupted):
    args = NINE
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
    a = (run / "model.safetensors").read_bytes()
    assert a == (uninterrupted / "model.safetensors").read_bytes()
    assert not list(run.glob(".tmp-checkpoint-*"))  # the cut-off save is gone


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
@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_ctrl_c_says_where_training_stopped(tmp_path, inherited):
    """Ctrl-C stops training cleanly whatever SIGINT disposition the process inherited: started
    from a background job (`make test &`), a child inherits SIGINT as ignored."""
    out = tmp_path / "run"
    args = tiny_overrides("train.steps=100000", "train.save_every=3", "train.eval_every=1000")
    disposition = signal.SIG_IGN if inherited == "ignored" else signal.SIG_DFL
    proc = subprocess.Popen(
        [*EEXIT, "train", *args, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, disposition),
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


def dead_pid() -> int:
    """The process id of a process that has exited."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_full_disk_inside_save_state_then_leftovers_cleared_and_resumed(tmp_path, uninterrupted):
    """A file-size limit reached inside accelerate's save_state (torch's zip writer only says
    "unexpected pos"): one line, exit 2, checkpoint-3 as it was, no .tmp-checkpoint-6. Then the
    leftovers of killed runs (staging folders, an unfinished checkpoint, a temporary file, an
    empty lock) do not block the resume, which equals the uninterrupted run; a live process's
    staging folder is left alone."""
    out = tmp_path / "run"
    first = cli("train", *NINE, "--out", str(out), "--stop-after", "3")
    assert first.returncode == 0, first.stderr
    before = tree(out / "checkpoint-3")
    optimizer_kb = (out / "checkpoint-3" / "accelerate_state" / "optimizer.bin").stat().st_size
    limit = optimizer_kb // 1024 - 16  # the weights fit, the optimizer state does not
    full = cli("train", *NINE, "--out", str(out), "--resume", limit_kb=limit)
    assert full.returncode == 2, full.stderr
    line = one_error_line(full)
    assert f"cannot write {out}/checkpoint-6: file too large" in line, line
    assert "nothing that existed before was replaced" in line
    assert tree(out / "checkpoint-3") == before  # the previous checkpoint intact
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", "train_log.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no lock, no staging

    dead = dead_pid()
    live = subprocess.Popen(["sleep", "300"])
    try:
        left = [
            tmp_path / f".run.staging-{dead}",  # a killed sweep / evaluate writing here
            tmp_path / f".run.saving-{dead}",  # a killed model save
            tmp_path / ".run.overwrite",  # a killed --overwrite run
            out / ".tmp-checkpoint-6",  # a checkpoint cut off before its rename
            out / f"..tmp-checkpoint-6.saving-{dead}",
        ]
        for d in left:
            (d / "accelerate_state").mkdir(parents=True)
            (d / "accelerate_state" / "optimizer.bin").write_bytes(b"half")
        (out / f".train_log.jsonl.tmp-{dead}").write_text('{"step": 4')
        (tmp_path / ".run.lock").write_text("")  # a lock whose writer died before writing it
        mine = tmp_path / f".run.staging-{live.pid}"  # a live process's: never touched
        mine.mkdir()
        (mine / "sweep.md").write_text("being written")
        resumed = cli("train", *NINE, "--out", str(out), "--resume")
        assert resumed.returncode == 0, resumed.stderr
        assert (out / "model.safetensors").read_bytes() == (
            uninterrupted / "model.safetensors"
        ).read_bytes()
        assert not [p for p in left if p.exists()]
        assert not (out / f".train_log.jsonl.tmp-{dead}").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name, "run"]  # lock gone
        assert (mine / "sweep.md").read_text() == "being written"
        steps = [
            json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().split("\n")[:-1]
        ]
        assert steps == sorted(steps) and steps[-1] == 9
    finally:
        live.kill()
        live.wait()


def test_a_lock_that_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
    """The lock file is the first thing a run writes: on a full disk, one line naming it, and no
    empty lock to puzzle the next run. (In one process: under `ulimit -f 0` Python cannot even
    import, tempfile's probe fails first.)"""
    import errno

    import eexit.files as files

    def full(*_args, **_kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.json, "dump", full)
    with pytest.raises(files.EexitError) as e:
        files.FolderLock(tmp_path / "run").acquire()
    assert str(e.value) == (
        f"cannot write {tmp_path}/.run.lock: no space left on the device; nothing that existed "
        "before was replaced"
    )
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_dead_writers_are_cleared_by_whoever_takes_the_lock(tmp_path):
    """In one process, every kind of leftover beside an output folder: dead writers' staging,
    saving, temporary and overwrite folders go; a swap cut between its two renames is undone
    (the old results come back); a live process's staging folder and another folder's leftovers
    stay; an empty, garbage or pid-less lock is taken over."""
    from eexit.files import FolderLock, output_folder

    dead = dead_pid()
    live = subprocess.Popen(["sleep", "300"])
    try:
        for name in ("staging", "saving"):
            (tmp_path / f".res.{name}-{dead}").mkdir()
            (tmp_path / f".res.{name}-{dead}" / "rows.csv").write_text("a,b\n")
        (tmp_path / f".res.tmp-{dead}").write_text("half")
        (tmp_path / f".res.old-{dead}").mkdir()  # killed between the two renames of a swap
        (tmp_path / f".res.old-{dead}" / "sweep.md").write_text("the earlier results")
        (tmp_path / f".res.staging-{live.pid}").mkdir()
        (tmp_path / f".other.staging-{dead}").mkdir()
        for content in ("", "{not json", '{"pid": "x"}', '{"pid": -1}', '{"host": "h"}'):
            (tmp_path / ".res.lock").write_text(content)
            with FolderLock(tmp_path / "res") as lock:
                assert lock.holder()["pid"] == os.getpid()
            assert not (tmp_path / ".res.lock").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            f".other.staging-{dead}",
            f".res.staging-{live.pid}",
            "res",
        ]
        assert (tmp_path / "res" / "sweep.md").read_text() == "the earlier results"
        with output_folder(tmp_path / "res", overwrite=True) as staging:
            (staging / "sweep.md").write_text("new results")
        assert (tmp_path / "res" / "sweep.md").read_text() == "new results"
    finally:
        live.kill()
        live.wait()
