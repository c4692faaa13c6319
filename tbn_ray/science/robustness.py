"""Accuracy of one model under a BN mode: on (corrupted) images, and under attack.

Under attack a batch mode's statistics belong to the batch, which the attacker controls, so
the ``adaptive`` variant attacks the whole batch through its statistics (docs/method.md, rule 3);
the other variants (``ATTACK_VARIANTS``) say what the number means when the attacker controls
less (one image alone, one image among fixed clean images) and what a non-adaptive attack
would overstate.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tbn_ray.config import AttackConfig
from tbn_ray.science import data as data_mod
from tbn_ray.science.attacks import apgd_ce, pgd
from tbn_ray.science.autoattack import NAME as AUTOATTACK
from tbn_ray.science.autoattack import autoattack, check_frozen_bn
from tbn_ray.science.bn_modes import BNMode, bn_mode, used_bn_stats
from tbn_ray.science.tbn import CLEAN, BNStats


@torch.no_grad()
def correct_predictions(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    mode: BNMode,
    stats: BNStats,
    *,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """Per-image correctness (bool) of uint8 NHWC ``images`` in consecutive batches of ``batch_size``
    (in a batch mode these are the test batches; the last one may be smaller). Batches are
    copied: arrays from Ray's object store are read-only."""
    out = np.zeros(len(images), dtype=bool)
    with bn_mode(model, mode, stats):
        for i in range(0, len(images), batch_size):
            xb = data_mod.to_float(np.array(images[i : i + batch_size]), device)
            yb = torch.tensor(labels[i : i + batch_size], dtype=torch.int64, device=device)
            out[i : i + batch_size] = (model(xb).argmax(1) == yb).cpu().numpy()
    return out


#: What each adversarial result of a batch mode means (frozen modes have one: ``standard``).
ATTACK_VARIANTS: dict[str, str] = {
    "standard": "frozen statistics: the attack and the evaluation use the same fixed model (eval mode)",
    "adaptive": (
        "the attacker perturbs every image of a test batch (each within eps) and the attack's gradients "
        "go through the batch statistics; the perturbed batch is classified with its own statistics"
    ),
    "batch-1": (
        "batch size 1: each image is its own test batch, so test-batch BN degenerates to instance "
        "normalisation (every channel normalised by that image's own spatial mean and variance, then "
        "BN's gamma/beta; with test-batch:N, mixed with the clean statistics at weight N/(N+1)); "
        "attacked adaptively through those statistics"
    ),
    "fixed-clean-batch": (
        "the statistics are those the batch mode computes on the CLEAN test batch (the unperturbed "
        "images of the same batch), then frozen; each adversarial image is normalised with them, so "
        "the attacker controls only its own image and not the statistics"
    ),
    "non-adaptive": (
        "NOT a robustness claim, shown for contrast: adversarial examples computed against the frozen "
        "clean statistics, then classified with the batch mode's statistics of the perturbed batch"
    ),
}
#: Variants whose prediction for an image depends on the other perturbed images of its batch.
COUPLED_VARIANTS = frozenset({"adaptive", "non-adaptive"})


def run_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    name: str,
    threat: AttackConfig,
    *,
    seed: int,
    coupled: bool,
) -> torch.Tensor:
    """``pgd``, ``apgd-ce`` or ``autoattack`` on the model as it is (its BN mode decides what is attacked).

    ``coupled``: the model's prediction of one image depends on the batch, so restarts and
    iterates are compared and kept as whole batches, never spliced per image (AutoAttack
    cannot do that and is refused). Random starts come from a CPU generator seeded with
    ``seed``: the same starts on every device and mode; AutoAttack is seeded with ``seed``.
    """
    if name == AUTOATTACK:
        check_frozen_bn(coupled, "with batch statistics")
        return autoattack(model, x, y, threat, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    if name == "apgd-ce":
        return apgd_ce(model, x, y, threat, generator=generator, per_example=not coupled)
    if not coupled or threat.restarts == 1 or not threat.random_start:
        return pgd(model, x, y, threat, generator=generator)
    best, best_key = x, (-1, -math.inf)
    for _ in range(threat.restarts):
        cand = pgd(model, x, y, threat.model_copy(update={"restarts": 1}), generator=generator)
        with torch.no_grad():
            logits = model(cand).float()
            key = (int((logits.argmax(1) != y).sum()), float(F.cross_entropy(logits, y, reduction="sum")))
        if key > best_key:
            best, best_key = cand, key
    return best


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return (model(x).argmax(1) == y).cpu().numpy()


def attack_variants(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    mode: BNMode,
    stats: BNStats,
    clean_stats: BNStats,
    name: str,
    threat: AttackConfig,
    *,
    seed: int,
) -> dict[str, dict[str, np.ndarray]]:
    """Clean and adversarial correctness of one batch ``x`` (float NCHW in [0,1]) per variant.

    Frozen modes: ``standard``. Batch modes (not for ``autoattack``, refused): ``adaptive``, ``batch-1``, ``fixed-clean-batch``,
    ``non-adaptive`` (``ATTACK_VARIANTS``). Every variant draws the same random starts (``seed``).
    """

    def attacked(
        per_sample: bool = False, frozen: BNStats | None = None, coupled: bool = False
    ) -> dict[str, np.ndarray]:
        m, s = (BNMode("fixed", "fixed"), frozen) if frozen is not None else (mode, stats)
        with bn_mode(model, m, s, per_sample=per_sample):
            clean = _correct(model, x, y)
            x_adv = run_attack(model, x, y, name, threat, seed=seed, coupled=coupled)
            return {"clean": clean, "adversarial": _correct(model, x_adv, y)}

    if not mode.batch:
        return {"standard": attacked()}
    if name == AUTOATTACK:
        check_frozen_bn(True, mode.spec)
    out = {
        "adaptive": attacked(coupled=True),
        "batch-1": attacked(per_sample=True),
        "fixed-clean-batch": attacked(frozen=used_bn_stats(model, x, mode, stats)),
    }
    with bn_mode(model, BNMode(CLEAN, CLEAN), clean_stats):
        x_transfer = run_attack(model, x, y, name, threat, seed=seed, coupled=False)
    with bn_mode(model, mode, stats):
        out["non-adaptive"] = {"clean": out["adaptive"]["clean"], "adversarial": _correct(model, x_transfer, y)}
    return out
