"""Learn-then-Test over decoded sequences: the lazy fixed-sequence test against a brute-force one
written from the definition, held-out risks over repeated splits, the per-prompt risks, and
`eexit calibrate --risk sequence-*` on the tiny checkpoint."""

import json
import math

import numpy as np
import pytest
import torch

from eexit.calibration.sequence import (
    lazy_fixed_sequence_test,
    repeated_splits,
    sequence_risk,
)
from tests.conftest import message_lines, run_cli


def brute_force_threshold(grid, risks, eps, delta):
    """Fixed-sequence testing from the definition: thresholds from the largest down, each
    H0: R > eps rejected when its Hoeffding-Bentkus p-value <= delta, stop at the first
    non-rejection; the answer is the last rejected threshold."""

    def binom_cdf(k, n, p):
        return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(0, k + 1))

    def kl(a, b):
        out = a * math.log(a / b) if a > 0 else 0.0
        return out + ((1 - a) * math.log((1 - a) / (1 - b)) if a < 1 else 0.0)

    chosen, pvals = None, []
    for t in sorted(grid, reverse=True):
        r = risks[t]
        n, mean = len(r), float(np.mean(r))
        hoeffding = math.exp(-n * kl(min(mean, eps), eps))
        bentkus = math.e * binom_cdf(math.ceil(n * mean - 1e-9), n, eps)
        p = min(hoeffding, bentkus, 1.0)
        pvals.append(p)
        if p > delta:
            break
        chosen = t
    return chosen, pvals


def synthetic_risks(grid, n, seed, scale=0.5):
    """Per-sequence risks in [0, 1] that grow as the threshold falls: sequence i has risk
    min(1, d_i * (1 - t) * scale) at threshold t, with d_i ~ U(0, 1) its difficulty."""
    d = np.random.default_rng(seed).random(n)
    return {t: np.minimum(1.0, d * (1 - t) * scale) for t in grid}


@pytest.mark.parametrize(
    "seed, n, eps, delta", [(0, 60, 0.1, 0.1), (1, 200, 0.05, 0.2), (2, 120, 0.2, 0.05)]
)
def test_lazy_fixed_sequence_matches_brute_force(seed, n, eps, delta):
    grid = [round(i / 50, 2) for i in range(51)]
    risks = synthetic_risks(grid, n, seed)
    asked = []

    def risks_at(t):
        asked.append(t)
        return risks[t]

    res = lazy_fixed_sequence_test(grid, risks_at, eps, delta)
    expected, pvals = brute_force_threshold(grid, risks, eps, delta)
    assert res.threshold == expected and 0.0 < expected < 1.0  # the test stops inside the grid
    assert [row.p_value for row in res.tested] == pytest.approx(pvals, rel=1e-6)
    # decoded only down to the first non-rejection, most conservative first
    assert asked == sorted(grid, reverse=True)[: len(pvals)] and not res.tested[-1].rejected
    assert np.mean(risks[expected]) <= eps


def test_heldout_risk_respects_epsilon_over_repeated_splits():
    grid = [round(i / 100, 2) for i in range(80, 101)]
    pool, n_cal, eps, delta, repeats = 3000, 300, 0.1, 0.1, 40
    d = np.random.default_rng(7).random(pool)
    table = {t: np.minimum(1.0, d * (1 - t) * 3) for t in grid}  # true mean risk ~ 1.5 (1 - t)

    def measure(t, idx):
        return {"risk": table[t][idx], "agreement_pct": 100 * (1 - table[t][idx])}

    rows = repeated_splits(measure, pool, n_cal, grid, eps, delta, repeats)
    assert [r["seed"] for r in rows] == list(range(repeats))
    within = sum(r["within_epsilon"] for r in rows)
    assert within >= math.ceil((1 - delta) * repeats), rows
    thresholds = [r["threshold"] for r in rows]
    # the guarantee is not met by never exiting: every split certifies an early-exit threshold
    # whose risk on the whole pool is close to epsilon
    assert all(t is not None and t < 1.0 for t in thresholds)
    assert all(np.mean(table[t]) > eps / 2 for t in thresholds)
    assert all(r["calibration_risk"] <= eps for r in rows)
    for r in rows:
        assert r["heldout_agreement_pct"] == pytest.approx(100 * (1 - r["heldout_risk"]))
    # different seeds, different splits: the held-out means differ
    assert len({round(r["heldout_risk"], 6) for r in rows}) > 1


class _Chars:
    """A tokenizer that maps token i to the i-th word."""

    words = ["the", "cat", "sat", "on", "a", "mat", "!"]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(self.words[i] for i in ids)


def test_per_prompt_risks():
    full = torch.tensor([0, 1, 2, 3, 0, 5])  # the cat sat on the mat
    ee = torch.tensor([0, 1, 2, 3, 4, 5])  # the cat sat on a mat
    assert sequence_risk("sequence-mismatch", ee, full) == pytest.approx(1 / 6)
    # ROUGE-L F1: LCS 5 of 6 words each way -> 1 - 5/6
    assert sequence_risk("sequence-rouge", ee, full, _Chars()) == pytest.approx(1 / 6)
    assert sequence_risk("sequence-rouge", full.clone(), full, _Chars()) == 0.0
    # differing outputs without any word: ROUGE-L is 0, so the risk is 1
    assert sequence_risk("sequence-rouge", torch.tensor([6]), torch.tensor([6, 6]), _Chars()) == 1


def test_calibrate_on_decoded_sequences_end_to_end(tiny_checkpoint, tmp_path):
    out = tmp_path / "seq"
    args = ["--epsilon", "0.3", "--delta", "0.2", "--prompt-len", "6", "--max-new-tokens", "6"]
    code, stdout, err = run_cli(
        "calibrate",
        "--model",
        str(tiny_checkpoint),
        "--policy",
        "saturation",
        "--risk",
        "sequence-mismatch",
        "--grid",
        "0.9,1",
        "--prompts",
        "5",  # (1 - 0.3)^5 = 0.168 <= 0.2: five prompts with no error certify
        "--test-prompts",
        "4",
        "--repeats",
        "2",
        *args,
        "--out",
        str(out),
    )
    assert code == 0, err
    (summary,) = json.loads((out / "calibration.json").read_text())
    assert summary["calibration_prompts"] == 5 and summary["test_prompts"] == 4
    tested = summary_tested(out)
    # threshold 1.0 never exits: it repeats the full-depth output, risk 0, p = 0.7^5 (md: 3 digits)
    assert tested[0]["threshold"] == 1.0 and tested[0]["risk"] == 0.0
    assert tested[0]["p_value"] == pytest.approx(0.7**5, abs=5e-4) and tested[0]["rejected"]
    assert summary["threshold"] in (0.9, 1.0)
    assert summary["calibration_risk"] <= 0.3
    assert summary["test_agreement_pct"] == pytest.approx(100 * (1 - summary["test_risk"]))
    if summary["threshold"] == 1.0:
        assert summary["test_risk"] == 0.0 and summary["test_mean_exit_layer"] == 3.0
    else:  # 0.9 exits early on some tokens
        assert summary["test_mean_exit_layer"] < 3.0 and summary["test_compute_pct"] < 100.0
    assert summary["repeats"] == 2 and 0 <= summary["repeats_within_epsilon"] <= 2
    chosen = json.loads((out / "calibrated.json").read_text())
    assert chosen["threshold"] == summary["threshold"] and chosen["risk"] == "sequence-mismatch"
    assert "held-out sequence risk" in stdout and "of 2 re-splits" in stdout


def summary_tested(out):
    """The fixed-sequence rows of calibration.md."""
    md = (out / "calibration.md").read_text().split("## Fixed-sequence test")[1]
    lines = [ln for ln in md.splitlines() if ln.startswith("| ") and "threshold" not in ln]
    rows = []
    for ln in lines:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) == 4 and cells[3] in ("True", "False"):
            rows.append(
                {
                    "threshold": float(cells[0]),
                    "risk": float(cells[1]),
                    "p_value": float(cells[2]),
                    "rejected": cells[3] == "True",
                }
            )
    return rows


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--risk", "sequence-bleu"], "unknown risk 'sequence-bleu'"),
        (["--risk", "sequence-mismatch", "--prompts", "4"], "needs at least 5 prompts"),
        (["--risk", "sequence-rouge", "--method", "free"], "--method free fits teacher-forced"),
        (["--risk", "sequence-mismatch", "--kv", "none"], "unknown KV mode 'none'"),
        (["--risk", "sequence-mismatch", "--repeats", "-1"], "--repeats must be in 0..10000"),
        (["--risk", "sequence-mismatch", "--fit", "meta"], "fit first"),
        (["--risk", "sequence-mismatch", "--prompt-len", "30"], "must be <= 32"),
    ],
)
def test_sequence_bad_input_exits_2_with_one_line(tiny_checkpoint, tmp_path, args, msg):
    code, _, err = run_cli(
        "calibrate",
        "--model",
        str(tiny_checkpoint),
        "--policy",
        "saturation",
        "--epsilon",
        "0.3",
        "--delta",
        "0.2",
        "--prompts",
        "5",
        *args,
        "--out",
        str(tmp_path / "x"),
    )
    lines = message_lines(err)
    assert code == 2 and len(lines) == 1 and msg in lines[0], err
    assert not (tmp_path / "x").exists()
