"""Risk-controlling threshold calibration (CALM, Schuster et al. 2022) via Learn-then-Test.

An early-exit model exits at a token when its confidence clears a threshold λ; a larger λ
exits less and is safer.  Given per-example risks ``r_i(λ)`` in [0, 1] on n calibration
examples (e.g. 1 when the early-exit token differs from the full model's token), we want the
smallest λ such that ``P(R(λ) <= eps) >= 1 - delta`` where R is the expected risk on new data.

Learn-then-Test (Angelopoulos et al. 2021) tests, for every candidate λ, the null hypothesis
``H0(λ): R(λ) > eps`` with a valid p-value, and keeps the λ whose null is rejected under a
family-wise error rate of delta.  Because risk (roughly) decreases with λ, CALM orders the
candidates from the most conservative to the most aggressive and uses fixed-sequence
testing: every test is run at level delta, and testing stops at the first non-rejection.
The family-wise error rate is then at most delta, so with probability >= 1 - delta every
returned-as-safe λ (in particular the chosen, smallest one) has R(λ) <= eps.

P-values (``n`` examples, empirical risk ``risk_hat``, tolerance ``eps``):

* ``binomial`` (binary losses only): the exact ``P(Binomial(n, eps) <= n * risk_hat)``.
* ``hoeffding-bentkus`` (any losses in [0, 1]):
  ``min(exp(-n h1(min(risk_hat, eps), eps)), e * P(Binomial(n, eps) <= ceil(n * risk_hat)))``
  with ``h1(a, b) = a log(a / b) + (1 - a) log((1 - a) / (1 - b))``.

Binomial CDFs are summed in log space (``lgamma`` + ``logsumexp``), so n up to 10**6 is fine.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import torch

from eexit.errors import EexitError

METHODS = ("binomial", "hoeffding-bentkus")
_ROUND_SLACK = 1e-9  # n * risk_hat is an integer up to float error for binary losses


def _check_eps(eps: float) -> None:
    if not (isinstance(eps, numbers.Real) and 0.0 < eps < 1.0):
        raise EexitError(
            f"bad risk tolerance epsilon {eps!r}; it must be a number with 0 < epsilon < 1"
        )


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, numbers.Real) and 0.0 < delta < 1.0):
        raise EexitError(
            f"bad delta {delta!r}; it must be a number with 0 < delta < 1 (confidence = 1 - delta)"
        )


def _check_common(risk_hat: float, n: int, eps: float) -> None:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise EexitError(f"bad number of calibration examples {n!r}; it must be an integer >= 1")
    if not (isinstance(risk_hat, numbers.Real) and 0.0 <= risk_hat <= 1.0):
        raise EexitError(f"bad empirical risk {risk_hat!r}; it must be a number in [0, 1]")
    _check_eps(eps)


def _log_binom_cdf(k: int, n: int, p: float) -> float:
    """log P(Binomial(n, p) <= k), summed in log space (stable for large n)."""
    if k < 0:
        return -math.inf
    if k >= n:
        return 0.0
    j = torch.arange(k + 1, dtype=torch.float64)
    log_pmf = (
        math.lgamma(n + 1)
        - torch.lgamma(j + 1)
        - torch.lgamma(n - j + 1)
        + j * math.log(p)
        + (n - j) * math.log1p(-p)
    )
    return min(0.0, float(torch.logsumexp(log_pmf, dim=0)))


def _h1(a: float, b: float) -> float:
    """Bernoulli KL divergence h1(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b)), with 0 log 0 = 0."""
    out = 0.0
    if a > 0.0:
        out += a * math.log(a / b)
    if a < 1.0:
        out += (1.0 - a) * math.log((1.0 - a) / (1.0 - b))
    return max(out, 0.0)


def binomial_tail_pvalue(risk_hat: float, n: int, eps: float) -> float:
    """Exact p-value for H0: R > eps with binary losses: P(Binomial(n, eps) <= k), k = round(n *
    risk_hat)."""
    _check_common(risk_hat, n, eps)
    k = int(round(n * risk_hat))
    return math.exp(_log_binom_cdf(k, int(n), eps))


def hoeffding_bentkus_pvalue(risk_hat: float, n: int, eps: float) -> float:
    """Hoeffding-Bentkus p-value for H0: R > eps with losses in [0, 1] (LTT, Angelopoulos et al.
    2021).

    ``min(exp(-n h1(min(risk_hat, eps), eps)), e * P(Binomial(n, eps) <= ceil(n * risk_hat)))``,
    capped at 1.  It is 1 whenever ``risk_hat >= eps`` (the Hoeffding term is then exp(0)).
    """
    _check_common(risk_hat, n, eps)
    hoeffding = math.exp(-n * _h1(min(risk_hat, eps), eps))
    k = math.ceil(n * risk_hat - _ROUND_SLACK)
    bentkus = math.e * math.exp(_log_binom_cdf(k, int(n), eps))
    return min(hoeffding, bentkus, 1.0)


_PVALUES: dict[str, Callable[[float, int, float], float]] = {
    "binomial": binomial_tail_pvalue,
    "hoeffding-bentkus": hoeffding_bentkus_pvalue,
}


class ThresholdRow(NamedTuple):
    """One row of a fixed-sequence test: H0: R(threshold) > eps is rejected when
    p_value <= delta."""

    threshold: float
    risk_hat: float
    p_value: float
    rejected: bool


@dataclass
class CalibrationResult:
    """Outcome of :func:`fixed_sequence_test`.

    ``threshold`` is the smallest (most aggressive) certified threshold, or None when even the
    most conservative one fails.  ``tested`` lists the thresholds actually tested, from the most
    conservative down to (and including) the first failure.
    """

    threshold: float | None
    tested: list[ThresholdRow] = field(default_factory=list)
    eps: float = 0.0
    delta: float = 0.0
    method: str = "binomial"
    n: int = 0

    @property
    def confidence(self) -> float:
        return 1.0 - self.delta


def fixed_sequence_test(
    thresholds: list[float],
    risks: torch.Tensor | np.ndarray,
    eps: float,
    delta: float,
    method: str = "binomial",
) -> CalibrationResult:
    """Pick the smallest threshold whose risk is certified <= eps with probability >= 1 - delta.

    ``risks[t, i]`` is the loss in [0, 1] of calibration example i at ``thresholds[t]``
    (shape [n_thresholds, n_examples]).  Thresholds are tested from the largest (most
    conservative) to the smallest; each H0: R > eps is rejected while its p-value is <= delta,
    and testing stops at the first failure.  ``method="binomial"`` needs losses in {0, 1}.
    """
    if method not in _PVALUES:
        raise EexitError(f"unknown calibration method {method!r}; use one of: {', '.join(METHODS)}")
    _check_eps(eps)
    _check_delta(delta)
    try:
        thr = [float(t) for t in thresholds]
    except (TypeError, ValueError):
        raise EexitError("thresholds must be a list of numbers") from None
    if not thr:
        raise EexitError("no thresholds given; pass at least one threshold")
    if any(not math.isfinite(t) for t in thr):
        raise EexitError("thresholds must be finite numbers")
    if len(set(thr)) != len(thr):
        raise EexitError("thresholds must be distinct")
    r = torch.as_tensor(np.asarray(risks) if not isinstance(risks, torch.Tensor) else risks)
    r = r.detach().to("cpu", torch.float64)
    if r.dim() != 2 or r.shape[0] != len(thr) or r.shape[1] < 1:
        raise EexitError(
            f"risks must have shape [n_thresholds={len(thr)}, n_examples>=1]; got {list(r.shape)}"
        )
    lo, hi = torch.aminmax(r)
    if not (float(lo) >= 0.0 and float(hi) <= 1.0):  # also false for NaN
        raise EexitError("risks must lie in [0, 1] (bounded per-example losses)")
    if method == "binomial" and not torch.equal(r, r.round()):
        raise EexitError(
            "method 'binomial' needs binary (0/1) risks; use 'hoeffding-bentkus' for losses in [0, "
            "1]"
        )

    n = int(r.shape[1])
    pvalue = _PVALUES[method]
    risk_hats = r.mean(dim=1).clamp(0.0, 1.0).tolist()
    chosen: float | None = None
    tested: list[ThresholdRow] = []
    for t in sorted(range(len(thr)), key=lambda i: -thr[i]):
        p = pvalue(risk_hats[t], n, eps)
        rejected = p <= delta
        tested.append(ThresholdRow(thr[t], risk_hats[t], p, rejected))
        if not rejected:
            break
        chosen = thr[t]
    return CalibrationResult(chosen, tested, float(eps), float(delta), method, n)


def _num(x: float, digits: int = 3) -> str:
    return f"{x:.2f}" if abs(x - round(x, 2)) < 1e-12 else f"{x:.{digits}g}"


def no_threshold_message(result: CalibrationResult) -> str:
    """A one-line explanation of a calibration result, meant for ``result.threshold is None``."""
    conf = f"confidence {result.confidence:g}"
    if result.threshold is not None:
        return (
            f"threshold {_num(result.threshold)} satisfies risk <= {result.eps:g} with {conf} "
            f"on {result.n} calibration examples ({result.method} test)"
        )
    head = (
        f"no threshold satisfies risk <= {result.eps:g} with {conf} on {result.n} "
        "calibration examples"
    )
    if result.tested:
        first = result.tested[0]
        head += (
            f" (the most conservative threshold {_num(first.threshold)} has empirical risk "
            f"{first.risk_hat:.3g}, p = {first.p_value:.2g})"
        )
    return head + "; raise epsilon or delta, or use more calibration data"
