"""Sharded, resumable certification (``tbn-ray certify``), shared by the in-process path and Ray.

A certification is cut into shards: fixed lists of test indices, the same on every re-run.
Each shard is certified as a whole and written once, as one object, to a deterministic key
under ``<output>/<run-id>/``; the run id is a digest of everything that changes the numbers,
so a re-run of the same command finds its shards and a different one never mixes with them.
The in-process path (``certify_run``) and the Ray actors (``distributed.certify``) run the same
``ShardCertifier`` and the same ``aggregate``: same files, and either can finish the other's run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.fx.experimental.optimization import fuse as fold_conv_bn

from tbn_ray.science import data as data_mod
from tbn_ray.config import CertifyConfig, DataConfig, ModelConfig, check_sigma
from tbn_ray.errors import TbnError, log
from tbn_ray.jobs.layout import SHARD_KEY as _SHARD_KEY, shard_problem
from tbn_ray.science.models import build_model
from tbn_ray.store.runs import Run, hash_weights, load_data_for, tensor_bytes
from tbn_ray.science.smoothing import certify_examples, summarize, write_results
from tbn_ray.store.storage import Storage, map_concurrently
from tbn_ray.science.tbn import CLEAN, BNStats, bn_key, set_bn_stats
from tbn_ray.science.training import autocast, resolve_device

#: Shards when none are asked for (capped at the number of images): enough to keep dozens of
#: GPUs busy, few enough that a shard is a sizeable unit of resumable work.
DEFAULT_SHARDS = 64
SHARD_FORMAT = "tbn-ray/certify-shard-v1"
_SHARD_META = b"tbn_ray.shard"


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


def sigma_dir(sigma: float) -> str:
    return f"sigma={float(sigma):g}"


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
        return f"{sigma_dir(sigma)}/shard-{shard:05d}-of-{self.shards:05d}.parquet"

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
        shards = min(DEFAULT_SHARDS, len(test))
    elif not 1 <= shards <= len(test):
        raise TbnError(f"--shards {shards}: need between 1 and the {len(test)} selected test images; use --shards {len(test)} or fewer")
    output.check()
    return CertifyPlan(
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
        key = plan.shard_key(sigma, shard)
        rows_out = [{**r, "actor": self.worker["actor"], "node": self.worker["node"]} for r in records]
        table = pa.Table.from_pylist(rows_out).replace_schema_metadata({_SHARD_META: json.dumps(meta)})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        uri = plan.out.write_bytes(key, buf.getvalue())  # one whole object: present complete or absent
        return ShardResult(float(sigma), shard, len(idx), seconds, uri, dict(self.worker))


class _UnusableShard(TbnError):
    """A stored shard that cannot be used (corrupt, or another plan's): certify it again."""


def _read_shard(out: Storage, key: str, expected: list[int] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A shard's records and metadata, checked: it holds exactly the indices it was planned with.

    An unreachable store raises TbnError; a shard that is there but unusable, ``_UnusableShard``.
    """
    data = out.read_bytes(key)
    where = out.object_uri(key)
    try:
        table = pq.read_table(io.BytesIO(data))
        meta = json.loads((table.schema.metadata or {})[_SHARD_META])
    except (pa.ArrowException, KeyError, ValueError, OSError) as e:
        raise _UnusableShard(f"{where} is not a readable shard ({type(e).__name__})") from None
    problem = shard_problem(table, meta)
    if problem is not None:
        raise _UnusableShard(f"{where} {problem}: not a usable tbn-ray shard")
    m = _SHARD_KEY.match(key)
    if meta.get("format") != SHARD_FORMAT or m is None:
        raise _UnusableShard(f"{where} is not a tbn-ray shard ({SHARD_FORMAT})")
    if (sigma_dir(meta["sigma"]), meta["shard"], meta["shards"]) != (m.group(1), int(m.group(2)), int(m.group(3))):
        raise _UnusableShard(f"{where} holds sigma={meta['sigma']} shard {meta['shard']}/{meta['shards']}, not what its key says")
    records = table.to_pylist()
    planned = meta["indices"] if expected is None else expected
    if meta["indices"] != planned or [r["idx"] for r in records] != planned:
        raise _UnusableShard(f"{where} does not hold the indices planned for it")
    return records, meta


def pending_shards(plan: CertifyPlan) -> list[tuple[float, int]]:
    """The (sigma, shard) pairs not yet stored and verified (readable, the planned indices)."""
    present = set(plan.out.list())

    def usable(job: tuple[float, int]) -> bool:
        sigma, shard = job
        key = plan.shard_key(sigma, shard)
        if key not in present:
            return False
        try:
            _, meta = _read_shard(plan.out, key, plan.shard_indices(shard).tolist())
            if meta["params"] != plan.params(sigma):
                raise _UnusableShard(f"{plan.out.object_uri(key)} was certified with other parameters")
        except _UnusableShard as e:
            log(f"{e}: certifying it again")
            return False
        return True

    jobs = [(sigma, shard) for sigma in plan.sigmas for shard in range(plan.shards)]
    return [job for job, ok in zip(jobs, map_concurrently(usable, jobs)) if not ok]


@dataclass(frozen=True)
class CertifyOutput:
    sigma: float
    summary: dict[str, Any]
    location: str


@dataclass(frozen=True)
class CertifyResult:
    run_id: str
    location: str  # <output>/<run-id>
    outputs: list[CertifyOutput]
    report: str  # report.md (plus certified_accuracy.png beside it)
    shards_computed: int
    shards_skipped: int


def _merge_sigma(out: Storage, name: str, keys: list[str], expected: CertifyPlan | None) -> CertifyOutput:
    """One sigma's shards -> certify.tsv, radii.parquet, summary.json, after checking every index appears once."""
    if expected is None:
        shards = map_concurrently(lambda key: _read_shard(out, key), keys)
    else:
        shards = map_concurrently(lambda k: _read_shard(out, keys[k], expected.shard_indices(k).tolist()), list(range(len(keys))))
    records = [r for recs, _ in shards for r in recs]
    metas = [meta for _, meta in shards]
    idx = [r["idx"] for r in records]
    if len(set(idx)) != len(idx):
        raise TbnError(f"{out.uri}/{name}: an index appears in two shards; delete that folder and certify again")
    total = metas[0]["images_total"]
    wanted = set(expected.indices.tolist()) if expected is not None else None
    if len(idx) != total or (wanted is not None and set(idx) != wanted):
        raise TbnError(f"{out.uri}/{name}: the shards hold {len(idx)} images, the certification {total}; certify again")
    params = metas[0]["params"]
    if any(m["params"] != params for m in metas):
        raise TbnError(f"{out.uri}/{name}: shards from different certifications; delete that folder and certify again")
    finished = max(m["started"] + m["seconds"] for m in metas)
    params = {
        **params,
        "wall_seconds": round(finished - min(m["started"] for m in metas), 3),  # first shard start to last shard end
        "compute_seconds": round(sum(m["seconds"] for m in metas), 3),
        "gpu_hours": round(sum(m["seconds"] * m["gpus"] for m in metas) / 3600, 6),
        "workers": len({m["worker"]["actor"] for m in metas}),
    }
    summary = summarize(records)
    where = out.child(name)
    write_results(records, summary, where, params)
    return CertifyOutput(float(params["sigma"]), {**summary, **params}, where.uri)


def aggregate(out: Storage, *, plan: CertifyPlan | None = None) -> list[CertifyOutput]:
    """Merge the shards under ``out`` (``<output>/<run-id>``) into per-sigma results and the report.

    Reads nothing but the shard files, so ``tbn-ray report`` can rebuild all of it. With a
    ``plan``, every planned shard must be there with its planned indices; without, each sigma
    uses its complete set of shards and incomplete sigmas are left out (and named).
    """
    found: dict[str, dict[int, dict[int, str]]] = {}
    for key in out.list():
        m = _SHARD_KEY.match(key)
        if m:
            found.setdefault(m.group(1), {}).setdefault(int(m.group(3)), {})[int(m.group(2))] = key
    chosen: dict[str, list[str]] = {}
    if plan is not None:
        for sigma in plan.sigmas:
            have = found.get(sigma_dir(sigma), {}).get(plan.shards, {})
            missing = sorted(set(range(plan.shards)) - set(have))
            if missing:
                raise TbnError(f"{out.uri}/{sigma_dir(sigma)}: shards {missing[:5]} missing; run the same certify command again")
            chosen[sigma_dir(sigma)] = [have[k] for k in range(plan.shards)]
    else:
        for name, by_count in sorted(found.items()):
            complete = [n for n, have in by_count.items() if len(have) == n]
            if complete:
                n = max(complete)
                chosen[name] = [by_count[n][k] for k in range(n)]
            else:
                n, have = max(by_count.items(), key=lambda item: len(item[1]) / item[0])
                log(f"{out.uri}/{name}: {n - len(have)} of {n} shards missing, left out (run the certify command again to finish)")
        if not chosen:
            raise TbnError(f"no complete certification under {out.uri}: point at <output>/<run-id> of a finished (or resumed) tbn-ray certify")
    outputs = [_merge_sigma(out, name, keys, plan) for name, keys in chosen.items()]
    summaries = [{**o.summary, "params": o.summary} for o in outputs]
    first = outputs[0].summary
    from tbn_ray.reports.certify import write_report

    write_report(summaries, out, title=f"Certification of {first['run']} ({first['run_id']})", extra=_evaluation_section(first["run"], out))
    for o in outputs:
        acc = o.summary["certified_accuracy"]
        log(f"sigma={o.sigma:g}: certified accuracy at r=0 {acc['0.0']:.3f}, r=0.5 {acc['0.5']:.3f}, ACR {o.summary['acr']:.3f} -> {o.location}")
    return outputs


def _evaluation_section(run_uri: str, out: Storage) -> str | None:
    """The run's ``tbn-ray evaluate`` results, for the report next to its certificates. Best
    effort: a run that cannot be read from here (moved, another account's bucket) only loses
    that section, not the certification report."""
    from tbn_ray.jobs.evaluate import EVALUATE_DIR, evaluation_section

    try:
        run = Storage.open(run_uri)
        image = run.object_uri(f"{EVALUATE_DIR}/corruption_accuracy.png")
        if "://" not in image and "://" not in out.uri:
            image = os.path.relpath(image, out.uri)
        return evaluation_section(run, image=image)
    except TbnError as e:
        log(f"report: the evaluation results of {run_uri} are left out ({e})")
        return None


class ShardProgress:
    """The driver's progress bar: images and shards done, images/s and ETA (tqdm's)."""

    def __init__(self, plan: CertifyPlan, todo: list[tuple[float, int]], enabled: bool) -> None:
        from tqdm.auto import tqdm

        total = len(plan.test) * len(plan.sigmas)
        left = sum(len(plan.shard_indices(shard)) for _, shard in todo)
        self.total_shards = plan.shards * len(plan.sigmas)
        self.shards = self.total_shards - len(todo)
        self.bar = tqdm(total=total, initial=total - left, unit="img", desc="certify", disable=not enabled, dynamic_ncols=True)
        self.bar.set_postfix_str(f"shards {self.shards}/{self.total_shards}")

    def update(self, result: ShardResult) -> None:
        self.shards += 1
        self.bar.set_postfix_str(f"shards {self.shards}/{self.total_shards}", refresh=False)
        self.bar.update(result.images)

    def close(self) -> None:
        self.bar.close()


def run_plan_in_process(
    plan: CertifyPlan, device: torch.device, *, progress: bool = True, on_shard: Callable[[ShardResult], None] | None = None
) -> CertifyResult:
    """Certify the pending shards of ``plan`` in this process, then aggregate (no Ray)."""
    todo = pending_shards(plan)
    skipped = plan.shards * len(plan.sigmas) - len(todo)
    log(f"certification {plan.run_id}: {len(plan.test)} test images x {len(plan.sigmas)} sigma(s) in {plan.shards} shards each, "
        f"{skipped} shard(s) already done, device {device} -> {plan.out.uri}")
    if todo:
        certifier = ShardCertifier(plan, device, {"actor": "in-process", "node": socket.gethostname()}, 1.0 if device.type == "cuda" else 0.0)
        bar = ShardProgress(plan, todo, progress)
        try:
            for sigma, shard in todo:
                result = certifier.certify_shard(sigma, shard)
                bar.update(result)
                if on_shard is not None:
                    on_shard(result)
        finally:
            bar.close()
    outputs = aggregate(plan.out, plan=plan)
    return CertifyResult(plan.run_id, plan.out.uri, outputs, plan.out.object_uri("report.md"), len(todo), skipped)


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


