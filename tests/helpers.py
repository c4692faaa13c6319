"""Small shared test helpers (real CIFAR-10 images from the byte-exact subset)."""

from __future__ import annotations

import time
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


def wait_actors_gone(cluster, class_name: str, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Until no actor of ``class_name`` is alive (ray.kill is asynchronous), so that none is still writing."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = list_actors(address=cluster.address, filters=[("class_name", "=", class_name), ("state", "!=", "DEAD")])
        if not alive:
            return
        time.sleep(0.5)
    raise AssertionError(f"{class_name} actors still alive after {timeout_s} s: {alive}")
