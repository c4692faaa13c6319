"""Certified-accuracy report: a Markdown table, a curve per sigma and Cohen et al.'s numbers.

Every row names what produced it (model, data, BN statistics, n0, n, alpha, images).
The best-sigma-per-radius envelope is drawn and labelled as what it is: sigma chosen
after the fact for each radius, not the accuracy of any single smoothed classifier
(docs/method.md, rule 4). Cohen et al.'s published rows are a different model
on all 10,000 test images, shown as a reference point only.

Each row also states its radius cap: with n samples at level alpha no radius above
sigma * Phi^-1(alpha^(1/n)) can be certified (about 2.7 sigma at n=2,000, alpha=0.001), so
a zero beyond it says "not certifiable at this n", not "the model fails there".
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from matplotlib.figure import Figure

from tbn_ray.errors import TbnError, log
from tbn_ray.reports.evaluation import EVALUATE_DIR, evaluation_section
from tbn_ray.science.tbn import bn_key
from tbn_ray.store.results import as_storage
from tbn_ray.store.storage import Storage

ENVELOPE_LABEL = "envelope: best sigma per radius (not a single classifier)"

#: Cohen et al. 2019, CIFAR-10, ResNet-110 trained with Gaussian augmentation (their Table 1 and Appendix).
COHEN_PUBLISHED: tuple[dict[str, Any], ...] = tuple(
    {
        "label": f"Cohen et al. 2019, published (sigma={sigma}; ResNet-110, Gaussian aug.: a different model)",
        "sigma": sigma,
        "bn": "-",
        "model": "ResNet-110, Gaussian augmentation (Cohen et al. 2019)",
        "data_source": "CIFAR-10 test, official",
        "n0": 100,
        "n": 100_000,
        "alpha": 0.001,
        "images": 10_000,
        "certified_accuracy": accuracy,
        "acr": acr,
    }
    for sigma, accuracy, acr in (
        (0.25, {"0.0": 0.804, "0.25": 0.668, "0.5": 0.505, "0.75": 0.327}, 0.487),
        (0.5, {"0.0": 0.688, "0.25": 0.582, "0.5": 0.462, "0.75": 0.345, "1.0": 0.245}, 0.571),
    )
)

#: Marks a cell whose radius lies above the row's radius cap.
ABOVE_CAP = "†"


def radius_cap(sigma: float, n: int, alpha: float) -> float:
    """The largest radius CERTIFY can return with ``n`` samples at ``alpha``: even n votes out of n
    give only pA_lower = alpha^(1/n) (Clopper-Pearson), hence radius sigma * Phi^-1(alpha^(1/n))."""
    return max(0.0, float(sigma) * NormalDist().inv_cdf(float(alpha) ** (1 / int(n))))


def cap_note(sigma: float, n: int, alpha: float) -> str:
    """The cap in words, for logs and reports."""
    cap = radius_cap(sigma, n, alpha)
    if cap == 0:
        return f"sigma={sigma:g}: no radius is certifiable with n={n} samples at alpha={alpha:g} (even n votes of n bound pA below 1/2): raise n"
    return f"sigma={sigma:g}: no radius above {cap:.2f} ({cap / sigma:.2f} sigma) is certifiable with n={n} samples at alpha={alpha:g}"


#: What every row shows besides sigma.
SETUP_KEYS = ("model", "data_source", "bn", "n0", "n", "alpha")
#: Rows share an envelope only if these params agree (and the BN mode and image count):
#: the same trained model, checkpoint, test images and sampling, differing only in sigma.
SAME_SETUP = ("model", "run", "epoch", "data_source", "data", "n0", "n", "alpha", "seed", "skip", "start")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _radius(key: Any) -> bool:
    try:
        float(key)
    except ValueError:
        return False
    return True


def _is_summary(summary: Any) -> bool:
    """Whether a parsed summary.json holds every field the report reads, with the right types."""
    if not isinstance(summary, dict) or not isinstance(summary.get("params"), dict):
        return False
    accuracy = summary.get("certified_accuracy")
    return (
        isinstance(accuracy, dict)
        and all(_radius(r) and _number(a) for r, a in accuracy.items())
        and all(_number(summary.get(k)) for k in ("images", "acr", "abstain_rate"))
        and _number(summary["params"].get("sigma"))
    )


def load_summaries(results: Storage | str | Path) -> list[dict[str, Any]]:
    """Every summary.json below ``results`` (e.g. ``<dir>/sigma=0.25/summary.json``), local or S3."""
    store = as_storage(results)
    keys = [k for k in store.list() if k.rpartition("/")[2] == "summary.json"]
    if not keys:
        raise TbnError(f"no summary.json found below {store.uri}; run certification first")
    summaries = []
    for key in keys:
        summary = store.read_json(key)
        if not _is_summary(summary):
            raise TbnError(
                f"{store.object_uri(key)} is not a certification summary (from tbn_ray.store.results.write_results)"
            )
        summaries.append({**summary, "location": store.object_uri(key)})
    return summaries


def _bn_mode(params: dict[str, Any]) -> str:
    """'tbn' for statistics calibrated at the row's own sigma (named per sigma), else the set's name."""
    bn = str(params.get("bn", "?"))
    return "tbn" if bn in ("tbn", bn_key(params["sigma"])) else bn


def _row(summary: dict[str, Any]) -> dict[str, Any]:
    params = summary["params"]
    row = {key: params.get(key, "?") for key in SETUP_KEYS}
    row["data_source"] = params.get("data", row["data_source"])  # the description, when the run gave one
    mode = _bn_mode(params)
    row["bn"] = mode if mode == row["bn"] else f"{mode} ({row['bn']})"
    return {
        "sigma": params["sigma"],
        **row,
        "radius_cap": _cap_of(params),
        "images": summary["images"],
        "certified_accuracy": summary["certified_accuracy"],
        "acr": summary["acr"],
        "abstain_rate": summary["abstain_rate"],
        **(
            {"misclassified_unsampled": summary["misclassified_unsampled"]}
            if "misclassified_unsampled" in summary
            else {}
        ),
        "bn_mode": mode,
        "setup": json.dumps([mode, summary["images"], *(params.get(k) for k in SAME_SETUP)], default=str),
    }


def _cap_of(params: dict[str, Any]) -> float | None:
    try:
        return radius_cap(params["sigma"], params["n"], params["alpha"])
    except (KeyError, TypeError, ValueError):  # a summary without n or alpha: no cap to state
        return None


def _envelopes(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setup with two or more sigmas: the best certified accuracy at each radius, and its sigma."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["setup"], []).append(row)
    envelopes = []
    for members in groups.values():
        if len({m["sigma"] for m in members}) < 2:
            continue
        best: dict[str, float] = {}
        best_sigma: dict[str, float] = {}
        for m in members:
            for r, acc in m["certified_accuracy"].items():
                if r not in best or acc > best[r]:
                    best[r], best_sigma[r] = acc, m["sigma"]
        setup = {**{k: members[0][k] for k in (*SETUP_KEYS, "images")}, "bn": members[0]["bn_mode"]}
        envelopes.append({"label": ENVELOPE_LABEL, **setup, "certified_accuracy": best, "best_sigma": best_sigma})
    return envelopes


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _cells(row: dict[str, Any], radii: list[str]) -> list[str]:
    """Certified accuracy per radius, marked where the radius is above the row's cap."""
    cap = row.get("radius_cap")
    return [
        _percent(row["certified_accuracy"].get(r))
        + (ABOVE_CAP if cap is not None and r in row["certified_accuracy"] and float(r) > cap else "")
        for r in radii
    ]


def _cap_cell(row: dict[str, Any]) -> str:
    return "-" if row.get("radius_cap") is None else f"{row['radius_cap']:.2f}"


def accuracy_table(summaries: Sequence[dict[str, Any]]) -> str:
    """Certified accuracy (%) per sigma as a plain-text table, for the terminal."""
    rows = sorted((_row(s) for s in summaries), key=lambda r: (r["bn"], r["sigma"]))
    radii = sorted({r for row in rows for r in row["certified_accuracy"]}, key=float)
    head = ["sigma", "BN", "images", *(f"r={r}" for r in radii), "ACR", "max r"]
    body = [
        [f"{row['sigma']:g}", row["bn"], str(row["images"]), *_cells(row, radii), f"{row['acr']:.3f}", _cap_cell(row)]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in (head, *body)]
    return "\n".join(
        [
            "certified accuracy (%) at l2 radius r:",
            *lines,
            f"{ABOVE_CAP}: above max r, not certifiable with this n and alpha",
        ]
    )


def _markdown(title: str, radii: list[str], rows, envelopes, reference) -> str:
    head = ["", "sigma", "model", "data source", "BN mode", "n0", "n", "alpha", "images", "max r"]
    head += [f"r={r}" for r in radii] + ["ACR", "abstain %"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def line(label: str, row: dict[str, Any], cells: list[str], acr: str, abstain: str) -> str:
        setup = [str(row.get(k, "-")) for k in ("sigma", "model", "data_source", "bn", "n0", "n", "alpha", "images")]
        return "| " + " | ".join([label, *setup, _cap_cell(row), *cells, acr, abstain]) + " |"

    for row in rows:
        lines.append(line("measured", row, _cells(row, radii), f"{row['acr']:.3f}", _percent(row["abstain_rate"])))
    for env in envelopes:
        cells = [
            f"{_percent(env['certified_accuracy'][r])} (sigma={env['best_sigma'][r]})"
            if r in env["certified_accuracy"]
            else "-"
            for r in radii
        ]
        lines.append(line(f"**{ENVELOPE_LABEL}**", {**env, "sigma": "best per radius"}, cells, "-", "-"))
    for ref in reference:
        lines.append(line(f"*{ref['label']}*", ref, _cells(ref, radii), f"{ref['acr']:.3f}", "-"))
    lines += [
        "",
        "Certified accuracy (%) at l2 radius r: the fraction of images whose smoothed prediction is "
        "correct AND certified with radius >= r (Cohen et al. 2019, CERTIFY). ACR: mean of radius x correct.",
        "",
        f"max r: the largest radius certifiable with the row's n and alpha, sigma x Phi^-1(alpha^(1/n)) "
        f"(all n votes for one class give pA_lower = alpha^(1/n)). {ABOVE_CAP} marks radii above it: there certified "
        "accuracy is 0 whatever the model; more samples (n) raise the cap. On the plot, the dotted vertical lines.",
        "",
        *[
            line
            for row in rows
            if row.get("misclassified_unsampled")
            for line in (
                f"sigma={row['sigma']}: {_percent(row['misclassified_unsampled'])}% of the images were not sampled past the "
                "selection draws, whose guess was not their label (sequential design, skip_misclassified): they count in no "
                "certified accuracy and no ACR whatever is drawn; abstain % leaves them out.",
                "",
            )
        ],
        "The envelope row picks, at each radius, the sigma with the highest certified accuracy after the fact; "
        "it is not the accuracy of any single smoothed classifier.",
        "",
        "Rows marked *published* are Cohen et al.'s numbers as printed in their paper (ResNet-110 trained "
        "with Gaussian augmentation, all 10,000 test images, n=100,000, alpha=0.001): a different model, "
        "shown for reference, not reproduced here. '-' means not reported.",
        "",
        "![certified accuracy vs radius](certified_accuracy.png)",
        "",
        "The plot draws each curve as a staircase through the tabulated radii: between two radii it shows "
        "the value at the larger one, a lower bound of the true curve.",
        "",
    ]
    return "\n".join(lines)


def _plot(title: str, radii: list[str], rows, envelopes, reference) -> Figure:
    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.add_subplot()

    def curve(acc: dict[str, float], **style: Any) -> Any:
        points = [(float(r), 100 * acc[r]) for r in radii if r in acc]
        # steps-pre: between two tabulated radii the value of the larger one, a lower bound of the true curve
        return ax.plot(*zip(*points), drawstyle="steps-pre", marker="o", markersize=3, **style)[0]

    def exact(row: dict[str, Any], **style: Any) -> Any:
        """Certified accuracy at every radius from the per-image radii (Cohen et al.'s analysis):
        it falls where images stop being certified, not only at the tabulated radii."""
        r = np.asarray(row["radii_correct"], dtype=np.float64)
        grid = np.linspace(0.0, float(radii[-1]), 451)
        acc = 100 * (r[None, :] >= grid[:, None]).sum(axis=1) / row["images"]
        drawn = ax.plot(grid, acc, **style)[0]
        table = [(float(k), 100 * row["certified_accuracy"][k]) for k in radii if k in row["certified_accuracy"]]
        ax.plot(*zip(*table), linestyle="none", marker="o", markersize=3, color=drawn.get_color())
        return drawn

    for row in rows:
        label = f"sigma={row['sigma']} ({row['bn']}, {row['model']})"
        drawn = (
            exact(row, label=label)
            if row.get("radii_correct") is not None
            else curve(row["certified_accuracy"], label=label)
        )
        cap = row.get("radius_cap")
        if cap is not None and cap <= float(radii[-1]):
            ax.axvline(
                cap,
                color=drawn.get_color(),
                linestyle=":",
                linewidth=1,
                label=f"max certifiable r at sigma={row['sigma']}, n={row['n']}",
            )
    for env in envelopes:
        label = f"{ENVELOPE_LABEL} [{env['bn']}, {env['model']}]"
        curve(env["certified_accuracy"], color="black", linestyle=":", linewidth=2.5, label=label)
    for ref, linestyle in zip(reference, ("--", "-.")):
        curve(ref["certified_accuracy"], color="grey", linestyle=linestyle, label=ref["label"])
    ax.set(xlabel="l2 radius", ylabel="certified accuracy (%)", ylim=(0, 100))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    return fig


def _plot_title(title: str, summaries: Sequence[dict[str, Any]]) -> str:
    """The title with each run's location shortened to the run's name: a plot is no place for a path."""
    for run in sorted({str(s["params"].get("run", "")) for s in summaries}, key=len, reverse=True):
        name = run.rstrip("/").rpartition("/")[2]
        if run and name:
            title = title.replace(run, name)
    return title


def write_report(
    summaries: Sequence[dict[str, Any]],
    out: Storage | str | Path,
    title: str = "Certified accuracy (randomized smoothing, l2)",
    extra: str | None = None,
) -> dict[str, str]:
    """report.md, certified_accuracy.png and report.json (the numbers behind both); their URIs by name.

    ``extra``: markdown appended to report.md (the run's ``tbn-ray evaluate`` results)."""
    if not summaries:
        raise TbnError("no certification summaries to report; run certification first")
    rows = sorted((_row(s) for s in summaries), key=lambda r: (*(str(r[k]) for k in SETUP_KEYS), r["sigma"]))
    envelopes = _envelopes(rows)
    curves = [
        _radii_correct(s)
        for s in sorted(summaries, key=lambda s: (*(str(_row(s)[k]) for k in SETUP_KEYS), s["params"]["sigma"]))
    ]
    reference = [{**ref, "radius_cap": _cap_of(ref)} for ref in COHEN_PUBLISHED]
    radii = sorted({r for row in (*rows, *reference) for r in row["certified_accuracy"]}, key=float)
    store = as_storage(out)
    report = {"title": title, "rows": rows, "envelopes": envelopes, "reference": reference}
    plotted = [{**row, "radii_correct": c} for row, c in zip(rows, curves)]
    with store.writer("certified_accuracy.png") as f:
        _plot(_plot_title(title, summaries), radii, plotted, envelopes, reference).savefig(f, format="png")
    return {
        "report.md": store.write_text(
            "report.md", _markdown(title, radii, rows, envelopes, reference) + (f"\n{extra}" if extra else "")
        ),
        "certified_accuracy.png": store.object_uri("certified_accuracy.png"),
        "report.json": store.write_text("report.json", json.dumps(report, indent=2) + "\n"),
    }


def _radii_correct(summary: dict[str, Any]) -> list[float] | None:
    """The radius of every correctly certified image, from the radii.parquet beside the summary
    (``location``); None where it cannot be read, and the curve then steps between report radii."""
    where = summary.get("location")
    if not where:
        return None
    try:
        store = Storage.open(where.rpartition("/")[0])
        table = pq.read_table(io.BytesIO(store.read_bytes("radii.parquet")), columns=["radius", "correct"]).to_pydict()
    except (TbnError, OSError, ValueError, KeyError) as e:
        log(f"report: per-image radii of {where} not read ({type(e).__name__}); its curve steps between report radii")
        return None
    return [r for r, c in zip(table["radius"], table["correct"]) if c]


def write_certification_report(summaries: Sequence[dict[str, Any]], out: Storage) -> dict[str, str]:
    """The report of one certification (``<output>/<run-id>``, its per-sigma ``summaries``), with
    the run's ``tbn-ray evaluate`` results appended when there are any."""
    first = summaries[0]["params"]
    title = f"Certification of {first['run']} ({first['run_id']})"
    return write_report(summaries, out, title=title, extra=_evaluation_section(first["run"], out))


def _evaluation_section(run_uri: str, out: Storage) -> str | None:
    """The run's evaluation section, read from its stored results. Best effort: a run that cannot
    be read from here (moved, another account's bucket) only loses that section, not the report."""
    try:
        run = Storage.open(run_uri)
        image = run.object_uri(f"{EVALUATE_DIR}/corruption_accuracy.png")
        if "://" not in image and "://" not in out.uri:
            image = os.path.relpath(image, out.uri)
        return evaluation_section(run, image=image)
    except TbnError as e:
        log(f"report: the evaluation results of {run_uri} are left out ({e})")
        return None
