"""experiments/headroom/run.py (make headroom) at tiny sizes, so that it cannot rot: both
variants trained side by side, swept, compared by their oracle frontier (the kept one is the
larger ideal speedup at 98 % agreement), calibrated by LTT and decoded side by side with the
measured cost model's prediction beside the measured speedup; bad input is one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "headroom" / "run.py"
TINY = [
    "model.n_layers=3", "model.d_model=32", "model.n_heads=2", "model.d_ff=64",
    "model.vocab_size=512", "train.steps=3", "train.save_every=3", "train.eval_every=3",
    "train.eval_batches=1", "train.batch_size=4",
]  # fmt: skip


def run(*args: str):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=900
    )


def test_headroom_end_to_end_at_tiny_sizes(tmp_path):
    out, ckpts = tmp_path / "headroom", tmp_path / "ckpts"
    sets = [x for s in TINY for x in ("--set", s)]
    proc = run(
        "--out", str(out), "--checkpoints", str(ckpts), *sets, "--max-tokens", "1024",
        "--prompts", "2", "--new", "6", "--reps", "1", "--drafts", "auto,1:2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["variant"] for r in rows] == ["weighted_ce", "layerskip"]
    assert [r["loss"] for r in rows] == ["weighted-ce", "layerskip"]
    for r, v in zip(rows, ("weighted_ce", "layerskip")):
        frontier = json.loads((out / v / "frontier.json").read_text())
        assert r["oracle_speedup_98"] == pytest.approx(frontier[2]["ideal_speedup"])
        metrics = json.loads((ckpts / f"headroom-{v}" / "metrics.json").read_text())
        assert r["val_ppl_last"] == pytest.approx(metrics["val_ppl@3"])
    prov = json.loads((out / "provenance.json").read_text())
    kept = max(rows, key=lambda r: r["oracle_speedup_98"])["variant"]
    assert prov["config"]["chosen"] == kept
    exits = json.loads((out / "exits.json").read_text())
    assert len(exits) == 2 * 3
    assert (out / "training.png").stat().st_size > 0
    calibrated = json.loads((out / "calibration" / "calibrated.json").read_text())
    assert calibrated["policy"] == "max-prob"
    meta = json.loads((out / "calibration-meta" / "calibrated.json").read_text())
    assert meta["policy"] == "meta"  # fitted on the kept checkpoint first
    assert (ckpts / f"headroom-{kept}" / "exit_classifiers" / "meta.pt").is_file()
    decoding = json.loads((out / "decoding" / "decoding.json").read_text())
    early = [r for r in decoding if r["decoder"].startswith("eexit early exit")]
    assert [r["batch"] for r in early] == [1, 1, 8, 8]  # each calibrated policy, each batch
    assert {r["decoder"].split(",")[1].split("@")[0].strip() for r in early} == {
        "max-prob",
        "meta",
    }
    assert all(0 <= r["rouge_l_vs_greedy"] <= 100 for r in decoding)
    for r in early:
        ratio = r["predicted_speedup_vs_full_depth"] / r["speedup_vs_full_depth"]
        assert r["predicted_over_measured"] == pytest.approx(ratio)
    for path in out.rglob("*.json"):  # provenance names --out, not the staging folder
        assert "staging" not in path.read_text(), path
    drafts = json.loads((out / "decoding" / "drafts.json").read_text())
    assert sum(r["chosen"] for r in drafts) == 1  # the cost model's choice, decoded
    chosen = next(r for r in drafts if r["chosen"])
    assert chosen["predicted_speedup_vs_full_depth"] == max(
        r["predicted_speedup_vs_full_depth"] for r in drafts
    )
    name = f"draft layer {chosen['draft_layer']}, {chosen['draft_length']} drafts"
    assert any(name in r["decoder"] for r in decoding)
    costs = json.loads((out / "decoding" / "costs.json").read_text())
    assert {c["part"] for c in costs} >= {"block", "head", "kv_fill", "decision", "overhead"}
    assert {c["policy"] for c in costs} == {"max-prob", "meta"}
    # the checkpoints are reused: a second run trains nothing and refuses an existing --out
    again = run("--out", str(out), "--checkpoints", str(ckpts), "--max-tokens", "1024")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert again.stderr.count("\n") == 1 and "Traceback" not in again.stderr


def test_an_unknown_variant_is_one_line(tmp_path):
    proc = run("--out", str(tmp_path / "x"), "--variants", "weighted_ce,nope")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "nope" in proc.stderr and "layerskip" in proc.stderr
    assert not (tmp_path / "x").exists()
