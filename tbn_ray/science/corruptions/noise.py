"""The noise family: gaussian_noise, shot_noise, impulse_noise (as in the original, on x/255)."""

from __future__ import annotations

import numpy as np

from tbn_ray.science.corruptions.base import Rngs, per_image, to_unit


def gaussian_noise(x: np.ndarray, sigma: float, rngs: Rngs) -> np.ndarray:
    noise = per_image(rngs, lambda g: g.normal(scale=sigma, size=x.shape[1:]))
    return np.clip(to_unit(x) + noise, 0, 1) * 255


def shot_noise(x: np.ndarray, lam: float, rngs: Rngs) -> np.ndarray:
    rate = to_unit(x) * lam
    counts = np.stack([g.poisson(r) for g, r in zip(rngs, rate, strict=True)])
    return np.clip(counts / lam, 0, 1) * 255


def impulse_noise(x: np.ndarray, amount: float, rngs: Rngs) -> np.ndarray:
    """skimage ``random_noise(mode='s&p')``: each value (per channel) flips with prob.
    ``amount``, to 1 or 0 with equal odds."""
    u = per_image(rngs, lambda g: g.random((2, *x.shape[1:])))
    flipped, salted = u[:, 0] < amount, u[:, 1] < 0.5
    out = to_unit(x)
    out[flipped & salted] = 1.0
    out[flipped & ~salted] = 0.0
    return out * 255
