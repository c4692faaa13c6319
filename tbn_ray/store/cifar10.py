"""Where CIFAR-10 comes from: the official files or the offline copies, found, downloaded and cached.

Sources (``source`` argument > ``TBN_DATA`` env var > auto-detection):

* ``official``: torchvision's ``CIFAR10`` (md5-checked) under ``root`` (``DataConfig.root``,
  else ``TBN_DATA_ROOT``, else ``~/.cache/tbn-ray/cifar10``), downloaded there if missing.
* ``jpeg``: all 60,000 images from the JPEG q75 mirror ``<shared>/cifar10-jpeg``, put back
  into the official order (shared/data/README.md), decoded once and cached as ``.npz`` under
  ``cache_dir`` (``TBN_CACHE``, else ``~/.cache/tbn-ray``). Numbers on it are close to, not
  equal to, numbers on the official files, hence its own description.
* ``partial``: the byte-exact subset ``<shared>/cifar10-partial`` (the first 1017 test images
  and the first 1017 of each train batch), md5-checked on every load.
* ``auto``: official files already on disk, else the JPEG mirror, else the subset, else the
  official download.

The shared folder is ``shared_dir`` (``DataConfig.shared_dir``), else ``TBN_SHARED_DATA``,
else the first ``<ancestor>/shared/data`` above the working directory or this file.

Held-out split: official TRAIN index ``i`` is held out iff ``i % 10 == 9`` (5,000 images
of the full set). It is never trained on and is what TBN calibration and per-epoch
validation use, keeping the test set untouched. A modulus rule rather than "the last
5,000" so that the byte-exact subset, which only has each batch's first 1017 images, has a
held-out part too, chosen by the same rule.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path

import numpy as np

from tbn_ray.config import DataConfig
from tbn_ray.errors import TbnError, log
from tbn_ray.science.data import Cifar10, Split, assemble, complete_splits, decode_jpeg_archive

SOURCES: tuple[str, ...] = ("auto", "official", "jpeg", "partial")
DOWNLOAD_PROBE_TIMEOUT_S = 15.0
_JPEG_DIR, _JPEG_ARCHIVE, _JPEG_LABELS = "cifar10-jpeg", "cifar10-jpeg.tar.gz", "labels.npz"
_JPEG_CACHE_VERSION = 1
_PARTIAL_DIR = "cifar10-partial"
_NO_DATA_HINT = (
    "use --data jpeg or partial (or TBN_DATA=jpeg|partial) with the offline copies in shared/data (TBN_SHARED_DATA)"
)
#: md5 of the raw array bytes (shared/data/README.md), stable unlike the npz files' own md5.
_PARTIAL_MD5 = {
    "cifar10_test_prefix.npz": {
        "images": "0c4c38dfa836385de34b32047bf21481",
        "all_labels": "251f18ce75337ae9ca5d0dbd7ea62cf4",
    },
    "cifar10_train_prefix.npz": {
        "images": "1cd03138cda319861da4963f1e6a81ca",
        "all_labels": "69c5f3349be54915edfca558b72ad888",
    },
}


# --- locating the data ------------------------------------------------------------------


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else None


def default_root() -> Path:
    return _env_path("TBN_DATA_ROOT") or Path.home() / ".cache" / "tbn-ray" / "cifar10"


def default_cache_dir() -> Path:
    return _env_path("TBN_CACHE") or Path.home() / ".cache" / "tbn-ray"


def find_shared_dir(shared_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The offline-copies folder: explicit, else ``TBN_SHARED_DATA``, else ``shared/data`` found above cwd or this file."""
    if shared_dir is not None:
        return Path(shared_dir).expanduser()
    env = _env_path("TBN_SHARED_DATA")
    if env is not None:
        return env
    for start in (Path.cwd().resolve(), Path(__file__).resolve().parent):
        for ancestor in (start, *start.parents):
            if (ancestor / "shared" / "data").is_dir():
                return ancestor / "shared" / "data"
    return None


def resolve_source(source: str = "auto") -> str:
    """The requested source: an explicit one wins, ``auto`` defers to ``TBN_DATA``."""
    chosen = source if source != "auto" else os.environ.get("TBN_DATA") or "auto"
    if chosen not in SOURCES:
        where = "TBN_DATA" if source == "auto" else "data source"
        raise TbnError(f"{where} must be one of {', '.join(SOURCES)}, got {chosen!r}")
    return chosen


def _official_present(root: Path) -> bool:
    from torchvision.datasets import CIFAR10

    folder = root / CIFAR10.base_folder
    names = [name for name, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
    return all((folder / name).is_file() for name in names)


def _jpeg_present(shared: Path) -> bool:
    return all((shared / _JPEG_DIR / f).is_file() for f in (_JPEG_ARCHIVE, _JPEG_LABELS))


def _partial_present(shared: Path) -> bool:
    return all((shared / _PARTIAL_DIR / f).is_file() for f in _PARTIAL_MD5)


# --- the three sources --------------------------------------------------------------------


def _download_official(root: Path) -> None:
    """torchvision's download, after a short reachability probe so that an offline machine fails fast."""
    from torchvision.datasets import CIFAR10

    try:
        try:
            with urllib.request.urlopen(
                urllib.request.Request(CIFAR10.url, method="HEAD"), timeout=DOWNLOAD_PROBE_TIMEOUT_S
            ):
                pass
        except urllib.error.HTTPError:
            pass  # the host answered (perhaps refusing HEAD): torchvision's own request decides
        CIFAR10(str(root), train=True, download=True)
    except (OSError, RuntimeError) as e:  # URLError, timeouts, md5 mismatch of the download
        reason = " ".join(str(getattr(e, "reason", e)).split())[:160] or type(e).__name__
        raise TbnError(
            f"could not download CIFAR-10 from {CIFAR10.url} into {root} ({reason}); {_NO_DATA_HINT}"
        ) from None


def _load_official(root: Path) -> tuple[Split, Split]:
    from torchvision.datasets import CIFAR10

    if not _official_present(root):
        _download_official(root)
    try:
        train, test = CIFAR10(str(root), train=True), CIFAR10(str(root), train=False)
    except RuntimeError:
        raise TbnError(
            f"the CIFAR-10 files in {root / CIFAR10.base_folder} are corrupted (md5 mismatch); delete that folder to download again"
        ) from None
    return complete_splits(
        np.ascontiguousarray(train.data),
        np.asarray(train.targets, dtype=np.int64),
        np.ascontiguousarray(test.data),
        np.asarray(test.targets, dtype=np.int64),
    )


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write to a temporary file beside ``path`` and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def jpeg_cache_path(shared: Path, cache_dir: Path) -> Path:
    """Cache file keyed by the archive's and labels' md5, so a changed mirror is decoded again."""
    folder = shared / _JPEG_DIR
    key = hashlib.md5((_md5(folder / _JPEG_ARCHIVE) + _md5(folder / _JPEG_LABELS)).encode()).hexdigest()[:16]
    return cache_dir / f"cifar10-jpeg-v{_JPEG_CACHE_VERSION}-{key}.npz"


def _load_jpeg(shared: Path, cache_dir: Path) -> tuple[Split, Split]:
    cache = jpeg_cache_path(shared, cache_dir)
    keys = ("train_images", "train_labels", "test_images", "test_labels")
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                return complete_splits(*(z[k] for k in keys))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            warnings.warn(f"unreadable JPEG cache {cache} ({e}); decoding again", stacklevel=3)
    with np.load(shared / _JPEG_DIR / _JPEG_LABELS, allow_pickle=False) as z:
        labels = {"train": z["train_labels"].astype(np.int64), "test": z["test_labels"].astype(np.int64)}
    log(f"decoding the CIFAR-10 JPEG mirror: once only, later runs read the decoded arrays from {cache}")
    images = decode_jpeg_archive(shared / _JPEG_DIR / _JPEG_ARCHIVE, labels)
    arrays = (images["train"], labels["train"], images["test"], labels["test"])
    try:
        _write_npz_atomic(cache, dict(zip(keys, arrays)))
    except OSError as e:
        warnings.warn(
            f"could not cache the decoded JPEG mirror in {cache.parent} ({e}); set TBN_CACHE to a writable folder",
            stacklevel=3,
        )
    return complete_splits(*arrays)


def _read_partial(path: Path) -> Split:
    """One file of the byte-exact subset, refused unless its raw bytes have the published md5s."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("images", "index", "all_labels")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise TbnError(f"cannot read {path} ({e}); restore the original cifar10-partial folder") from None
    for key, md5 in _PARTIAL_MD5[path.name].items():
        if hashlib.md5(arrays[key].tobytes()).hexdigest() != md5:
            raise TbnError(f"{path} fails its md5 check ({key}); restore the original cifar10-partial folder")
    index = arrays["index"].astype(np.int64)
    return Split(arrays["images"], arrays["all_labels"][index].astype(np.int64), index)


# --- public API ---------------------------------------------------------------------------


def _detect(root: Path, shared: Path | None) -> str | None:
    """The first source already on disk, in order of fidelity; None when only a download is left."""
    if _official_present(root):
        return "official"
    if shared is not None and _jpeg_present(shared):
        return "jpeg"
    if shared is not None and _partial_present(shared):
        return "partial"
    return None


def load_cifar10(
    source: str = "auto",
    *,
    root: str | os.PathLike[str] | None = None,
    shared_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    train_limit: int | None = None,
) -> Cifar10:
    """CIFAR-10 from ``source`` (see the module docstring for precedence and the held-out rule)."""
    chosen = resolve_source(source)
    root_dir = Path(root).expanduser() if root is not None else default_root()
    shared = find_shared_dir(shared_dir)
    if chosen == "auto":
        detected = _detect(root_dir, shared)
        if detected is None:
            try:
                return assemble("official", "CIFAR-10 (official)", *_load_official(root_dir), train_limit)
            except TbnError as e:
                copies = shared if shared is not None else "shared/data (not found)"
                raise TbnError(
                    f"no CIFAR-10 found: no official files in {root_dir}, no offline copies in {copies}, and {e}"
                ) from None
        chosen = detected
    if chosen == "official":
        return assemble("official", "CIFAR-10 (official)", *_load_official(root_dir), train_limit)
    where = shared if shared is not None else "shared/data (not found above the working directory)"
    if chosen == "jpeg":
        if shared is None or not _jpeg_present(shared):
            raise TbnError(
                f"no CIFAR-10 JPEG mirror in {where}/{_JPEG_DIR}; set TBN_SHARED_DATA to the folder holding it, or use --data official/partial"
            )
        cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        return assemble("jpeg", "CIFAR-10 (JPEG q75 mirror)", *_load_jpeg(shared, cache), train_limit)
    if shared is None or not _partial_present(shared):
        raise TbnError(
            f"no CIFAR-10 byte-exact subset in {where}/{_PARTIAL_DIR}; set TBN_SHARED_DATA to the folder holding it, or use --data official/jpeg"
        )
    folder = shared / _PARTIAL_DIR
    train, test = _read_partial(folder / "cifar10_train_prefix.npz"), _read_partial(folder / "cifar10_test_prefix.npz")
    description = f"CIFAR-10 (byte-exact subset: {len(test)} test, {len(train)} train)"
    return assemble("partial", description, train, test, train_limit)


def load_from_config(cfg: DataConfig) -> Cifar10:
    return load_cifar10(cfg.source, root=cfg.root, shared_dir=cfg.shared_dir, train_limit=cfg.train_limit)
