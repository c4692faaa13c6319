"""Nothing stored is replaced silently: a second calibration with other settings is refused (and
replaced only when asked, which ``show`` then says), the API never lets two modules share a folder
or mixes given statistics into other stored ones, and it leaves the caller's module as it was."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import tbn_ray
from tbn_ray.api import _weights_digest
from tbn_ray.config import CalibrateConfig
from tbn_ray.errors import TbnError
from tbn_ray.jobs.pipeline import calibrate_run
from tbn_ray.jobs.show import describe_run
from tbn_ray.store.runs import Run

from .helpers import SHARED_DATA

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "cifar10-partial").is_dir(), reason="CIFAR-10 subset absent")

FIXTURE_RUN = Path(__file__).parent / "fixtures" / "legacy-store" / "runs" / "tiny"
SMALL = CalibrateConfig(sigmas=(0.25,), samples=64, batch_size=32)


@pytest.fixture
def run(tmp_path: Path) -> Run:
    target = tmp_path / "tiny"
    target.mkdir()
    for name in ("checkpoint.pt", "config.yaml"):
        shutil.copy(FIXTURE_RUN / name, target / name)
    return Run.open(str(target))


def _mean(run: Run) -> torch.Tensor:
    sets = run.load_bn_sets()
    return next(iter(sets["sigma=0.25"]["stats"].values()))["running_mean"]


def test_a_second_calibration_keeps_the_same_set_and_refuses_another_unless_replace(run: Run) -> None:
    calibrate_run(run, SMALL, device="cpu", progress=False)
    first = _mean(run).clone()
    stamp = (Path(run.uri) / "bn_stats.pt").stat().st_mtime_ns
    calibrate_run(run, SMALL, device="cpu", progress=False)  # the same settings: kept, not rewritten
    assert (Path(run.uri) / "bn_stats.pt").stat().st_mtime_ns == stamp
    other = SMALL.model_copy(update={"samples": 96})
    with pytest.raises(
        TbnError, match=r"already holds TBN statistics for sigma=0.25 made with other settings \(64 samples.*--replace"
    ):
        calibrate_run(run, other, device="cpu", progress=False)
    assert torch.equal(_mean(run), first)  # nothing was touched
    calibrate_run(run, other, device="cpu", progress=False, replace=True)
    assert not torch.equal(_mean(run), first)
    meta = run.load_bn_sets()["sigma=0.25"]["meta"]
    assert meta["samples"] == 96 and meta["replaced"]["made_from"]["samples"] == 64
    assert any("replaced" in line and "--replace" in line for line in describe_run(run).splitlines())


def test_the_api_names_a_module_by_its_weights_and_never_mixes_statistics(run: Run, tmp_path: Path) -> None:
    model, _ = run.load_model()
    other = run.load_model()[0]
    with torch.no_grad():
        next(other.parameters()).add_(0.01)  # the same class, other weights
    kept = tmp_path / "kept"
    a = tbn_ray.calibrate(model, storage=kept, data="partial", sigmas=[0.25], samples=64, batch_size=32)
    b = tbn_ray.calibrate(other, storage=kept, data="partial", sigmas=[0.25], samples=64, batch_size=32)
    folders = sorted(p.name for p in kept.iterdir())
    assert len(folders) == 2 and all(f.startswith(type(model).__name__ + "-") for f in folders)
    mean = lambda c: next(iter(c.sets["sigma=0.25"]["stats"].values()))["running_mean"]  # noqa: E731
    assert not torch.equal(mean(a), mean(b))
    mine = f"{type(model).__name__}-{_weights_digest(model)[:12]}"
    assert mine in folders
    with pytest.raises(TbnError, match="already holds other sigma=0.25 statistics than the stats= given"):
        tbn_ray.certify(
            model, b, storage=kept, name=mine, sigma=0.25, data="partial", n0=4, n=8, max_images=1, batch_size=8
        )


def test_the_api_leaves_the_callers_module_as_it_was(run: Run) -> None:
    model, _ = run.load_model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tbn_ray.certify(model, sigma=0.25, bn="clean", data="partial", n0=4, n=8, max_images=1, batch_size=8)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_apis_messages_name_what_the_caller_gave(run: Run) -> None:
    """An in-memory model's errors name its stats= and the API call that fixes them, never a
    temporary folder or a CLI command; bad stats= is named as such; bn="clean" is one mode."""
    model, _ = run.load_model()
    stats = tbn_ray.calibrate(model, data="partial", sigmas=[0.25], samples=64, batch_size=32)
    with pytest.raises(TbnError) as missing:
        tbn_ray.certify(model, stats, sigma=0.3, data="partial", n0=4, n=8, max_images=1, batch_size=8)
    text = str(missing.value)
    assert (
        "no TBN statistics 'sigma=0.3' in the stats= given" in text and "tbn_ray.calibrate(model, sigmas=[0.3])" in text
    )
    assert "tbn-ray-" not in text and "tbn-ray calibrate" not in text
    with pytest.raises(TbnError, match="stats= must be what tbn_ray.calibrate returns"):
        tbn_ray.certify(
            model, {"sigma=0.25": "not statistics"}, sigma=0.25, data="partial", n0=4, n=8, max_images=1, batch_size=8
        )
    result = tbn_ray.evaluate_attack(
        model, bn="clean", data="partial", indices=(0, 2), attacks=["pgd"], attack_steps=1, batch_size=2
    )
    assert "clean" in result.result["modes"]
