"""Adversarial-training throughput: Ray Train (1 and 2 DDP workers) against the same loop in-process.

Run by hand from the repository root (needs the exact CIFAR-10 subset in shared/data):

    python bench/train_throughput.py                       # CPU: in-process, Ray 1 worker, Ray 2 workers
    python bench/train_throughput.py --images 2048 --epochs 3 --repeats 5

All measurements are taken in one run, in interleaved rounds (medians reported), with the
same data, model, PGD attack and GLOBAL batch size (each of W workers trains on batch/W
images per step), and ONE torch thread per process (CPU): on a shared machine, intra-op
threads collapse under load from other jobs (measured here: 2 threads 5-10x slower than 1),
which would measure the neighbours rather than Ray. Figures:

* images/s of PGD adversarial training (train time only, the last epoch: the first warms up);
  for Ray the slowest worker's train time over all workers' images;
* per-epoch Ray overhead: 1 - (Ray 1 worker images/s) / (in-process images/s);
* fixed Ray cost: wall time of trainer.fit() minus the time spent in epochs (train + held-out
  evaluation): worker start, process group, data loading, checkpoint uploads.

With a GPU (torch.cuda.is_available()) the same comparison runs on cuda with one GPU per
worker, for 1 and (given 2 GPUs) 2 workers; otherwise that part is recorded as skipped.
Writes bench/results/train_throughput-<cpu|cuda>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tbn_ray.config import TrainConfig
from tbn_ray.science import data as data_mod
from tbn_ray.science.models import build_model
from tbn_ray.science.training import epoch_seed, make_loader, make_optimizer, make_scheduler, train_epoch
from tbn_ray.store.cifar10 import load_from_config

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def config(args: argparse.Namespace, name: str, device: str) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "name": name,
            "device": device,
            "data": {"source": "partial", "shared_dir": str(SHARED), "train_limit": args.images},
            "model": {"arch": args.arch},
            "attack": {"norm": "l2", "eps": 0.5, "steps": args.pgd_steps},
            "optim": {"epochs": args.epochs, "batch_size": args.batch},
            # evaluation is not what is measured: keep it small
            "eval": {"images": 100, "attack": {"norm": "l2", "eps": 0.5, "steps": 2}},
        }
    )


def in_process(cfg: TrainConfig, device: torch.device, threads: int) -> dict[str, Any]:
    """training.train_epoch directly, as ``fit`` drives it: the reference for the Ray overhead."""
    torch.set_num_threads(threads)
    d = load_from_config(cfg.data)
    x, y = data_mod.as_tensors(d.train)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, len(x) // cfg.optim.batch_size)
    epochs = []
    for epoch in range(cfg.optim.epochs):
        loader = make_loader(x, y, cfg.optim.batch_size, seed=epoch_seed(cfg.seed, epoch, 0))
        generator = torch.Generator(device=device).manual_seed(epoch_seed(cfg.seed, epoch, 1))
        m = train_epoch(model, loader, optimizer, scheduler, cfg, device, generator=generator)
        epochs.append({"images": m["images"], "seconds": m["seconds"], "images_per_s": m["images_per_s"]})
    return {
        "mode": "in-process",
        "workers": 1,
        "threads": threads,
        "device": str(device),
        "epochs": epochs,
        "images_per_s": epochs[-1]["images_per_s"],
    }


def on_ray(cfg: TrainConfig, cluster: Any, workers: int, cpus: float, gpus: int, root: Path) -> dict[str, Any]:
    from tbn_ray.distributed.train import Recovery, Scaling, train_on_ray
    from tbn_ray.store.storage import Storage

    t0 = time.perf_counter()
    ckpt = train_on_ray(
        cfg,
        Storage.open(root),
        Scaling(workers=workers, cpus_per_worker=cpus, gpus_per_worker=gpus),
        cluster,
        recovery=Recovery(keep=1, max_failures=0),
        fresh=True,
        say=lambda _: None,
    )
    wall = time.perf_counter() - t0
    history = ckpt.meta["history"]
    in_epochs = sum(h["seconds"] + h["eval_seconds"] for h in history)
    return {
        "mode": "ray",
        "workers": workers,
        "cpus_per_worker": cpus,
        "gpus_per_worker": gpus,
        "epochs": [
            {"images": h["images"], "seconds": h["seconds"], "images_per_s": h["images_per_s"]} for h in history
        ],
        "images_per_s": history[-1]["images_per_s"],
        "fit_wall_s": wall,
        "fixed_cost_s": wall - in_epochs,
    }


def compare(args: argparse.Namespace, device: str, cluster: Any, root: Path) -> dict[str, Any]:
    """Every setup once per round, rounds interleaved, so load from other jobs hits all alike; medians reported."""
    gpu = device == "cuda"
    available = torch.cuda.device_count() if gpu else (os.cpu_count() or 1)
    counts = [w for w in args.workers if w <= available]
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.repeats):
        runs.setdefault("in-process", []).append(
            in_process(config(args, "bench-inproc", device), torch.device(device), threads=1)
        )
        for w in counts:
            cfg = config(args, f"bench-ray{w}", device)
            runs.setdefault(f"ray-{w}", []).append(on_ray(cfg, cluster, w, 1.0, int(gpu), root))
    rows = []
    for measured in runs.values():
        row = dict(measured[0])
        for figure in ("images_per_s", "fit_wall_s", "fixed_cost_s"):
            if figure in row:
                row[figure] = statistics.median(m[figure] for m in measured)
                row[f"{figure}_all"] = [round(m[figure], 2) for m in measured]
        row.pop("epochs")
        rows.append(row)
    ref = rows[0]["images_per_s"]
    for row in rows:
        row["speedup_vs_in_process"] = row["images_per_s"] / ref
    one = next((r for r in rows if r["mode"] == "ray" and r["workers"] == 1), None)
    return {
        "device": device,
        "rows": rows,
        "ray_per_epoch_overhead": None if one is None else 1 - one["images_per_s"] / ref,
    }


def markdown(result: dict[str, Any]) -> str:
    s = result["setup"]
    lines = [
        f"# Adversarial-training throughput ({result['device']})",
        "",
        f"`{s['command']}`",
        "",
        f"{s['model']} model, l2 PGD-{s['pgd_steps']} training, global batch {s['batch']}, {s['images']} images "
        f"({s['data']}), {s['epochs']} epochs (figures from the last), {s['repeats']} rounds; {s['machine']}; torch {s['torch']}, ray {s['ray']}; "
        f"load average before/after {s['load_before']} / {s['load_after']} (other jobs share the machine: compare within one run).",
        "",
        "Medians of the interleaved rounds (every round's value in brackets); one torch thread per process.",
        "",
        "| run | workers | images/s | vs in-process | fit() wall s | fixed Ray cost s |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        extra = (
            f"{r['fit_wall_s']:.1f} {r['fit_wall_s_all']} | {r['fixed_cost_s']:.1f} {r['fixed_cost_s_all']}"
            if r["mode"] == "ray"
            else "- | -"
        )
        lines.append(
            f"| {r['mode']} | {r['workers']} | {r['images_per_s']:.1f} {r['images_per_s_all']} | "
            f"{r['speedup_vs_in_process']:.2f}x | {extra} |"
        )
    if result["ray_per_epoch_overhead"] is not None:
        lines += [
            "",
            f"Ray Train per-epoch overhead (1 worker, same threads): {100 * result['ray_per_epoch_overhead']:.1f}%",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1024, help="training images (exact subset)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=128, help="global batch size")
    p.add_argument("--pgd-steps", type=int, default=7)
    p.add_argument("--arch", default="tiny")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians reported")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    if not (SHARED / "cifar10-partial").is_dir():
        raise SystemExit(f"the exact CIFAR-10 subset is needed: not found at {SHARED / 'cifar10-partial'}")

    import ray

    from tbn_ray.distributed.runtime import connect, disconnect

    load_before = os.getloadavg()
    cluster = connect(num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count())
    root = Path(tempfile.mkdtemp(prefix="tbn-bench-"))
    setup = {
        "command": "python bench/train_throughput.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k != "out"
        ),
        "model": args.arch,
        "pgd_steps": args.pgd_steps,
        "batch": args.batch,
        "images": args.images,
        "epochs": args.epochs,
        "repeats": args.repeats,
        "data": "CIFAR-10 byte-exact subset",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.cuda.device_count()} GPUs",
        "torch": torch.__version__,
        "ray": ray.__version__,
        "load_before": [round(v, 1) for v in load_before],
    }
    try:
        results = [compare(args, "cpu", cluster, root)]
        if torch.cuda.is_available():
            results.append(compare(args, "cuda", cluster, root))
        else:
            print("GPU part skipped: torch.cuda.is_available() is False")
    finally:
        disconnect(cluster)
        shutil.rmtree(root, ignore_errors=True)
    setup["load_after"] = [round(v, 1) for v in os.getloadavg()]
    args.out.mkdir(parents=True, exist_ok=True)
    for result in results:
        result["setup"] = setup
        stem = args.out / f"train_throughput-{result['device']}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(result))
        print(markdown(result))


if __name__ == "__main__":
    main()
