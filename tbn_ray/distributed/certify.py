"""Certification sharded across a pool of Ray actors (``tbn-ray certify``).

The job is ``jobs.certify``'s (one unit: one sigma x one shard); the actor and driver are
``distributed.jobs``'s. What is particular to certification: the plan takes the actors' device
type (a CUDA generator draws other noise, so another run id); the actors export
``ray_tbn_certify_*`` metrics; the dashboard lists them as ``CertifyActor(<run-id>)`` and each
task as ``certify sigma=<s> shard <k>/<n>``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

from tbn_ray.distributed.jobs import JobActor, run_job_on_ray
from tbn_ray.distributed.pool import MAX_RESTARTS
from tbn_ray.distributed.runtime import RayCluster
from tbn_ray.jobs.certify import CertifyPlan, CertifyResult, ShardResult


@ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
class CertifyActor(JobActor):
    """A ``ShardCertifier`` (model and every sigma's statistics built once per process)."""


def run_plan_on_ray(
    plan: CertifyPlan, cluster: RayCluster, *, on_shard: Callable[[ShardResult], None] | None = None, **options: Any
) -> CertifyResult:
    """Certify the pending shards of ``plan`` on a pool of actors, then aggregate. ``options``:
    ``actors``, ``gpus_per_actor``, ``cpus_per_actor``, ``progress``, ``ready_timeout_s``
    (``distributed.jobs.run_job_on_ray``)."""
    return run_job_on_ray(plan, CertifyActor, cluster, on_unit=on_shard, **options)
