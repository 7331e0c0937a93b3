import json

import pytest
import torch

from eexit.calibration.calibrate import token_risks
from eexit.errors import EexitError
from eexit.evaluation.records import ExitTable
from eexit.policies.base import ExitView, make_policy
from eexit.policies.learned import CLASSIFIERS, LSTMPolicy, exit_labels, fit_classifier
from tests.conftest import message_lines, run_cli


def test_exit_labels_consistent_and_stable():
    top1 = torch.tensor([[4, 7, 1], [5, 7, 2], [4, 7, 2]])  # [layers, tokens]
    assert exit_labels(top1, "consistent").T.tolist() == [[1, 0, 1], [1, 1, 1], [0, 1, 1]]
    assert exit_labels(top1, "stable").T.tolist() == [[0, 0, 1], [1, 1, 1], [0, 1, 1]]
    with pytest.raises(EexitError, match="unknown label"):
        exit_labels(top1, "same")


@pytest.mark.parametrize("name", ["meta", "lstm", "mlp3"])
def test_classifiers_learn_a_separable_rule(name):
    torch.manual_seed(0)
    n, L, d = 2000, 4, 8
    feats = torch.randn(n, L, d)
    labels = (
        (feats[:, :, 0] > 0).float().T
    )  # exit iff the first feature of the current state is positive
    clf, metrics = fit_classifier(name, feats, labels, [1, 2, 3, 4], max_epochs=60)
    assert metrics["heldout_accuracy"] > 0.85, metrics
    assert 0.3 < metrics["positive_share"] < 0.7


def test_mlp3_sees_exactly_the_last_three_states():
    torch.manual_seed(0)
    clf = CLASSIFIERS.get("mlp3")(4)
    seq = torch.randn(2, 5, 4)
    full = clf(seq)
    # the logit at layer 4 only depends on layers 2, 3, 4
    changed = seq.clone()
    changed[:, 0] += 10.0
    assert torch.allclose(clf(changed)[:, 3], full[:, 3])
    assert not torch.allclose(clf(changed)[:, 1], full[:, 1])


class _Model:
    hidden_size = 4
    device = "cpu"

    class parts:
        final_norm = torch.nn.Identity()


def test_lstm_policy_carries_state_across_exits_like_one_pass():
    torch.manual_seed(0)
    clf = CLASSIFIERS.get("lstm")(4).eval()
    pol = LSTMPolicy(threshold=0.5)
    pol.clf, pol.norm = clf, torch.nn.Identity()
    states = [torch.randn(3, 4) for _ in range(5)]  # embeddings + 4 layers
    st: dict = {}
    scores = [
        pol.score(ExitView(l, 4, states[: l + 1], lambda: None, None, st)) for l in (2, 4)
    ]  # exits at 2 and 4
    one_pass, _ = clf(torch.stack(states[1:], 1))
    assert torch.allclose(scores[0], torch.sigmoid(one_pass[:, 1]), atol=1e-6)
    assert torch.allclose(scores[1], torch.sigmoid(one_pass[:, 3]), atol=1e-6)


def test_learned_policy_without_classifier_is_a_clear_error(tiny_checkpoint):
    code, _, err = run_cli("evaluate", "--model", str(tiny_checkpoint), "--policy", "lstm")
    assert code == 2 and "no fitted exit classifier" in err and "--fit lstm" in err


def toy_table(n=1000):
    """Exit 1 agrees with the final top-1 where its score is high."""
    g = torch.Generator().manual_seed(0)
    score1 = torch.rand(n, generator=g)
    wrong = torch.rand(n, generator=g) < 0.5 * (1 - score1)
    top1 = torch.stack(
        [
            torch.where(wrong, torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)),
            torch.zeros(n, dtype=torch.long),
        ]
    )
    nll = torch.stack(
        [torch.where(wrong, torch.full((n,), 3.0), torch.full((n,), 1.0)), torch.ones(n)]
    )
    return ExitTable([1, 2], 2, nll, top1, torch.stack([score1, torch.ones(n)]), 0.0, False)


def test_token_risks():
    t = toy_table()
    pol = make_policy("max-prob")
    r = token_risks(t, pol, [1.0, 0.0], "consistency")
    assert r[0].sum() == 0  # threshold 1: nobody exits early
    assert r[1].mean().item() == pytest.approx((t.top1[0] != t.top1[1]).float().mean().item())
    loss = token_risks(t, pol, [0.0], "loss")[0]
    assert loss.max().item() == pytest.approx(1 - torch.exp(torch.tensor(-2.0)).item(), rel=1e-6)
    assert loss.min().item() == 0.0


def test_calibrate_end_to_end_and_evaluate_with_it(tiny_checkpoint, tmp_path):
    out = tmp_path / "cal"
    code, stdout, err = run_cli(
        "calibrate",
        "--model",
        str(tiny_checkpoint),
        "--policy",
        "max-prob",
        "--epsilon",
        "0.3",
        "--delta",
        "0.2",
        "--max-tokens",
        "2048",
        "--out",
        str(out),
    )
    assert code == 0, err
    summary = json.loads((out / "calibration.json").read_text())[0]
    chosen = json.loads((out / "calibrated.json").read_text())
    assert chosen["threshold"] == summary["threshold"] is not None
    assert summary["calibration_risk"] <= 0.3
    assert "test_risk" in summary and 0 <= summary["test_compute_pct"] <= 100
    code, stdout, err = run_cli(
        "evaluate",
        "--model",
        str(tiny_checkpoint),
        "--calibrated",
        str(out),
        "--max-tokens",
        "2048",
        "--out",
        str(tmp_path / "ev"),
    )
    assert code == 0, err
    row = json.loads((tmp_path / "ev" / "evaluate.json").read_text())[0]
    assert row["threshold"] == chosen["threshold"]
    assert row["compute_pct"] == pytest.approx(summary["test_compute_pct"])


def test_calibrate_impossible_epsilon_says_so(tiny_checkpoint, tmp_path):
    code, stdout, err = run_cli(
        "calibrate",
        "--model",
        str(tiny_checkpoint),
        "--policy",
        "max-prob",
        "--epsilon",
        "1e-6",
        "--grid",
        "0:0.5:0.1",
        "--max-tokens",
        "2048",
        "--out",
        str(tmp_path / "c"),
    )
    # 2048 tokens can never certify epsilon 1e-6 (even zero errors need 2.3 M tokens): refused
    # before a "guarantee" could be printed
    assert code == 2 and "needs at least 2302584" in err, err
    assert not (tmp_path / "c").exists()


def test_calibrate_bad_input(tiny_checkpoint, tmp_path):
    for args, msg in [
        (["--policy", "margn"], "did you mean 'margin'"),
        (["--fit", "lstmm"], "unknown exit classifier"),
        ([], "nothing to do"),
        (["--policy", "margin", "--risk", "bleu"], "unknown risk"),
        (["--policy", "margin", "--epsilon", "2"], "epsilon and delta"),
        (["--fit", "meta", "--policy", "static"], "no threshold to calibrate"),
        (["--fit", "meta", "--policy", "meta", "--epsilon", "2"], "epsilon and delta"),
    ]:
        code, _, err = run_cli(
            "calibrate",
            "--model",
            str(tiny_checkpoint),
            *args,
            "--max-tokens",
            "512",
            "--out",
            str(tmp_path / "x"),
        )
        assert code == 2 and msg in err, (args, err)
    assert not (
        tiny_checkpoint / "exit_classifiers" / "meta.pt"
    ).exists()  # nothing was fitted before the error


def test_a_calibration_is_refused_on_retrained_weights(tiny_checkpoint, tmp_path):
    """calibrated.json records the identity of the model it was calibrated on (weights hash
    included): the same folder with other weights is refused where the threshold is applied,
    naming both; on its own model it applies."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = shutil.copytree(tiny_checkpoint, tmp_path / "m")
    cal = tmp_path / "cal"
    code, _, err = run_cli(
        "calibrate", "--model", str(model), "--policy", "max-prob", "--epsilon", "0.3",
        "--delta", "0.3", "--max-tokens", "2048", "--out", str(cal),
    )  # fmt: skip
    assert code == 0, err
    test_row = json.loads((cal / "calibration.json").read_text())[0]
    assert test_row["test_predicted_speedup"] > 0  # the measured cost model on the test rows
    recorded = json.loads((cal / "calibrated.json").read_text())["model_identity"]
    assert recorded["num_layers"] == 3 and len(recorded["weights_sha256"]) == 64
    ev = ["evaluate", "--model", str(model), "--calibrated", str(cal), "--max-tokens", "256"]
    code, _, err = run_cli(*ev)
    assert code == 0, err
    weights = model / "model.safetensors"
    state = load_file(str(weights))
    name = next(k for k, v in state.items() if v.dtype.is_floating_point)
    state[name] = state[name] + 0.01  # "retrained" in place
    save_file(state, str(weights), metadata={"format": "pt"})
    code, _, err = run_cli(*ev)
    lines = message_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert "the threshold at" in lines[0] and "calibrated on another model" in lines[0]
    assert "calibrate it again" in lines[0]
