"""The in-process pipeline: train, calibrate TBN, certify, report (no Ray).

The CLI calls these directly on the embedded default; the Ray layer calls the same
science functions from workers and actors. Everything a step reads or writes goes
through a ``runs.Run`` / ``storage.Storage``, so local and S3 runs behave alike.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import data as data_mod
from .config import CalibrateConfig, CertifyConfig, DataConfig, TrainConfig, check_sigma
from .errors import TbnError
from .runs import Checkpoint, Run, make_checkpoint
from .smoothing import certify_examples, summarize, write_results
from .storage import Storage
from .tbn import CLEAN, bn_key, estimate_bn_stats, get_bn_stats, set_bn_stats, stats_distance
from .training import fit, make_optimizer, make_scheduler, resolve_device


def log(msg: str) -> None:
    print(f"[tbn-ray] {msg}", flush=True)


def data_meta(d: data_mod.Cifar10) -> dict[str, str]:
    return {"data_source": d.source, "data": d.description}


# --- train ------------------------------------------------------------------------------


def write_metrics(run: Run, rows: list[dict[str, Any]]) -> None:
    """metrics.csv with one row per epoch (the union of keys, in first-seen order)."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    run.storage.write_text("metrics.csv", buf.getvalue())


def train_run(cfg: TrainConfig, run: Run, *, fresh: bool = False, progress: bool = True) -> Checkpoint:
    """Adversarial training in this process, checkpointing every epoch; resumes unless ``fresh``."""
    device = resolve_device(cfg.device)
    d = data_mod.load_from_config(cfg.data)
    log(f"training {cfg.model.arch} on {d.description}: {len(d.train)} images, held-out {len(d.heldout)}, device {device}")
    torch.manual_seed(cfg.seed)
    from .models import build_model

    model = build_model(cfg.model).to(device)
    x, y = data_mod.as_tensors(d.train)
    steps_per_epoch = max(1, len(x) // cfg.optim.batch_size)
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, steps_per_epoch)
    start, rows = 0, []
    if run.has_checkpoint() and not fresh:
        ckpt = run.load_checkpoint()
        if ckpt.config.model != cfg.model:
            raise TbnError(f"{run.uri} holds a {ckpt.config.model.arch} run; use another --name or --fresh")
        model.load_state_dict(ckpt.model)
        if ckpt.optimizer is not None:
            optimizer.load_state_dict(ckpt.optimizer)
        if ckpt.scheduler is not None:
            scheduler.load_state_dict(ckpt.scheduler)
        start, rows = ckpt.epoch, list(ckpt.meta.get("history", []))
        if start >= cfg.optim.epochs:
            log(f"{run.uri} already trained for {start} epochs; nothing to do (--fresh to start over)")
            return ckpt
        log(f"resuming {run.uri} at epoch {start}")

    last: list[Checkpoint] = []

    def on_epoch(epoch: int, metrics: dict[str, Any], model, optimizer, scheduler) -> None:
        rows.append(metrics)
        meta = {**data_meta(d), "history": rows, "metrics": metrics}
        ckpt = make_checkpoint(model, cfg, epoch + 1, meta, optimizer, scheduler)
        run.save_checkpoint(ckpt)
        write_metrics(run, rows)
        last[:] = [ckpt]
        pgd = metrics.get("heldout_pgd_acc")
        log(
            f"epoch {epoch + 1}/{cfg.optim.epochs}: loss {metrics['train_loss']:.3f} "
            f"held-out clean {metrics['heldout_clean_acc']:.3f} pgd {pgd if pgd is None else round(pgd, 3)} "
            f"({metrics['images_per_s']:.0f} img/s)"
        )

    fit(cfg, d, device, start_epoch=start, model=model, optimizer=optimizer, scheduler=scheduler, on_epoch=on_epoch, progress=progress)
    return last[0] if last else run.load_checkpoint()


# --- calibrate --------------------------------------------------------------------------


def load_data_for(ckpt: Checkpoint, override: DataConfig | None) -> data_mod.Cifar10:
    """The data the run was trained on, unless the user names another source."""
    return data_mod.load_from_config(override if override is not None else ckpt.config.data)


def calibrate_run(
    run: Run, cfg: CalibrateConfig, *, data_cfg: DataConfig | None = None, device: str = "auto", progress: bool = True
) -> dict[str, dict[str, Any]]:
    """Estimate and store one frozen BN statistics set per sigma on noisy held-out images."""
    dev = resolve_device(device)
    model, ckpt = run.load_model(dev)
    d = load_data_for(ckpt, data_cfg)
    heldout = data_mod.to_float(d.heldout.images)
    sets = run.load_bn_sets()
    clean = get_bn_stats(model)
    sets[CLEAN] = {"stats": clean, "meta": {"sigma": 0.0, "source": "trained running statistics"}}
    for sigma in cfg.sigmas:
        t0 = time.perf_counter()
        stats = estimate_bn_stats(
            model, heldout, sigma=sigma, samples=cfg.samples, batch_size=cfg.batch_size, seed=cfg.seed, device=dev, progress=progress
        )
        meta = {
            "sigma": float(sigma),
            "samples": cfg.samples,
            "batch_size": cfg.batch_size,
            "seed": cfg.seed,
            "heldout_images": len(d.heldout),
            "heldout_rule": "official train index % 10 == 9",
            **data_meta(d),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        sets[bn_key(sigma)] = {"stats": stats, "meta": meta}
        log(
            f"TBN {bn_key(sigma)}: {cfg.samples} noisy held-out samples from {len(d.heldout)} images, "
            f"relative change vs clean statistics {stats_distance(stats, clean):.2f} ({meta['seconds']:.1f} s)"
        )
    run.save_bn_sets(sets)
    return sets


# --- certify ----------------------------------------------------------------------------


def select_test_indices(d: data_mod.Cifar10, cfg: CertifyConfig) -> np.ndarray:
    """Cohen's selection (every ``skip``-th test image from ``start``), among the images this source has."""
    idx = d.test.index[(d.test.index >= cfg.start) & ((d.test.index - cfg.start) % cfg.skip == 0)]
    if cfg.max_images is not None:
        idx = idx[: cfg.max_images]
    if len(idx) == 0:
        raise TbnError(f"no test images selected (start {cfg.start}, skip {cfg.skip}) from {d.description}")
    return np.asarray(idx, dtype=np.int64)


def bn_set_for(cfg: CertifyConfig, sigma: float) -> str:
    return bn_key(sigma) if cfg.bn == "tbn" else CLEAN


@dataclass(frozen=True)
class CertifyOutput:
    sigma: float
    summary: dict[str, Any]
    location: str


def certify_run(
    run: Run,
    cfg: CertifyConfig,
    output: Storage,
    *,
    data_cfg: DataConfig | None = None,
    device: str = "auto",
    progress: bool = True,
) -> list[CertifyOutput]:
    """CERTIFY every selected test image at each sigma, with that sigma's frozen TBN statistics."""
    dev = resolve_device(device)
    for sigma in cfg.sigmas:
        check_sigma(sigma)
    # Every statistics set must exist before any work starts.
    model, ckpt = run.load_model("cpu")
    stats = {sigma: run.bn_stats(bn_set_for(cfg, sigma), model) for sigma in cfg.sigmas}
    d = load_data_for(ckpt, data_cfg)
    indices = select_test_indices(d, cfg)
    sub = d.test.by_index(indices)
    model = model.to(dev)
    outputs = []
    for sigma in cfg.sigmas:
        name = bn_set_for(cfg, sigma)
        set_bn_stats(model, stats[sigma])
        model.eval()
        log(f"certifying {len(indices)} test images at sigma={sigma:g} (BN: {name}, n0={cfg.n0}, n={cfg.n}, alpha={cfg.alpha})")
        t0 = time.perf_counter()
        records = certify_examples(
            model,
            sub.images,
            sub.labels,
            sub.index,
            sigma=sigma,
            n0=cfg.n0,
            n=cfg.n,
            alpha=cfg.alpha,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            device=dev,
            progress=progress,
        )
        wall = time.perf_counter() - t0
        summary = summarize(records)
        params = {
            "sigma": float(sigma),
            "n0": cfg.n0,
            "n": cfg.n,
            "alpha": cfg.alpha,
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "bn": name,
            "model": ckpt.config.model.arch,
            "run": run.uri,
            "epoch": ckpt.epoch,
            **data_meta(d),
            "skip": cfg.skip,
            "start": cfg.start,
            "device": str(dev),
            "wall_seconds": round(wall, 3),
        }
        where = output.child(f"sigma={sigma:g}")
        write_results(records, summary, where, params)
        log(
            f"sigma={sigma:g}: certified accuracy at r=0 {summary['certified_accuracy']['0.0']:.3f}, "
            f"r=0.5 {summary['certified_accuracy']['0.5']:.3f}, ACR {summary['acr']:.3f} -> {where.uri}"
        )
        outputs.append(CertifyOutput(float(sigma), {**summary, **params}, where.uri))
    return outputs


# --- the paper's central effect, and the quickstart --------------------------------------


@torch.no_grad()
def noise_accuracy(
    run: Run, sigmas: tuple[float, ...], images: np.ndarray, labels: np.ndarray, *, draws: int = 4, seed: int = 0,
    batch_size: int = 500, device: str = "auto",
) -> list[dict[str, Any]]:
    """Base-classifier accuracy under N(0, sigma^2 I) noise with clean vs TBN statistics, same noisy images."""
    dev = resolve_device(device)
    model, _ = run.load_model("cpu")
    clean = get_bn_stats(model)
    model = model.to(dev).eval()
    x = data_mod.to_float(images)
    y = torch.as_tensor(labels, dtype=torch.int64)
    rows = []
    for sigma in sigmas:
        row: dict[str, Any] = {"sigma": float(sigma), "images": len(x), "draws": draws}
        for label, stats in (("clean_bn", clean), ("tbn", run.bn_stats(bn_key(sigma), model))):
            set_bn_stats(model, stats)
            gen = torch.Generator().manual_seed(seed)  # the same noise for both statistics sets
            correct = 0
            for _ in range(draws):
                for i in range(0, len(x), batch_size):
                    xb = x[i : i + batch_size]
                    noisy = (xb + sigma * torch.randn(xb.shape, generator=gen)).to(dev)
                    correct += int((model(noisy).argmax(1).cpu() == y[i : i + batch_size]).sum())
            row[f"accuracy_{label}"] = correct / (draws * len(x))
        rows.append(row)
    set_bn_stats(model, clean)
    return rows


def quickstart_run(config_path, root: Storage, *, data: str | None = None, device: str | None = None) -> dict[str, Any]:
    """Train briefly, calibrate TBN, certify a few dozen test images, write the report."""
    from .config import load_config
    from .report import load_summaries, write_report

    cfg = load_config(config_path, **{"train.data.source": data, "train.device": device})
    root.check()
    run = Run(root.child(cfg.train.name))
    t0 = time.perf_counter()
    ckpt = train_run(cfg.train, run)
    t_train = time.perf_counter() - t0
    calibrate_run(run, cfg.calibrate, device=cfg.train.device)
    d = data_mod.load_from_config(ckpt.config.data)
    test = d.test.subset(np.arange(min(1000, len(d.test))))
    effect = noise_accuracy(run, cfg.calibrate.sigmas, test.images, test.labels, device=cfg.train.device)
    run.storage.write_json("noise_accuracy.json", {"rows": effect, **data_meta(d), "test_images": len(test)})
    out = run.storage.child("certify")
    outputs = certify_run(run, cfg.certify, out, device=cfg.train.device)
    files = write_report(load_summaries(out), out, title=f"tbn-ray quickstart ({cfg.train.model.arch}, {d.description})")
    metrics = ckpt.meta.get("metrics", {})
    log(f"trained {ckpt.epoch} epochs in {t_train:.0f} s: held-out clean {metrics.get('heldout_clean_acc')}, PGD {metrics.get('heldout_pgd_acc')}")
    for row in effect:
        log(
            f"accuracy under N(0, {row['sigma']:g}^2) noise on {row['images']} test images: "
            f"clean BN {row['accuracy_clean_bn']:.3f} -> TBN {row['accuracy_tbn']:.3f}"
        )
    for o in outputs:
        log(f"sigma={o.sigma:g}: certified accuracy {o.summary['certified_accuracy']}, ACR {o.summary['acr']:.3f}")
    log(f"run directory: {run.uri}")
    log(f"report: {files['report.md']} and {files['certified_accuracy.png']}")
    return {"train_seconds": t_train, "noise_accuracy": effect, "certify": [o.summary for o in outputs]}
