"""Certification sharded across a pool of Ray actors (``tbn-ray certify``, issue #4).

The Ray layer only orchestrates: the plan, the shard certifier, the shard files and the
aggregation are ``jobs.certify``'s, shared with the in-process path (``--local``), so both
write the same files and either can finish a run the other started. The actor pool and its
failure rules are ``distributed.pool``'s.

- The plan (weights, every sigma's frozen TBN statistics, the selected uint8 images) goes
  into the object store once; each actor certifies whole shards and writes each to its
  deterministic key itself. What comes back is a few hundred bytes per shard.
- A shard is at-least-once, made harmless by idempotent output (the same records at the
  same key; per-example seeds make them identical).
- Actors export ``ray_tbn_certify_*`` metrics; the dashboard lists them as
  ``CertifyActor(<run-id>)`` and each task as ``certify sigma=<s> shard <k>/<n>``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ray

from tbn_ray.jobs.certify import CertifyPlan, CertifyResult, ShardCertifier, ShardProgress, ShardResult, aggregate, pending_shards
from tbn_ray.errors import log
from tbn_ray.distributed.pool import MAX_RESTARTS, READY_TIMEOUT_S, PoolWorker, actor_shape, run_pool
from tbn_ray.distributed.runtime import RayCluster, connect, disconnect


@ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
class CertifyActor(PoolWorker):
    """One ``ShardCertifier`` (model and statistics built once per process) plus metrics."""

    def __init__(self, run_id: str, threads: int, gpus: float) -> None:
        super().__init__(run_id, threads, gpus)
        self.certifier: ShardCertifier | None = None
        from ray.util.metrics import Counter, Gauge

        tags = ("run_id", "sigma")
        self.images = Counter("tbn_certify_images", "test images certified", tag_keys=tags)
        self.shards = Counter("tbn_certify_shards", "shards certified and written", tag_keys=tags)
        self.rate = Gauge("tbn_certify_images_per_second", "images/s of this actor's last shard", tag_keys=tags)

    def run(self, plan: list[ray.ObjectRef], job: tuple[float, int]) -> ShardResult:
        """Certify shard ``job = (sigma, shard)``. ``plan`` is ``[ref]``: fetched from the object
        store only by the first shard of this process, not copied into every task."""
        if self.certifier is None:
            self.certifier = ShardCertifier(ray.get(plan[0]), self.device(), self.worker, self.gpus)
        sigma, shard = job
        result = self.certifier.certify_shard(sigma, shard)
        tags = {"run_id": self.name, "sigma": f"{sigma:g}"}
        self.images.inc(result.images, tags=tags)
        self.shards.inc(1, tags=tags)
        self.rate.set(result.images / max(result.seconds, 1e-9), tags=tags)
        return result


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
    shape = actor_shape(
        ray.nodes(),
        work=plan.shards * len(plan.sigmas),
        actors=actors,
        gpus_per_actor=gpus_per_actor,
        cpus_per_actor=cpus_per_actor,
        autoscaling=cluster.autoscaling,
    )
    plan = dataclasses.replace(plan, device_type="cuda" if shape.gpus > 0 else "cpu")
    todo = pending_shards(plan)
    skipped = plan.shards * len(plan.sigmas) - len(todo)
    log(
        f"certification {plan.run_id}: {len(plan.test)} test images x {len(plan.sigmas)} sigma(s) in {plan.shards} shards each, "
        f"{skipped} shard(s) already done -> {plan.out.uri}"
    )
    if todo:
        shape = dataclasses.replace(shape, actors=min(shape.actors, len(todo)))
        log(f"{shape.actors} actor(s), {shape.cpus:g} CPU ({shape.threads} torch threads) + {shape.gpus:g} GPU each; dashboard {cluster.dashboard_url}")
        run_pool(
            CertifyActor, "certify actor", plan.run_id, plan, todo, shape,
            label=lambda job: f"certify sigma={job[0]:g} shard {job[1]}/{plan.shards}",
            bar=ShardProgress(plan, todo, progress), on_result=on_shard, ready_timeout_s=ready_timeout_s,
        )  # fmt: skip
    outputs = aggregate(plan.out, plan=plan)
    return CertifyResult(plan.run_id, plan.out.uri, outputs, plan.out.object_uri("report.md"), len(todo), skipped)


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
    cluster = connect(address, log=log)
    try:
        return run_plan_on_ray(
            plan,
            cluster,
            actors=actors,
            gpus_per_actor=gpus_per_actor,
            cpus_per_actor=cpus_per_actor,
            progress=progress,
            on_shard=on_shard,
        )
    finally:
        disconnect(cluster)
