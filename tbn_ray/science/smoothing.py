"""Randomized smoothing: Cohen, Rosenfeld & Kolter (ICML 2019), CERTIFY and PREDICT.

``Smooth`` follows the paper's pseudocode (docs/method.md, "CERTIFY")
step by step. Differences from the reference ``core.py`` are deliberate: the device is
explicit, every example draws its noise from its own seeded generator (any shard re-run
gives the same counts), the model is never switched to eval mode behind the caller's back
(that would silently discard TBN statistics; a base classifier that is not fixed is
refused instead), and votes are counted with ``torch.bincount``. CERTIFY is written once,
as a procedure (``cohen_certify``) that asks for draws and is sent their counts, so the
same code runs one image at a time (``Smooth``) or packed with others (``sampling``).

Reproducibility contract: the counts for an example are bit-identical for the same
(run seed, example index, n0, n, batch_size, device type, channels_last, model, software,
and the engine options of ``certify_examples``), whichever other examples are certified
with it, in which order or in which shard.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tbn_ray.config import REPORT_RADII, CertifyConfig, check_sigma
from tbn_ray.errors import SoundnessError, TbnError
from tbn_ray.science.bounds import ABSTAIN, certify_bound, lower_confidence_bound
from tbn_ray.science.memory import check_fits, named_failure
from tbn_ray.science.sampling import PackedSampler, Procedure, check_logits, compiled, cudnn_benchmark

#: The ``stopped`` of a record left unsampled after its selection guess was not its label.
MISCLASSIFIED = "misclassified"


def _resolve_device(device: str | torch.device) -> torch.device:
    """``cuda`` and ``cuda:0`` are the same device; make them compare equal."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def check_fixed_classifier(base: nn.Module) -> None:
    """Refuse a base classifier whose votes depend on the batch they are computed in.

    Cohen's certificate needs i.i.d. votes of one fixed function f (docs/method.md,
    rule 1). A BatchNorm layer in training mode, or one without running statistics,
    normalises each noisy copy with statistics of the batch of noisy copies: that is the
    transductive mode, legitimate for corruption evaluation but never for a certificate.
    So is a layer in eval mode whose forward was replaced (on the instance or in a subclass)
    or is wrapped by forward hooks: it may normalise with anything, e.g. batch statistics
    mixed with a prior (``test-batch:N``). Only ``_BatchNorm`` subclasses are recognised.
    """
    torch_forwards = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)
    global_hooks = nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
    for name, module in base.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        where = name or type(module).__name__
        if "forward" in module.__dict__ or type(module).forward not in torch_forwards:
            raise SoundnessError(
                f"BatchNorm layer '{where}' runs a forward of its own, not torch's, so its votes may depend on the batch "
                "and no certificate holds; certify the model with plain BatchNorm layers and frozen statistics"
            )
        if module._forward_hooks or module._forward_pre_hooks or global_hooks:
            raise SoundnessError(
                f"BatchNorm layer '{where}' has forward hooks that may change its output, so no certificate holds; "
                "remove them (handle.remove()) before certifying"
            )
        if module.training:
            raise SoundnessError(
                f"BatchNorm layer '{where}' is in training mode, so its votes depend on the batch "
                "and no certificate holds; freeze the (calibrated) statistics with model.eval() first"
            )
        if not module.track_running_stats or module.running_mean is None or module.running_var is None:
            raise SoundnessError(
                f"BatchNorm layer '{where}' has no running statistics (per-batch/transductive BN), "
                "so no certificate holds; certify with frozen calibrated statistics instead"
            )


def _low_precision(base: nn.Module) -> bool:
    """Runs under CUDA autocast (``base_classifier.Autocast``): logits rounded to bf16/fp16 steps."""
    return any(
        getattr(m, "amp", "off") != "off" and getattr(getattr(m, "device", None), "type", None) == "cuda"
        for m in base.modules()
    )


def check_certifiable(base: nn.Module, x: Tensor, sigma: float, num_classes: int) -> None:
    """The gate every certificate passes (``certify_examples``, whatever path led there: a run
    trained here, an imported run, a module given to the API, the sweep, the reproduction).

    Refuses what is not one fixed function of a single input (docs/method.md, rule 1): the
    structure (``check_fixed_classifier``: BatchNorm frozen, torch's own, running statistics),
    then the behaviour, on ``x`` and two noisy copies of it at ``sigma`` (the inputs f is about
    to vote on; no certification noise is drawn): a tensor of shape (3, num_classes), finite, and
    the same logits for each input alone as in the batch of three, up to float rounding. A model
    that normalises with anything of its batch (the batch mean, per-batch statistics of a layer
    tbn-ray does not know) fails there.
    """
    check_fixed_classifier(base)
    check_fixed_function(base, x, sigma, num_classes)


def check_fixed_function(base: nn.Module, x: Tensor, sigma: float, num_classes: int) -> None:
    """The behaviour half of ``check_certifiable``, also what an import checks a model for."""
    noise = torch.randn((2, *x.shape), generator=torch.Generator().manual_seed(0)).to(x.device, x.dtype)
    probe = torch.cat([x.unsqueeze(0), x + sigma * noise])
    try:
        with torch.inference_mode():
            out = base(probe)
            alone = torch.cat([base(probe[i : i + 1]) for i in range(len(probe))]) if isinstance(out, Tensor) else None
    except Exception as e:  # noqa: BLE001 - the user's forward: whatever it raises is its failure
        first = str(e).splitlines()[0][:160] if str(e) else ""
        raise TbnError(
            f"the base classifier fails on inputs of shape {tuple(probe.shape)}: {type(e).__name__}: {first}"
        ) from None
    if not isinstance(out, Tensor) or alone is None or tuple(out.shape) != (len(probe), num_classes):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise TbnError(
            f"the base classifier returns {got} for {len(probe)} inputs; it must return logits of shape ({len(probe)}, {num_classes})"
        )
    out, alone = out.float(), alone.float()
    if not bool(out.isfinite().all() and alone.isfinite().all()):
        raise TbnError("the base classifier returns non-finite logits on the inputs it is to certify")
    gap = float((out - alone).abs().max())
    scale = float(alone.abs().max())
    allowed = (3e-2 * scale + 1e-3) if _low_precision(base) else (1e-3 * scale + 1e-4)
    if gap > allowed:
        raise SoundnessError(
            f"the base classifier gives an input other logits in a batch than alone (max difference {gap:.3g}): its output "
            "depends on the batch, so it is no fixed classifier and no certificate holds"
        )


def example_generator(seed: int, idx: int, device: str | torch.device) -> torch.Generator:
    """The noise generator of example ``idx`` in run ``seed``, independent of any other example.

    ``SeedSequence(seed, spawn_key=(idx,))`` is numpy's construction for independent child
    streams, so nearby (seed, idx) pairs do not give correlated torch seeds.
    """
    if seed < 0 or idx < 0:
        raise TbnError(f"seed and example index must be >= 0, got seed={seed}, idx={idx}")
    state = np.random.SeedSequence(entropy=seed, spawn_key=(idx,)).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator(device=_resolve_device(device))
    generator.manual_seed(int(state))
    return generator


@dataclass(frozen=True, eq=False)
class Certificate:
    """The outcome of CERTIFY for one input."""

    prediction: int  # c_a_hat, or ABSTAIN
    radius: float  # l2 radius; 0.0 when abstaining
    p_a_lower: float  # Clopper-Pearson lower bound on P(f(x + noise) = c_a_hat)
    c_a_hat: int  # class guessed from the n0 selection draws (kept when abstaining)
    counts_selection: np.ndarray  # (num_classes,) votes of the n0 selection draws
    counts_estimation: np.ndarray  # (num_classes,) votes of the n fresh estimation draws
    seconds: float = 0.0  # wall time of the sampling rounds and the bound (set by the driver)

    @property
    def n_a(self) -> int:
        """Votes for c_a_hat among the estimation draws."""
        return int(self.counts_estimation[self.c_a_hat])

    @property
    def samples(self) -> int:
        """Noisy copies the base classifier classified for this certificate (forward rows)."""
        return int(self.counts_selection.sum() + self.counts_estimation.sum())

    def extra_fields(self) -> dict[str, Any]:
        """Record fields beyond Cohen's (none here; ``adaptive`` adds its own)."""
        return {}


def bound_certificate(
    sigma: float, alpha: float, c_a_hat: int, counts_selection: np.ndarray, counts_estimation: np.ndarray
) -> Certificate:
    """Cohen's bound and radius from the estimation draws alone: pA_lower = Clopper-Pearson
    (1 - alpha) of the votes for c_a_hat; abstain below 1/2, else radius sigma * Phi^-1(pA_lower)."""
    p_a_lower = lower_confidence_bound(int(counts_estimation[c_a_hat]), int(counts_estimation.sum()), alpha)
    prediction, radius = certify_bound(p_a_lower, c_a_hat, sigma)
    return Certificate(prediction, radius, p_a_lower, c_a_hat, counts_selection, counts_estimation)


def cohen_certify(sigma: float, n0: int, n: int, alpha: float) -> Procedure:
    """Cohen's CERTIFY as a procedure: it yields how many noisy draws it needs next and is
    sent their class counts (``run_alone`` or ``sampling.PackedSampler`` drives it)."""
    # draw n0 samples of f(x + epsilon) and use them to take a guess at the top class
    counts_selection = yield n0
    c_a_hat = int(counts_selection.argmax())
    # draw n FRESH samples of f(x + epsilon) and use them to lower-bound pA
    counts_estimation = yield n
    return bound_certificate(sigma, alpha, c_a_hat, counts_selection, counts_estimation)


def run_alone(procedure: Procedure, sample: Callable[[int], np.ndarray]) -> Certificate:
    """Drive one procedure with ``sample(k)`` (counts of k draws); its certificate, timed."""
    start = time.perf_counter()
    request = next(procedure)
    while True:
        try:
            request = procedure.send(sample(request))
        except StopIteration as finished:
            return replace(finished.value, seconds=time.perf_counter() - start)


class Smooth:
    """g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c) for a FIXED base classifier f.

    Noise is added in [0,1] pixel space (before the model's own normalisation) and not
    clipped, as in Cohen et al. The base classifier is used in whatever mode the caller
    left it; one that is not fixed (see ``check_fixed_classifier``) is refused at
    construction and again at every call, since its mode may change in between.
    """

    def __init__(
        self,
        base: nn.Module,
        num_classes: int,
        sigma: float,
        *,
        batch_size: int = 1000,
        device: str | torch.device | None = None,
        channels_last: bool = False,
    ) -> None:
        if num_classes < 2:
            raise TbnError(f"num_classes must be >= 2, got {num_classes}")
        if batch_size < 1:
            raise TbnError(f"batch_size must be >= 1, got {batch_size}")
        self.base = base
        self.num_classes = num_classes
        self.sigma = check_sigma(sigma)
        self.batch_size = batch_size
        self.channels_last = channels_last
        if device is None:
            first = next(iter(base.parameters()), None)
            device = first.device if first is not None else "cpu"
        self.device = _resolve_device(device)
        self._check_base()

    def _check_base(self) -> None:
        check_fixed_classifier(self.base)
        for name, tensor in (*self.base.named_parameters(), *self.base.named_buffers()):
            if _resolve_device(tensor.device) != self.device:
                raise TbnError(
                    f"model tensor '{name}' is on {tensor.device}, not {self.device}; move the model with model.to(device)"
                )

    def certify(self, x: Tensor, n0: int, n: int, alpha: float, *, generator: torch.Generator) -> Certificate:
        """Cohen's CERTIFY.

        With probability at least 1 - alpha over the noise, if the prediction is not
        ABSTAIN then g classifies every point within l2 distance ``radius`` of x as
        ``prediction``. ``x`` is one input, e.g. an image (3, 32, 32) in [0, 1].
        """
        _check_sampling(alpha, n0=n0, n=n)
        return self.run(cohen_certify(self.sigma, n0, n, alpha), x, generator=generator)

    def run(self, procedure: Procedure, x: Tensor, *, generator: torch.Generator) -> Certificate:
        """A certification procedure (``cohen_certify``, ``AdaptiveSampling.procedure``) on x alone."""
        return run_alone(procedure, lambda num: self.sample_counts(x, num, generator=generator))

    def predict(self, x: Tensor, n: int, alpha: float, *, generator: torch.Generator) -> int:
        """Cohen's PREDICT.

        With probability at least 1 - alpha over the noise, the returned class is g(x)
        (or ABSTAIN).
        """
        from scipy.stats import binomtest  # here: only PREDICT needs scipy.stats (see the imports)

        _check_sampling(alpha, n=n)
        counts = self.sample_counts(x, n, generator=generator)
        # the two most frequent classes (lowest class index first on equal counts)
        top2 = np.argsort(-counts, kind="stable")[:2]
        n_a, n_b = int(counts[top2[0]]), int(counts[top2[1]])
        if binomtest(n_a, n_a + n_b, p=0.5).pvalue > alpha:
            return ABSTAIN
        return int(top2[0])

    def sample_counts(self, x: Tensor, num: int, *, generator: torch.Generator) -> np.ndarray:
        """Votes of f on ``num`` noisy copies x + N(0, sigma^2 I), as int64 (num_classes,).

        The noise is drawn batch by batch into one reused buffer; its values depend only
        on the generator's state, ``num`` and ``batch_size``.
        """
        self._check_base()
        if generator.device.type != self.device.type:
            raise TbnError(
                f"the noise generator is on {generator.device}, the model on {self.device}; "
                "use example_generator(seed, idx, device)"
            )
        if not torch.is_floating_point(x):
            raise TbnError(f"x must be a floating-point tensor in [0, 1], got {x.dtype}")
        x = x.to(self.device)
        counts = torch.zeros(self.num_classes, dtype=torch.int64, device=self.device)
        rows = min(num, self.batch_size)
        check_fits(rows * x.numel() * x.element_size(), self.device, f"--batch-size {self.batch_size}")
        with torch.inference_mode(), named_failure(f"--batch-size {self.batch_size}", self.device):
            buffer = torch.empty((rows, *x.shape), dtype=x.dtype, device=self.device)
            remaining = num
            while remaining > 0:
                batch = buffer[: min(remaining, self.batch_size)]
                torch.randn(batch.shape, generator=generator, out=batch)
                torch.add(x, batch, alpha=self.sigma, out=batch)  # x + sigma * noise, in place
                if self.channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                logits = self.base(batch)
                check_logits(logits, len(batch), self.num_classes)
                counts += torch.bincount(logits.argmax(dim=1), minlength=self.num_classes)
                remaining -= len(batch)
        return counts.cpu().numpy()


def _check_sampling(alpha: float, **sizes: int) -> None:
    if not 0 < alpha < 1:
        raise TbnError(f"alpha must be in (0, 1), got {alpha}")
    for name, value in sizes.items():
        if value < 1:
            raise TbnError(f"{name} must be >= 1, got {value}")


def certify_examples(
    model: nn.Module,
    images: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    indices: Sequence[int] | np.ndarray,
    cfg: CertifyConfig,
    *,
    sigma: float,
    device: str | torch.device,
    num_classes: int = 10,
    progress: bool = False,
    on_image: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """CERTIFY each image at ``sigma`` with its own generator ``example_generator(cfg.seed, indices[i], device)``;
    ``on_image`` is called as each image's certificate is done (progress that moves within a shard).

    ``images`` are uint8 NHWC arrays (the CIFAR-10 / CIFAR-10-C storage format: exact,
    and a quarter of the bytes of float32 when shipped to workers); ``images[i]`` is the
    dataset example ``indices[i]`` with label ``labels[i]``, so any shard of a run is
    certified by passing the matching rows and their dataset indices. Pixels become x/255.
    ``model`` is the base classifier as it runs (``base_classifier.base_classifier``).

    One record per image: idx, label, predict (ABSTAIN = -1), radius, correct (0/1),
    p_a_lower, count (votes for c_a_hat among the estimation draws), c_a_hat, n0, n, counts and
    counts_selection (per-class votes of the estimation and the n0 selection draws), time
    (seconds). With an adaptive design the estimation draws number at most n and the record says
    how many (``samples``, ``n_bound``); p_a_lower is then the design's bound, not
    Clopper-Pearson of count out of sum(counts).

    The sampling settings come from ``cfg`` (each changes the run's numbers, so each is part of
    ``cfg.identity``): ``images_per_pass`` > 1 packs that many images into each forward pass
    (``PackedSampler``: same noise per image, other batch composition; a pass's time is shared
    out by rows); ``adaptive`` chooses each image's sample size, at most n: the sequential design
    (``sequential.SequentialSampling``; records add n_bound, samples, looks, stopped; an image
    whose selection guess is not its label is not sampled further and abstains, stopped
    "misclassified", unless ``sequential.skip_misclassified`` is off) or the
    pilot-planned one (``adaptive.AdaptiveSampling``; records add n_bound, samples,
    counts_pilot, planned_radius).
    On CUDA only, ``cudnn_autotune`` turns on cuDNN's per-shape algorithm search for the call;
    ``compile`` (e.g. "inductor") runs the base classifier through torch.compile.
    """
    _check_images(images, labels, indices)
    device = _resolve_device(device)
    smooth = Smooth(
        model, num_classes, sigma, batch_size=cfg.batch_size, device=device, channels_last=cfg.channels_last
    )
    if len(images):
        check_certifiable(
            model, torch.tensor(images[0], device=device).permute(2, 0, 1).float().div(255), smooth.sigma, num_classes
        )
    smooth.base = compiled(model, cfg.compile)  # validated above, as the model itself
    n0, n = cfg.n0, cfg.n

    def procedure(row: int) -> Procedure:
        return make_procedure(cfg, smooth.sigma, label=int(labels[row]))

    def image(row: int) -> Tensor:
        # torch.tensor copies: arrays shipped between processes are often read-only
        return torch.tensor(images[row], device=device).permute(2, 0, 1).float().div(255)

    generators = [example_generator(cfg.seed, int(i), device) for i in indices]
    with cudnn_benchmark(device, cfg.cudnn_autotune):
        if cfg.images_per_pass == 1:
            certs = _certify_alone(
                smooth,
                image,
                generators,
                procedure,
                progress=f"certify sigma={sigma}" if progress else None,
                on_image=on_image,
            )
        else:
            certs = _certify_packed(
                smooth,
                [image(r) for r in range(len(images))],
                generators,
                [procedure(r) for r in range(len(generators))],
                cfg.images_per_pass,
                largest_request(cfg),
                on_image,
            )
    return [_record(cert, int(indices[row]), int(labels[row]), n0, n) for row, cert in enumerate(certs)]


def make_procedure(cfg: CertifyConfig, sigma: float, *, label: int | None = None) -> Procedure:
    """The certification procedure ``cfg`` asks for, for one image (of class ``label``, when known):
    Cohen's CERTIFY at fixed n, or with an input-adaptive sample size."""
    if cfg.design == "sequential":
        from tbn_ray.science.sequential import SequentialSampling

        return SequentialSampling.from_config(cfg.sequential).procedure(sigma, cfg.n0, cfg.n, cfg.alpha, label)
    if cfg.design == "pilot":
        from tbn_ray.science.adaptive import AdaptiveSampling

        return AdaptiveSampling.from_config(cfg.adaptive_sampling).procedure(sigma, cfg.n0, cfg.n, cfg.alpha)
    return cohen_certify(sigma, cfg.n0, cfg.n, cfg.alpha)


def _certify_alone(
    smooth: Smooth,
    image: Callable[[int], Tensor],
    generators: list[torch.Generator],
    procedure: Callable[[int], Procedure],
    *,
    progress: str | None,
    on_image: Callable[[], None] | None = None,
) -> list[Certificate]:
    """One image at a time, each image's tensor and procedure made only when its turn comes; ``progress``: a bar's label."""
    rows: Iterable[int] = range(len(generators))
    if progress is not None:
        from tqdm import tqdm

        rows = tqdm(rows, desc=progress, unit="img")
    certs = []
    for row in rows:
        certs.append(smooth.run(procedure(row), image(row), generator=generators[row]))
        if on_image is not None:
            on_image()
    return certs


def largest_request(cfg: CertifyConfig) -> int:
    """The most draws any procedure of ``cfg`` asks for at once (the selection, the estimation, a pilot stage)."""
    a = cfg.adaptive_sampling
    return max(cfg.n0, cfg.n, *((a.pilot, *a.extra_pilots) if cfg.design == "pilot" else ()))


def _certify_packed(
    smooth: Smooth,
    xs: list[Tensor],
    generators: list[torch.Generator],
    procedures: list[Procedure],
    images_per_pass: int,
    max_request: int,
    on_image: Callable[[], None] | None = None,
) -> list[Certificate]:
    """The procedures run with several images per forward pass; each pass's time shared out by rows."""
    packer = PackedSampler(
        smooth.base,
        smooth.num_classes,
        smooth.sigma,
        batch_size=smooth.batch_size,
        images_per_pass=images_per_pass,
        device=smooth.device,
        channels_last=smooth.channels_last,
        max_request=max_request,
    )
    outcomes, used, seconds = packer.run(xs, generators, procedures, on_done=on_image)
    return [replace(c, seconds=seconds * u / max(1, sum(used))) for c, u in zip(outcomes, used)]


def _check_images(images: np.ndarray, labels: Sequence[int] | np.ndarray, indices: Sequence[int] | np.ndarray) -> None:
    nhwc = (
        isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] in (1, 3)
    )
    if not nhwc:
        raise TbnError("images must be a uint8 numpy array of shape (N, H, W, C), the CIFAR-10 storage format")
    if not len(images) == len(labels) == len(indices):
        raise TbnError(f"images, labels and indices differ in length: {len(images)}, {len(labels)}, {len(indices)}")


def _record(cert: Certificate, idx: int, label: int, n0: int, n: int) -> dict[str, Any]:
    return {
        "idx": idx,
        "label": label,
        "predict": cert.prediction,
        "radius": cert.radius,
        "correct": int(cert.prediction == label),
        "p_a_lower": cert.p_a_lower,
        "count": cert.n_a,
        "c_a_hat": cert.c_a_hat,
        "n0": n0,
        "n": n,
        "counts": cert.counts_estimation.tolist(),
        "counts_selection": cert.counts_selection.tolist(),
        "time": cert.seconds,
        **cert.extra_fields(),
    }


def _radius_key(r: float) -> str:
    return str(float(r))


def summarize(records: Sequence[dict[str, Any]], radii: Iterable[float] = REPORT_RADII) -> dict[str, Any]:
    """Certified accuracy at each radius (correct AND radius >= r), ACR, abstention rate.

    An image the sequential design left unsampled because its guess was not its label (stopped
    "misclassified") is in ``misclassified_unsampled``, not in ``abstain_rate``: whether the
    smoothed classifier abstains there was not asked, and either way it is not correct."""
    if not records:
        raise TbnError("no certification records to summarize")
    idx = [r["idx"] for r in records]
    if len(set(idx)) != len(idx):
        raise TbnError(
            "certification records repeat an example index (shards merged twice?); each image must count once"
        )
    radius = np.array([r["radius"] for r in records], dtype=np.float64)
    correct = np.array([r["correct"] for r in records], dtype=bool)
    predict = np.array([r["predict"] for r in records])
    unsampled = np.array([r.get("stopped") == MISCLASSIFIED for r in records], dtype=bool)
    radii = [float(r) for r in radii]
    return {
        "images": len(records),
        "radii": radii,
        "certified_accuracy": {_radius_key(r): float(np.mean(correct & (radius >= r))) for r in radii},
        "acr": float(np.mean(radius * correct)),
        "abstain_rate": float(np.mean((predict == ABSTAIN) & ~unsampled)),
        **({"misclassified_unsampled": float(np.mean(unsampled))} if unsampled.any() else {}),
        "clean_accuracy_smoothed": float(np.mean(correct)),
        "seconds_per_image": float(np.mean([r["time"] for r in records])),
        # adaptive records say how many forward passes each image took (fixed n: n0 + n for all)
        **(
            {"forward_passes_per_image": float(np.mean([r["samples"] for r in records]))}
            if all("samples" in r for r in records)
            else {}
        ),
    }
