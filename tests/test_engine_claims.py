"""Claims: two runs writing the same results at once compute each unit once between them.

A tiny job of our own on the real engine (``engine_jobs.SleepJob``): every computation leaves a
marker object of its own in storage, so the test counts what was computed, whichever process or
thread computed it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from tbn_ray.jobs.claims import Claims
from tbn_ray.jobs.engine import run_in_process

from .engine_jobs import UNITS, SleepJob, SleepWorker, computations
from .helpers import HANG_S

FAST = {"ttl_s": 30.0, "refresh_s": 0.5, "settle_s": 1.0}  # settle: generous on a busy 2-core machine


def concurrently(*runs) -> list[Any]:  # type: ignore[no-untyped-def]
    """Start every run at the same moment in threads of this process; their results, or raise."""
    results: list[Any] = [None] * len(runs)
    errors: list[BaseException] = []
    start = threading.Barrier(len(runs))

    def go(k: int) -> None:
        try:
            start.wait()
            results[k] = runs[k]()
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=go, args=(k,)) for k in range(len(runs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=HANG_S)
    if errors:
        raise errors[0]
    return results


@pytest.fixture(params=["local", "s3"])
def out_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the results go: a directory, or a bucket of the session's S3 server (moto over HTTP)."""
    return str(tmp_path / "out") if request.param == "local" else f"{request.getfixturevalue('s3_bucket')}/out"


def test_two_identical_runs_at_once_compute_each_unit_once(out_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Two runs of the same job on the same output, started together: between them every unit is
    computed once, each says what it computed and reused, and each ends with every result stored."""
    job = SleepJob(out_uri)

    def one_run() -> tuple[int, int]:
        return run_in_process(job, torch.device("cpu"), progress=False, claims=Claims(job.out, **FAST), poll_s=0.2)

    results = concurrently(one_run, one_run)
    assert computations(job.out) == Counter(range(UNITS)), computations(job.out)
    assert sum(c for c, _ in results) == UNITS and all(c + s == UNITS for c, s in results), results
    assert "another run is writing" in capsys.readouterr().out
    assert not job.out.list(".claims/")  # every claim released


def test_a_run_waits_for_a_claimed_unit_and_takes_it_over_once_stale(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A unit claimed by another run that then stops (no refresh, no result) is left to it while
    its claim is fresh, and computed by this run once the claim is stale; nothing twice."""
    job = SleepJob(str(tmp_path / "out"), units_=3, seconds=0.1)
    dead = Claims(job.out, owner="other-host:4242:dead", ttl_s=2.0, refresh_s=1.0, settle_s=0.0)
    assert dead.take([job.label(1)]) == {job.label(1): None}  # held, and never refreshed: its run is gone
    mine = Claims(job.out, ttl_s=2.0, refresh_s=1.0, settle_s=0.1)
    t0 = time.perf_counter()
    computed, skipped = run_in_process(job, torch.device("cpu"), progress=False, claims=mine, poll_s=0.2)
    took = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert (computed, skipped) == (3, 0) and computations(job.out) == Counter(range(3))
    assert "another run is writing" in out and "(claim by other-host:4242:dead, 0 s ago)" in out, out
    assert "is stale" in out and took >= 1.5, (took, out)  # it waited for the claim to go stale
    assert not job.out.list(".claims/")


def test_the_fresh_claim_of_an_ended_process_on_this_host_is_taken_over_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run killed a moment ago (kill -9, a crash) leaves fresh claims; on the same host its
    process is known to be gone, so the re-run does not wait for them to go stale."""
    import socket
    import subprocess
    import sys

    job = SleepJob(str(tmp_path / "out"), units_=2, seconds=0.1)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    killed = Claims(job.out, owner=f"{socket.gethostname()}:{ended.pid}:killed", settle_s=0.0)
    assert killed.take([job.label(0), job.label(1)]) == {job.label(0): None, job.label(1): None}
    assert run_in_process(job, torch.device("cpu"), progress=False, claims=Claims(job.out, **FAST), poll_s=0.2) == (
        2,
        0,
    )
    assert computations(job.out) == Counter(range(2))
    assert "another run is writing" not in capsys.readouterr().out


def test_a_unit_another_run_stores_is_not_computed_again(tmp_path: Path) -> None:
    """The other run holds a unit and stores it while this run waits: this run reuses it."""
    job = SleepJob(str(tmp_path / "out"), units_=3, seconds=0.1)
    other = Claims(job.out, owner="other-host:4243:alive", **FAST)
    with other:
        assert other.take([job.label(2)]) == {job.label(2): None}

        def other_run_finishes_unit_2() -> None:
            time.sleep(1.5)
            SleepWorker(job).run(2)
            other.release(job.label(2))

        threading.Thread(target=other_run_finishes_unit_2, daemon=True).start()
        computed, skipped = run_in_process(
            job, torch.device("cpu"), progress=False, claims=Claims(job.out, **FAST), poll_s=0.2
        )
    assert (computed, skipped) == (2, 1) and computations(job.out) == Counter(range(3))
