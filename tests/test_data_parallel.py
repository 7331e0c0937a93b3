"""Data-parallel evaluation: `accelerate launch --multi_gpu --num_processes 2` on CPUs (gloo)
gives the tables of one process for evaluate (LM and a task), sweep, calibrate (fit + LTT) and
analyze-monotonicity; only the main process writes; a launch that silently runs one process is
refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from tests.conftest import LOG_LINE, message_lines, run_cli
from tests.evaluation.test_tasks import random_t5, tokenizer  # noqa: F401  (fixtures)
from tests.helpers import ACCELERATE_LAUNCH

TIMING = (
    "tokens_per_s",
    "eval_tokens_per_s",
    "full_tokens_per_s",
    "speedup",
    "seconds",
    "predicted_speedup",  # the measured cost model (timed on each run's device)
)


def launch(args: list[str], port: int, processes: str = "2", multi: bool = True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    flags = ["--multi_gpu"] if multi else ["--cpu"]
    cmd = [
        *ACCELERATE_LAUNCH,
        *flags,
        "--num_processes",
        processes,
        "--main_process_port",
        str(port),
    ]
    return subprocess.run(
        [*cmd, "-m", "eexit.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )


def said(stdout: str) -> list[str]:
    """What a command printed, without the timestamped progress lines."""
    return [ln for ln in stdout.splitlines() if ln.strip() and not LOG_LINE.match(ln)]


def table(folder, name) -> list[dict]:
    rows = json.loads((folder / f"{name}.json").read_text())
    return [{k: v for k, v in r.items() if not k.endswith(TIMING)} for r in rows]


def runtime_of(folder) -> dict:
    prov = json.loads((folder / "provenance.json").read_text())
    config = next(iter(prov["tables"].values()))["config"]
    return config.get("runtime") or config["data"][0]["runtime"]


CASES = {
    "lm": (["evaluate", "--max-tokens", "512", "--batch-size", "2"], "evaluate"),
    "sweep": (
        ["sweep", "--thresholds", "0.2,0.6", "--max-tokens", "512", "--batch-size", "2"],
        "sweep",
    ),  # fmt: skip
    "task": (
        [
            "sweep",
            "--dataset",
            "wiki-cloze-qa",
            "--thresholds",
            "0.5",
            "--examples",
            "4",
            "--max-new-tokens",
            "4",
            "--batch-size",
            "1",
        ],
        "sweep",
    ),  # fmt: skip
    "calibrate": (
        [
            "calibrate",
            "--fit",
            "meta",
            "--policy",
            "meta",
            "--epsilon",
            "0.3",
            "--max-tokens",
            "1024",
            "--batch-size",
            "2",
        ],
        "calibration",
    ),  # fmt: skip
    "mono": (["analyze-monotonicity", "--max-tokens", "512", "--batch-size", "2"], "per_layer"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_give_the_tables_of_one(
    case,
    tiny_checkpoint,
    random_t5,  # noqa: F811  (the fixture imported above)
    tmp_path,
):
    args, name = CASES[case]
    model = tmp_path / "model"  # calibrate --fit writes beside the checkpoint: a copy each
    # the task: T5 translating bible-en-fr verses (examples split across the processes)
    shutil.copytree(random_t5 if case == "task" else tiny_checkpoint, model)
    code, printed, err = run_cli(
        *args, "-m", str(model), "--out", str(tmp_path / "one"), "--overwrite"
    )
    assert code == 0, err
    if case == "calibrate":
        args = [*args, "--overwrite"]  # the classifier of the one-process run is fitted again
    port = 29600 + list(CASES).index(case)
    proc = launch([*args, "-m", str(model), "--out", str(tmp_path / "two")], port)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = table(tmp_path / "one", name), table(tmp_path / "two", name)
    assert one == two
    assert runtime_of(tmp_path / "two")["processes"] == 2
    assert runtime_of(tmp_path / "one")["processes"] == 1
    if case == "task":  # the examples were split across the processes, all of them scored
        assert one[0]["tokens"] == two[0]["tokens"] > 0
    # only the main process printed: as many lines as one process prints
    assert len(said(proc.stdout)) == len(said(printed)), (proc.stdout, printed)


@pytest.mark.slow
def test_a_launch_that_runs_one_process_instead_of_two_is_refused(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    proc = launch(["evaluate", "-m", str(tiny_checkpoint), "--out", str(out)], 29620, multi=False)
    assert proc.returncode != 0  # eexit exits 2; accelerate's launcher then fails itself
    lines = [ln for ln in message_lines(proc.stderr) if ln.startswith("error:")]
    assert len(lines) == 1 and "asked for 2 processes but this run has 1" in lines[0], lines
    assert "accelerate launch --multi_gpu --num_processes 2 -m eexit.cli evaluate" in lines[0]
    assert not out.exists()


@pytest.mark.slow
def test_generation_is_refused_across_processes(tiny_checkpoint, tmp_path):
    proc = launch(["evaluate", "-m", str(tiny_checkpoint), "--generate"], 29621)
    assert proc.returncode != 0
    assert "--generate measures decoding speed in one process" in proc.stderr
