"""Input-adaptive sample size: sound (and invalid shortcuts caught), fewer draws, same accuracy."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from scipy.stats import binomtest, norm

from tbn_ray.config import REPORT_RADII, AdaptiveConfig
from tbn_ray.science.adaptive import AdaptiveSampling, certifying_counts, predicted_radius
from tbn_ray.science.smoothing import (
    ABSTAIN,
    Certificate,
    bound_certificate,
    lower_confidence_bound,
    run_alone,
    summarize,
)

from .helpers import SHARED_DATA, certify_with, partial_test_images
from .test_report import nearest_class_mean
from .test_smoothing import one_thread  # noqa: F401 (autouse fixture: one torch thread)

SIGMA, N0, N, ALPHA, TRIALS = 0.25, 50, 1000, 0.05, 2000
PLAN = AdaptiveSampling(pilot=100, extra_pilots=(200,), max_loss=0.05)  # small n: a plan that varies n(x) widely


def best_look(sigma: float, n0: int, n: int, alpha: float, batch: int = 50):  # type: ignore[no-untyped-def]
    """INVALID: a Clopper-Pearson bound after every batch, stopped at the look that looks best."""
    selection = yield n0
    c = int(selection.argmax())
    votes, best = np.zeros_like(selection), None
    while votes.sum() < n:
        votes = votes + (yield batch)
        cert = bound_certificate(sigma, alpha, c, selection, votes)
        best = cert if best is None or cert.p_a_lower > best.p_a_lower else best
    return best


def failure_rate(procedure, seed: int) -> tuple[int, float, set[int]]:  # type: ignore[no-untyped-def]
    """Certify TRIALS inputs of a linear classifier at signed distance d from its hyperplane:
    P(class 1 vote) = Phi(d / sigma) exactly and the exact l2 radius is |d| (Cohen et al.,
    Sec. 3.1). Votes are drawn as exact binomials; the procedure code is the real one.
    Returns (failures: a wrong class certified or radius > |d|, certified share, the sizes
    of the last request, i.e. of the estimation draws when it certified)."""
    rng = np.random.default_rng(seed)
    failures, certified, sizes = 0, 0, set()
    for _ in range(TRIALS):
        d = rng.choice([-1, 1]) * rng.uniform(0.05, 2.5) * SIGMA
        p1 = float(norm.cdf(d / SIGMA))
        used = []

        def sample(k: int) -> np.ndarray:
            used.append(k)
            return rng.multinomial(k, [1 - p1, p1])

        cert: Certificate = run_alone(procedure(SIGMA, N0, N, ALPHA), sample)
        if cert.prediction != ABSTAIN:
            certified += 1
            failures += cert.prediction != int(d > 0) or cert.radius > abs(d)
            sizes.add(used[-1])
    return failures, certified / TRIALS, sizes


def test_adaptive_is_sound_and_invalid_shortcuts_are_caught() -> None:
    failures, certified, sizes = failure_rate(PLAN.procedure, seed=0)
    # consistent with a failure rate <= alpha, and not vacuous: most certified, n(x) varied
    assert binomtest(failures, TRIALS, ALPHA, alternative="greater").pvalue > 1e-3, failures
    assert certified > 0.7 and len(sizes) >= 4, sizes
    # the same test rejects the invalid shortcut, at a clearly higher failure rate
    caught, _, _ = failure_rate(best_look, seed=0)
    assert binomtest(caught, TRIALS, ALPHA, alternative="greater").pvalue < 1e-6, (caught, failures)
    assert caught > 2 * failures


def test_plan_uses_the_full_n_only_where_it_pays() -> None:
    n, sigma, alpha = 100_000, 0.25, 0.001
    plan = AdaptiveSampling()
    sizes = plan.candidates(n)
    assert sizes.tolist() == [1562, 2344, 3125, 4688, 6250, 9375, 12500, 18750, 25000, 37500, 50000, 75000, 100000]
    # the counts that certify each report radius are Cohen's radius, exactly
    for r, k in zip(REPORT_RADII, certifying_counts(n, sigma, alpha, REPORT_RADII)):
        if k <= n:
            assert (
                sigma * norm.ppf(lower_confidence_bound(int(k), n, alpha))
                >= r
                > sigma * norm.ppf(lower_confidence_bound(int(k) - 1, n, alpha))
            )
        else:  # beyond the count-limited cap sigma * Phi^-1(alpha^(1/n))
            assert r > sigma * norm.ppf(alpha ** (1 / n))
    # predicted radii are Cohen's radius at the expected count, and grow with n
    radius = predicted_radius(0.9, sizes, sigma, alpha)
    assert np.all(np.diff(radius) > 0)
    assert radius[-1] == pytest.approx(sigma * norm.ppf(lower_confidence_bound(90_000, n, alpha)), abs=1e-9)
    # hopeless: abstain without estimation draws; a clear majority far from a report radius: few draws
    assert plan.plan(300, 1000, sigma, n, alpha)[0] == 0
    assert plan.plan(720, 1000, sigma, n, alpha)[0] == sizes[0]  # radius ~0.14, far from 0 and 0.25
    # near a report radius (p = Phi(1): radius 0.25 at n = infinity) the plan keeps (nearly) the full n
    assert plan.plan(841, 1000, sigma, n, alpha)[0] >= 0.75 * n
    # all votes for c_A: more pilot evidence, fewer estimation draws (the count-limited cap)
    assert plan.plan(20_000, 20_000, sigma, n, alpha)[0] < plan.plan(1000, 1000, sigma, n, alpha)[0]
    for bad in (
        dict(pilot=0),
        dict(extra_pilots=(0,)),
        dict(tolerance=-1.0),
        dict(max_loss=float("inf")),
        dict(fractions=(0.5,)),
        dict(abstain_alpha=1.0),
        dict(radii=(float("nan"),)),
        dict(posterior_points=0),
    ):
        with pytest.raises(ValidationError):  # the config's checks
            AdaptiveSampling(**bad)
    assert AdaptiveSampling.from_config(AdaptiveConfig()) == AdaptiveSampling()


def test_adaptive_on_cifar_matches_fixed_n_with_fewer_draws() -> None:
    """A fitted linear classifier on real CIFAR-10 images: the same selection as fixed n, the
    same certified accuracy at every report radius within one image, fewer forward passes.
    At this small n the pilot's posterior is wide, so the plan allows more loss than the
    default (whose figures at n = 100,000 come from bench/adaptive_sampling.py)."""
    images, labels = partial_test_images(20)
    with np.load(SHARED_DATA / "cifar10-partial" / "cifar10_train_prefix.npz") as train:
        model = nearest_class_mean(train["images"], train["labels"]).float()
    kw = dict(sigma=0.12, n0=50, n=2000, alpha=0.001, batch_size=1000, seed=0, device="cpu", images_per_pass=8)
    fixed = certify_with(model, images, labels, range(20), **kw)
    adaptive = certify_with(model, images, labels, range(20), **kw, adaptive=AdaptiveSampling(pilot=200, max_loss=0.1))
    assert [r["counts_selection"] for r in adaptive] == [r["counts_selection"] for r in fixed]
    for r in adaptive:
        assert r["samples"] == 50 + 200 + r["n_bound"] and sum(r["counts"]) == r["n_bound"] <= 2000
        assert sum(r["counts_pilot"]) == 200 and r["n"] == 2000
        if r["n_bound"]:
            assert r["p_a_lower"] == lower_confidence_bound(r["count"], r["n_bound"], 0.001)
    a, f = summarize(adaptive), summarize(fixed)
    for radius in f["certified_accuracy"]:
        assert abs(a["certified_accuracy"][radius] - f["certified_accuracy"][radius]) <= 1 / 20, radius
    assert sum(r["samples"] for r in adaptive) < 0.75 * 20 * (50 + 2000)
    assert len({r["n_bound"] for r in adaptive}) >= 3  # planned per image
    assert 0.3 < f["certified_accuracy"]["0.0"]  # not vacuous: many images are certified
