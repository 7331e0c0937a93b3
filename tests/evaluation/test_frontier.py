"""The oracle frontier equals a brute-force computation: every way of choosing which tokens may
disagree (and where each token exits) is tried on small tables, and the cheapest mean exit at
each agreement is the frontier's. Efficiency and exit-location accuracy follow their
definitions on a tiny trained model's real table."""

from __future__ import annotations

import itertools
import json
import re

import pytest
import torch

from eexit.evaluation.frontier import frontier_mean_layer, frontier_rows, oracle_indices
from eexit.evaluation.records import ExitTable, exit_indices, exit_metrics
from eexit.policies import make_policy
from tests.conftest import run_cli


def brute_force(top1: torch.Tensor, exit_layers: list[int], agreement: float, min_exit: int):
    """Cheapest mean exit layer over every assignment of an allowed exit to every token such that
    at least `agreement` % of the tokens keep the final top-1 at their exit AND at every later
    exit (the oracle's definition of not changing the output)."""
    K, N = top1.shape
    allowed = [k for k, layer in enumerate(exit_layers) if layer >= min_exit] or [K - 1]
    if K - 1 not in allowed:
        allowed.append(K - 1)
    best = float("inf")
    for choice in itertools.product(allowed, repeat=N):
        kept = sum(
            all(top1[j, n] == top1[-1, n] for j in range(k, K)) for n, k in enumerate(choice)
        )
        if 100.0 * kept / N >= agreement - 1e-9:
            best = min(best, sum(exit_layers[k] for k in choice) / N)
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("min_exit", [1, 3])
def test_the_frontier_equals_a_brute_force_search(seed, min_exit):
    g = torch.Generator().manual_seed(seed)
    exit_layers = [1, 2, 3, 5]
    top1 = torch.randint(0, 3, (len(exit_layers), 6), generator=g)  # 6 tokens, 3 ids: many flips
    idx, first = oracle_indices(top1, exit_layers, min_exit)
    oracle_layers = torch.tensor(exit_layers, dtype=torch.float64)[idx]
    for agreement in (100.0, 83.0, 66.0, 50.0, 0.0):
        got = frontier_mean_layer(oracle_layers, exit_layers[first], agreement)
        assert got == pytest.approx(brute_force(top1, exit_layers, agreement, min_exit)), agreement


def _table(top1, exit_layers, L):
    K, N = top1.shape
    return ExitTable(
        exit_layers, L, torch.zeros(K, N), top1, torch.zeros(K, N), 0.0, True, head_cost=2.0
    )


def test_rows_name_the_ideal_speedup_with_the_head_counted():
    top1 = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 0], [0, 0, 2, 0]])
    rows = frontier_rows(_table(top1, [1, 2, 3, 4], 4), agreements=(100.0, 75.0))
    # oracle exits: token 0 -> 1, token 1 -> 4 (changes at 4), token 2 -> 1, token 3 -> 2
    assert rows[0]["mean_exit_layer"] == pytest.approx((1 + 4 + 1 + 2) / 4)
    assert rows[0]["ideal_speedup"] == pytest.approx((4 + 2) / (2 + 2))
    # one token of four may disagree: token 1 goes to layer 1
    assert rows[1]["mean_exit_layer"] == pytest.approx((1 + 1 + 1 + 2) / 4)


def test_the_oracle_policy_has_efficiency_one_and_hits_every_oracle_exit():
    top1 = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 0], [0, 0, 2, 0]])
    table = _table(top1, [1, 2, 3, 4], 4)
    oracle = make_policy("oracle")
    table.score = oracle.scores_from_top1(top1)
    row = exit_metrics(table, oracle)
    assert row["agreement_pct"] == 100.0
    assert row["efficiency"] == pytest.approx(1.0)
    assert row["oracle_hit_pct"] == 100.0 and row["oracle_distance"] == 0.0
    full = make_policy("static", layer=4)
    table.score = torch.tensor([[0.0] * 4, [0.0] * 4, [0.0] * 4, [1.0] * 4])
    row = exit_metrics(table, full)
    assert row["efficiency"] == pytest.approx(0.0)
    assert row["oracle_distance"] == pytest.approx(((4 - 1) + 0 + (4 - 1) + (4 - 2)) / 4)


def test_a_sweep_writes_the_frontier_beside_the_policy(tiny_checkpoint, tmp_path):
    out = tmp_path / "sw"
    code, _, err = run_cli(
        "sweep", "-m", str(tiny_checkpoint), "--policy", "max-prob", "--thresholds", "0.1,0.5,0.9",
        "--max-tokens", "1024", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    frontier = json.loads((out / "frontier.json").read_text())
    rows = json.loads((out / "sweep.json").read_text())
    assert [f["agreement_pct"] for f in frontier] == [100.0, 99.0, 98.0, 95.0]
    means = [f["mean_exit_layer"] for f in frontier]
    assert means == sorted(means, reverse=True)  # less agreement, cheaper frontier
    assert (out / "frontier.png").is_file()
    for r in rows:
        assert r["oracle_compute_pct"] <= r["compute_pct"] + 1e-9 or r["agreement_pct"] < 100
        if r["efficiency"] is not None:
            saved = 100 - r["compute_pct"]
            assert r["efficiency"] == pytest.approx(saved / (100 - r["oracle_compute_pct"]))
        assert 0 <= r["oracle_hit_pct"] <= 100
    # the measured cost model's prediction beside the FLOP model's, on every row (the
    # frontier's with free decisions)
    assert all(r["predicted_speedup"] > 0 for r in rows + frontier)
    predicted = [f["predicted_speedup"] for f in frontier]
    assert predicted == sorted(predicted)  # less agreement, faster


def test_location_accuracy_is_counted_token_by_token(tiny_checkpoint):
    from eexit.evaluation.context import EvalRequest, lm_windows, open_context
    from eexit.evaluation.records import collect_exit_table

    ctx = open_context(EvalRequest(model=str(tiny_checkpoint), max_tokens=256, policy="margin"))
    x, y, _ = lm_windows(ctx)
    table = collect_exit_table(ctx.model, x, y, ctx.policy, 4)
    policy = ctx.policy.at(0.2)
    row = exit_metrics(table, policy)
    idx = exit_indices(table, policy)
    oracle, _ = oracle_indices(table.top1, table.exit_layers)
    hits = sum(int(a) == int(b) for a, b in zip(idx, oracle)) / table.tokens
    assert row["oracle_hit_pct"] == pytest.approx(100 * hits)


def test_a_sweep_whose_thresholds_change_nothing_says_so(tiny_checkpoint, tmp_path):
    """Every threshold above the policy's scores: identical rows, and one line (on stderr and
    under the table) giving the range the scores do span; a sweep whose rows differ says
    nothing of the kind."""
    out = tmp_path / "flat"
    code, _, err = run_cli(
        "sweep", "-m", str(tiny_checkpoint), "--policy", "max-prob", "--thresholds", "0.98,0.99",
        "--max-tokens", "1024", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    rows = json.loads((out / "sweep.json").read_text())
    assert rows[0]["compute_pct"] == rows[1]["compute_pct"]
    assert "Every threshold of this sweep took the same exits" in err
    m = re.search(r"try --thresholds ([0-9.e-]+):([0-9.e-]+):", err)
    assert m and float(m.group(1)) <= float(m.group(2)) < 0.98
    assert "Every threshold of this sweep" in (out / "sweep.md").read_text()
    code, _, err = run_cli(
        "sweep", "-m", str(tiny_checkpoint), "--policy", "max-prob", "--thresholds",
        f"0,{m.group(2)}", "--max-tokens", "1024", "--out", str(tmp_path / "moving"),
    )  # fmt: skip
    assert code == 0, err
    assert "Every threshold" not in err
