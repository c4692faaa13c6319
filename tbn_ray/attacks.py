"""Projected gradient descent (Madry et al. 2018) in l2 or l-inf, in [0,1] pixel space.

The attack is a pure function of (model, x, y, generator): it never switches the model
between train and eval mode (the caller decides which function is attacked: a BN model in
training mode normalises with batch statistics) and never writes parameter gradients
(gradients are taken with respect to the perturbation only), so it can run in the middle
of a training step or inside a DistributedDataParallel worker without side effects other
than those of the model's own forward passes (a BN layer in training mode updates its
running statistics on every forward: a caller that does not want that saves and restores
them, as ``training.train_epoch`` does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import AttackConfig

#: Per-example loss from (logits, labels); the attack ascends it.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _per_example_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _l2_norms(v: torch.Tensor) -> torch.Tensor:
    """Per-example l2 norms, shaped to broadcast against ``v``."""
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


def _random_start(x: torch.Tensor, attack: AttackConfig, generator: torch.Generator | None) -> torch.Tensor:
    """A point drawn uniformly from the eps ball around 0 (same shape and layout as ``x``).

    l-inf: uniform in the box. l2: a uniform direction (normalised Gaussian) at radius
    eps * U^(1/d), the radius law of the uniform distribution on a d-dimensional ball.
    Drawn on the generator's device, so a seeded generator gives the same start anywhere.
    """
    draw = dict(generator=generator, device=generator.device if generator is not None else x.device)
    if attack.norm == "linf":
        noise = (2 * torch.rand(x.shape, **draw) - 1) * attack.eps
    else:
        direction = torch.randn(x.shape, **draw)
        direction = direction / _l2_norms(direction).clamp_min(1e-12)
        d = x[0].numel()
        radius = attack.eps * torch.rand(len(x), **draw).pow(1.0 / d)
        noise = direction * radius.view(-1, *([1] * (x.dim() - 1)))
    delta = torch.zeros_like(x)  # keeps x's memory format (channels_last)
    delta.copy_(noise)
    return delta


def _project(delta: torch.Tensor, attack: AttackConfig) -> torch.Tensor:
    if attack.norm == "linf":
        return delta.clamp(-attack.eps, attack.eps)
    return delta * (attack.eps / _l2_norms(delta).clamp_min(1e-12)).clamp(max=1.0)


def _ascent_direction(grad: torch.Tensor, attack: AttackConfig) -> torch.Tensor:
    """Steepest ascent for the norm: sign (l-inf) or the per-example unit gradient (l2)."""
    if attack.norm == "linf":
        return grad.sign()
    return grad / _l2_norms(grad).clamp_min(1e-12)


def _one_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackConfig, generator: torch.Generator | None, loss_fn: LossFn) -> torch.Tensor:
    delta = _random_start(x, attack, generator) if attack.random_start else torch.zeros_like(x)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(attack.steps):
        delta.requires_grad_(True)
        loss = loss_fn(model(x + delta).float(), y).sum()  # a sum: per-example gradients unscaled by batch size
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = _project(delta + attack.alpha * _ascent_direction(grad, attack), attack)
            # clipping to the image box after the projection only shrinks each |delta_i|,
            # so the result stays inside the eps ball
            delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: AttackConfig,
    *,
    generator: torch.Generator | None = None,
    loss_fn: LossFn | None = None,
) -> torch.Tensor:
    """Adversarial examples for ``x`` (float in [0,1]) within ``attack.eps`` in ``attack.norm``.

    ``attack.steps`` steps of size ``attack.alpha``, each followed by projection onto the
    eps ball and clipping to [0,1]. With ``restarts`` > 1 (and a random start; without one
    every restart is the same), each example keeps the restart that misclassifies it, or
    among equals the one with the highest loss. ``loss_fn(logits, y)`` returns per-example
    losses (default cross-entropy). Runs under the caller's autocast; returns a detached
    tensor with x's dtype, device and memory format.
    """
    loss_fn = loss_fn or _per_example_ce
    runs = attack.restarts if attack.random_start else 1
    with torch.enable_grad():
        best = _one_run(model, x, y, attack, generator, loss_fn)
        if runs == 1:
            return best
        with torch.no_grad():
            logits = model(best).float()
            best_wrong, best_loss = logits.argmax(1) != y, loss_fn(logits, y)
        for _ in range(runs - 1):
            cand = _one_run(model, x, y, attack, generator, loss_fn)
            with torch.no_grad():
                logits = model(cand).float()
                wrong, loss = logits.argmax(1) != y, loss_fn(logits, y)
                better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
                mask = better.view(-1, *([1] * (x.dim() - 1)))
                best = torch.where(mask, cand, best)
                best_wrong, best_loss = torch.where(better, wrong, best_wrong), torch.where(better, loss, best_loss)
    return best
