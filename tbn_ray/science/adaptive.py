"""Input-adaptive sample size for CERTIFY: as few estimation draws as each image needs.

Most images do not need n = 100,000 draws: hopeless ones abstain whatever n is, and
confident ones hit the count-limited radius cap sigma * Phi^-1(alpha^(1/n)) long before.
``AdaptiveSampling.procedure`` is Cohen's CERTIFY with one step added between selection
and estimation:

1. n0 selection draws -> c_A (the same draws, from the same generator stream, as fixed-n
   CERTIFY, so the selected class is the fixed-n one);
2. ``pilot`` fresh draws, used ONLY to plan: from the pilot's share of votes for c_A,
   predict the certified radius at each candidate size (``candidates``) and at n, and take
   the smallest candidate that comes within ``tolerance`` (l2) of the prediction at n, or
   that clears, by ``margin``, the highest report radius the prediction at n reaches.
   If even an optimistic pilot estimate (its one-sided 1 - ``abstain_alpha`` upper
   Clopper-Pearson bound) predicts abstention at n, abstain now (that claims nothing);
3. n(x) FRESH estimation draws; pA_lower = Clopper-Pearson on those alone; radius as Cohen.

Guarantee (science.md, soundness rule 5): conditional on the selection and pilot draws,
c_A and n(x) are fixed numbers and the n(x) estimation votes are i.i.d. Bernoulli(p_cA),
independent of how n(x) was chosen. So P(pA_lower > p_cA | selection, pilot) <= alpha,
and averaging over the selection and pilot, P(pA_lower > p_cA) <= alpha: the certificate
holds with probability >= 1 - alpha, as Cohen's. What would NOT hold: reusing the pilot
votes in the bound (n(x) then depends on votes inside the bound), or recomputing a
Clopper-Pearson bound after each batch and stopping when it looks good
(tests/test_adaptive.py shows the latter failing at several times alpha).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import betaincinv, ndtri

from tbn_ray.config import REPORT_RADII
from tbn_ray.errors import TbnError
from tbn_ray.science.sampling import Procedure
from tbn_ray.science.smoothing import ABSTAIN, Certificate, bound_certificate


def predicted_radius(p: float, n: np.ndarray | int, sigma: float, alpha: float) -> np.ndarray:
    """Signed radius sigma * Phi^-1(pA_lower) that n draws would certify if c_A got its expected
    count p * n: the same Clopper-Pearson bound as ``lower_confidence_bound``, at a real k.
    Negative means abstention (pA_lower < 1/2); -inf when p = 0."""
    n = np.asarray(n, dtype=np.float64)
    k = p * n
    with np.errstate(divide="ignore"):
        lower = np.where(k > 0, betaincinv(np.maximum(k, 1e-300), n - k + 1, alpha), 0.0)
        return sigma * ndtri(lower)


def optimistic_share(votes: int, draws: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson UPPER bound on p from ``votes`` of ``draws``."""
    return 1.0 if votes >= draws else float(betaincinv(votes + 1, draws - votes, 1 - alpha))


@dataclass(frozen=True)
class AdaptiveSampling:
    """Settings of the input-adaptive sample size (defaults chosen by
    ``bench/adaptive_sampling.py``; see the module docstring for the procedure)."""

    pilot: int = 1000  # planning draws, never reused in the bound
    tolerance: float = 0.02  # l2: accept n whose predicted radius is within this of n's
    margin: float = 0.02  # l2: ... or that clears the highest report radius reached at n by this
    fractions: tuple[float, ...] = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)  # of n
    abstain_alpha: float = 0.001  # early abstention: confidence of the optimistic pilot bound
    radii: tuple[float, ...] = field(default=REPORT_RADII)  # the report radii the plan serves

    def __post_init__(self) -> None:
        if self.pilot < 1:
            raise TbnError(f"adaptive pilot must be >= 1 draws, got {self.pilot}")
        if not (np.isfinite(self.tolerance) and self.tolerance >= 0 and np.isfinite(self.margin) and self.margin >= 0):
            raise TbnError(f"adaptive tolerance and margin must be finite and >= 0, got {self.tolerance}, {self.margin}")
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions) or max(self.fractions) != 1:
            raise TbnError(f"adaptive fractions must lie in (0, 1] and include 1 (the full n), got {self.fractions}")
        if not 0 < self.abstain_alpha < 1:
            raise TbnError(f"adaptive abstain_alpha must be in (0, 1), got {self.abstain_alpha}")
        if any(not (np.isfinite(r) and r >= 0) for r in self.radii):
            raise TbnError(f"adaptive radii must be finite and >= 0, got {self.radii}")

    def candidates(self, n: int) -> np.ndarray:
        """The candidate estimation sizes for a maximum of n, ascending, ending at n."""
        return np.unique([max(1, min(n, round(f * n))) for f in self.fractions])

    def plan(self, votes: int, sigma: float, n: int, alpha: float) -> tuple[int, float]:
        """(estimation draws, predicted radius at n) from ``votes`` for c_A among the pilot
        draws; 0 draws means abstain without estimating. Uses nothing but the pilot."""
        if predicted_radius(optimistic_share(votes, self.pilot, self.abstain_alpha), n, sigma, alpha) < 0:
            return 0, float(predicted_radius(votes / self.pilot, n, sigma, alpha))
        sizes = self.candidates(n)
        radius = predicted_radius(votes / self.pilot, sizes, sigma, alpha)
        at_n = float(radius[-1])
        good = radius >= at_n - self.tolerance
        reached = [r for r in self.radii if r <= at_n]
        if reached:
            good |= radius >= max(reached) + self.margin
        return int(sizes[np.argmax(good)]), at_n

    def procedure(self, sigma: float, n0: int, n: int, alpha: float) -> Procedure:
        """CERTIFY with an input-adaptive number of estimation draws (at most n)."""
        # n0 selection draws: the guess at the top class, as in fixed-n CERTIFY
        counts_selection = yield n0
        c_a_hat = int(counts_selection.argmax())
        # pilot draws: plan the sample size; never part of the bound
        counts_pilot = yield self.pilot
        n_bound, planned = self.plan(int(counts_pilot[c_a_hat]), sigma, n, alpha)
        extra = {"counts_pilot": counts_pilot, "n_bound": n_bound, "planned_radius": max(planned, 0.0)}
        if n_bound == 0:  # even an optimistic pilot estimate cannot certify at n: abstain
            none = np.zeros_like(counts_selection)
            return AdaptiveCertificate(ABSTAIN, 0.0, 0.0, c_a_hat, counts_selection, none, **extra)
        # n(x) FRESH draws, fixed before they are drawn: Cohen's bound on them alone
        cert = bound_certificate(sigma, alpha, c_a_hat, counts_selection, (yield n_bound))
        return AdaptiveCertificate(
            cert.prediction, cert.radius, cert.p_a_lower, c_a_hat, counts_selection, cert.counts_estimation, **extra
        )


@dataclass(frozen=True, eq=False, kw_only=True)
class AdaptiveCertificate(Certificate):
    """A certificate whose estimation size was planned from pilot draws."""

    counts_pilot: np.ndarray  # (num_classes,) votes of the pilot draws (planning only)
    n_bound: int  # estimation draws behind the bound; 0 = abstained after the pilot
    planned_radius: float  # radius the pilot predicts at the full n (0 = abstain)

    @property
    def samples(self) -> int:
        return super().samples + int(self.counts_pilot.sum())

    def extra_fields(self) -> dict[str, Any]:
        return {
            "n_bound": self.n_bound,
            "samples": self.samples,
            "counts_pilot": self.counts_pilot.tolist(),
            "planned_radius": self.planned_radius,
        }
