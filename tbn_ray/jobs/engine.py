"""What every long job shares: fixed units of work, each stored once, resumed, then aggregated.

A job (certification, a corruption or attack evaluation) is a plan fixed and validated before
any work starts. Its id is a digest of everything that changes a number, and every result it
stores is one object at a deterministic key under ``job.out``. So:

- which results are already there and valid is a scan of the stored objects (``pending``);
- a unit of work recomputes some of the missing results and writes each as one whole object:
  running a unit twice (an actor restarted mid-unit, a re-run) writes the same objects again;
- the in-process runner here and the Ray actor pool (``distributed.jobs``) run the same units
  with the same per-process worker, and the job's ``finish`` aggregates what is stored, so
  either can finish what the other started.

The job protocol (``Job``) is what a job definition provides; this module knows nothing of
shards, items, models or Ray.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from tbn_ray.errors import log
from tbn_ray.store.storage import Storage, map_concurrently


@dataclass(frozen=True)
class Metric:
    """A Ray metric a job's actors export (``ray_<name>``): a counter, or a gauge set per unit."""

    name: str
    description: str
    tag_keys: tuple[str, ...]
    gauge: bool = False


class UnitWorker(Protocol):
    """Computes whole units with what is costly to build (a model) built once per process."""

    def run(self, unit: Any) -> Any: ...


class Job(Protocol):
    """A plan of stored results, cut into units of work."""

    name: str  # the progress bar's and the dashboard's word: "certify", "evaluate attack"
    amount_unit: str  # what the progress bar counts: "img", "item"
    metrics: tuple[Metric, ...]

    @property
    def job_id(self) -> str: ...

    @property
    def out(self) -> Storage: ...

    def outputs(self) -> list[tuple[Hashable, str]]:
        """Every planned result and the key it is stored at, under ``out``."""

    def usable(self, output: Hashable, key: str) -> bool:
        """Whether the object stored at ``key`` is that result of this plan (read and checked)."""

    def units(self, missing: Sequence[Hashable]) -> list[Any]:
        """The units of work that compute the ``missing`` results."""

    def amount(self, unit: Any) -> int:
        """A unit's share of the progress bar."""

    def label(self, unit: Any) -> str: ...

    def describe(self, todo: Sequence[Any], skipped: int) -> str:
        """The log line a run starts with."""

    def make_worker(self, device: torch.device, worker: dict[str, str], gpus: float) -> UnitWorker: ...

    def measure(self, unit: Any, result: Any) -> list[tuple[str, float, dict[str, str]]]:
        """What a finished unit adds to each metric: (metric name, value, tags)."""

    def on_device(self, device_type: str) -> Job:
        """The same job for workers of that device type (a job whose numbers depend on it gets another id)."""

    def finish(self, computed: int, skipped: int) -> Any:
        """Aggregate the stored results (all there now) into the job's result."""


@dataclass(frozen=True)
class Pending:
    """What is left of a job: the units to run, and how many results are missing or stored."""

    units: list[Any]
    missing: int
    stored: int


def pending(job: Job) -> Pending:
    """Scan the stored results (concurrently: each is one object to read and check)."""
    present = set(job.out.list())
    outputs = job.outputs()
    usable = map_concurrently(lambda o: o[1] in present and job.usable(*o), outputs)
    missing = [output for (output, _), ok in zip(outputs, usable) if not ok]
    return Pending(job.units(missing), len(missing), len(outputs) - len(missing))


class Progress:
    """The driver's progress bar (tqdm): the job's amount done, rate and ETA, the last unit done."""

    def __init__(self, job: Job, todo: Sequence[Any], enabled: bool) -> None:
        from tqdm.auto import tqdm

        total = sum(job.amount(u) for u in job.units([o for o, _ in job.outputs()]))
        left = sum(job.amount(u) for u in todo)
        self.job = job
        self.bar = tqdm(total=total, initial=total - left, unit=job.amount_unit, desc=job.name, disable=not enabled, dynamic_ncols=True)

    def update(self, unit: Any) -> None:
        self.bar.set_postfix_str(self.job.label(unit)[:60], refresh=False)
        self.bar.update(self.job.amount(unit))

    def close(self) -> None:
        self.bar.close()


def run_in_process(
    job: Job, device: torch.device, *, progress: bool = True, on_unit: Callable[[Any], None] | None = None
) -> Any:
    """Run the pending units of ``job`` in this process, then finish it (no Ray)."""
    left = pending(job)
    log(job.describe(left.units, left.stored) + f", device {device}")
    if left.units:
        worker = job.make_worker(device, {"actor": "in-process", "node": socket.gethostname()}, 1.0 if device.type == "cuda" else 0.0)
        bar = Progress(job, left.units, progress)
        try:
            for unit in left.units:
                result = worker.run(unit)
                bar.update(unit)
                if on_unit is not None:
                    on_unit(result)
        finally:
            bar.close()
    return job.finish(left.missing, left.stored)
