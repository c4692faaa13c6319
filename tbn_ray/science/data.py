"""CIFAR-10 in memory: splits in the official order, the held-out rule, decoding, tensors.

Where the data comes from (the official files, the JPEG mirror, the byte-exact subset), how it
is found, downloaded and cached is ``store.cifar10``; this module only holds what is done to
the arrays, so it runs anywhere torch does.

Held-out split: official TRAIN index ``i`` is held out iff ``i % 10 == 9`` (5,000 images
of the full set). It is never trained on and is what TBN calibration and per-epoch
validation use, keeping the test set untouched. A modulus rule rather than "the last
5,000" so that the byte-exact subset, which only has each batch's first 1017 images, has a
held-out part too, chosen by the same rule.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tbn_ray.errors import TbnError

CLASSES: tuple[str, ...] = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: Per-channel mean and std of the 50,000 official training images in [0,1] pixel units.
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

HELDOUT_MODULUS = 10
HELDOUT_REMAINDER = 9
CROP_PADDING = 4

_JPEG_MEMBER = re.compile(r"^(train|test)/([a-z]+)/(\d+)\.jpg$")


@dataclass(frozen=True, eq=False)
class Split:
    """Images of one split with their labels and official indices, in official order."""

    images: np.ndarray  # uint8 (N, 32, 32, 3) HWC RGB
    labels: np.ndarray  # int64 (N,)
    index: np.ndarray  # int64 (N,), official index within its split

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.dtype != np.uint8 or self.images.shape[1:] != (32, 32, 3):
            raise ValueError(f"images must be uint8 (N, 32, 32, 3), got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (n,) or self.index.shape != (n,):
            raise ValueError(f"labels {self.labels.shape} and index {self.index.shape} must be ({n},)")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, positions: Sequence[int] | np.ndarray | slice) -> Split:
        """The images at these positions of this split (ints, a boolean mask or a slice)."""
        sel = positions if isinstance(positions, slice) else np.asarray(positions)
        return Split(self.images[sel], self.labels[sel], self.index[sel])

    def by_index(self, official_indices: Sequence[int] | np.ndarray) -> Split:
        """The images with these official indices, in the order asked for."""
        wanted = np.asarray(official_indices, dtype=np.int64).reshape(-1)
        order = np.argsort(self.index, kind="stable")
        sorted_index = self.index[order]
        pos = np.minimum(np.searchsorted(sorted_index, wanted), max(len(sorted_index) - 1, 0))
        found = sorted_index[pos] == wanted if len(sorted_index) else np.zeros(len(wanted), dtype=bool)
        if not found.all():
            missing = wanted[~found]
            shown = ", ".join(str(int(i)) for i in missing[:5]) + (
                f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            )
            held = f"indices {int(sorted_index[0])}..{int(sorted_index[-1])}" if len(sorted_index) else "nothing"
            raise TbnError(
                f"official index {shown} not in this split ({len(self)} images, {held}); "
                "choose indices it holds or use a source with the full set (--data jpeg or official)"
            )
        return self.subset(order[pos])


@dataclass(frozen=True, eq=False)
class Cifar10:
    """A loaded CIFAR-10; ``description`` names the source in every printed result."""

    source: str  # "official" | "jpeg" | "partial"
    description: str
    train: Split  # training images, held-out removed
    heldout: Split
    test: Split
    classes: tuple[str, ...]


def data_meta(d: Cifar10) -> dict[str, str]:
    """The fields every stored result carries to name its data."""
    return {"data_source": d.source, "data": d.description}


# --- decoding and the held-out rule (pure: no files located, downloaded or cached here) ------------


def complete_splits(
    train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray
) -> tuple[Split, Split]:
    """Complete splits: position is the official index."""
    return (
        Split(train_images, train_labels, np.arange(len(train_labels), dtype=np.int64)),
        Split(test_images, test_labels, np.arange(len(test_labels), dtype=np.int64)),
    )


def decode_jpeg_archive(archive: Path, labels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Decode every member once, placing ``<class>/<k>.jpg`` at the k-th official index of that class."""
    slots = {split: [np.flatnonzero(y == c) for c in range(len(CLASSES))] for split, y in labels.items()}
    images = {split: np.zeros((len(y), 32, 32, 3), dtype=np.uint8) for split, y in labels.items()}
    filled = {split: np.zeros(len(y), dtype=bool) for split, y in labels.items()}
    from tqdm.auto import tqdm

    bar = tqdm(
        total=sum(len(y) for y in labels.values()), desc="decode CIFAR-10 JPEG (once)", unit="img", dynamic_ncols=True
    )
    with bar, tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            m = _JPEG_MEMBER.match(member.name)
            if not member.isfile() or m is None:
                continue
            split, cls, k = m.group(1), m.group(2), int(m.group(3))
            if cls not in CLASSES or k >= len(slots[split][CLASSES.index(cls)]):
                raise TbnError(
                    f"{archive} does not match its labels.npz ({member.name}); restore the original cifar10-jpeg folder"
                )
            i = slots[split][CLASSES.index(cls)][k]
            fileobj = tar.extractfile(member)
            assert fileobj is not None  # a regular file, checked above
            with Image.open(io.BytesIO(fileobj.read()), formats=["JPEG"]) as im:
                images[split][i] = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
            filled[split][i] = True
            bar.update()
    for split, ok in filled.items():
        if not ok.all():
            raise TbnError(
                f"{archive} lacks {int((~ok).sum())} {split} images; restore the original cifar10-jpeg folder"
            )
    return images


def assemble(source: str, description: str, train: Split, test: Split, train_limit: int | None) -> Cifar10:
    held = train.index % HELDOUT_MODULUS == HELDOUT_REMAINDER
    trainable = train.subset(~held)
    if train_limit is not None:
        trainable = trainable.subset(slice(0, train_limit))
    return Cifar10(source, description, trainable, train.subset(held), test, CLASSES)


# --- tensors and augmentation -------------------------------------------------------------


def to_float(images: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 images, NHWC (a Split's layout) or NCHW, to float32 NCHW in [0,1] on ``device``.

    Moved as uint8 and converted there: a quarter of the bytes to transfer.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise TypeError(f"expected uint8 images of 4 dimensions, got {x.dtype} {tuple(x.shape)}")
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    return x.to(device).contiguous().float().div_(255)


def as_tensors(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 NCHW, int64 labels): a quarter of float32's memory for DataLoaders; convert on device."""
    x = torch.from_numpy(np.ascontiguousarray(split.images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(split.labels.astype(np.int64))


def augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The standard CIFAR augmentation, batched on ``x``'s device: random crop of the image
    zero-padded by 4 pixels, then a horizontal flip with probability 1/2.

    One gather per batch instead of a Python loop over images; shifts and flips are drawn on
    the generator's device so a seeded generator gives the same batch on any device.
    """
    n, c, h, w = x.shape
    p = CROP_PADDING
    draw_device = generator.device if generator is not None else x.device
    shifts = torch.randint(0, 2 * p + 1, (2, n), generator=generator, device=draw_device).to(x.device)
    flips = torch.randint(0, 2, (n,), generator=generator, device=draw_device).to(x.device).bool()
    padded = x.new_zeros((n, c, h + 2 * p, w + 2 * p))
    padded[:, :, p : p + h, p : p + w] = x
    rows = shifts[0, :, None] + torch.arange(h, device=x.device)  # (n, h)
    cols = shifts[1, :, None] + torch.arange(w, device=x.device)  # (n, w)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()
