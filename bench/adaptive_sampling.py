"""Fixed n = 100,000 vs fewer draws per image, simulated on the vote distribution of a real
certification: forward passes per image, certified accuracy at every report radius, ACR.

Procedures compared, each run as the real code driven by ``smoothing.run_alone``:
``fixed`` (``smoothing.cohen_certify``), ``pilot`` (``adaptive.AdaptiveSampling.procedure``:
n(x) planned from pilot draws), ``sequential`` (``sequential.SequentialSampling.procedure``:
looks at a fixed schedule, an anytime-valid bound; given each image's label, it does not sample
an image further whose selection guess is wrong) and ``sequential-every`` (the same with
``skip_misclassified`` off: every guess bounded, as fixed n does). The votes of each request are
drawn as one multinomial sample of the image's class probabilities.

Each image's class probabilities are drawn, once per repeat, from a Dirichlet posterior
(Jeffreys prior) of its stored vote counts (``radii.parquet``: ``counts``, ``counts_selection``;
e.g. the files ``tbn-ray quickstart`` writes). All procedures see the same selection draws (as
in a real run with the same seed); the other draws are independent. Differences from fixed n
are reported with their Monte-Carlo standard error over the repeats; forward passes with
their spread (standard deviation) over the repeats.

    python bench/adaptive_sampling.py RESULTS/sigma=0.25/radii.parquet RESULTS/sigma=0.5/radii.parquet
    python bench/adaptive_sampling.py cohen:0.25 cohen:0.5 cohen:1.0     # synthetic strong-model populations
    python bench/adaptive_sampling.py cohen:0.5 --procedures sequential --growth 1.4 --final-share 0.6

``cohen:<sigma>`` is a made-up population shaped like a published certified-accuracy curve
(docs/method.md): Cohen et al.'s ResNet-110 at sigma 0.25 (80.4/66.8/50.5/32.7 at r = 0 ... 0.75)
and 0.5 (68.8/58.2/46.2/34.5/24.5 at r = 0 ... 1.0), CAT-RS at sigma 1.0 (43.2/40.2/37.2/
34.3/31.0 at r = 0 ... 1.0, then an invented tail 22/14/8 at r = 1.5/2.0/2.5, the rest up to
the cap 3.81). True radii are uniform within each band, the rest predicted wrong; a harder
case than a small model (many confident images).

Figures go to bench/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from scipy.special import betaincinv, ndtr, ndtri

from tbn_ray.config import REPORT_RADII
from tbn_ray.science.adaptive import AdaptiveSampling
from tbn_ray.science.sequential import SequentialSampling
from tbn_ray.science.smoothing import ABSTAIN, cohen_certify, run_alone

RESULTS = Path(__file__).resolve().parent / "results"
PROCEDURES = ("fixed", "pilot", "sequential", "sequential-every")

#: (band edges in radius, certified accuracy in % at the lower edges) per sigma
COHEN = {
    0.25: ((0.0, 0.25, 0.5, 0.75, 1.0), (80.4, 66.8, 50.5, 32.7)),
    0.5: ((0.0, 0.25, 0.5, 0.75, 1.0, 1.9), (68.8, 58.2, 46.2, 34.5, 24.5)),
    1.0: ((0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.81), (43.2, 40.2, 37.2, 34.3, 31.0, 22.0, 14.0, 8.0)),
}


def cohen_shaped(sigma: float, images: int = 500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two-class vote shares (scaled to 1e9 votes) and labels (0) of a published-curve-shaped population."""
    rng = np.random.default_rng(seed)
    edges, acc = COHEN[sigma]
    bands = -np.diff(np.append(np.array(acc) / 100, 0.0))  # share of images per radius band
    share = np.zeros(images)
    band = rng.choice(len(bands) + 1, images, p=[*bands, 1 - sum(bands)])
    for b in range(len(bands)):
        r = rng.uniform(edges[b], edges[b + 1], (band == b).sum())
        share[band == b] = ndtr(r / sigma)
    wrong = band == len(bands)
    share[wrong] = 1 - rng.uniform(0.5, 0.95, wrong.sum())  # class 1, not the label, has the most votes
    return np.stack([share, 1 - share], 1) * 1e9, np.zeros(images, dtype=int)


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


def simulate(
    probs: np.ndarray,
    labels: np.ndarray,
    sigma: float,
    procedures: dict[str, Any],
    args: argparse.Namespace,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """One repeat over all images: per image and procedure, radius, correct and forward passes."""
    out = {f"{k}_{m}": np.zeros(len(labels)) for k in ("radius", "correct", "passes") for m in procedures}
    for i, p in enumerate(probs):
        selection = rng.multinomial(args.n0, p)
        for mode, make in procedures.items():
            shared = [selection]  # the first request: the shared selection draws (the same seed in a real run)

            def sample(k: int) -> np.ndarray:
                return shared.pop() if shared else rng.multinomial(k, p)

            cert = run_alone(make(sigma, args.n0, args.n, args.alpha, label=int(labels[i])), sample)
            out[f"radius_{mode}"][i] = cert.radius
            out[f"correct_{mode}"][i] = cert.prediction != ABSTAIN and cert.prediction == labels[i]
            out[f"passes_{mode}"][i] = cert.samples
    return out


def oracle_draws(probs: np.ndarray, sigma: float, args: argparse.Namespace) -> np.ndarray:
    """Per image, the estimation draws of an oracle that knows each p_cA: the fewest whose expected
    count clears the report radius that fixed n reaches at its expected count (none when that is
    abstention). A yardstick, not a procedure: no real one can know p_cA."""
    need = ndtr(np.asarray(REPORT_RADII) / sigma)
    sizes = np.unique(np.round(np.geomspace(1, args.n, 1500)).astype(np.int64))
    draws = np.zeros(len(probs))
    for i, p in enumerate(probs.max(axis=1)):
        lower = betaincinv(np.maximum(p * sizes, 1e-300), sizes - p * sizes + 1, args.alpha)
        cleared = int(np.searchsorted(need, lower[-1], side="right"))
        draws[i] = 0 if cleared == 0 else int(sizes[np.argmax(lower >= need[cleared - 1])])
    return draws


def metrics(radius: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    acc = {f"{r:g}": float(np.mean(correct & (radius >= r))) for r in REPORT_RADII}
    return {**{f"acc@{k}": v for k, v in acc.items()}, "acr": float(np.mean(radius * correct))}


def run_sigma(path: str, procedures: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    sigma, votes, labels = load_votes(path)
    rng = np.random.default_rng(args.seed)
    per_repeat: dict[str, list[dict[str, float]]] = {m: [] for m in procedures}
    passes: dict[str, list[float]] = {m: [] for m in procedures}
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        probs = np.array([rng.dirichlet(v + 0.5) for v in votes])
        sim = simulate(probs, labels, sigma, procedures, args, rng)
        for mode in procedures:
            per_repeat[mode].append(metrics(sim[f"radius_{mode}"], sim[f"correct_{mode}"].astype(bool)))
            passes[mode].append(float(sim[f"passes_{mode}"].mean()))
    keys = list(per_repeat["fixed"][0])

    def mean_se(rows: list[dict[str, float]]) -> dict[str, list[float]]:
        return {
            k: [float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows], ddof=1) / np.sqrt(len(rows)))]
            for k in keys
        }

    cap = sigma * float(ndtri(args.alpha ** (1 / args.n)))  # no radius above this is certifiable at n
    below_cap = [f"acc@{r:g}" for r in REPORT_RADII if r < cap]
    result: dict[str, Any] = {"source": path, "sigma": sigma, "images": len(labels), "cap": cap, "modes": {}}
    for mode in procedures:
        diff = [{k: a[k] - f[k] for k in keys} for a, f in zip(per_repeat[mode], per_repeat["fixed"])]
        d = mean_se(diff)
        result["modes"][mode] = {
            "metrics": mean_se(per_repeat[mode]),
            "difference": d,
            "passes_per_image": [float(np.mean(passes[mode])), float(np.std(passes[mode], ddof=1))],
            "passes_ratio": float(np.mean(passes["fixed"]) / np.mean(passes[mode])),
            "max_accuracy_loss": float(
                max(-d[k][0] for k in below_cap)
            ),  # points lost at the worst report radius below the cap
        }
    shares = votes / votes.sum(axis=1, keepdims=True)
    draws = oracle_draws(shares, sigma, args)
    right = draws * (shares.argmax(axis=1) == labels)  # an oracle that also leaves the wrong top classes unsampled
    fixed = float(np.mean(passes["fixed"]))
    oracle = args.n0 + float(draws.mean())
    result["oracle"] = {
        "passes_per_image": oracle,
        "passes_ratio": fixed / oracle,
        "doubled_passes_ratio": fixed / (args.n0 + 2 * float(draws.mean())),  # a 2x safety margin
        "doubled_right_passes_ratio": fixed / (args.n0 + 2 * float(right.mean())),
    }
    result["seconds"] = time.perf_counter() - t0
    return result


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Fewer draws vs fixed n (simulation)",
        "",
        f"{report['date']}; `{report['command']}`",
        "",
        f"Settings: pilot {report['pilot']}; sequential {report['sequential']}; n0={report['n0']}, n={report['n']}, "
        f"alpha={report['alpha']}, {report['repeats']} repeats. Certified accuracy in %; differences from fixed n with "
        "their Monte-Carlo standard error; forward passes per image with their standard deviation over the repeats.",
        "Per repeat, each image's class probabilities are drawn from Dirichlet(stored votes + 0.5). "
        "'max loss' is the largest drop in certified accuracy at a report radius below the cap sigma * Phi^-1(alpha^(1/n)).",
        *([f"Source: {report['note']}"] if report.get("note") else []),
        "",
        "'oracle' knows each image's p_cA and takes the fewest draws that reach fixed n's report radius at the expected count "
        "(a yardstick no procedure can reach); 'oracle x2' gives it twice those draws, the margin a real procedure "
        "needs to learn p_cA while it samples (how hard a population is: populations with more images near a "
        "report radius need more draws under every procedure). Both bound every image's top class, right or wrong: "
        "compare them with 'sequential-every'; 'sequential' does not sample an image further whose guess is not its label: "
        "compare it with 'oracle x2, right top classes only', which leaves every image whose top class is wrong unsampled.",
        "",
        "| population | sigma | procedure | passes ratio | max loss (points) | ACR change |",
        "|---|---|---|---|---|---|",
    ]
    for s in report["sigmas"]:
        for mode, m in s["modes"].items():
            if mode != "fixed":
                lines.append(
                    f"| `{s['source']}` | {s['sigma']} | {mode} | {m['passes_ratio']:.2f}x | {100 * m['max_accuracy_loss']:.2f} | "
                    f"{m['difference']['acr'][0]:+.4f} ({100 * m['difference']['acr'][0] / s['modes']['fixed']['metrics']['acr'][0]:+.1f}%) |"
                )
        lines.append(f"| `{s['source']}` | {s['sigma']} | oracle | {s['oracle']['passes_ratio']:.2f}x | | |")
        lines.append(f"| `{s['source']}` | {s['sigma']} | oracle x2 | {s['oracle']['doubled_passes_ratio']:.2f}x | | |")
        lines.append(
            f"| `{s['source']}` | {s['sigma']} | oracle x2, right top classes only | {s['oracle']['doubled_right_passes_ratio']:.2f}x | | |"
        )
    lines.append("")
    for s in report["sigmas"]:
        keys = [k for k in s["modes"]["fixed"]["metrics"] if k == "acr" or float(k[4:]) < s["cap"] + 0.25]
        lines += [
            f"## sigma = {s['sigma']} ({s['images']} images, from `{s['source']}`; cap {s['cap']:.2f})",
            "",
            "| | forward passes / image | " + " | ".join(k.replace("acc@", "r=") for k in keys) + " |",
            "|---" * (len(keys) + 2) + "|",
        ]
        for mode, m in s["modes"].items():
            cells = [f"{100 * m['metrics'][k][0]:.2f}" if k != "acr" else f"{m['metrics'][k][0]:.4f}" for k in keys]
            lines.append(
                f"| {mode} | {m['passes_per_image'][0]:,.0f} ± {m['passes_per_image'][1]:,.0f} | "
                + " | ".join(cells)
                + " |"
            )
        for mode, m in s["modes"].items():
            if mode == "fixed":
                continue
            diff = [
                f"{100 * m['difference'][k][0]:+.2f} ± {100 * m['difference'][k][1]:.2f}"
                if k != "acr"
                else f"{m['difference'][k][0]:+.4f} ± {m['difference'][k][1]:.4f}"
                for k in keys
            ]
            lines.append(f"| {mode} - fixed | {m['passes_ratio']:.2f}x fewer | " + " | ".join(diff) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "radii", nargs="+", help="radii.parquet files of a real certification (one per sigma), or cohen:<sigma>"
    )
    parser.add_argument(
        "--procedures",
        type=lambda v: tuple(x for x in v.split(",") if x),
        default=PROCEDURES[1:],
        help=f"comma-separated, compared with fixed n: any of {', '.join(PROCEDURES[1:])}",
    )
    pilot, seq = AdaptiveSampling(), SequentialSampling()
    parser.add_argument("--pilot", type=int, default=pilot.pilot)
    parser.add_argument("--tolerance", type=float, default=pilot.tolerance)
    parser.add_argument("--margin", type=float, default=pilot.margin)
    parser.add_argument("--max-loss", type=float, default=pilot.max_loss)
    parser.add_argument(
        "--extra-pilots",
        type=lambda v: tuple(int(x) for x in v.split(",") if x),
        default=pilot.extra_pilots,
        help="comma-separated further pilot stages, e.g. 4000,10000",
    )
    parser.add_argument(
        "--fractions",
        type=lambda v: tuple(float(Fraction(x)) for x in v.split(",") if x),
        default=pilot.fractions,
        help="comma-separated candidate estimation sizes as fractions of n, e.g. 1/64,1/32,...,1",
    )
    parser.add_argument("--first-look", type=int, default=seq.first_look)
    parser.add_argument("--growth", type=float, default=seq.growth)
    parser.add_argument("--final-share", type=float, default=seq.final_share)
    parser.add_argument("--spend", type=float, default=seq.spend)
    parser.add_argument("--stop-alpha", type=float, default=seq.stop_alpha)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="adaptive_sampling")
    parser.add_argument("--note", default="", help="where the vote counts come from, for the report")
    args = parser.parse_args()
    if not set(args.procedures) <= set(PROCEDURES[1:]):
        parser.error(f"--procedures: choose from {', '.join(PROCEDURES[1:])}")
    plan = AdaptiveSampling(
        pilot=args.pilot,
        tolerance=args.tolerance,
        margin=args.margin,
        max_loss=args.max_loss,
        extra_pilots=args.extra_pilots,
        fractions=args.fractions,
    )
    sequential = SequentialSampling(
        first_look=args.first_look,
        growth=args.growth,
        final_share=args.final_share,
        spend=args.spend,
        stop_alpha=args.stop_alpha,
    )
    every = sequential.model_copy(update={"skip_misclassified": False})
    makers = {
        "fixed": lambda *a, label: cohen_certify(*a),
        "pilot": lambda *a, label: plan.procedure(*a),
        "sequential": sequential.procedure,
        "sequential-every": every.procedure,
    }
    procedures = {m: makers[m] for m in ("fixed", *args.procedures)}
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "pilot": {
            "pilot": plan.pilot,
            "extra_pilots": list(plan.extra_pilots),
            "max_loss": plan.max_loss,
            "tolerance": plan.tolerance,
            "margin": plan.margin,
            "fractions": [round(f, 6) for f in plan.fractions],
            "abstain_alpha": plan.abstain_alpha,
        },
        "sequential": {
            **{k: v for k, v in vars(sequential).items() if k != "radii"},
            "looks": len(sequential.looks(args.n)),
        },
        "n0": args.n0,
        "n": args.n,
        "alpha": args.alpha,
        "repeats": args.repeats,
        "note": args.note,
        "sigmas": [run_sigma(path, procedures, args) for path in args.radii],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
