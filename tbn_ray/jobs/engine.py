"""What every long job shares: fixed units of work, each stored once, resumed, then aggregated.

A job (certification, a corruption or attack evaluation) is a plan fixed and validated before
any work starts. Its id is a digest of everything that changes a number, and every result it
stores is one object at a deterministic key under ``job.out``. So:

- which results are already there and valid is a scan of the stored objects (``pending``);
- a unit of work recomputes some of the missing results and writes each as one whole object:
  running a unit twice (an actor restarted mid-unit, a re-run) writes the same objects again;
- the in-process runner here and the Ray actor pool (``distributed.jobs``) run the same units
  with the same per-process worker, and the job's ``finish`` aggregates what is stored, so
  either can finish what the other started;
- a run claims each unit before computing it (``claims.Claims``: a marker object under
  ``<out>/.claims/``), so two runs writing the same results at once share the units instead of
  each computing all of them; a run waits at its end for the units another live run holds, and
  takes over those whose claim went stale (a run that died). Claims only save work: what is
  stored and checked decides the result, as before.

The job protocol (``Job``) is what a job definition provides; this module knows nothing of
shards, items, models or Ray.
"""

from __future__ import annotations

import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tbn_ray.errors import log
from tbn_ray.jobs.claims import CLAIM_POLL_S, Claim, Claims
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

    def label(self, unit: Any) -> str:
        """A unit's name, unique among the job's units: its claim is keyed by it."""

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
    outputs: list[Hashable] = field(default_factory=list)  # the missing ones
    keys: list[str] = field(default_factory=list)  # where each is stored
    unusable: set[str] = field(default_factory=set)  # those of the keys that held an unusable object

    def keys_by_unit(self, job: Job) -> dict[str, list[str]]:
        """The keys each unit (by label) stores. An output is a unit's when leaving it out changes
        that unit, whatever way the job groups outputs; one unit per output is the quick case."""
        units = job.units(self.outputs)
        labels = [job.label(u) for u in units]
        if len(units) == len(self.outputs):
            singles = [job.units([o]) for o in self.outputs]
            if all(len(one) == 1 for one in singles) and {job.label(one[0]) for one in singles} == set(labels):
                return {job.label(one[0]): [key] for one, key in zip(singles, self.keys)}
        by_label: dict[str, list[str]] = {label: [] for label in labels}
        for k, key in enumerate(self.keys):
            without = {job.label(u) for u in job.units(self.outputs[:k] + self.outputs[k + 1 :])}
            for label in by_label.keys() - without:
                by_label[label].append(key)
        return by_label


def pending(job: Job) -> Pending:
    """Scan the stored results (concurrently: each is one object to read and check)."""
    present = set(job.out.list())
    outputs = job.outputs()
    usable = map_concurrently(lambda o: o[1] in present and job.usable(*o), outputs)
    missing = [(output, key) for (output, key), ok in zip(outputs, usable) if not ok]
    return Pending(
        job.units([o for o, _ in missing]),
        len(missing),
        len(outputs) - len(missing),
        [o for o, _ in missing],
        [k for _, k in missing],
        {k for _, k in missing if k in present},
    )


class ClaimedUnits:
    """The units a run may compute next, claimed one batch at a time; at the end, the units
    other live runs hold, until their results are stored or their claims go stale.

    Whether another run has stored a unit is one listing of ``out``: an object that appeared at a
    key of this plan since the scan was written by a run of this plan (the job's ``finish`` still
    reads and checks every result); one that was there and unusable is read and checked again.
    Shared by the in-process runner and the Ray pool's driver (``distributed.pool``)."""

    def __init__(self, job: Job, left: Pending, claims: Claims, *, poll_s: float = CLAIM_POLL_S) -> None:
        self.job, self.left, self.claims, self.poll_s = job, left, claims, poll_s
        self.todo: deque[Any] = deque(left.units)
        self.theirs: dict[str, Any] = {}  # by label: units another run holds
        self.keys = left.keys_by_unit(job)
        self.output_of = dict(zip(left.keys, left.outputs))
        self.polled_at = time.monotonic()
        self.told: set[str] = set()  # owners already logged
        self.stored_by_others: list[Any] = []  # found stored, not yet handed to the caller
        self.outputs_by_others = 0

    def _stored(self, present: set[str], label: str, *, recheck: bool) -> bool:
        """Whether every result of the unit is stored now; ``recheck``: read again those that were
        unusable at the scan (else such a unit counts as not stored: computing it is always right)."""
        keys = self.keys[label]
        if not all(key in present for key in keys):
            return False
        again = [key for key in keys if key in self.left.unusable]
        return recheck and all(self.job.usable(self.output_of[key], key) for key in again) if again else True

    def _by_others(self, unit: Any) -> None:
        self.stored_by_others.append(unit)
        self.outputs_by_others += len(self.keys[self.job.label(unit)])

    def next(self, count: int = 1) -> list[Any]:
        """Up to ``count`` units this run now holds and are still to compute; [] when none is free now
        (see ``waiting``)."""
        got: list[Any] = []
        while self.todo and len(got) < count:
            batch = [self.todo.popleft() for _ in range(min(count - len(got), len(self.todo)))]
            taken = self.claims.take([self.job.label(u) for u in batch])
            mine = []
            for unit in batch:
                label = self.job.label(unit)
                other = taken[label]
                if other is None:
                    mine.append(unit)
                else:
                    self.theirs[label] = unit
                    self._tell(other)
            if mine:  # another run may have stored some and dropped its claims before this run looked
                present = set(self.job.out.list())
                for unit in mine:
                    if self._stored(present, self.job.label(unit), recheck=False):
                        self.claims.release(self.job.label(unit))
                        self._by_others(unit)
                    else:
                        got.append(unit)
        return got

    def _tell(self, claim: Claim) -> None:
        if claim.owner not in self.told:
            self.told.add(claim.owner)
            log(
                f"another run is writing {self.job.out.uri} (claim by {claim.owner}, {claim.age():.0f} s ago): "
                "this run leaves it the units it holds and waits for them at the end"
            )

    def waiting(self) -> bool:
        """Whether units held by other runs are still to be stored."""
        return bool(self.theirs)

    def exhausted(self) -> bool:
        """Nothing left to claim, and nothing other runs hold."""
        return not self.todo and not self.theirs

    def poll_due(self) -> bool:
        """Nothing of this run's own is left, others hold units, and ``poll_s`` has passed."""
        return not self.todo and bool(self.theirs) and time.monotonic() - self.polled_at >= self.poll_s

    def poll(self) -> None:
        """Look again at the units other runs hold: drop those now stored, queue again those whose
        claim is gone or stale (a run that died or gave up)."""
        self.polled_at = time.monotonic()
        present = set(self.job.out.list())
        for label in list(self.theirs):
            if self._stored(present, label, recheck=True):
                self._by_others(self.theirs.pop(label))
                continue
            claim = self.claims.read(label)
            if not self.claims.fresh(claim):
                if claim is not None:
                    log(
                        f"the claim on {label} by {claim.owner} ({claim.age():.0f} s old) is stale or its run has ended: this run takes it over"
                    )
                self.todo.append(self.theirs.pop(label))

    def drain_stored(self) -> list[Any]:
        """The units found stored by another run since the last call (for the progress bar)."""
        units, self.stored_by_others = self.stored_by_others, []
        return units

    def done(self, unit: Any) -> None:
        self.claims.release(self.job.label(unit))

    def computed(self) -> int:
        """Results this run computed, of those missing when it started."""
        return self.left.missing - self.outputs_by_others


#: Seconds between progress lines when the output is no terminal (a job log).
PROGRESS_EVERY_S = 30.0


class Progress:
    """The driver's progress: the job's amount done, rate and ETA, the last unit done. On a terminal
    a tqdm bar; elsewhere (a Ray job's log, a file) one line every ``every_s`` seconds and at the end,
    since a carriage-return bar is unreadable there. Workers may report amounts within a unit
    (``partial``, e.g. each image of a shard), so progress moves before a whole unit ends."""

    def __init__(
        self,
        job: Job,
        todo: Sequence[Any],
        enabled: bool,
        *,
        terminal: bool | None = None,
        every_s: float = PROGRESS_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from tqdm.auto import tqdm

        self.total = sum(job.amount(u) for u in job.units([o for o, _ in job.outputs()]))
        self.done = self.total - sum(job.amount(u) for u in todo)
        self.job, self.enabled, self.every_s, self.clock = job, enabled, every_s, clock
        self.terminal = sys.stdout.isatty() if terminal is None else terminal
        self.started_at = self.printed_at = clock()
        self.at_start = self.done
        self.partials: dict[Any, int] = {}
        self.last = ""
        self.bar = tqdm(
            total=self.total,
            initial=self.done,
            unit=job.amount_unit,
            desc=job.name,
            disable=not (enabled and self.terminal),
            dynamic_ncols=True,
        )

    def partial(self, unit: Any, amount: int) -> None:
        """``amount`` more of ``unit`` done (never past the unit's own amount)."""
        room = self.job.amount(unit) - self.partials.get(unit, 0)
        amount = max(0, min(amount, room))
        self.partials[unit] = self.partials.get(unit, 0) + amount
        self._add(amount)

    def update(self, unit: Any) -> None:
        """``unit`` done: what its partial reports have not counted yet."""
        self.last = self.job.label(unit)[:60]
        self.bar.set_postfix_str(self.last, refresh=False)
        self._add(self.job.amount(unit) - self.partials.pop(unit, 0))

    def _add(self, amount: int) -> None:
        self.done += amount
        self.bar.update(amount)
        if self.enabled and not self.terminal and self.clock() - self.printed_at >= self.every_s:
            log(self.line())
            self.printed_at = self.clock()

    def line(self) -> str:
        """``certify: 120/400 img (30%), 2.31 img/s, ETA 2 min 1 s (last: ...)``."""
        seconds = max(self.clock() - self.started_at, 1e-9)
        rate = (self.done - self.at_start) / seconds
        left = self.total - self.done
        eta = "-" if rate <= 0 else _duration(left / rate)
        pct = 100 * self.done / self.total if self.total else 100.0
        unit = self.job.amount_unit
        return f"{self.job.name}: {self.done}/{self.total} {unit} ({pct:.0f}%), {rate:.2f} {unit}/s, ETA {eta}" + (
            f" (last: {self.last})" if self.last else ""
        )

    def close(self) -> None:
        if self.enabled and not self.terminal:
            log(self.line())
        self.bar.close()


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m} min" if hours else (f"{m} min {s} s" if m else f"{s} s")


def run_in_process(
    job: Job,
    device: torch.device,
    *,
    progress: bool = True,
    on_unit: Callable[[Any], None] | None = None,
    claims: Claims | None = None,
    poll_s: float = CLAIM_POLL_S,
) -> Any:
    """Run the pending units of ``job`` in this process, then finish it (no Ray). Each unit is
    claimed first (``claims``: this run's, by default a new owner with the default timings)."""
    left = pending(job)
    log(job.describe(left.units, left.stored) + f", device {device}")
    computed = left.missing
    if left.units:
        worker = job.make_worker(
            device, {"actor": "in-process", "node": socket.gethostname()}, 1.0 if device.type == "cuda" else 0.0
        )
        bar = Progress(job, left.units, progress)
        try:
            with claims or Claims(job.out) as held:
                units = ClaimedUnits(job, left, held, poll_s=poll_s)
                for unit in _claimed_one_by_one(units, bar):
                    if hasattr(worker, "report"):  # the worker tells each part of the unit it finishes
                        worker.report = lambda amount, unit=unit: bar.partial(unit, amount)
                    result = worker.run(unit)
                    units.done(unit)
                    bar.update(unit)
                    if on_unit is not None:
                        on_unit(result)
                computed = units.computed()
        finally:
            bar.close()
    return job.finish(computed, left.stored + left.missing - computed)


def _claimed_one_by_one(units: ClaimedUnits, bar: Progress) -> Iterator[Any]:
    """Each unit this run holds, then, while other runs hold some, those it takes over."""
    while True:
        got = units.next()
        for unit in units.drain_stored():
            bar.update(unit)
        if got:
            yield got[0]
        elif units.waiting():
            time.sleep(max(0.0, units.poll_s - (time.monotonic() - units.polled_at)))
            units.poll()
        else:
            return
