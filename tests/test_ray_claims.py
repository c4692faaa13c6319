"""Claims on the Ray pool: the driver claims what it hands to actors, so a run in another process
and the pool share one output's units (the engine's claims themselves: test_engine_claims.py)."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from tbn_ray.jobs.claims import Claims
from tbn_ray.jobs.engine import run_in_process

from .engine_jobs import UNITS, SleepJob, computations
from .test_engine_claims import FAST


@pytest.mark.ray
def test_the_ray_pool_and_an_in_process_run_share_the_units(
    ray_local, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The Ray pool's driver claims what it hands to actors and waits at the end for what another
    run holds: with an in-process run started on the same output once the pool's first unit is in,
    each unit is computed once, some by each."""
    from tbn_ray.distributed.certify import CertifyActor  # a JobActor: runs any engine job
    from tbn_ray.distributed.jobs import run_job_on_ray

    # the pool's units after the first wait until the in-process run has computed one: each run
    # computes some whatever the machine's speed (the two jobs are one job: the same outputs and claims)
    job = SleepJob(str(tmp_path / "out"), seconds=0.5, wait_for="gate.json")
    theirs = SleepJob(str(tmp_path / "out"), seconds=0.5, signal="gate.json")
    other: list[Any] = []
    started: list[threading.Thread] = []

    def in_process() -> None:
        other.append(
            run_in_process(theirs, torch.device("cpu"), progress=False, claims=Claims(theirs.out, **FAST), poll_s=0.2)
        )

    def start_the_other_run(_: Any) -> None:
        if not started:
            started.append(threading.Thread(target=in_process))
            started[0].start()

    on_ray = run_job_on_ray(
        job,
        CertifyActor,
        ray_local,
        progress=False,
        actors=2,
        cpus_per_actor=1,
        claims=Claims(job.out, **FAST),
        poll_s=0.2,
        on_unit=start_the_other_run,
    )
    started[0].join(timeout=60)
    assert computations(job.out) == Counter(range(UNITS)), computations(job.out)
    assert on_ray[0] + other[0][0] == UNITS and on_ray[0] >= 1 and other[0][0] >= 1, (on_ray, other)
    assert capsys.readouterr().out.count("another run is writing") == 2  # each saw the other's claims
    assert not job.out.list(".claims/")
