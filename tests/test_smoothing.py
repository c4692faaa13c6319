"""Randomized smoothing: soundness on an analytic case, the bound, refusals, reproducibility, I/O."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy.stats import beta, binom, binomtest, norm
from torch import nn

from tbn_ray.config import REPORT_RADII
from tbn_ray.errors import SoundnessError, TbnError
from tbn_ray.science.smoothing import (
    ABSTAIN,
    Smooth,
    example_generator,
    lower_confidence_bound,
    summarize,
)
from tbn_ray.store.results import TSV_HEADER, read_results, write_results

from .helpers import HANG_S, SHARED_DATA, certify_with, partial_test_images

PARTIAL = SHARED_DATA / "cifar10-partial"
CPU = torch.device("cpu")


class LinearTwoClass(nn.Module):
    """f(x) = [w.x + b > 0]. Its smoothed classifier is f itself, and the exact l2 radius
    at x is the distance to the hyperplane, |w.x + b| / ||w|| (Cohen et al., Sec. 3.1)."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.register_buffer("w", w.flatten())
        self.b = b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(s), s], dim=1)


def linear_case(rng: np.random.Generator, distance: float, shape=(3, 8, 8)) -> tuple[LinearTwoClass, torch.Tensor, int]:
    """A random hyperplane at signed l2 distance ``distance`` from a random image x."""
    x = torch.from_numpy(rng.random(shape, dtype=np.float32))
    w = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    b = float(distance * w.norm() - (w * x).sum())
    return LinearTwoClass(w, b), x, int(distance > 0)


class Alternating(nn.Module):
    """Votes 0, 1, 0, 1, ... by position in the batch: an exact 50/50 tie for even batches."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(torch.arange(len(x)) % 2, 3).float()


def tiny_bn_net(sigma: float) -> nn.Module:
    """A small conv net whose BN statistics are estimated once on noisy training images, then frozen."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8, momentum=None),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16, momentum=None),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    train = np.load(PARTIAL / "cifar10_train_prefix.npz")["images"][:512]
    x = torch.from_numpy(train).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        net(x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(1)))
    return net.eval()


@pytest.fixture(scope="module")
def cifar_test() -> tuple[np.ndarray, np.ndarray]:
    return partial_test_images(10)


@pytest.fixture(autouse=True)
def one_thread():
    """Two shared cores: intra-op threads only contend here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- soundness, analytic case


def test_linear_certificate_is_sound_at_rate_alpha() -> None:
    """P(wrong class certified, or radius > true distance) <= alpha, over inputs and seeds."""
    alpha, trials = 0.05, 1500
    rng = np.random.default_rng(0)
    failures, ratios, overshoot = 0, [], 0.0
    for t in range(trials):
        sigma = float(rng.choice([0.12, 0.25, 0.5, 1.0]))
        distance = float(rng.choice([-1, 1]) * rng.uniform(0.05, 2.5) * sigma)
        model, x, true_class = linear_case(rng, distance)
        smooth = Smooth(model, 2, sigma, batch_size=512)
        cert = smooth.certify(x, 100, 1000, alpha, generator=example_generator(7, t, CPU))
        if cert.prediction == ABSTAIN:
            continue
        d = abs(distance)
        if cert.prediction != true_class or cert.radius > d:
            failures += 1
            overshoot = max(overshoot, (cert.radius - d if cert.prediction == true_class else cert.radius + d) / sigma)
        else:
            ratios.append(cert.radius / d)
    # consistent with a failure rate <= alpha (a bound without the confidence correction fails ~50%)
    assert binomtest(failures, trials, alpha, alternative="greater").pvalue > 1e-3, failures
    assert overshoot < 0.3  # a failure is a near miss (l2 distance to the truth, in sigmas), never a wild one
    # and not vacuous: most inputs are certified, with radii of the right size
    assert len(ratios) > 0.7 * trials
    assert 0.6 < float(np.median(ratios)) < 1.0


@pytest.mark.parametrize("ratio", [0.5, 1.0, 2.0])
def test_linear_certificate_is_tight_for_large_n(ratio: float) -> None:
    sigma = 0.5
    model, x, true_class = linear_case(np.random.default_rng(int(ratio * 10)), -ratio * sigma)
    smooth = Smooth(model, 2, sigma, batch_size=10_000)
    cert = smooth.certify(x, 100, 100_000, 0.001, generator=example_generator(0, 0, CPU))
    assert cert.prediction == true_class == 0
    assert 0.95 < cert.radius / (ratio * sigma) < 1.005
    assert cert.counts_selection.sum() == 100 and cert.counts_estimation.sum() == 100_000
    assert cert.n_a == cert.counts_estimation[0]
    # the analytic vote share is Phi(distance / sigma); the Monte-Carlo estimate must agree
    assert abs(cert.n_a / 100_000 - norm.cdf(ratio)) < 5 * np.sqrt(0.25 / 100_000)


# ---------------------------------------------------------------- Clopper-Pearson bound


def test_lower_confidence_bound_is_clopper_pearson() -> None:
    for n in (1, 2, 7, 100, 1000, 100_000):
        for alpha in (0.001, 0.01, 0.05):
            ks = sorted({0, 1, 2, n // 3, n // 2, n - 1, n} & set(range(n + 1)))
            bounds = [lower_confidence_bound(k, n, alpha) for k in ks]
            assert bounds[0] == 0.0 and ks[0] == 0
            assert all(a < b for a, b in zip(bounds, bounds[1:])), (n, alpha, bounds)  # strictly increasing in k
            for k, lb in zip(ks[1:], bounds[1:]):
                assert lb == beta.ppf(alpha, k, n - k + 1)
                # the defining property, computed independently: P(Binomial(n, lb) >= k) = alpha
                assert binom.sf(k - 1, n, lb) == pytest.approx(alpha, rel=1e-6)
                # and scipy's own exact two-sided interval at level 1 - 2 alpha
                assert lb == pytest.approx(binomtest(k, n).proportion_ci(1 - 2 * alpha, "exact").low, rel=1e-9)
            assert bounds[-1] == pytest.approx(alpha ** (1 / n), rel=1e-12)  # k = n
    with pytest.raises(ValueError):
        lower_confidence_bound(5, 4, 0.01)


def test_science_core_imports_neither_ray_nor_scipy_stats() -> None:
    """The science core must run where Ray cannot travel (the GPU machines); and scipy.stats,
    ~1 s of import, must stay out of the start-up of every actor and CLI call that certifies."""
    code = (
        "import importlib, pkgutil, sys, tbn_ray\n"
        "for m in pkgutil.walk_packages(tbn_ray.__path__, 'tbn_ray.'):\n"
        "    if not m.name.startswith(('tbn_ray.distributed', 'tbn_ray.__main__')):\n"
        "        importlib.import_module(m.name)\n"
        "print(sorted(m for m in ('ray', 'scipy.stats') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


# ---------------------------------------------------------------- PREDICT


def test_predict_abstains_on_an_exact_tie_and_answers_a_clear_majority() -> None:
    tie = Smooth(Alternating(), 3, 0.25, batch_size=100)
    x = torch.rand(3, 32, 32)
    assert tie.sample_counts(x, 1000, generator=example_generator(0, 0, CPU)).tolist() == [500, 500, 0]
    assert tie.predict(x, 1000, 0.001, generator=example_generator(0, 0, CPU)) == ABSTAIN
    model, x, true_class = linear_case(np.random.default_rng(1), 2.0 * 0.25)
    clear = Smooth(model, 2, 0.25)
    assert clear.predict(x, 1000, 0.001, generator=example_generator(0, 0, CPU)) == true_class == 1
    # on the boundary itself the votes split about evenly: PREDICT must not claim a class
    model, x, _ = linear_case(np.random.default_rng(2), 0.0)
    assert Smooth(model, 2, 0.25).predict(x, 1000, 0.001, generator=example_generator(0, 0, CPU)) == ABSTAIN


# ---------------------------------------------------------------- refusals


def test_refuses_a_base_classifier_that_is_not_fixed() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(10))
    net(torch.rand(2, 3, 32, 32))  # materialise the lazy layer
    with pytest.raises(SoundnessError, match="training mode"):
        Smooth(net, 10, 0.25)  # a fresh module is in training mode: per-batch BN
    smooth = Smooth(net.eval(), 10, 0.25)
    x, gen = torch.rand(3, 32, 32), example_generator(0, 0, CPU)
    assert smooth.sample_counts(x, 10, generator=gen).sum() == 10
    net.train()  # switched after construction: every call checks again
    with pytest.raises(SoundnessError):
        smooth.certify(x, 10, 10, 0.01, generator=gen)
    with pytest.raises(SoundnessError):
        smooth.predict(x, 10, 0.01, generator=gen)
    transductive = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.raises(SoundnessError, match="running statistics"):
        Smooth(transductive, 10, 0.25)
    # a model without BN is a fixed function, whatever its mode
    assert Smooth(LinearTwoClass(torch.ones(3), 0.0).train(), 2, 0.25).sigma == 0.25


@pytest.mark.parametrize("sigma", [0.0, -0.25])
def test_rejects_sigma_not_positive(sigma: float) -> None:
    with pytest.raises(TbnError, match="sigma"):
        Smooth(LinearTwoClass(torch.ones(3), 0.0), 2, sigma)


# ---------------------------------------------------------------- reproducibility


def test_counts_depend_only_on_seed_index_and_batch_size() -> None:
    model, x, _ = linear_case(np.random.default_rng(3), 0.0)  # on the boundary: counts vary with the noise
    smooth = Smooth(model, 2, 0.5, batch_size=300)

    def counts(seed: int, idx: int) -> list[int]:
        return smooth.sample_counts(x, 1000, generator=example_generator(seed, idx, CPU)).tolist()

    assert counts(0, 4) == counts(0, 4)
    assert len({tuple(counts(0, 4)), tuple(counts(1, 4)), tuple(counts(0, 5)), tuple(counts(4, 0))}) == 4


def test_shards_give_the_same_records(cifar_test) -> None:
    images, labels = cifar_test
    net = tiny_bn_net(0.25)
    kw = dict(sigma=0.25, n0=20, n=300, alpha=0.001, batch_size=128, seed=3, device="cpu")
    whole = certify_with(net, images[:10], labels[:10], list(range(10)), **kw)
    again = certify_with(net, images[:10], labels[:10], list(range(10)), **kw)
    shard = certify_with(net, images[5:10], labels[5:10], list(range(5, 10)), **kw)

    def without_time(records: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "time"} for r in records]

    assert without_time(whole) == without_time(again)
    assert without_time(whole[5:]) == without_time(shard)
    # the comparison is not vacuous: some examples split their votes
    assert sum(max(r["counts"]) < r["n"] for r in whole) >= 2


# ---------------------------------------------------------------- real CIFAR end to end


def test_certify_summarize_write_read_roundtrip(cifar_test, tmp_path: Path) -> None:
    images, labels = cifar_test
    sigma = 0.25
    records = certify_with(
        tiny_bn_net(sigma),
        images[:10],
        labels[:10],
        np.arange(10),
        sigma=sigma,
        n0=20,
        n=300,
        alpha=0.001,
        batch_size=128,
        seed=0,
        device="cpu",
    )
    for r in records:
        assert sum(r["counts"]) == r["n"] == 300 and sum(r["counts_selection"]) == r["n0"] == 20
        assert r["count"] == r["counts"][r["c_a_hat"]]
        assert r["correct"] == int(r["predict"] == r["label"])
        assert (r["predict"] == ABSTAIN) == (r["radius"] == 0.0 and r["p_a_lower"] < 0.5)
        if r["predict"] != ABSTAIN:
            assert r["radius"] == sigma * norm.ppf(lower_confidence_bound(r["count"], 300, 0.001))
    summary = summarize(records)
    params = dict(
        sigma=sigma,
        n0=20,
        n=300,
        alpha=0.001,
        seed=0,
        batch_size=128,
        bn="tbn",
        model="tiny BN conv net (random weights)",
        data_source="CIFAR-10 test, exact subset (cifar10-partial)",
    )
    paths = write_results(records, summary, tmp_path / f"sigma={sigma}", params)

    assert list(paths) == ["certify.tsv", "radii.parquet", "summary.json"]
    lines = Path(paths["certify.tsv"]).read_text().splitlines()
    assert lines[0] == TSV_HEADER == "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    rows = list(csv.DictReader(lines, delimiter="\t"))
    assert [int(r["idx"]) for r in rows] == list(range(10))
    assert all(len(r["radius"].split(".")[1]) >= 3 for r in rows)
    radius = np.array([float(r["radius"]) for r in rows])
    correct = np.array([int(r["correct"]) for r in rows])
    assert radius.tolist() == [r["radius"] for r in records]  # exact, never rounded across a radius
    for r, acc in summary["certified_accuracy"].items():
        assert acc == np.mean((correct == 1) & (radius >= float(r)))
    assert summary["acr"] == np.mean(radius * correct)
    assert summary["clean_accuracy_smoothed"] == summary["certified_accuracy"]["0.0"] == np.mean(correct)
    assert summary["abstain_rate"] == np.mean([int(r["predict"]) == ABSTAIN for r in rows])
    assert list(summary["certified_accuracy"]) == [str(r) for r in REPORT_RADII]

    table = pq.read_table(paths["radii.parquet"])
    assert set(table.column_names) == set(records[0])
    assert json.loads(table.schema.metadata[b"tbn_ray.params"])["sigma"] == sigma
    back, back_summary = read_results(tmp_path / f"sigma={sigma}")
    assert back == records
    assert back_summary == {**summary, "params": params}

    with pytest.raises(ValueError, match="summary"):
        write_results(records[:5], summary, tmp_path / "other", params)
    with pytest.raises(ValueError, match="params"):
        write_results(records, summary, tmp_path / "other", {"sigma": sigma})
    with pytest.raises(TbnError, match="repeat"):
        summarize(records + records[:1])
    with pytest.raises(TbnError, match="no certification results"):
        read_results(tmp_path / "missing")
    with pytest.raises(TbnError, match="uint8"):
        certify_with(
            tiny_bn_net(sigma),
            images[:2].astype(np.float32),
            labels[:2],
            [0, 1],
            sigma=sigma,
            n0=1,
            n=1,
            alpha=0.01,
            batch_size=1,
            seed=0,
            device="cpu",
        )
