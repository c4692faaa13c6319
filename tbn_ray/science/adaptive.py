"""Input-adaptive sample size for CERTIFY: as few estimation draws as each image needs.

Most images do not need n = 100,000 draws: hopeless ones abstain whatever n is, and
confident ones hit the count-limited radius cap sigma * Phi^-1(alpha^(1/n)) long before.
``AdaptiveSampling.procedure`` is Cohen's CERTIFY with one step added between selection
and estimation:

1. n0 selection draws -> c_A (the same draws, from the same generator stream, as fixed-n
   CERTIFY, so the selected class is the fixed-n one);
2. ``pilot`` fresh draws, used ONLY to plan (``plan``). If even an optimistic pilot
   estimate (its one-sided 1 - ``abstain_alpha`` upper Clopper-Pearson bound) predicts
   abstention at n, abstain now (that claims nothing). Else take the smallest candidate
   size (``candidates``) that serves the metrics users read: (a) certified accuracy -- over
   the pilot's posterior for p_cA, the expected number of report radii that the candidate
   certifies less often than n does is at most ``max_loss``; and (b) the radius -- the
   radius predicted at the candidate (Cohen's radius at the expected count) is within
   ``tolerance`` of the one predicted at n, or clears by ``margin`` the highest report
   radius reached at n (confident images are capped by the sample size, not the image).
   Then, for each of ``extra_pilots`` in turn, while the plan asks for more than twice that
   stage: draw it (planning only, like the first) and plan again on all pilot draws;
3. n(x) FRESH estimation draws; pA_lower = Clopper-Pearson on those alone; radius as Cohen.

Guarantee (docs/method.md, rule 5): conditional on the selection and pilot draws,
c_A and n(x) are fixed numbers and the n(x) estimation votes are i.i.d. Bernoulli(p_cA),
independent of how n(x) was chosen. So P(pA_lower > p_cA | selection, pilot) <= alpha,
and averaging over the selection and pilot, P(pA_lower > p_cA) <= alpha: the certificate
holds with probability >= 1 - alpha, as Cohen's. What would NOT hold: reusing the pilot
votes in the bound (n(x) then depends on votes inside the bound), or recomputing a
Clopper-Pearson bound after each batch and stopping when it looks good
(tests/test_adaptive.py shows the latter failing at several times alpha).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any

import numpy as np
from pydantic import Field
from scipy.special import betainc, betaincinv

from tbn_ray.config import REPORT_RADII, AdaptiveConfig
from tbn_ray.science import bounds
from tbn_ray.science.bounds import ABSTAIN, upper_confidence_bound
from tbn_ray.science.sampling import Procedure
from tbn_ray.science.smoothing import Certificate, bound_certificate


def predicted_radius(p: float, n: np.ndarray | int, sigma: float, alpha: float) -> np.ndarray:
    """Signed radius sigma * Phi^-1(pA_lower) that n draws would certify if c_A got its expected
    count p * n: the same Clopper-Pearson bound as ``lower_confidence_bound``, at a real k.
    Negative means abstention (pA_lower < 1/2); -inf when p = 0."""
    n = np.asarray(n, dtype=np.float64)
    return bounds.radius(bounds.expected_lower_bound(p * n, n, alpha), sigma)


@lru_cache(maxsize=64)
def certifying_counts(n: int, sigma: float, alpha: float, radii: tuple[float, ...]) -> np.ndarray:
    """For each radius r, the fewest votes k of n with sigma * Phi^-1(pA_lower(k, n)) >= r
    (r = 0: not abstaining); n + 1 where no count reaches r. Depends on no image (cached)."""
    need = bounds.need(radii, sigma)
    lo, hi = np.zeros(len(radii), dtype=np.int64), np.full(len(radii), n + 1, dtype=np.int64)
    while np.any(hi - lo > 1):  # invariant: k = lo certifies less than r, k = hi certifies r (or is n + 1)
        mid = (lo + hi) // 2
        ok = bounds.expected_lower_bound(mid, n, alpha) >= need
        hi, lo = np.where(ok & (mid > 0), mid, hi), np.where(ok & (mid > 0), lo, mid)
    return hi


def certify_chance(p: np.ndarray, n: int, sigma: float, alpha: float, radii: tuple[float, ...]) -> np.ndarray:
    """P(n draws certify radius >= r), for each p (rows) and report radius r (columns)."""
    k = certifying_counts(n, sigma, alpha, radii)
    reachable = k <= n
    chance = betainc(
        np.where(reachable, k, 1), np.where(reachable, n - k + 1, 1), np.asarray(p)[:, None]
    )  # P(Bin(n, p) >= k)
    return np.where(reachable, chance, 0.0)


class AdaptiveSampling(AdaptiveConfig):
    """The pilot-planned CERTIFY on its settings: every setting a user chooses, with its default
    and check, is the config's (``AdaptiveConfig``); this adds the planner's own constants and the
    report radii the plan serves, and the procedure (see the module docstring). Its defaults were
    chosen with ``bench/adaptive_sampling.py`` (results: ``bench/results/adaptive_sampling*.md``,
    ``docs/performance.md``)."""

    posterior_points: int = Field(32, ge=1, description="quadrature points of the pilot's posterior for p_cA")
    abstain_alpha: float = Field(
        0.001, gt=0, lt=1, description="early abstention: confidence of the optimistic pilot bound"
    )
    radii: tuple[Annotated[float, Field(ge=0)], ...] = REPORT_RADII

    @staticmethod
    def from_config(cfg: AdaptiveConfig) -> AdaptiveSampling:
        return AdaptiveSampling(**cfg.model_dump())

    def candidates(self, n: int) -> np.ndarray:
        """The candidate estimation sizes for a maximum of n, ascending, ending at n."""
        return np.unique([max(1, min(n, round(f * n))) for f in self.fractions])

    def plan(self, votes: int, draws: int, sigma: float, n: int, alpha: float) -> tuple[int, float]:
        """(estimation draws, predicted radius at n) from ``votes`` for c_A among ``draws``
        pilot draws; 0 estimation draws means abstain now. Uses nothing but the pilot."""
        if predicted_radius(upper_confidence_bound(votes, draws, self.abstain_alpha), n, sigma, alpha) < 0:
            return 0, float(predicted_radius(votes / draws, n, sigma, alpha))
        sizes = self.candidates(n)
        radius = predicted_radius(votes / draws, sizes, sigma, alpha)
        at_n = float(radius[-1])
        good = radius >= at_n - self.tolerance
        reached = [r for r in self.radii if r <= at_n]
        if reached:
            good |= radius >= max(reached) + self.margin
        # p_cA at the quantile midpoints of the pilot's posterior (Jeffreys prior)
        p = betaincinv(
            votes + 0.5, draws - votes + 0.5, (np.arange(self.posterior_points) + 0.5) / self.posterior_points
        )
        radii = tuple(float(r) for r in self.radii)
        full = certify_chance(p, n, sigma, alpha, radii)
        for i in np.flatnonzero(good[:-1]):
            lost = np.maximum(full - certify_chance(p, int(sizes[i]), sigma, alpha, radii), 0.0)
            if lost.sum(axis=1).mean() <= self.max_loss:
                return int(sizes[i]), at_n
        return n, at_n

    def procedure(self, sigma: float, n0: int, n: int, alpha: float) -> Procedure:
        """CERTIFY with an input-adaptive number of estimation draws (at most n)."""
        # n0 selection draws: the guess at the top class, as in fixed-n CERTIFY
        counts_selection = yield n0
        c_a_hat = int(counts_selection.argmax())
        # pilot draws: plan the sample size; never part of the bound
        counts_pilot = yield self.pilot
        n_bound, planned = self.plan(int(counts_pilot[c_a_hat]), self.pilot, sigma, n, alpha)
        for stage in self.extra_pilots:
            if n_bound <= 2 * stage:  # also stops at an early abstention (0)
                break
            counts_pilot = counts_pilot + (yield stage)
            n_bound, planned = self.plan(int(counts_pilot[c_a_hat]), int(counts_pilot.sum()), sigma, n, alpha)
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
