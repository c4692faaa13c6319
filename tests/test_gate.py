"""One gate for every certificate (``smoothing.check_certifiable``): a base classifier whose output
depends on its batch, or that is no classifier at all, is refused on every path to a certificate:
the science entry point (either engine, either sample size), the Python API on a module, the CLI
on a stored run, and the reproduction's certify stage. A fixed model passes and certifies."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import tbn_ray
from tbn_ray.errors import SoundnessError, TbnError
from tbn_ray.store.runs import Run

from .helpers import SHARED_DATA, certify_with, copy_fixture_run, partial_test_images

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "cifar10-partial").is_dir(), reason="CIFAR-10 subset absent")

SETTINGS = {"n0": 10, "n": 40, "alpha": 0.01, "skip": 7, "max_images": 2, "batch_size": 20, "seed": 3}


class BatchMean(nn.Module):
    """The reported hole: a model that subtracts its batch's mean image before the network."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x - x.mean(0, keepdim=True) + 0.5)


class Pair(nn.Module):
    """Returns (logits, features), as many zoo models do with a flag set."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.inner(x)
        return out, out


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return copy_fixture_run(tmp_path / "tiny")


@pytest.fixture
def model(run_dir: Path) -> nn.Module:
    return Run.open(str(run_dir)).load_model()[0]


@pytest.mark.parametrize(
    "fields",
    [{}, {"images_per_pass": 2}, {"sample_size": "sequential"}, {"sample_size": "pilot"}],
    ids=["fixed-n", "packed", "sequential", "pilot"],
)
def test_the_science_entry_point_refuses_a_batch_dependent_model(model: nn.Module, fields: dict[str, Any]) -> None:
    images, labels = partial_test_images(3)
    settings = {k: v for k, v in SETTINGS.items() if k not in ("skip", "max_images")}
    records = certify_with(model, images, labels, range(3), sigma=0.25, **settings, **fields)
    assert len(records) == 3  # the fixed model passes the gate
    with pytest.raises(SoundnessError, match="depends on the batch"):
        certify_with(BatchMean(model), images, labels, range(3), sigma=0.25, **settings, **fields)
    with pytest.raises(SoundnessError, match="depends on the batch"):  # one image is probed as well as many
        certify_with(BatchMean(model), images[:1], labels[:1], range(1), sigma=0.25, **settings, **fields)


def test_the_api_refuses_a_batch_dependent_module_and_a_tuple_output(model: nn.Module) -> None:
    with pytest.raises(SoundnessError, match="depends on the batch"):
        tbn_ray.certify(BatchMean(model), sigma=0.25, bn="clean", data="partial", **SETTINGS)
    with pytest.raises(TbnError, match=r"returns tuple for 3 inputs; it must return logits of shape \(3, 10\)"):
        tbn_ray.certify(Pair(model), sigma=0.25, bn="clean", data="partial", **SETTINGS)


def test_the_cli_and_the_reproduction_refuse_a_base_classifier_that_turns_out_batch_dependent(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever builds f from a stored run (here the shard's ``base_classifier``, made to return a
    batch-dependent function), the gate in the science entry point refuses it before any draw."""
    from typer.testing import CliRunner

    import tbn_ray.jobs.certify as jobs_certify
    from tbn_ray.cli import app

    built = jobs_certify.base_classifier
    monkeypatch.setattr(jobs_certify, "base_classifier", lambda net, cfg, device: BatchMean(built(net, cfg, device)))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    result = CliRunner().invoke(
        app,
        [
            "certify",
            str(run_dir),
            "--sigma",
            "0.25",
            "--local",
            "--data",
            "partial",
            "--output",
            str(tmp_path / "out"),
            "--no-progress",
            *flags,
        ],
    )
    assert isinstance(result.exception, SoundnessError) and "depends on the batch" in str(result.exception)
    assert not list((tmp_path / "out").rglob("*.parquet"))  # nothing certified

    from tbn_ray.config import ModelSpec, ReproduceConfig
    from tbn_ray.jobs.reproduce import certify_stage
    from tbn_ray.store.reproduction import Reproduction
    from tbn_ray.store.storage import Storage

    cfg = ReproduceConfig(
        models=(ModelSpec(name="tiny"),),
        device="cpu",
        certify_clean=False,
        certify={"sigmas": (0.25,), **SETTINGS, "data": {"source": "partial"}},
    )
    rep = Reproduction.open(cfg, Storage.open(tmp_path / "rep"))
    shutil.copytree(run_dir, Path(rep.run(cfg.models[0]).uri))
    with pytest.raises(SoundnessError, match="depends on the batch"):
        certify_stage(rep, cfg.models[0], progress=False)
