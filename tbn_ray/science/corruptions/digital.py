"""The digital family: contrast, elastic_transform, pixelate, jpeg_compression.

Where this differs from the original code on purpose:

- elastic_transform: OpenCV's ``warpAffine`` is replaced by its definition (reflect-101
  border, bilinear sampling without OpenCV's 1/32-pixel coordinate quantisation).
- A quirk of the original is kept because it defines the released data: elastic_transform's
  parameters make severity 1 a pure random affine warp.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from tbn_ray.science.corruptions.base import SIZE, Rngs, to_unit


def contrast(x: np.ndarray, c: float, rngs: Rngs) -> np.ndarray:
    img = to_unit(x)
    # Per-image channel means from contiguous rows, so the sum order never depends on N.
    rows = np.ascontiguousarray(img.transpose(0, 3, 1, 2)).reshape(x.shape[0], 3, -1)
    means = (rows.sum(axis=-1) / rows.shape[-1])[:, None, None, :]
    return np.clip((img - means) * c + means, 0, 1) * 255


def _reflect_index(i: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Map out-of-range indices into 0..n-1: ``mirror`` is reflect-101 (OpenCV's default
    border, scipy's "mirror"), ``reflect`` repeats the edge pixel (scipy's "reflect")."""
    if mode == "mirror":
        period = 2 * (n - 1)
        i = np.mod(i, period)
        return np.where(i > n - 1, period - i, i)
    period = 2 * n
    i = np.mod(i, period)
    return np.where(i >= n, period - 1 - i, i)


def _bilinear(img: np.ndarray, ys: np.ndarray, xs: np.ndarray, mode: str) -> np.ndarray:
    """Sample ``img`` (N,H,W,C) at per-image float coordinates ``ys, xs`` (N,H,W)."""
    n, h, w, c = img.shape
    y0, x0 = np.floor(ys), np.floor(xs)
    fy, fx = (ys - y0)[..., None], (xs - x0)[..., None]
    y0, x0 = y0.astype(np.int64), x0.astype(np.int64)
    base = (np.arange(n) * (h * w)).reshape(n, 1, 1)
    rows = [base + _reflect_index(y0 + k, h, mode) * w for k in (0, 1)]
    cols = [_reflect_index(x0 + k, w, mode) for k in (0, 1)]
    flat = img.reshape(n * h * w, c)
    top = flat[rows[0] + cols[0]] * (1 - fx) + flat[rows[0] + cols[1]] * fx
    bottom = flat[rows[1] + cols[0]] * (1 - fx) + flat[rows[1] + cols[1]] * fx
    return (top * (1 - fy) + bottom * fy).astype(img.dtype)


_AFFINE_SRC = np.array([[26, 26, 1], [26, 6, 1], [6, 6, 1]], dtype=np.float64)  # (x, y, 1)


def elastic_transform(x: np.ndarray, p: tuple[float, float, float], rngs: Rngs) -> np.ndarray:
    """Random affine warp of three control points (reflect-101 border), then a smoothed
    random displacement field (alpha, sigma in px) sampled bilinearly (reflect border)."""
    alpha, sigma, affine = p
    draws = [
        (
            g.uniform(-affine, affine, size=(3, 2)).astype(np.float32),
            g.uniform(-1, 1, size=(SIZE, SIZE)),
            g.uniform(-1, 1, size=(SIZE, SIZE)),
        )
        for g in rngs
    ]
    dst = _AFFINE_SRC[None, :, :2] + np.stack([d[0] for d in draws])
    fwd = np.linalg.solve(_AFFINE_SRC, dst).transpose(0, 2, 1)  # (N,2,3): src (x,y,1) -> dst
    inv_lin = np.linalg.inv(fwd[:, :, :2])
    inv_t = -np.einsum("nij,nj->ni", inv_lin, fwd[:, :, 2])
    yy, xx = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    xs = inv_lin[:, 0, 0, None, None] * xx + inv_lin[:, 0, 1, None, None] * yy + inv_t[:, 0, None, None]
    ys = inv_lin[:, 1, 0, None, None] * xx + inv_lin[:, 1, 1, None, None] * yy + inv_t[:, 1, None, None]
    img = _bilinear(to_unit(x, np.float32), ys, xs, "mirror")

    def field(k: int) -> np.ndarray:
        u = np.stack([d[k] for d in draws])
        return (ndimage.gaussian_filter(u, (0, sigma, sigma), mode="reflect", truncate=3) * alpha).astype(np.float32)

    dx, dy = field(1), field(2)
    out = _bilinear(img, yy[None] + dy.astype(np.float64), xx[None] + dx.astype(np.float64), "reflect")
    return np.clip(out, 0, 1) * 255


def _pil_each(x: np.ndarray, fn: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(fn(Image.fromarray(img)).convert("RGB")) for img in x])


def pixelate(x: np.ndarray, scale: float, rngs: Rngs) -> np.ndarray:
    small = int(SIZE * scale)
    return _pil_each(
        x, lambda im: im.resize((small, small), Image.Resampling.BOX).resize((SIZE, SIZE), Image.Resampling.BOX)
    )


def jpeg_compression(x: np.ndarray, quality: int, rngs: Rngs) -> np.ndarray:
    def roundtrip(im: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        buf.seek(0)
        return Image.open(buf)

    return _pil_each(x, roundtrip)
