"""The paper's central effect, measured: a base classifier's accuracy under Gaussian noise with
one statistics set against another (clean BN vs TBN) on the very same noisy images."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from tbn_ray.science import data as data_mod
from tbn_ray.science.tbn import BNStats, use_bn_stats


@torch.no_grad()
def accuracy_under_noise(
    model: nn.Module,
    sets: Mapping[float, Mapping[str, BNStats]],
    images: np.ndarray,
    labels: np.ndarray,
    *,
    draws: int,
    seed: int,
    batch_size: int,
    device: torch.device,
) -> list[dict[str, Any]]:
    """Per sigma, ``accuracy_<label>`` for each named statistics set in ``sets[sigma]``: ``draws``
    noisy copies of every image, the noise drawn from one generator seeded per set so every set
    sees the same noisy images. The model (in eval mode) keeps the statistics it had."""
    x = data_mod.to_float(images)
    y = torch.as_tensor(labels, dtype=torch.int64)
    model.eval()
    rows = []
    for sigma, named in sets.items():
        row: dict[str, Any] = {"sigma": float(sigma), "images": len(x), "draws": draws}
        for label, stats in named.items():
            with use_bn_stats(model, stats):
                gen = torch.Generator().manual_seed(seed)  # the same noise for every statistics set
                correct = 0
                for _ in range(draws):
                    for i in range(0, len(x), batch_size):
                        xb = x[i : i + batch_size]
                        noisy = (xb + sigma * torch.randn(xb.shape, generator=gen)).to(device)
                        correct += int((model(noisy).argmax(1).cpu() == y[i : i + batch_size]).sum())
            row[f"accuracy_{label}"] = correct / (draws * len(x))
        rows.append(row)
    return rows
