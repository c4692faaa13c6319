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

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tbn_ray.config import AttackConfig

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


def _one_run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: AttackConfig,
    generator: torch.Generator | None,
    loss_fn: LossFn,
) -> torch.Tensor:
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


# --- APGD-CE (Croce & Hein 2020) ----------------------------------------------------------

#: Croce & Hein's constants: momentum weight alpha, and the fraction rho of loss-increasing
#: steps below which a checkpoint halves the step size.
APGD_MOMENTUM = 0.75
APGD_RHO = 0.75


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations w_j at which APGD may halve its step: w_j = ceil(p_j * steps) with
    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) (checks get denser)."""
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(q * steps - 1e-9) for q in p[1:]} & set(range(1, steps)))


class _Best:
    """The strongest point seen per example (misclassified first, then higher loss), or, with
    ``per_example=False``, the strongest whole batch (fewest correct, then higher total loss).

    The batch rule is for models whose prediction of one image depends on the others (BN with
    batch statistics): a batch spliced from different iterates would be a new, unevaluated batch.
    """

    def __init__(self, per_example: bool) -> None:
        self.per_example = per_example
        self.x: torch.Tensor | None = None
        self.wrong = self.loss = torch.empty(0)

    def offer(self, x: torch.Tensor, wrong: torch.Tensor, loss: torch.Tensor) -> None:
        if self.x is None:
            self.x, self.wrong, self.loss = x, wrong, loss
            return
        if not self.per_example:
            key = (int(wrong.sum()), float(loss.sum()))
            if key > (int(self.wrong.sum()), float(self.loss.sum())):
                self.x, self.wrong, self.loss = x, wrong, loss
            return
        better = (wrong & ~self.wrong) | ((wrong == self.wrong) & (loss > self.loss))
        self.x = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x, self.x)
        self.wrong, self.loss = torch.where(better, wrong, self.wrong), torch.where(better, loss, self.loss)


def _apgd_run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: AttackConfig,
    generator: torch.Generator | None,
    loss_fn: LossFn,
    best: _Best,
) -> None:
    """One APGD run from a random start (Croce & Hein 2020, Algorithm 1), offering every iterate to ``best``."""
    view = (-1, *([1] * (x.dim() - 1)))

    def project(z: torch.Tensor) -> torch.Tensor:
        # eps ball, then the image box: exact for l-inf; for l2 the usual approximation of the
        # projection onto their intersection (clipping only shrinks |delta_i|: still in the ball)
        return (x + _project(z - x, attack)).clamp(0, 1)

    def evaluate(point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        point = point.detach().requires_grad_(True)
        logits = model(point).float()
        loss = loss_fn(logits, y)
        (grad,) = torch.autograd.grad(loss.sum(), point)
        best.offer(point.detach(), (logits.argmax(1) != y).detach(), loss.detach())
        return point.detach(), loss.detach(), grad.detach()

    x0, f0, g0 = evaluate((x + _random_start(x, attack, generator)).clamp(0, 1))
    eta = torch.full((len(x),), 2.0 * attack.eps, device=x.device)  # eta^(0) = 2 eps
    x1, f1, g1 = evaluate(project(x0 + eta.view(view) * _ascent_direction(g0, attack)))
    up = f1 > f0
    x_max, f_max, g_max = torch.where(up.view(view), x1, x0), torch.maximum(f0, f1), torch.where(up.view(view), g1, g0)
    x_prev, x_cur, f_cur, g_cur = x0, x1, f1, g1
    checkpoints = set(apgd_checkpoints(attack.steps))
    increases, last_w = up.long(), 0  # loss-increasing steps since the last checkpoint
    halved_last = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    f_max_last = f0.clone()  # f_max at the last checkpoint (w_0 = 0)
    for k in range(1, attack.steps):
        z = project(x_cur + eta.view(view) * _ascent_direction(g_cur, attack))
        x_next, f_next, g_next = evaluate(
            project(x_cur + APGD_MOMENTUM * (z - x_cur) + (1 - APGD_MOMENTUM) * (x_cur - x_prev))
        )
        up = f_next > f_max
        x_max, f_max, g_max = (
            torch.where(up.view(view), x_next, x_max),
            torch.where(up, f_next, f_max),
            torch.where(up.view(view), g_next, g_max),
        )
        if k in checkpoints:
            # condition 1: too few loss-increasing steps; condition 2: the step was not halved at
            # the previous checkpoint and the best loss has not improved since
            halve = (increases < APGD_RHO * (k - last_w)) | (~halved_last & (f_max <= f_max_last))
            eta = torch.where(halve, eta / 2, eta)
            # halving restarts from the best point, without momentum
            x_next, g_next, x_cur = (
                torch.where(halve.view(view), a, b) for a, b in ((x_max, x_next), (g_max, g_next), (x_max, x_cur))
            )
            f_next = torch.where(halve, f_max, f_next)
            halved_last, f_max_last, increases, last_w = halve, f_max.clone(), torch.zeros_like(increases), k
        increases += f_next > f_cur
        x_prev, x_cur, f_cur, g_cur = x_cur, x_next, f_next, g_next


def apgd_ce(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: AttackConfig,
    *,
    generator: torch.Generator | None = None,
    per_example: bool = True,
    loss_fn: LossFn | None = None,
) -> torch.Tensor:
    """APGD-CE (Croce & Hein 2020): step-size-free PGD with momentum 0.75 and step halving at checkpoints.

    ``attack.steps`` iterations (each one gradient, like a PGD step), ``attack.restarts``
    random starts, the initial step 2 * eps (``attack.step_size`` is not used: the schedule
    is APGD's own). Returns, per example, the strongest iterate of all runs (misclassified
    first, then the highest loss); with ``per_example=False`` the strongest whole batch
    iterate instead (for batch-statistics BN, see ``_Best``). Like ``pgd``, never switches
    the model's modes and never writes parameter gradients; the result is in the eps ball
    and in [0,1].
    """
    loss_fn = loss_fn or _per_example_ce
    best = _Best(per_example)
    with torch.enable_grad():
        for _ in range(attack.restarts):
            _apgd_run(model, x, y, attack, generator, loss_fn, best)
    assert best.x is not None
    return best.x
