"""The GPU part of the project as one resumable session: engine table, fast reproduction, Ray actors.

A GPU machine may be lent for a few minutes at a time, bare (no Ray, no pydantic, no network)
and given back between calls with everything on it lost. So this script runs in stages, each a
subprocess of the project's own commands, and keeps only what a user needs, under one results
folder (``results/gpu``) that travels back and forth with the checkout; a finished stage leaves
``<stage>/stage.json`` there and is skipped by the next call, which finishes what the last could not.

Stages, in order:

1. ``engine``: ``bench/certify_throughput.py --parts gpu`` (ResNet-110 at n=100,000: the
   reference-style loop, tbn-ray fp32 and bf16, the packed engine, with torch.compile and cuDNN
   autotuning, the adaptive sample size; s/image, forward passes/image, GPU-hours for 10,000 images).
2. ``engine-tuned``: ``bench/certify_throughput.py --parts tuned`` (the same model and n through
   tbn-ray's in-process certification with every speed option on, then torch.compile, then the
   sequential sample size).
3. ``reproduce-<model>``, one per model of ``configs/paper-fast.yaml``: ``tbn-ray reproduce`` up to
   ``evaluate`` for that model alone. Its stored results (everything but the weights) are kept;
   a later call puts them back where the stage records point, so
4. ``report`` (``tbn-ray reproduce --stage report``, the report with its cost table) can run in
   any later call.
5. ``ray``: ``tbn-ray certify`` on Ray actors with ``--gpus-per-actor 1`` and ``--local`` in this
   process, same images: overhead and agreement. Skipped where Ray cannot be imported (a trimmed
   Ray, ``bench/ray_trim.py``, is unpacked from the carry folder when it is there).

A stage starts only when its estimated time fits the budget left (``--budget``); one that still
overruns is stopped with SIGTERM at the deadline and is redone by the next call. The driver
imports neither torch nor Ray.

    python3 bench/gpu_carry.py                         # here, once: fill .gpu-carry/ (wheels, data, trimmed Ray)
    python3 bench/gpu_session.py --budget 540 --pack DIR   # on the GPU machine
    python3 bench/gpu_session.py --device cpu --tiny       # the CPU rehearsal (minutes)

The runner (deadline, estimates, process groups, packing) is ``bench/gpu_runner.py``; the
tuned-engine rows are ``bench/certify_throughput.py --parts tuned``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

from gpu_runner import Session, Stage, done, finish, log, pack, run_stages, setup, stop_on_sigterm, target_tag  # noqa: E402

#: Estimated seconds per stage on the GPU (one H200) and in the CPU rehearsal; ``--estimate`` overrides.
GPU_ESTIMATES = {"engine": 240.0, "engine-tuned": 150.0, "reproduce": 390.0, "report": 30.0, "ray": 90.0}
TINY_ESTIMATES = {"engine": 30.0, "engine-tuned": 20.0, "reproduce": 30.0, "report": 10.0, "ray": 60.0}
#: An untrained model with TBN statistics at sigma 0.25 (the bench's; speed does not depend on weights):
#: ``python -c MAKE_RUN ROOT ARCH``, in the commands' interpreter (the driver imports no torch).
MAKE_RUN = (
    "import sys; from pathlib import Path; sys.path.insert(0, 'bench'); "
    "from certify_throughput import make_run; make_run(Path(sys.argv[1]), sys.argv[2])"
)


# --- stage: engine table -------------------------------------------------------------------------


def engine_stage(s: Session) -> tuple[int, float]:
    out = s.results / "engine"
    a = s.args
    if s.cuda:
        parts = [
            "--parts",
            "gpu",
            "--gpu-images",
            str(a.engine_images),
            "--gpu-engine-images",
            str(a.engine_images),
            "--gpu-n",
            str(a.engine_n),
            "--images-per-pass",
            str(a.images_per_pass),
            "--rounds",
            str(a.rounds),
        ]
    else:  # the same engine rows and reference-style loop, on CPU
        parts = [
            "--parts",
            "cpu,engine",
            "--arch",
            "tiny",
            "--images",
            str(a.engine_images),
            "--n",
            str(a.engine_n),
            "--n0",
            "10",
            "--batch-size",
            "100",
            "--threads",
            "1",
            "--images-per-pass",
            "2",
            "--rounds",
            str(a.rounds),
        ]
    rc, secs = s.run("engine", [*s.python(), str(BENCH / "certify_throughput.py"), *parts, "--out", str(out)])
    if rc == 0 and not engine_rows(s.results):
        log("engine: the bench wrote no rows (no CUDA device there?): not marked done")
        rc = 1
    if rc == 0:
        finish(out, "engine", secs, s, command=f"bench/certify_throughput.py {' '.join(parts)}")
    return rc, secs


def engine_rows(results: Path) -> list[dict[str, Any]]:
    path = results / "engine" / "certify_throughput.json"
    if not path.is_file():
        return []
    report = json.loads(path.read_text())
    tuned = results / "engine-tuned" / "certify_throughput.json"
    if tuned.is_file():
        report["tuned"] = json.loads(tuned.read_text()).get("tuned", {})
    rows = []
    for section in ("gpu", "cpu", "engine", "tuned"):
        for r in report.get(section, {}).get("rows", []):
            spi = r.get("seconds_per_image") or (1 / r["images_per_s"] if r.get("images_per_s") else None)
            rows.append(
                {
                    "section": section,
                    "config": r["config"],
                    "seconds_per_image": spi,
                    "forward_passes_per_image": r.get("forward_passes_per_image"),
                    "gpu_hours_10k_images_per_sigma": r.get("gpu_hours_10k_images_per_sigma"),
                }
            )
    return rows


def tuned_stage(s: Session) -> tuple[int, float]:
    out = s.results / "engine-tuned"
    a = s.args
    sizes = (
        ["--arch", "resnet110", "--n0", "100", "--tuned-batch-size", "4000", "--compile", "inductor"]
        if s.cuda
        else ["--arch", "tiny", "--n0", "10", "--tuned-batch-size", "100", "--compile", "eager"]
    )
    parts = [
        "--parts",
        "tuned",
        "--tuned-device",
        a.device,
        "--tuned-images",
        str(a.engine_images),
        "--n",
        str(a.engine_n),
        "--images-per-pass",
        str(a.images_per_pass if s.cuda else 2),
        *sizes,
    ]
    rc, secs = s.run("engine-tuned", [*s.python(), str(BENCH / "certify_throughput.py"), *parts, "--out", str(out)])
    if rc == 0:
        finish(out, "engine-tuned", secs, s, command=f"bench/certify_throughput.py {' '.join(parts)}")
    return rc, secs


# --- stage: the fast reproduction ----------------------------------------------------------------


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text())


def _write_yaml(path: Path, body: dict[str, Any]) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _kept(path: Path) -> bool:
    """What a user keeps of a reproduction: results, not weights nor decoded-data caches."""
    if path.suffix in (".npz", ".npy"):
        return False
    return path.suffix != ".pt" or path.name == "bn_stats.pt"


def _copy_tree(src: Path, dst: Path, *, overwrite: bool) -> int:
    n = 0
    for p in src.rglob("*"):
        if p.is_file() and _kept(p):
            q = dst / p.relative_to(src)
            if overwrite or not q.exists():
                q.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, q)
                n += 1
    return n


class Reproduction:
    """The config's models as separate stages, the stored results kept under results/gpu/reproduce/<name>."""

    def __init__(self, s: Session) -> None:
        self.s = s
        self.base = _load_yaml(s.args.config)
        self.base["device"] = s.args.device
        self.name = self.base["name"]
        self.storage = s.work / "storage"
        self.stored = self.storage / "reproduce" / self.name  # where the stage records point
        self.kept = s.results / "reproduce" / self.name
        self.full = _write_yaml(s.work / "configs" / f"{self.name}.yaml", self.base)

    def models(self) -> list[str]:
        return [m["name"] for m in self.base["models"]]

    def sigmas(self) -> list[float]:
        return [float(x) for x in self.base.get("calibrate", {}).get("sigmas", [])]

    def restore(self) -> None:
        """Put the results of models finished in earlier calls back where their records point."""
        if self.kept.is_dir():
            n = _copy_tree(self.kept, self.stored, overwrite=False)
            if n:
                log(f"reproduce: {n} stored result files of earlier calls restored into {self.stored}")

    def model_stage(self, model: str) -> tuple[int, float]:
        one = {**self.base, "models": [m for m in self.base["models"] if m["name"] == model]}
        config = _write_yaml(self.s.work / "configs" / f"{self.name}-{model}.yaml", one)
        stages = [a for st in ("train", "calibrate", "certify", "evaluate") for a in ("--stage", st)]
        rc, secs = self.s.run(
            f"reproduce-{model}",
            [
                *self.s.python(),
                "-m",
                "tbn_ray",
                "reproduce",
                "--config",
                str(config),
                "--storage",
                str(self.storage),
                *stages,
                "--no-progress",
            ],
        )
        if rc == 0:
            for sub in (model, f"stages/{model}"):
                _copy_tree(self.stored / sub, self.kept / sub, overwrite=True)
            finish(
                self.s.results / f"reproduce-{model}",
                f"reproduce-{model}",
                secs,
                self.s,
                model=model,
                storage=str(self.storage),
                config=str(
                    self.s.args.config.relative_to(REPO)
                    if self.s.args.config.is_relative_to(REPO)
                    else self.s.args.config
                ),
            )
        return rc, secs

    def report_stage(self) -> tuple[int, float]:
        rc, secs = self.s.run(
            "report",
            [
                *self.s.python(),
                "-m",
                "tbn_ray",
                "reproduce",
                "--config",
                str(self.full),
                "--storage",
                str(self.storage),
                "--stage",
                "report",
                "--no-progress",
            ],
        )
        if rc == 0:
            for p in self.stored.iterdir():
                if p.is_file() and _kept(p):
                    shutil.copy2(p, self.kept / p.name)
            finish(
                self.s.results / "report",
                "report",
                secs,
                self.s,
                report=str((self.kept / "report.md").relative_to(self.s.results)),
            )
        return rc, secs


def report_figures(results: Path) -> dict[str, Any]:
    for path in (results / "reproduce").glob("*/report.json"):
        return json.loads(path.read_text())
    return {}


# --- stage: Ray actors -------------------------------------------------------------------------------


def _tsv(path: Path) -> dict[str, tuple[str, str]]:
    with path.open() as f:
        return {row["idx"]: (row["predict"], row["radius"]) for row in csv.DictReader(f, delimiter="\t")}


def _summary(output: Path) -> tuple[dict[str, Any], Path]:
    found = sorted(output.glob("*/sigma=*/summary.json"))
    if not found:
        raise FileNotFoundError(f"no summary.json under {output}")
    return json.loads(found[0].read_text()), found[0].parent


def _ray_model(s: Session, repro: Reproduction) -> Path | None:
    """A model trained in this call (its checkpoint is still here), with TBN statistics at sigma 0.25."""
    for model in repro.models():
        run = repro.stored / model
        if (run / "checkpoint.pt").is_file() and (run / "bn_stats.pt").is_file() and 0.25 in repro.sigmas():
            return run
    return None


def ray_stage(s: Session, repro: Reproduction) -> tuple[int, float]:
    a = s.args
    out = s.results / "ray"
    t0 = time.monotonic()
    run = _ray_model(s, repro)
    if run is None:  # none trained in this call: an untrained one (throughput does not depend on the weights)
        arch = "tiny" if a.tiny else "preact_resnet18"
        run = s.work / "ray-run" / arch
        if not (run / "bn_stats.pt").exists():
            rc, _ = s.run(
                "ray-make-run",
                [*s.python(), "-c", MAKE_RUN, str(run.parent), arch],
            )
            if rc:
                return rc, time.monotonic() - t0
    common = [
        "certify",
        str(run),
        "--sigma",
        "0.25",
        "--n0",
        "100" if s.cuda else "10",
        "--n",
        str(a.ray_n),
        "--skip",
        "20",
        "--max-images",
        str(a.ray_images),
        "--shards",
        str(a.ray_shards),
        "--batch-size",
        str(a.ray_batch_size),
        "--channels-last",
        "--fold-bn",
        "--no-progress",
    ]
    if s.cuda:
        common += ["--amp", "bf16"]
    local_out, ray_out = s.work / "ray-certify" / "local", s.work / "ray-certify" / "ray"
    for p in (local_out, ray_out):
        shutil.rmtree(p, ignore_errors=True)
    rc, local_s = s.run(
        "ray-local",
        [*s.python(), "-m", "tbn_ray", *common, "--local", "--device", a.device, "--output", str(local_out)],
    )
    if rc:
        return rc, time.monotonic() - t0
    env = dict(s.env)
    ray_site = s.ray_path()
    if ray_site:
        env["PYTHONPATH"] = os.pathsep.join([ray_site, env["PYTHONPATH"]])
    pool = ["--actors", "1", "--gpus-per-actor", "1" if s.cuda else "0", "--cpus-per-actor", str(a.ray_cpus_per_actor)]
    rc, ray_s = s.run("ray-actors", [*s.python(), "-m", "tbn_ray", *common, *pool, "--output", str(ray_out)], env=env)
    if rc:
        return rc, time.monotonic() - t0
    local_sum, local_dir = _summary(local_out)
    ray_sum, ray_dir = _summary(ray_out)
    local_rows, ray_rows = _tsv(local_dir / "certify.tsv"), _tsv(ray_dir / "certify.tsv")
    same = sum(local_rows.get(k) == v for k, v in ray_rows.items())
    ray_log = (s.results / "logs" / "ray-actors.log").read_text(errors="replace")
    body = {
        "ray": s.ray_note,
        "dashboard": next((line.strip() for line in ray_log.splitlines() if "dashboard" in line), None),
        "model": local_sum["params"].get("model"),
        "run": str(run),
        "trained_epochs": local_sum["params"].get("epoch"),
        "device": a.device,
        "images": len(ray_rows),
        "n": a.ray_n,
        "shards": a.ray_shards,
        "command_seconds": {"local": round(local_s, 2), "ray": round(ray_s, 2)},
        "shard_span_seconds": {"local": local_sum["params"]["wall_seconds"], "ray": ray_sum["params"]["wall_seconds"]},
        "compute_seconds": {
            "local": local_sum["params"]["compute_seconds"],
            "ray": ray_sum["params"]["compute_seconds"],
        },
        "overhead_end_to_end": ray_s / local_s - 1,
        "overhead_shard_span": ray_sum["params"]["wall_seconds"] / local_sum["params"]["wall_seconds"] - 1,
        "identical_predictions_radii": same,
        "certified_accuracy": {"local": local_sum.get("certified_accuracy"), "ray": ray_sum.get("certified_accuracy")},
        "command": "tbn-ray "
        + " ".join(common[:1] + ["RUN"] + common[2:])
        + " [--local --device D | "
        + " ".join(pool)
        + "]",
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray.json").write_text(json.dumps(body, indent=2, default=str) + "\n")
    (out / "certify-local.tsv").write_text((local_dir / "certify.tsv").read_text())
    (out / "certify-ray.tsv").write_text((ray_dir / "certify.tsv").read_text())
    secs = time.monotonic() - t0
    finish(out, "ray", secs, s)
    return 0, secs


# --- the summary --------------------------------------------------------------------------------


def summary(s: Session, status: dict[str, str]) -> str:
    lines = [
        f"# GPU session ({'CPU rehearsal, --tiny' if s.args.tiny else s.args.device})",
        "",
        "| stage | status | seconds |",
        "|---|---|---|",
    ]
    for stage, st in status.items():
        rec = done(s.results / stage)
        lines.append(f"| {stage} | {st} | {rec['seconds'] if rec else '-'} |")
    rows = engine_rows(s.results)
    if rows:
        lines += [
            "",
            "## Engine table (`engine/certify_throughput.md`)",
            "",
            "| part | config | s / image | forward passes / image | GPU-hours, 10k images per sigma |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            gh = r["gpu_hours_10k_images_per_sigma"]
            fp = r["forward_passes_per_image"]
            lines.append(
                f"| {r['section']} | {r['config']} | {r['seconds_per_image']:.3f} | {'-' if fp is None else f'{fp:,.0f}'} "
                f"| {'-' if gh is None else f'{gh:.2f}'} |"
            )
    rep = report_figures(s.results)
    if rep:
        lines += ["", f"## Reproduction (`reproduce/{rep.get('name', '')}/report.md`)", ""]
        t = rep.get("totals", {})
        lines += ["| model | stage | device | seconds |", "|---|---|---|---|"]
        for name, m in rep.get("models", {}).items():
            lines += [
                f"| {name} | {stage} | {m['devices'][stage]} | {secs:.1f} |"
                for stage, secs in m.get("seconds", {}).items()
            ]
        if t:
            lines += [
                "",
                f"Total {t['seconds']:.0f} s of device time, {t['gpu_hours']:.3f} GPU-hours, "
                f"${t['usd']:.2f} at ${rep['cost']['price_per_gpu_hour']:.2f} per GPU-hour.",
            ]
    ray_json = s.results / "ray" / "ray.json"
    if ray_json.is_file():
        r = json.loads(ray_json.read_text())
        lines += [
            "",
            "## Ray actors (`ray/ray.json`)",
            "",
            f"{r['images']} images, n={r['n']}, {r['shards']} shards, {r['ray']}: in-process {r['command_seconds']['local']:.1f} s, "
            f"Ray {r['command_seconds']['ray']:.1f} s ({100 * r['overhead_end_to_end']:+.0f}% end to end"
            + (
                f", {100 * r['overhead_shard_span']:+.0f}% over the shard span"
                if r["overhead_shard_span"] is not None
                else ""
            )
            + f"); identical predictions and radii: {r['identical_predictions_radii']}/{r['images']}.",
        ]
    elif "ray" in status and status["ray"].startswith("skipped"):
        lines += ["", f"Ray: {status['ray']}."]
    return "\n".join(lines) + "\n"


PAPER_FAST = REPO / "configs" / "paper-fast.yaml"
TINY_CONFIG = BENCH / "gpu-tiny.yaml"


def table(s: Session, repro: Reproduction) -> list[Stage]:
    """The stages in the order they run."""

    def models_left() -> str | None:
        return "waits for the models" if any(not done(s.results / f"reproduce-{m}") for m in repro.models()) else None

    def no_ray() -> str | None:
        python = s.args.python
        return None if s.ray_note else f"skipped: no Ray for {python} (carry ray-{target_tag(python)}.tar.xz)"

    return [
        Stage("engine", "engine", lambda: engine_stage(s)),
        Stage("engine-tuned", "engine-tuned", lambda: tuned_stage(s)),
        *[Stage(f"reproduce-{m}", "reproduce", (lambda m=m: repro.model_stage(m))) for m in repro.models()],
        Stage("report", "report", repro.report_stage, models_left),
        Stage("ray", "ray", lambda: ray_stage(s, repro), no_ray),
    ]


def run_session(args: argparse.Namespace) -> int:
    stop_on_sigterm()
    if args.tiny and args.config == PAPER_FAST:
        args.config = TINY_CONFIG
    s = setup(args, TINY_ESTIMATES if args.tiny else GPU_ESTIMATES)
    repro = Reproduction(s)
    repro.restore()
    status, failed = run_stages(s, table(s, repro), set(args.stages.split(",")) if args.stages else None)
    text = summary(s, status)
    (s.results / "summary.md").write_text(text)
    (s.results / "summary.json").write_text(
        json.dumps({"status": status, "engine": engine_rows(s.results)}, indent=2) + "\n"
    )
    if args.pack:
        log(f"packed: {pack(s, args.pack)}")
    print(text)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    r = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--device", default="cuda", help="cuda (the GPU machine) or cpu (the rehearsal)")
    r.add_argument("--tiny", action="store_true", help="the rehearsal's sizes and bench/gpu-tiny.yaml")
    r.add_argument(
        "--budget", type=float, default=540.0, help="seconds this call may take; stages are started only if they fit"
    )
    r.add_argument("--results", type=Path, default=REPO / "results" / "gpu")
    r.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/tbn-gpu-session"),
        help="scratch (weights, caches); the same path every call",
    )
    r.add_argument(
        "--carry",
        type=Path,
        default=REPO / ".gpu-carry",
        help="what bench/gpu_carry.py made (wheels, data, trimmed Ray)",
    )
    r.add_argument("--pack", type=Path, default=None, help="also write gpu-results.tar.gz and summary.md here")
    r.add_argument(
        "--stages", default=None, help="comma list of stages or groups (engine, reproduce, report, ray); default all"
    )
    r.add_argument("--config", type=Path, default=PAPER_FAST)
    r.add_argument("--python", default=sys.executable, help="the interpreter of the commands (python3 with torch)")
    r.add_argument("--estimate", action="append", default=[], help="KIND=SECONDS, overrides a stage's estimate")
    r.add_argument(
        "--installed-ray", action="store_true", help="use the installed Ray even if a trimmed one was carried"
    )
    r.add_argument("--engine-images", type=int, default=None)
    r.add_argument("--engine-n", type=int, default=None)
    r.add_argument("--images-per-pass", type=int, default=8)
    r.add_argument("--rounds", type=int, default=1)
    r.add_argument("--ray-images", type=int, default=None)
    r.add_argument("--ray-n", type=int, default=None)
    r.add_argument("--ray-shards", type=int, default=None)
    r.add_argument("--ray-batch-size", type=int, default=None)
    r.add_argument("--ray-cpus-per-actor", type=int, default=None)
    args = r.parse_args(argv)
    sizes = {
        "engine_images": (16, 2),
        "engine_n": (100_000, 100),
        "ray_images": (32, 4),
        "ray_n": (100_000, 100),
        "ray_shards": (8, 2),
        "ray_batch_size": (10_000, 100),
        "ray_cpus_per_actor": (8, 1),
    }
    for name, (gpu, tiny) in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else gpu)
    return run_session(args)


if __name__ == "__main__":
    sys.exit(main())
