"""``tbn-ray sweep``: Ray Tune over the training epsilon and the TBN noise level sigma.

The question: which training epsilon and which sigma give the AT model the best certified
accuracy at radius r (or ACR), and what does that cost in clean and PGD accuracy?

Sigma does not change training, so the sweep has two Tune stages:

1. ``train``: one trial per epsilon. The trial builds a Ray Train ``TorchTrainer``
   (``distributed.train.train_on_ray``; Train V2 runs inside the trial, whose own reservation is
   nominal: the Train workers reserve the resources) with ``TuneReportCallback`` so that Tune
   sees each epoch's held-out PGD accuracy, which optional ASHA early stopping ranks on. A
   stopped trial's process ends, and with it its Train run, whose workers are then released.
2. ``evaluate``: one trial per (epsilon, sigma) of every epsilon whose run trained all its
   epochs (a stopped trial is left out; one that finished its last epoch while being stopped
   is a complete model and is evaluated): TBN calibration at sigma, clean and PGD accuracy
   (clean BN statistics), and Cohen's CERTIFY with the frozen TBN statistics, all on held-out
   training images.

Selection hygiene: hyperparameters are chosen on a VALIDATION set, never the test set. The
held-out split (``data.py``: official train index % 10 == 9) is cut deterministically: the
last ``validation.images`` held-out images (official order) are certified, the earlier ones
calibrate TBN, so calibration and validation images are disjoint. (Training's per-epoch
held-out evaluation uses the first ``train.eval.images``; with the full data set and the
default sizes those are calibration images only.) The best pair's validation number is a
maximum over the grid, hence optimistic: certify the chosen model on the test set
(``best.json`` gives the command) for the number to report.

Layout under ``<storage>/<sweep name>/`` (local or S3; all state lives here)::

    sweep.yaml                       the config (a re-run must match it)
    train/eps=<e>-<trial id>/        one training run per epsilon (Ray Train + tbn-ray files;
                                     bn_stats.pt gets every evaluated sigma at the end)
    pairs/eps=<e>_sigma=<s>/         row.json (written last), bn_stats.pt, certify.tsv,
                                     radii.parquet, summary.json
    tune/train/  tune/evaluate/      Tune's experiment state (Tuner.restore)
    results.csv  results.parquet  results.md  heatmap.png  best.json

Resume: the same command again (or ``--resume``) restores each stage's Tuner; training
trials that finished are not run again, an interrupted one resumes its run from the latest
checkpoint, and a pair whose ``row.json`` exists is not evaluated again. An epsilon's run is
found by its name prefix whatever trial made it, so even lost Tune state retrains nothing.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from tbn_ray.science import data as data_mod
from tbn_ray.config import SweepConfig, TrainConfig, parse_config, parse_yaml
from tbn_ray.science.data import data_meta
from tbn_ray.errors import TbnError, log
from tbn_ray.distributed.runtime import RayCluster
from tbn_ray.distributed.train import Recovery, Scaling, _root_cause, train_on_ray
from tbn_ray.store.runs import CHECKPOINT, Run
from tbn_ray.science.smoothing import certify_examples, summarize, write_results
from tbn_ray.store.storage import Storage
from tbn_ray.science.tbn import bn_key, estimate_bn_stats, get_bn_stats, set_bn_stats
from tbn_ray.science.training import evaluate, resolve_device

#: Certified-accuracy radii in the results table (the objective's radius is added if not among them).
TABLE_RADII: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
EVALUATED, STOPPED = "evaluated", "stopped early (ASHA)"
ROW = "row.json"
METRICS = "metrics.csv"
#: How the held-out split was cut, stored with every pair and in best.json.
SPLIT_KEYS = ("validation_images", "validation_index", "calibration_images", "calibration_index", "split_rule")
#: A training trial only drives its Ray Train run, whose workers reserve their own resources:
#: it reserves 1 byte of memory (Tune refuses an empty request; a CPU fraction would keep
#: the Train workers from using a whole node).
TRIAL_DRIVER_RESOURCES = {"memory": 1}
#: Held-out PGD accuracy per epoch, as the Ray Train workers report it: ASHA's ranking metric.
ASHA_METRIC = "heldout_pgd_acc"


def eps_key(eps: float) -> str:
    return f"eps={eps:g}"


def pair_key(eps: float, sigma: float) -> str:
    return f"{eps_key(eps)}_sigma={sigma:g}"


def split_heldout(heldout: data_mod.Split, validation_images: int) -> tuple[data_mod.Split, data_mod.Split]:
    """(calibration, validation): the last ``validation_images`` held-out images validate, the rest calibrate."""
    if validation_images >= len(heldout):
        raise TbnError(
            f"validation.images {validation_images} leaves no held-out image for TBN calibration "
            f"(the held-out split has {len(heldout)}): lower validation.images"
        )
    cut = len(heldout) - validation_images
    return heldout.subset(slice(0, cut)), heldout.subset(slice(cut, None))


def train_config(cfg: SweepConfig, eps: float, name: str) -> TrainConfig:
    """The training config of one epsilon: the sweep's ``train`` with this eps and the shared ``pgd`` evaluation."""
    raw = cfg.train.model_dump(mode="json")
    raw["name"] = name
    raw["attack"]["eps"] = eps
    raw["eval"]["attack"] = cfg.pgd.model_dump(mode="json")
    return parse_config(TrainConfig, raw, f"sweep {cfg.name}, epsilon {eps:g}")


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


def trained_epochs(run: Run) -> int:
    """Epochs whose checkpoint.pt the run has written, read without loading it: the rows of
    metrics.csv, which rank 0 writes after checkpoint.pt (Ray's own checkpoint can be one ahead)."""
    if not run.storage.exists(METRICS):
        return 0
    return len(run.storage.read_text(METRICS).strip().splitlines()) - 1


def find_run(train_root: Storage, eps: float) -> str | None:
    """The training run of ``eps`` (any trial's), the furthest on if several; None if none has a checkpoint."""
    prefix = f"{eps_key(eps)}-"
    names = sorted({k.split("/", 1)[0] for k in train_root.list(prefix) if k.endswith(f"/{CHECKPOINT}")})
    if not names:
        return None
    return max(names, key=lambda name: trained_epochs(Run(train_root.child(name))))


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


def evaluate_pair(
    cfg: SweepConfig, run: Run, eps: float, sigma: float, out: Storage, device: torch.device
) -> dict[str, Any]:
    """Calibrate TBN at sigma, measure clean/PGD accuracy and certify, all on held-out images; writes ``out``."""
    model, ckpt = run.load_model(device)
    if ckpt.epoch < cfg.train.optim.epochs:
        raise TbnError(
            f"{run.uri}/{CHECKPOINT} is at epoch {ckpt.epoch} of {cfg.train.optim.epochs}: run the sweep again to finish training"
        )
    d = data_mod.load_from_config(ckpt.config.data)
    calibration, validation = split_heldout(d.heldout, cfg.validation.images)
    # Clean and PGD accuracy with the trained (clean) BN statistics, under the sweep's one attack.
    ev = evaluate(
        model, validation.images, validation.labels, cfg.pgd, device,
        batch_size=cfg.train.eval.batch_size, seed=cfg.train.seed, amp=cfg.train.optim.amp,
    )  # fmt: skip
    clean_stats = get_bn_stats(model)
    t0 = time.perf_counter()
    stats = estimate_bn_stats(
        model, data_mod.to_float(calibration.images), sigma=sigma, samples=cfg.calibrate.samples,
        batch_size=cfg.calibrate.batch_size, seed=cfg.calibrate.seed, device=device,
    )  # fmt: skip
    calibrate_seconds = time.perf_counter() - t0
    set_bn_stats(model, stats)
    t0 = time.perf_counter()
    c = cfg.certify
    records = certify_examples(
        model, validation.images, validation.labels, validation.index, sigma=sigma, n0=c.n0, n=c.n,
        alpha=c.alpha, batch_size=c.batch_size, seed=c.seed, device=device,
    )  # fmt: skip
    certify_seconds = time.perf_counter() - t0
    set_bn_stats(model, clean_stats)
    split = {  # SPLIT_KEYS
        "validation_images": len(validation),
        "validation_index": [int(validation.index[0]), int(validation.index[-1])],
        "calibration_images": len(calibration),
        "calibration_index": [int(calibration.index[0]), int(calibration.index[-1])],
        "split_rule": "held-out train images (index % 10 == 9) in official order: the last validation_images are "
        "certified, the earlier ones calibrate TBN (disjoint)",
    }
    summary = summarize(records)
    params = {
        "sigma": float(sigma), "n0": c.n0, "n": c.n, "alpha": c.alpha, "seed": c.seed, "batch_size": c.batch_size,
        "bn": bn_key(sigma), "model": ckpt.config.model.arch, "run": run.uri, "epoch": ckpt.epoch, "epsilon": eps,
        "images": "held-out validation (not the test set)", **data_meta(d), **split,
    }  # fmt: skip
    write_results(records, summary, out, params)
    meta = {
        "sigma": float(sigma), "samples": cfg.calibrate.samples, "batch_size": cfg.calibrate.batch_size,
        "seed": cfg.calibrate.seed, "heldout_images": len(calibration),
        "heldout_rule": split["split_rule"] + " (calibration part)", **data_meta(d), "seconds": round(calibrate_seconds, 3),
    }  # fmt: skip
    Run(out).save_bn_sets({bn_key(sigma): {"stats": stats, "meta": meta}})
    row = {
        "epsilon": eps,
        "sigma": float(sigma),
        "run": run.uri,
        "checkpoint": run.storage.object_uri(CHECKPOINT),
        "epoch": ckpt.epoch,
        "clean_acc": ev["clean_acc"],
        "pgd_acc": ev["pgd_acc"],
        "smoothed_clean_acc": summary["clean_accuracy_smoothed"],
        "certified_accuracy": summary["certified_accuracy"],
        "acr": summary["acr"],
        "abstain_rate": summary["abstain_rate"],
        "calibrate_seconds": calibrate_seconds,
        "certify_seconds": certify_seconds,
        "results": out.uri,
        **data_meta(d),
        **split,
    }
    out.write_json(ROW, row)  # last: its presence marks a finished pair
    return row


def eval_trial(config: dict[str, Any], spec: SweepSpec) -> None:
    """Tune trial of stage 2: one (epsilon, sigma) pair, skipped if its row is already stored."""
    import ray.tune

    eps, sigma = float(config["epsilon"]), float(config["sigma"])
    out = spec.pair_storage(eps, sigma)
    if out.exists(ROW):
        row = out.read_json(ROW)
    else:
        name = find_run(spec.train_root, eps)
        if name is None:
            raise TbnError(f"no training run for epsilon {eps:g} under {spec.train_root.uri}")
        res = spec.cfg.resources
        torch.set_num_threads(max(1, int(res.eval_cpus)))
        device = resolve_device("cuda" if res.eval_gpus > 0 else "cpu")
        row = evaluate_pair(spec.cfg, Run(spec.train_root.child(name)), eps, sigma, out, device)
    ray.tune.report({"objective": objective_value(spec.cfg, row), "acr": row["acr"], "pgd_acc": row["pgd_acc"]})


def objective_value(cfg: SweepConfig, row: dict[str, Any]) -> float:
    r = cfg.objective_radius
    return float(row["acr"] if r is None else row["certified_accuracy"][str(float(r))])


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
    """Concurrent (training, evaluation) trials; a request the cluster can never hold fails here, before any trial.

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
        f"a training trial ({scaling.workers} worker(s) x {scaling.resources_per_worker()})", train_need, have,
        "lower resources.workers, cpus_per_worker or gpus_per_worker",
    )  # fmt: skip
    _check_fits("an evaluation trial", eval_need, have, "lower resources.eval_cpus or eval_gpus")
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
    d = data_mod.load_from_config(cfg.train.data)
    calibration, validation = split_heldout(d.heldout, cfg.validation.images)
    batch = cfg.train.optim.batch_size
    if batch % cfg.resources.workers:
        raise TbnError(f"train.optim.batch_size {batch} is not divisible by resources.workers {cfg.resources.workers}")
    if len(d.train) < batch:
        raise TbnError(f"{len(d.train)} training images are fewer than one batch of {batch}: lower train.optim.batch_size")
    say(
        f"sweep {cfg.name}: {len(cfg.epsilons)} epsilon(s) x {len(cfg.sigmas)} sigma(s) on {d.description}; "
        f"validation: the last {len(validation)} held-out images, TBN calibration: the other {len(calibration)}"
    )
    return root


def _run_stage(
    spec: SweepSpec, stage: str, trainable: Any, param_space: dict[str, Any], tune_config: Any, say: Callable[[str], None]
) -> Any:
    """Run (or restore and continue) one Tune stage; a failed trial becomes an error here."""
    from ray import tune

    storage_path, filesystem = spec.root.child("tune").ray_storage()
    path = f"{storage_path.rstrip('/')}/{stage}"
    if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        say(f"{stage}: restoring the Tune experiment {path}")
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=filesystem)
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
        raise TbnError(f"sweep {spec.cfg.name} interrupted in its {stage} stage: run the same command (or --resume) to continue")
    return grid


def _trial_name(trial: Any) -> str:
    c = trial.config
    return eps_key(c["epsilon"]) if "sigma" not in c else pair_key(c["epsilon"], c["sigma"])


def _tune_config(max_concurrent: int, *, scheduler: Any = None, reuse_actors: bool = False) -> Any:
    from ray import tune

    return tune.TuneConfig(
        scheduler=scheduler, max_concurrent_trials=max_concurrent, reuse_actors=reuse_actors,
        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
    )  # fmt: skip


def run_sweep(cfg: SweepConfig, root: Storage, cluster: RayCluster, *, say: Callable[[str], None] = log) -> SweepResult:
    """Both stages, then the table, heatmap and best.json (call ``prepare`` first)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    res = cfg.resources
    scaling = Scaling(workers=res.workers, cpus_per_worker=res.cpus_per_worker, gpus_per_worker=res.gpus_per_worker)
    train_limit, eval_limit = concurrency(cfg, scaling, cluster)
    spec = SweepSpec(cfg, root, cluster, scaling)
    stop = cfg.early_stopping
    scheduler = None
    if stop.enabled:
        # Decisions only before the last epoch (max_t = epochs - 1, no stop at max_t): a trial that
        # trains to the end finishes its own run instead of being killed while it writes it.
        scheduler = ASHAScheduler(
            time_attr="training_iteration", metric=ASHA_METRIC, mode="max", max_t=cfg.train.optim.epochs - 1,
            grace_period=stop.grace_period, reduction_factor=stop.reduction_factor, stop_last_trials=False,
        )  # fmt: skip
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
        # No actor reuse here: a trial ASHA stops must END, its process with it, so that its Train run dies
        # and the run's placement group is released (a reused process would keep training).
        _tune_config(train_limit, scheduler=scheduler),
        say,
    )
    training = {eps: _training(spec.train_root, eps) for eps in cfg.epsilons}
    trained = [eps for eps, t in training.items() if t["epochs"] >= cfg.train.optim.epochs]
    for eps, t in training.items():
        if eps not in trained and not stop.enabled:
            raise TbnError(
                f"the training run of epsilon {eps:g} stopped after {t['epochs']} epochs: run the same command to continue it"
            )
    if not trained:
        raise TbnError("early stopping stopped every training trial: raise early_stopping.grace_period or turn it off")
    say(f"stage 2: {len(trained)} epsilon(s) x {len(cfg.sigmas)} sigma(s) to calibrate and certify, {eval_limit} at once")
    _run_stage(
        spec,
        "evaluate",
        tune.with_resources(tune.with_parameters(eval_trial, spec=spec), {"CPU": res.eval_cpus, "GPU": res.eval_gpus}),
        {"epsilon": tune.grid_search(trained), "sigma": tune.grid_search(list(cfg.sigmas))},
        _tune_config(eval_limit, reuse_actors=True),  # saves a Python + torch start per pair
        say,
    )
    pairs = {(eps, s): spec.pair_storage(eps, s).read_json(ROW) for eps in trained for s in cfg.sigmas}
    for eps in trained:
        _install_bn_stats(Run(Storage.open(training[eps]["run"])), [spec.pair_storage(eps, s) for s in cfg.sigmas])
    rows = [_table_row(cfg, eps, s, training[eps], pairs.get((eps, s))) for eps in cfg.epsilons for s in cfg.sigmas]
    best = _best(cfg, rows, pairs)
    files = write_outputs(cfg, root, rows, best, next(iter(pairs.values())))
    return SweepResult(rows, best, files)


def _training(train_root: Storage, eps: float) -> dict[str, Any]:
    """An epsilon's run, epochs and training seconds (epoch compute plus held-out evaluation), from metrics.csv."""
    name = find_run(train_root, eps)
    if name is None:
        return {"run": None, "epochs": 0, "train_seconds": None}
    run = Run(train_root.child(name))
    text = run.storage.read_text(METRICS) if run.storage.exists(METRICS) else ""
    try:
        rows = list(csv.DictReader(io.StringIO(text)))
        seconds = sum(float(r["seconds"]) + float(r.get("eval_seconds") or 0) for r in rows)
    except (csv.Error, KeyError, TypeError, ValueError):
        raise TbnError(f"{run.storage.object_uri(METRICS)} is damaged (no number in its seconds column): restore it or train the run again") from None
    return {"run": run.uri, "epochs": len(rows), "train_seconds": round(seconds, 3) if rows else None}


def _install_bn_stats(run: Run, pairs: list[Storage]) -> None:
    """Each evaluated sigma's TBN statistics into the training run, so ``tbn-ray certify <run> --sigma s`` works."""
    sets = run.load_bn_sets()
    for out in pairs:
        sets.update(Run(out).load_bn_sets())
    run.save_bn_sets(sets)


def _radius_columns(cfg: SweepConfig) -> list[float]:
    r = cfg.objective_radius
    return list(TABLE_RADII) if r is None or r in TABLE_RADII else sorted({*TABLE_RADII, r})


def _table_row(cfg: SweepConfig, eps: float, sigma: float, training: dict[str, Any], pair: dict[str, Any] | None) -> dict[str, Any]:
    """One (epsilon, sigma) row; a stopped epsilon keeps its training columns and leaves the rest empty."""
    row: dict[str, Any] = {
        "epsilon": eps,
        "sigma": sigma,
        "status": EVALUATED if pair is not None else STOPPED,
        "epochs": training["epochs"],
        "clean_acc": None,
        "pgd_acc": None,
        "smoothed_clean_acc": None,
        **{f"certified_acc@{r:g}": None for r in _radius_columns(cfg)},
        "acr": None,
        "abstain_rate": None,
        "objective": None,
        "train_seconds": training["train_seconds"],
        "calibrate_seconds": None,
        "certify_seconds": None,
        "checkpoint": f"{training['run']}/{CHECKPOINT}" if training["run"] else None,
    }
    if pair is not None:
        row.update(
            {k: pair[k] for k in ("clean_acc", "pgd_acc", "smoothed_clean_acc", "acr", "abstain_rate")},
            **{f"certified_acc@{r:g}": pair["certified_accuracy"][str(float(r))] for r in _radius_columns(cfg)},
            objective=objective_value(cfg, pair),
            calibrate_seconds=round(pair["calibrate_seconds"], 3),
            certify_seconds=round(pair["certify_seconds"], 3),
        )
    return row


def _best(cfg: SweepConfig, rows: list[dict[str, Any]], pairs: dict[tuple[float, float], dict[str, Any]]) -> dict[str, Any]:
    """The pair with the highest objective, ready for ``tbn-ray certify``. Ties (common with few
    validation images) go to the higher ACR, then to the first in grid order."""
    top = max((r for r in rows if r["status"] == EVALUATED), key=lambda r: (r["objective"], r["acr"]))
    pair = pairs[(top["epsilon"], top["sigma"])]
    return {
        "sweep": cfg.name,
        "objective": cfg.objective,
        "value": top["objective"],
        "epsilon": top["epsilon"],
        "sigma": top["sigma"],
        "run": pair["run"],
        "checkpoint": pair["checkpoint"],
        "epoch": pair["epoch"],
        "bn_stats": bn_key(top["sigma"]),
        "certify_command": f"tbn-ray certify {pair['run']} --sigma {top['sigma']:g}",
        "note": "the objective is the best of the grid on held-out validation images (optimistic); certify on the test set to report",
        "validation": {k: pair[k] for k in (*SPLIT_KEYS, "data")},
        "row": top,
    }


# --- outputs -----------------------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _markdown(cfg: SweepConfig, rows: list[dict[str, Any]], best: dict[str, Any], pair: dict[str, Any]) -> str:
    radii = _radius_columns(cfg)
    head = ["epsilon", "sigma", "status", "epochs", "clean %", "PGD %", "smoothed clean %", *(f"cert. r={r:g} %" for r in radii),
            "ACR", "abstain %", "train s", "calibrate s", "certify s"]  # fmt: skip
    lines = [
        f"# Sweep {cfg.name}: training epsilon x TBN sigma",
        "",
        f"Objective: **{cfg.objective}**. Best: epsilon {best['epsilon']:g}, sigma {best['sigma']:g} "
        f"({best['value']:.3f}), checkpoint `{best['checkpoint']}`; next: `{best['certify_command']}`.",
        "",
        f"Data: {pair['data']}. Validation: {pair['validation_images']} held-out training images (official train "
        f"indices {pair['validation_index'][0]}..{pair['validation_index'][1]}), never the test set; TBN statistics "
        f"calibrated on the other {pair['calibration_images']} held-out images (disjoint), "
        f"{cfg.calibrate.samples} noisy samples per sigma. CERTIFY n0={cfg.certify.n0}, n={cfg.certify.n}, "
        f"alpha={cfg.certify.alpha}. PGD: {cfg.pgd.norm} eps={cfg.pgd.eps:g}, {cfg.pgd.steps} steps, clean BN statistics. "
        f"Training attack: {cfg.train.attack.norm} PGD at each epsilon, {cfg.train.attack.steps} steps, "
        f"{cfg.train.optim.epochs} epochs of {cfg.train.model.arch}.",
        "",
        "The best value is a maximum over the grid on the validation images, so it is optimistic: "
        "certify the chosen model on the test set for the number to report.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [f"{r['epsilon']:g}", f"{r['sigma']:g}", r["status"], str(r["epochs"]), _pct(r["clean_acc"]), _pct(r["pgd_acc"]),
                 _pct(r["smoothed_clean_acc"]), *(_pct(r[f"certified_acc@{x:g}"]) for x in radii),
                 "-" if r["acr"] is None else f"{r['acr']:.3f}", _pct(r["abstain_rate"]),
                 *("-" if r[k] is None else f"{r[k]:.1f}" for k in ("train_seconds", "calibrate_seconds", "certify_seconds"))]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _heatmap(cfg: SweepConfig, rows: list[dict[str, Any]], best: dict[str, Any]) -> bytes:
    """The objective over (epsilon, sigma); stopped epsilons are blank."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.patches import Rectangle

    eps, sig = list(cfg.epsilons), list(cfg.sigmas)
    grid = np.full((len(eps), len(sig)), np.nan)
    for r in rows:
        if r["objective"] is not None:
            grid[eps.index(r["epsilon"]), sig.index(r["sigma"])] = r["objective"]
    fig = Figure(figsize=(1.3 * len(sig) + 2.5, 0.8 * len(eps) + 1.8), dpi=110)
    ax = fig.add_subplot()
    top = float(np.nanmax(grid)) or 1.0
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto", vmin=0, vmax=top)
    for i in range(len(eps)):
        for j in range(len(sig)):
            value = grid[i, j]
            dark = np.isnan(value) or value < 0.6 * top  # viridis: white text on the dark end
            text = "stopped" if np.isnan(value) else f"{value:.3f}"
            ax.text(j, i, text, ha="center", va="center", color="white" if dark else "black", fontsize=8)
    i, j = eps.index(best["epsilon"]), sig.index(best["sigma"])
    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(len(sig)), [f"{s:g}" for s in sig])
    ax.set_yticks(range(len(eps)), [f"{e:g}" for e in eps])
    ax.set(xlabel="TBN sigma", ylabel=f"training epsilon ({cfg.train.attack.norm})", title=f"{cfg.name}: {cfg.objective} (validation)")
    ax.set_facecolor("0.85")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_outputs(
    cfg: SweepConfig, root: Storage, rows: list[dict[str, Any]], best: dict[str, Any], pair: dict[str, Any]
) -> dict[str, str]:
    """results.csv/.parquet/.md, heatmap.png and, last, best.json."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    files = {"results.csv": root.write_text("results.csv", buf.getvalue())}
    with root.writer("results.parquet") as f:
        pq.write_table(pa.Table.from_pylist(rows), f)
    files["results.parquet"] = root.object_uri("results.parquet")
    files["results.md"] = root.write_text("results.md", _markdown(cfg, rows, best, pair))
    files["heatmap.png"] = root.write_bytes("heatmap.png", _heatmap(cfg, rows, best))
    files["best.json"] = root.write_json("best.json", best)
    return files
