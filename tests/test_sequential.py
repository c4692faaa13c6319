"""Sequential CERTIFY: anytime-valid (and the invalid shortcuts caught), stops where the report
radius is settled, and runs through the real sampling engines on a real model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy.stats import binomtest, norm

from tbn_ray.config.sequential import SequentialConfig
from tbn_ray.science.bounds import upper_confidence_bound
from tbn_ray.science.sequential import STOP_REASONS, SequentialSampling
from tbn_ray.science.smoothing import (
    ABSTAIN,
    Certificate,
    Smooth,
    cohen_certify,
    example_generator,
    lower_confidence_bound,
    run_alone,
    summarize,
)

from .helpers import SHARED_DATA, certify_with, partial_test_images
from .test_adaptive import best_look
from .test_report import nearest_class_mean
from .test_smoothing import one_thread  # noqa: F401 (autouse fixture: one torch thread)

SIGMA, N0, N = 0.25, 50, 3000


class EveryLookAtFullAlpha(SequentialSampling):
    """INVALID: the same looks and stopping rule, each look's bound at the full alpha (no union bound)."""

    def look_alphas(self, n: int, alpha: float) -> np.ndarray:
        return np.full(len(self.looks(n)), alpha)


def failures(
    procedure, alpha: float, trials: int, seed: int, n: int = N, wrong_labels: float | None = None
) -> tuple[int, float, int]:  # type: ignore[no-untyped-def]
    """Certify ``trials`` inputs of a linear classifier at signed distance d from its hyperplane:
    P(class 1 vote) = Phi(d / sigma) exactly and the exact l2 radius is |d| (Cohen et al.,
    Sec. 3.1). Votes are exact binomials; the procedure code is the real one. With
    ``wrong_labels``, each input comes with a label: its true class, or the other one at that
    rate. Returns (failures: a wrong class certified or radius > |d|, certified share, distinct
    sample sizes used)."""
    rng = np.random.default_rng(seed)
    failed, certified, sizes = 0, 0, set()
    for _ in range(trials):
        d = rng.choice([-1, 1]) * rng.uniform(0.02, 2.5) * SIGMA
        p1 = float(norm.cdf(d / SIGMA))
        label = () if wrong_labels is None else (int(d > 0) ^ int(rng.random() < wrong_labels),)
        cert: Certificate = run_alone(
            procedure(SIGMA, N0, n, alpha, *label), lambda k: rng.multinomial(k, [1 - p1, p1])
        )
        sizes.add(cert.samples)
        if cert.prediction != ABSTAIN:
            certified += 1
            failed += cert.prediction != int(d > 0) or cert.radius > abs(d)
    return failed, certified / trials, len(sizes)


# every setting that changes the schedule, the alpha split or when sampling stops
DESIGNS = {
    "default": SequentialSampling(),
    "many looks": SequentialSampling(first_look=10, growth=1.15),
    "two looks": SequentialSampling(first_look=150, growth=16),
    "even split, most alpha early": SequentialSampling(final_share=0.05, spend=0.0),
    "steep split": SequentialSampling(final_share=0.95, spend=2.0),
    "eager stopping": SequentialSampling(stop_alpha=0.3, first_look=20),
}


#: the default design given labels, this share of them wrong (skip_misclassified at work)
LABELLED = "default, labels given, 30% wrong"


@pytest.mark.parametrize("alpha, trials", [(0.01, 1500), (0.001, 2000)])
@pytest.mark.parametrize("design", [*DESIGNS, LABELLED])
def test_sequential_is_sound(design: str, alpha: float, trials: int) -> None:
    wrong = 0.3 if design == LABELLED else None
    seq = DESIGNS.get(design, DESIGNS["default"])
    failed, certified, sizes = failures(
        seq.procedure, alpha, trials, seed=[*DESIGNS, LABELLED].index(design), wrong_labels=wrong
    )
    print(
        f"{design}, alpha {alpha}: {failed} failures in {trials} ({failed / trials:.4f}), {certified:.0%} certified, {sizes} sample sizes"
    )
    # consistent with a failure rate <= alpha, and not vacuous: most certified, the sample size varied
    assert binomtest(failed, trials, alpha, alternative="greater").pvalue > 1e-3, failed
    assert certified > 0.7 * (1 - (wrong or 0)) and sizes >= min(4, len(seq.looks(N))), (certified, sizes)
    if wrong:  # about the wrong share abstained unsampled: certified < 1 - 0.3 * (most of the inputs' guesses)
        assert certified < 1 - 0.2, certified


def test_the_same_test_catches_invalid_shortcuts() -> None:
    """The harness above can fail: a bound at the full alpha at every look, stopped by the same
    rule, and the naive 'stop at the best-looking Clopper-Pearson bound', fail well above alpha."""
    alpha, trials, n = 0.01, 1500, 1000
    ok, _, _ = failures(SequentialSampling(first_look=10, growth=1.15).procedure, alpha, trials, seed=1, n=n)
    broken, _, _ = failures(EveryLookAtFullAlpha(first_look=10, growth=1.15).procedure, alpha, trials, seed=1, n=n)
    naive, _, _ = failures(best_look, alpha, trials, seed=1, n=n)
    print(
        f"failures at alpha {alpha} in {trials}: sequential {ok}, every look at full alpha {broken}, best look {naive}"
    )
    for caught in (broken, naive):
        assert binomtest(caught, trials, alpha, alternative="greater").pvalue < 1e-4, (caught, ok)
        assert caught > 3 * max(ok, 1)


def test_schedule_and_stopping_rule() -> None:
    n, sigma, alpha = 100_000, 0.5, 0.001
    seq = SequentialSampling()
    looks, alphas = seq.looks(n), seq.look_alphas(n, alpha)
    assert looks[-1] == n and looks[0] >= seq.first_look and np.all(np.diff(looks) > 0)
    assert np.all(looks[1:] <= np.ceil(looks[:-1] * seq.growth) + 1)  # geometric
    assert (
        alphas.sum() <= alpha
        and alphas.sum() == pytest.approx(alpha)
        and alphas[-1] == pytest.approx(seq.final_share * alpha)
    )
    assert np.all(np.diff(alphas[:-1]) > 0)  # spend=1: a look's share grows with its draws
    assert len(SequentialSampling(first_look=n).looks(n)) == 1 and SequentialSampling(first_look=2 * n).look_alphas(
        n, alpha
    ).tolist() == [alpha]

    def run(p: float, seed: int = 0, rest: tuple[float, ...] = ()) -> Certificate:
        rng = np.random.default_rng(seed)
        return run_alone(
            seq.procedure(sigma, 100, n, alpha), lambda k: rng.multinomial(k, [p, 1 - p - sum(rest), *rest])
        )

    # every vote for c_A: stops at the first look whose bound clears 1.75, the highest report
    # radius below the cap sigma * Phi^-1(alpha_K^(1/n)) = 1.88 (unanimous draws: alpha_j^(1/N_j))
    cert = run(1.0)
    need = norm.cdf(1.75 / sigma)
    first = int(np.argmax(alphas ** (1 / looks) >= need))
    assert cert.extra_fields() == {
        "n_bound": looks[first],
        "samples": 100 + looks[first],
        "looks": first + 1,
        "stopped": "settled",
    }
    assert cert.p_a_lower == lower_confidence_bound(int(looks[first]), int(looks[first]), float(alphas[first])) >= need
    assert 1.75 <= cert.radius < 2.0 and cert.c_a_hat == 0
    # hopeless (p_cA = 0.4): abstains after a few hundred draws, claiming nothing
    cert = run(0.4, rest=(0.3,))
    assert (
        cert.prediction == ABSTAIN
        and cert.radius == 0
        and cert.extra_fields()["stopped"] == "abstain"
        and cert.samples < 1000
    )
    # far from every report radius: few draws; the fixed-n radius rounds down to the same report radius
    for p, r in ((norm.cdf(0.37 / sigma), 0.25), (norm.cdf(0.62 / sigma), 0.5)):
        g = np.random.default_rng(1)
        cert, fixed = (
            run(p, 1),
            run_alone(cohen_certify(sigma, 100, n, alpha), lambda k, g=g, p=p: g.multinomial(k, [p, 1 - p])),
        )
        assert cert.extra_fields()["stopped"] == "settled" and cert.samples < 0.1 * fixed.samples
        assert r <= cert.radius < r + 0.25 and r <= fixed.radius < r + 0.25
    # right where n draws start to certify r = 1.0: the full n, and the bound is the best look's
    need, lo, hi = norm.cdf(1.0 / sigma), 0, n  # bisect for the fewest votes of n that certify 1.0 at alpha_K
    while hi - lo > 1:
        lo, hi = (
            (lo, (lo + hi) // 2)
            if lower_confidence_bound((lo + hi) // 2, n, float(alphas[-1])) >= need
            else ((lo + hi) // 2, hi)
        )
    certs = [run(hi / n, seed) for seed in range(8)]
    full = [c for c in certs if c.extra_fields()["stopped"] == "full"]
    assert len(full) >= 2 and all(int(c.counts_estimation.sum()) == n for c in full)
    # the others were stopped by the optimistic bound (at stop_alpha per look), never below r = 0.75
    assert all(c.extra_fields()["stopped"] == "settled" and c.radius >= 0.75 for c in certs if c not in full)
    cert = full[0]
    k = int(cert.counts_estimation[0])
    assert cert.p_a_lower >= lower_confidence_bound(k, n, float(alphas[-1])) and cert.extra_fields()["n_bound"] in looks
    assert upper_confidence_bound(k, n, 0.001) > k / n > cert.p_a_lower


def test_settings_are_validated() -> None:
    assert SequentialSampling.from_config(SequentialConfig()) == SequentialSampling()
    custom = SequentialConfig(first_look=50, growth=2.0, final_share=0.9, spend=0.0, stop_alpha=0.01)
    assert SequentialSampling.from_config(custom).looks(400).tolist() == [50, 100, 200, 400]
    for bad in (
        dict(first_look=0),
        dict(growth=1.0),
        dict(growth=float("nan")),
        dict(final_share=1.0),
        dict(final_share=0.0),
        dict(spend=-1.0),
        dict(stop_alpha=0.0),
        dict(radii=()),
        dict(radii=(0.5, 0.25)),
    ):
        with pytest.raises(ValidationError):  # one check, the config's, for the config and the procedure alike
            SequentialSampling(**bad)  # type: ignore[arg-type]
        if "radii" not in bad:
            with pytest.raises(ValidationError):
                SequentialConfig(**bad)  # type: ignore[arg-type]


def test_sequential_on_a_real_model_through_both_engines() -> None:
    """A fitted linear classifier on real CIFAR-10 images, certified through the real engines
    (one image at a time, and packed with slots refilled): the records carry the sequential
    fields, the selection is fixed-n's, seeded runs repeat exactly."""
    images, labels = partial_test_images(12)
    with np.load(SHARED_DATA / "cifar10-partial" / "cifar10_train_prefix.npz") as train:
        model = nearest_class_mean(train["images"], train["labels"]).float()
    seq = SequentialSampling(first_look=50, skip_misclassified=False)
    kw = dict(sigma=0.12, n0=50, n=2000, alpha=0.001, batch_size=300, seed=0, device="cpu")
    fixed = certify_with(model, images, labels, range(12), **kw)
    runs = [certify_with(model, images, labels, range(12), **kw, images_per_pass=p, adaptive=seq) for p in (1, 1, 4, 4)]
    strip = [[{k: v for k, v in r.items() if k != "time"} for r in run] for run in runs]
    assert strip[0] == strip[1] and strip[2] == strip[3]  # seeded: the same records again
    for run in runs:
        assert [r["counts_selection"] for r in run] == [r["counts_selection"] for r in fixed]
        for r in run:
            assert r["samples"] == 50 + sum(r["counts"]) and r["n_bound"] <= sum(r["counts"]) <= 2000 and r["n"] == 2000
            assert r["stopped"] in STOP_REASONS and r["looks"] >= 1
            assert (r["predict"] == ABSTAIN) == (r["p_a_lower"] < 0.5)
    a, f = summarize(runs[2]), summarize(fixed)
    assert a["forward_passes_per_image"] < 0.6 * (50 + 2000)
    assert (
        abs(a["certified_accuracy"]["0.0"] - f["certified_accuracy"]["0.0"]) <= 2 / 12
        and f["certified_accuracy"]["0.0"] > 0.2
    )
    # Smooth.run on one image gives the unpacked engine's certificate
    smooth = Smooth(model, 10, 0.12, batch_size=300, device="cpu")
    cert = smooth.run(
        seq.procedure(0.12, 50, 2000, 0.001),
        torch.tensor(images[3]).permute(2, 0, 1).float() / 255,
        generator=example_generator(0, 3, "cpu"),
    )
    assert replace(cert, seconds=0).extra_fields() == {
        k: runs[0][3][k] for k in ("n_bound", "samples", "looks", "stopped")
    }
    assert cert.radius == runs[0][3]["radius"]


def test_skipping_misclassified_images_changes_no_certified_accuracy() -> None:
    """With labels, an image whose selection guess is not its label abstains unsampled; every other
    image gets the very certificate it gets without skipping (same seeds), so certified accuracy at
    every radius and ACR are the same numbers, for fewer forward passes. Real model, real images."""
    images, labels = partial_test_images(40)
    with np.load(SHARED_DATA / "cifar10-partial" / "cifar10_train_prefix.npz") as train:
        model = nearest_class_mean(train["images"], train["labels"]).float()
    kw = dict(sigma=0.25, n0=50, n=2000, alpha=0.001, batch_size=300, seed=0, device="cpu")
    every = certify_with(
        model, images, labels, range(40), **kw, adaptive=SequentialSampling(first_look=50, skip_misclassified=False)
    )
    for per_pass in (1, 4):
        skip = certify_with(
            model, images, labels, range(40), **kw, images_per_pass=per_pass, adaptive=SequentialSampling(first_look=50)
        )
        wrong = [r["c_a_hat"] != r["label"] for r in skip]
        assert 5 <= sum(wrong) <= 35  # both kinds present (a weak model: many guesses are wrong)
        for r, e, w in zip(skip, every, wrong):
            assert r["counts_selection"] == e["counts_selection"] and r["c_a_hat"] == e["c_a_hat"]
            if w:
                assert (r["stopped"], r["predict"], r["radius"], r["samples"], r["looks"], r["correct"]) == (
                    "misclassified",
                    ABSTAIN,
                    0.0,
                    50,
                    0,
                    0,
                )
                assert e["correct"] == 0 and e["samples"] > 50  # without skipping: sampled, and wrong all the same
            elif per_pass == 1:  # the same noise stream: the same certificate
                assert {k: v for k, v in r.items() if k != "time"} == {k: v for k, v in e.items() if k != "time"}
        a, b = summarize(skip), summarize(every)
        if per_pass == 1:
            assert a["certified_accuracy"] == b["certified_accuracy"] and a["acr"] == b["acr"]
        assert a["misclassified_unsampled"] == np.mean(wrong) and "misclassified_unsampled" not in b
        assert a["abstain_rate"] == np.mean([r["predict"] == ABSTAIN and not w for r, w in zip(skip, wrong)])
        assert a["forward_passes_per_image"] < b["forward_passes_per_image"] - 0.5 * np.mean(wrong) * (
            b["forward_passes_per_image"] - 50
        )
