"""CIFAR-10-C in the storage layer: one array per (corruption, severity) for a selection of test images.

A regenerated set is generated where an array is first needed (``science.corruptions``, seeded
per image) and written once; a released set is imported once from the user's ``.npy`` files.
Either way every worker, on any machine, reads the same arrays from ``<root>/cifar10c/<variant>/``.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tbn_ray.errors import TbnError, log
from tbn_ray.science import data as data_mod
from tbn_ray.science.corruptions import corrupt, load_released, sample_grid
from tbn_ray.store.storage import Storage

CIFAR10C_FORMAT = "tbn-ray/cifar10c-v1"
CIFAR10C_DIR = "cifar10c"  # under a storage root


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:16]


def index_text(index: np.ndarray) -> str:
    if len(index) and np.array_equal(index, np.arange(index[0], index[0] + len(index))):
        return f"{int(index[0])}..{int(index[-1])}"
    return f"{len(index)} selected indices"


@dataclass(frozen=True, eq=False)
class Cifar10C:
    """CIFAR-10-C for a selection of test images, one object per (corruption, severity).

    Layout under ``storage`` (``<root>/cifar10c/<variant>``): ``<corruption>/severity-<s>.npy``,
    uint8 (N, 32, 32, 3), row i = test image ``index[i]``: the severity-s block of the
    released ``<corruption>.npy`` restricted to these images (for the full test set,
    ``science.corruptions.released_layout`` of the five files is the released file's layout), plus
    ``index.npy``, ``labels.npy``, ``manifest.json`` and ``sample_grid.png`` (regenerated only).

    Regenerated (``clean`` set): a missing array is generated where it is needed and written
    once; generation is seeded per image, so two workers racing write the same bytes. Released
    (``clean`` None): arrays are imported once from the user's folder (``released_cifar10c``).
    """

    storage: Storage
    description: str
    index: np.ndarray
    labels: np.ndarray
    seed: int | None = None
    clean: np.ndarray | None = None

    @property
    def variant(self) -> str:
        return self.storage.uri.rstrip("/").rpartition("/")[2]

    @staticmethod
    def key(corruption: str, severity: int) -> str:
        return f"{corruption}/severity-{severity}.npy"

    def _read(self, key: str) -> np.ndarray | None:
        """The stored array, or None when absent or unusable (then it is made again)."""
        if not self.storage.exists(key):
            return None
        try:
            arr = np.load(io.BytesIO(self.storage.read_bytes(key)), allow_pickle=False)
        except (ValueError, OSError, EOFError):
            arr = None
        if arr is None or arr.dtype != np.uint8 or arr.shape != (len(self.index), 32, 32, 3):
            log(f"{self.storage.object_uri(key)} is unusable; writing it again")
            return None
        return arr

    def _write(self, key: str, arr: np.ndarray) -> None:
        with self.storage.writer(key) as f:
            np.save(f, np.ascontiguousarray(arr), allow_pickle=False)

    def has(self, corruption: str, severity: int) -> bool:
        return self.storage.exists(self.key(corruption, severity))

    def load(self, corruption: str, severity: int) -> np.ndarray:
        """The corrupted images, generated and cached first if needed (regenerated sets)."""
        key = self.key(corruption, severity)
        arr = self._read(key)
        if arr is not None:
            return arr
        if self.clean is None:
            raise TbnError(f"{self.storage.object_uri(key)} missing: import the released files again (--released DIR)")
        arr = corrupt(self.clean, corruption, severity, seed=int(self.seed or 0), indices=self.index)
        self._write(key, arr)
        return arr

    def manifest(self) -> dict[str, Any]:
        return {
            "format": CIFAR10C_FORMAT,
            "description": self.description,
            "variant": self.variant,
            "seed": self.seed,
            "images": len(self.index),
            "indices": index_text(self.index),
            "layout": "<corruption>/severity-<s>.npy: uint8 (N,32,32,3), row i = test image index.npy[i]",
        }

    def write_metadata(self) -> None:
        """manifest.json, index.npy, labels.npy and (regenerated) sample_grid.png, once."""
        if not self.storage.exists("manifest.json"):
            self._write("index.npy", self.index.astype(np.int64))
            self._write("labels.npy", self.labels.astype(np.int64))
            self.storage.write_json("manifest.json", self.manifest())
        if self.clean is not None and not self.storage.exists("sample_grid.png"):
            with tempfile.TemporaryDirectory(prefix="tbn-ray-") as tmp:
                png = sample_grid(self.clean[:3], Path(tmp) / "sample_grid.png", seed=int(self.seed or 0))
                self.storage.upload_file("sample_grid.png", png)


def regenerated_cifar10c(root: Storage, test: data_mod.Split, *, seed: int, data_description: str) -> Cifar10C:
    """The regenerated CIFAR-10-C of ``test`` (cached under ``root/cifar10c``)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TbnError(f"--seed must be a non-negative integer, got {seed!r}")
    digest = _digest(
        CIFAR10C_FORMAT.encode(),
        test.index.astype(np.int64).tobytes(),
        test.labels.astype(np.int64).tobytes(),
        test.images.tobytes(),
    )
    return Cifar10C(
        storage=root.child(CIFAR10C_DIR, f"regenerated-seed{seed}-{digest}"),
        description=f"CIFAR-10-C (regenerated, seed {seed}, from {data_description})",
        index=test.index.astype(np.int64),
        labels=test.labels.astype(np.int64),
        seed=seed,
        clean=test.images,
    )


def released_cifar10c(
    root: Storage,
    directory: str | Path,
    index: np.ndarray,
    corruptions: Sequence[str],
    severities: Sequence[int],
    *,
    progress: bool = False,
) -> Cifar10C:
    """The released CIFAR-10-C (``<corruption>.npy`` + ``labels.npy`` in ``directory``) for the
    test images ``index``: the needed rows are imported into ``root/cifar10c`` once, so actors
    on other machines read them from the storage layer."""
    index = np.asarray(index, dtype=np.int64)
    if len(index) == 0 or index.min() < 0 or index.max() >= 10_000:
        raise TbnError("the released CIFAR-10-C holds test images 0..9999; choose --indices within them")
    labels = None
    c10c: Cifar10C | None = None
    jobs = [(c, s) for c in corruptions for s in severities]
    from tqdm.auto import tqdm

    for corruption, severity in tqdm(jobs, desc="import CIFAR-10-C (released)", disable=not progress, leave=False):
        images, released_labels = load_released(directory, corruption)
        rows = (severity - 1) * 10_000 + index
        if labels is None:
            labels = np.asarray(released_labels[rows], dtype=np.int64)
            c10c = Cifar10C(
                root.child(CIFAR10C_DIR, f"released-{_digest(index.tobytes())}"), "CIFAR-10-C (released)", index, labels
            )
        elif not np.array_equal(np.asarray(released_labels[rows]), labels):
            raise TbnError(f"{directory}/labels.npy: labels differ between severities; restore the released files")
        assert c10c is not None
        if not c10c.has(corruption, severity):
            c10c._write(c10c.key(corruption, severity), np.asarray(images[rows]))
    if c10c is None:
        raise TbnError("no corruption or severity selected to import")
    return c10c


def generate_cifar10c(
    c10c: Cifar10C, corruptions: Sequence[str], severities: Sequence[int], *, progress: bool = True
) -> tuple[int, int]:
    """Write every missing (corruption, severity) array; (written, already there)."""
    from tqdm.auto import tqdm

    c10c.write_metadata()
    jobs = [(c, s) for c in corruptions for s in severities]
    present = set(c10c.storage.list())  # an unusable array is found and replaced when it is loaded
    todo = [(c, s) for c, s in jobs if c10c.key(c, s) not in present]
    for corruption, severity in tqdm(todo, desc=c10c.description, unit="array", disable=not progress):
        c10c.load(corruption, severity)
    return len(todo), len(jobs) - len(todo)
