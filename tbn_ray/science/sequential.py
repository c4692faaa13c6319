"""Sequential CERTIFY: the sample size chosen while sampling, with an anytime-valid bound.

``SequentialSampling.procedure`` is Cohen's CERTIFY with the estimation draws taken in
rounds and a look after each:

1. n0 selection draws -> c_A (the same first request as fixed-n CERTIFY, so the same class);
   when the image's label is given and c_A is not it, stop here and abstain (``skip_misclassified``):
   the certificate's class is c_A or none, so the image counts in no certified accuracy and no ACR
   whatever is drawn next, under this design and under fixed n alike (the same selection draws);
2. estimation draws up to the cumulative sizes N_1 < ... < N_K = n of ``looks(n)``, a
   schedule fixed before any draw (N_j = n / ``growth``^(K-j), none below ``first_look``);
   every estimation vote counts. At look j, L_j = the one-sided Clopper-Pearson lower bound of
   the votes for c_A among the N_j draws at level alpha_j (``look_alphas``: ``final_share`` *
   alpha at N_K; the rest over the other looks in proportion to N_j^``spend``, so sum_j
   alpha_j <= alpha: a tighter level costs draws, so the large looks get more); the reported pA_lower is
   max(L_1, ..., L_J) at the stopping look J, radius sigma * Phi^-1(pA_lower) as Cohen's;
3. stop when the report radius (``radii``, 0 = not abstaining) cannot change by going on:
   pA_lower clears the highest one; or, if p_cA were its optimistic upper bound (Clopper-Pearson
   at ``stop_alpha``), the expected count at n would not clear the next one; or at N_K = n.

Guarantee (docs/method.md: a sample size chosen from the votes needs an anytime-valid bound):
conditional on the selection draws, c_A and the schedule are fixed and the estimation votes
are i.i.d. Bernoulli(p_cA). Define L_j for every look on the draws the procedure would take if
it never stopped; each is a valid (1 - alpha_j) bound at its fixed size N_j, so P(some L_j >
p_cA) <= sum_j alpha_j <= alpha (union bound). Outside that event every L_j <= p_cA, hence so
is the maximum over the looks taken, whenever and however the procedure stops: the stopping
rule (the upper bound included) may use anything, since the event does not depend on it. So
P(pA_lower > p_cA) <= alpha and the certificate holds with probability >= 1 - alpha, as
Cohen's. Stopping at a wrong guess claims nothing (an abstention), so it is sound for any
label. What would NOT hold (tests/test_sequential.py shows both failing): each look at the
full alpha, or a Clopper-Pearson bound after every batch stopped when it looks good.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from pydantic import field_validator

from tbn_ray.config import REPORT_RADII
from tbn_ray.config.sequential import SequentialConfig
from tbn_ray.science import bounds
from tbn_ray.science.bounds import ABSTAIN, lower_confidence_bound, upper_confidence_bound
from tbn_ray.science.sampling import Procedure
from tbn_ray.science.smoothing import MISCLASSIFIED, Certificate

#: Why a sequential certificate stopped (its ``stopped`` field).
STOP_REASONS = ("top", "settled", "abstain", "full", MISCLASSIFIED)


@lru_cache(maxsize=256)
def _schedule(
    first_look: int, growth: float, final_share: float, spend: float, n: int, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """(look sizes, their alphas): n / growth^i down to first_look; final_share * alpha at n, the rest by size^spend."""
    looks = [n]
    while round(looks[0] / growth) >= first_look and round(looks[0] / growth) < looks[0]:
        looks.insert(0, round(looks[0] / growth))
    sizes = np.array(looks, dtype=np.int64)
    if len(sizes) == 1:
        return sizes, np.array([alpha])
    weights = sizes[:-1].astype(np.float64) ** spend
    return sizes, np.append((1 - final_share) * alpha * weights / weights.sum(), final_share * alpha)


class SequentialSampling(SequentialConfig):
    """The sequential CERTIFY on its settings: every field, default and check is the config's
    (``SequentialConfig``); this adds the report radii whose crossing ends sampling, and the
    procedure (see the module docstring for it and its guarantee). Its defaults were chosen with
    ``bench/adaptive_sampling.py`` (results: ``bench/results/adaptive_sampling*.md``,
    ``docs/performance.md``)."""

    radii: tuple[float, ...] = REPORT_RADII

    @field_validator("radii")
    @classmethod
    def _radii(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(r < 0 for r in v) or list(v) != sorted(set(v)):
            raise ValueError(f"sequential radii must be >= 0, distinct and ascending, got {v}")
        return v

    @staticmethod
    def from_config(cfg: SequentialConfig) -> SequentialSampling:
        return SequentialSampling(**cfg.model_dump())

    def looks(self, n: int) -> np.ndarray:
        """Cumulative estimation draws at each look, ascending, ending at n; fixed before sampling."""
        return _schedule(self.first_look, self.growth, self.final_share, self.spend, n, 1.0)[0]

    def look_alphas(self, n: int, alpha: float) -> np.ndarray:
        """The level of each look's Clopper-Pearson bound; they sum to alpha (up to rounding, never above)."""
        alphas = _schedule(self.first_look, self.growth, self.final_share, self.spend, n, alpha)[1]
        return alphas * min(1.0, alpha / float(alphas.sum()))  # float rounding never above alpha

    def procedure(self, sigma: float, n0: int, n: int, alpha: float, label: int | None = None) -> Procedure:
        """CERTIFY with a sample size chosen while sampling (at most n estimation draws); ``label``,
        when given, is the image's true class (see ``skip_misclassified``)."""
        looks, alphas = self.looks(n), self.look_alphas(n, alpha)
        need = bounds.need(self.radii, sigma)
        # draw n0 samples and use them to take a guess at the top class
        counts_selection = yield n0
        c_a_hat = int(counts_selection.argmax())
        votes, drawn, best, best_look, stopped = np.zeros_like(counts_selection), 0, 0.0, 0, "full"
        if self.skip_misclassified and label is not None and c_a_hat != label:
            return SequentialCertificate(
                ABSTAIN, 0.0, 0.0, c_a_hat, counts_selection, votes, n_bound=0, looks=0, stopped=MISCLASSIFIED
            )
        for j, size in enumerate(looks):
            # fresh draws up to the j-th look, all in the bound: a Clopper-Pearson bound at alpha_j
            votes = votes + (yield int(size) - drawn)
            drawn = int(size)
            k = int(votes[c_a_hat])
            bound = lower_confidence_bound(k, drawn, float(alphas[j]))
            if bound > best:
                best, best_look = bound, j
            if j == len(looks) - 1:
                break
            cleared = int(np.searchsorted(need, best, side="right"))  # report radii cleared (0: abstaining)
            if cleared == len(need):
                stopped = "top"
                break
            # optimistic: if p_cA were its upper bound, would the expected count at n clear the next radius?
            expected = k + upper_confidence_bound(k, drawn, self.stop_alpha) * (n - drawn)
            if bounds.expected_lower_bound(expected, n, alphas[-1]) < need[cleared]:
                stopped = "abstain" if cleared == 0 else "settled"
                break
        prediction, radius = bounds.certify_bound(best, c_a_hat, sigma)
        return SequentialCertificate(
            prediction,
            radius,
            best,
            c_a_hat,
            counts_selection,
            votes,
            n_bound=int(looks[best_look]) if best > 0 else drawn,
            looks=j + 1,
            stopped=stopped,
        )


@dataclass(frozen=True, eq=False, kw_only=True)
class SequentialCertificate(Certificate):
    """A certificate from the sequential CERTIFY; ``counts_estimation`` holds every estimation vote."""

    n_bound: int  # estimation draws at the look whose bound is reported (the maximum)
    looks: int  # looks taken
    stopped: str  # why sampling ended: one of STOP_REASONS

    def extra_fields(self) -> dict[str, Any]:
        return {"n_bound": self.n_bound, "samples": self.samples, "looks": self.looks, "stopped": self.stopped}
