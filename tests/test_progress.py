"""Progress that moves: within a unit (each image of a certification shard), as lines at a fixed
interval where the output is no terminal (a Ray job's log), on an injected clock."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tbn_ray.config import CalibrateConfig, CertifyConfig, DataConfig, ModelConfig, TrainConfig
from tbn_ray.jobs.certify import ShardCertifier, plan_certify
from tbn_ray.jobs.engine import Progress
from tbn_ray.jobs.pipeline import calibrate_run
from tbn_ray.science.models import build_model
from tbn_ray.store.runs import Run, make_checkpoint
from tbn_ray.store.storage import Storage

from .engine_jobs import SleepJob
from .helpers import SHARED_DATA


def test_partial_amounts_move_the_count_and_lines_come_at_the_interval(capsys: pytest.CaptureFixture[str]) -> None:
    now = [0.0]
    job = SleepJob("unused", units_=4)  # 4 units of amount 1 each; partial reports are capped at that
    bar = Progress(job, [0, 1, 2, 3], True, terminal=False, every_s=30.0, clock=lambda: now[0])
    bar.partial(0, 1)
    assert bar.done == 1 and capsys.readouterr().out == ""  # no line before the interval
    now[0] = 31.0
    bar.partial(1, 5)  # more than the unit holds: counted up to its amount
    assert bar.done == 2
    line = capsys.readouterr().out.strip()
    assert line.endswith("sleep: 2/4 unit (50%), 0.06 unit/s, ETA 31 s"), line
    bar.update(0)  # already reported in full: adds nothing more
    bar.update(2)
    assert bar.done == 3
    bar.close()
    assert "sleep: 3/4 unit (75%)" in capsys.readouterr().out  # and a last line at the end


@pytest.mark.skipif(not (SHARED_DATA / "cifar10-partial").is_dir(), reason="CIFAR-10 subset absent")
@pytest.mark.parametrize("images_per_pass", [1, 3])
def test_a_shard_reports_each_image_as_it_is_certified(tmp_path: Path, images_per_pass: int) -> None:
    run = Run(Storage.open(tmp_path).child("tiny"))
    cfg = TrainConfig(
        name="tiny", model=ModelConfig(arch="tiny"), data=DataConfig(source="partial", shared_dir=str(SHARED_DATA))
    )
    torch.manual_seed(0)
    run.save_checkpoint(make_checkpoint(build_model(cfg.model), cfg, 0, {"note": "untrained"}))
    calibrate_run(run, CalibrateConfig(sigmas=(0.25,), samples=64, batch_size=64), device="cpu", progress=False)
    plan = plan_certify(
        run,
        CertifyConfig(
            sigmas=(0.25,), n0=5, n=20, batch_size=20, max_images=5, shards=1, images_per_pass=images_per_pass
        ),
        Storage.open(tmp_path / "out"),
    )
    worker = ShardCertifier(plan, torch.device("cpu"), {"actor": "test", "node": "here"})
    reported: list[int] = []
    worker.report = reported.append
    result = worker.run((0.25, 0))
    assert result.images == 5 and reported == [1] * 5
