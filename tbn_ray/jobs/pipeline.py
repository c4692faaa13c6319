"""The in-process pipeline: train, calibrate TBN, the quickstart (no Ray).

The CLI calls these directly on the embedded default; the Ray layer calls the same
science functions from workers and actors. Everything a step reads or writes goes
through a ``runs.Run`` / ``storage.Storage``, so local and S3 runs behave alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tbn_ray.config import CalibrateConfig, DataConfig, TrainConfig
from tbn_ray.devices import resolve_device
from tbn_ray.errors import TbnError, log
from tbn_ray.jobs.certify import certify_run
from tbn_ray.reports.training import write_metrics, write_metrics_plot
from tbn_ray.science import data as data_mod
from tbn_ray.science.data import data_meta
from tbn_ray.science.noise_accuracy import accuracy_under_noise
from tbn_ray.science.tbn import CLEAN, bn_key, bn_layers, describe_bn, estimate_bn_stats, get_bn_stats, stats_distance
from tbn_ray.science.training import Resume, fit
from tbn_ray.store.certify_layout import certify_output
from tbn_ray.store.cifar10 import load_from_config
from tbn_ray.store.runs import Checkpoint, Run, load_data_for, make_checkpoint
from tbn_ray.store.storage import Storage

# --- train ------------------------------------------------------------------------------

#: The checkpoint of the epoch with the best held-out PGD accuracy (runs trained on Ray).
BEST = "best.pt"


def save_epoch(run: Run, ckpt: Checkpoint, history: list[dict[str, Any]], *, best: bool = False) -> None:
    """The run's own files after an epoch: checkpoint.pt and config.yaml, best.pt when this epoch
    is the best so far, metrics.csv and metrics.png."""
    run.save_checkpoint(ckpt)
    if best:
        run.storage.write_bytes(BEST, ckpt.to_bytes())
    write_metrics(run, history)
    write_metrics_plot(run, history)


def epoch_line(metrics: dict[str, Any], epochs: int) -> str:
    """The progress line of one finished epoch."""
    pgd = metrics.get("heldout_pgd_acc")
    noise = metrics.get("heldout_noise_acc")
    workers = f" on {metrics['workers']} worker(s)" if "workers" in metrics else ""
    robust = f"noise {noise:.3f}" if noise is not None else f"pgd {'-' if pgd is None else f'{pgd:.3f}'}"
    return (
        f"epoch {metrics['epoch'] + 1}/{epochs}: loss {metrics['train_loss']:.3f} "
        f"held-out clean {metrics['heldout_clean_acc']:.3f} {robust} "
        f"({metrics['images_per_s']:.0f} img/s{workers})"
    )


def existing_checkpoint(run: Run, cfg: TrainConfig, say: Callable[[str], None] = log) -> Checkpoint | None:
    """The run's checkpoint, if any, that training continues from (says so when it already has
    every epoch); another architecture under the same name is refused."""
    if not run.has_checkpoint():
        return None
    ckpt = run.load_checkpoint()
    if ckpt.config.model != cfg.model:
        raise TbnError(f"{run.uri} holds a {ckpt.config.model.arch} run; use another --name or --fresh")
    if ckpt.config.noise_trained != cfg.noise_trained or (
        cfg.noise_trained and ckpt.config.objective_label != cfg.objective_label
    ):
        raise TbnError(
            f"{run.uri} was trained with {ckpt.config.objective_label}, not {cfg.objective_label}; use another --name or --fresh"
        )
    if ckpt.epoch >= cfg.optim.epochs:
        say(f"{run.uri} already trained for {ckpt.epoch} epochs; nothing to do (--fresh to start over)")
    return ckpt


def resume_from(ckpt: Checkpoint, cfg: TrainConfig, where: str) -> Resume:
    """``fit``'s resume hook: this checkpoint's model, optimizer and scheduler states, and its epoch."""

    def resume(model: torch.nn.Module, optimizer: Any, scheduler: Any) -> int:
        ckpt.resume_into(model, optimizer, scheduler, cfg.model, where)
        return ckpt.epoch

    return resume


def train_run(cfg: TrainConfig, run: Run, *, fresh: bool = False, progress: bool = True) -> Checkpoint:
    """Training (``cfg.objective``) in this process, checkpointing every epoch; resumes unless ``fresh``."""
    device = resolve_device(cfg.device)
    d = load_from_config(cfg.data)
    if fresh and (deleted := run.clear()):
        log(f"--fresh: deleted the {deleted} objects of the previous run {run.uri}")
    log(
        f"training {cfg.model.arch} ({cfg.objective_label}) on {d.description}: {len(d.train)} images, held-out {len(d.heldout)}, device {device}"
    )
    previous = existing_checkpoint(run, cfg)
    if previous is not None and previous.epoch >= cfg.optim.epochs:
        return previous
    if previous is not None:
        log(f"resuming {run.uri} at epoch {previous.epoch}")
    rows: list[dict[str, Any]] = list(previous.meta.get("history", [])) if previous is not None else []
    last: list[Checkpoint] = []

    def on_epoch(epoch: int, metrics: dict[str, Any], model, optimizer, scheduler) -> None:
        rows.append(metrics)
        last[:] = [
            make_checkpoint(
                model, cfg, epoch + 1, {**data_meta(d), "history": rows, "metrics": metrics}, optimizer, scheduler
            )
        ]
        save_epoch(run, last[0], rows)
        log(epoch_line(metrics, cfg.optim.epochs))

    resume = resume_from(previous, cfg, run.uri) if previous is not None else None
    fit(cfg, d, device, resume=resume, on_epoch=on_epoch, progress=progress)
    return last[0] if last else run.load_checkpoint()


# --- calibrate --------------------------------------------------------------------------


def calibration_meta(sigma: float, cfg: CalibrateConfig, d: data_mod.Cifar10, images: int, rule: str) -> dict[str, Any]:
    """What a statistics set is estimated from: stored with it, and compared before any set is replaced."""
    return {
        "sigma": float(sigma),
        "samples": cfg.samples,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "heldout_images": images,
        "heldout_rule": rule,
        **data_meta(d),
    }


def calibrate_sigma(
    model: torch.nn.Module,
    images: torch.Tensor,
    sigma: float,
    cfg: CalibrateConfig,
    d: data_mod.Cifar10,
    *,
    rule: str,
    device: torch.device,
    progress: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One sigma's frozen TBN statistics from noisy ``images`` (float, disjoint from the test set)
    and the metadata stored with them: what they were estimated from, and how long it took."""
    t0 = time.perf_counter()
    stats = estimate_bn_stats(
        model,
        images,
        sigma=sigma,
        samples=cfg.samples,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        device=device,
        progress=progress,
    )
    meta = {**calibration_meta(sigma, cfg, d, len(images), rule), "seconds": round(time.perf_counter() - t0, 3)}
    return stats, meta


#: The held-out images TBN statistics are estimated from (never the test set).
HELDOUT_RULE = "official train index % 10 == 9"
#: Metadata that is not part of what a statistics set was estimated from.
_NOT_IDENTITY = ("seconds", "replaced")


def _made_from(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k not in _NOT_IDENTITY}


def _describe(meta: dict[str, Any]) -> str:
    return f"{meta.get('samples', '?')} samples, batch {meta.get('batch_size', '?')}, seed {meta.get('seed', '?')}, {meta.get('data', meta.get('data_source', '?'))}"


def _change(stats: dict[str, Any], clean: dict[str, Any]) -> str:
    """The relative change from the clean statistics, or why there is no meaningful one."""
    untouched = all(bool((v["running_mean"] == 0).all() and (v["running_var"] == 1).all()) for v in clean.values())
    if untouched:
        return "not comparable (the clean statistics are BatchNorm's initial 0 and 1: is the model trained?)"
    return f"{stats_distance(stats, clean):.2f}"


def calibrate_run(
    run: Run,
    cfg: CalibrateConfig,
    *,
    data_cfg: DataConfig | None = None,
    device: str = "auto",
    progress: bool = True,
    replace: bool = False,
) -> dict[str, dict[str, Any]]:
    """Estimate and store one frozen BN statistics set per sigma on noisy held-out images.

    A set already stored with the same settings is kept (the same seeded estimate); one made with
    other settings is never replaced silently: certificates name their set by its digest, so this
    refuses unless ``replace``, and a replaced set records what it replaced (``tbn-ray show``)."""
    dev = resolve_device(device)
    model, ckpt = run.load_model(dev)
    bn_layers(model)  # a model without BatchNorm is refused before any data is loaded
    d = load_data_for(ckpt, data_cfg)
    sets = run.load_bn_sets()
    todo = []
    for sigma in cfg.sigmas:
        held = sets.get(bn_key(sigma))
        planned = calibration_meta(sigma, cfg, d, len(d.heldout), HELDOUT_RULE)
        if held is None or replace:
            todo.append(sigma)
        elif _made_from(held.get("meta", {})) == planned:
            log(f"TBN {bn_key(sigma)}: already calibrated with these settings ({_describe(planned)}); kept")
        else:
            raise TbnError(
                f"{run.uri} already holds TBN statistics for {bn_key(sigma)} made with other settings ({_describe(held.get('meta', {}))}; "
                f"asked: {_describe(planned)}) and certificates may name them: calibrate with the same settings, or replace them with --replace"
            )
    if not todo:
        return sets
    heldout = data_mod.to_float(d.heldout.images)
    clean = get_bn_stats(model)
    sets[CLEAN] = {"stats": clean, "meta": {"sigma": 0.0, "source": "trained running statistics"}}
    for sigma in todo:
        stats, meta = calibrate_sigma(model, heldout, sigma, cfg, d, rule=HELDOUT_RULE, device=dev, progress=progress)
        previous = sets.get(bn_key(sigma))
        if previous is not None:
            meta["replaced"] = {
                "at": time.strftime("%Y-%m-%d %H:%M:%S"),
                "made_from": _made_from(previous.get("meta", {})),
            }
        sets[bn_key(sigma)] = {"stats": stats, "meta": meta}
        log(
            f"TBN {bn_key(sigma)}: {describe_bn(model)} re-estimated from {cfg.samples} noisy held-out samples of "
            f"{len(d.heldout)} images, relative change vs clean statistics {_change(stats, clean)} ({meta['seconds']:.1f} s)"
            + (
                " (replacing the set made from " + _describe(previous.get("meta", {})) + ")"
                if previous is not None
                else ""
            )
        )
    run.save_bn_sets(sets)
    return sets


# --- the paper's central effect, and the quickstart --------------------------------------


def noise_accuracy(
    run: Run,
    sigmas: tuple[float, ...],
    images: np.ndarray,
    labels: np.ndarray,
    *,
    draws: int = 4,
    seed: int = 0,
    batch_size: int = 500,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """The run's base-classifier accuracy under N(0, sigma^2 I) noise with clean vs TBN statistics."""
    dev = resolve_device(device)
    model, _ = run.load_model("cpu")
    sets = {sigma: {"clean_bn": get_bn_stats(model), "tbn": run.bn_stats(bn_key(sigma), model)} for sigma in sigmas}
    return accuracy_under_noise(
        model.to(dev), sets, images, labels, draws=draws, seed=seed, batch_size=batch_size, device=dev
    )


def quickstart_run(config_path, root: Storage, *, data: str | None = None, device: str | None = None) -> dict[str, Any]:
    """Train briefly, calibrate TBN, certify a few dozen test images, write the report."""
    from tbn_ray.config import load_config
    from tbn_ray.reports.certify import accuracy_table, load_summaries, write_report

    cfg = load_config(config_path, **{"train.data.source": data, "train.device": device})
    root.check()
    run = Run(root.child(cfg.train.name))
    before = run.load_checkpoint().epoch if run.has_checkpoint() else 0
    t0 = time.perf_counter()
    ckpt = train_run(cfg.train, run)
    t_train = time.perf_counter() - t0
    calibrate_run(run, cfg.calibrate, device=cfg.train.device)
    d = load_from_config(ckpt.config.data)
    test = d.test.subset(np.arange(min(1000, len(d.test))))
    effect = noise_accuracy(run, cfg.calibrate.sigmas, test.images, test.labels, device=cfg.train.device)
    run.storage.write_json("noise_accuracy.json", {"rows": effect, **data_meta(d), "test_images": len(test)})
    out = certify_output(run)
    outputs = certify_run(run, cfg.certify, out, device=cfg.train.device)
    summaries = load_summaries(out)
    files = write_report(summaries, out, title=f"tbn-ray quickstart ({cfg.train.model.arch}, {d.description})")
    metrics = ckpt.meta.get("metrics", {})
    trained = (
        f"already trained ({ckpt.epoch} epochs)"
        if before >= ckpt.epoch
        else f"trained epochs {before + 1}-{ckpt.epoch} in {t_train:.0f} s"
    )
    clean, pgd = (metrics.get(k) for k in ("heldout_clean_acc", "heldout_pgd_acc"))
    log(
        f"{trained}: held-out clean accuracy {clean if clean is None else round(clean, 3)}, PGD {pgd if pgd is None else round(pgd, 3)}"
    )
    for row in effect:
        log(
            f"accuracy under N(0, {row['sigma']:g}^2) noise on {row['images']} test images: "
            f"clean BN {row['accuracy_clean_bn']:.3f} -> TBN {row['accuracy_tbn']:.3f}"
        )
    print(accuracy_table(summaries))
    log(f"run directory: {run.uri}")
    log(f"report: {files['report.md']} and {files['certified_accuracy.png']}")
    return {"train_seconds": t_train, "noise_accuracy": effect, "certify": [o.summary for o in outputs]}
