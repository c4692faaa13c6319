"""Does the packed engine keep forward passes full when procedures ask for many small draws?

Fixed-n CERTIFY asks each image for n0 then n draws; the sequential CERTIFY asks for n0, then
for each look's increment (a few hundred draws at first). With ``images_per_pass`` > 1,
``PackedSampler`` fills every pass from the pending requests of several images and refills a
slot as soon as its image finishes, so passes should stay full and wall time should fall in
proportion to the forward rows. This measures it on CPU with a real small model: forward
passes, rows per pass (fill), wall time, fixed n vs sequential, through ``certify_examples``.

    python bench/sequential_throughput.py                       # untrained tiny model, BN in eval mode
    python bench/sequential_throughput.py --run RUN --sigma 0.25  # a trained run, its TBN statistics at sigma

Figures go to bench/results/sequential_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tbn_ray.config import CertifyConfig, ModelConfig
from tbn_ray.science.models import build_model
from tbn_ray.science.smoothing import certify_examples, summarize

RESULTS = Path(__file__).resolve().parent / "results"
PARTIAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-partial" / "cifar10_test_prefix.npz"


class Counted(nn.Module):
    """The base classifier, counting forward passes and their rows."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.passes, self.rows = model, 0, 0

    def forward(self, x: Tensor) -> Tensor:
        self.passes += 1
        self.rows += len(x)
        return self.model(x)


def load_model(args: argparse.Namespace) -> tuple[nn.Module, str]:
    if args.run is None:
        torch.manual_seed(0)
        return build_model(ModelConfig(arch="tiny")).eval(), "tiny (untrained, seed 0), BN in eval mode"
    from tbn_ray.science.tbn import bn_key, set_bn_stats
    from tbn_ray.store.runs import Run

    run = Run.open(args.run)
    model, _ = run.load_model("cpu")
    set_bn_stats(model, run.bn_stats(bn_key(args.sigma), model))
    return model, f"trained run {args.run}, TBN statistics at sigma={args.sigma}"


def measure(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, mode: str, per_pass: int, args: argparse.Namespace
) -> dict[str, Any]:
    counted = Counted(model)
    start, cpu = time.perf_counter(), time.process_time()
    cfg = CertifyConfig(
        sigmas=(args.sigma,),
        n0=args.n0,
        n=args.n,
        alpha=args.alpha,
        batch_size=args.batch_size,
        seed=0,
        images_per_pass=per_pass,
        sample_size="sequential" if mode == "sequential" else "fixed",
    )
    records = certify_examples(counted, images, labels, range(len(images)), cfg, sigma=args.sigma, device="cpu")
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    s = summarize(records)
    return {
        "mode": mode,
        "images_per_pass": per_pass,
        "passes": counted.passes,
        "rows": counted.rows,
        "rows_per_pass": counted.rows / counted.passes,
        "fill": counted.rows / (counted.passes * args.batch_size),
        "wall_s": wall,
        "cpu_s": cpu,
        "rows_per_s": counted.rows / wall,
        "certified_accuracy@0": s["certified_accuracy"]["0.0"],
        "acr": s["acr"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="a trained run directory (default: an untrained tiny model)")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--images-per-pass", type=lambda v: [int(x) for x in v.split(",")], default=[1, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="sequential_throughput")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with np.load(PARTIAL) as d:
        images, labels = d["images"][: args.images].copy(), d["labels"][: args.images].astype(np.int64)
    load = os.getloadavg()[0]
    model, described = load_model(args)
    with torch.inference_mode():  # warm-up: the first pass pays one-time allocation costs
        model(torch.rand(args.batch_size, 3, 32, 32))
    rows = [
        measure(model, images, labels, mode, p, args) for p in args.images_per_pass for mode in ("fixed", "sequential")
    ]
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "model": described,
        "sigma": args.sigma,
        "images": len(images),
        "n0": args.n0,
        "n": args.n,
        "alpha": args.alpha,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "load": load,
        "sequential": CertifyConfig().sequential.model_dump(),
        "rows": rows,
    }
    lines = [
        "# Sequential CERTIFY throughput (CPU)",
        "",
        f"{report['date']}; `{report['command']}`",
        "",
        f"{described}; {len(images)} CIFAR-10 test images, sigma={args.sigma}, n0={args.n0}, n={args.n}, alpha={args.alpha}, "
        f"batch {args.batch_size}, {args.threads} torch thread(s). 'fill' = rows per pass / batch size; 'cpu s' = this "
        f"process's CPU time (robust to other processes on a shared machine; wall time is not); 1-minute load average "
        f"{report['load']:.1f} at start. Ratios are fixed / sequential at the same images per pass.",
        "",
        "| images/pass | procedure | forward passes | rows | rows/pass | fill | wall s | cpu s | passes ratio | rows ratio | wall ratio | cpu ratio | cert. acc r=0 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fixed = next(f for f in rows if f["mode"] == "fixed" and f["images_per_pass"] == r["images_per_pass"])
        lines.append(
            f"| {r['images_per_pass']} | {r['mode']} | {r['passes']:,} | {r['rows']:,} | {r['rows_per_pass']:.0f} | {r['fill']:.3f} | "
            f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} | {fixed['passes'] / r['passes']:.2f}x | {fixed['rows'] / r['rows']:.2f}x | "
            f"{fixed['wall_s'] / r['wall_s']:.2f}x | {fixed['cpu_s'] / r['cpu_s']:.2f}x | "
            f"{100 * r['certified_accuracy@0']:.1f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = "\n".join(lines) + "\n"
    (args.out / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
