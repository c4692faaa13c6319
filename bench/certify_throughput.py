"""Certification throughput, measured side by side on the same model, images and n.

1. CPU, in-process: a baseline written the way the reference implementation (Cohen et al.'s
   core.py) does it -- single process, fp32, eval mode, torch.no_grad, noise batch 400, one
   image at a time, x.repeat + randn_like, counting votes in a Python loop -- against
   tbn-ray's in-process certification (certification.ShardCertifier: inference mode, one reused
   noise buffer drawn from a per-example generator, torch.bincount, and the plan options
   channels-last, BN folded into the convolutions and a noise batch of its own). Also checked: fed the same noise, the baseline's CERTIFY and
   tbn-ray's give the same counts, predictions and radii (identical semantics).
2. Ray: 1 vs 2 actors (one torch thread each) on the same shards, against the in-process
   path at one thread: scaling and Ray's overhead. ``ray-steady``: one warm actor and the
   in-process path certify the same shards alternately, shard by shard: the per-shard cost of
   running in an actor, without run-to-run drift; and, apart, the fixed costs of an actor
   (its start, its first shard).
3. GPU (skipped without CUDA): ResNet-110 at n=100,000, seconds per image, baseline vs
   tbn-ray fp32 vs tbn-ray bf16 + channels-last + BN folded; then the sampling engine
   (``engine_rows``): one image at a time vs packed vs packed + torch.compile (+ cuDNN
   autotuning) vs adaptive sample size, with forward passes per image and projected
   GPU-hours for 10,000 test images per sigma.
4. Engine rows on CPU too (part 1, at the small n): fixed n one image at a time vs packed vs
   adaptive, with seconds and forward passes per image and certified accuracy at each report
   radius beside fixed n's. Adaptive's savings depend on the model: with the untrained default
   network nearly every image abstains after its pilot; pass ``--run`` (a trained run with TBN
   statistics at sigma 0.25, e.g. the quickstart's ``tbn-results/quickstart``) for figures
   that mean something. ``bench/adaptive_sampling.py`` simulates n = 100,000 on real vote counts.
5. The tuned engine (``--parts tuned``): tbn-ray's in-process certification, as ``tbn-ray certify
   --local`` runs it, with every speed option on (packed, bf16, channels-last, BN folded, cuDNN
   autotuning), then with torch.compile, then with the sequential sample size.

The model is untrained (He-initialised, seed 0) with TBN statistics calibrated on noisy
held-out images: throughput does not depend on the weights. Every configuration certifies
every image ``--rounds`` times, interleaved image by image with the other configurations so
that load from other processes hits them alike; per image the best time counts (the median
is reported too, and CPU seconds, which contention inflates less).

    python bench/certify_throughput.py                      # CPU and Ray parts (about 12 min on 2 cores)
    OMP_NUM_THREADS=1 python bench/certify_throughput.py --parts ray   # Ray part, both sides alike

Ray starts its workers with OMP_NUM_THREADS=1. Measured shard by shard (one actor and the
in-process path interleaved on the same shards), the actor computed each shard 10% slower
than this process when only this process had 2 OpenMP threads (torch.set_num_threads(1)
on top), and 2% slower when both had OMP_NUM_THREADS=1: give the Ray part the same setting.
    python bench/certify_throughput.py --parts gpu          # GPU part only (prints "skipped" without CUDA)
    python bench/certify_throughput.py --parts engine --run tbn-results/quickstart   # engine rows, CPU
    python bench/certify_throughput.py --parts tuned        # the tuned engine (part 5), CUDA by default
Figures go to bench/results/certify_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from certify_engine import SIGMA, engine_rows, engine_table  # noqa: E402 (siblings: bench/ is the script's path)
from scipy.stats import beta, norm
from timing import interleaved  # noqa: E402
from torch import nn

from tbn_ray.config import CalibrateConfig, CertifyConfig, DataConfig, ModelConfig, TrainConfig
from tbn_ray.jobs.certify import CertifyPlan, ShardCertifier, plan_certify, run_plan_in_process
from tbn_ray.jobs.pipeline import calibrate_run
from tbn_ray.science.models import build_model
from tbn_ray.science.smoothing import ABSTAIN, example_generator
from tbn_ray.science.tbn import set_bn_stats
from tbn_ray.store.runs import Run, make_checkpoint
from tbn_ray.store.storage import Storage

RESULTS = Path(__file__).resolve().parent / "results"


# --- the reference-style baseline ------------------------------------------------------------


class ReferenceSmooth:
    """Cohen et al.'s core.py CERTIFY, kept as written there (device made a parameter).

    ``generator=None`` draws from torch's global RNG as core.py does; passing one feeds it the
    noise tbn-ray draws, for the semantics check.
    """

    def __init__(self, base: nn.Module, num_classes: int, sigma: float, device: torch.device) -> None:
        self.base, self.num_classes, self.sigma, self.device = base, num_classes, sigma, device

    def certify(
        self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int, generator=None
    ) -> tuple[int, float, np.ndarray]:
        self.base.eval()
        counts_selection = self._sample_noise(x, n0, batch_size, generator)
        c_a_hat = int(counts_selection.argmax().item())
        counts_estimation = self._sample_noise(x, n, batch_size, generator)
        n_a = int(counts_estimation[c_a_hat].item())
        p_a = self._lower_confidence_bound(n_a, n, alpha)
        if p_a < 0.5:
            return ABSTAIN, 0.0, counts_estimation
        return c_a_hat, self.sigma * float(norm.ppf(p_a)), counts_estimation

    def _sample_noise(self, x: torch.Tensor, num: int, batch_size: int, generator) -> np.ndarray:
        with torch.no_grad():
            counts = np.zeros(self.num_classes, dtype=int)
            for _ in range(int(np.ceil(num / batch_size))):
                this_batch_size = min(batch_size, num)
                num -= this_batch_size
                batch = x.repeat((this_batch_size, 1, 1, 1))
                if generator is None:
                    noise = torch.randn_like(batch, device=self.device) * self.sigma
                else:
                    noise = torch.randn(batch.shape, generator=generator, device=self.device) * self.sigma
                predictions = self.base(batch + noise).argmax(1)
                counts += self._count_arr(predictions.cpu().numpy(), self.num_classes)
            return counts

    @staticmethod
    def _count_arr(arr: np.ndarray, length: int) -> np.ndarray:
        counts = np.zeros(length, dtype=int)
        for idx in arr:
            counts[idx] += 1
        return counts

    @staticmethod
    def _lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
        # statsmodels' proportion_confint(n_a, n, alpha=2*alpha, method="beta")[0]
        return 0.0 if n_a == 0 else float(beta.ppf(alpha, n_a, n - n_a + 1))


# --- setup -------------------------------------------------------------------------------------


def make_run(root: Path, arch: str) -> Run:
    """An untrained network of ``arch`` with TBN statistics calibrated at SIGMA."""
    run = Run(Storage.open(root).child(arch))
    cfg = TrainConfig(name=arch, model=ModelConfig(arch=arch), data=DataConfig(source="partial"))
    torch.manual_seed(0)
    run.save_checkpoint(make_checkpoint(build_model(cfg.model), cfg, 0, {"note": "untrained, for timing"}))
    calibrate_run(run, CalibrateConfig(sigmas=(SIGMA,), samples=512, batch_size=256), device="auto", progress=False)
    return run


def make_plan(
    run: Run,
    out: Path,
    args: argparse.Namespace,
    images: int,
    *,
    batch_size: int,
    shards: int = 1,
    device_type: str = "cpu",
    **settings: Any,
) -> CertifyPlan:
    """A plan of ``images`` test images; ``settings`` are further CertifyConfig fields."""
    cfg = CertifyConfig(
        sigmas=(SIGMA,),
        n0=args.n0,
        n=args.n,
        alpha=0.001,
        batch_size=batch_size,
        max_images=images,
        shards=shards,
        **settings,
    )
    return plan_certify(run, cfg, Storage.open(out), device_type=device_type)


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": os.getloadavg(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


# --- part 1: CPU in-process ---------------------------------------------------------------------


def cpu_part(run: Run, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    images = args.images
    plain = make_plan(run, tmp / "plain", args, images, batch_size=400, shards=images)
    tuned = make_plan(
        run, tmp / "tuned", args, images, batch_size=args.batch_size, shards=images, channels_last=True, fold_bn=True
    )
    cpu = torch.device("cpu")
    net = plain.build_model(cpu)
    set_bn_stats(net, plain.stats[SIGMA])
    reference = ReferenceSmooth(net, 10, SIGMA, cpu)
    xs = [torch.from_numpy(img).permute(2, 0, 1).float().div(255) for img in plain.test.images]
    worker = {"actor": "bench", "node": platform.node()}

    def baseline(i: int) -> tuple[int, float]:
        torch.manual_seed(i)
        return reference.certify(xs[i], args.n0, args.n, 0.001, 400)[:2]

    def certify_with(plan: CertifyPlan) -> Callable[[int], Any]:
        certifier = ShardCertifier(plan, cpu, worker)
        return lambda i: certifier.certify_shard(SIGMA, i)  # one image per shard

    names = (
        "baseline (reference style, batch 400)",
        "tbn-ray in-process, batch 400, contiguous",
        f"tbn-ray in-process, batch {args.batch_size}, channels-last, BN folded",
    )
    print(f"CPU in-process: {images} images, n0={args.n0}, n={args.n}, {args.threads} torch threads", flush=True)
    res = interleaved(dict(zip(names, (baseline, certify_with(plain), certify_with(tuned)))), images, args.rounds)
    base = res[names[0]]
    rows = [
        {
            "config": name,
            "images_per_s": images / r["wall_best_s"],
            "images_per_s_median": images / r["wall_median_s"],
            "images_per_cpu_s": images / r["cpu_best_s"],
            "speedup_wall": base["wall_best_s"] / r["wall_best_s"],
            "speedup_wall_median": base["wall_median_s"] / r["wall_median_s"],
            "speedup_cpu": base["cpu_best_s"] / r["cpu_best_s"],
            "load_average_1min": r["load_average_1min"],
        }
        for name, r in res.items()
    ]

    # Same noise in (tbn-ray's per-example generators, batch 400), same numbers out.
    ours = {
        r["idx"]: r for shard in range(images) for r in _shard_records(plain, shard)
    }  # written by the batch-400 config
    same = 0
    for i, x in zip(plain.indices.tolist(), xs):
        g = example_generator(plain.cfg.seed, i, cpu)
        predict, radius, counts = reference.certify(x, args.n0, args.n, 0.001, 400, generator=g)
        r = ours[i]
        same += predict == r["predict"] and radius == r["radius"] and counts.tolist() == r["counts"]
    return {"rows": rows, "semantics_check": {"images": len(xs), "identical_counts_predictions_radii": same}}


def _shard_records(plan: CertifyPlan, shard: int) -> list[dict[str, Any]]:
    import io

    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(plan.out.read_bytes(plan.shard_key(SIGMA, shard)))).to_pylist()


def engine_part(run: Run, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    plan = make_plan(run, tmp / "engine", args, args.images, batch_size=args.batch_size)
    rows = engine_rows(plan, torch.device("cpu"), args, n=args.n, batch_size=args.batch_size)
    return {"images": args.images, "n": args.n, "model": args.run or f"{args.arch} (untrained)", "rows": rows}


# --- part 2: Ray actors ---------------------------------------------------------------------------


def ray_part(run: Run, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from tbn_ray.distributed.certify import run_plan_on_ray
    from tbn_ray.distributed.runtime import connect, disconnect

    images, shards = args.ray_images, args.ray_shards
    print(f"Ray: {images} images in {shards} shards, n0={args.n0}, n={args.n}, one torch thread per actor", flush=True)
    cluster = connect(num_cpus=os.cpu_count())
    try:
        torch.set_num_threads(1)
        cpu = torch.device("cpu")
        options = {"batch_size": args.batch_size, "shards": shards, "channels_last": True, "fold_bn": True}

        def in_process(_: int) -> float:
            plan = make_plan(run, tmp / f"inproc-{time.monotonic_ns()}", args, images, **options)
            result = run_plan_in_process(plan, cpu, progress=False)
            return result.outputs[0].summary["wall_seconds"]  # first shard start to last shard end

        def on_ray(actors: int) -> Callable[[int], Any]:
            def go(_: int) -> float:
                plan = make_plan(run, tmp / f"ray{actors}-{time.monotonic_ns()}", args, images, **options)
                result = run_plan_on_ray(plan, cluster, actors=actors, cpus_per_actor=1, progress=False)
                return result.outputs[0].summary["wall_seconds"]  # first shard start to last shard end

            return go

        res = interleaved(
            {"in-process, 1 thread": in_process, "Ray, 1 actor": on_ray(1), "Ray, 2 actors": on_ray(2)}, 1, args.rounds
        )
    finally:
        disconnect(cluster)
    one, two, local = res["Ray, 1 actor"], res["Ray, 2 actors"], res["in-process, 1 thread"]
    return {
        "images": images,
        "shards": shards,
        "rows": [
            {"config": name, "images_per_s": images / r["wall_best_s"], "load_average_1min": r["load_average_1min"]}
            for name, r in res.items()
        ],
        "scaling_2_vs_1_actor": one["wall_best_s"] / two["wall_best_s"],
        "scaling_2_vs_1_actor_shard_span": min(one["results"]) / min(two["results"]),
        "ray_overhead_1_actor_end_to_end": one["wall_best_s"] / local["wall_best_s"] - 1,
        "ray_overhead_1_actor_shard_span": min(one["results"]) / min(local["results"]) - 1,
        "note": "end to end = the whole call (Ray: actor start, plan shipping; both: shard writes, aggregation, report); "
        "shard span = first shard start to last shard end, what a long run converges to",
    }


def ray_steady_part(run: Run, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Steady-state cost of an actor: the same shards certified alternately by one warm actor and
    in this process (one torch thread each), shard by shard, so drift on a shared machine hits
    both alike. No fixed costs (actor start, plan shipping, aggregation) are in these figures."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from tbn_ray.distributed.certify import CertifyActor
    from tbn_ray.distributed.runtime import connect, disconnect

    images, shards = args.steady_images, args.steady_shards
    print(f"Ray steady state: {images} images in {shards} shards, one actor vs in-process, interleaved", flush=True)
    options = {"batch_size": args.batch_size, "shards": shards, "channels_last": True, "fold_bn": True}
    local_plan = make_plan(run, tmp / "steady-local", args, images, **options)
    actor_plan = make_plan(run, tmp / "steady-actor", args, images, **options)
    cluster = connect(num_cpus=os.cpu_count())
    try:
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        local = ShardCertifier(local_plan, torch.device("cpu"), {"actor": "bench", "node": platform.node()})
        local_first = local.certify_shard(SIGMA, 0).seconds + time.perf_counter() - t0  # model build, first passes
        t0 = time.perf_counter()
        actor = CertifyActor.options(num_cpus=1).remote(actor_plan.run_id, 1, 0.0)
        ray.get(actor.ready.remote())  # a worker process, its imports (torch), the actor's constructor
        actor_start = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = ray.put(actor_plan)
        ray.get(actor.run.remote([ref], (SIGMA, 0)))  # shard 0 warms it up: plan fetch, model build, first passes
        actor_first = time.perf_counter() - t0
        in_process, in_actor, round_trip = [], [], []
        for shard in range(1, shards):
            in_process.append(local.certify_shard(SIGMA, shard).seconds)
            t0 = time.perf_counter()
            in_actor.append(ray.get(actor.run.remote([ref], (SIGMA, shard))).seconds)
            round_trip.append(time.perf_counter() - t0)
        ray.kill(actor)
    finally:
        disconnect(cluster)
    return {
        "images": images,
        "shards": shards,
        "in_process_s": sum(in_process),
        "actor_s": sum(in_actor),
        "round_trip_s": sum(round_trip),
        "actor_start_s": actor_start,
        "first_shard_s": {"in_process": local_first, "actor": actor_first},
        "actor_compute_overhead": sum(in_actor) / sum(in_process) - 1,
        "actor_round_trip_overhead": sum(round_trip) / sum(in_process) - 1,
        "per_shard": {"in_process": in_process, "actor": in_actor, "round_trip": round_trip},
    }


# --- part 3: GPU ----------------------------------------------------------------------------------


def gpu_part(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    if not torch.cuda.is_available():
        print("GPU part skipped: no CUDA device", flush=True)
        return {"skipped": "no CUDA device"}
    gpu = torch.device("cuda")
    run = Run(Storage.open(args.run)) if args.run else make_run(tmp / "gpu-run", "resnet110")
    n_args = argparse.Namespace(n0=100, n=args.gpu_n)
    base_plan = make_plan(
        run, tmp / "gpu-fp32", n_args, args.gpu_images, batch_size=1000, shards=args.gpu_images, device_type="cuda"
    )
    bf16_plan = make_plan(
        run,
        tmp / "gpu-bf16",
        n_args,
        args.gpu_images,
        batch_size=args.gpu_batch_size,
        shards=args.gpu_images,
        device_type="cuda",
        channels_last=True,
        fold_bn=True,
        amp="bf16",
    )
    net = base_plan.build_model(gpu)
    set_bn_stats(net, base_plan.stats[SIGMA])
    reference = ReferenceSmooth(net, 10, SIGMA, gpu)
    xs = [torch.from_numpy(img).permute(2, 0, 1).float().div(255).to(gpu) for img in base_plan.test.images]
    worker = {"actor": "bench", "node": platform.node()}
    fp32, bf16 = ShardCertifier(base_plan, gpu, worker, 1.0), ShardCertifier(bf16_plan, gpu, worker, 1.0)

    def synced(fn: Callable[[int], Any]) -> Callable[[int], Any]:
        def go(i: int) -> Any:
            out = fn(i)
            torch.cuda.synchronize()
            return out

        return go

    print(f"GPU: ResNet-110, {args.gpu_images} images, n0=100, n={args.gpu_n}", flush=True)
    res = interleaved(
        {
            "baseline (reference style, batch 400, fp32)": synced(
                lambda i: reference.certify(xs[i], 100, args.gpu_n, 0.001, 400)[:2]
            ),
            "tbn-ray, batch 1000, fp32": synced(lambda i: fp32.certify_shard(SIGMA, i)),
            f"tbn-ray, batch {args.gpu_batch_size}, bf16, channels-last, BN folded": synced(
                lambda i: bf16.certify_shard(SIGMA, i)
            ),
        },
        args.gpu_images,
        args.rounds,
    )
    rows = [
        {
            "config": name,
            "seconds_per_image": r["wall_best_s"] / args.gpu_images,
            "forward_passes_per_image": 100 + args.gpu_n,
        }
        for name, r in res.items()
    ]
    engine_plan = make_plan(
        run, tmp / "gpu-engine", n_args, args.gpu_engine_images, batch_size=args.gpu_batch_size, device_type="cuda"
    )
    rows += engine_rows(engine_plan, gpu, args, n=args.gpu_n, batch_size=args.gpu_batch_size, gpu=True)
    for row in rows:
        row["gpu_hours_10k_images_per_sigma"] = row["seconds_per_image"] * 10_000 / 3600
    return {
        "device": torch.cuda.get_device_name(0),
        "model": args.run or "resnet110 (untrained)",
        "n": args.gpu_n,
        "rows": rows,
    }


def tuned_part(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The tuned engine through tbn-ray's own in-process certification (what ``tbn-ray certify --local``
    runs): packed, bf16, channels-last, BN folded, cuDNN autotuning; then with torch.compile; then
    with the sequential sample size. The engine rows are fp32 without these options."""
    device = torch.device(args.tuned_device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("tuned part skipped: no CUDA device", flush=True)
        return {"skipped": "no CUDA device"}
    run = Run(Storage.open(args.run)) if args.run else make_run(tmp / "tuned-run", args.arch)
    tuned = {"images_per_pass": args.images_per_pass, "cudnn_autotune": True}
    configs = {
        "tuned fixed n (packed, bf16, channels-last, BN folded, cuDNN autotuning)": tuned,
        f"tuned fixed n + torch.compile ({args.compile})": {**tuned, "compile": args.compile},
        "tuned + sequential sample size": {**tuned, "sample_size": "sequential"},
    }
    rows = []
    for i, (name, options) in enumerate(configs.items()):
        cfg = CertifyConfig(
            sigmas=(SIGMA,),
            n0=args.n0,
            n=args.n,
            batch_size=args.tuned_batch_size,
            max_images=args.tuned_images,
            shards=1,
            channels_last=True,
            fold_bn=True,
            amp="bf16",
            **options,
        )
        plan = plan_certify(run, cfg, Storage.open(tmp / f"tuned-{i}"), device_type=device.type)
        t0 = time.perf_counter()
        location = run_plan_in_process(plan, device, progress=False).outputs[0].location
        wall = time.perf_counter() - t0
        summary = Storage.open(location).read_json("summary.json")
        spi = summary["params"]["compute_seconds"] / summary["images"]
        rows.append(
            {
                "config": name,
                "seconds_per_image": spi,
                "wall_seconds": wall,
                "forward_passes_per_image": summary.get("forward_passes_per_image", args.n0 + args.n),
                "gpu_hours_10k_images_per_sigma": spi * 10_000 / 3600 if device.type == "cuda" else None,
                "certified_accuracy": summary["certified_accuracy"],
                "images": summary["images"],
                "amp": summary["params"]["amp"],
                "run_id": summary["params"]["run_id"],
            }
        )
        print(
            f"{name}: {spi:.3f} s/image, {rows[-1]['forward_passes_per_image']:,.0f} passes/image ({wall:.1f} s in all)",
            flush=True,
        )
    return {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "model": args.run or f"{args.arch} (untrained)",
        "n0": args.n0,
        "n": args.n,
        "images": args.tuned_images,
        "rows": rows,
        "note": "seconds per image: compute time of the certification (first shard included: compilation, cuDNN search)",
    }


# --- main -----------------------------------------------------------------------------------------


def _device_table(title: str, part: dict[str, Any]) -> list[str]:
    """A GPU-style part as markdown: seconds and forward passes per image, GPU-hours for 10k images."""
    if "skipped" in part:
        return [f"## {title}", "", f"Skipped: {part['skipped']}.", ""]
    images = f", {part['images']} images, n0={part['n0']}" if "images" in part else ""
    lines = [
        f"## {title} ({part['device']}, {part['model']}{images}, n={part['n']})",
        "",
        "| config | s / image | forward passes / image | GPU-hours, 10k images per sigma |",
        "|---|---|---|---|",
    ]
    for r in part["rows"]:
        gh = r["gpu_hours_10k_images_per_sigma"]
        lines.append(
            f"| {r['config']} | {r['seconds_per_image']:.3f} | {r['forward_passes_per_image']:,.0f} "
            f"| {'-' if gh is None else f'{gh:.2f}'} |"
        )
    return [*lines, "", *([part["note"], ""] if "note" in part else [])]


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Certification throughput",
        "",
        f"{report['date']}; `{report['command']}`",
        f"Machine: {m['cpu']}, {m['cores']} cores, GPU {m['gpu']}; torch {m['torch']}; OMP_NUM_THREADS={m.get('omp_num_threads')}; "
        f"load average at start {tuple(round(x, 1) for x in m['load_average'])}, at end {tuple(round(x, 1) for x in report['load_average_end'])}.",
        "",
    ]
    if "cpu" in report:
        c = report["cpu"]
        lines += [
            f"## CPU, in-process ({report['args']['arch']}, {report['args']['images']} images, n0={report['args']['n0']}, "
            f"n={report['args']['n']}, {report['args']['threads']} torch threads; per image the best of {report['args']['rounds']} interleaved rounds)",
            "",
            "| config | images/s (best) | speed-up (best) | speed-up (median) | images per CPU-s | speed-up (CPU time) |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['config']} | {r['images_per_s']:.3f} | {r['speedup_wall']:.2f}x | {r['speedup_wall_median']:.2f}x "
            f"| {r['images_per_cpu_s']:.3f} | {r['speedup_cpu']:.2f}x |"
            for r in c["rows"]
        ]
        s = c["semantics_check"]
        lines += [
            "",
            f"Semantics: fed the same noise, the baseline's CERTIFY and tbn-ray's agree on counts, prediction and radius for "
            f"{s['identical_counts_predictions_radii']}/{s['images']} images.",
            "",
        ]
    if "engine" in report:
        e = report["engine"]
        lines += [
            f"## Sampling engine, CPU ({e['model']}, {e['images']} images, n={e['n']}, sigma={SIGMA}; best of "
            f"{report['args']['rounds']} interleaved whole calls)",
            "",
            *engine_table(e["rows"]),
            "",
        ]
    if "ray" in report:
        r = report["ray"]
        lines += [
            f"## Ray ({r['images']} images in {r['shards']} shards, one torch thread per actor)",
            "",
            "| config | images/s (end to end) |",
            "|---|---|",
            *[f"| {row['config']} | {row['images_per_s']:.3f} |" for row in r["rows"]],
            "",
            f"Scaling 2 vs 1 actor: {r['scaling_2_vs_1_actor']:.2f}x end to end, {r['scaling_2_vs_1_actor_shard_span']:.2f}x over the shard span. "
            "Ray overhead at 1 actor vs in-process: "
            f"{100 * r['ray_overhead_1_actor_end_to_end']:+.1f}% end to end, {100 * r['ray_overhead_1_actor_shard_span']:+.1f}% over the shard span.",
            f"({r['note']})",
            "",
        ]
    if "ray-steady" in report:
        s = report["ray-steady"]
        lines += [
            f"## Ray, steady state ({s['images']} images in {s['shards']} shards; shard 0 warms up; the rest alternately in one actor and in-process)",
            "",
            f"In-process {s['in_process_s']:.1f} s, in the actor {s['actor_s']:.1f} s ({100 * s['actor_compute_overhead']:+.1f}%), "
            f"driver round trips {s['round_trip_s']:.1f} s ({100 * s['actor_round_trip_overhead']:+.1f}%).",
            f"Fixed costs: starting the actor {s['actor_start_s']:.1f} s (worker process, imports); its first shard "
            f"{s['first_shard_s']['actor']:.1f} s vs {s['first_shard_s']['in_process']:.1f} s in-process (plan fetch, model build, first passes).",
            "",
        ]
    for key, title in (("gpu", "GPU"), ("tuned", "Tuned engine")):
        if key in report:
            lines += _device_table(title, report[key])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--parts",
        default="cpu,engine,ray,ray-steady,gpu",
        help="comma-separated: cpu, engine, ray, ray-steady, gpu, tuned",
    )
    parser.add_argument(
        "--run",
        default=None,
        help="a trained run (TBN statistics at sigma 0.25) for the engine and GPU rows; default: untrained",
    )
    parser.add_argument(
        "--images-per-pass", type=int, default=8, help="images packed into each forward pass (engine rows)"
    )
    parser.add_argument("--gpu-engine-images", type=int, default=8, help="images for the GPU engine rows")
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--images", type=int, default=8, help="images for the CPU part")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=200, help="tbn-ray's noise batch on CPU")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for the CPU part")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ray-images", type=int, default=48)
    parser.add_argument("--ray-shards", type=int, default=12)
    parser.add_argument("--steady-images", type=int, default=24)
    parser.add_argument("--steady-shards", type=int, default=12)
    parser.add_argument("--gpu-images", type=int, default=3)
    parser.add_argument("--gpu-n", type=int, default=100_000)
    parser.add_argument("--gpu-batch-size", type=int, default=4000)
    parser.add_argument("--tuned-device", default="cuda", help="the tuned part's device (cpu: its rehearsal)")
    parser.add_argument("--tuned-images", type=int, default=16)
    parser.add_argument("--tuned-batch-size", type=int, default=4000)
    parser.add_argument("--compile", default="inductor", help="the tuned part's torch.compile backend")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine(),
    }
    with tempfile.TemporaryDirectory(prefix="tbn-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        if parts & {"cpu", "ray", "ray-steady"}:
            run = make_run(tmp / "run", args.arch)
        if "cpu" in parts:
            report["cpu"] = cpu_part(run, tmp, args)
        if "engine" in parts:
            report["engine"] = engine_part(
                Run(Storage.open(args.run)) if args.run else make_run(tmp / "engine-run", args.arch), tmp, args
            )
        if "ray" in parts:
            report["ray"] = ray_part(run, tmp, args)
        if "ray-steady" in parts:
            report["ray-steady"] = ray_steady_part(run, tmp, args)
        if "gpu" in parts:
            report["gpu"] = gpu_part(tmp, args)
        if "tuned" in parts:
            report["tuned"] = tuned_part(tmp, args)
    report["load_average_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "certify_throughput.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report)
    (args.out / "certify_throughput.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
