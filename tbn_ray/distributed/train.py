"""Distributed PGD adversarial training on Ray Train (V2 ``TorchTrainer``, DDP).

The worker loop is a shell around ``training.fit``, the loop the in-process pipeline runs,
with Ray's three calls passed in (``prepare_model``, ``prepare_data_loader``,
``ray.train.report``) and the collectives over the process group (all-reduce of the epoch
metrics, rank 0's BN statistics broadcast): the science stays in the science modules.
Backend: nccl when workers have GPUs, else gloo.

Global batch rule: ``optim.batch_size`` is the GLOBAL batch. Each of W workers trains on
``batch_size / W`` images per step (W must divide it), so one SGD step always averages
the gradient of ``batch_size`` images and the learning rate needs no rescaling when W
changes. Each worker's ``DistributedSampler`` (seeded with the run's seed, reshuffled per
epoch with ``set_epoch``) gives it a disjoint ``1/W`` of the training set. BatchNorm
normalises per worker batch (no SyncBatchNorm), as in ordinary DDP; the running statistics
saved are rank 0's.

Run directory ``<storage>/<run name>`` (Ray's ``storage_path`` is the storage root and its
run name is the run's name, so Ray's files and the project's share one directory)::

    checkpoint_epochNNNN/checkpoint.pt   Ray's checkpoints, the last K kept (tbn-ray format)
    checkpoint.pt  best.pt               the latest and the best (held-out PGD accuracy; noise accuracy for the noise objectives)
    config.yaml  metrics.csv  metrics.png

Every checkpoint, Ray's included, is a complete tbn-ray checkpoint, so ``tbn-ray
calibrate/certify`` accept the run directory or any ``.../checkpoint_epochNNNN/checkpoint.pt``.
Re-running with the same run name resumes from the latest checkpoint (Ray's, or the run's
own ``checkpoint.pt`` left by an in-process run); ``fresh`` empties the run directory first.
``meta["started_at_epochs"]`` in each checkpoint records every (re)start of the loop, so a
resume or a recovery after a lost worker is visible in the checkpoint itself.

The console of a successful run shows tbn-ray's own lines (one per epoch, from rank 0); Ray
Train's own messages below ERROR go only to its log files (``logs/train`` in the Ray session
directory, e.g. ``/tmp/ray/session_latest/logs/train`` on the node of the driver and of each worker).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tbn_ray.config import RayConfig, TrainConfig
from tbn_ray.errors import TbnError, log
from tbn_ray.jobs.pipeline import epoch_line, existing_checkpoint, resume_from, save_epoch
from tbn_ray.science import data as data_mod
from tbn_ray.science.data import data_meta
from tbn_ray.science.training import DataParallel, EpochCallback, fit, selection_metric, unwrap
from tbn_ray.store.cifar10 import load_from_config
from tbn_ray.store.runs import CHECKPOINT, Checkpoint, Run, checkpoint_from_bytes, make_checkpoint
from tbn_ray.store.storage import Storage

if TYPE_CHECKING:
    from ray.train.torch import TorchTrainer

    from tbn_ray.distributed.runtime import RayCluster

RAY_CHECKPOINT_PREFIX = "checkpoint_epoch"
#: A failed or timed-out start of the worker group is retried this often, then the run fails.
CONTROLLER_FAILURE_LIMIT = 1
#: Seconds to wait for all workers to be placed: short where no node can be added (an
#: impossible request then fails within about a minute), long enough for a cloud node to boot otherwise.
START_TIMEOUT_STATIC_S = 30.0
START_TIMEOUT_AUTOSCALING_S = 900.0
_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
#: Ray Train's watcher of node drains only logs them; on a one-node cluster (a local instance)
#: there is no other node to drain, and starting it prints a Ray core error line on every run.
_PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
#: Settings that say WHERE data and storage are (never credentials): workers must see the driver's.
_PROPAGATED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "TBN_DATA",
    "TBN_SHARED_DATA",
    "TBN_DATA_ROOT",
    "TBN_CACHE",
)


#: Defaults of Scaling and Recovery: the ``ray`` section of the typed config.
_RAY = RayConfig()


@dataclass(frozen=True)
class Scaling:
    """How many DDP workers, and what each one reserves.

    ``cpus_per_worker=None``: on a local instance this process started, its CPUs shared
    evenly among the workers (torch uses that many threads); on a joined cluster 1 per
    worker, Ray's default (GPU workers need little CPU: data and augmentation are on the GPU).
    """

    workers: int = _RAY.workers
    cpus_per_worker: float | None = _RAY.cpus_per_worker
    gpus_per_worker: int = _RAY.gpus_per_worker

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise TbnError(f"--workers must be at least 1, got {self.workers}")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise TbnError(f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}")
        if self.gpus_per_worker not in (0, 1):
            raise TbnError(
                f"--gpus-per-worker must be 0 or 1, got {self.gpus_per_worker}: a DDP worker drives one GPU "
                "(NCCL cannot share one between workers); use --workers to use more GPUs"
            )

    def resolve(self, cluster: RayCluster) -> Scaling:
        """This request with ``cpus_per_worker`` decided for ``cluster``."""
        if self.cpus_per_worker is not None:
            return self
        cpus = max(1, int(cluster.resources().get("CPU", 1)) // self.workers) if cluster.started_here else 1
        return replace(self, cpus_per_worker=float(cpus))

    def per_worker_batch(self, global_batch: int) -> int:
        """The global batch split evenly (see the module docstring for the rule)."""
        if global_batch % self.workers:
            raise TbnError(
                f"global batch size {global_batch} is not divisible by {self.workers} workers: "
                "set optim.batch_size to a multiple of --workers (the global batch is kept as is)"
            )
        return global_batch // self.workers

    def resources_per_worker(self) -> dict[str, float]:
        if self.cpus_per_worker is None:
            raise ValueError("unresolved Scaling: call resolve(cluster) first")
        res = {"CPU": float(self.cpus_per_worker)}
        if self.gpus_per_worker:
            res["GPU"] = float(self.gpus_per_worker)
        return res


@dataclass(frozen=True)
class Recovery:
    """Checkpoint retention and failure handling."""

    keep: int = _RAY.keep  # Ray checkpoints kept (the most recent); best.pt is kept besides
    max_failures: int = _RAY.max_failures  # worker-group failures recovered from the latest checkpoint
    start_timeout_s: float | None = _RAY.start_timeout_s  # None: by cluster kind (START_TIMEOUT_*)

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise TbnError(f"--keep must be at least 1, got {self.keep}")
        if self.max_failures < 0:
            raise TbnError(f"--max-failures must be >= 0, got {self.max_failures}")
        if self.start_timeout_s is not None and not self.start_timeout_s > 0:
            raise TbnError(f"--start-timeout must be > 0 seconds, got {self.start_timeout_s}")


# --- the worker loop ---------------------------------------------------------------------------


def _latest_checkpoint(run: Run) -> Checkpoint | None:
    """Ray's latest reported checkpoint or the run's own checkpoint.pt, whichever is further on."""
    import ray.train

    found: list[Checkpoint] = []
    reported = ray.train.get_checkpoint()
    if reported is not None:
        with reported.as_directory() as folder:
            path = Path(folder) / CHECKPOINT
            found.append(checkpoint_from_bytes(path.read_bytes(), f"{reported.path}/{CHECKPOINT}"))
    if run.has_checkpoint():
        found.append(run.load_checkpoint())
    return max(found, key=lambda c: c.epoch, default=None)  # a tie keeps Ray's (listed first)


def _all_reduce(values: list[float], device: torch.device, op: str) -> list[float]:
    """Sum or max over workers (a no-op for one worker)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def _broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's BN running statistics everywhere, so every shard is evaluated with the saved model."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buf in unwrap(model).buffers():
            dist.broadcast(buf, src=0)


def _reduce_metrics(metrics: dict[str, Any], device: torch.device, world: int) -> dict[str, Any]:
    """One worker's epoch metrics -> the group's: image-weighted means, total images, the slowest worker's seconds."""
    n_eval = metrics["heldout_images"]
    loss_sum, correct, images, clean, robust, n_all = _all_reduce(
        [
            metrics["train_loss"] * metrics["images"],
            metrics["train_acc"] * metrics["images"],
            metrics["images"],
            (metrics["heldout_clean_acc"] or 0.0) * n_eval,
            (metrics["heldout_pgd_acc"] or 0.0) * n_eval,
            n_eval,
        ],
        device,
        "sum",
    )
    seconds, eval_seconds = _all_reduce([metrics["seconds"], metrics["eval_seconds"]], device, "max")
    noise = {}
    if "heldout_noise_acc" in metrics:
        (noisy,) = _all_reduce([(metrics["heldout_noise_acc"] or 0.0) * n_eval], device, "sum")
        noise = {"heldout_noise_acc": noisy / n_all}
    return {
        **metrics,
        "train_loss": loss_sum / images,
        "train_acc": correct / images,
        "images": int(images),
        "seconds": seconds,
        "images_per_s": images / seconds,
        "heldout_clean_acc": clean / n_all,
        "heldout_pgd_acc": robust / n_all if metrics["heldout_pgd_acc"] is not None else None,
        **noise,
        "heldout_images": int(n_all),
        "eval_seconds": eval_seconds,
        "workers": world,
    }


class _TbnOnlyBelowWarning(logging.Filter):
    """On a worker's console, INFO and DEBUG only from tbn-ray: Ray logs its own chatter (some of
    it under loggers outside ``ray.train``) to its session's log files, where it stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.startswith("tbn_ray")


def _quiet_console() -> None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(_TbnOnlyBelowWarning())


def _worker_log(msg: str) -> None:
    # Through logging, not print: Ray Train both tees and logs a worker's print, so it would show twice.
    logging.getLogger(__name__).info(f"[tbn-ray] {msg}")


def _reporter(
    cfg: TrainConfig, run: Run, d: data_mod.Cifar10, meta: dict[str, Any], rank: int, world: int
) -> EpochCallback:
    """``fit``'s per-epoch hook on a Ray worker: every rank reports to Ray Train; rank 0 with a
    checkpoint, then writes the run's own files (after Ray holds the checkpoint, so they never
    get ahead of what a restart resumes from)."""
    import ray.train

    history: list[dict[str, Any]] = list(meta.get("history", []))
    chosen_by = selection_metric(cfg)
    best = meta.get(f"best_{chosen_by}")

    def on_epoch(epoch: int, metrics: dict[str, Any], model: Any, optimizer: Any, scheduler: Any) -> None:
        nonlocal best
        is_best = best is None or metrics[chosen_by] > best
        if is_best:
            best = metrics[chosen_by]
            meta["best_epoch"] = epoch + 1
        history.append(metrics)
        meta.update(
            data_meta(d),
            history=history,
            metrics=metrics,
            **{f"best_{chosen_by}": best},
            trainer="ray",
            workers=world,
            global_batch_size=cfg.optim.batch_size,
        )
        name = f"{RAY_CHECKPOINT_PREFIX}{epoch + 1:04d}"
        if rank != 0:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        ckpt = make_checkpoint(model, cfg, epoch + 1, meta, optimizer, scheduler)
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / CHECKPOINT).write_bytes(ckpt.to_bytes())
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)
        save_epoch(run, ckpt, history, best=is_best)
        _worker_log(epoch_line(metrics, cfg.optim.epochs))

    return on_epoch


def worker_loop(config: dict[str, Any]) -> None:
    """One DDP worker: ``train_loop_per_worker`` of the ``TorchTrainer``, a shell around ``training.fit``."""
    import ray.train
    import ray.train.torch

    cfg: TrainConfig = config["cfg"]
    run: Run = config["run"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(config["threads"])
    _quiet_console()

    d = load_from_config(cfg.data)
    resumed = _latest_checkpoint(run)
    meta = dict(resumed.meta) if resumed is not None else {}
    start = resumed.epoch if resumed is not None else 0
    meta["started_at_epochs"] = [*meta.get("started_at_epochs", []), start]
    if rank == 0 and start:
        _worker_log(f"resuming {run.uri} at epoch {start} with {world} worker(s)")
    parallel = DataParallel(
        rank=rank,
        world=world,
        prepare_model=ray.train.torch.prepare_model,  # DDP for world > 1; rank 0's weights are broadcast
        prepare_loader=lambda loader: ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False),
        sync_buffers=_broadcast_buffers,
        reduce_metrics=lambda metrics: _reduce_metrics(metrics, device, world),
    )
    fit(
        cfg,
        d,
        device,
        resume=resume_from(resumed, cfg, run.uri) if resumed is not None else None,
        parallel=parallel,
        on_epoch=_reporter(cfg, run, d, meta, rank, world),
        progress=False,
    )


# --- the driver ----------------------------------------------------------------------------------


def check_fits(scaling: Scaling, available: dict[str, float]) -> None:
    """Refuse at once a request a cluster that cannot grow will never place (instead of waiting)."""
    for resource, each in scaling.resources_per_worker().items():
        need, have = each * scaling.workers, available.get(resource, 0.0)
        if need > have:
            raise TbnError(
                f"{scaling.workers} workers x {each:g} {resource} need {need:g} {resource}, but the Ray cluster "
                f"has {have:g} and cannot add nodes: lower --workers or --{resource.lower()}s-per-worker, "
                "or use a cluster that has them (--address)"
            )


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Ray Train reads some settings only from the driver's environment (and passes them on)."""
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def make_trainer(
    cfg: TrainConfig, root: Storage, scaling: Scaling, recovery: Recovery, callbacks: Sequence[Any] = ()
) -> TorchTrainer:
    """The ``TorchTrainer`` for a run; ``fit_trainer`` runs it with a bounded start and one-line errors.

    ``callbacks``: Ray Train ``UserCallback``s, e.g. Tune's ``TuneReportCallback`` when a Tune trial drives the run.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage_path, filesystem = root.ray_storage()
    env = {k: os.environ[k] for k in _PROPAGATED_ENV if os.environ.get(k)}
    return TorchTrainer(
        worker_loop,
        train_loop_config={
            "cfg": cfg,
            "run": Run(root.child(cfg.name)),
            "threads": max(1, int(scaling.resources_per_worker()["CPU"])),
        },
        torch_config=TorchConfig(backend="nccl" if scaling.gpus_per_worker else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=scaling.workers,
            use_gpu=bool(scaling.gpus_per_worker),
            resources_per_worker=scaling.resources_per_worker(),
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=recovery.keep),
            failure_config=FailureConfig(
                max_failures=recovery.max_failures, controller_failure_limit=CONTROLLER_FAILURE_LIMIT
            ),
            worker_runtime_env={"env_vars": env} if env else None,
            callbacks=list(callbacks) or None,
            # Ray Train's INFO/WARNING lines (worker-group start, reports, retried requests with their
            # tracebacks) read as failures on a console; they stay in the session's logs/train files.
            logging_config=LoggingConfig(log_level="ERROR"),
        ),
    )


def start_timeout(recovery: Recovery, cluster: RayCluster) -> float:
    if recovery.start_timeout_s is not None:
        return recovery.start_timeout_s
    return START_TIMEOUT_AUTOSCALING_S if cluster.autoscaling else START_TIMEOUT_STATIC_S


def fit_trainer(trainer: TorchTrainer, scaling: Scaling, timeout_s: float, *, one_node: bool = False) -> Any:
    """``trainer.fit()`` with a bounded worker start; Ray's failures become one-line TbnErrors.

    ``one_node``: a cluster of one node that cannot grow, whose workers no other node's drain can preempt.
    """
    from ray.train import ControllerError, WorkerGroupError

    attempts = CONTROLLER_FAILURE_LIMIT + 1
    try:
        with _environ({_START_TIMEOUT_ENV: str(timeout_s), **({_PREEMPTION_WATCHER_ENV: "0"} if one_node else {})}):
            return trainer.fit()
    except ControllerError as e:
        cause = e.controller_failure
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise TbnError(
            f"could not start {scaling.workers} Ray Train workers with {scaling.resources_per_worker()} each "
            f"({attempts} attempts of {timeout_s:g} s): {first[:300]}; lower --workers/--cpus-per-worker/"
            "--gpus-per-worker, add nodes, or raise --start-timeout while a cluster is scaling up"
        ) from None
    except WorkerGroupError as e:
        user = [f for f in e.worker_failures.values() if isinstance(_root_cause(f), TbnError)]
        if user:
            raise TbnError(str(_root_cause(user[0]))) from None
        raise


def _root_cause(error: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers (RayTaskError and friends)."""
    cause = getattr(error, "cause", None)
    return _root_cause(cause) if isinstance(cause, BaseException) and cause is not error else error


def train_on_ray(
    cfg: TrainConfig,
    root: Storage,
    scaling: Scaling,
    cluster: RayCluster,
    *,
    recovery: Recovery = Recovery(),
    fresh: bool = False,
    say: Callable[[str], None] = log,
    callbacks: Sequence[Any] = (),
) -> Checkpoint:
    """Train (or resume) run ``cfg.name`` under ``root`` on the connected Ray cluster; returns the final checkpoint."""
    scaling = scaling.resolve(cluster)
    per_worker = scaling.per_worker_batch(cfg.optim.batch_size)
    root.check()  # an unreachable or missing bucket fails here, before any worker starts
    if root.is_local and cluster.multi_node():
        raise TbnError(
            f"the Ray cluster has (or may add) several nodes, which cannot share the local directory {root.uri}: "
            "use --storage s3://bucket/prefix"
        )
    run = Run(root.child(cfg.name))
    if fresh:
        if deleted := run.clear():
            say(f"--fresh: deleted the {deleted} objects of the previous run {run.uri}")
    elif (done := existing_checkpoint(run, cfg, say)) is not None and done.epoch >= cfg.optim.epochs:
        return done
    if not cluster.autoscaling:
        check_fits(scaling, cluster.resources())
    say(
        f"training {cfg.model.arch} on Ray: {scaling.workers} worker(s) x {scaling.resources_per_worker()}, "
        f"global batch {cfg.optim.batch_size} ({per_worker} per worker), run {run.uri}"
    )
    trainer = make_trainer(cfg, root, scaling, recovery, callbacks)
    result = fit_trainer(trainer, scaling, start_timeout(recovery, cluster), one_node=not cluster.multi_node())
    if result.checkpoint is None:
        return run.load_checkpoint()
    with result.checkpoint.as_directory() as folder:
        final = checkpoint_from_bytes(
            (Path(folder) / CHECKPOINT).read_bytes(), f"{result.checkpoint.path}/{CHECKPOINT}"
        )
    # Rank 0 writes these every epoch; writing the final state again makes the run directory
    # consistent even if the last worker died between Ray's checkpoint and its own writes.
    save_epoch(run, final, final.meta.get("history", []), best=final.meta.get("best_epoch") == final.epoch)
    return final
