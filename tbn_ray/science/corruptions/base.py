"""What every corruption shares: its conventions and the two resamplings several families use.

A corruption takes uint8 images (N,32,32,3), one severity's parameters and one generator
per image, and returns values in [0, 255] (float, truncated to uint8 by ``corrupt``).

Shared resamplings: the original's ``clipped_zoom`` (zoom_blur, snow) and ImageMagick's
``MotionBlurImage`` (motion_blur, snow). Where the latter differs from the original on
purpose: the original calls ImageMagick (via Wand); here it is a numpy kernel built the way
ImageMagick builds it: ``2*ceil(radius)+1`` taps with weights ``exp(-i^2 / (2 sigma^2))``
(normalised), tap ``i`` sampling the pixel at ``(round(i cos a), round(i sin a))`` (rounded
as ``ceil(v - 0.5)``) from the output pixel, with edge-replicated borders, and the result
rounded to 8 bits as ImageMagick's PNG output is. Not reproduced: ImageMagick's 16-bit
quantum arithmetic (differences of at most one grey level).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

#: CIFAR-10 images are SIZE x SIZE pixels.
SIZE = 32
Rngs = Sequence[np.random.Generator]


def per_image(rngs: Rngs, draw: Callable[[np.random.Generator], Any]) -> np.ndarray:
    """Stack one draw per image; each image's randomness comes from its own generator only."""
    return np.stack([np.asarray(draw(g)) for g in rngs])


def to_unit(x: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    return x.astype(dtype) / 255.0


class _Taps(NamedTuple):
    """A 1-D linear resampling: output o = (1 - frac) * in[lo] + frac * in[hi]."""

    lo: np.ndarray
    hi: np.ndarray
    frac: np.ndarray


@functools.lru_cache(maxsize=64)
def _clipped_zoom_taps(zoom: float, size: int = SIZE) -> _Taps | None:
    """The original ``clipped_zoom``: centre-crop ceil(size/zoom) pixels, enlarge with
    ``scipy.ndimage.zoom(order=1)`` (output length round(crop*zoom), corner-aligned grid),
    keep the central ``size``. None when that is the identity (zoom factors near 1)."""
    crop = int(np.ceil(size / zoom))
    top = (size - crop) // 2
    out_len = int(round(crop * zoom))
    if out_len == crop:
        return None
    trim = (out_len - size) // 2
    src = np.arange(trim, trim + size) * ((crop - 1) / (out_len - 1))
    lo = np.minimum(np.floor(src).astype(np.int64), crop - 1)
    return _Taps(top + lo, top + np.minimum(lo + 1, crop - 1), src - lo)


def clipped_zoom(x: np.ndarray, zoom: float) -> np.ndarray:
    """Apply the clipped zoom to axes 1 and 2 of (N,H,W,...) with elementwise ops only
    (a BLAS product could round differently for different batch sizes)."""
    taps = _clipped_zoom_taps(float(zoom), x.shape[1])
    if taps is None:
        return x
    f = taps.frac.astype(x.dtype)
    fr = f.reshape((1, -1) + (1,) * (x.ndim - 2))
    x = x[:, taps.lo] * (1 - fr) + x[:, taps.hi] * fr
    fc = f.reshape((1, 1, -1) + (1,) * (x.ndim - 3))
    return x[:, :, taps.lo] * (1 - fc) + x[:, :, taps.hi] * fc


def motion_blur(img: np.ndarray, radius: float, sigma: float, angles_deg: np.ndarray) -> np.ndarray:
    """ImageMagick-style one-sided motion blur of (N,H,W,C) values in 0..255, one angle per
    image, edge-replicated borders; returns values rounded to integers (ImageMagick writes
    8-bit PNG)."""
    n, h, w, _ = img.shape
    width = int(2 * np.ceil(radius) + 1)
    i = np.arange(width)
    kernel = np.exp(-(i**2) / (2.0 * sigma**2))
    kernel /= kernel.sum()
    theta = np.deg2rad(angles_deg)[:, None]
    dx = np.ceil(i * np.cos(theta) - 0.5).astype(np.int64)  # (N, taps)
    dy = np.ceil(i * np.sin(theta) - 0.5).astype(np.int64)
    rows, cols, imgs = np.arange(h), np.arange(w), np.arange(n)[:, None, None]
    out = np.zeros(img.shape, dtype=np.float64)
    for t in range(width):
        r = np.clip(rows[None, :] + dy[:, t, None], 0, h - 1)[:, :, None]
        c = np.clip(cols[None, :] + dx[:, t, None], 0, w - 1)[:, None, :]
        out += kernel[t] * img[imgs, r, c]
    return np.rint(out)
