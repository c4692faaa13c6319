"""A model tbn-ray did not train, on CPU: AutoAttack's example CIFAR-10 ResNet-18
(``pyautoattack/examples/model_test.pt``, architecture ``pyautoattack.examples.resnet:ResNet18``,
inputs in [0, 1]) imported, calibrated, certified and attacked with tbn-ray's own code paths,
on the byte-exact CIFAR-10 subset (``--data partial``: the first test images, held-out
training images for TBN).

Measured: clean accuracy; accuracy under Gaussian noise with the clean BN statistics and with
TBN at each sigma (one noise draw per image, the same noise for both sets); Cohen's CERTIFY
with TBN and with clean statistics at a modest n; standard AutoAttack (l-inf 8/255, l2 0.5)
with clean statistics. Each stage stores its work in the run (resumable: run it again, finished
stages are reused) and the figures so far are rewritten after every stage.

    nice -n 10 python bench/foreign_model.py [--work DIR] [--certify-images 100] [--n 100] [--aa-images 100]

Figures go to bench/results/foreign_model.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from tbn_ray.config import CalibrateConfig, CertifyConfig, DataConfig, EvaluateConfig
from tbn_ray.jobs.certify import certify_run
from tbn_ray.jobs.evaluate import run_in_process
from tbn_ray.jobs.evaluate_attack import plan_attack
from tbn_ray.jobs.pipeline import calibrate_run, noise_accuracy
from tbn_ray.science import data as data_mod
from tbn_ray.science.tbn import bn_key
from tbn_ray.store.model_import import import_run
from tbn_ray.store.runs import Run
from tbn_ray.store.storage import Storage

RESULTS = Path(__file__).resolve().parent / "results"
SPEC = "pyautoattack.examples.resnet:ResNet18"
SIGMAS = (0.12, 0.25, 0.5)


def write(figures: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "foreign_model.json").write_text(json.dumps(figures, indent=2) + "\n")
    (RESULTS / "foreign_model.md").write_text(markdown(figures))


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def markdown(f: dict[str, Any]) -> str:
    s = f["setup"]
    lines = [
        f"# A foreign model on CPU: {f['model']}",
        "",
        f"{s['weights']} (sha256 {s['weights_sha256'][:16]}), imported with `tbn-ray import {SPEC} --weights ...`; "
        f"{s['data']}; TBN: {s['calibrate_samples']} noisy samples per sigma from {s['heldout_images']} held-out training images. "
        f"{s['machine']}; started {f['started']}.",
        "",
    ]
    if "clean_accuracy" in f:
        lines += [
            f"Clean accuracy: **{pct(f['clean_accuracy']['accuracy'])}%** on {f['clean_accuracy']['images']} test images.",
            "",
        ]
    if "noise_accuracy" in f:
        lines += [
            "## Accuracy under Gaussian noise (base classifier, one draw per image)",
            "",
            "| sigma | images | clean BN | TBN |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['sigma']:g} | {r['images']} | {pct(r['accuracy_clean_bn'])} | {pct(r['accuracy_tbn'])} |"
            for r in f["noise_accuracy"]
        ]
        lines.append("")
    if "certify" in f:
        c = f["certify"]
        radii = c["radii"]
        lines += [
            f"## Certified accuracy (Cohen CERTIFY, n0={c['n0']}, n={c['n']}, alpha={c['alpha']}: radii above {c['max_radius']:.3f} cannot be certified at this n)",
            "",
            "| sigma | BN | images | " + " | ".join(f"r={r}" for r in radii) + " | ACR | wall s |",
            "|" + "---|" * (5 + len(radii)),
        ]
        for row in c["rows"]:
            cells = " | ".join(pct(row["certified"].get(r)) for r in radii)
            images = (
                f"{row['images']} of {row['images_planned']}"
                if row.get("images_planned", row["images"]) != row["images"]
                else str(row["images"])
            )
            lines.append(
                f"| {row['sigma']:g} | {row['bn']} | {images} | {cells} | {row['acr']:.3f} | {row['seconds']:.0f} |"
            )
        lines.append("")
    if "autoattack" in f:
        lines += [
            "## AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square), clean BN statistics",
            "",
            "| threat | images | clean | AutoAttack | wall s |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['norm']} {r['eps_text']} | {r['images']}{'' if r.get('images_planned', r['images']) == r['images'] else ' of ' + str(r['images_planned'])} "
            f"| {pct(r['clean'])} | {pct(r['autoattack'])} | {r['seconds']:.0f} |"
            for r in f["autoattack"]
        ]
        lines.append("")
    if f.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in f["notes"]], ""]
    return "\n".join(lines)


def summarize_stored(run_dir: Path, figures: dict[str, Any], radii: tuple[str, ...] = ("0.0", "0.25", "0.5")) -> None:
    """``--summarize``: certified accuracy from the shards stored so far (a run stopped for time),
    each certification marked with how many of its planned images it holds."""
    import pyarrow.parquet as pq

    from tbn_ray.science.smoothing import summarize

    found = []
    for folder in sorted(run_dir.glob("certify/*/sigma=*")):
        shards = sorted(folder.glob("shard-*.parquet"))
        if shards:
            meta = json.loads(pq.read_metadata(shards[0]).metadata[b"tbn_ray.shard"])
            found.append((folder, meta, [r for f in shards for r in pq.read_table(f).to_pylist()]))
    common = set.intersection(*({r["idx"] for r in records} for _, _, records in found)) if found else set()
    rows, first = [], None
    for folder, meta, records in found:  # every row on the same images: those all certifications hold
        first = first or meta["params"]
        s = summarize([r for r in records if r["idx"] in common])
        records = [r for r in records if r["idx"] in common]
        rows.append(
            {
                "sigma": meta["sigma"],
                "bn": "tbn" if meta["params"]["bn"].startswith("sigma=") else "clean",
                "images": s["images"],
                "images_planned": meta["images_total"],
                "acr": s["acr"],
                "seconds": round(sum(r["time"] for r in records), 1),
                "certified": {r: s["certified_accuracy"].get(r) for r in radii},
                "location": str(folder),
            }
        )
    if first is not None:
        from scipy.special import ndtri

        max_r = first["sigma"] * float(ndtri(first["alpha"] ** (1 / first["n"])))
        figures["certify"] = {
            "n0": first["n0"],
            "n": first["n"],
            "alpha": first["alpha"],
            "radii": list(radii),
            "max_radius": max_r,
            "rows": rows,
        }
        if any(r["images"] < r["images_planned"] for r in rows):
            figures.setdefault("notes", []).append(
                "certification stopped for time: every row is on the same first test images, those all its certifications "
                "finished (contiguous shards, in index order); 'seconds' is the sum of their per-image certification times"
            )


AA_THREATS = (("linf", "8/255", "8/255"), ("l2", "0.5", "0.5"))


def summarize_autoattack(run: Run, figures: dict[str, Any], images: int, batch: int) -> None:
    """``--summarize``: AutoAttack accuracy from the batches stored so far, per threat model."""
    rows = []
    for norm, eps, text in AA_THREATS:
        aa = EvaluateConfig(attacks=("autoattack",), norm=norm, eps=eps, batch_size=batch)
        plan = plan_attack(run, ["clean"], aa, start=0, stop=images)
        items = [json.loads(p.read_text()) for p in sorted(plan.out.local_path().glob("clean/autoattack/batch-*.json"))]
        items = [
            i for i in items if i["params"] == plan.item_params(plan.modes[0], ("autoattack", i["params"]["batch"]))
        ]
        if not items:
            continue
        clean = [c for i in items for c in i["variants"]["standard"]["clean"]]
        adv = [a for i in items for a in i["variants"]["standard"]["adversarial"]]
        rows.append(
            {
                "norm": norm,
                "eps_text": text,
                "images": len(clean),
                "images_planned": len(plan.test),
                "clean": sum(clean) / len(clean),
                "autoattack": sum(adv) / len(adv),
                "seconds": round(sum(i["seconds"] for i in items), 1),
            }
        )
    if rows:
        figures["autoattack"] = rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/tbn-foreign-model", help="storage root of the imported run")
    ap.add_argument("--noise-images", type=int, default=500)
    ap.add_argument("--calibrate-samples", type=int, default=2000)
    ap.add_argument("--certify-images", type=int, default=100)
    ap.add_argument("--certify-sigmas", type=float, nargs="+", default=[0.25])
    ap.add_argument("--n0", type=int, default=10)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--aa-images", type=int, default=100)
    ap.add_argument("--aa-batch", type=int, default=25)
    ap.add_argument(
        "--summarize",
        action="store_true",
        help="only rewrite the figures from what the run holds (e.g. after stopping it)",
    )
    ap.add_argument("--note", action="append", default=[], help="a note for the figures (with --summarize)")
    args = ap.parse_args()
    if args.summarize:
        figures = {**json.loads((RESULTS / "foreign_model.json").read_text()), "notes": []}  # notes: this call's
        summarize_stored(Path(args.work) / "aa-example-resnet18", figures)
        summarize_autoattack(
            Run.open(str(Path(args.work) / "aa-example-resnet18")), figures, args.aa_images, args.aa_batch
        )
        figures.setdefault("notes", []).extend(args.note)
        write(figures)
        print(markdown(figures))
        return

    import pyautoattack

    weights = Path(pyautoattack.__file__).parent / "examples" / "model_test.pt"
    root = Storage.open(args.work)
    data = DataConfig(source="partial")
    run, ckpt = import_run(SPEC, root, name="aa-example-resnet18", data=data, weights=weights)
    d = data_mod.load_from_config(data)
    figures: dict[str, Any] = {
        "model": ckpt.config.model.label,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "setup": {
            "weights": f"pyautoattack/examples/model_test.pt ({pyautoattack.__name__} wheel)",
            "weights_sha256": ckpt.config.model.source.weights_sha256,
            "data": d.description,
            "heldout_images": len(d.heldout),
            "calibrate_samples": args.calibrate_samples,
            "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), nice 10, a shared 2-core machine",
        },
        "notes": [],
    }

    t0 = time.perf_counter()
    model, _ = run.load_model()
    test = d.test
    x = data_mod.to_float(test.images[: args.noise_images])
    y = torch.as_tensor(test.labels[: args.noise_images], dtype=torch.int64)
    with torch.no_grad():
        correct = sum(int((model(x[i : i + 250]).argmax(1) == y[i : i + 250]).sum()) for i in range(0, len(x), 250))
    figures["clean_accuracy"] = {
        "images": len(x),
        "accuracy": correct / len(x),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write(figures)

    t0 = time.perf_counter()
    have = run.load_bn_sets()
    todo = tuple(s for s in SIGMAS if bn_key(s) not in have)
    if todo:
        calibrate_run(
            run,
            CalibrateConfig(sigmas=todo, samples=args.calibrate_samples, batch_size=250),
            device="cpu",
            progress=False,
        )
    figures["calibrate_seconds"] = round(time.perf_counter() - t0, 1)
    rows = noise_accuracy(
        run, SIGMAS, test.images[: args.noise_images], test.labels[: args.noise_images], draws=1, device="cpu"
    )
    figures["noise_accuracy"] = rows
    write(figures)

    cert_rows = []
    radii = ("0.0", "0.25", "0.5")
    for bn in ("tbn", "clean"):
        t0 = time.perf_counter()
        cfg = CertifyConfig(
            sigmas=tuple(args.certify_sigmas),
            n0=args.n0,
            n=args.n,
            alpha=args.alpha,
            batch_size=args.n,
            max_images=args.certify_images,
            bn=bn,
        )
        outs = certify_run(run, cfg, run.storage.child("certify"), device="cpu", progress=False)
        for o in outs:
            s = o.summary
            cert_rows.append(
                {
                    "sigma": o.sigma,
                    "bn": bn,
                    "images": s["images"],
                    "acr": s["acr"],
                    "seconds": round(time.perf_counter() - t0, 1),
                    "certified": {r: s["certified_accuracy"].get(r) for r in radii},
                    "location": o.location,
                }
            )
    from scipy.special import ndtri

    max_r = min(args.certify_sigmas) * float(ndtri(args.alpha ** (1 / args.n)))
    figures["certify"] = {
        "n0": args.n0,
        "n": args.n,
        "alpha": args.alpha,
        "radii": list(radii),
        "max_radius": max_r,
        "rows": cert_rows,
    }
    write(figures)

    aa_rows = []
    for norm, eps, text in AA_THREATS:
        t0 = time.perf_counter()
        aa = EvaluateConfig(attacks=("autoattack",), norm=norm, eps=eps, batch_size=args.aa_batch)
        plan = plan_attack(run, ["clean"], aa, start=0, stop=args.aa_images)
        res = run_in_process(plan, torch.device("cpu"), progress=False).result["modes"]["clean"]["variants"]["standard"]
        aa_rows.append(
            {
                "norm": norm,
                "eps_text": text,
                "images": res["images"],
                "clean": res["clean_accuracy"],
                "autoattack": res["autoattack"],
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        figures["autoattack"] = aa_rows
        write(figures)
    print(markdown(figures))


if __name__ == "__main__":
    main()
