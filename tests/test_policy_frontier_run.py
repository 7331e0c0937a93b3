"""experiments/policy_frontier/run.py end to end on the tiny checkpoint: the oracle row, each
policy calibrated by LTT (and FREE) with its efficiency set against the frontier of the same test
tokens, and bad input as one line with exit code 2 before any work."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "policy_frontier" / "run.py"


def run(*args: str):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=600
    )


def test_policies_are_set_against_the_oracle_frontier(tiny_checkpoint, tmp_path):
    model = tmp_path / "model"  # classifiers are fitted beside the checkpoint
    shutil.copytree(tiny_checkpoint, model)
    out = tmp_path / "pf"
    proc = run(
        "--model", str(model), "--seq-len", "32", "--max-tokens", "1024", "--epsilon", "0.2",
        "--policies", "saturation,meta", "--free", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((out / "policies.json").read_text())
    frontier = json.loads((out / "frontier.json").read_text())
    oracle = rows[0]
    assert oracle["policy"] == "oracle" and oracle["efficiency"] == 1.0
    assert oracle["compute_pct"] == pytest.approx(frontier[0]["compute_pct"])
    assert [(r["policy"], r["threshold_by"]) for r in rows[1:]] == [
        ("saturation", "ltt"), ("saturation", "free"), ("meta", "ltt"), ("meta", "free"),
    ]  # fmt: skip
    for r in rows[1:]:
        if r["threshold"] is None:
            continue
        # the frontier at the row's own agreement is never dearer than the policy
        assert r["oracle_compute_pct"] <= r["compute_pct"] + 1e-9
        if r["efficiency"] is not None:
            saved = 100 - r["compute_pct"]
            assert r["efficiency"] == pytest.approx(saved / (100 - r["oracle_compute_pct"]))
    assert (out / "policies.png").is_file()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--policies", "max-prb"], "did you mean 'max-prob'"),
        (["--param", "shortlist=8"], "give POLICY:key=value"),
    ],
)
def test_bad_input_is_one_line_before_any_work(args, words, tmp_path):
    out = tmp_path / "pf"
    proc = run(*args, "--out", str(out))
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and words in lines[0], proc.stderr
    assert not out.exists()
