"""FREE's Beta mixture and threshold: the fit recovers a known mixture, the rule picks the grid
value the posterior says, and `eexit calibrate --method free` reports it beside LTT."""

import json
import math

import numpy as np
import pytest
import torch

from eexit.calibration.beta_mixture import (
    DEFAULT_GRID,
    Beta,
    BetaMixture,
    fit_beta_mixture,
    fit_beta_moments,
    free_threshold,
)
from eexit.calibration.calibrate import free_pairs
from eexit.errors import EexitError
from eexit.evaluation.records import ExitTable
from eexit.policies.base import make_policy
from tests.conftest import message_lines, run_cli


def mixture_sample(n, seed, weight_high=0.7, high=(8.0, 2.0), low=(2.0, 8.0)):
    """n confidences from weight_high * Beta(high) + (1 - weight_high) * Beta(low), and which
    component drew each."""
    rng = np.random.default_rng(seed)
    z = rng.random(n) < weight_high
    x = np.where(z, rng.beta(*high, n), rng.beta(*low, n))
    return x, z


def by_mean(mix: BetaMixture):
    """(weight, Beta) of the low-mean then the high-mean component."""
    order = sorted(range(2), key=lambda k: mix.components[k].mean)
    return [(mix.weights[k], mix.components[k]) for k in order]


def test_default_grid_is_free_s_ten_values_on_0_3_to_0_9():
    assert len(DEFAULT_GRID) == 10 and DEFAULT_GRID[0] == 0.3 and DEFAULT_GRID[-1] == 0.9
    assert np.allclose(np.diff(DEFAULT_GRID), 0.6 / 9, atol=1e-4)


def test_weighted_moments_give_the_beta_of_that_mean_and_variance():
    x = np.array([0.2, 0.4, 0.6, 0.9])
    w = np.array([1.0, 2.0, 0.0, 1.0])  # the 0.6 point does not count
    b = fit_beta_moments(x, w)
    m = (0.2 + 0.8 + 0.9) / 4
    v = ((0.2 - m) ** 2 + 2 * (0.4 - m) ** 2 + (0.9 - m) ** 2) / 4
    assert b.mean == pytest.approx(m)
    var = b.alpha * b.beta / ((b.alpha + b.beta) ** 2 * (b.alpha + b.beta + 1))
    assert var == pytest.approx(v)


def test_labelled_fit_recovers_a_known_mixture():
    x, z = mixture_sample(20000, seed=0)
    mix = fit_beta_mixture(x, z)  # labels = the drawing component
    (w_lo, lo), (w_hi, hi) = by_mean(mix)
    assert mix.iterations == 1
    assert w_hi == pytest.approx(0.7, abs=0.01) and w_lo == pytest.approx(0.3, abs=0.01)
    assert hi.mean == pytest.approx(0.8, abs=0.005) and lo.mean == pytest.approx(0.2, abs=0.005)
    assert (hi.alpha, hi.beta) == pytest.approx((8.0, 2.0), rel=0.06)
    assert (lo.alpha, lo.beta) == pytest.approx((2.0, 8.0), rel=0.06)
    assert mix.components[1] is hi  # component 1 started from the consistent tokens


def test_em_recovers_the_mixture_where_the_labels_are_noisy():
    x, z = mixture_sample(5000, seed=1)
    flipped = np.random.default_rng(2).random(len(z)) < 0.2  # a fifth of the labels are wrong
    y = z ^ flipped
    (w_lo, lo), (w_hi, hi) = by_mean(fit_beta_mixture(x, y, em=True))
    assert w_hi == pytest.approx(0.7, abs=0.02)
    assert hi.mean == pytest.approx(0.8, abs=0.01) and lo.mean == pytest.approx(0.2, abs=0.01)
    assert (hi.alpha, hi.beta) == pytest.approx((8.0, 2.0), rel=0.1)
    # the labelled fit takes the wrong labels at their word: both components are smeared
    (_, lo_l), (w_hi_l, hi_l) = by_mean(fit_beta_mixture(x, y))
    assert abs(w_hi_l - 0.7) > 0.05 and hi_l.mean < 0.76 and lo_l.mean > 0.35


def test_threshold_is_where_the_high_component_takes_over():
    # equal weights, Beta(5, 2) vs Beta(2, 5): P(high | x) = x^3 / (x^3 + (1 - x)^3), above zeta
    # exactly for x > cut = 1 / (1 + ((1 - zeta) / zeta)^(1/3))
    mix = BetaMixture((Beta(2.0, 5.0), Beta(5.0, 2.0)), (0.5, 0.5), 1, 0.0, 100, 0.5)
    for zeta, expected, cut in [(0.4, 0.5, 0.4663), (0.9, 0.7, 0.6753), (0.999, None, 0.9091)]:
        assert 1 / (1 + ((1 - zeta) / zeta) ** (1 / 3)) == pytest.approx(cut, abs=1e-4)
        thr, rows = free_threshold(mix, DEFAULT_GRID, zeta)
        assert thr == expected  # the first grid value above the cut (none above 0.909)
        x = np.array([r["grid_value"] for r in rows])
        assert np.allclose([r["posterior_high"] for r in rows], x**3 / (x**3 + (1 - x) ** 3))


def test_threshold_counts_from_where_the_posterior_stays_above_zeta():
    # a wide high-mean component around a narrow low one: the posterior is high at 0.3, dips
    # below zeta around 0.5 and rises again; the threshold is after the dip, not 0.3
    mix = BetaMixture((Beta(20.0, 20.0), Beta(1.2, 1.0)), (0.5, 0.5), 1, 0.0, 100, 0.5)

    def post_high(x):
        def log_beta(x, a, b):
            norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
            return norm + (a - 1) * math.log(x) + (b - 1) * math.log(1 - x)

        hi, lo = math.exp(log_beta(x, 1.2, 1.0)), math.exp(log_beta(x, 20.0, 20.0))
        return hi / (hi + lo)

    assert post_high(0.3) > 0.4 and post_high(0.5) < 0.4
    expected = min(
        g for g in DEFAULT_GRID if all(post_high(h) > 0.4 for h in DEFAULT_GRID if h >= g)
    )
    thr, _ = free_threshold(mix, DEFAULT_GRID, 0.4)
    assert thr == expected == 0.6333


def test_bad_fits_and_options_are_one_line_errors():
    with pytest.raises(EexitError, match="at least 2 consistent and 2 inconsistent"):
        fit_beta_mixture([0.5, 0.6, 0.7], [1, 1, 0])
    mix = BetaMixture((Beta(2.0, 5.0), Beta(5.0, 2.0)), (0.5, 0.5), 1, 0.0, 100, 0.5)
    for zeta in (0.0, 1.0, 1.5):
        with pytest.raises(EexitError, match="zeta"):
            free_threshold(mix, DEFAULT_GRID, zeta)
    with pytest.raises(EexitError, match=r"\[0, 1\]"):
        free_threshold(mix, [0.5, 1.2], 0.4)


def test_free_pairs_are_every_token_at_every_exit_the_threshold_decides():
    top1 = torch.tensor([[1, 2, 3], [1, 0, 3], [1, 2, 0], [1, 2, 3]])  # 4 exits x 3 tokens
    score = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9], [1.0, 1.0, 1.0]])
    table = ExitTable([1, 2, 3, 4], 4, torch.zeros(4, 3), top1, score, 0.0, True)
    x, y = free_pairs(table, make_policy("max-prob", 0.5, min_exit_layer=2))
    assert x.tolist() == pytest.approx([0.4, 0.5, 0.6, 0.7, 0.8, 0.9])  # exits 2 and 3
    assert y.tolist() == [True, False, True, True, True, False]


def test_calibrate_method_free_end_to_end(tiny_checkpoint, tmp_path):
    out = tmp_path / "free"
    code, stdout, err = run_cli(
        "calibrate",
        "--model",
        str(tiny_checkpoint),
        "--policy",
        "saturation",  # its scores on the tiny model spread over [0.8, 1]
        "--method",
        "free",
        "--free-grid",
        "0.8:1:0.02",
        "--epsilon",
        "0.3",
        "--delta",
        "0.2",
        "--max-tokens",
        "512",
        "--out",
        str(out),
    )
    assert code == 0, err
    rows = json.loads((out / "calibration.json").read_text())
    free, ltt = rows
    assert (free["threshold_by"], ltt["threshold_by"]) == ("free", "ltt")
    chosen = json.loads((out / "calibrated.json").read_text())
    assert chosen["source"] == "FREE" and chosen["threshold"] == free["threshold"]
    assert free["threshold"] in [round(0.8 + 0.02 * i, 10) for i in range(11)]
    for row in rows:  # both compared on the same test tokens
        assert row["test_tokens"] == free["test_tokens"] > 100
        assert row["test_agreement_pct"] == pytest.approx(100 * (1 - row["test_risk"]))
    assert ltt["calibration_risk"] <= 0.3
    md = (out / "calibration.md").read_text()
    assert "FREE's Beta mixture" in md and "posterior_high" in md
    assert stdout.count("threshold") == 2 and "FREE threshold" in stdout


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--method", "bayes"], "unknown --method 'bayes'"),
        (["--zeta", "1.5"], "--zeta must lie in (0, 1)"),
        (["--zeta", "0"], "--zeta must lie in (0, 1)"),
        (["--free-fit", "kmeans"], "unknown --free-fit"),
        (["--free-grid", "0.5,1.5"], "thresholds must lie in [0, 1]"),
    ],
)
def test_calibrate_free_bad_input_exits_2_with_one_line(tiny_checkpoint, tmp_path, args, msg):
    code, _, err = run_cli(
        "calibrate", "--model", str(tiny_checkpoint), "--policy", "max-prob", *args,
        "--out", str(tmp_path / "x"),
    )  # fmt: skip
    lines = message_lines(err)
    assert code == 2 and len(lines) == 1 and msg in lines[0], err
    assert not (tmp_path / "x").exists()
