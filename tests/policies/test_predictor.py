"""The SpecEE-style predictor (`--policy predictor`): candidate logits equal the exit's own
logits of those tokens (adapters and separate heads included), its cost is counted as d x K +
the MLP per decision plus one full head per token, fitting on the tiny checkpoint beats the
majority class, and bad input is one line, exit code 2. (Same exits offline and in decoding:
tests/policies/test_exit_rule.py.)"""

import json
import shutil

import pytest
import torch

from eexit.evaluation.records import collect_exit_table, exit_metrics, layer_macs
from eexit.policies import make_policy
from eexit.policies.predictor import (
    FEATURES,
    HIDDEN_UNITS,
    PredictorMLP,
    candidate_logits,
    fit_predictor,
)
from tests.conftest import message_lines, run_cli
from tests.helpers import tiny


@pytest.mark.parametrize("heads", ["shared", "lens", "separate"])
def test_candidate_logits_are_the_exit_logits_of_those_tokens(heads):
    model = tiny(layers=3, heads=heads)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.translators.parameters():  # adapters that change the exit
            p.normal_(0, 0.1)
        for head in model.exit_heads.values():  # a separate head unlike the final one
            head[1].weight.add_(torch.randn_like(head[1].weight))
    h = torch.randn(6, model.hidden_size)
    ids = torch.randint(0, model.vocab_size, (6, 5))
    with torch.no_grad():
        full = model.exit_logits(h, 1)
        short = candidate_logits(model, h, 1, ids)
    torch.testing.assert_close(short, full.gather(1, ids), atol=1e-5, rtol=1e-5)


def test_decision_cost_is_d_times_k_plus_the_mlp_and_the_table_counts_it():
    model = tiny(layers=3)
    d, V, K = model.hidden_size, model.vocab_size, 8
    pol = make_policy("predictor", 1.0, shortlist=K)  # threshold 1: never exits early
    pol.clf = PredictorMLP().eval()
    mlp = len(FEATURES) * HIDDEN_UNITS + HIDDEN_UNITS  # 6 x 16 + 16 = 112
    assert mlp == 112 and PredictorMLP().macs() == mlp
    per_decision = d * K + 4 * K + 3 * d + mlp  # candidates, their softmax, cosine, MLP
    assert model.decision_macs(pol) == per_decision == 32 * 8 + 32 + 96 + 112
    first_extra = (d * V + 4 * V) - (d * K + 4 * K)  # the first decision: the full head instead
    assert model.first_decision_extra_macs(pol) == first_extra
    torch.manual_seed(0)
    x = torch.randint(0, V, (4, 16))
    row = exit_metrics(collect_exit_table(model, x, x, pol), pol)
    # never exiting: decisions at exits 1 and 2 of 3 layers
    expected = 100.0 * (2 * per_decision + first_extra) / layer_macs(model, 17 / 2) / 3
    assert row["compute_pct"] == 100.0 and row["overhead_pct"] == pytest.approx(expected)
    # cheaper than max-prob, which pays a full head at both decisions
    mp = make_policy("max-prob", 1.0)
    full = exit_metrics(collect_exit_table(model, x, x, mp), mp)
    assert row["overhead_pct"] < full["overhead_pct"]
    lens = tiny(layers=3, heads="lens")  # an exit adapter runs before the candidates' rows
    assert lens.decision_macs(pol) == per_decision + d * d
    # from min exit layer 2 on: one decision (exit 2), whose candidates come from its full head
    late = pol.at(1.0)
    late.min_exit_layer = 2
    row = exit_metrics(collect_exit_table(model, x, x, late), late)
    expected = 100.0 * (per_decision + first_extra) / layer_macs(model, 17 / 2) / 3
    assert row["overhead_pct"] == pytest.approx(expected)


def test_the_mlp_learns_a_separable_rule_on_synthetic_features():
    torch.manual_seed(0)
    feats = torch.rand(1500, 2, len(FEATURES))
    labels = (feats[..., 0] + 0.5 * feats[..., 4] > 0.75).float()  # top-1 prob and cosine
    clf, metrics = fit_predictor(feats, labels)
    assert metrics["heldout_accuracy"] > 0.93, metrics
    assert metrics["heldout_auc"] > 0.98 and 0.3 < metrics["positive_share"] < 0.7


def test_fit_on_the_tiny_checkpoint_beats_the_majority_class_then_calibrate(
    tiny_checkpoint, tmp_path
):
    model = tmp_path / "tiny"  # fitting writes beside the checkpoint: a copy
    shutil.copytree(tiny_checkpoint, model)
    cal = tmp_path / "cal"
    args = ["calibrate", "--model", str(model), "--max-tokens", "4096"]
    fit = ["--fit", "predictor", "--policy", "predictor"]  # label: stable by default
    code, out, err = run_cli(*args, *fit, "--epsilon", "0.3", "--delta", "0.2", "--out", str(cal))
    assert code == 0, err
    blob = torch.load(model / "exit_classifiers" / "predictor.pt", weights_only=False)
    m = blob["metrics"]
    assert blob["kind"] == "predictor" and blob["shortlist"] == 8 and blob["label"] == "stable"
    assert m["heldout_accuracy"] > m["heldout_majority"] + 0.1, m
    assert m["heldout_auc"] > 0.75 and m["final_top1_in_shortlist"] > 0.8, m
    summary = json.loads((cal / "calibration.json").read_text())[0]
    assert summary["threshold"] is not None and summary["calibration_risk"] <= 0.3
    assert summary["test_compute_pct"] < 100.0  # the certified threshold exits early
    # the fitted K and minimum exit layer are the policy's; others are refused
    ev = ["evaluate", "--model", str(model), "--policy", "predictor"]
    code, _, err = run_cli(*ev, "--param", "shortlist=4")
    assert code == 2 and "fitted with shortlist=8" in err and len(message_lines(err)) == 1
    code, _, err = run_cli(*ev, "--min-exit-layer", "2")
    assert code == 2 and "--min-exit-layer 1, not 2" in err and len(message_lines(err)) == 1


@pytest.mark.parametrize(
    "args,msg",
    [
        (["evaluate", "--policy", "predictor"], "no fitted exit classifier"),
        (["evaluate", "--policy", "predictor", "--param", "shortlist=0"], "shortlist must be >= 1"),
        (
            ["evaluate", "--policy", "predictor", "--param", "shortlist=300"],
            "shortlist=300 is more candidates than the vocabulary (257 tokens)",
        ),
        (
            ["calibrate", "--fit", "predictor", "--param", "shortlist=300"],
            "shortlist=300 is more candidates than the vocabulary (257 tokens)",
        ),
        (["calibrate", "--fit", "predictor", "--param", "shortlist=0"], "shortlist must be >= 1"),
    ],
)
def test_bad_input_is_one_line_exit_2(tiny_checkpoint, tmp_path, args, msg):
    out = tmp_path / "out"
    code, _, err = run_cli(
        *args, "--model", str(tiny_checkpoint), "--max-tokens", "256", "--out", str(out)
    )
    assert code == 2 and msg in err, err
    assert len(message_lines(err)) == 1, err
    assert not out.exists() and not (tiny_checkpoint / "exit_classifiers" / "predictor.pt").exists()
