import math

import pytest
import torch

from eexit.evaluation.context import EvalRequest, lm_windows, open_context
from eexit.evaluation.records import collect_exit_table, exit_metrics, per_exit_ppl
from eexit.policies.base import make_policy


@pytest.fixture(scope="module")
def tables(tiny_checkpoint):
    ctx = open_context(EvalRequest(model=str(tiny_checkpoint), max_tokens=2048))
    model = ctx.model
    x, y, _ = lm_windows(ctx)
    out = {}
    for name in ("max-prob", "margin", "entropy", "saturation", "oracle", "static"):
        pol = make_policy(name)
        out[name] = (pol, collect_exit_table(model, x, y, pol, batch_size=8))
    return model, x, y, out


def test_table_matches_a_plain_full_forward(tables):
    model, x, y, out = tables
    _, t = out["max-prob"]
    logits = model.lm(x).logits
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    assert per_exit_ppl(t)[3] == pytest.approx(math.exp(nll.item()), rel=1e-4)
    assert t.tokens == y.numel() == 2048


@pytest.mark.parametrize("name", ["max-prob", "margin", "entropy", "saturation"])
def test_threshold_one_equals_full_model(tables, name):
    pol, t = tables[3][name]
    row = exit_metrics(t, pol.at(1.0))
    assert row["ppl"] == pytest.approx(row["full_ppl"], rel=1e-9)
    assert row["compute_pct"] == pytest.approx(100.0)
    assert row["agreement_pct"] == pytest.approx(100.0)


@pytest.mark.parametrize("name", ["max-prob", "margin", "entropy", "saturation"])
def test_compute_rises_with_threshold(tables, name):
    pol, t = tables[3][name]
    rows = [exit_metrics(t, pol.at(thr)) for thr in [i / 20 for i in range(21)]]
    compute = [r["compute_pct"] for r in rows]
    assert all(a <= b + 1e-9 for a, b in zip(compute, compute[1:]))
    assert compute[0] < compute[-1] == pytest.approx(100.0)
    for r in rows:  # shares add up to 100 and compute follows from them
        shares = [r[f"exit@{l}_pct"] for l in (1, 2, 3)]
        assert sum(shares) == pytest.approx(100.0)
        assert r["compute_pct"] == pytest.approx(sum(s * l / 3 for s, l in zip(shares, (1, 2, 3))))


def test_threshold_zero_max_prob_exits_everything_at_the_first_exit(tables):
    pol, t = tables[3]["max-prob"]
    row = exit_metrics(t, pol.at(0.0))
    assert row["exit@1_pct"] == pytest.approx(100.0)
    assert row["ppl"] == pytest.approx(per_exit_ppl(t)[1], rel=1e-9)
    assert row["compute_pct"] == pytest.approx(100 / 3)


def test_min_exit_layer_is_respected(tables):
    _, t = tables[3]["max-prob"]
    pol = make_policy("max-prob", 0.0, min_exit_layer=2)
    row = exit_metrics(t, pol)
    assert row["exit@1_pct"] == 0.0 and row["exit@2_pct"] == pytest.approx(100.0)


def test_decision_overhead_counts_head_matmuls(tables):
    _, t = tables[3]["max-prob"]
    pol = make_policy("max-prob", 1.0)
    row = exit_metrics(t, pol)
    # threshold 1: two wasted decisions (layers 1, 2) per token, each costing one LM head
    assert row["overhead_pct"] == pytest.approx(100 * 2 * t.decision_cost / 3)
    assert t.decision_cost > 1  # at d=32, V=256 the head costs more than a block
    _, ts = tables[3]["saturation"]
    assert exit_metrics(ts, make_policy("saturation", 1.0))["overhead_pct"] < 1.0


def test_oracle_keeps_the_full_models_prediction(tables):
    pol, t = tables[3]["oracle"]
    row = exit_metrics(t, pol)
    assert row["agreement_pct"] == pytest.approx(100.0)
    assert row["compute_pct"] < 100.0


def test_static_full_depth_is_the_full_model(tables):
    pol, t = tables[3]["static"]
    row = exit_metrics(t, pol)
    assert row["compute_pct"] == 100.0 and row["ppl"] == pytest.approx(row["full_ppl"])
