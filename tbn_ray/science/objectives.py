"""The training losses of one SGD step, one per ``train.objective`` (docs/method.md section 6).

- ``adversarial``: PGD adversarial training (Madry et al.) on the config's threat model.
- ``gaussian``: Gaussian data augmentation (Cohen et al. 2019), the baseline of every
  randomized-smoothing paper: one fresh N(0, sigma^2 I) draw per image and step, added in [0, 1]
  pixel space after the crop and flip, not clipped, so the network sees the very inputs the
  smoothed classifier will feed it.
- ``consistency``: Jeong & Shin (NeurIPS 2020): m noisy copies of each image in one batch; the
  cross-entropy averaged over the copies, plus lambda x the mean KL divergence of each copy's
  prediction from the copies' mean prediction, plus eta x the entropy of that mean.

Every draw comes from the step's seeded generator, so an epoch is reproducible and a resumed
epoch draws what it would have.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tbn_ray.config import TrainConfig
from tbn_ray.science.attacks import pgd

#: A step's loss and the logits its accuracy is counted on (one row per training image).
StepLoss = Callable[
    [nn.Module, nn.Module, torch.Tensor, torch.Tensor, TrainConfig, "torch.Generator | None"],
    tuple[torch.Tensor, torch.Tensor],
]


def gaussian_noise(x: torch.Tensor, sigma: float, generator: torch.Generator | None) -> torch.Tensor:
    """``x`` plus N(0, sigma^2 I) in float32, drawn on the generator's device."""
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device)
    return x + sigma * noise


def adversarial_loss(model, target, x, y, cfg, generator):
    """Cross-entropy on PGD examples, made on ``target`` (the unwrapped module) with its BN
    running statistics left untouched (``training.frozen_bn_stats``)."""
    from tbn_ray.science.training import frozen_bn_stats

    with frozen_bn_stats(target):
        x_adv = pgd(target, x, y, cfg.attack, generator=generator)
    logits = model(x_adv)
    return F.cross_entropy(logits.float(), y), logits


def gaussian_loss(model, target, x, y, cfg, generator):
    """Cross-entropy on one noisy copy of each image."""
    logits = model(gaussian_noise(x, cfg.noise.sigma, generator))
    return F.cross_entropy(logits.float(), y), logits


def consistency_terms(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For logits of shape (m, batch, classes): the cross-entropy averaged over the m copies, the
    mean over copies of KL(mean prediction || copy's prediction), and the entropy of the mean
    prediction, each averaged over the batch."""
    m = logits.shape[0]
    log_p = F.log_softmax(logits.float(), dim=-1)
    xent = F.cross_entropy(log_p.reshape(-1, log_p.shape[-1]), y.repeat(m), reduction="mean")
    mean_p = log_p.exp().mean(0)
    log_mean = mean_p.clamp_min(1e-20).log()
    kl = (mean_p.unsqueeze(0) * (log_mean.unsqueeze(0) - log_p)).sum(-1).mean()
    entropy = -(mean_p * log_mean).sum(-1).mean()
    return xent, kl, entropy


def consistency_loss(model, target, x, y, cfg, generator):
    """m noisy copies in one forward pass (BatchNorm sees them together, as in the authors' code);
    accuracy is counted on the first copy."""
    m, n = cfg.noise.copies, len(x)
    noisy = gaussian_noise(x.repeat(m, 1, 1, 1), cfg.noise.sigma, generator)
    logits = model(noisy).reshape(m, n, -1)
    xent, kl, entropy = consistency_terms(logits, y)
    loss = xent + cfg.noise.consistency_weight * kl + cfg.noise.entropy_weight * entropy
    return loss, logits[0]


OBJECTIVES: dict[str, StepLoss] = {
    "adversarial": adversarial_loss,
    "gaussian": gaussian_loss,
    "consistency": consistency_loss,
}


def step_loss(
    model: nn.Module,
    target: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of ``cfg.objective`` on one batch of augmented images in [0, 1], and its logits."""
    return OBJECTIVES[cfg.objective](model, target, x, y, cfg, generator)
