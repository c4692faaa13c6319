"""The packed sampling engine: per-image numbers independent of companions, today's path unchanged, sound."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from tbn_ray.errors import SoundnessError, TbnError
from tbn_ray.science.sampling import PackedSampler, compiled
from tbn_ray.science.smoothing import (
    ABSTAIN,
    Smooth,
    cohen_certify,
    example_generator,
    lower_confidence_bound,
)

from .helpers import certify_with, partial_test_images
from .test_smoothing import LinearTwoClass, one_thread, tiny_bn_net  # noqa: F401 (one_thread: autouse fixture)

CPU = torch.device("cpu")
KW = dict(sigma=0.25, n0=30, n=500, alpha=0.001, batch_size=128, seed=3, device="cpu")


@pytest.fixture(scope="module")
def cifar8() -> tuple[np.ndarray, np.ndarray]:
    return partial_test_images(8)


def _numbers(records: list[dict]) -> dict[int, tuple]:
    return {r["idx"]: (r["counts_selection"], r["counts"], r["predict"], r["radius"]) for r in records}


def test_unpacked_path_is_cohens_certify_as_before(cifar8) -> None:
    """images_per_pass=1 (the default) is Cohen's CERTIFY, one image at a time, as written out here."""
    images, labels = cifar8
    net = tiny_bn_net(0.25)
    records = certify_with(net, images, labels, range(8), **KW)
    smooth = Smooth(net, 10, 0.25, batch_size=128)
    for r, image in zip(records, images):
        x = torch.tensor(image).permute(2, 0, 1).float().div(255)
        gen = example_generator(3, r["idx"], CPU)
        selection = smooth.sample_counts(x, 30, generator=gen)
        estimation = smooth.sample_counts(x, 500, generator=gen)
        c = int(selection.argmax())
        lower = lower_confidence_bound(int(estimation[c]), 500, 0.001)
        assert r["counts_selection"] == selection.tolist() and r["counts"] == estimation.tolist()
        assert r["p_a_lower"] == lower and r["c_a_hat"] == c
        assert r["predict"] == (c if lower >= 0.5 else ABSTAIN)
        assert sorted(r) == sorted(
            [
                "idx",
                "label",
                "predict",
                "radius",
                "correct",
                "p_a_lower",
                "count",
                "c_a_hat",
                "n0",
                "n",
                "counts",
                "counts_selection",
                "time",
            ]
        )


def test_packed_counts_do_not_depend_on_companions_or_order(cifar8) -> None:
    images, labels = cifar8
    net = tiny_bn_net(0.25)
    alone = _numbers(certify_with(net, images, labels, range(8), **KW))
    packed = certify_with(net, images, labels, range(8), **KW, images_per_pass=3)
    order = [5, 2, 7, 0, 3]
    other_group = certify_with(net, images[order], labels[order], order, **KW, images_per_pass=4)
    assert _numbers(packed) == alone
    assert _numbers(other_group) == {i: alone[i] for i in order}
    # the comparison is not vacuous: votes split, and packing changed the passes' composition
    assert sum(max(v[1]) < 500 for v in alone.values()) >= 2
    assert all(r["time"] > 0 for r in packed)  # each image's share of the passes it was in


def test_packer_fills_each_pass_from_several_images() -> None:
    """Each image gets exactly the draws it asked for, in fewer passes than one image at a time needs:
    a pass is short only while every image in flight waits for its counts (here: the first, the
    three selection requests together)."""
    widths: list[int] = []

    class Recording(LinearTwoClass):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            widths.append(len(x))
            return super().forward(x)

    model = Recording(torch.ones(3 * 4 * 4), 0.0)
    xs = [torch.rand(3, 4, 4) for _ in range(5)]
    gens = [example_generator(0, i, CPU) for i in range(5)]
    packer = PackedSampler(model, 2, 0.5, batch_size=64, images_per_pass=3, device=CPU)
    certs, rows, _ = packer.run(xs, gens, [cohen_certify(0.5, 10, 100 + 7 * i, 0.01) for i in range(5)])
    assert rows == [10 + 100 + 7 * i for i in range(5)]
    assert [c.samples for c in certs] == rows
    assert sum(widths) == sum(rows) and max(widths) == 64 and widths[0] == 30
    one_at_a_time = sum(1 + -(-(100 + 7 * i) // 64) for i in range(5))
    assert len(widths) <= -(-sum(rows) // 64) + 2 < one_at_a_time, widths


def test_packed_fixed_n_is_sound_at_rate_alpha() -> None:
    """Packed CERTIFY on a linear classifier (exact radius = distance to the hyperplane):
    P(wrong class certified, or radius > true distance) <= alpha over 2000 certificates."""
    alpha, trials, sigma, shape = 0.05, 2000, 0.25, (3, 8, 8)
    rng = np.random.default_rng(0)
    w = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    model = LinearTwoClass(w, 0.0)
    unit = w / w.norm()
    distance = rng.choice([-1, 1], trials) * rng.uniform(0.05, 2.5, trials) * sigma
    base = torch.from_numpy(rng.random((trials, *shape), dtype=np.float32))
    xs = [b - (b * unit).sum() * unit + float(d) * unit for b, d in zip(base, distance)]
    gens = [example_generator(11, t, CPU) for t in range(trials)]
    packer = PackedSampler(model, 2, sigma, batch_size=4096, images_per_pass=32, device=CPU)
    certs, _, _ = packer.run(xs, gens, [cohen_certify(sigma, 50, 500, alpha) for _ in range(trials)])
    truth = (distance > 0).astype(int)
    certified = np.array([c.prediction != ABSTAIN for c in certs])
    wrong = np.array([c.prediction != t or c.radius > abs(d) + 1e-5 for c, t, d in zip(certs, truth, distance)])
    failures = int((certified & wrong).sum())
    assert binomtest(failures, trials, alpha, alternative="greater").pvalue > 1e-3, failures
    assert certified.mean() > 0.7 and failures > 0  # not vacuous


def test_gpu_settings_are_ignored_or_exact_on_cpu(cifar8) -> None:
    images, labels = cifar8
    net = tiny_bn_net(0.25)
    plain = _numbers(certify_with(net, images[:3], labels[:3], range(3), **KW, images_per_pass=2))
    tuned = certify_with(net, images[:3], labels[:3], range(3), **KW, images_per_pass=2, cudnn_autotune=True)
    assert _numbers(tuned) == plain and torch.backends.cudnn.benchmark is False
    # no backend named, no torch.compile (importing its machinery alone takes ~25 s on a loaded 2-core machine)
    assert compiled(net, None) is net
    with pytest.raises(TbnError, match="compile backend"):
        certify_with(net, images[:1], labels[:1], [0], **KW, compile_backend="")
    with pytest.raises(TbnError, match="images_per_pass"):
        certify_with(net, images[:1], labels[:1], [0], **KW, images_per_pass=0)
    with pytest.raises(SoundnessError):  # the model is validated before anything runs, packed too
        certify_with(net.train(), images[:1], labels[:1], [0], **KW, images_per_pass=2)
