"""The reproduction's report: one table per claim of the paper, read from the stored results.

Every number comes from files the stages stored (summary.json, result.json, metrics.csv,
noise_accuracy.json, bn_stats.pt metadata, evaluation items) through the stage records; the
published rows are the only constants, and they are labelled as published.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from tbn_ray.errors import TbnError
from tbn_ray.reports.certify import COHEN_PUBLISHED, radius_cap
from tbn_ray.reports.claims import claims_json, claims_markdown, judge, noise_corruption_mean
from tbn_ray.science.tbn import bn_key
from tbn_ray.store.reproduction import STAGES, Reproduction
from tbn_ray.store.storage import Storage

RADII = ("0.0", "0.25", "0.5", "0.75", "1.0")
#: Salman et al. 2019 (SmoothAdv), CIFAR-10, all 10,000 test images, N=100,000 (Salman et al. 2019, NeurIPS, their Table 1).
SMOOTHADV_PUBLISHED = {
    "label": "SmoothAdv (Salman et al. 2019), published",
    "sigma": 0.5,
    "certified_accuracy": {"0.0": 0.664, "0.25": 0.587, "0.5": 0.508, "0.75": 0.430, "1.0": 0.351},
    "acr": 0.703,
}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _summary(location: str) -> dict[str, Any]:
    return Storage.open(location).read_json("summary.json")


def _item_seconds(location: str) -> float:
    out = Storage.open(location)
    keys = [k for k in out.list() if k.endswith(".json") and k != "result.json"]
    return sum(float(out.read_json(k).get("seconds", 0.0)) for k in keys)


def _training(rep: Reproduction, spec) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    run = rep.run(spec)
    rows = list(csv.DictReader(io.StringIO(run.storage.read_text("metrics.csv"))))
    last = rows[-1]
    seconds = sum(float(r.get("seconds") or 0) + float(r.get("eval_seconds") or 0) for r in rows)
    cfg = rep.cfg.train_config(spec)
    number = lambda key: float(last[key]) if last.get(key) else None  # noqa: E731
    return {
        "epochs": len(rows),
        "seconds": seconds,
        "heldout_clean_acc": number("heldout_clean_acc"),
        "heldout_pgd_acc": number("heldout_pgd_acc"),
        "heldout_noise_acc": number("heldout_noise_acc"),
        "attack": cfg.objective_label,
        "objective": cfg.objective,
        "noise_trained": cfg.noise_trained,
        "noise_sigma": cfg.noise.sigma,
        "norm": None if cfg.noise_trained else cfg.attack.norm,
        "eps": cfg.attack.eps,
        "arch": cfg.model.arch,
        "batch_size": cfg.optim.batch_size,
    }


def _calibration_seconds(rep: Reproduction, spec, sigmas: list[float]) -> float:  # type: ignore[no-untyped-def]
    sets = rep.run(spec).load_bn_sets()
    return sum(float(sets[bn_key(s)]["meta"].get("seconds", 0.0)) for s in sigmas if bn_key(s) in sets)


def collect(rep: Reproduction) -> dict[str, Any]:
    """Everything the report shows, per model, from the stage records and the stored results."""
    models = {}
    for spec in rep.cfg.models:
        recs = {s: rep.record(spec, s) for s in STAGES if s != "report"}
        missing = [s for s, r in recs.items() if r is None]
        if missing:
            raise TbnError(
                f"model {spec.name}: stage {missing[0]} has not finished; run tbn-ray reproduce --stage {missing[0]} (or without --stage)"
            )
        cert = {
            bn: {sigma: _summary(loc) for sigma, loc in locs.items()} for bn, locs in recs["certify"]["certify"].items()
        }
        ev = recs["evaluate"]
        noise = Storage.open(ev["noise"].rpartition("/")[0] or ".").read_json(ev["noise"].rpartition("/")[2])
        corruption = Storage.open(ev["corruptions"]).read_json("result.json")
        attacks = {k: Storage.open(ev[k]).read_json("result.json") for k in ("attack", "autoattack") if k in ev}
        seconds = {
            "train": _training(rep, spec)["seconds"],
            "calibrate": _calibration_seconds(rep, spec, recs["calibrate"]["sigmas"]),
            "certify": sum(s["params"]["compute_seconds"] for by in cert.values() for s in by.values()),
            "evaluate": noise.get("seconds", 0.0) + sum(_item_seconds(ev[k]) for k in ("corruptions", *attacks)),
        }
        devices = {s: r["device_name"] for s, r in recs.items()}
        walls = {s: r.get("wall_seconds") for s, r in recs.items()}
        models[spec.name] = {
            "training": _training(rep, spec),
            "certify": cert,
            "noise": noise,
            "corruptions": corruption,
            **attacks,
            "seconds": seconds,
            "devices": devices,
            "wall_seconds": walls,
        }
    return {"name": rep.cfg.name, "models": models, "cost": rep.cfg.cost.model_dump()}


def _noise_row(noise: dict[str, Any], sigma: float) -> dict[str, Any] | None:
    return next((r for r in noise["rows"] if abs(r["sigma"] - sigma) < 1e-12), None)


def _bn_label(m: dict[str, Any], bn: str) -> str:
    """What a column's statistics are: TBN, the clean statistics of an AT model, or a noise-trained model's own."""
    if bn == "tbn":
        return "TBN"
    return "own BN" if m["training"]["noise_trained"] else "clean BN"


def _columns(data: dict[str, Any], sigma: str) -> list[tuple[str, str, dict[str, Any]]]:
    """The side-by-side table's columns at ``sigma``: every AT model with TBN then clean statistics,
    then every noise-trained model certified there."""
    cols = []
    for noise_trained in (False, True):
        for name, m in data["models"].items():
            if m["training"]["noise_trained"] != noise_trained:
                continue
            for bn in ("tbn", "clean"):
                summary = m["certify"].get(bn, {}).get(sigma)
                if summary is not None:
                    cols.append((f"{name} {_bn_label(m, bn)}", bn, summary))
    return cols


def side_by_side(data: dict[str, Any]) -> list[str]:
    """Per sigma, certified accuracy at every report radius below the cap, each AT model with TBN and
    with its clean statistics beside the model trained with Gaussian augmentation."""
    sigmas = sorted({sg for m in data["models"].values() for by in m["certify"].values() for sg in by}, key=float)
    lines = ["## Certified accuracy, side by side", ""]
    for sigma in sigmas:
        cols = _columns(data, sigma)
        p = cols[0][2]["params"]
        cap = radius_cap(float(sigma), p["n"], p["alpha"])
        radii = [r for r in cols[0][2]["certified_accuracy"] if float(r) <= cap]
        lines += [
            f"### sigma = {sigma}",
            "",
            f"{cols[0][2]['images']} test images (every {p.get('skip', 1)}th), n0 = {p['n0']}, n = {p['n']} "
            f"({'sequential' if p.get('adaptive') else 'fixed'}), alpha = {p['alpha']:g}; radii up to the cap {cap:.2f}. "
            "Certified accuracy (%).",
            "",
            "| radius | " + " | ".join(c[0] for c in cols) + " |",
            "|---" * (len(cols) + 1) + "|",
        ]
        for r in radii:
            lines.append(f"| {r} | " + " | ".join(_pct(c[2]["certified_accuracy"].get(r)) for c in cols) + " |")
        lines.append("| ACR | " + " | ".join(f"{c[2]['acr']:.3f}" for c in cols) + " |")
        lines.append("")
    return lines


def _models_table(data: dict[str, Any]) -> list[str]:
    lines = [
        "## Models",
        "",
        "| model | training | epochs | batch | held-out clean | held-out PGD | held-out under training noise | training CPU/GPU-min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in data["models"].items():
        t = m["training"]
        lines.append(
            f"| {name} | {t['arch']}, {t['attack']} | {t['epochs']} | {t['batch_size']} | {_pct(t['heldout_clean_acc'])} | "
            f"{_pct(t['heldout_pgd_acc'])} | {_pct(t['heldout_noise_acc'])} | {t['seconds'] / 60:.1f} |"
        )
    return lines + [""]


def _noise_table(data: dict[str, Any]) -> list[str]:
    lines = [
        "## Accuracy under noise: clean BN vs TBN",
        "",
        "Base-classifier accuracy (%) under N(0, sigma^2 I), the same weights with their trained statistics and with TBN "
        "statistics calibrated at sigma (for a noise-trained model the trained statistics are its own).",
        "",
        "| model | images x draws | sigma | trained BN | TBN | gain |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in data["models"].items():
        for row in m["noise"]["rows"]:
            a, b = row.get("accuracy_clean_bn"), row.get("accuracy_tbn")
            gain = "-" if a is None or b is None else f"{100 * (b - a):+.1f}"
            lines.append(
                f"| {name} | {m['noise'].get('test_images', '-')} x {m['noise'].get('params', {}).get('draws', '-')} | "
                f"{row['sigma']:g} | {_pct(a)} | {_pct(b)} | {gain} |"
            )
    return lines + [""]


def _published(data: dict[str, Any]) -> list[str]:
    lines = [
        "## Published rows, for context",
        "",
        "Other models, data and budgets: ResNet-110 trained for 90 epochs, all 10,000 test images (Cohen's own 500-image "
        "table differs), n = 100,000. Not comparable number for number with the rows above.",
        "",
        "| method | sigma | " + " | ".join(f"r={r}" for r in RADII) + " | ACR |",
        "|" + "---|" * (len(RADII) + 3),
    ]
    for ref in (*COHEN_PUBLISHED, SMOOTHADV_PUBLISHED):
        acc = ref["certified_accuracy"]
        lines.append(
            f"| {ref['label']} | {ref['sigma']} | "
            + " | ".join(_pct(acc.get(r)) for r in RADII)
            + f" | {ref['acr']:.3f} |"
        )
    return lines + [""]


def _claim_d(data: dict[str, Any]) -> list[str]:
    modes = sorted(
        {v["spec"] if "spec" in v else k for m in data["models"].values() for k, v in m["corruptions"]["modes"].items()}
    )
    lines = [
        "## Test-time BN on CIFAR-10-C",
        "",
        "Mean accuracy (%) over the noise corruptions (gaussian, shot, impulse), and over every corruption evaluated, per BN mode.",
        "",
        "| model | images | grid | " + " | ".join(f"{k}: noise / all" for k in modes) + " |",
        "|" + "---|" * (3 + len(modes)),
    ]
    for name, m in data["models"].items():
        r = m["corruptions"]
        by_spec = {v.get("spec", k): v for k, v in r["modes"].items()}
        cells = [
            f"{_pct(noise_corruption_mean(by_spec[k]))} / {_pct(by_spec[k]['mean'])}" if k in by_spec else "-"
            for k in modes
        ]
        grid = next(iter(r["modes"].values()))["grid"]
        lines.append(f"| {name} | {r['test_images']} | {grid} | " + " | ".join(cells) + " |")
    return lines + [f"Source: {next(iter(data['models'].values()))['corruptions']['source']}.", ""]


#: Published l2 adversarial training, for context (MadryLab robustness library, ResNet-50, CIFAR-10;
#: RobustBench's AutoAttack entry for Engstrom2019Robustness).
PUBLISHED_AT = (
    "MadryLab robustness, ResNet-50, l2 eps_train 1.0: clean 81.6%, PGD eps 1.0 52.7%; "
    "eps_train 0.5: clean 90.8%, PGD eps 0.5 70.2%. RobustBench Engstrom2019 (ResNet-50, l2): AutoAttack eps 0.5 69.24%, clean 90.83%."
)


def _claim_e(data: dict[str, Any]) -> list[str]:
    lines = [
        "## Empirical robustness with the clean statistics",
        "",
        "The adversarially trained models as trained (clean BN statistics), attacked at their training threat model.",
        "",
        "| model | threat | attack | images | clean | robust |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in data["models"].items():
        for key in ("attack", "autoattack"):
            a = m.get(key)
            if a is None:
                continue
            row = a["modes"]["clean"]["variants"]["standard"]
            threat = f"{a['attack']['norm']} eps={a['attack']['eps']:g}"
            for attack in a["attack"].get("attacks", []):
                lines.append(
                    f"| {name} | {threat} | {attack} | {a['test_images']} | {_pct(row['clean_accuracy'])} | {_pct(row.get(attack))} |"
                )
    return lines + ["", f"Published, for context: {PUBLISHED_AT}", ""]


def _cost(data: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    price = data["cost"]["price_per_gpu_hour"]
    lines = [
        "## Cost",
        "",
        "Minutes: compute time per stage, summed from the stored results (training epochs, calibration, certificate shards, "
        "evaluation items), not counting start-up and data loading. "
        f"GPU time is priced at ${price:.2f} per GPU-hour ({data['cost']['price_source']}); CPU time is shown as hours of the whole machine named. "
        "Wall minutes: of the call that finished the stage (a resumed stage's earlier calls not included; '-' where not recorded).",
        "",
        "| model | stage | device | minutes | wall minutes | machine-hours (CPU) | GPU-hours | USD |",
        "|---|---|---|---|---|---|---|---|",
    ]
    totals = {"seconds": 0.0, "cpu_hours": 0.0, "gpu_hours": 0.0, "usd": 0.0}
    for name, m in data["models"].items():
        for stage, secs in m["seconds"].items():
            device = m["devices"][stage]
            on_cpu = device.startswith("CPU")
            gpu_h, cpu_h = (0.0, secs / 3600) if on_cpu else (secs / 3600, 0.0)
            totals["seconds"] += secs
            totals["cpu_hours"] += cpu_h
            totals["gpu_hours"] += gpu_h
            totals["usd"] += gpu_h * price
            wall = m.get("wall_seconds", {}).get(stage)
            lines.append(
                f"| {name} | {stage} | {device} | {secs / 60:.1f} | {'-' if wall is None else f'{wall / 60:.1f}'} | "
                f"{cpu_h:.2f} | {gpu_h:.3f} | {gpu_h * price:.2f} |"
            )
    lines += [
        f"| **total** | | | {totals['seconds'] / 60:.0f} | | {totals['cpu_hours']:.2f} | {totals['gpu_hours']:.3f} | {totals['usd']:.2f} |",
        "",
    ]
    return lines, totals


def _plot(data: dict[str, Any]) -> bytes:
    from matplotlib.figure import Figure

    sigmas = sorted({s for m in data["models"].values() for by in m["certify"].values() for s in by}, key=float)
    fig = Figure(figsize=(4.6 * len(sigmas), 3.8), dpi=110)
    for i, sigma in enumerate(sigmas):
        ax = fig.add_subplot(1, len(sigmas), i + 1)
        p = _columns(data, sigma)[0][2]["params"]
        cap = radius_cap(float(sigma), p["n"], p["alpha"])
        for label, bn, s in _columns(data, sigma):
            radii = [float(r) for r in s["certified_accuracy"] if float(r) <= cap]
            style = "-" if bn == "tbn" else ("--" if "own" in label else ":")
            ax.step(radii, [s["certified_accuracy"][str(r)] for r in radii], style, where="post", label=label)
        ax.set(
            title=f"sigma={sigma} (n={p['n']}, {_columns(data, sigma)[0][2]['images']} images)",
            xlabel="l2 radius",
            ylabel="certified accuracy",
            ylim=(0, 1),
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_reproduce_report(rep: Reproduction) -> dict[str, str]:
    """report.md, report.json and certified_accuracy.png under the reproduction's folder."""
    data = collect(rep)
    cost_lines, totals = _cost(data)
    data["totals"] = totals
    claims = judge(data)
    data["claims"] = claims_json(claims)
    first = next(iter(data["models"].values()))
    lines = [
        f"# tbn-ray reproduce: {rep.cfg.name}",
        "",
        f"Data: {first['noise'].get('data', first['corruptions']['data'])}. Nandy et al. (arXiv 2102.05096), claims (a)-(e), "
        f"measured on the models below, every one of the same architecture, epochs, batch and schedule.",
        "",
        *_models_table(data),
        *side_by_side(data),
        *claims_markdown(claims),
        *_noise_table(data),
        *_claim_d(data),
        *_claim_e(data),
        *_published(data),
        *cost_lines,
        "![certified accuracy](certified_accuracy.png)",
        "",
    ]
    return {
        "report.md": rep.root.write_text("report.md", "\n".join(lines)),
        "report.json": rep.root.write_json("report.json", data),
        "certified_accuracy.png": rep.root.write_bytes("certified_accuracy.png", _plot(data)),
    }
