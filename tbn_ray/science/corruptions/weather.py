"""The weather family: snow, frost, fog, brightness.

Where this differs from the original code on purpose:

- snow: ImageMagick's ``MotionBlurImage`` of the snow layer re-implemented in numpy
  (``base.motion_blur`` says how, and what is not reproduced).
- frost: the textures are the ``frost*.png/jpg`` files shipped in the PyPI package
  ``imagecorruptions`` (read with PIL, the package is never imported). OpenCV's
  ``resize(fx=0.2)`` with bilinear interpolation samples exactly source pixel ``5k+2``, so
  the x0.2 resize is that decimation. As in the original, only the first five of the six
  textures are ever drawn (``randint(5)``).
- brightness: ``rgb2hsv``, ``V += c``, ``hsv2rgb`` equals scaling RGB by ``V'/V`` (HSV to
  RGB is linear in V for fixed H and S), which is what is computed.
- A quirk of the original is kept because it defines the released data: the fog fractal's
  noise scales with ``wibble**2``.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from tbn_ray.errors import TbnError
from tbn_ray.science.corruptions.base import SIZE, Rngs, clipped_zoom, motion_blur, per_image, to_unit

FROST_INSTALL = "pip install --no-deps imagecorruptions==1.1.2"


def snow(x: np.ndarray, p: tuple[float, ...], rngs: Rngs) -> np.ndarray:
    loc, scale, zoom, thresh, blur_r, blur_sigma, mix = p
    draws = [(g.normal(loc, scale, size=(SIZE, SIZE)), g.uniform(-135, -45)) for g in rngs]
    layer = clipped_zoom(np.stack([d[0] for d in draws]), zoom)
    layer[layer < thresh] = 0
    layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8)[..., None].astype(np.float64)
    angles = np.array([d[1] for d in draws])
    flakes = (motion_blur(layer, blur_r, blur_sigma, angles) / 255.0).astype(np.float32)
    img = to_unit(x, np.float32)
    gray = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    img = mix * img + (1 - mix) * np.maximum(img, gray[..., None] * 1.5 + 0.5)
    return np.clip(img + flakes + flakes[:, ::-1, ::-1], 0, 1) * 255


@functools.lru_cache(maxsize=1)
def _frost_textures() -> tuple[np.ndarray, ...]:
    """The five frost textures the original draws from, shrunk x0.2 as OpenCV does it."""
    spec = importlib.util.find_spec("imagecorruptions")  # locates without importing it
    folder = Path(spec.submodule_search_locations[0]) / "frost" if spec and spec.submodule_search_locations else None
    names = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
    if folder is None or not all((folder / f).is_file() for f in names):
        raise TbnError(f"frost needs the textures of the PyPI package imagecorruptions: run `{FROST_INSTALL}`")
    textures = []
    for name in names:
        with Image.open(folder / name) as im:
            full = np.asarray(im.convert("RGB"))
        h, w = round(full.shape[0] * 0.2), round(full.shape[1] * 0.2)
        small = np.ascontiguousarray(full[2::5, 2::5][:h, :w])
        small.flags.writeable = False
        textures.append(small)
    return tuple(textures)


def frost(x: np.ndarray, p: tuple[float, float], rngs: Rngs) -> np.ndarray:
    textures = _frost_textures()
    crops = []
    for g in rngs:
        tex = textures[g.integers(len(textures))]
        r = g.integers(0, tex.shape[0] - SIZE)
        c = g.integers(0, tex.shape[1] - SIZE)
        crops.append(tex[r : r + SIZE, c : c + SIZE])
    return np.clip(p[0] * x.astype(np.float64) + p[1] * np.stack(crops), 0, 255)


def _plasma_fractal(uniforms: np.ndarray, decay: float, size: int = SIZE) -> np.ndarray:
    """Diamond-square height maps (N,size,size) in [0,1]; ``uniforms`` (N, 3*(1+4+...))
    are U(-1,1) draws consumed in the original's order, scaled by wibble**2."""
    n = uniforms.shape[0]
    m = np.zeros((n, size, size))
    step, wibble, used = size, 100.0, 0

    def wibbled(mean4: np.ndarray) -> np.ndarray:
        nonlocal used
        k = mean4[0].size
        noise = uniforms[:, used : used + k].reshape(mean4.shape)
        used += k
        return mean4 / 4 + wibble * wibble * noise

    while step >= 2:
        half = step // 2
        corners = m[:, ::step, ::step]
        squares = corners + np.roll(corners, -1, axis=1)
        squares = squares + np.roll(squares, -1, axis=2)
        m[:, half::step, half::step] = wibbled(squares)
        centres = m[:, half::step, half::step]
        left = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        top = centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        m[:, ::step, half::step] = wibbled(left)
        m[:, half::step, ::step] = wibbled(top)
        step //= 2
        wibble /= decay
    m -= m.min(axis=(1, 2), keepdims=True)
    return m / m.max(axis=(1, 2), keepdims=True)


def fog(x: np.ndarray, p: tuple[float, float], rngs: Rngs) -> np.ndarray:
    amount, decay = p
    n_draws = 3 * sum((SIZE // 2**k) ** 2 for k in range(5))  # 3 fills per level, 5 levels
    fractal = _plasma_fractal(per_image(rngs, lambda g: g.uniform(-1, 1, n_draws)), decay)
    img = to_unit(x)
    max_val = img.max(axis=(1, 2, 3), keepdims=True)
    img = img + amount * fractal[..., None]
    return np.clip(img * max_val / (max_val + amount), 0, 1) * 255


def brightness(x: np.ndarray, c: float, rngs: Rngs) -> np.ndarray:
    img = to_unit(x)
    v = img.max(axis=3, keepdims=True)
    v_new = np.minimum(v + c, 1.0)
    out = np.where(v > 0, img * (v_new / np.where(v > 0, v, 1.0)), v_new)
    return np.clip(out, 0, 1) * 255
