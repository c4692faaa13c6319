"""Any ``jobs.engine`` job on a pool of Ray actors: one actor class, one driver.

The Ray layer only orchestrates: the plan, the units, the worker that computes them, the
stored results and the aggregation are the job's, shared with the in-process path
(``--local``), so both write the same objects and either can finish a job the other started.
The actor pool and its failure rules are ``distributed.pool``'s.

- The job (weights, statistics, the selected images) goes into the object store once; each
  actor builds its worker once and writes every finished unit to storage itself. What comes
  back is a small result per unit.
- A unit is at-least-once, made harmless by idempotent output (the same objects at the same
  keys; per-example or per-item seeds make them identical).
- Actors export the job's metrics (``Job.metrics``, e.g. ``ray_tbn_certify_*``); the dashboard
  lists them as ``<ActorClass>(<job id>)`` and each task by the unit's label.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ray

from tbn_ray.distributed.pool import READY_TIMEOUT_S, PoolWorker, actor_shape, run_pool
from tbn_ray.distributed.runtime import RayCluster
from tbn_ray.errors import log
from tbn_ray.jobs.claims import CLAIM_POLL_S, Claims
from tbn_ray.jobs.engine import ClaimedUnits, Job, Progress, pending


class JobActor(PoolWorker):
    """The job's worker (built once per process, on the first unit) plus the job's metrics.

    Not remote itself: each job kind declares a remote subclass, so the dashboard names the
    actors after what they compute."""

    def __init__(self, job_id: str, threads: int, gpus: float) -> None:
        super().__init__(job_id, threads, gpus)
        self.job: Job | None = None
        self.runner: Any = None
        self.metrics: dict[str, tuple[Any, bool]] = {}  # by name: the metric, and whether it is a gauge

    def _start(self, job: Job) -> None:
        from ray.util.metrics import Counter, Gauge

        self.job = job
        self.runner = job.make_worker(self.device(), self.worker, self.gpus)
        self.metrics = {
            m.name: ((Gauge if m.gauge else Counter)(m.name, m.description, tag_keys=m.tag_keys), m.gauge)
            for m in job.metrics
        }

    def run(self, plan: list[ray.ObjectRef], unit: Any, sink: Any = None) -> Any:
        """Compute ``unit``. ``plan`` is ``[ref]``: fetched from the object store only by the
        first unit of this process, not copied into every task. A worker that reports parts of a
        unit (``report``) tells the driver's ``sink`` (``pool.ProgressSink``) as they finish."""
        if self.job is None:
            self._start(ray.get(plan[0]))
        assert self.job is not None
        if sink is not None and hasattr(self.runner, "report"):
            self.runner.report = lambda amount: sink.add.remote(unit, amount)
        result = self.runner.run(unit)
        for name, value, tags in self.job.measure(unit, result):
            metric, gauge = self.metrics[name]
            if gauge:
                metric.set(value, tags=tags)
            else:
                metric.inc(value, tags=tags)
        return result


def run_job_on_ray(
    job: Job,
    actor_cls: Any,
    cluster: RayCluster,
    *,
    progress: bool = True,
    on_unit: Callable[[Any], None] | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
    claims: Claims | None = None,
    poll_s: float = CLAIM_POLL_S,
    **sizing: Any,
) -> Any:
    """Run the pending units of ``job`` on a pool of ``actor_cls`` actors (a remote ``JobActor``),
    each claimed first (``claims``, as ``engine.run_in_process`` takes them), then finish it.
    ``sizing``: ``actors``, ``gpus_per_actor``, ``cpus_per_actor`` (``pool.actor_shape``)."""
    shape = actor_shape(
        ray.nodes(), work=len(job.units([o for o, _ in job.outputs()])), autoscaling=cluster.autoscaling, **sizing
    )
    job = job.on_device("cuda" if shape.gpus > 0 else "cpu")
    left = pending(job)
    log(job.describe(left.units, left.stored))
    computed = left.missing
    if left.units:
        shape = dataclasses.replace(shape, actors=min(shape.actors, len(left.units)))
        log(
            f"{shape.actors} actor(s), {shape.cpus:g} CPU ({shape.threads} torch threads) + {shape.gpus:g} GPU each; dashboard {cluster.dashboard_url}"
        )
        with claims or Claims(job.out) as held:
            units = ClaimedUnits(job, left, held, poll_s=poll_s)
            run_pool(
                actor_cls,
                f"{job.name} actor",
                job.job_id,
                job,
                units,
                shape,
                label=job.label,
                bar=Progress(job, left.units, progress),
                on_result=on_unit,
                ready_timeout_s=ready_timeout_s,
            )
            computed = units.computed()
    return job.finish(computed, left.stored + left.missing - computed)
