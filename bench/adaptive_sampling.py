"""Fixed n = 100,000 vs input-adaptive sample size, simulated on the vote distribution of a
real certification: forward passes per image, certified accuracy at r = 0 ... 1.0, ACR.

Each image's class probabilities are drawn, once per repeat, from a Dirichlet posterior
(Jeffreys prior) of its stored vote counts (``radii.parquet``: ``counts``, ``counts_selection``;
e.g. the files ``tbn-ray quickstart`` writes). Both procedures then run as the real code --
``smoothing.cohen_certify`` and ``adaptive.AdaptiveSampling.procedure``, driven by
``smoothing.run_alone`` -- with the votes of each request drawn as one multinomial sample.
Both see the same selection draws (as in a real run with the same seed); the estimation
draws are independent. Differences are reported with their Monte-Carlo standard error.

    python bench/adaptive_sampling.py RESULTS/sigma=0.25/radii.parquet RESULTS/sigma=0.5/radii.parquet
    python bench/adaptive_sampling.py ... --pilot 1000 --tolerance 0.02 --margin 0.02 --repeats 100
    python bench/adaptive_sampling.py cohen:0.25 cohen:0.5     # a synthetic strong-model population

``cohen:<sigma>`` is a made-up population shaped like Cohen et al.'s ResNet-110 curve
(science.md: certified accuracy 80.4/66.8/50.5/32.7 at r = 0/0.25/0.5/0.75 for sigma 0.25;
68.8/58.2/46.2/34.5/24.5 at r = 0 ... 1.0 for sigma 0.5): true radii uniform within each
band, the rest predicted wrong; a harder case than a small model (many confident images).

Figures go to bench/results/adaptive_sampling.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from tbn_ray.science.adaptive import AdaptiveSampling
from tbn_ray.science.smoothing import ABSTAIN, cohen_certify, run_alone

RESULTS = Path(__file__).resolve().parent / "results"
RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


COHEN = {0.25: ((0.0, 0.25, 0.5, 0.75, 1.0), (80.4, 66.8, 50.5, 32.7)), 0.5: ((0.0, 0.25, 0.5, 0.75, 1.0, 1.9), (68.8, 58.2, 46.2, 34.5, 24.5))}


def cohen_shaped(sigma: float, images: int = 500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two-class vote shares (scaled to 1e9 votes) and labels (0) of a Cohen-shaped population."""
    rng = np.random.default_rng(seed)
    edges, acc = COHEN[sigma]
    bands = -np.diff(np.append(np.array(acc) / 100, 0.0))  # share of images per radius band
    share = np.zeros(images)
    band = rng.choice(len(bands) + 1, images, p=[*bands, 1 - sum(bands)])
    for b in range(len(bands)):
        r = rng.uniform(edges[b], edges[b + 1], (band == b).sum())
        share[band == b] = norm_cdf(r / sigma)
    wrong = band == len(bands)
    share[wrong] = 1 - rng.uniform(0.5, 0.95, wrong.sum())  # class 1, not the label, has the most votes
    return np.stack([share, 1 - share], 1) * 1e9, np.zeros(images, dtype=int)


def norm_cdf(z: np.ndarray) -> np.ndarray:
    from scipy.special import ndtr

    return ndtr(z)


def load_votes(path: str) -> tuple[float, np.ndarray, np.ndarray]:
    """(sigma, per-image vote counts (images, classes), labels) from a radii.parquet or cohen:<sigma>."""
    if path.startswith("cohen:"):
        sigma = float(path.split(":", 1)[1])
        return (sigma, *cohen_shaped(sigma))
    table = pq.read_table(path)
    params = json.loads(table.schema.metadata[b"tbn_ray.params"])
    rows = table.to_pylist()
    votes = np.array([np.add(r["counts"], r["counts_selection"]) for r in rows], dtype=np.float64)
    return float(params["sigma"]), votes, np.array([r["label"] for r in rows])


def simulate(probs: np.ndarray, labels: np.ndarray, sigma: float, plan: AdaptiveSampling, args: argparse.Namespace,
             rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One repeat over all images: per image and procedure, radius, correct and forward passes."""
    out = {f"{k}_{m}": np.zeros(len(labels)) for k in ("radius", "correct", "passes") for m in ("fixed", "adaptive")}
    for i, p in enumerate(probs):
        selection = rng.multinomial(args.n0, p)
        for mode, procedure in (("fixed", cohen_certify(sigma, args.n0, args.n, args.alpha)),
                                ("adaptive", plan.procedure(sigma, args.n0, args.n, args.alpha))):  # fmt: skip
            shared = [selection]  # the first request: the shared selection draws (the same seed in a real run)

            def sample(k: int) -> np.ndarray:
                return shared.pop() if shared else rng.multinomial(k, p)

            cert = run_alone(procedure, sample)
            out[f"radius_{mode}"][i] = cert.radius
            out[f"correct_{mode}"][i] = cert.prediction != ABSTAIN and cert.prediction == labels[i]
            out[f"passes_{mode}"][i] = cert.samples
    return out


def metrics(radius: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    acc = {f"{r:g}": float(np.mean(correct & (radius >= r))) for r in RADII}
    return {**{f"acc@{k}": v for k, v in acc.items()}, "acr": float(np.mean(radius * correct))}


def run_sigma(path: str, plan: AdaptiveSampling, args: argparse.Namespace) -> dict[str, Any]:
    sigma, votes, labels = load_votes(path)
    rng = np.random.default_rng(args.seed)
    per_repeat: dict[str, list[dict[str, float]]] = {"fixed": [], "adaptive": [], "difference": []}
    passes = {"fixed": [], "adaptive": []}
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        probs = np.array([rng.dirichlet(v + 0.5) for v in votes])
        sim = simulate(probs, labels, sigma, plan, args, rng)
        m = {mode: metrics(sim[f"radius_{mode}"], sim[f"correct_{mode}"].astype(bool)) for mode in ("fixed", "adaptive")}
        per_repeat["fixed"].append(m["fixed"])
        per_repeat["adaptive"].append(m["adaptive"])
        per_repeat["difference"].append({k: m["adaptive"][k] - m["fixed"][k] for k in m["fixed"]})
        for mode in passes:
            passes[mode].append(float(sim[f"passes_{mode}"].mean()))
    keys = list(per_repeat["fixed"][0])

    def mean_se(rows: list[dict[str, float]]) -> dict[str, list[float]]:
        return {k: [float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows], ddof=1) / np.sqrt(len(rows)))] for k in keys}

    return {
        "source": path,
        "sigma": sigma,
        "images": len(labels),
        "fixed": mean_se(per_repeat["fixed"]),
        "adaptive": mean_se(per_repeat["adaptive"]),
        "difference": mean_se(per_repeat["difference"]),
        "passes_per_image": {mode: float(np.mean(v)) for mode, v in passes.items()},
        "passes_ratio": float(np.mean(passes["fixed"]) / np.mean(passes["adaptive"])),
        "seconds": time.perf_counter() - t0,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Adaptive sample size vs fixed n (simulation)", "", f"{report['date']}; `{report['command']}`", "",
             f"Settings: {report['adaptive']}; n0={report['n0']}, n={report['n']}, alpha={report['alpha']}, "
             f"{report['repeats']} repeats. Certified accuracy in %, differences with their Monte-Carlo standard error.",
             "Per repeat, each image's class probabilities are drawn from Dirichlet(stored votes + 0.5).",
             *([f"Source: {report['note']}"] if report.get("note") else []), ""]  # fmt: skip
    for s in report["sigmas"]:
        keys = list(s["fixed"])
        lines += [f"## sigma = {s['sigma']} ({s['images']} images, from `{s['source']}`)", "",
                  "| | forward passes / image | " + " | ".join(k.replace("acc@", "r=") for k in keys) + " |",
                  "|---" * (len(keys) + 2) + "|"]  # fmt: skip
        for mode in ("fixed", "adaptive"):
            cells = [f"{100 * s[mode][k][0]:.2f}" if k != "acr" else f"{s[mode][k][0]:.4f}" for k in keys]
            lines.append(f"| {mode} | {s['passes_per_image'][mode]:,.0f} | " + " | ".join(cells) + " |")
        diff = [f"{100 * s['difference'][k][0]:+.2f} ± {100 * s['difference'][k][1]:.2f}" if k != "acr"
                else f"{s['difference'][k][0]:+.4f} ± {s['difference'][k][1]:.4f}" for k in keys]  # fmt: skip
        lines += [f"| adaptive - fixed | {s['passes_ratio']:.2f}x fewer | " + " | ".join(diff) + " |", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("radii", nargs="+", help="radii.parquet files of a real certification (one per sigma)")
    defaults = AdaptiveSampling()
    parser.add_argument("--pilot", type=int, default=defaults.pilot)
    parser.add_argument("--tolerance", type=float, default=defaults.tolerance)
    parser.add_argument("--margin", type=float, default=defaults.margin)
    parser.add_argument("--max-loss", type=float, default=defaults.max_loss)
    parser.add_argument("--extra-pilots", type=lambda v: tuple(int(x) for x in v.split(",") if x), default=defaults.extra_pilots,
                        help="comma-separated further pilot stages, e.g. 4000,10000")
    parser.add_argument("--fractions", type=lambda v: tuple(float(Fraction(x)) for x in v.split(",") if x), default=defaults.fractions,
                        help="comma-separated candidate estimation sizes as fractions of n, e.g. 1/64,1/32,...,1")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="adaptive_sampling")
    parser.add_argument("--note", default="", help="where the vote counts come from, for the report")
    args = parser.parse_args()
    plan = AdaptiveSampling(pilot=args.pilot, tolerance=args.tolerance, margin=args.margin, max_loss=args.max_loss, extra_pilots=args.extra_pilots,
                            fractions=args.fractions)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "adaptive": {"pilot": plan.pilot, "extra_pilots": list(plan.extra_pilots), "max_loss": plan.max_loss, "tolerance": plan.tolerance,
                     "margin": plan.margin, "fractions": [round(f, 6) for f in plan.fractions], "abstain_alpha": plan.abstain_alpha},  # fmt: skip
        "n0": args.n0, "n": args.n, "alpha": args.alpha, "repeats": args.repeats, "note": args.note,
        "sigmas": [run_sigma(path, plan, args) for path in args.radii],
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
