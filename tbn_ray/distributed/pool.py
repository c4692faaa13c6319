"""A pool of Ray actors fed whole units of idempotent work (certification shards, evaluation tasks).

Used by ``distributed.jobs``, whose actors subclass ``PoolWorker`` and expose ``run(plan, unit)``.
The rules every job relies on:

- The plan goes into the object store once; each actor fetches it with its first unit (a
  restarted actor fetches it again), builds its model once, and writes every finished unit to
  storage itself. What comes back through the object store is a small result per unit.
- Actors restart when they die (``max_restarts``) and the unit they were running is retried
  (``max_task_retries``): at-least-once execution, harmless because a unit's output is
  idempotent (same key, same numbers). A unit that outlives its actor's restarts goes to
  another actor, at most ``MAX_UNIT_ATTEMPTS`` times.
- The driver hands units to whichever actor is free and kills every actor on any error or
  interrupt: a killed driver loses at most the units in flight, and the same command resumes.
- The driver claims units as it hands them out (``jobs.engine.ClaimedUnits``) and keeps its
  claims fresh: a unit another live run holds is left to it, and waited for at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import time
import warnings
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

import ray
import torch

from tbn_ray.devices import resolve_device
from tbn_ray.errors import TbnError, log
from tbn_ray.jobs.engine import ClaimedUnits

#: Restarts of a dead actor, and retries of the unit it was running, before the driver gives
#: that unit to another actor. Finite: a crash on every start must not loop forever.
MAX_RESTARTS = 3
#: How often one unit may outlive its actor's restarts before the run fails.
MAX_UNIT_ATTEMPTS = 3
#: How long the driver waits for the first actor to start (an autoscaler may be adding a node).
READY_TIMEOUT_S = 600.0
#: How long the driver reuses its answer from ``ray.nodes()`` (a GCS round trip listing every
#: node) while it looks for units stranded on dead nodes: Ray itself takes longer to declare a node dead.
NODES_TTL_S = 5.0


class PoolWorker:
    """The part every pool actor shares: torch threads, and who it is (stored with its results)."""

    def __init__(self, name: str, threads: int, gpus: float) -> None:
        torch.set_num_threads(threads)
        ctx = ray.get_runtime_context()
        with warnings.catch_warnings():  # Ray's own property uses its deprecated actor_id
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ctx.was_current_actor_reconstructed
        self.name = name
        self.gpus = gpus
        self.worker = {
            "actor": ctx.get_actor_id() or "?",
            "node": ctx.get_node_id(),
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            "threads": str(threads),
            "restarted": str(restarted),
        }

    def __repr__(self) -> str:  # the dashboard's name for the actor
        return f"{type(self).__name__}({self.name})"

    def ready(self) -> dict[str, str]:
        return self.worker

    def device(self) -> torch.device:
        return resolve_device("cuda" if self.gpus > 0 else "cpu")


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
    never more actors than pending units (``work``).
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


def run_pool(
    actor_cls: Any,
    kind: str,
    name: str,
    plan: Any,
    units: ClaimedUnits,
    shape: ActorShape,
    *,
    label: Callable[[Any], str],
    bar: Any,
    on_result: Callable[[Any], None] | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> None:
    """Run every unit on a pool of ``shape.actors`` actors of ``actor_cls`` (a remote
    ``PoolWorker`` subclass built with ``(name, threads, gpus)``; ``kind`` names them in
    errors), taking them from ``units`` as actors are free (each claimed first), updating the
    progress ``bar`` with each finished unit (or one another run stored) and calling ``on_result``
    with its result as it arrives; on any error or interrupt, kill every actor."""
    sink = _progress_sink()
    pool = _Pool(ray.put(plan), units, label, sink=sink)
    actors = [
        actor_cls.options(num_cpus=shape.cpus, num_gpus=shape.gpus).remote(name, shape.threads, shape.gpus)
        for _ in range(shape.actors)
    ]
    pool.starting = {actor.ready.remote(): actor for actor in actors}
    deadline = time.monotonic() + ready_timeout_s
    try:
        while pool.queue or pool.unfinished() or not units.exhausted():
            if units.poll_due():
                units.poll()
            pool.dispatch()
            for unit in units.drain_stored():
                bar.update(unit)
            for unit, amount in _reports(pool):
                if unit not in pool.done:
                    bar.partial(unit, amount)
            if not pool.running and not pool.starting and not pool.idle:
                raise TbnError(f"every {kind} failed to start: {pool.first_error}")
            if not pool.running and not pool.idle and time.monotonic() > deadline:
                raise TbnError(
                    f"no {kind} started within {ready_timeout_s:.0f} s: the cluster has no node with "
                    f"{shape.cpus:g} CPU + {shape.gpus:g} GPU free (see the dashboard); lower --cpus-per-actor/--gpus-per-actor"
                )
            if not pool.running and not pool.starting:  # only other runs' units are left: wait for them
                time.sleep(1.0)
                continue
            done, _ = ray.wait([*pool.running, *pool.starting], num_returns=1, timeout=1.0)
            for ref in done:
                if ref in pool.starting:
                    pool.started(ref)
                    continue
                unit, result = pool.finished(ref)
                if unit is not None:
                    bar.update(unit)
                    if on_result is not None:
                        on_result(result)
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if pool.sink is not None:
            ray.kill(pool.sink)


@ray.remote(num_cpus=0)
class ProgressSink:
    """Where actors report amounts done within a unit (each image of a shard); the driver takes
    them once a loop, so its progress moves before a whole unit ends. Reports are hints: a lost
    one only delays the count to the unit's end, which adds what was not reported."""

    def __init__(self) -> None:
        self.reports: list[tuple[Any, int]] = []

    def add(self, unit: Any, amount: int) -> None:
        self.reports.append((unit, amount))

    def take(self) -> list[tuple[Any, int]]:
        out, self.reports = self.reports, []
        return out


def _progress_sink() -> Any:
    """A ``ProgressSink`` on the driver's own node: it lives as long as the driver, whichever node is lost."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return ProgressSink.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True)).remote()


def _reports(pool: _Pool) -> list[tuple[Any, int]]:
    """What the actors reported since the last look; a sink that is gone ends the reports (they are
    hints: each unit's end still counts it whole)."""
    if pool.sink is None:
        return []
    try:
        return ray.get(pool.sink.take.remote(), timeout=30)
    except (ray.exceptions.RayError, TimeoutError):
        pool.sink = None
        return []


class _Pool:
    """The driver's bookkeeping: actors starting, idle and busy, units queued and their attempts."""

    def __init__(
        self,
        plan_ref: Any,
        units: ClaimedUnits,
        label: Callable[[Any], str],
        clock: Callable[[], float] = time.monotonic,
        sink: Any = None,
    ) -> None:
        self.plan_ref, self.label, self.units, self.clock, self.sink = plan_ref, label, units, clock, sink
        self.starting: dict[Any, Any] = {}
        self.idle: list[Any] = []
        self.running: dict[Any, tuple[Any, Hashable]] = {}
        self.queue: deque[Hashable] = deque()  # units this run holds, to run again (their actor died)
        self.attempts: dict[Hashable, int] = {}
        self.first_error: str | None = None
        self.done: set[Hashable] = set()
        self.backed_up: set[Hashable] = set()
        self.node_of: dict[Any, str] = {}  # actor -> the node it started on
        self.nodes: dict[str, bool] = {}  # node -> alive, as ray.nodes() said at nodes_at
        self.nodes_at = -float("inf")

    def submit(self, actor: Any, unit: Hashable) -> None:
        self.running[actor.run.options(name=self.label(unit)[:120]).remote([self.plan_ref], unit, self.sink)] = (
            actor,
            unit,
        )

    def dispatch(self) -> None:
        """Hand queued units, then newly claimed ones, to idle actors; with nothing queued, give a unit
        stranded on a dead node a backup copy (its actor's restart may never be placed while the pool
        holds every slot). Units are idempotent, so the first copy to finish counts."""
        while self.idle and self.queue:
            self.submit(self.idle.pop(), self.queue.popleft())
        if self.idle and not self.queue:
            for unit in self.units.next(len(self.idle)):
                self.attempts.setdefault(unit, 0)
                self.submit(self.idle.pop(), unit)
        while self.idle and not self.queue and (stranded := self.stranded()):
            self.backed_up.add(stranded[0])
            self.submit(self.idle.pop(), stranded[0])

    def unfinished(self) -> bool:
        return any(unit not in self.done for _, unit in self.running.values())

    def stranded(self) -> list[Hashable]:
        """Unfinished units in flight on actors whose node has died, not yet backed up."""
        waiting = [
            (actor, unit)
            for actor, unit in self.running.values()
            if unit not in self.done and unit not in self.backed_up
        ]
        if not waiting:
            return []
        alive = self.alive({self.node_of[actor] for actor, _ in waiting if actor in self.node_of})
        return list(dict.fromkeys(unit for actor, unit in waiting if self.node_of.get(actor) not in alive))

    def alive(self, nodes: set[str]) -> set[str]:
        """Which of ``nodes`` are alive: ``ray.nodes()`` asked again after ``NODES_TTL_S``, or at
        once when it has not listed one of them yet (an actor just placed on a new node)."""
        if self.clock() - self.nodes_at > NODES_TTL_S or not nodes <= self.nodes.keys():
            self.nodes = {n["NodeID"]: bool(n.get("Alive")) for n in ray.nodes()}
            self.nodes_at = self.clock()
        return {node for node in nodes if self.nodes.get(node, False)}

    def started(self, ref: Any) -> None:
        actor = self.starting.pop(ref)
        try:
            self.node_of[actor] = ray.get(ref)["node"]
            self.idle.append(actor)
        except ray.exceptions.RayError as e:  # the constructor failed on every restart
            self.first_error = self.first_error or str(_cause(e)).strip().splitlines()[-1][:300]

    def finished(self, ref: Any) -> tuple[Hashable | None, Any]:
        """The unit and its result; (None, None) when its actor died and the unit went back to the
        queue, or when another copy of the unit finished first."""
        actor, unit = self.running.pop(ref)
        if unit in self.done:  # the other copy came back first; this actor is free again if it lives
            with contextlib.suppress(ray.exceptions.RayError):
                ray.get(ref)
                self.idle.append(actor)
            return None, None
        try:
            result = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = _cause(e)
            if isinstance(cause, TbnError):
                raise TbnError(
                    f"{self.label(unit)}: {cause} (finished work is kept: run the same command again to resume)"
                ) from None
            raise
        except ray.exceptions.RayActorError as e:  # died more often than it may restart
            self.attempts[unit] += 1
            if self.attempts[unit] >= MAX_UNIT_ATTEMPTS:
                raise TbnError(
                    f"{self.label(unit)} killed its actor {self.attempts[unit]} times (out of memory?): {str(e).splitlines()[0][:200]}"
                ) from None
            log(f"an actor died for good on {self.label(unit)}; giving it to another actor")
            self.queue.appendleft(unit)
            return None, None
        self.done.add(unit)
        self.idle.append(actor)
        self.units.done(unit)
        return unit, result
