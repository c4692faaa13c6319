"""CIFAR-10-C (regenerated): the 15 standard corruptions at severities 1..5.

The released CIFAR-10-C cannot be downloaded on every machine, so it is rebuilt from the
test set with the CIFAR parameters of Hendrycks & Dietterich's ``make_cifar_c.py``
(Hendrycks & Dietterich, ICLR 2019; the table ``_SPECS`` below holds each one's parameters per severity). Each algorithm is re-implemented here in numpy/scipy/PIL and
vectorised over images; outputs end, as in the original, with ``np.uint8`` of a float in
[0, 255] (truncation, not rounding).

Randomness: every (seed, corruption, severity, test index) has its own generator
(``SeedSequence(seed, spawn_key=(corruption, severity, index))``), so any subset of the
test set gets exactly the pixels it gets inside the full set. The original set no seed,
so the result equals the release statistically, not bitwise: call it
"CIFAR-10-C (regenerated)".

The algorithms live by family, each module's docstring listing where it differs from
the original on purpose, next to the code it describes: ``noise`` (gaussian, shot, impulse),
``blur`` (defocus, glass, motion, zoom), ``weather`` (snow, frost, fog, brightness),
``digital`` (contrast, elastic_transform, pixelate, jpeg_compression); ``base`` holds their
conventions and the resamplings several share. This module is the registry: each
corruption's parameters per severity, and the public API.

The storage layer keeps a regenerated (or imported released) set, one array per (corruption,
severity), generated where it is first needed: ``store.cifar10c``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from tbn_ray.errors import TbnError
from tbn_ray.science.corruptions import blur, digital, noise, weather
from tbn_ray.science.corruptions.base import SIZE, Rngs
from tbn_ray.science.corruptions.weather import FROST_INSTALL

__all__ = [
    "CORRUPTIONS",
    "SEVERITIES",
    "RELEASED_EXTRA",
    "FROST_INSTALL",
    "corrupt",
    "generate",
    "parse_corruptions",
    "parse_severities",
    "released_layout",
    "load_released",
    "sample_grid",
]

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
#: In the released CIFAR-10-C but not regenerated here (not among the 15 standard ones).
RELEASED_EXTRA: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")

_RELEASED_ROWS = 5 * 10_000
_CHUNK = 500


class _Spec(NamedTuple):
    fn: Callable[[np.ndarray, Any, Rngs], np.ndarray]
    params: tuple[Any, ...]  # one entry per severity 1..5
    random: bool


_SPECS: dict[str, _Spec] = {
    "gaussian_noise": _Spec(noise.gaussian_noise, (0.04, 0.06, 0.08, 0.09, 0.10), True),
    "shot_noise": _Spec(noise.shot_noise, (500, 250, 100, 75, 50), True),
    "impulse_noise": _Spec(noise.impulse_noise, (0.01, 0.02, 0.03, 0.05, 0.07), True),
    "defocus_blur": _Spec(blur.defocus_blur, ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)), False),
    "glass_blur": _Spec(blur.glass_blur, ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)), True),
    "motion_blur": _Spec(blur.motion_blur_corruption, ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)), True),
    "zoom_blur": _Spec(blur.zoom_blur, tuple(np.arange(1, end, 0.01) for end in (1.06, 1.11, 1.16, 1.21, 1.26)), False),
    "snow": _Spec(
        weather.snow,
        (
            (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
            (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
            (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
            (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
            (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
        ),
        True,
    ),
    "frost": _Spec(weather.frost, ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)), True),
    "fog": _Spec(weather.fog, ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)), True),
    "brightness": _Spec(weather.brightness, (0.05, 0.1, 0.15, 0.2, 0.3), False),
    "contrast": _Spec(digital.contrast, (0.75, 0.5, 0.4, 0.3, 0.15), False),
    "elastic_transform": _Spec(
        digital.elastic_transform,
        tuple(
            (SIZE * a, SIZE * s, SIZE * m)
            for a, s, m in ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))
        ),
        True,
    ),
    "pixelate": _Spec(digital.pixelate, (0.95, 0.9, 0.85, 0.75, 0.65), False),
    "jpeg_compression": _Spec(digital.jpeg_compression, (80, 65, 58, 50, 40), False),
}
assert tuple(_SPECS) == CORRUPTIONS


# ---------------------------------------------------------------- public API


def _check_corruption(name: str, valid: tuple[str, ...] = CORRUPTIONS) -> str:
    if name not in valid:
        raise TbnError(f"unknown corruption {name!r}; valid: {', '.join(valid)}")
    return name


def _check_severity(severity: int) -> int:
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer) or not 1 <= severity <= 5:
        raise TbnError(f"severity must be an integer in 1..5, got {severity!r}")
    return int(severity)


def _check_images(images: np.ndarray) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.shape[1:] != (SIZE, SIZE, 3):
        got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise TbnError(f"images must be a uint8 array of shape (N, 32, 32, 3) (HWC, like CIFAR10.data), got {got}")
    return images


def _check_indices(indices: np.ndarray | None, n: int) -> np.ndarray:
    if indices is None:
        return np.arange(n)
    idx = np.asarray(indices)
    if idx.shape != (n,) or (n and (not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0)):
        raise TbnError(f"indices must be {n} non-negative integers (the images' test-set indices), got {idx.shape}")
    return idx


def _image_rngs(seed: int, corruption: str, severity: int, indices: np.ndarray) -> list[np.random.Generator]:
    key = int.from_bytes(corruption.encode(), "little")
    return [np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key, severity, int(i)))) for i in indices]


def corrupt(
    images: np.ndarray, corruption: str, severity: int, *, seed: int = 0, indices: np.ndarray | None = None
) -> np.ndarray:
    """Corrupt uint8 images (N,32,32,3); ``indices`` are their test-set indices, which seed
    each image's randomness (default ``arange(N)``), so subsets reproduce the full set."""
    spec = _SPECS[_check_corruption(corruption)]
    severity = _check_severity(severity)
    images = _check_images(images)
    idx = _check_indices(indices, len(images))
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise TbnError(f"seed must be a non-negative integer, got {seed!r}")
    out = np.empty_like(images)
    # Chunks keep the float temporaries cache-sized; images never interact, so the chunk
    # size cannot change a pixel.
    for start in range(0, len(images), _CHUNK):
        part = slice(start, start + _CHUNK)
        rngs = _image_rngs(int(seed), corruption, severity, idx[part]) if spec.random else []
        res = spec.fn(images[part], spec.params[severity - 1], rngs)
        # The original saves np.uint8(float image): truncation, kept for fidelity.
        out[part] = res if res.dtype == np.uint8 else np.clip(res, 0, 255).astype(np.uint8)
    return out


def parse_corruptions(spec: str) -> tuple[str, ...]:
    """``"all"`` or a comma list of names, in the order given, without repeats."""
    if spec.strip().lower() == "all":
        return CORRUPTIONS
    names = [_check_corruption(s.strip()) for s in spec.split(",") if s.strip()]
    if not names:
        raise TbnError(f"no corruption given; use 'all' or a comma list of: {', '.join(CORRUPTIONS)}")
    return tuple(dict.fromkeys(names))


def parse_severities(spec: str) -> tuple[int, ...]:
    """``"1-5"``, ``"3"``, ``"1,3,5"`` (ranges and lists may mix) -> sorted unique severities."""
    out: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        try:
            lo, _, hi = part.partition("-")
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise TbnError(f"bad severity spec {spec!r}; use e.g. '1-5', '3' or '1,3,5'") from None
        if not (1 <= a <= b <= 5):
            raise TbnError(f"severities must lie in 1..5, got {part!r} in {spec!r}")
        out.update(range(a, b + 1))
    return tuple(sorted(out))


def generate(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    corruptions: Sequence[str],
    severities: Sequence[int],
    seed: int,
    indices: np.ndarray | None = None,
    progress: bool = False,
) -> Iterator[tuple[str, int, np.ndarray]]:
    """Yield ``(corruption, severity, corrupted images)`` one array at a time, so the full
    75-array set never has to sit in memory. ``labels`` are checked to match the images;
    they are the same for every corrupted array."""
    images = _check_images(images)
    if np.shape(labels) != (len(images),):
        raise TbnError(f"labels must have shape ({len(images)},) to match the images, got {np.shape(labels)}")
    jobs = [(_check_corruption(c), _check_severity(s)) for c in corruptions for s in severities]
    if progress:
        jobs = tqdm(jobs, desc="CIFAR-10-C (regenerated)", unit="array")
    for corruption, severity in jobs:
        yield corruption, severity, corrupt(images, corruption, severity, seed=seed, indices=indices)


def released_layout(arrays_by_severity: dict[int, np.ndarray]) -> np.ndarray:
    """Stack severities 1..5 as the released files do: row (s-1)*N + i is image i at severity s."""
    if sorted(arrays_by_severity) != list(SEVERITIES):
        raise TbnError(f"the released layout needs all severities 1..5, got {sorted(arrays_by_severity)}")
    arrays = [arrays_by_severity[s] for s in SEVERITIES]
    if any(a.shape != arrays[0].shape or a.dtype != arrays[0].dtype for a in arrays):
        raise TbnError("all severities must have the same shape and dtype to form the released layout")
    return np.concatenate(arrays)


def load_released(directory: str | Path, corruption: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a released CIFAR-10-C file (``<corruption>.npy`` + ``labels.npy``) memory-mapped,
    read-only: images (50000,32,32,3) uint8 and labels (50000,)."""
    _check_corruption(corruption, CORRUPTIONS + RELEASED_EXTRA)
    directory = Path(directory)
    paths = directory / f"{corruption}.npy", directory / "labels.npy"
    for path in paths:
        if not path.is_file():
            raise TbnError(f"{path} not found; point to the folder of the released CIFAR-10-C .npy files")
    arrays = []
    for path in paths:
        try:
            arrays.append(np.load(path, mmap_mode="r", allow_pickle=False))
        except (ValueError, OSError, EOFError) as e:
            raise TbnError(
                f"cannot read {path} as a CIFAR-10-C .npy file ({type(e).__name__}): restore the released files"
            ) from None
        if not isinstance(arrays[-1], np.ndarray):  # an .npz archive under an .npy name
            raise TbnError(f"{path} is not a single .npy array: restore the released files")
    images, labels = arrays
    if images.shape != (_RELEASED_ROWS, SIZE, SIZE, 3) or images.dtype != np.uint8:
        raise TbnError(f"{paths[0]} is {images.dtype} {images.shape}, expected uint8 (50000, 32, 32, 3)")
    if labels.shape != (_RELEASED_ROWS,) or not np.issubdtype(labels.dtype, np.integer):
        raise TbnError(f"{paths[1]} is {labels.dtype} {labels.shape}, expected integer labels of shape (50000,)")
    return images, labels


def sample_grid(
    images: np.ndarray,
    out_png: Path,
    *,
    seed: int = 0,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
) -> Path:
    """Draw a corruption x severity grid for 1-3 images (clean first), enlarged 3x, so a
    person can check by eye that the corruptions look right."""
    images = _check_images(images)
    if not 1 <= len(images) <= 3:
        raise TbnError(f"sample_grid shows 1 to 3 images, got {len(images)}")
    zoom, pad, label_w, head_h = 3, 4, 130, 18
    tile = SIZE * zoom
    cols = [("clean", None)] + [(f"s{s}", _check_severity(s)) for s in severities]
    group_w = len(cols) * (tile + pad) + 3 * pad
    canvas = Image.new("RGB", (label_w + len(images) * group_w, head_h + len(corruptions) * (tile + pad)), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for g in range(len(images)):
        for j, (name, _) in enumerate(cols):
            draw.text((label_w + g * group_w + j * (tile + pad) + tile // 2 - 12, 3), name, fill="black", font=font)
    for r, corruption in enumerate(corruptions):
        y = head_h + r * (tile + pad)
        draw.text((4, y + tile // 2 - 6), _check_corruption(corruption), fill="black", font=font)
        versions = [images] + [corrupt(images, corruption, s, seed=seed) for _, s in cols[1:]]
        for g in range(len(images)):
            for j, arr in enumerate(versions):
                im = Image.fromarray(arr[g]).resize((tile, tile), Image.Resampling.NEAREST)
                canvas.paste(im, (label_w + g * group_w + j * (tile + pad), y))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png, format="PNG")
    return out_png
