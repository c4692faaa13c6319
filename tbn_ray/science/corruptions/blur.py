"""The blur family: defocus_blur, glass_blur, motion_blur, zoom_blur.

Where this differs from the original code on purpose:

- defocus_blur: OpenCV's ``GaussianBlur`` (of the disk kernel) and ``filter2D`` are replaced
  by their definitions (reflect-101 borders).
- motion_blur: ImageMagick's ``MotionBlurImage`` re-implemented in numpy (``base.motion_blur``
  says how, and what is not reproduced).
- Quirks of the original are kept because they define the released data: glass_blur's
  offsets are drawn from ``[-d, d)`` (``randint``'s open upper end, so pixels only move
  up/left), and zoom_blur's factor lists come from ``np.arange`` (severity 3 has 16 factors,
  not 17).
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

from tbn_ray.science.corruptions.base import SIZE, Rngs, clipped_zoom, motion_blur, per_image, to_unit


def _gaussian_hw(x: np.ndarray, sigma: float) -> np.ndarray:
    """skimage.filters.gaussian(multichannel=True) on (N,H,W,C): nearest border, 4 sigma."""
    return ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode="nearest", truncate=4.0)


@functools.lru_cache(maxsize=8)
def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The original ``disk``: a normalised aliased disk on a 17x17 grid, smoothed by a 3x3
    Gaussian (OpenCV ``GaussianBlur``), cropped to its non-zero support."""
    grid = np.arange(-8, 9)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float32)
    disk /= disk.sum()
    g = np.exp(-(np.arange(-1, 2) ** 2) / (2.0 * alias_blur**2))
    g /= g.sum()
    kernel = ndimage.correlate(disk, np.outer(g, g).astype(np.float32), mode="mirror")
    nz = np.nonzero(kernel)
    return kernel[nz[0].min() : nz[0].max() + 1, nz[1].min() : nz[1].max() + 1]


def defocus_blur(x: np.ndarray, p: tuple[float, float], rngs: Rngs) -> np.ndarray:
    kernel = _disk_kernel(*p).astype(np.float64)
    out = ndimage.correlate(to_unit(x), kernel[None, :, :, None], mode="mirror")
    return np.clip(out, 0, 1) * 255


def glass_blur(x: np.ndarray, p: tuple[float, int, int], rngs: Rngs) -> np.ndarray:
    """Blur, then the original's sequential local pixel swaps (bottom-right to top-left),
    run for all images at once, then blur again."""
    sigma, delta, iterations = p
    n = x.shape[0]
    y = (_gaussian_hw(to_unit(x), sigma) * 255).astype(np.uint8)
    span = range(SIZE - delta, delta, -1)
    shape = (iterations, len(span), len(span), 2)  # (dx, dy) per visited pixel
    offsets = per_image(rngs, lambda g: g.integers(-delta, delta, size=shape, dtype=np.int8))
    imgs = np.arange(n)
    for it in range(iterations):
        for a, h in enumerate(span):
            for b, w in enumerate(span):
                hp = h + offsets[:, it, a, b, 1]
                wp = w + offsets[:, it, a, b, 0]
                here = y[:, h, w].copy()
                y[:, h, w] = y[imgs, hp, wp]
                y[imgs, hp, wp] = here
    return np.clip(_gaussian_hw(to_unit(y), sigma), 0, 1) * 255


def motion_blur_corruption(x: np.ndarray, p: tuple[float, float], rngs: Rngs) -> np.ndarray:
    angles = per_image(rngs, lambda g: g.uniform(-45, 45))
    return np.clip(motion_blur(x.astype(np.float64), p[0], p[1], angles), 0, 255)


def zoom_blur(x: np.ndarray, zooms: np.ndarray, rngs: Rngs) -> np.ndarray:
    img = to_unit(x, np.float32)
    out = np.zeros_like(img)
    for z in zooms:
        out += clipped_zoom(img, z)
    return np.clip((img + out) / (len(zooms) + 1), 0, 1) * 255
