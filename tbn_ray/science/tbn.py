"""Test-time adaptive batch normalization (TBN).

An adversarially trained model's BN statistics describe clean inputs; under Gaussian
noise they are wrong and accuracy collapses. TBN re-estimates the running mean and
variance (never gamma/beta, never the weights) on noisy inputs.

Two forms, with different guarantees (docs/method.md, rules 2 and 3):

* ``estimate_bn_stats``: statistics estimated ONCE per sigma on noisy held-out training
  images, then frozen. The model is a fixed function afterwards, so it is a valid base
  classifier for randomized smoothing. This is what certification uses.
* ``batch_statistics``: the transductive mode, each forward pass normalises with the
  statistics of its own batch. Legitimate for corruption accuracy; never for a
  certificate (``smoothing.Smooth`` refuses it because BN is then in training mode).

Estimation runs the model with BN in training mode (earlier layers normalised with
batch statistics, as in AdaBN / ``torch.optim.swa_utils.update_bn``) and records the
exact pooled per-channel mean and unbiased variance of each BN layer's input over all
noisy samples (float64 sums), rather than PyTorch's average of per-batch variances.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from tbn_ray.errors import TbnError

#: BN statistics of one model: layer name -> {"running_mean", "running_var"}.
BNStats = dict[str, dict[str, torch.Tensor]]

CLEAN = "clean"


def bn_key(sigma: float) -> str:
    """Name of the statistics set calibrated at ``sigma`` (e.g. ``sigma=0.25``)."""
    return f"sigma={float(sigma):g}"


def batch_norms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """Every ``_BatchNorm`` layer (BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants), in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _kinds(modules: Iterable[nn.Module]) -> Counter[str]:
    """How many modules of each type, in first-seen order."""
    return Counter(type(m).__name__ for m in modules)


def _listed(kinds: Counter[str]) -> str:
    """``BatchNorm2d x 20, LayerNorm x 1``."""
    return ", ".join(f"{k} x {v}" for k, v in kinds.items())


def normalization_layers(model: nn.Module) -> dict[str, int]:
    """Normalization layer types and how many of each (``BatchNorm2d``, ``LayerNorm``, ``GroupNorm``...),
    to say what a model normalises with when TBN refuses it or reports what it adapted."""
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)
    return dict(_kinds(m for m in model.modules() if isinstance(m, norms) or type(m).__name__.endswith("Norm")))


def describe_bn(model: nn.Module) -> str:
    """``20 BatchNorm layers (BatchNorm2d x 20)``: what TBN adapts in this model."""
    kinds = _kinds(m for _, m in batch_norms(model))
    total = sum(kinds.values())
    return f"{total} BatchNorm layer{'s' if total != 1 else ''} ({_listed(kinds)})"


def bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The layers TBN re-estimates; a model without any is refused, naming what it normalises with."""
    layers = batch_norms(model)
    if not layers:
        found = _listed(Counter(normalization_layers(model))) or "no normalization layers at all"
        raise TbnError(
            f"the model has no BatchNorm layers ({found}): test-time adaptive BN has nothing to re-estimate; "
            "use its own statistics (--bn clean) instead"
        )
    return layers


def get_bn_stats(model: nn.Module) -> BNStats:
    """A detached CPU copy of the model's running statistics; empty for a model without BatchNorm
    (its clean set: such a model is still a fixed classifier, only TBN does not apply to it)."""
    out: BNStats = {}
    for name, bn in batch_norms(model):
        if bn.running_mean is None or bn.running_var is None:
            raise TbnError(f"BatchNorm layer {name!r} keeps no running statistics")
        out[name] = {
            "running_mean": bn.running_mean.detach().to("cpu", torch.float32).clone(),
            "running_var": bn.running_var.detach().to("cpu", torch.float32).clone(),
        }
    return out


def set_bn_stats(model: nn.Module, stats: BNStats) -> None:
    """Copy a statistics set into the model's BN buffers (in place, same dtype/device)."""
    layers = dict(batch_norms(model))
    if set(layers) != set(stats):
        missing = sorted(set(layers) - set(stats))[:3]
        extra = sorted(set(stats) - set(layers))[:3]
        raise TbnError(f"BN statistics do not fit this model (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for name, bn in layers.items():
            for buf in ("running_mean", "running_var"):
                src = stats[name][buf]
                dst = getattr(bn, buf)
                if dst.shape != src.shape:
                    raise TbnError(
                        f"BN statistics for {name!r} have shape {tuple(src.shape)}, the model {tuple(dst.shape)}"
                    )
                dst.copy_(src.to(dst.device, dst.dtype))


@contextlib.contextmanager
def use_bn_stats(model: nn.Module, stats: BNStats) -> Iterator[nn.Module]:
    """Temporarily switch to another statistics set; the previous one is restored exactly."""
    saved = get_bn_stats(model)
    set_bn_stats(model, stats)
    try:
        yield model
    finally:
        set_bn_stats(model, saved)


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Transductive BN: normalise with each batch's own statistics, stored ones untouched.

    ``track_running_stats=False`` with ``training=True`` makes PyTorch use batch
    statistics without updating the running buffers. Gradients flow through the batch
    statistics, so an attack run inside this context is adaptive to them.
    """
    layers = bn_layers(model)
    saved = [(bn.training, bn.track_running_stats) for _, bn in layers]
    try:
        for _, bn in layers:
            bn.train(True)
            bn.track_running_stats = False
        yield model
    finally:
        for (_, bn), (training, track) in zip(layers, saved):
            bn.train(training)
            bn.track_running_stats = track


def noisy_batches(
    images: torch.Tensor, sigma: float, samples: int, batch_size: int, *, seed: int, device: torch.device | str = "cpu"
) -> Iterator[torch.Tensor]:
    """Gaussian-noised copies of ``images`` (float NCHW in [0,1]), cycled until ``samples``.

    Each pass over the images uses a fresh permutation and fresh noise from one seeded
    generator, so a calibration is reproducible from (seed, images, batch_size).
    """
    if sigma < 0:
        raise TbnError(f"sigma must be >= 0, got {sigma}")
    if len(images) == 0:
        raise TbnError("no images to estimate BN statistics from")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    done = 0
    while done < samples:
        order = torch.randperm(len(images), generator=gen)
        for start in range(0, len(order), batch_size):
            take = order[start : start + min(batch_size, samples - done)]
            x = images[take].to(device, torch.float32)
            noise = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(device)
            yield x + sigma * noise
            done += len(take)
            if done >= samples:
                return


@contextlib.contextmanager
def _input_moments(layers: list[tuple[str, nn.modules.batchnorm._BatchNorm]]) -> Iterator[dict[str, list[Any]]]:
    """Per-channel count, sum and sum of squares (float64) of every input each BN layer sees
    inside the block: layer name -> [count, sum, sum of squares]."""
    sums: dict[str, list[Any]] = {}

    def make_hook(name: str):
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            a = inputs[0].detach().to(torch.float64)
            dims = [d for d in range(a.dim()) if d != 1]
            count = a.numel() // a.shape[1]
            acc = sums.setdefault(name, [0, 0.0, 0.0])
            acc[0] += count
            acc[1] = acc[1] + a.sum(dim=dims)
            acc[2] = acc[2] + (a * a).sum(dim=dims)

        return hook

    hooks = [bn.register_forward_pre_hook(make_hook(name)) for name, bn in layers]
    try:
        yield sums
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def estimate_bn_stats(
    model: nn.Module,
    images: torch.Tensor,
    *,
    sigma: float,
    samples: int,
    batch_size: int = 500,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> BNStats:
    """BN statistics of the model's inputs under N(0, sigma^2 I) noise, pooled over ``samples`` noisy images.

    ``images`` must be disjoint from the images later certified (use the held-out
    training split). The model's own statistics, modes and parameters are left exactly
    as they were; the estimate is returned, not installed.
    """
    layers = bn_layers(model)
    was_training = model.training
    try:
        model.eval()
        # BN layers in training mode without tracking: batch statistics, running buffers untouched
        with batch_statistics(model), _input_moments(layers) as sums:
            bar = tqdm(total=samples, desc=f"TBN sigma={sigma:g}", unit="img", disable=not progress, leave=False)
            for x in noisy_batches(images, sigma, samples, batch_size, seed=seed, device=device):
                model(x)
                bar.update(len(x))
            bar.close()
    finally:
        model.train(was_training)

    out: BNStats = {}
    for name, _bn in layers:
        count, s1, s2 = sums[name]
        mean = s1 / count
        var = (s2 / count - mean * mean).clamp_min(0) * (count / max(count - 1, 1))
        out[name] = {"running_mean": mean.to("cpu", torch.float32), "running_var": var.to("cpu", torch.float32)}
    return out


def stats_distance(a: BNStats, b: BNStats) -> float:
    """Mean relative change of the running means/variances between two sets (for logs)."""
    rel = []
    for name in a:
        for buf in ("running_mean", "running_var"):
            x, y = a[name][buf], b[name][buf]
            rel.append(float((x - y).norm() / (y.norm() + 1e-12)))
    return float(np.mean(rel))
