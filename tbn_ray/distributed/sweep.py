"""``tbn-ray sweep``: Ray Tune over the training epsilon and the TBN noise level sigma.

The question: which training epsilon and which sigma give the AT model the best certified
accuracy at radius r (or ACR), and what does that cost in clean and PGD accuracy?

Sigma does not change training, so the sweep has two stages:

1. ``train``: a Tune stage, one trial per epsilon. The trial builds a Ray Train ``TorchTrainer``
   (``distributed.train.train_on_ray``; Train V2 runs inside the trial, whose own reservation is
   nominal: the Train workers reserve the resources) with ``TuneReportCallback`` so that Tune
   sees each epoch's held-out PGD accuracy, which optional ASHA early stopping ranks on. A
   stopped trial's process ends, and with it its Train run, whose workers are then released.
2. ``evaluate``: every (epsilon, sigma) of every epsilon whose run trained all its epochs (a
   stopped trial is left out; one that finished its last epoch while being stopped is a
   complete model and is evaluated): TBN calibration at sigma, clean and PGD accuracy (clean BN
   statistics), and Cohen's CERTIFY with the frozen TBN statistics, all on held-out training
   images. This is a fixed grid, not a search, so it runs as a sharded job
   (``jobs.sweep_pairs.PairsJob``, one pair per unit) on the same actor pool, resume rules and
   failure handling as ``tbn-ray certify`` and ``evaluate`` (``distributed.jobs``).

This module only orchestrates. What needs no Ray is elsewhere: the held-out split (and the
selection hygiene it keeps), the training runs' lookup and the pairs job in
``jobs.sweep_pairs``; the results table, heatmap and best.json in ``reports.sweep``.

Layout under ``<storage>/<sweep name>/`` (local or S3; all state lives here)::

    sweep.yaml                       the config (a re-run must match it)
    train/eps=<e>-<trial id>/        one training run per epsilon (Ray Train + tbn-ray files;
                                     bn_stats.pt gets every evaluated sigma at the end)
    pairs/eps=<e>_sigma=<s>/         row.json (written last), bn_stats.pt, certify.tsv,
                                     radii.parquet, summary.json
    tune/train/                      Tune's experiment state of stage 1 (Tuner.restore)
    results.csv  results.parquet  results.md  heatmap.png  best.json

Resume: the same command again (or ``--resume``) restores the training stage's Tuner; training
trials that finished are not run again, an interrupted one resumes its run from the latest
checkpoint, and a pair whose valid ``row.json`` exists is not evaluated again. An epsilon's run is
found by its name prefix whatever trial made it, so even lost Tune state retrains nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import yaml

from tbn_ray.config import SweepConfig, parse_config, parse_yaml
from tbn_ray.distributed.jobs import JobActor, run_job_on_ray
from tbn_ray.distributed.pool import MAX_RESTARTS
from tbn_ray.distributed.runtime import RayCluster
from tbn_ray.distributed.train import Recovery, Scaling, _root_cause, train_on_ray
from tbn_ray.errors import TbnError, log
from tbn_ray.jobs.sweep_pairs import (
    PairsJob,
    eps_key,
    find_run,
    install_bn_stats,
    pair_key,
    split_heldout,
    train_config,
    trained_epochs,
    training_record,
)
from tbn_ray.reports.sweep import best_pair, table_rows, write_outputs
from tbn_ray.store.cifar10 import load_from_config
from tbn_ray.store.runs import Run
from tbn_ray.store.storage import Storage

#: A training trial only drives its Ray Train run, whose workers reserve their own resources:
#: it reserves 1 byte of memory (Tune refuses an empty request; a CPU fraction would keep
#: the Train workers from using a whole node).
TRIAL_DRIVER_RESOURCES = {"memory": 1}
#: Held-out PGD accuracy per epoch, as the Ray Train workers report it: ASHA's ranking metric.
ASHA_METRIC = "heldout_pgd_acc"


@ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
class SweepPairActor(JobActor):
    """Calibrates and certifies whole (epsilon, sigma) pairs (``jobs.sweep_pairs.PairWorker``)."""


@dataclass(frozen=True)
class SweepSpec:
    """Everything a trial needs; shipped to the trials once (``tune.with_parameters``)."""

    cfg: SweepConfig
    root: Storage  # <storage>/<sweep name>
    cluster: RayCluster
    scaling: Scaling

    @property
    def train_root(self) -> Storage:
        return self.root.child("train")

    def pair_storage(self, eps: float, sigma: float) -> Storage:
        return self.root.child("pairs", pair_key(eps, sigma))


# --- the trials ------------------------------------------------------------------------------


def train_trial(config: dict[str, Any], spec: SweepSpec) -> None:
    """Tune trial of stage 1: train (or resume, or find finished) the run of one epsilon on Ray Train."""
    import ray
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    eps = float(config["epsilon"])
    # The trial id names a new run (Ray's recommendation: unique, and stable across Tuner.restore);
    # an existing run of this epsilon is continued instead, whichever trial started it.
    name = find_run(spec.train_root, eps)
    if name is not None and trained_epochs(Run(spec.train_root.child(name))) >= spec.cfg.train.optim.epochs:
        return  # trained before an interruption: no Train run to start
    name = name or f"{eps_key(eps)}-{ray.tune.get_context().get_trial_id()}"
    # When ASHA stops this trial, its process is killed and Ray Train's placement-group cleaner frees
    # the run's workers. The cleaner finds the cluster through RAY_ADDRESS, else by auto-detection,
    # which fails on a machine running several Ray instances (the workers then stay reserved and the
    # next trial cannot start): so the run is driven from a task that carries the address, inherited
    # by the Train controller and its cleaner. The task dies with this trial (its owner).
    drive = ray.remote(num_cpus=0, max_retries=0)(_train_epsilon)
    env = {"env_vars": {"RAY_ADDRESS": spec.cluster.address}}
    ray.get(drive.options(runtime_env=env).remote(spec, eps, name, TuneReportCallback()))


def _train_epsilon(spec: SweepSpec, eps: float, name: str, report: Any) -> None:
    train_on_ray(
        train_config(spec.cfg, eps, name),
        spec.train_root,
        spec.scaling,
        spec.cluster,
        recovery=Recovery(max_failures=spec.cfg.resources.max_failures),
        callbacks=[report],
    )


# --- the driver --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepResult:
    rows: list[dict[str, Any]]  # the results table, one row per (epsilon, sigma)
    best: dict[str, Any]  # best.json
    files: dict[str, str]  # output name -> URI


def _fits(need: dict[str, float], have: dict[str, float]) -> int:
    """How many of ``need`` fit into ``have`` at once."""
    return int(min(have.get(k, 0.0) // v for k, v in need.items() if v > 0))


def _check_fits(what: str, need: dict[str, float], have: dict[str, float], fix: str) -> None:
    for resource, amount in need.items():
        if amount > have.get(resource, 0.0):
            raise TbnError(
                f"{what} needs {amount:g} {resource}, but the Ray cluster has {have.get(resource, 0.0):g} "
                f"and cannot add nodes: {fix}, or use a cluster that has them (--address)"
            )


def concurrency(cfg: SweepConfig, scaling: Scaling, cluster: RayCluster) -> tuple[int, int]:
    """Concurrent training trials and evaluation actors; a request the cluster can never hold fails here, before any trial.

    Tune does not count the Train workers a training trial starts, so the training limit must come
    from the workers' resources; on a cluster that cannot grow the user's limit is capped at what fits.
    """
    res = cfg.resources
    train_need = {k: v * scaling.workers for k, v in scaling.resources_per_worker().items()}
    eval_need = {k: v for k, v in {"CPU": res.eval_cpus, "GPU": res.eval_gpus}.items() if v > 0}
    if cluster.autoscaling:
        limit = res.max_concurrent_trials or len(cfg.epsilons) * len(cfg.sigmas)
        return min(limit, len(cfg.epsilons)), limit
    have = cluster.resources()
    _check_fits(
        f"a training trial ({scaling.workers} worker(s) x {scaling.resources_per_worker()})",
        train_need,
        have,
        "lower resources.workers, cpus_per_worker or gpus_per_worker",
    )
    _check_fits("an evaluation actor", eval_need, have, "lower resources.eval_cpus or eval_gpus")
    cap = res.max_concurrent_trials or math.inf
    return int(min(_fits(train_need, have), cap, len(cfg.epsilons))), int(min(_fits(eval_need, have), cap))


def _config_text(cfg: SweepConfig) -> str:
    # Only what the user set: the stored file re-validates (the grid-owned fields stay unset) and compares equal.
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True), sort_keys=False)


def prepare(cfg: SweepConfig, storage: Storage, *, resume: bool, say: Callable[[str], None] = log) -> Storage:
    """Checks that need no Ray (stored config, data, batch sizes); returns the sweep's root. Fails in seconds."""
    root = storage.child(cfg.name)
    storage.check()
    if root.exists("sweep.yaml"):
        where = root.object_uri("sweep.yaml")
        stored = parse_config(SweepConfig, parse_yaml(root.read_text("sweep.yaml"), where, "a sweep config"), where)
        if stored != cfg:
            raise TbnError(
                f"sweep {cfg.name!r} in {storage.uri} was started with another config: "
                "give this one another name, or restore the original config to continue it"
            )
        say(f"continuing sweep {root.uri}")
    elif resume:
        raise TbnError(f"nothing to resume: no sweep {cfg.name!r} in {storage.uri} (run without --resume to start it)")
    d = load_from_config(cfg.train.data)
    calibration, validation = split_heldout(d.heldout, cfg.validation.images)
    batch = cfg.train.optim.batch_size
    if batch % cfg.resources.workers:
        raise TbnError(f"train.optim.batch_size {batch} is not divisible by resources.workers {cfg.resources.workers}")
    if len(d.train) < batch:
        raise TbnError(
            f"{len(d.train)} training images are fewer than one batch of {batch}: lower train.optim.batch_size"
        )
    say(
        f"sweep {cfg.name}: {len(cfg.epsilons)} epsilon(s) x {len(cfg.sigmas)} sigma(s) on {d.description}; "
        f"validation: the last {len(validation)} held-out images, TBN calibration: the other {len(calibration)}"
    )
    return root


def _run_stage(
    spec: SweepSpec,
    stage: str,
    trainable: Any,
    param_space: dict[str, Any],
    tune_config: Any,
    say: Callable[[str], None],
) -> Any:
    """Run (or restore and continue) one Tune stage; a failed trial becomes an error here."""
    from ray import tune

    storage_path, filesystem = spec.root.child("tune").ray_storage()
    path = f"{storage_path.rstrip('/')}/{stage}"
    if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        say(f"{stage}: restoring the Tune experiment {path}")
        tuner = tune.Tuner.restore(
            path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=filesystem
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune_config,
            run_config=tune.RunConfig(
                name=stage,
                storage_path=storage_path,
                storage_filesystem=filesystem,
                failure_config=tune.FailureConfig(max_failures=spec.cfg.resources.max_failures),
                verbose=1,
            ),
        )
    grid = tuner.fit()
    for result in grid:
        if result.error is not None:
            cause = _root_cause(result.error)
            if isinstance(cause, TbnError):
                raise TbnError(f"{stage} trial {result.config}: {cause}") from None
            raise cause
    if grid.num_terminated < len(grid):
        raise TbnError(
            f"sweep {spec.cfg.name} interrupted in its {stage} stage: run the same command (or --resume) to continue"
        )
    return grid


def _trial_name(trial: Any) -> str:
    return eps_key(trial.config["epsilon"])


def _tune_config(max_concurrent: int, *, scheduler: Any = None) -> Any:
    from ray import tune

    # No actor reuse: a trial ASHA stops must END, its process with it, so that its Train run dies
    # and the run's placement group is released (a reused process would keep training).
    return tune.TuneConfig(
        scheduler=scheduler,
        max_concurrent_trials=max_concurrent,
        reuse_actors=False,
        trial_name_creator=_trial_name,
        trial_dirname_creator=_trial_name,
    )


def _asha(cfg: SweepConfig) -> Any:
    """ASHA on the held-out PGD accuracy, or None when early stopping is off."""
    from ray.tune.schedulers import ASHAScheduler

    stop = cfg.early_stopping
    if not stop.enabled:
        return None
    # Decisions only before the last epoch (max_t = epochs - 1, no stop at max_t): a trial that
    # trains to the end finishes its own run instead of being killed while it writes it.
    return ASHAScheduler(
        time_attr="training_iteration",
        metric=ASHA_METRIC,
        mode="max",
        max_t=cfg.train.optim.epochs - 1,
        grace_period=stop.grace_period,
        reduction_factor=stop.reduction_factor,
        stop_last_trials=False,
    )


def _trained(cfg: SweepConfig, training: dict[float, dict[str, Any]]) -> list[float]:
    """The epsilons whose run trained every epoch; without early stopping, every one must have."""
    trained = [eps for eps, t in training.items() if t["epochs"] >= cfg.train.optim.epochs]
    for eps, t in training.items():
        if eps not in trained and not cfg.early_stopping.enabled:
            raise TbnError(
                f"the training run of epsilon {eps:g} stopped after {t['epochs']} epochs: run the same command to continue it"
            )
    if not trained:
        raise TbnError("early stopping stopped every training trial: raise early_stopping.grace_period or turn it off")
    return trained


def _report(
    spec: SweepSpec, training: dict[float, dict[str, Any]], pairs: dict[tuple[float, float], dict[str, Any]]
) -> SweepResult:
    """Install the evaluated TBN statistics into the training runs; write the table, heatmap and best.json."""
    cfg = spec.cfg
    for eps in dict.fromkeys(eps for eps, _ in pairs):
        install_bn_stats(Run(Storage.open(training[eps]["run"])), [spec.pair_storage(eps, s) for s in cfg.sigmas])
    rows = table_rows(cfg, training, pairs)
    best = best_pair(cfg, rows, pairs)
    files = write_outputs(cfg, spec.root, rows, best, next(iter(pairs.values())))
    return SweepResult(rows, best, files)


def run_sweep(cfg: SweepConfig, root: Storage, cluster: RayCluster, *, say: Callable[[str], None] = log) -> SweepResult:
    """Both stages, then the table, heatmap and best.json (call ``prepare`` first)."""
    from ray import tune

    res = cfg.resources
    scaling = Scaling(workers=res.workers, cpus_per_worker=res.cpus_per_worker, gpus_per_worker=res.gpus_per_worker)
    train_limit, eval_limit = concurrency(cfg, scaling, cluster)
    spec = SweepSpec(cfg, root, cluster, scaling)
    scheduler = _asha(cfg)
    if not root.exists("sweep.yaml"):  # after every check: a sweep that never started does not claim its name
        root.write_text("sweep.yaml", _config_text(cfg))
    say(
        f"stage 1: {len(cfg.epsilons)} training trial(s), at most {train_limit} at once, "
        f"each {scaling.workers} worker(s) x {scaling.resources_per_worker()}"
    )
    _run_stage(
        spec,
        "train",
        tune.with_resources(tune.with_parameters(train_trial, spec=spec), TRIAL_DRIVER_RESOURCES),
        {"epsilon": tune.grid_search(list(cfg.epsilons))},
        _tune_config(train_limit, scheduler=scheduler),
        say,
    )
    training = {eps: training_record(spec.train_root, eps) for eps in cfg.epsilons}
    trained = _trained(cfg, training)
    job = PairsJob(cfg, root, tuple((eps, training[eps]["run"]) for eps in trained))
    say(
        f"stage 2: {len(trained)} epsilon(s) x {len(cfg.sigmas)} sigma(s) to calibrate and certify, {eval_limit} at once"
    )
    pairs = run_job_on_ray(
        job, SweepPairActor, spec.cluster, actors=eval_limit, cpus_per_actor=res.eval_cpus, gpus_per_actor=res.eval_gpus
    )
    return _report(spec, training, pairs)
