"""Sampling-engine rows of bench/certify_throughput.py: fixed n one image at a time, packed,
compiled (GPU) and adaptive, on the same images: seconds and forward passes per image, and
certified accuracy at each report radius beside fixed n's."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from timing import interleaved

from tbn_ray.config import REPORT_RADII, AdaptiveConfig, CertifyConfig
from tbn_ray.jobs.certify import CertifyPlan
from tbn_ray.science.smoothing import certify_examples, summarize
from tbn_ray.science.tbn import set_bn_stats

#: The noise level of every benchmark row (its TBN statistics are calibrated for it).
SIGMA = 0.25


def engine_configs(args: argparse.Namespace, n: int, *, gpu: bool) -> dict[str, dict[str, Any]]:
    """CertifyConfig settings per row; the first row is the baseline of the ratios."""
    pilot = min(AdaptiveConfig().pilot, max(1, n // 10))  # the default pilot, scaled down at small n
    packed = {"images_per_pass": args.images_per_pass}
    rows = {"fixed n, one image at a time": {}, f"fixed n, packed ({args.images_per_pass} images per pass)": packed}
    if gpu:
        rows["fixed n, packed, torch.compile + cuDNN autotuning"] = {
            **packed,
            "compile": "inductor",
            "cudnn_autotune": True,
        }
    rows[f"adaptive (pilot {pilot}), packed"] = {
        **packed,
        "adaptive": True,
        "adaptive_design": "pilot",
        "adaptive_sampling": AdaptiveConfig(pilot=pilot),
    }
    rows["adaptive (sequential), packed"] = {**packed, "adaptive": True, "adaptive_design": "sequential"}
    return rows


def engine_rows(
    plan: CertifyPlan, device: torch.device, args: argparse.Namespace, *, n: int, batch_size: int, gpu: bool = False
) -> list[dict[str, Any]]:
    """Whole-call timings of each engine config on the plan's images (best of ``rounds``,
    interleaved), forward passes per image and certified accuracy at each report radius."""
    net = plan.build_model(device)
    set_bn_stats(net, plan.stats[SIGMA])
    images, labels, indices = plan.test.images, plan.test.labels, plan.indices
    base_cfg = plan.cfg.model_copy(update={"n": n, "batch_size": batch_size})
    configs = engine_configs(args, n, gpu=gpu)

    def call(settings: dict[str, Any]) -> Callable[[int], Any]:
        cfg = CertifyConfig.model_validate({**base_cfg.model_dump(), **settings})

        def go(_: int) -> list[dict[str, Any]]:
            records = certify_examples(net, images, labels, indices, cfg, sigma=SIGMA, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return records

        return go

    print(f"engine ({device.type}): {len(images)} images, n0={plan.cfg.n0}, n={n}, batch {batch_size}", flush=True)
    res = interleaved({name: call(options) for name, options in configs.items()}, 1, args.rounds)
    base = res[next(iter(configs))]
    rows = []
    for name, r in res.items():
        records = r["results"][-1]
        passes = float(np.mean([rec.get("samples", rec["n0"] + rec["n"]) for rec in records]))
        summary = summarize(records, REPORT_RADII)
        rows.append(
            {
                "config": name,
                "seconds_per_image": r["wall_best_s"] / len(images),
                "forward_passes_per_image": passes,
                "speedup_wall": base["wall_best_s"] / r["wall_best_s"],
                "certified_accuracy": summary["certified_accuracy"],
                "acr": summary["acr"],
            }
        )
    fixed = rows[0]["forward_passes_per_image"]
    for row in rows:
        row["passes_ratio"] = fixed / row["forward_passes_per_image"]
        row["gpu_hours_10k_images_per_sigma"] = row["seconds_per_image"] * 10_000 / 3600 if gpu else None
    return rows


def engine_table(rows: list[dict[str, Any]]) -> list[str]:
    radii = list(rows[0]["certified_accuracy"])
    head = (
        "| config | s / image | speed-up | forward passes / image | fewer passes | "
        + " | ".join(f"r={r}" for r in radii)
        + " | ACR |"
    )
    lines = [head, "|---" * (6 + len(radii)) + "|"]
    for row in rows:
        acc = " | ".join(f"{100 * row['certified_accuracy'][r]:.1f}" for r in radii)
        lines.append(
            f"| {row['config']} | {row['seconds_per_image']:.3f} | {row['speedup_wall']:.2f}x | {row['forward_passes_per_image']:,.0f} "
            f"| {row['passes_ratio']:.2f}x | {acc} | {row['acr']:.3f} |"
        )
    return lines
