"""Learn-then-Test threshold calibration: exact p-values, fixed-sequence testing, the coverage
guarantee."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eexit.calibration.ltt import (
    CalibrationResult,
    binomial_tail_pvalue,
    fixed_sequence_test,
    hoeffding_bentkus_pvalue,
    no_threshold_message,
)
from eexit.errors import EexitError


def exact_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k + 1))


# ---------------------------------------------------------------- p-values


def test_binomial_pvalue_matches_hand_computation():
    # n=10, k=1, eps=0.3: C(10,0) 0.7^10 + C(10,1) 0.3 0.7^9
    assert binomial_tail_pvalue(0.1, 10, 0.3) == pytest.approx(
        0.7**10 + 10 * 0.3 * 0.7**9, rel=1e-12
    )
    assert binomial_tail_pvalue(0.1, 10, 0.3) == pytest.approx(0.1493083459, rel=1e-9)
    for n, k, eps in [(50, 0, 0.1), (50, 3, 0.1), (200, 7, 0.05), (37, 20, 0.6)]:
        assert binomial_tail_pvalue(k / n, n, eps) == pytest.approx(exact_cdf(k, n, eps), rel=1e-9)
    assert binomial_tail_pvalue(1.0, 10, 0.3) == 1.0


def test_binomial_pvalue_large_n_is_stable():
    n = 10**6
    # at risk_hat == eps the tail is just over 1/2; 0.001 below eps is ~4.6 standard errors
    assert 0.5 < binomial_tail_pvalue(0.05, n, 0.05) < 0.51
    p = binomial_tail_pvalue(0.049, n, 0.05)
    assert 1e-6 < p < 5e-6  # normal approximation: Phi(-4.59) ~ 2.2e-6
    assert binomial_tail_pvalue(0.0, n, 0.05) == 0.0  # 0.95^1e6 underflows cleanly, no nan


def test_binomial_pvalue_monotone():
    by_risk = [binomial_tail_pvalue(k / 200, 200, 0.1) for k in range(0, 41)]
    assert all(a < b for a, b in zip(by_risk, by_risk[1:]))
    by_eps = [binomial_tail_pvalue(0.05, 200, e) for e in (0.02, 0.05, 0.08, 0.1, 0.2, 0.5)]
    assert all(a > b for a, b in zip(by_eps, by_eps[1:]))


def test_hoeffding_bentkus_pvalue():
    n, r, eps = 100, 0.02, 0.1
    h1 = r * math.log(r / eps) + (1 - r) * math.log((1 - r) / (1 - eps))
    expected = min(math.exp(-n * h1), math.e * exact_cdf(2, n, eps))
    assert hoeffding_bentkus_pvalue(r, n, eps) == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(0.005287, rel=1e-3)  # the Bentkus term wins here
    # h1(0, eps) = -log(1 - eps): the Hoeffding term is (1 - eps)^n; Bentkus is e (1 - eps)^n
    assert hoeffding_bentkus_pvalue(0.0, 50, 0.1) == pytest.approx(0.9**50, rel=1e-9)
    grid = [
        (rh, n, e)
        for rh in (0.0, 0.01, 0.05, 0.099, 0.1, 0.3, 1.0)
        for n in (1, 10, 1000)
        for e in (0.05, 0.1, 0.5)
    ]
    for rh, n, e in grid:
        p = hoeffding_bentkus_pvalue(rh, n, e)
        assert 0.0 <= p <= 1.0
        if rh >= e:
            assert p == 1.0
        if round(n * rh) == n * rh:  # a binary-loss risk: HB is never sharper than the exact test
            assert p >= binomial_tail_pvalue(rh, n, e) - 1e-15
    ps = [hoeffding_bentkus_pvalue(0.05, n, 0.1) for n in (50, 100, 500, 2000, 10000)]
    assert all(a > b for a, b in zip(ps, ps[1:]))
    assert ps[-1] < 1e-30


@pytest.mark.parametrize(
    "args",
    [
        (0.1, 10, 0.0),
        (0.1, 10, 1.0),
        (-0.1, 10, 0.3),
        (1.5, 10, 0.3),
        (0.1, 0, 0.3),
        (0.1, 2.5, 0.3),
        (float("nan"), 10, 0.3),
    ],
)
def test_pvalue_bad_inputs(args):
    for fn in (binomial_tail_pvalue, hoeffding_bentkus_pvalue):
        with pytest.raises(EexitError):
            fn(*args)


# ---------------------------------------------------------------- fixed-sequence testing


def errors_matrix(n: int, counts: list[int]) -> torch.Tensor:
    rows = torch.zeros(len(counts), n)
    for t, c in enumerate(counts):
        rows[t, :c] = 1.0
    return rows


def test_fixed_sequence_picks_smallest_rejected_threshold():
    # thresholds deliberately unsorted; error counts out of 100 at each
    thresholds = [0.5, 0.9, 0.3, 0.7]
    risks = errors_matrix(100, [3, 0, 30, 1])
    res = fixed_sequence_test(thresholds, risks, eps=0.1, delta=0.1)
    assert isinstance(res, CalibrationResult)
    assert res.threshold == 0.5
    assert [row.threshold for row in res.tested] == [0.9, 0.7, 0.5, 0.3]
    assert [row.rejected for row in res.tested] == [True, True, True, False]
    assert [row.risk_hat for row in res.tested] == pytest.approx([0.0, 0.01, 0.03, 0.30])
    assert res.tested[0].p_value == pytest.approx(0.9**100, rel=1e-9)
    assert res.tested[2].p_value == pytest.approx(exact_cdf(3, 100, 0.1), rel=1e-9)
    assert (res.eps, res.delta, res.method, res.n) == (0.1, 0.1, "binomial", 100)
    # numpy input, Hoeffding-Bentkus: e * P(Bin(100, .1) <= 3) = 0.0212 still passes at delta = 0.1
    hb = fixed_sequence_test(
        thresholds, risks.numpy(), eps=0.1, delta=0.1, method="hoeffding-bentkus"
    )
    assert hb.threshold == 0.5
    # at delta = 0.01 binomial still certifies 0.5 (p = 0.0078) but HB (p = 0.0212) stops at 0.7
    assert fixed_sequence_test(thresholds, risks, eps=0.1, delta=0.01).threshold == 0.5
    assert (
        fixed_sequence_test(thresholds, risks, 0.1, 0.01, method="hoeffding-bentkus").threshold
        == 0.7
    )


def test_fixed_sequence_stops_at_first_failure():
    # 0.7 fails (30% errors); 0.5 would pass on its own but is never tested
    res = fixed_sequence_test([0.9, 0.7, 0.5], errors_matrix(100, [0, 30, 0]), eps=0.1, delta=0.1)
    assert res.threshold == 0.9
    assert [(row.threshold, row.rejected) for row in res.tested] == [(0.9, True), (0.7, False)]


def test_fractional_risks_with_hoeffding_bentkus():
    torch.manual_seed(0)
    risks = torch.stack(
        [torch.rand(2000) * s for s in (0.0, 0.05, 0.1, 0.4)]
    )  # means 0, .025, .05, .2
    res = fixed_sequence_test(
        [1.0, 0.8, 0.6, 0.4], risks, eps=0.1, delta=0.05, method="hoeffding-bentkus"
    )
    assert res.threshold == 0.6
    with pytest.raises(EexitError, match="binary"):
        fixed_sequence_test([1.0, 0.8, 0.6, 0.4], risks, eps=0.1, delta=0.05, method="binomial")


def test_impossible_eps_gives_none_and_message():
    n = 2000
    risks = errors_matrix(n, [100] * 5)  # every threshold has risk 0.05
    res = fixed_sequence_test([1.0, 0.8, 0.6, 0.4, 0.2], risks, eps=0.001, delta=0.05)
    assert res.threshold is None
    assert len(res.tested) == 1 and not res.tested[0].rejected
    msg = no_threshold_message(res)
    assert "no threshold satisfies" in msg
    assert msg.startswith(
        "no threshold satisfies risk <= 0.001 with confidence 0.95 on 2000 calibration examples"
    )
    assert "the most conservative threshold 1.00 has empirical risk 0.05, p = 1" in msg
    assert msg.endswith("raise epsilon or delta, or use more calibration data")
    ok = fixed_sequence_test([1.0, 0.5], errors_matrix(100, [0, 1]), eps=0.1, delta=0.1)
    assert no_threshold_message(ok).startswith("threshold 0.50 satisfies risk <= 0.1")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eps=0.0), "epsilon"),
        (dict(eps=1.2), "epsilon"),
        (dict(delta=0.0), "delta"),
        (dict(delta=1.0), "delta"),
        (dict(method="bonferroni"), "binomial, hoeffding-bentkus"),
        (dict(risks=torch.full((3, 10), 1.5)), r"\[0, 1\]"),
        (dict(risks=torch.full((3, 10), -0.5)), r"\[0, 1\]"),
        (dict(risks=torch.full((3, 10), float("nan"))), r"\[0, 1\]"),
        (dict(risks=torch.full((3, 10), 0.5)), "binary"),
        (dict(risks=torch.zeros(2, 10)), "shape"),
        (dict(risks=torch.zeros(30)), "shape"),
        (dict(risks=torch.zeros(3, 0)), "shape"),
        (dict(thresholds=[]), "at least one"),
        (dict(thresholds=[0.9, 0.9, 0.5]), "distinct"),
        (dict(thresholds=[0.9, float("inf"), 0.5]), "finite"),
    ],
)
def test_fixed_sequence_bad_inputs(kwargs, match):
    args = dict(
        thresholds=[0.9, 0.7, 0.5], risks=torch.zeros(3, 10), eps=0.1, delta=0.1, method="binomial"
    )
    args.update(kwargs)
    with pytest.raises(EexitError, match=match):
        fixed_sequence_test(**args)


# ---------------------------------------------------------------- the guarantee, empirically

N_TOKENS, N_CAL, N_SPLITS, EPS, DELTA = 20_000, 1000, 400, 0.05, 0.1
GRID = [round(1.0 - 0.01 * i, 2) for i in range(101)]  # 1.00, 0.99, ..., 0.00


def population(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens with confidence s ~ U(0, 1) and an error w.p. 0.3 (1 - s): risk(lam) ~ 0.15 (1 -
    lam)^2.

    Population risk crosses eps = 0.05 near lam = 0.42, well inside the grid.
    """
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(N_TOKENS, generator=g, dtype=torch.float64)
    err = (torch.rand(N_TOKENS, generator=g, dtype=torch.float64) < 0.3 * (1 - s)).double()
    return s, err


def run_guarantee(method: str) -> tuple[float, float, float]:
    """Return (violation rate, mean chosen threshold, mean test risk) over random cal/test
    splits."""
    s, err = population()
    grid = torch.tensor(GRID, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    violations, chosen, test_risks = 0, [], []
    for _ in range(N_SPLITS):
        perm = torch.randperm(N_TOKENS, generator=g)
        cal, test = perm[:N_CAL], perm[N_CAL:]
        risks = err[cal][None, :] * (s[cal][None, :] > grid[:, None])  # exited early and wrong
        lam = fixed_sequence_test(GRID, risks, EPS, DELTA, method=method).threshold
        lam = 1.0 if lam is None else lam
        test_risk = float((err[test] * (s[test] > lam)).mean())
        violations += test_risk > EPS
        chosen.append(lam)
        test_risks.append(test_risk)
    return violations / N_SPLITS, float(np.mean(chosen)), float(np.mean(test_risks))


@pytest.fixture
def one_thread():
    """Hundreds of tiny tensor ops: intra-op threads only add contention on a busy machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("method", ["binomial", "hoeffding-bentkus"])
def test_risk_control_guarantee(method, one_thread):
    rate, mean_lam, mean_risk = run_guarantee(method)
    print(
        f"\n{method}: violation rate {rate:.4f}, mean threshold {mean_lam:.4f}, mean test risk "
        f"{mean_risk:.4f}"
    )
    assert rate <= DELTA + 0.03
    assert mean_lam < 0.7  # far from the trivial "never exit" answer (1.0); oracle is ~0.42
    assert mean_risk > 0.5 * EPS
