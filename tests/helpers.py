"""Small shared test helpers (real CIFAR-10 images from the byte-exact subset)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def partial_test_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` official test images (uint8 NHWC) and labels, byte-exact."""
    path = SHARED_DATA / "cifar10-partial" / "cifar10_test_prefix.npz"
    if not path.is_file():
        pytest.skip(f"CIFAR-10 subset not found at {path}")
    with np.load(path) as d:
        return d["images"][:n].copy(), d["labels"][:n].astype(np.int64)
