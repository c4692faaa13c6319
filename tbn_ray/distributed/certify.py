"""Certification sharded across a pool of Ray actors (``tbn-ray certify``).

The job is ``jobs.certify``'s (one unit: one sigma x one shard); the actor and driver are
``distributed.jobs``'s. What is particular to certification: the plan takes the actors' device
type (a CUDA generator draws other noise, so another run id); the actors export
``ray_tbn_certify_*`` metrics; the dashboard lists them as ``CertifyActor(<run-id>)`` and each
task as ``certify sigma=<s> shard <k>/<n>``.
"""

from __future__ import annotations

from collections.abc import Callable

import ray

from tbn_ray.distributed.jobs import JobActor, job_on_ray, run_job_on_ray
from tbn_ray.distributed.pool import MAX_RESTARTS, READY_TIMEOUT_S
from tbn_ray.distributed.runtime import RayCluster
from tbn_ray.jobs.certify import CertifyPlan, CertifyResult, ShardResult


@ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
class CertifyActor(JobActor):
    """A ``ShardCertifier`` (model and every sigma's statistics built once per process)."""


def run_plan_on_ray(
    plan: CertifyPlan,
    cluster: RayCluster,
    *,
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    cpus_per_actor: float | None = None,
    progress: bool = True,
    on_shard: Callable[[ShardResult], None] | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> CertifyResult:
    """Certify the pending shards of ``plan`` on a pool of actors, then aggregate."""
    return run_job_on_ray(
        plan, CertifyActor, cluster, actors=actors, gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor,
        progress=progress, on_unit=on_shard, ready_timeout_s=ready_timeout_s,
    )  # fmt: skip


def certify_on_ray(
    plan: CertifyPlan,
    *,
    address: str | None = None,
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    cpus_per_actor: float | None = None,
    progress: bool = True,
    on_shard: Callable[[ShardResult], None] | None = None,
) -> CertifyResult:
    """Join ``address`` (else start an embedded local Ray with the dashboard), certify, disconnect."""
    return job_on_ray(
        plan, CertifyActor, address=address, actors=actors, gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor,
        progress=progress, on_unit=on_shard,
    )  # fmt: skip
