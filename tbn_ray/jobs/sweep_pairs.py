"""The sweep's work that needs no Ray: its stored runs, the held-out split, and the
(epsilon, sigma) evaluation as a ``jobs.engine`` job (one unit: one pair).

``distributed.sweep`` trains from Tune trials and runs the pairs job on the engine's actor
pool; the same job runs in-process (``engine.run_in_process``) in plain torch.

Selection hygiene: hyperparameters are chosen on a VALIDATION set, never the test set. The
held-out split (``data.py``: official train index % 10 == 9) is cut deterministically: the
last ``validation.images`` held-out images (official order) are certified, the earlier ones
calibrate TBN, so calibration and validation images are disjoint. (Training's per-epoch
held-out evaluation uses the first ``train.eval.images``; with the full data set and the
default sizes those are calibration images only.) The best pair's validation number is a
maximum over the grid, hence optimistic: certify the chosen model on the test set
(``best.json`` gives the command) for the number to report.
"""

from __future__ import annotations

import csv
import hashlib
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from tbn_ray.config import SweepConfig, TrainConfig, parse_config
from tbn_ray.errors import TbnError
from tbn_ray.jobs.engine import Metric
from tbn_ray.jobs.pipeline import calibrate_sigma
from tbn_ray.reports.sweep import SPLIT_KEYS  # noqa: F401  (the row fields a split writes; read back by the report)
from tbn_ray.science import data as data_mod
from tbn_ray.science.base_classifier import base_classifier
from tbn_ray.science.data import data_meta
from tbn_ray.science.smoothing import certify_examples, summarize
from tbn_ray.science.tbn import bn_key, use_bn_stats
from tbn_ray.science.training import evaluate
from tbn_ray.store.cifar10 import load_from_config
from tbn_ray.store.results import write_results
from tbn_ray.store.runs import CHECKPOINT, Checkpoint, Run
from tbn_ray.store.storage import Storage

#: A pair's row, written last: its presence marks a finished pair.
ROW = "row.json"
METRICS = "metrics.csv"
#: How the held-out split was cut, stored with every pair and in best.json.
SPLIT_RULE = (
    "held-out train images (index % 10 == 9) in official order: the last validation_images are "
    "certified, the earlier ones calibrate TBN (disjoint)"
)


def eps_key(eps: float) -> str:
    return f"eps={eps:g}"


def pair_key(eps: float, sigma: float) -> str:
    return f"{eps_key(eps)}_sigma={sigma:g}"


# --- the training runs, one per epsilon ------------------------------------------------------


def train_config(cfg: SweepConfig, eps: float, name: str) -> TrainConfig:
    """The training config of one epsilon: the sweep's ``train`` with this eps and the shared ``pgd`` evaluation."""
    raw = cfg.train.model_dump(mode="json")
    raw["name"] = name
    raw["attack"]["eps"] = eps
    raw["eval"]["attack"] = cfg.pgd.model_dump(mode="json")
    return parse_config(TrainConfig, raw, f"sweep {cfg.name}, epsilon {eps:g}")


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


def training_record(train_root: Storage, eps: float) -> dict[str, Any]:
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
        raise TbnError(
            f"{run.storage.object_uri(METRICS)} is damaged (no number in its seconds column): restore it or train the run again"
        ) from None
    return {"run": run.uri, "epochs": len(rows), "train_seconds": round(seconds, 3) if rows else None}


def install_bn_stats(run: Run, pairs: list[Storage]) -> None:
    """Each evaluated sigma's TBN statistics into the training run, so ``tbn-ray certify <run> --sigma s`` works."""
    sets = run.load_bn_sets()
    for out in pairs:
        sets.update(Run(out).load_bn_sets())
    run.save_bn_sets(sets)


# --- the held-out split ----------------------------------------------------------------------


def split_heldout(heldout: data_mod.Split, validation_images: int) -> tuple[data_mod.Split, data_mod.Split]:
    """(calibration, validation): the last ``validation_images`` held-out images validate, the rest calibrate."""
    if validation_images >= len(heldout):
        raise TbnError(
            f"validation.images {validation_images} leaves no held-out image for TBN calibration "
            f"(the held-out split has {len(heldout)}): lower validation.images"
        )
    cut = len(heldout) - validation_images
    return heldout.subset(slice(0, cut)), heldout.subset(slice(cut, None))


def split_record(calibration: data_mod.Split, validation: data_mod.Split) -> dict[str, Any]:
    """The ``SPLIT_KEYS`` of a split: sizes and first/last official indices of both parts."""
    return {
        "validation_images": len(validation),
        "validation_index": [int(validation.index[0]), int(validation.index[-1])],
        "calibration_images": len(calibration),
        "calibration_index": [int(calibration.index[0]), int(calibration.index[-1])],
        "split_rule": SPLIT_RULE,
    }


# --- one (epsilon, sigma) pair ---------------------------------------------------------------


def _trained_model(cfg: SweepConfig, run: Run, device: torch.device) -> tuple[nn.Module, Checkpoint]:
    model, ckpt = run.load_model(device)
    if ckpt.epoch < cfg.train.optim.epochs:
        raise TbnError(
            f"{run.uri}/{CHECKPOINT} is at epoch {ckpt.epoch} of {cfg.train.optim.epochs}: run the sweep again to finish training"
        )
    return model, ckpt


def _certify_params(
    cfg: SweepConfig,
    run: Run,
    ckpt: Checkpoint,
    eps: float,
    sigma: float,
    d: data_mod.Cifar10,
    split: dict[str, Any],
    device: torch.device,
) -> dict[str, Any]:
    """What produced a pair's certification (``write_results``' params): the certify config's identity and the pair."""
    return {
        "sigma": float(sigma),
        "bn": bn_key(sigma),
        "model": ckpt.config.model.label,
        "run": run.uri,
        "epoch": ckpt.epoch,
        "epsilon": eps,
        "images": "held-out validation (not the test set)",
        **cfg.certify.identity(device.type),
        **data_meta(d),
        **split,
    }


def evaluate_pair(
    cfg: SweepConfig, run: Run, eps: float, sigma: float, out: Storage, device: torch.device
) -> dict[str, Any]:
    """Calibrate TBN at sigma, measure clean/PGD accuracy and certify, all on held-out images; writes ``out``.

    Files: certify.tsv, radii.parquet, summary.json (``write_results``), bn_stats.pt (this sigma's
    set) and, last, row.json, whose presence marks the pair finished.
    """
    model, ckpt = _trained_model(cfg, run, device)
    d = load_from_config(ckpt.config.data)
    calibration, validation = split_heldout(d.heldout, cfg.validation.images)
    split = split_record(calibration, validation)
    # Clean and PGD accuracy with the trained (clean) BN statistics, under the sweep's one attack.
    ev = evaluate(
        model,
        validation.images,
        validation.labels,
        cfg.pgd,
        device,
        batch_size=cfg.train.eval.batch_size,
        seed=cfg.train.seed,
        amp=cfg.train.optim.amp,
    )
    stats, meta = calibrate_sigma(
        model,
        data_mod.to_float(calibration.images),
        sigma,
        cfg.calibrate,
        d,
        rule=SPLIT_RULE + " (calibration part)",
        device=device,
    )
    calibrate_seconds = meta["seconds"]
    t0 = time.perf_counter()
    with use_bn_stats(model, stats):
        f = base_classifier(model, cfg.certify, device)
        records = certify_examples(
            f, validation.images, validation.labels, validation.index, cfg.certify, sigma=sigma, device=device
        )
    certify_seconds = time.perf_counter() - t0
    summary = summarize(records)
    write_results(records, summary, out, _certify_params(cfg, run, ckpt, eps, sigma, d, split, device))
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


# --- the pairs as one job on the engine ------------------------------------------------------


@dataclass(frozen=True)
class PairsJob:
    """Every (epsilon, sigma) pair of the trained epsilons: calibrate, measure, certify.

    A pair's stored ``row.json`` (written last, naming its epsilon and sigma) is the result the
    engine scans for, so a re-run, an actor lost mid-pair or a sweep stored before this job
    existed all evaluate each pair once: a pair without a valid row is evaluated again, whole.
    """

    cfg: SweepConfig
    root: Storage  # <storage>/<sweep name>
    runs: tuple[tuple[float, str], ...]  # (epsilon, training run URI) of each trained epsilon

    name: ClassVar[str] = "sweep pairs"
    amount_unit: ClassVar[str] = "pair"
    metrics: ClassVar[tuple[Metric, ...]] = (
        Metric("tbn_sweep_pairs", "(epsilon, sigma) pairs calibrated and certified", ("sweep",)),
    )

    @property
    def job_id(self) -> str:
        digest = hashlib.sha256(self.root.uri.encode()).hexdigest()[:8]
        return f"{self.cfg.name}-{digest}"

    @property
    def out(self) -> Storage:
        return self.root.child("pairs")

    def outputs(self) -> list[tuple[tuple[float, float], str]]:
        return [((eps, float(s)), f"{pair_key(eps, s)}/{ROW}") for eps, _ in self.runs for s in self.cfg.sigmas]

    def usable(self, output: tuple[float, float], key: str) -> bool:
        try:
            row = self.out.read_json(key)
        except TbnError:
            return False  # damaged: evaluated again
        return isinstance(row, dict) and (row.get("epsilon"), row.get("sigma")) == output

    def units(self, missing: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        return list(missing)

    def amount(self, unit: tuple[float, float]) -> int:
        return 1

    def label(self, unit: tuple[float, float]) -> str:
        return pair_key(*unit)

    def describe(self, todo: Sequence[tuple[float, float]], skipped: int) -> str:
        return f"sweep {self.cfg.name}: {len(todo)} (epsilon, sigma) pair(s) to calibrate and certify, {skipped} stored -> {self.out.uri}"

    def make_worker(self, device: torch.device, worker: dict[str, str], gpus: float) -> PairWorker:
        return PairWorker(self, device)

    def measure(self, unit: tuple[float, float], result: dict[str, Any]) -> list[tuple[str, float, dict[str, str]]]:
        return [("tbn_sweep_pairs", 1, {"sweep": self.cfg.name})]

    def on_device(self, device_type: str) -> PairsJob:
        return self  # a pair's files do not name the device

    def finish(self, computed: int, skipped: int) -> dict[tuple[float, float], dict[str, Any]]:
        """Every pair's row, by (epsilon, sigma)."""
        return {output: self.out.read_json(key) for output, key in self.outputs()}


class PairWorker:
    """Evaluates whole pairs; each pair loads its epsilon's trained model afresh (a pair is minutes of work)."""

    def __init__(self, job: PairsJob, device: torch.device) -> None:
        self.job = job
        self.device = device

    def run(self, unit: tuple[float, float]) -> dict[str, Any]:
        eps, sigma = unit
        run = Run(Storage.open(dict(self.job.runs)[eps]))
        return evaluate_pair(self.job.cfg, run, eps, sigma, self.job.out.child(pair_key(eps, sigma)), self.device)
