"""FREE's adaptive exit threshold (Bae et al., EMNLP 2023): a two-component Beta mixture fitted to
exit confidences, and the threshold read off its posterior.

Why: Learn-then-Test certifies a threshold but needs a risk budget and many tokens; FREE instead
asks where confident-and-right tokens start to dominate. Each token seen at an exit gives a pair
(confidence x in [0, 1], whether the exit's top-1 equals the final top-1). The confidences are
modelled as a mixture of two Beta densities, one for the consistent tokens and one for the
inconsistent ones, and the threshold is where the consistent component takes over.

The fit (`fit_beta_mixture`):

- x is clipped into [1e-4, 1 - 1e-4] (a Beta density lives on the open interval);
- responsibilities start from the labels: r_1(x_i) = y_i, r_0(x_i) = 1 - y_i;
- M-step, per component k, by the weighted method of moments: with
  m = sum r x / sum r and v = sum r (x - m)^2 / sum r,
  alpha = m (m (1 - m) / v - 1) and beta = (1 - m) (m (1 - m) / v - 1); the weight
  pi_k = mean of r_k;
- E-step: r_k(x) = pi_k Beta(x; alpha_k, beta_k) / sum_j pi_j Beta(x; alpha_j, beta_j),
  then the M-step again, until the log-likelihood moves by less than `tol` per point.

`em=False` (the default) stops after the first M-step: the responsibilities are the labels,
which is what FREE's public code effectively does (its EM loop re-fits from the labels every
iteration). With every label observed there is no latent variable, so this is the
complete-data fit and its components mean "consistent" and "inconsistent" literally. `em=True`
runs proper EM: the labels only start it, and the components become whichever two Betas explain
the confidence density best. That recovers a mixture from noisy labels, but where the two
classes' confidences overlap it drifts away from them (the tiny test model's saturation scores,
class means 0.93 / 0.88: EM moves the weights from 0.57 / 0.43 to 0.79 / 0.21 and the threshold
from 0.90 to 0.30). The method-of-moments M-step is not the exact maximum-likelihood step, so
the likelihood need not rise at every iteration; the loop also stops after `max_iter`.

The threshold (`free_threshold`): over a grid of candidate values (FREE: 10 values evenly spaced
on [0.3, 0.9]), the smallest value from which the posterior of the component with the higher
mean exceeds zeta (FREE: 0.4), i.e. the smallest g such that P(high | x) > zeta at g and at
every larger grid value. None when the posterior is not above zeta even at the largest value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from eexit.errors import EexitError

CLIP = 1e-4  # confidences are clipped into [CLIP, 1 - CLIP]
DEFAULT_ZETA = 0.4
DEFAULT_GRID = tuple(round(0.3 + i * 0.6 / 9, 4) for i in range(10))  # 10 values on [0.3, 0.9]
MIN_PER_LABEL = 2  # a variance needs two points
_MAX_CONCENTRATION = 1e6  # alpha + beta, when the weighted variance is (numerically) zero


@dataclass(frozen=True)
class Beta:
    alpha: float
    beta: float

    @property
    def mean(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    def log_pdf(self, x: np.ndarray) -> np.ndarray:
        a, b = self.alpha, self.beta
        log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
        return log_norm + (a - 1) * np.log(x) + (b - 1) * np.log1p(-x)


def fit_beta_moments(x: np.ndarray, w: np.ndarray) -> Beta:
    """The Beta with the weighted mean and variance of x (x in (0, 1), weights >= 0)."""
    total = float(w.sum())
    if total <= 0:
        raise EexitError("a Beta component has no weight: every point belongs to the other one")
    m = float((w * x).sum() / total)
    v = float((w * (x - m) ** 2).sum() / total)
    spread = m * (1 - m)
    # v < m (1 - m) always holds inside (0, 1); v = 0 (all points equal) gets a sharp Beta
    common = _MAX_CONCENTRATION if v <= spread / _MAX_CONCENTRATION else spread / v - 1
    return Beta(m * common, (1 - m) * common)


@dataclass(frozen=True)
class BetaMixture:
    components: tuple[Beta, Beta]  # [0] started from the inconsistent tokens, [1] the consistent
    weights: tuple[float, float]
    iterations: int  # M-steps run
    log_likelihood: float  # per point, at the final parameters
    points: int
    positive_share: float  # share of labels = 1 (consistent)

    @property
    def high(self) -> int:
        """Index of the component with the higher mean."""
        return int(self.components[1].mean >= self.components[0].mean)

    def log_joint(self, x) -> np.ndarray:
        """[2, n] log(pi_k Beta(x; alpha_k, beta_k))."""
        x = np.clip(np.asarray(x, dtype=np.float64), CLIP, 1 - CLIP)
        return np.stack(
            [math.log(max(w, 1e-300)) + c.log_pdf(x) for c, w in zip(self.components, self.weights)]
        )

    def posterior(self, x) -> np.ndarray:
        """[2, n] responsibilities P(component k | x)."""
        lj = self.log_joint(x)
        return np.exp(lj - np.logaddexp(lj[0], lj[1]))

    def describe(self) -> list[dict]:
        """One row per component, for the results table."""
        return [
            {
                "component": "high" if k == self.high else "low",
                "weight": self.weights[k],
                "alpha": c.alpha,
                "beta": c.beta,
                "mean": c.mean,
            }
            for k, c in enumerate(self.components)
        ]


def _mixture(x, r, iterations, points, share) -> BetaMixture:
    comps = (fit_beta_moments(x, r[0]), fit_beta_moments(x, r[1]))
    weights = (float(r[0].mean()), float(r[1].mean()))
    mix = BetaMixture(comps, weights, iterations, 0.0, points, share)
    lj = mix.log_joint(x)
    ll = float(np.logaddexp(lj[0], lj[1]).mean())
    return BetaMixture(comps, weights, iterations, ll, points, share)


def fit_beta_mixture(
    confidence, consistent, *, em: bool = False, max_iter: int = 200, tol: float = 1e-7
) -> BetaMixture:
    """Fit the two-component Beta mixture to (confidence, consistent) pairs (module docstring)."""
    x = np.clip(np.asarray(confidence, dtype=np.float64).ravel(), CLIP, 1 - CLIP)
    y = np.asarray(consistent, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise EexitError(f"{x.size} confidences but {y.size} labels")
    if not np.isfinite(x).all():
        raise EexitError("the confidences must be finite numbers")
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if min(n_pos, n_neg) < MIN_PER_LABEL:
        raise EexitError(
            f"FREE's Beta mixture needs at least {MIN_PER_LABEL} consistent and {MIN_PER_LABEL} "
            f"inconsistent tokens; the calibration data has {n_pos} and {n_neg}"
        )
    share = n_pos / len(y)
    r = np.stack([1 - y, y])
    mix = _mixture(x, r, 1, len(x), share)
    if not em:
        return mix
    for it in range(2, max_iter + 1):
        r = mix.posterior(x)
        if min(r[0].sum(), r[1].sum()) <= 0:  # a component died out: keep the last fit
            break
        new = _mixture(x, r, it, len(x), share)
        done = abs(new.log_likelihood - mix.log_likelihood) < tol
        mix = new
        if done:
            break
    return mix


def check_free_options(zeta: float, grid) -> None:
    if not 0 < zeta < 1:
        raise EexitError(f"--zeta must lie in (0, 1); got {zeta}")
    if not grid:
        raise EexitError("FREE's threshold grid is empty; give at least one value in [0, 1]")
    bad = [g for g in grid if not 0 <= g <= 1]
    if bad:
        raise EexitError(f"FREE's threshold grid must lie in [0, 1]; got {bad[0]}")


def free_threshold(
    mix: BetaMixture, grid=DEFAULT_GRID, zeta: float = DEFAULT_ZETA
) -> tuple[float | None, list[dict]]:
    """The smallest grid value from which P(high-mean component | x) > zeta, and the posterior at
    every grid value (rows for the results table)."""
    check_free_options(zeta, grid)
    values = sorted(float(g) for g in set(grid))
    post = mix.posterior(np.asarray(values))[mix.high]
    chosen = None
    for g, p in zip(reversed(values), reversed(post.tolist())):
        if p <= zeta:
            break
        chosen = g
    rows = [{"grid_value": g, "posterior_high": float(p)} for g, p in zip(values, post)]
    return chosen, rows
