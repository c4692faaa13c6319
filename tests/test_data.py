"""CIFAR-10 loading on the real offline copies (shared/data), the held-out rule, augmentation."""

from __future__ import annotations

import hashlib
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10

from tbn_ray.config import DataConfig
from tbn_ray.errors import TbnError
from tbn_ray.science import data as D
from tbn_ray.store import cifar10 as S

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_partial = pytest.mark.skipif(
    not (SHARED / "cifar10-partial").is_dir(), reason=f"byte-exact subset not found at {SHARED}/cifar10-partial"
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's own TBN_* settings must not steer these tests."""
    for name in ("TBN_DATA", "TBN_DATA_ROOT", "TBN_SHARED_DATA", "TBN_CACHE"):
        monkeypatch.delenv(name, raising=False)


def _internet_reachable() -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(CIFAR10.url, method="HEAD"), timeout=5):
            return True
    except urllib.error.HTTPError:
        return True  # the host answered
    except OSError:
        return False


@pytest.fixture(scope="module")
def partial() -> D.Cifar10:
    if not (SHARED / "cifar10-partial").is_dir():
        pytest.skip(f"byte-exact subset not found at {SHARED}/cifar10-partial")
    return S.load_cifar10("partial", shared_dir=SHARED)


@pytest.fixture(scope="module")
def jpeg_first_load(tmp_path_factory: pytest.TempPathFactory) -> tuple[D.Cifar10, Path, float]:
    """The one decode of the JPEG mirror in this file (about 8 s), into a private cache dir."""
    if not (SHARED / "cifar10-jpeg").is_dir():
        pytest.skip(f"JPEG mirror not found at {SHARED}/cifar10-jpeg")
    cache = tmp_path_factory.mktemp("tbn-cache")
    t0 = time.perf_counter()
    d = S.load_cifar10("jpeg", shared_dir=SHARED, cache_dir=cache)
    return d, cache, time.perf_counter() - t0


# --- partial ------------------------------------------------------------------------------


def test_partial_shapes_heldout_rule_and_exact_bytes(partial: D.Cifar10) -> None:
    d = partial
    assert d.source == "partial"
    assert d.description == "CIFAR-10 (byte-exact subset: 1017 test, 5085 train)"
    assert d.classes[0] == "airplane" and d.classes[-1] == "truck" and len(d.classes) == 10
    for split in (d.train, d.heldout, d.test):
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (32, 32, 3)
        assert split.labels.dtype == np.int64 and split.index.dtype == np.int64
        assert len(split.labels) == len(split.index) == len(split)
    # 101 of each batch's first 1017 images have index % 10 == 9
    assert (len(d.train), len(d.heldout), len(d.test)) == (5085 - 505, 505, 1017)
    assert np.all(d.heldout.index % 10 == 9) and not np.any(d.train.index % 10 == 9)
    assert not set(d.train.index.tolist()) & set(d.heldout.index.tolist())
    assert np.array_equal(d.test.index, np.arange(1017))
    # the pixels handed out are the published bytes (README md5 of the raw arrays)
    assert hashlib.md5(d.test.images.tobytes()).hexdigest() == "0c4c38dfa836385de34b32047bf21481"
    whole_train = np.concatenate([d.train.images, d.heldout.images])[
        np.argsort(np.concatenate([d.train.index, d.heldout.index]))
    ]
    assert hashlib.md5(whole_train.tobytes()).hexdigest() == "1cd03138cda319861da4963f1e6a81ca"
    assert np.bincount(d.test.labels, minlength=10).tolist() == [105, 93, 100, 104, 92, 87, 114, 102, 110, 110]


@needs_partial
def test_partial_md5_mismatch_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "cifar10-partial"
    folder.mkdir()
    (folder / "cifar10_train_prefix.npz").symlink_to(SHARED / "cifar10-partial" / "cifar10_train_prefix.npz")
    with np.load(SHARED / "cifar10-partial" / "cifar10_test_prefix.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["images"][0, 0, 0, 0] ^= 1  # one flipped bit
    np.savez(folder / "cifar10_test_prefix.npz", **arrays)
    with pytest.raises(TbnError, match="md5"):
        S.load_cifar10("partial", shared_dir=tmp_path)


def test_by_index_selects_in_order_and_names_missing(partial: D.Cifar10) -> None:
    picked = partial.test.by_index([7, 3, 1016])
    assert picked.index.tolist() == [7, 3, 1016]
    assert np.array_equal(picked.images[1], partial.test.images[3])
    assert partial.heldout.by_index([19]).labels[0] == partial.heldout.labels[1]
    with pytest.raises(TbnError, match="5000"):
        partial.test.by_index([0, 5000])
    with pytest.raises(TbnError, match="9"):  # held out, so not in the training split
        partial.train.by_index([9])


def test_train_limit_and_config(partial: D.Cifar10) -> None:
    d = S.load_from_config(DataConfig(source="partial", shared_dir=str(SHARED), train_limit=100))
    assert len(d.train) == 100 and np.array_equal(d.train.index, partial.train.index[:100])
    assert len(d.heldout) == len(partial.heldout)  # calibration data does not shrink with the training budget


def test_partial_loads_again_the_same(partial: D.Cifar10) -> None:
    again = S.load_cifar10("partial", shared_dir=SHARED)  # how fast: bench/, not a test
    assert np.array_equal(again.test.images, partial.test.images) and np.array_equal(
        again.train.index, partial.train.index
    )


# --- jpeg ---------------------------------------------------------------------------------


def test_jpeg_full_set_in_official_order(jpeg_first_load: tuple[D.Cifar10, Path, float], partial: D.Cifar10) -> None:
    d, _, _ = jpeg_first_load
    assert d.source == "jpeg" and d.description == "CIFAR-10 (JPEG q75 mirror)"
    assert (len(d.train), len(d.heldout), len(d.test)) == (45000, 5000, 10000)
    assert d.train.images.shape == (45000, 32, 32, 3) and d.test.images.dtype == np.uint8
    assert np.bincount(d.test.labels, minlength=10).tolist() == [1000] * 10
    assert np.bincount(np.concatenate([d.train.labels, d.heldout.labels]), minlength=10).tolist() == [5000] * 10
    assert np.all(d.heldout.index % 10 == 9) and np.array_equal(d.test.index, np.arange(10000))
    # labels agree with the exact subset's official labels
    assert np.array_equal(d.test.by_index(partial.test.index).labels, partial.test.labels)
    # pixels: each JPEG image is close to the exact image of the same index, far from its neighbour's
    for jpeg_split, exact in (
        (d.test, partial.test.subset(slice(0, 100))),
        (d.train, partial.train.subset(slice(0, 100))),
    ):
        lossy = jpeg_split.by_index(exact.index).images.astype(np.float64)
        truth = exact.images.astype(np.float64)
        matched = ((lossy - truth) ** 2).mean()
        shifted = ((np.roll(lossy, 1, axis=0) - truth) ** 2).mean()
        assert matched < 200, matched
        assert shifted > 1000, shifted


def test_jpeg_second_load_hits_the_cache(
    jpeg_first_load: tuple[D.Cifar10, Path, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, cache, _ = jpeg_first_load
    files = list(cache.glob("*.npz"))
    assert files == [S.jpeg_cache_path(SHARED, cache)]
    mtime = files[0].stat().st_mtime_ns

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("the JPEG archive was decoded again")

    monkeypatch.setattr(S, "decode_jpeg_archive", no_decoding)
    again = S.load_cifar10("jpeg", shared_dir=SHARED, cache_dir=cache)
    assert files[0].stat().st_mtime_ns == mtime and list(cache.iterdir()) == files  # not decoded or written again
    assert np.array_equal(again.test.images, first.test.images) and np.array_equal(again.train.index, first.train.index)


# --- source selection ---------------------------------------------------------------------


def test_official_offline_fails_fast_with_advice(tmp_path: Path) -> None:
    if _internet_reachable():
        pytest.skip("the CIFAR-10 host is reachable; this test covers machines without internet")
    with pytest.raises(TbnError, match="could not download CIFAR-10.*--data jpeg or partial"):
        S.load_cifar10("official", root=tmp_path / "empty")


def test_auto_with_nothing_names_every_option(tmp_path: Path) -> None:
    if _internet_reachable():
        pytest.skip("the CIFAR-10 host is reachable: auto would download 170 MB")
    with pytest.raises(TbnError, match="no CIFAR-10 found.*no official files.*no offline copies.*could not download"):
        S.load_cifar10(root=tmp_path / "root", shared_dir=tmp_path / "no-shared")


@needs_partial
def test_missing_shared_dir_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(TbnError, match="byte-exact subset.*TBN_SHARED_DATA"):
        S.load_cifar10("partial", shared_dir=tmp_path / "nowhere")
    with pytest.raises(TbnError, match="JPEG mirror"):
        S.load_cifar10("jpeg", shared_dir=tmp_path / "nowhere")


@needs_partial
def test_env_var_overrides_auto_but_not_an_explicit_source(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, jpeg_first_load: tuple[D.Cifar10, Path, float]
) -> None:
    _, cache, _ = jpeg_first_load
    root = tmp_path / "root"
    monkeypatch.setenv("TBN_DATA", "partial")
    assert S.load_cifar10(root=root, shared_dir=SHARED).source == "partial"
    monkeypatch.setenv("TBN_DATA", "jpeg")
    assert S.load_cifar10("auto", root=root, shared_dir=SHARED, cache_dir=cache).source == "jpeg"
    assert S.load_cifar10("partial", root=root, shared_dir=SHARED).source == "partial"
    monkeypatch.setenv("TBN_DATA", "imagenet")
    with pytest.raises(TbnError, match="TBN_DATA must be one of"):
        S.load_cifar10(root=root, shared_dir=SHARED)


@needs_partial
def test_auto_detection_order(tmp_path: Path, jpeg_first_load: tuple[D.Cifar10, Path, float]) -> None:
    _, cache, _ = jpeg_first_load
    root = tmp_path / "root"
    # official files absent: the full JPEG mirror beats the subset
    assert S.load_cifar10(root=root, shared_dir=SHARED, cache_dir=cache).source == "jpeg"
    only_partial = tmp_path / "shared"
    only_partial.mkdir()
    (only_partial / "cifar10-partial").symlink_to(SHARED / "cifar10-partial")
    assert S.load_cifar10(root=root, shared_dir=only_partial).source == "partial"


@needs_partial
def test_shared_dir_found_from_the_package_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # the filesystem root: a tmp_path can sit under a folder that holds shared/data (as /tmp did in CI)
    if Path("/shared/data").is_dir():
        pytest.skip("/shared/data exists, so the working directory would win")
    monkeypatch.chdir("/")
    found = S.find_shared_dir()
    assert found is not None and found.resolve() == SHARED.resolve()
    monkeypatch.setenv("TBN_SHARED_DATA", str(tmp_path))
    assert S.find_shared_dir() == tmp_path


# --- tensors and augmentation -------------------------------------------------------------


def test_to_float_and_as_tensors(partial: D.Cifar10) -> None:
    split = partial.test.subset(np.arange(8))
    x = D.to_float(split.images)
    assert x.dtype == torch.float32 and x.shape == (8, 3, 32, 32) and x.is_contiguous()
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(x[2, 1], torch.from_numpy(split.images[2, :, :, 1]).float() / 255)
    xu8, y = D.as_tensors(split)
    assert xu8.dtype == torch.uint8 and xu8.shape == (8, 3, 32, 32) and xu8.is_contiguous()
    assert y.dtype == torch.int64 and y.tolist() == split.labels.tolist()
    assert torch.equal(D.to_float(xu8), x)  # NCHW tensors are recognised too


def test_augment_outputs_are_padded_windows(partial: D.Cifar10) -> None:
    x = D.to_float(partial.test.images[:64])
    out = D.augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    # exhaustive search over the 9x9 crops x 2 flips of the zero-padded input (numpy: no thread contention)
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (4, 4), (4, 4)))
    got = out.numpy()
    found = np.full(len(x), -1)
    for dy in range(9):
        for dx in range(9):
            for flip in (0, 1):
                window = padded[:, :, dy : dy + 32, dx : dx + 32]
                window = window[..., ::-1] if flip else window
                hit = (got == window).reshape(len(x), -1).all(1) & (found < 0)
                found[hit] = (dy * 9 + dx) * 2 + flip
    assert (found >= 0).all(), "an output is no shifted/flipped window of the padded input"
    assert set((found % 2).tolist()) == {0, 1}  # both flipped and unflipped images
    assert len(set((found // 2).tolist())) > 20  # many different shifts


def test_augment_is_seeded_and_dtype_agnostic(partial: D.Cifar10) -> None:
    xu8, _ = D.as_tensors(partial.test.subset(np.arange(32)))
    x = D.to_float(xu8)
    a = D.augment(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, D.augment(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, D.augment(x, torch.Generator().manual_seed(2)))
    b = D.augment(xu8, torch.Generator().manual_seed(1))
    assert b.dtype == torch.uint8 and b.shape == xu8.shape
    assert torch.equal(D.to_float(b), a)  # the same crops and flips on uint8 and float
