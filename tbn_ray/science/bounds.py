"""The bounds every certificate rests on, written once: Clopper-Pearson bounds on p_A, the
p_A a radius needs, and the abstain-or-radius rule (docs/method.md, section 3).

Fixed-n CERTIFY (``smoothing``), the pilot design (``adaptive``) and the sequential design
(``sequential``) differ only in how many draws they take and at what level they bound; what a
bound certifies is the same for all three and lives here.
"""

from __future__ import annotations

import numpy as np

# scipy.special, not scipy.stats: the same beta.ppf and norm.ppf bit for bit, without the ~1 s
# scipy.stats adds to the start of every process that certifies (each Ray actor, each CLI call)
from scipy.special import betaincinv, ndtr, ndtri

#: The prediction recorded when the smoothed classifier abstains.
ABSTAIN = -1


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on p from k successes in n trials.

    Equal to ``statsmodels.proportion_confint(k, n, alpha=2*alpha, method="beta")[0]``,
    which Cohen's core.py uses.
    """
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if k == 0:
        return 0.0
    return float(betaincinv(k, n - k + 1, alpha))  # = scipy.stats.beta.ppf(alpha, k, n - k + 1)


def expected_lower_bound(k: np.ndarray | float, n: np.ndarray | float, alpha: float) -> np.ndarray:
    """The same lower bound at a real-valued count k (an expected count, for planning and for
    stopping, never for a certificate): 0 where k <= 0."""
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    return np.where(k > 0, betaincinv(np.maximum(k, 1e-300), n - k + 1, alpha), 0.0)


def upper_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson UPPER bound on p from k successes in n trials:
    how large p could be, used only to decide how many draws to take."""
    return 1.0 if k >= n else float(betaincinv(k + 1, n - k, 1 - alpha))


def need(radii: np.ndarray | tuple[float, ...], sigma: float) -> np.ndarray:
    """The p_A lower bound that certifies each radius: Phi(r / sigma); 1/2 at r = 0 (not abstaining)."""
    return ndtr(np.asarray(radii, dtype=np.float64) / sigma)


def radius(p_a_lower: np.ndarray | float, sigma: float) -> np.ndarray:
    """Cohen's radius sigma * Phi^-1(pA_lower); negative below 1/2, -inf at 0."""
    with np.errstate(divide="ignore"):
        return sigma * ndtri(p_a_lower)


def certify_bound(p_a_lower: float, c_a_hat: int, sigma: float) -> tuple[int, float]:
    """Cohen's rule: abstain below pA_lower = 1/2, else predict c_A at radius sigma * Phi^-1(pA_lower)."""
    if p_a_lower < 0.5:
        return ABSTAIN, 0.0
    return c_a_hat, float(radius(p_a_lower, sigma))
