"""Sharded, resumable certification (``tbn-ray certify``), shared by the in-process path and Ray.

A certification is cut into shards: fixed lists of test indices, the same on every re-run.
Each shard is certified as a whole and written once, as one object, to a deterministic key
under ``<output>/<run-id>/``; the run id is a digest of everything that changes the numbers,
so a re-run of the same command finds its shards and a different one never mixes with them.
Certification is a job of ``jobs.engine`` (one unit: one sigma x one shard): the in-process
path (``certify_run``) and the Ray actors (``distributed.certify``) run the same
``ShardCertifier`` and the same ``aggregate``: same files, and either can finish the other's run.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from tbn_ray.config import DEFAULT_SHARDS, CertifyConfig
from tbn_ray.devices import resolve_device
from tbn_ray.errors import TbnError, log
from tbn_ray.jobs.engine import Metric, run_in_process
from tbn_ray.reports.certify import write_certification_report
from tbn_ray.science import data as data_mod
from tbn_ray.science.base_classifier import base_classifier
from tbn_ray.science.smoothing import certify_examples
from tbn_ray.science.tbn import CLEAN, BNStats, bn_key, set_bn_stats
from tbn_ray.store.certify_layout import refuse_other_shard_count
from tbn_ray.store.certify_shards import (
    SHARD_FORMAT,
    CertifyOutput,
    UnusableShard,
    merge_shards,
    read_shard,
    shard_key,
    write_shard,
)
from tbn_ray.store.runs import Run, hash_weights, load_data_for, tensor_bytes
from tbn_ray.store.storage import Storage


def select_test_indices(d: data_mod.Cifar10, cfg: CertifyConfig) -> np.ndarray:
    """Cohen's selection (every ``skip``-th test image from ``start``, below ``stop``), among the images this source has."""
    index = d.test.index
    chosen = (index >= cfg.start) & ((index - cfg.start) % cfg.skip == 0)
    if cfg.stop is not None:
        chosen &= index < cfg.stop
    idx = index[chosen]
    if cfg.max_images is not None:
        idx = idx[: cfg.max_images]
    if len(idx) == 0:
        below = "" if cfg.stop is None else f", below {cfg.stop}"
        raise TbnError(f"no test images selected (start {cfg.start}, skip {cfg.skip}{below}) from {d.description}")
    return np.asarray(idx, dtype=np.int64)


def bn_set_for(cfg: CertifyConfig, sigma: float) -> str:
    return bn_key(sigma) if cfg.bn == "tbn" else CLEAN


#: The order of a result's parameters in summary.json: part of the stored form that run ids and reports read.
_PARAMS_ORDER = (
    "sigma",
    "n0",
    "n",
    "alpha",
    "seed",
    "batch_size",
    "bn",
    "model",
    "run",
    "epoch",
    "data_source",
    "data",
    "start",
    "skip",
    "stop",
    "max_images",
    "device",
    "channels_last",
    "fold_bn",
    "amp",
)


@dataclass(frozen=True, eq=False)
class CertifyPlan:
    """One certification, fixed and validated before any work starts (``plan_certify``).

    Everything that decides a number comes from ``cfg`` (the only carrier of settings), the
    run's weights and statistics, and the selected images. Picklable and self-contained: the
    Ray layer ships it to the actors once, so they need neither the run's storage nor the dataset.
    """

    run_uri: str
    cfg: CertifyConfig
    network: torch.nn.Module  # on CPU, eval mode, clean statistics; each sigma's set is applied per shard
    model_label: str  # how results name the model (architecture, or an imported model's source)
    epoch: int
    stats: dict[float, BNStats]
    data_source: str
    data_description: str
    test: data_mod.Split  # the selected test images, in selection order
    shards: int
    output: Storage  # results root: this certification writes under output/<run_id>
    device_type: str = "cpu"  # changes the noise stream (a CUDA generator draws other numbers)

    @property
    def sigmas(self) -> tuple[float, ...]:
        return self.cfg.unique_sigmas

    @cached_property
    def model_state(self) -> dict[str, torch.Tensor]:
        return self.network.state_dict()

    @cached_property
    def run_id(self) -> str:
        """``<run name>-n<n>-<digest>``: the digest covers everything that changes a certificate."""
        h = hashlib.sha256()
        hash_weights(h, self.model_state)
        for sigma in sorted(self.stats):
            for layer in sorted(self.stats[sigma]):
                h.update(f"{sigma}/{layer}".encode())
                h.update(tensor_bytes(self.stats[sigma][layer]["running_mean"]))
                h.update(tensor_bytes(self.stats[sigma][layer]["running_var"]))
        for array in (self.test.index, self.test.labels, self.test.images):
            h.update(np.ascontiguousarray(array).tobytes())
        cfg = self.cfg
        facts = {
            "run": self.run_uri,
            "sigmas": sorted(self.sigmas),
            "bn": cfg.bn,
            "data_source": self.data_source,
            "epoch": self.epoch,
        }
        h.update(json.dumps({**facts, **cfg.identity(self.device_type)}, sort_keys=True).encode())
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.run_uri.rstrip("/").rpartition("/")[2]).strip(".-") or "run"
        return f"{name}-n{cfg.n}-{h.hexdigest()[:16]}"

    @property
    def out(self) -> Storage:
        return self.output.child(self.run_id)

    @property
    def indices(self) -> np.ndarray:
        return self.test.index

    def shard_indices(self, shard: int) -> np.ndarray:
        """Contiguous, near-equal slices of the selection: a pure function of (selection, shards)."""
        lo, hi = len(self.test) * shard // self.shards, len(self.test) * (shard + 1) // self.shards
        return self.test.index[lo:hi]

    def shard_key(self, sigma: float, shard: int) -> str:
        return shard_key(sigma, shard, self.shards)

    def params(self, sigma: float) -> dict[str, Any]:
        """What produced a result (stored with every shard and summary): the config's identity and
        what the run and the data fixed."""
        facts = {
            "sigma": float(sigma),
            "bn": bn_set_for(self.cfg, sigma),
            "model": self.model_label,
            "run": self.run_uri,
            "epoch": self.epoch,
            "data_source": self.data_source,
            "data": self.data_description,
        }
        merged = {**facts, **self.cfg.identity(self.device_type)}
        ordered = {k: merged.pop(k) for k in _PARAMS_ORDER}
        return {**ordered, **merged, "run_id": self.run_id, "shards": self.shards}

    def build_model(self, device: torch.device) -> torch.nn.Module:
        """The network in eval mode (BN statistics frozen; set a sigma's with set_bn_stats)."""
        return copy.deepcopy(self.network).to(device).eval()

    # --- the job (``jobs.engine.Job``): a unit is one (sigma, shard), stored as one Parquet object

    name = "certify"
    amount_unit = "img"
    metrics = (
        Metric("tbn_certify_images", "test images certified", ("run_id", "sigma")),
        Metric("tbn_certify_shards", "shards certified and written", ("run_id", "sigma")),
        Metric("tbn_certify_images_per_second", "images/s of this actor's last shard", ("run_id", "sigma"), gauge=True),
    )

    @property
    def job_id(self) -> str:
        return self.run_id

    def outputs(self) -> list[tuple[tuple[float, int], str]]:
        return [((sigma, shard), self.shard_key(sigma, shard)) for sigma in self.sigmas for shard in range(self.shards)]

    def usable(self, output: tuple[float, int], key: str) -> bool:
        """Readable, with the planned indices and parameters; otherwise certified again."""
        sigma, shard = output
        try:
            _, meta = read_shard(self.out, key, self.shard_indices(shard).tolist())
            if meta["params"] != self.params(sigma):
                raise UnusableShard(f"{self.out.object_uri(key)} was certified with other parameters")
        except UnusableShard as e:
            log(f"{e}: certifying it again")
            return False
        return True

    def units(self, missing: Sequence[tuple[float, int]]) -> list[tuple[float, int]]:
        return list(missing)

    def amount(self, unit: tuple[float, int]) -> int:
        return len(self.shard_indices(unit[1]))

    def label(self, unit: tuple[float, int]) -> str:
        return f"certify sigma={unit[0]:g} shard {unit[1]}/{self.shards}"

    def describe(self, todo: Sequence[tuple[float, int]], skipped: int) -> str:
        return (
            f"certification {self.run_id}: {len(self.test)} test images x {len(self.sigmas)} sigma(s) in {self.shards} shards each, "
            f"{skipped} shard(s) already done -> {self.out.uri}"
        )

    def make_worker(self, device: torch.device, worker: dict[str, str], gpus: float) -> ShardCertifier:
        return ShardCertifier(self, device, worker, gpus)

    def measure(self, unit: tuple[float, int], result: ShardResult) -> list[tuple[str, float, dict[str, str]]]:
        tags = {"run_id": self.run_id, "sigma": f"{result.sigma:g}"}
        rate = result.images / max(result.seconds, 1e-9)
        return [
            ("tbn_certify_images", result.images, tags),
            ("tbn_certify_shards", 1, tags),
            ("tbn_certify_images_per_second", rate, tags),
        ]

    def on_device(self, device_type: str) -> CertifyPlan:
        """The noise stream differs on a CUDA generator: another run id, whose folder gets the
        planning's check too (one shard count per folder)."""
        if device_type == self.device_type:
            return self
        plan = dataclasses.replace(self, device_type=device_type)
        refuse_other_shard_count(plan.out, plan.shards)
        return plan

    def finish(self, computed: int, skipped: int) -> CertifyResult:
        outputs = aggregate(self.out, plan=self)
        return CertifyResult(self.run_id, self.out.uri, outputs, self.out.object_uri("report.md"), computed, skipped)


def plan_certify(run: Run, cfg: CertifyConfig, output: Storage, *, device_type: str = "cpu") -> CertifyPlan:
    """Check everything a certification needs (checkpoint, every sigma's statistics, images,
    shards, a writable output) so that a bad input fails in seconds, not after hours.

    ``device_type`` is where the shards will run (a CUDA generator draws other noise), not a setting."""
    model, ckpt = run.load_model("cpu")
    trained = copy.deepcopy(model.state_dict())
    stats = {sigma: run.bn_stats(bn_set_for(cfg, sigma), model) for sigma in cfg.unique_sigmas}
    for sigma in cfg.unique_sigmas:
        set_bn_stats(model, stats[sigma])  # a set that does not fit the model fails here
    model.load_state_dict(trained)
    d = load_data_for(ckpt, cfg.data)
    test = d.test.by_index(select_test_indices(d, cfg))
    if cfg.shards is None:
        shards = min(DEFAULT_SHARDS, len(test))
    elif cfg.shards > len(test):
        raise TbnError(
            f"--shards {cfg.shards}: need between 1 and the {len(test)} selected test images; use --shards {len(test)} or fewer"
        )
    else:
        shards = cfg.shards
    output.check()
    plan = CertifyPlan(
        run_uri=run.uri,
        cfg=cfg,
        network=model,
        model_label=ckpt.config.model.label,
        epoch=ckpt.epoch,
        stats=stats,
        data_source=d.source,
        data_description=d.description,
        test=test,
        shards=shards,
        output=output,
        device_type=device_type,
    )
    refuse_other_shard_count(plan.out, plan.shards)  # one shard set per folder: `report` never has to pick
    return plan


@dataclass(frozen=True)
class ShardResult:
    """What a finished shard reports back: small, the records themselves are in storage."""

    sigma: float
    shard: int
    images: int
    seconds: float
    uri: str
    worker: dict[str, str]


class ShardCertifier:
    """Certifies whole shards of a plan with the model and every sigma's frozen statistics loaded once.

    The in-process path runs one; the Ray layer runs one per actor. A shard is written as one
    object at its deterministic key, so certifying it twice (an actor restarted mid-shard, a
    re-run) writes the same records again: at-least-once execution, idempotent output.
    """

    def __init__(self, plan: CertifyPlan, device: torch.device, worker: dict[str, str], gpus: float = 0.0) -> None:
        self.plan = plan
        self.device = device
        self.worker = worker
        self.gpus = gpus
        self.net = plan.build_model(device)
        self._classifiers: dict[float, torch.nn.Module] = {}  # per sigma (a folded copy holds its statistics)
        self._row = {int(i): row for row, i in enumerate(plan.test.index)}
        self.report: Callable[[int], None] | None = None  # told each image done, by whoever runs the shard (progress)

    def run(self, unit: tuple[float, int]) -> ShardResult:
        return self.certify_shard(*unit)

    def certify_shard(self, sigma: float, shard: int) -> ShardResult:
        plan, cfg = self.plan, self.plan.cfg
        idx = plan.shard_indices(shard)
        rows = np.array([self._row[int(i)] for i in idx], dtype=np.int64)
        set_bn_stats(self.net, plan.stats[sigma])
        if sigma not in self._classifiers:
            self._classifiers[sigma] = base_classifier(self.net, cfg, self.device)
        started, t0 = time.time(), time.perf_counter()
        report = self.report
        records = certify_examples(
            self._classifiers[sigma],
            plan.test.images[rows],
            plan.test.labels[rows],
            idx,
            cfg,
            sigma=sigma,
            device=self.device,
            on_image=None if report is None else lambda: report(1),
        )
        seconds = time.perf_counter() - t0
        meta = {
            "format": SHARD_FORMAT,
            "run_id": plan.run_id,
            "sigma": float(sigma),
            "shard": shard,
            "shards": plan.shards,
            "indices": idx.tolist(),
            "images_total": len(plan.test),
            "params": plan.params(sigma),
            "worker": self.worker,
            "gpus": self.gpus,
            "started": started,
            "seconds": seconds,
        }
        rows_out = [{**r, "actor": self.worker["actor"], "node": self.worker["node"]} for r in records]
        uri = write_shard(plan.out, plan.shard_key(sigma, shard), rows_out, meta)
        return ShardResult(float(sigma), shard, len(idx), seconds, uri, dict(self.worker))


@dataclass(frozen=True)
class CertifyResult:
    run_id: str
    location: str  # <output>/<run-id>
    outputs: list[CertifyOutput]
    report: str  # report.md (plus certified_accuracy.png beside it)
    shards_computed: int
    shards_skipped: int


def aggregate(out: Storage, *, plan: CertifyPlan | None = None) -> list[CertifyOutput]:
    """Merge the shards under ``out`` (``<output>/<run-id>``) into per-sigma results, then write the report.

    Reads nothing but the shard files, so ``tbn-ray report`` can rebuild all of it. With a
    ``plan``, every planned shard must be there with its planned indices; without, each sigma
    uses its complete set of shards and incomplete sigmas are left out (and named).
    """
    outputs = merge_shards(out, plan)
    write_certification_report(
        [{**o.summary, "params": o.summary, "location": f"{o.location}/summary.json"} for o in outputs], out
    )
    for o in outputs:  # the numbers themselves are printed once, as a table, by the command
        log(f"sigma={o.sigma:g}: {o.summary['images']} images -> {o.location}")
    return outputs


def run_plan_in_process(
    plan: CertifyPlan,
    device: torch.device,
    *,
    progress: bool = True,
    on_shard: Callable[[ShardResult], None] | None = None,
) -> CertifyResult:
    """Certify the pending shards of ``plan`` in this process, then aggregate (no Ray)."""
    return run_in_process(plan, device, progress=progress, on_unit=on_shard)


def certify_run(
    run: Run, cfg: CertifyConfig, output: Storage, *, device: str = "auto", progress: bool = True
) -> list[CertifyOutput]:
    """CERTIFY every selected test image at each sigma with that sigma's frozen TBN statistics,
    in this process on ``device``, into ``output/<run-id>`` (resuming from the shards already there)."""
    dev = resolve_device(device)
    return run_plan_in_process(plan_certify(run, cfg, output, device_type=dev.type), dev, progress=progress).outputs
