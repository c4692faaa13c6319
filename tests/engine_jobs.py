"""A tiny job on the real engine (``jobs.engine.Job``) for tests of the engine and the Ray pool.

Each unit sleeps and writes one JSON result; every computation also leaves a marker object of its
own (``computed/<unit>-<random>.json``), so a test counts what was computed, in whichever process.
Importable by Ray workers (the driver's working directory, the repository root, is on their path).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from tbn_ray.jobs.engine import pending
from tbn_ray.store.storage import Storage

UNITS = 8


@dataclass(frozen=True)
class SleepJob:
    """``units`` results, each computed by sleeping ``seconds`` and writing one object."""

    root: str
    units_: int = UNITS
    seconds: float = 0.3
    longer: tuple[tuple[int, float], ...] = ()  # (unit, seconds) of units that take longer
    wait_for: str | None = None  # every unit but 0 starts only once this object exists (an event, not a delay)
    signal: str | None = None  # written after each unit computed: another run's wait_for

    name = "sleep"
    amount_unit = "unit"
    metrics = ()

    @property
    def job_id(self) -> str:
        return "sleep"

    @cached_property
    def out(self) -> Storage:  # one client per process: opening an S3 storage builds a boto3 client
        return Storage.open(self.root)

    def outputs(self) -> list[tuple[int, str]]:
        return [(i, f"result-{i}.json") for i in range(self.units_)]

    def usable(self, output: int, key: str) -> bool:
        return self.out.read_json(key) == {"unit": output}

    def units(self, missing: Sequence[int]) -> list[int]:
        return list(missing)

    def amount(self, unit: int) -> int:
        return 1

    def label(self, unit: int) -> str:
        return f"sleep unit {unit}"

    def describe(self, todo: Sequence[int], skipped: int) -> str:
        return f"sleep: {len(todo)} unit(s) to do, {skipped} stored"

    def make_worker(self, device: torch.device, worker: dict[str, str], gpus: float) -> SleepWorker:
        return SleepWorker(self)

    def measure(self, unit: int, result: Any) -> list[tuple[str, float, dict[str, str]]]:
        return []

    def on_device(self, device_type: str) -> SleepJob:
        return self

    def finish(self, computed: int, skipped: int) -> tuple[int, int]:
        assert not pending(self).units, "finish with results missing"
        return computed, skipped


class SleepWorker:
    def __init__(self, job: SleepJob) -> None:
        self.job = job

    def run(self, unit: int) -> int:
        out = self.job.out
        while self.job.wait_for and unit != 0 and not out.exists(self.job.wait_for):
            time.sleep(0.05)
        out.write_json(f"computed/{unit}-{uuid.uuid4().hex}.json", {"unit": unit})
        time.sleep(dict(self.job.longer).get(unit, self.job.seconds))
        out.write_json(f"result-{unit}.json", {"unit": unit})
        if self.job.signal:
            out.write_json(self.job.signal, {"unit": unit})
        return unit


def computations(out: Storage) -> Counter[int]:
    """How often each unit was computed."""
    return Counter(int(key.split("/")[1].split("-")[0]) for key in out.list("computed/"))
