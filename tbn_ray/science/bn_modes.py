"""BN modes: the ways one set of trained weights normalises its activations.

* ``clean``: the trained running statistics, frozen (eval mode).
* ``sigma:<s>``: the TBN set calibrated at noise level ``s`` (``tbn-ray calibrate``), frozen.
* ``test-batch``: transductive BN (Schneider et al. 2020; TENT's "norm"): every forward pass
  normalises each BN layer's input with the per-channel mean and (biased) variance of the
  current batch. Numbers depend on the batch size, which is part of every result's name.
* ``test-batch:N``: Schneider et al.'s prior mixing with pseudo sample size N: the layer uses
  mean = N/(N+n) * mean_clean + n/(N+n) * mean_batch (the same for the variance), n the
  batch size. N = 0 is ``test-batch``; N -> infinity is ``clean``.

Batch modes are legitimate for corruption accuracy only (docs/method.md, rule 3); certification
refuses them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tbn_ray.errors import TbnError
from tbn_ray.science.tbn import CLEAN, BNStats, batch_statistics, bn_key, bn_layers, use_bn_stats
from tbn_ray.science.training import eval_mode


@dataclass(frozen=True)
class BNMode:
    """One way of normalising: frozen statistics (``batch=False``) or batch statistics."""

    spec: str  # canonical: clean | sigma:<s> | test-batch | test-batch:<N>
    stats_name: str  # the stored set used (frozen), or mixed in as the prior (batch, N > 0)
    batch: bool = False
    prior: float = 0.0  # Schneider et al.'s pseudo sample size N

    def key(self, batch_size: int) -> str:
        """Folder name; a batch mode's numbers depend on the batch size, so it is in the name."""
        if not self.batch:
            return self.stats_name
        return f"test-batch-b{batch_size}" + (f"-N{self.prior:g}" if self.prior else "")

    def definition(self, batch_size: int) -> str:
        if not self.batch:
            if self.stats_name == CLEAN:
                return "clean: the trained BN running statistics, frozen (eval mode)"
            return f"{self.spec}: TBN statistics calibrated on Gaussian-noised held-out images at {self.stats_name}, frozen"
        if not self.prior:
            return (
                f"test-batch (batch size {batch_size}): each BN layer normalises with the per-channel mean and biased "
                "variance of the current batch (transductive, Schneider et al. 2020 / TENT 'norm')"
            )
        return (
            f"test-batch:{self.prior:g} (batch size {batch_size}): Schneider et al. 2020 prior mixing, statistics = "
            f"N/(N+n) clean + n/(N+n) batch with N={self.prior:g}, n={batch_size}"
        )


_MODE_HELP = "use clean, sigma:<s> (calibrated TBN statistics), test-batch or test-batch:<N> (prior mixing, N >= 0)"


def parse_bn_mode(text: str) -> BNMode:
    """``clean``, ``sigma:0.25``, ``test-batch``, ``test-batch:16``."""
    kind, sep, arg = text.strip().partition(":")
    try:
        if kind == CLEAN and not sep:
            return BNMode(CLEAN, CLEAN)
        if kind == "sigma" and arg:
            sigma = float(arg)
            if sigma > 0 and math.isfinite(sigma):
                return BNMode(f"sigma:{sigma:g}", bn_key(sigma))
        if kind == "test-batch":
            prior = float(arg) if sep else 0.0
            if prior >= 0 and math.isfinite(prior):
                return BNMode(f"test-batch:{prior:g}" if prior else "test-batch", CLEAN, batch=True, prior=prior)
    except ValueError:
        pass
    raise TbnError(f"unknown BN mode {text!r}; {_MODE_HELP}")


def parse_bn_modes(texts: Sequence[str]) -> tuple[BNMode, ...]:
    if not texts:
        raise TbnError(f"no BN mode given (--bn); {_MODE_HELP}")
    return tuple(dict.fromkeys(parse_bn_mode(t) for t in texts))


def _moments(bn: nn.Module, x: torch.Tensor, prior: float, per_sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and variance a batch mode normalises ``x`` with: (C,), or (N, C) per sample.

    Batch statistics as BN computes them in training mode (biased variance), mixed with the
    layer's running statistics (the clean set, installed by ``bn_mode``) when ``prior`` > 0.
    """
    dims = tuple(range(2, x.dim())) if per_sample else (0, *range(2, x.dim()))
    mean, var = x.mean(dims), x.var(dims, unbiased=False)
    if prior:
        w = prior / (prior + (1 if per_sample else x.shape[0]))
        mean = w * bn.running_mean + (1 - w) * mean
        var = w * bn.running_var + (1 - w) * var
    return mean, var


@contextlib.contextmanager
def _custom_batch_norm(model: nn.Module, prior: float, per_sample: bool) -> Iterator[nn.Module]:
    """BN from ``_moments`` (differentiable through them), for what train-mode BN cannot do:
    prior mixing, and every image as its own batch of one in a single vectorised pass."""
    layers = [bn for _, bn in bn_layers(model)]

    def make_forward(bn: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            mean, var = _moments(bn, x, prior, per_sample)
            shape = (*mean.shape, *([1] * (x.dim() - 2))) if per_sample else (1, -1, *([1] * (x.dim() - 2)))
            out = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + bn.eps)
            if bn.affine:
                out = out * bn.weight.view(1, -1, *([1] * (x.dim() - 2))) + bn.bias.view(1, -1, *([1] * (x.dim() - 2)))
            return out

        return forward

    try:
        for bn in layers:
            bn.forward = make_forward(bn)  # an instance attribute shadows the class's forward
        yield model
    finally:
        for bn in layers:
            bn.__dict__.pop("forward", None)


@contextlib.contextmanager
def bn_mode(model: nn.Module, mode: BNMode, stats: BNStats, *, per_sample: bool = False) -> Iterator[nn.Module]:
    """The model in eval mode normalising as ``mode`` says; modes and statistics restored afterwards.

    ``stats``: the set named by ``mode.stats_name``. ``per_sample`` (batch modes only) makes
    every image its own batch of one.
    """
    with eval_mode(model), use_bn_stats(model, stats):
        if not mode.batch:
            yield model
        elif mode.prior or per_sample:
            with _custom_batch_norm(model, mode.prior, per_sample):
                yield model
        else:
            with batch_statistics(model):
                yield model


@torch.no_grad()
def used_bn_stats(model: nn.Module, x: torch.Tensor, mode: BNMode, stats: BNStats) -> BNStats:
    """The statistics a batch mode normalises the batch ``x`` with, per BN layer (as a frozen set:
    installed in eval mode they reproduce the batch mode's outputs on ``x``)."""
    recorded: BNStats = {}
    hooks = []

    def make_hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(bn: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            mean, var = _moments(bn, inputs[0], mode.prior, False)
            recorded[name] = {"running_mean": mean.detach().cpu(), "running_var": var.detach().cpu()}

        return hook

    with bn_mode(model, mode, stats):
        try:
            hooks = [bn.register_forward_pre_hook(make_hook(name)) for name, bn in bn_layers(model)]
            model(x)
        finally:
            for h in hooks:
                h.remove()
    return recorded
