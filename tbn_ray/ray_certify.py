"""Certification sharded across a pool of Ray actors (``tbn-ray certify``, issue #4).

The Ray layer only orchestrates: the plan, the shard certifier, the shard files and the
aggregation are ``pipeline``'s, shared with the in-process path (``--local``), so both
write the same files and either can finish a run the other started.

- The plan (weights, every sigma's frozen TBN statistics, the selected uint8 images) goes
  into the object store once; each actor builds its model from it once, then certifies
  whole shards and writes each to its deterministic key itself. What comes back through
  the object store is a few hundred bytes per shard.
- Actors restart when they die (``max_restarts``), and the shard they were running is
  retried (``max_task_retries``): at-least-once execution, made harmless by idempotent
  output (the same records at the same key; per-example seeds make them identical).
- The driver hands shards to whichever actor is free, shows a progress bar, and stops
  every actor on any error or interrupt: a killed or failed driver loses at most the shards
  in flight, and the same command resumes.
- Actors export ``ray_tbn_certify_*`` metrics; the dashboard lists them as
  ``CertifyActor(<run-id>)`` and each task as ``certify sigma=<s> shard <k>/<n>``.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
import warnings
from collections import deque
from collections.abc import Callable
from typing import Any

import ray
import torch

from .errors import TbnError
from .pipeline import (
    CertifyPlan,
    CertifyResult,
    ShardCertifier,
    ShardProgress,
    ShardResult,
    aggregate,
    log,
    pending_shards,
)
from .ray_runtime import RayCluster, connect, disconnect
from .training import resolve_device

#: Restarts of a dead actor, and retries of the shard it was running, before the driver
#: gives that shard to another actor. Finite: a crash on every start must not loop forever.
MAX_RESTARTS = 3
#: How often one shard may outlive its actor's restarts before the run fails.
MAX_SHARD_ATTEMPTS = 3
#: How long the driver waits for the first actor to start (an autoscaler may be adding a node).
READY_TIMEOUT_S = 600.0


@ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
class CertifyActor:
    """One ``ShardCertifier`` (model and statistics built once per process) plus metrics."""

    def __init__(self, run_id: str, threads: int, gpus: float) -> None:
        torch.set_num_threads(threads)
        ctx = ray.get_runtime_context()
        with warnings.catch_warnings():  # Ray's own property uses its deprecated actor_id
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ctx.was_current_actor_reconstructed
        self.run_id = run_id
        self.gpus = gpus
        self.worker = {
            "actor": ctx.get_actor_id() or "?",
            "node": ctx.get_node_id(),
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            "threads": str(threads),
            "restarted": str(restarted),
        }
        self.certifier: ShardCertifier | None = None
        from ray.util.metrics import Counter, Gauge

        tags = ("run_id", "sigma")
        self.images = Counter("tbn_certify_images", "test images certified", tag_keys=tags)
        self.shards = Counter("tbn_certify_shards", "shards certified and written", tag_keys=tags)
        self.rate = Gauge("tbn_certify_images_per_second", "images/s of this actor's last shard", tag_keys=tags)

    def __repr__(self) -> str:
        return f"CertifyActor({self.run_id})"

    def ready(self) -> dict[str, str]:
        return self.worker

    def certify_shard(self, plan: list[ray.ObjectRef], sigma: float, shard: int) -> ShardResult:
        """``plan`` is ``[ref]``: fetched from the object store only by the first shard of this
        process (a restarted actor fetches it again), not copied into every task."""
        if self.certifier is None:
            device = resolve_device("cuda" if self.gpus > 0 else "cpu")
            self.certifier = ShardCertifier(ray.get(plan[0]), device, self.worker, self.gpus)
        result = self.certifier.certify_shard(sigma, shard)
        tags = {"run_id": self.run_id, "sigma": f"{sigma:g}"}
        self.images.inc(result.images, tags=tags)
        self.shards.inc(1, tags=tags)
        self.rate.set(result.images / max(result.seconds, 1e-9), tags=tags)
        return result


@dataclasses.dataclass(frozen=True)
class ActorShape:
    """Resources of one actor and how many to start."""

    actors: int
    cpus: float
    gpus: float

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus))


def actor_shape(
    nodes: list[dict[str, Any]],
    *,
    work: int,
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    cpus_per_actor: float | None = None,
    autoscaling: bool = False,
) -> ActorShape:
    """One actor per GPU on a GPU cluster (with that node's CPUs per GPU), else one per CPU.

    Counted per alive node, so the default never asks for an actor no node can hold;
    never more actors than pending shards (``work``).
    """
    alive = [n["Resources"] for n in nodes if n.get("Alive")]
    has_gpus = any(r.get("GPU", 0) >= 1 for r in alive)
    gpus = float(gpus_per_actor) if gpus_per_actor is not None else (1.0 if has_gpus else 0.0)
    if gpus < 0 or (cpus_per_actor is not None and cpus_per_actor <= 0):
        raise TbnError("--gpus-per-actor must be >= 0 and --cpus-per-actor > 0")
    if cpus_per_actor is not None:
        cpus = float(cpus_per_actor)
    elif gpus > 0:
        per_gpu = [int(r.get("CPU", 0) // r["GPU"]) for r in alive if r.get("GPU", 0) >= gpus]
        cpus = float(max(1, min(per_gpu) * gpus)) if per_gpu else 1.0
    else:
        cpus = 1.0

    def per_node(r: dict[str, float]) -> int:
        by_cpu = r.get("CPU", 0) // cpus
        return int(min(by_cpu, r.get("GPU", 0) // gpus) if gpus > 0 else by_cpu)

    fits = sum(per_node(r) for r in alive)
    if fits < 1 and not autoscaling:
        need = f"{cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus > 0 else "")
        raise TbnError(f"no node of this Ray cluster has {need} for one actor: lower --cpus-per-actor/--gpus-per-actor")
    if actors is None:
        actors = max(1, fits)
    elif actors < 1:
        raise TbnError(f"--actors must be >= 1, got {actors}")
    return ActorShape(actors=max(1, min(actors, work)), cpus=cpus, gpus=gpus)


def _cause(error: BaseException) -> BaseException:
    """The user-side exception inside a Ray error (a TbnError raised in an actor)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


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
        _run_shards(plan, todo, shape, progress=progress, on_shard=on_shard, ready_timeout_s=ready_timeout_s)
    outputs = aggregate(plan.out, plan=plan)
    return CertifyResult(plan.run_id, plan.out.uri, outputs, plan.out.object_uri("report.md"), len(todo), skipped)


def _run_shards(
    plan: CertifyPlan,
    todo: list[tuple[float, int]],
    shape: ActorShape,
    *,
    progress: bool,
    on_shard: Callable[[ShardResult], None] | None,
    ready_timeout_s: float,
) -> None:
    """Hand shards to free actors until none is left; on any error or interrupt stop every actor."""
    plan_ref = ray.put(plan)
    pool = [
        CertifyActor.options(num_cpus=shape.cpus, num_gpus=shape.gpus).remote(plan.run_id, shape.threads, shape.gpus)
        for _ in range(shape.actors)
    ]
    starting = {actor.ready.remote(): actor for actor in pool}
    idle: list[Any] = []
    running: dict[Any, tuple[Any, float, int]] = {}
    queue = deque(todo)
    attempts = {job: 0 for job in todo}
    first_error: str | None = None
    deadline = time.monotonic() + ready_timeout_s
    bar = ShardProgress(plan, todo, progress)
    try:
        while queue or running:
            while idle and queue:
                actor = idle.pop()
                sigma, shard = queue.popleft()
                name = f"certify sigma={sigma:g} shard {shard}/{plan.shards}"
                running[actor.certify_shard.options(name=name).remote([plan_ref], sigma, shard)] = (actor, sigma, shard)
            if not running and not starting:
                raise TbnError(f"every certify actor failed to start: {first_error}")
            if not running and time.monotonic() > deadline:
                raise TbnError(
                    f"no certify actor started within {ready_timeout_s:.0f} s: the cluster has no node with "
                    f"{shape.cpus:g} CPU + {shape.gpus:g} GPU free (see the dashboard); lower --cpus-per-actor/--gpus-per-actor"
                )
            done, _ = ray.wait([*running, *starting], num_returns=1, timeout=1.0)
            for ref in done:
                if ref in starting:
                    actor = starting.pop(ref)
                    try:
                        ray.get(ref)
                        idle.append(actor)
                    except ray.exceptions.RayError as e:  # the constructor failed on every restart
                        first_error = first_error or str(_cause(e)).strip().splitlines()[-1][:300]
                    continue
                actor, sigma, shard = running.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    cause = _cause(e)
                    if isinstance(cause, TbnError):
                        raise TbnError(
                            f"sigma={sigma:g} shard {shard}/{plan.shards}: {cause} "
                            "(finished shards are kept: run the same command again to resume)"
                        ) from None
                    raise
                except ray.exceptions.RayActorError as e:  # died more often than it may restart
                    attempts[(sigma, shard)] += 1
                    if attempts[(sigma, shard)] >= MAX_SHARD_ATTEMPTS:
                        raise TbnError(
                            f"sigma={sigma:g} shard {shard}/{plan.shards} killed its actor {attempts[(sigma, shard)]} times "
                            f"(out of memory?): {str(e).splitlines()[0][:200]}"
                        ) from None
                    log(f"an actor died for good on sigma={sigma:g} shard {shard}; giving the shard to another actor")
                    queue.appendleft((sigma, shard))
                    continue
                idle.append(actor)
                bar.update(result)
                if on_shard is not None:
                    on_shard(result)
    finally:
        bar.close()
        for actor in pool:
            ray.kill(actor, no_restart=True)


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
