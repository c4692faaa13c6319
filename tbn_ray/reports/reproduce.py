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
from tbn_ray.store.reproduction import STAGES, Reproduction
from tbn_ray.reports.certify import COHEN_PUBLISHED
from tbn_ray.science.tbn import bn_key
from tbn_ray.store.storage import Storage

RADII = ("0.0", "0.25", "0.5", "0.75", "1.0")
#: Salman et al. 2019 (SmoothAdv), CIFAR-10, all 10,000 test images, N=100,000 (Salman et al. 2019, NeurIPS, their Table 1).
SMOOTHADV_PUBLISHED = {"label": "SmoothAdv (Salman et al. 2019), published", "sigma": 0.5,
                       "certified_accuracy": {"0.0": 0.664, "0.25": 0.587, "0.5": 0.508, "0.75": 0.430, "1.0": 0.351},
                       "acr": 0.703}  # fmt: skip


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
    return {"epochs": len(rows), "seconds": seconds, "heldout_clean_acc": float(last["heldout_clean_acc"]),
            "heldout_pgd_acc": float(last["heldout_pgd_acc"]) if last.get("heldout_pgd_acc") else None,
            "attack": f"{cfg.attack.norm} eps={cfg.attack.eps:g}", "norm": cfg.attack.norm, "eps": cfg.attack.eps,
            "arch": cfg.model.arch}  # fmt: skip


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
            raise TbnError(f"model {spec.name}: stage {missing[0]} has not finished; run tbn-ray reproduce --stage {missing[0]} (or without --stage)")
        cert = {bn: {sigma: _summary(loc) for sigma, loc in locs.items()} for bn, locs in recs["certify"]["certify"].items()}
        ev = recs["evaluate"]
        noise = Storage.open(ev["noise"].rpartition("/")[0] or ".").read_json(ev["noise"].rpartition("/")[2])
        corruption = Storage.open(ev["corruptions"]).read_json("result.json")
        attack = Storage.open(ev["attack"]).read_json("result.json")
        seconds = {
            "train": _training(rep, spec)["seconds"],
            "calibrate": _calibration_seconds(rep, spec, recs["calibrate"]["sigmas"]),
            "certify": sum(s["params"]["compute_seconds"] for by in cert.values() for s in by.values()),
            "evaluate": noise.get("seconds", 0.0) + _item_seconds(ev["corruptions"]) + _item_seconds(ev["attack"]),
        }
        devices = {s: r["device_name"] for s, r in recs.items()}
        models[spec.name] = {"training": _training(rep, spec), "certify": cert, "noise": noise, "corruptions": corruption,
                             "attack": attack, "seconds": seconds, "devices": devices}  # fmt: skip
    return {"name": rep.cfg.name, "models": models, "cost": rep.cfg.cost.model_dump()}


def _noise_row(noise: dict[str, Any], sigma: float) -> dict[str, Any] | None:
    return next((r for r in noise["rows"] if abs(r["sigma"] - sigma) < 1e-12), None)


def _claim_a(data: dict[str, Any]) -> list[str]:
    lines = ["## (a) TBN makes an adversarially trained model a usable base classifier", "",
             "Base-classifier accuracy under N(0, sigma^2) noise, and certified accuracy at r=0.5, with the same weights "
             "and their clean BN statistics vs TBN statistics calibrated at sigma.", "",
             "| model | sigma | noise acc. clean BN | noise acc. TBN | gain | cert. acc. r=0.5 clean BN | cert. acc. r=0.5 TBN | gain |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, m in data["models"].items():
        for sigma, tbn in m["certify"]["tbn"].items():
            row = _noise_row(m["noise"], float(sigma)) or {}
            clean = m["certify"].get("clean", {}).get(sigma)
            a, b = row.get("accuracy_clean_bn"), row.get("accuracy_tbn")
            c = clean["certified_accuracy"].get("0.5") if clean else None
            d = tbn["certified_accuracy"].get("0.5")
            gain = lambda x, y: "-" if x is None or y is None else f"{100 * (y - x):+.1f}"  # noqa: E731
            lines.append(f"| {name} | {sigma} | {_pct(a)} | {_pct(b)} | {gain(a, b)} | {_pct(c)} | {_pct(d)} | {gain(c, d)} |")
    return lines + [""]


def _cert_table(data: dict[str, Any], norm: str, title: str, published: bool) -> list[str]:
    lines = [title, "", "Certified accuracy (%) with TBN statistics at each radius, and ACR.", "",
             "| model | train | sigma | images | n | " + " | ".join(f"r={r}" for r in RADII) + " | ACR | training GPU/CPU-min |",
             "|" + "---|" * (len(RADII) + 7)]  # fmt: skip
    for name, m in data["models"].items():
        if m["training"]["norm"] != norm:
            continue
        for sigma, s in m["certify"]["tbn"].items():
            acc = s["certified_accuracy"]
            lines.append(f"| {name} | {m['training']['attack']} | {sigma} | {s['images']} | {s['params']['n']} | "
                         + " | ".join(_pct(acc.get(r)) for r in RADII) + f" | {s['acr']:.3f} | {m['seconds']['train'] / 60:.1f} |")
    if published:
        for ref in (*COHEN_PUBLISHED, SMOOTHADV_PUBLISHED):
            acc = ref["certified_accuracy"]
            lines.append(f"| {ref['label']} | - | {ref['sigma']} | 10000 | 100000 | " + " | ".join(_pct(acc.get(r)) for r in RADII)
                         + f" | {ref['acr']:.3f} | - |")
    return lines + [""]


def _claim_d(data: dict[str, Any]) -> list[str]:
    modes = sorted({k for m in data["models"].values() for k in m["corruptions"]["modes"]})
    lines = ["## (d) Test-time BN adaptation on CIFAR-10-C", "", "Mean accuracy (%) over the corruptions and severities evaluated, per BN mode.", "",
             "| model | images | grid | " + " | ".join(modes) + " |", "|" + "---|" * (3 + len(modes))]  # fmt: skip
    for name, m in data["models"].items():
        r = m["corruptions"]
        cells = [_pct(r["modes"][k]["mean"]) if k in r["modes"] else "-" for k in modes]
        grid = next(iter(r["modes"].values()))["grid"]
        lines.append(f"| {name} | {r['test_images']} | {grid} | " + " | ".join(cells) + " |")
    return lines + [f"Source: {next(iter(data['models'].values()))['corruptions']['source']}.", ""]


def _claim_e(data: dict[str, Any]) -> list[str]:
    lines = ["## (e) Empirical robustness with the clean statistics", "",
             "The model as trained (clean BN statistics), attacked at its training threat model.", "",
             "| model | threat | images | clean | PGD | APGD-CE | worst case | held-out PGD during training |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, m in data["models"].items():
        a = m["attack"]
        row = a["modes"]["clean"]["variants"]["standard"]
        threat = f"{a['attack']['norm']} eps={a['attack']['eps']:g}"
        lines.append(f"| {name} | {threat} | {a['test_images']} | {_pct(row['clean_accuracy'])} | {_pct(row.get('pgd'))} | "
                     f"{_pct(row.get('apgd-ce'))} | {_pct(row.get('worst_case'))} | {_pct(m['training']['heldout_pgd_acc'])} |")
    return lines + [""]


def _cost(data: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    price = data["cost"]["price_per_gpu_hour"]
    lines = ["## Cost", "", f"Device time per stage, from the stored results. GPU time is priced at ${price:.2f} per GPU-hour "
             f"({data['cost']['price_source']}; set cost.price_per_gpu_hour).", "",
             "| model | stage | device | seconds | GPU-hours | USD |", "|---|---|---|---|---|---|"]  # fmt: skip
    totals = {"seconds": 0.0, "gpu_hours": 0.0, "usd": 0.0}
    for name, m in data["models"].items():
        for stage, secs in m["seconds"].items():
            device = m["devices"][stage]
            gpu_h = 0.0 if device.startswith("CPU") else secs / 3600
            totals["seconds"] += secs
            totals["gpu_hours"] += gpu_h
            totals["usd"] += gpu_h * price
            lines.append(f"| {name} | {stage} | {device} | {secs:.1f} | {gpu_h:.3f} | {gpu_h * price:.2f} |")
    lines += [f"| **total** | | | {totals['seconds']:.0f} | {totals['gpu_hours']:.3f} | {totals['usd']:.2f} |", ""]
    return lines, totals


def _plot(data: dict[str, Any]) -> bytes:
    from matplotlib.figure import Figure

    sigmas = sorted({s for m in data["models"].values() for s in m["certify"]["tbn"]}, key=float)
    fig = Figure(figsize=(4.2 * len(sigmas), 3.6), dpi=110)
    for i, sigma in enumerate(sigmas):
        ax = fig.add_subplot(1, len(sigmas), i + 1)
        for name, m in data["models"].items():
            for bn, style in (("tbn", "-"), ("clean", ":")):
                s = m["certify"].get(bn, {}).get(sigma)
                if s:
                    radii = [float(r) for r in s["certified_accuracy"]]
                    ax.step(radii, list(s["certified_accuracy"].values()), style, where="post", label=f"{name} ({bn} BN)")
        ax.set(title=f"sigma={sigma}", xlabel="l2 radius", ylabel="certified accuracy", ylim=(0, 1))
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_reproduce_report(rep: Reproduction) -> dict[str, str]:
    """report.md, report.json and certified_accuracy.png under the reproduction's folder."""
    data = collect(rep)
    cost_lines, totals = _cost(data)
    data["totals"] = totals
    first = next(iter(data["models"].values()))
    lines = [f"# tbn-ray reproduce: {rep.cfg.name}", "",
             f"Data: {first['noise'].get('data', first['corruptions']['data'])}. Nandy et al. (arXiv 2102.05096), claims (a)-(e).", "",
             *_claim_a(data),
             *_cert_table(data, "l2", "## (b) Larger l2 training budgets approach dedicated smoothing training", True),
             *_cert_table(data, "linf", "## (c) l-inf adversarial training also gives l2 certificates", False),
             *_claim_d(data), *_claim_e(data), *cost_lines,
             "![certified accuracy](certified_accuracy.png)", ""]  # fmt: skip
    return {
        "report.md": rep.root.write_text("report.md", "\n".join(lines)),
        "report.json": rep.root.write_json("report.json", data),
        "certified_accuracy.png": rep.root.write_bytes("certified_accuracy.png", _plot(data)),
    }
