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
from torch.fx.experimental.optimization import fuse as fold_conv_bn

from tbn_ray.science import data as data_mod
from tbn_ray.config import CertifyConfig, DataConfig, ModelConfig, check_sigma
from tbn_ray.errors import TbnError, log
from tbn_ray.jobs.certify_shards import SHARD_FORMAT, CertifyOutput, UnusableShard, merge_shards, read_shard, shard_key, write_shard
from tbn_ray.jobs.engine import Metric, pending, run_in_process
from tbn_ray.jobs.layout import refuse_other_shard_count
from tbn_ray.reports.certify import write_certification_report
from tbn_ray.science.models import build_model
from tbn_ray.store.runs import Run, hash_weights, load_data_for, tensor_bytes
from tbn_ray.science.adaptive import AdaptiveSampling
from tbn_ray.science.smoothing import certify_examples
from tbn_ray.store.storage import Storage
from tbn_ray.science.tbn import CLEAN, BNStats, bn_key, set_bn_stats
from tbn_ray.science.training import autocast, resolve_device



def select_test_indices(d: data_mod.Cifar10, cfg: CertifyConfig, stop: int | None = None) -> np.ndarray:
    """Cohen's selection (every ``skip``-th test image from ``start``, below ``stop``), among the images this source has."""
    index = d.test.index
    chosen = (index >= cfg.start) & ((index - cfg.start) % cfg.skip == 0)
    if stop is not None:
        chosen &= index < stop
    idx = index[chosen]
    if cfg.max_images is not None:
        idx = idx[: cfg.max_images]
    if len(idx) == 0:
        below = "" if stop is None else f", below {stop}"
        raise TbnError(f"no test images selected (start {cfg.start}, skip {cfg.skip}{below}) from {d.description}")
    return np.asarray(idx, dtype=np.int64)


def bn_set_for(cfg: CertifyConfig, sigma: float) -> str:
    return bn_key(sigma) if cfg.bn == "tbn" else CLEAN


@dataclass(frozen=True, eq=False)
class CertifyPlan:
    """One certification, fixed and validated before any work starts (``plan_certify``).

    Picklable and self-contained (weights, statistics, the selected images): the Ray layer
    ships it to the actors once, so they need neither the run's storage nor the dataset.
    """

    run_uri: str
    cfg: CertifyConfig
    sigmas: tuple[float, ...]
    model_config: ModelConfig
    model_state: dict[str, torch.Tensor]  # clean statistics; each sigma's set is applied per shard
    epoch: int
    stats: dict[float, BNStats]
    data_source: str
    data_description: str
    test: data_mod.Split  # the selected test images, in selection order
    stop: int | None
    shards: int
    output: Storage  # results root: this certification writes under output/<run_id>
    device_type: str = "cpu"  # changes the noise stream (a CUDA generator draws other numbers)
    channels_last: bool = False  # changes the float rounding of the votes
    fold_bn: bool = False  # BN folded into the preceding convolutions: the same f up to float rounding
    amp: str = "off"  # autocast dtype of the forward passes on CUDA (bf16, fp16): another fixed base classifier

    @property
    def effective_amp(self) -> str:
        return self.amp if self.device_type == "cuda" else "off"  # training.autocast: CUDA only

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
        h.update(
            json.dumps(
                {
                    "run": self.run_uri,
                    "sigmas": sorted(self.sigmas),
                    "bn": cfg.bn,
                    "n0": cfg.n0,
                    "n": cfg.n,
                    "alpha": cfg.alpha,
                    "seed": cfg.seed,
                    "batch_size": cfg.batch_size,
                    "data_source": self.data_source,
                    "start": cfg.start,
                    "skip": cfg.skip,
                    "stop": self.stop,
                    "max_images": cfg.max_images,
                    "epoch": self.epoch,
                    "device": self.device_type,
                    "channels_last": self.channels_last,
                    "fold_bn": self.fold_bn,
                    "amp": self.effective_amp,
                    **cfg.engine_options(self.device_type),
                },
                sort_keys=True,
            ).encode()
        )
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
        """What produced a result (stored with every shard and summary)."""
        cfg = self.cfg
        return {
            "sigma": float(sigma),
            "n0": cfg.n0,
            "n": cfg.n,
            "alpha": cfg.alpha,
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "bn": bn_set_for(cfg, sigma),
            "model": self.model_config.arch,
            "run": self.run_uri,
            "epoch": self.epoch,
            "data_source": self.data_source,
            "data": self.data_description,
            "start": cfg.start,
            "skip": cfg.skip,
            "stop": self.stop,
            "max_images": cfg.max_images,
            "device": self.device_type,
            "channels_last": self.channels_last,
            "fold_bn": self.fold_bn,
            "amp": self.effective_amp,
            **cfg.engine_options(self.device_type),
            "run_id": self.run_id,
            "shards": self.shards,
        }

    def build_model(self, device: torch.device) -> torch.nn.Module:
        """The trained network in eval mode (BN statistics frozen; set a sigma's with set_bn_stats)."""
        model = build_model(self.model_config)
        model.load_state_dict(self.model_state)
        return model.to(device).eval()

    def base_classifier(self, net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The function f whose votes are counted, for the statistics now in ``net``: the network,
        with BN folded into its convolutions (a copy), channels-last, under autocast, as the plan asks."""
        f = fold_conv_bn(net) if self.fold_bn else net
        if self.channels_last:
            f = f.to(memory_format=torch.channels_last)
        return _Autocast(f, self.amp, device) if self.effective_amp != "off" else f

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
        return [("tbn_certify_images", result.images, tags), ("tbn_certify_shards", 1, tags), ("tbn_certify_images_per_second", rate, tags)]

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


class _Autocast(torch.nn.Module):
    """f under mixed precision: still one fixed function (so a valid base classifier), with fp32 logits."""

    def __init__(self, model: torch.nn.Module, amp: str, device: torch.device) -> None:
        super().__init__()
        self.model, self.amp, self.device = model, amp, device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.amp, self.device):
            return self.model(x).float()


def plan_certify(
    run: Run,
    cfg: CertifyConfig,
    output: Storage,
    *,
    data_cfg: DataConfig | None = None,
    shards: int | None = None,
    stop: int | None = None,
    device_type: str = "cpu",
    channels_last: bool = False,
    fold_bn: bool = False,
    amp: str = "off",
) -> CertifyPlan:
    """Check everything a certification needs (checkpoint, every sigma's statistics, images,
    shards, a writable output) so that a bad input fails in seconds, not after hours."""
    sigmas = tuple(dict.fromkeys(check_sigma(s) for s in cfg.sigmas))
    if amp not in ("off", "bf16", "fp16"):
        raise TbnError(f"amp must be off, bf16 or fp16, got {amp!r}")
    model, ckpt = run.load_model("cpu")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    stats = {sigma: run.bn_stats(bn_set_for(cfg, sigma), model) for sigma in sigmas}
    for sigma in sigmas:
        set_bn_stats(model, stats[sigma])  # a set that does not fit the model fails here
    d = load_data_for(ckpt, data_cfg)
    test = d.test.by_index(select_test_indices(d, cfg, stop))
    if shards is None:
        shards = min(cfg.shards, len(test))  # the config's default, capped at one shard per image
    elif not 1 <= shards <= len(test):
        raise TbnError(f"--shards {shards}: need between 1 and the {len(test)} selected test images; use --shards {len(test)} or fewer")
    output.check()
    plan = CertifyPlan(
        run_uri=run.uri,
        cfg=cfg,
        sigmas=sigmas,
        model_config=ckpt.config.model,
        model_state=state,
        epoch=ckpt.epoch,
        stats=stats,
        data_source=d.source,
        data_description=d.description,
        test=test,
        stop=stop,
        shards=shards,
        output=output,
        device_type=device_type,
        channels_last=channels_last,
        fold_bn=fold_bn,
        amp=amp,
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

    def run(self, unit: tuple[float, int]) -> ShardResult:
        return self.certify_shard(*unit)

    def certify_shard(self, sigma: float, shard: int) -> ShardResult:
        plan, cfg = self.plan, self.plan.cfg
        idx = plan.shard_indices(shard)
        rows = np.array([self._row[int(i)] for i in idx], dtype=np.int64)
        set_bn_stats(self.net, plan.stats[sigma])
        if sigma not in self._classifiers:
            self._classifiers[sigma] = plan.base_classifier(self.net, self.device)
        started, t0 = time.time(), time.perf_counter()
        records = certify_examples(
            self._classifiers[sigma],
            plan.test.images[rows],
            plan.test.labels[rows],
            idx,
            sigma=sigma,
            n0=cfg.n0,
            n=cfg.n,
            alpha=cfg.alpha,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            device=self.device,
            channels_last=plan.channels_last,
            images_per_pass=cfg.images_per_pass,
            adaptive=AdaptiveSampling.from_config(cfg.adaptive_sampling) if cfg.adaptive else None,
            cudnn_autotune=cfg.cudnn_autotune,
            compile_backend=cfg.compile,
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


def pending_shards(plan: CertifyPlan) -> list[tuple[float, int]]:
    """The (sigma, shard) pairs not yet stored and verified (readable, the planned indices)."""
    return pending(plan).units


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
    write_certification_report([{**o.summary, "params": o.summary} for o in outputs], out)
    for o in outputs:  # the numbers themselves are printed once, as a table, by the command
        log(f"sigma={o.sigma:g}: {o.summary['images']} images -> {o.location}")
    return outputs


def run_plan_in_process(
    plan: CertifyPlan, device: torch.device, *, progress: bool = True, on_shard: Callable[[ShardResult], None] | None = None
) -> CertifyResult:
    """Certify the pending shards of ``plan`` in this process, then aggregate (no Ray)."""
    return run_in_process(plan, device, progress=progress, on_unit=on_shard)


def certify_run(
    run: Run,
    cfg: CertifyConfig,
    output: Storage,
    *,
    data_cfg: DataConfig | None = None,
    device: str = "auto",
    shards: int | None = None,
    stop: int | None = None,
    channels_last: bool = False,
    fold_bn: bool = False,
    amp: str = "off",
    progress: bool = True,
) -> list[CertifyOutput]:
    """CERTIFY every selected test image at each sigma with that sigma's frozen TBN statistics,
    in this process, into ``output/<run-id>`` (resuming from the shards already there)."""
    dev = resolve_device(device)
    plan = plan_certify(
        run, cfg, output, data_cfg=data_cfg, shards=shards, stop=stop, device_type=dev.type,
        channels_last=channels_last, fold_bn=fold_bn, amp=amp,
    )
    return run_plan_in_process(plan, dev, progress=progress).outputs


