"""The sweep's report: results.csv/.parquet/.md (one row per (epsilon, sigma)), heatmap.png and best.json.

Rows come from the stored pairs (``jobs.sweep_pairs``: row.json) and training runs; an epsilon
that early stopping ended keeps its training columns and leaves the rest empty.
"""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tbn_ray.config import SweepConfig, objective_value
from tbn_ray.science.tbn import bn_key
from tbn_ray.store.runs import CHECKPOINT
from tbn_ray.store.storage import Storage

#: Certified-accuracy radii in the results table (the objective's radius is added if not among them).
TABLE_RADII: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
EVALUATED, STOPPED = "evaluated", "stopped early (ASHA)"

#: The fields of a pair's row that say how the held-out images were split (written by jobs.sweep_pairs).
SPLIT_KEYS = ("validation_images", "validation_index", "calibration_images", "calibration_index", "split_rule")


def _radius_columns(cfg: SweepConfig) -> list[float]:
    r = cfg.objective_radius
    return list(TABLE_RADII) if r is None or r in TABLE_RADII else sorted({*TABLE_RADII, r})


def _table_row(
    cfg: SweepConfig, eps: float, sigma: float, training: dict[str, Any], pair: dict[str, Any] | None
) -> dict[str, Any]:
    """One (epsilon, sigma) row; a stopped epsilon keeps its training columns and leaves the rest empty."""
    row: dict[str, Any] = {
        "epsilon": eps,
        "sigma": sigma,
        "status": EVALUATED if pair is not None else STOPPED,
        "epochs": training["epochs"],
        "clean_acc": None,
        "pgd_acc": None,
        "smoothed_clean_acc": None,
        **{f"certified_acc@{r:g}": None for r in _radius_columns(cfg)},
        "acr": None,
        "abstain_rate": None,
        "objective": None,
        "train_seconds": training["train_seconds"],
        "calibrate_seconds": None,
        "certify_seconds": None,
        "checkpoint": f"{training['run']}/{CHECKPOINT}" if training["run"] else None,
    }
    if pair is not None:
        row.update(
            {k: pair[k] for k in ("clean_acc", "pgd_acc", "smoothed_clean_acc", "acr", "abstain_rate")},
            **{f"certified_acc@{r:g}": pair["certified_accuracy"][str(float(r))] for r in _radius_columns(cfg)},
            objective=objective_value(cfg, pair),
            calibrate_seconds=round(pair["calibrate_seconds"], 3),
            certify_seconds=round(pair["certify_seconds"], 3),
        )
    return row


def table_rows(
    cfg: SweepConfig, training: dict[float, dict[str, Any]], pairs: dict[tuple[float, float], dict[str, Any]]
) -> list[dict[str, Any]]:
    """The results table in grid order; ``training`` per epsilon (``training_record``), ``pairs`` the evaluated rows."""
    return [_table_row(cfg, eps, s, training[eps], pairs.get((eps, s))) for eps in cfg.epsilons for s in cfg.sigmas]


def best_pair(
    cfg: SweepConfig, rows: list[dict[str, Any]], pairs: dict[tuple[float, float], dict[str, Any]]
) -> dict[str, Any]:
    """The pair with the highest objective, ready for ``tbn-ray certify``. Ties (common with few
    validation images) go to the higher ACR, then to the first in grid order."""
    top = max((r for r in rows if r["status"] == EVALUATED), key=lambda r: (r["objective"], r["acr"]))
    pair = pairs[(top["epsilon"], top["sigma"])]
    return {
        "sweep": cfg.name,
        "objective": cfg.objective,
        "value": top["objective"],
        "epsilon": top["epsilon"],
        "sigma": top["sigma"],
        "run": pair["run"],
        "checkpoint": pair["checkpoint"],
        "epoch": pair["epoch"],
        "bn_stats": bn_key(top["sigma"]),
        "certify_command": f"tbn-ray certify {pair['run']} --sigma {top['sigma']:g}",
        "note": "the objective is the best of the grid on held-out validation images (optimistic); certify on the test set to report",
        "validation": {k: pair[k] for k in (*SPLIT_KEYS, "data")},
        "row": top,
    }


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _markdown(cfg: SweepConfig, rows: list[dict[str, Any]], best: dict[str, Any], pair: dict[str, Any]) -> str:
    radii = _radius_columns(cfg)
    head = [
        "epsilon",
        "sigma",
        "status",
        "epochs",
        "clean %",
        "PGD %",
        "smoothed clean %",
        *(f"cert. r={r:g} %" for r in radii),
        "ACR",
        "abstain %",
        "train s",
        "calibrate s",
        "certify s",
    ]
    lines = [
        f"# Sweep {cfg.name}: training epsilon x TBN sigma",
        "",
        f"Objective: **{cfg.objective}**. Best: epsilon {best['epsilon']:g}, sigma {best['sigma']:g} "
        f"({best['value']:.3f}), checkpoint `{best['checkpoint']}`; next: `{best['certify_command']}`.",
        "",
        f"Data: {pair['data']}. Validation: {pair['validation_images']} held-out training images (official train "
        f"indices {pair['validation_index'][0]}..{pair['validation_index'][1]}), never the test set; TBN statistics "
        f"calibrated on the other {pair['calibration_images']} held-out images (disjoint), "
        f"{cfg.calibrate.samples} noisy samples per sigma. CERTIFY n0={cfg.certify.n0}, n={cfg.certify.n}, "
        f"alpha={cfg.certify.alpha}. PGD: {cfg.pgd.norm} eps={cfg.pgd.eps:g}, {cfg.pgd.steps} steps, clean BN statistics. "
        f"Training attack: {cfg.train.attack.norm} PGD at each epsilon, {cfg.train.attack.steps} steps, "
        f"{cfg.train.optim.epochs} epochs of {cfg.train.model.arch}.",
        "",
        "The best value is a maximum over the grid on the validation images, so it is optimistic: "
        "certify the chosen model on the test set for the number to report.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [
            f"{r['epsilon']:g}",
            f"{r['sigma']:g}",
            r["status"],
            str(r["epochs"]),
            _pct(r["clean_acc"]),
            _pct(r["pgd_acc"]),
            _pct(r["smoothed_clean_acc"]),
            *(_pct(r[f"certified_acc@{x:g}"]) for x in radii),
            "-" if r["acr"] is None else f"{r['acr']:.3f}",
            _pct(r["abstain_rate"]),
            *(
                "-" if r[k] is None else f"{r[k]:.1f}"
                for k in ("train_seconds", "calibrate_seconds", "certify_seconds")
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _heatmap(cfg: SweepConfig, rows: list[dict[str, Any]], best: dict[str, Any]) -> bytes:
    """The objective over (epsilon, sigma); stopped epsilons are blank."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.patches import Rectangle

    eps, sig = list(cfg.epsilons), list(cfg.sigmas)
    grid = np.full((len(eps), len(sig)), np.nan)
    for r in rows:
        if r["objective"] is not None:
            grid[eps.index(r["epsilon"]), sig.index(r["sigma"])] = r["objective"]
    fig = Figure(figsize=(1.3 * len(sig) + 2.5, 0.8 * len(eps) + 1.8), dpi=110)
    ax = fig.add_subplot()
    top = float(np.nanmax(grid)) or 1.0
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto", vmin=0, vmax=top)
    for i in range(len(eps)):
        for j in range(len(sig)):
            value = grid[i, j]
            dark = np.isnan(value) or value < 0.6 * top  # viridis: white text on the dark end
            text = "stopped" if np.isnan(value) else f"{value:.3f}"
            ax.text(j, i, text, ha="center", va="center", color="white" if dark else "black", fontsize=8)
    i, j = eps.index(best["epsilon"]), sig.index(best["sigma"])
    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(len(sig)), [f"{s:g}" for s in sig])
    ax.set_yticks(range(len(eps)), [f"{e:g}" for e in eps])
    ax.set(
        xlabel="TBN sigma",
        ylabel=f"training epsilon ({cfg.train.attack.norm})",
        title=f"{cfg.name}: {cfg.objective} (validation)",
    )
    ax.set_facecolor("0.85")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_outputs(
    cfg: SweepConfig, root: Storage, rows: list[dict[str, Any]], best: dict[str, Any], pair: dict[str, Any]
) -> dict[str, str]:
    """results.csv/.parquet/.md, heatmap.png and, last, best.json."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    files = {"results.csv": root.write_text("results.csv", buf.getvalue())}
    with root.writer("results.parquet") as f:
        pq.write_table(pa.Table.from_pylist(rows), f)
    files["results.parquet"] = root.object_uri("results.parquet")
    files["results.md"] = root.write_text("results.md", _markdown(cfg, rows, best, pair))
    files["heatmap.png"] = root.write_bytes("heatmap.png", _heatmap(cfg, rows, best))
    files["best.json"] = root.write_json("best.json", best)
    return files
