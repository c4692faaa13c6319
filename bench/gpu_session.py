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
2. ``reproduce-<model>``, one per model of ``configs/paper-fast.yaml``: ``tbn-ray reproduce`` up to
   ``evaluate`` for that model alone. Its stored results (everything but the weights) are kept;
   a later call puts them back where the stage records point, so
3. ``report`` (``tbn-ray reproduce --stage report``, the report with its cost table) can run in
   any later call.
4. ``ray``: ``tbn-ray certify`` on Ray actors with ``--gpus-per-actor 1`` and ``--local`` in this
   process, same images: overhead and agreement. Skipped where Ray cannot be imported (a trimmed
   Ray, ``bench/ray_trim.py``, is unpacked from the carry folder when it is there).

A stage starts only when its estimated time fits the budget left (``--budget``); one that still
overruns is stopped with SIGTERM at the deadline and is redone by the next call. The driver
imports neither torch nor Ray.

    python3 bench/gpu_session.py prepare                    # here: fill .gpu-carry/ (wheels, data, trimmed Ray)
    python3 bench/gpu_session.py run --budget 540 --pack DIR   # on the GPU machine
    python3 bench/gpu_session.py run --device cpu --tiny       # the CPU rehearsal (seconds)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"

#: pydantic and what it needs (the GPU machine has none of it), at the versions installed here.
PYDANTIC_WHEELS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")
RAY_VERSION = "2.60.0"
#: Ray's dependencies the GPU machine lacks: jsonschema for ray.init; the rest for the dashboard
#: (``ray.dashboard.optional_deps``), which tbn-ray always starts; protobuf goes with them. At the
#: versions installed here (the project's tested set).
RAY_EXTRA_WHEELS = (
    "jsonschema",
    "jsonschema-specifications",
    "referencing",
    "rpds-py",
    "aiohttp-cors",
    "opencensus",
    "opencensus-context",
    "six",
    "opentelemetry-api",
    "opentelemetry-sdk",
    "opentelemetry-proto",
    "opentelemetry-exporter-prometheus",
    "opentelemetry-semantic-conventions",
    "googleapis-common-protos",
    "protobuf",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
#: What travels to the GPU machine must stay under this (the call's limit on the working tree).
CARRY_LIMIT = 64 * 2**20

#: Estimated seconds per stage on the GPU (one H200) and in the CPU rehearsal; ``--estimate`` overrides.
GPU_ESTIMATES = {"engine": 240.0, "engine-tuned": 150.0, "reproduce": 390.0, "report": 30.0, "ray": 90.0}
TINY_ESTIMATES = {"engine": 30.0, "engine-tuned": 20.0, "reproduce": 30.0, "report": 10.0, "ray": 60.0}


def log(msg: str) -> None:
    print(f"[gpu-session {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def python_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


# --- prepare (here, with network) ------------------------------------------------------------------


def pinned(names: Sequence[str]) -> list[str]:
    """``name==version`` at the version installed in this environment (the one the project is tested with)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in names:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            raise SystemExit(
                f"{name} is not installed here: install the project's environment first (pip install -e '.[test]')"
            ) from None
    return out


def _download(names: Sequence[str], dest: Path, python_version: str) -> None:
    if dest.exists():
        shutil.rmtree(dest)  # one version of each: two stop the install there
    dest.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        *[a for p in PLATFORMS for a in ("--platform", p)],
        "-d",
        str(dest),
        *names,
    ]
    subprocess.run(cmd, check=True)


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def prepare(args: argparse.Namespace) -> None:
    """Fill the carry folder: pydantic wheels for the target Python, the offline data, the trimmed Ray."""
    carry: Path = args.carry
    tag = f"cp{args.python_version.replace('.', '')}"
    _download(pinned(PYDANTIC_WHEELS), carry / "wheels", args.python_version)
    data = args.shared_data or _find_shared_data()
    if data is None:
        raise SystemExit("no shared/data found: pass --shared-data")
    if not (carry / "data").exists():
        shutil.copytree(data, carry / "data", ignore=shutil.ignore_patterns("__pycache__"))
        for p in (carry / "data", *(carry / "data").rglob("*")):
            p.chmod(p.stat().st_mode | 0o200)  # shared/ is read-only; the copy need not be
    if not args.no_ray and not (carry / f"ray-{tag}.tar.xz").is_file():
        sys.path.insert(0, str(BENCH))
        import ray_trim

        wheels = carry.parent / f"{carry.name}-build" / tag
        _download([f"ray=={RAY_VERSION}"], wheels / "ray", args.python_version)
        _download(pinned(RAY_EXTRA_WHEELS), wheels / "extras", args.python_version)
        archive = carry / f"ray-{tag}.tar.xz"
        sizes = ray_trim.trim(
            next((wheels / "ray").glob("ray-*.whl")), archive, extras=tuple(sorted((wheels / "extras").glob("*.whl")))
        )
        (carry / f"ray-{tag}.json").write_text(json.dumps(sizes, indent=2) + "\n")
        log(
            f"trimmed Ray: {sizes['archive_bytes'] / 2**20:.1f} MiB packed, {sizes['trimmed_bytes'] / 2**20:.1f} MiB unpacked "
            f"(wheel {sizes['wheel_bytes'] / 2**20:.1f} MiB)"
        )
    total = _tree_bytes(carry)
    log(f"{carry}: {total / 2**20:.1f} MiB to carry (limit {CARRY_LIMIT / 2**20:.0f} MiB with the working tree)")
    if total > CARRY_LIMIT:
        raise SystemExit(f"{carry} is {total / 2**20:.1f} MiB: more than a call can carry")


def _find_shared_data() -> Path | None:
    env = os.environ.get("TBN_SHARED_DATA")
    if env and Path(env).is_dir():
        return Path(env)
    for parent in (REPO, *REPO.parents):
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return None


# --- the session -------------------------------------------------------------------------------


@dataclass
class Session:
    """One call: where things are, the environment the commands get, the deadline."""

    args: argparse.Namespace
    results: Path
    work: Path
    deadline: float
    env: dict[str, str] = field(default_factory=dict)
    ray_archive: Path | None = None
    ray_note: str = ""

    def ray_path(self) -> str | None:
        """The trimmed Ray's folder for PYTHONPATH, unpacked on first use (xz: seconds)."""
        if self.ray_archive is None:
            return None
        sys.path.insert(0, str(BENCH))
        import ray_trim

        target = self.work / "ray"
        if not (target / "site" / "ray").is_dir():
            t0 = time.monotonic()
            ray_trim.unpack(self.ray_archive, target)
            log(f"trimmed Ray unpacked from {self.ray_archive.name} in {time.monotonic() - t0:.1f} s")
        return str(target / "site")

    @property
    def cuda(self) -> bool:
        return self.args.device.startswith("cuda")

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def estimate(self, kind: str) -> float:
        """``--estimate`` if given, else 1.1x the longest finished stage of this kind (a model measured
        in an earlier call sizes the next), else the table's figure."""
        given = dict(item.partition("=")[::2] for item in self.args.estimate)
        if kind in given:
            return float(given[kind])
        measured = [
            rec["seconds"]
            for p in sorted(self.results.glob(f"{kind}*/stage.json"))
            if (rec := json.loads(p.read_text())).get("status") == "done" and rec.get("tiny") == self.args.tiny
        ]
        if measured:
            return 1.1 * max(measured)
        return (TINY_ESTIMATES if self.args.tiny else GPU_ESTIMATES)[kind]

    def python(self) -> list[str]:
        return [self.args.python]

    def run(self, name: str, cmd: list[str], *, env: dict[str, str] | None = None) -> tuple[int, float]:
        """Run one command under the deadline, its output in logs/<name>.log; returns (exit status, seconds)."""
        logs = self.results / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        left = self.remaining()
        log(f"{name}: {' '.join(cmd)}  ({left:.0f} s left)")
        t0 = time.monotonic()
        with (logs / f"{name}.log").open("w") as out:
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=env or self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                rc = proc.wait(timeout=max(1.0, left))
            except BaseException as e:  # a stop of this driver stops the command (its own process group) too
                if not isinstance(e, subprocess.TimeoutExpired):
                    os.killpg(proc.pid, signal.SIGTERM)
                    raise
                log(f"{name}: budget reached, stopping it (SIGTERM); the next call does it again")
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    rc = proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    rc = proc.wait()
                rc = rc if rc else -signal.SIGTERM
        seconds = time.monotonic() - t0
        if rc:
            tail = (logs / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
            log(f"{name}: exit status {rc} after {seconds:.0f} s; last lines:\n    " + "\n    ".join(tail))
        return rc, seconds


def setup(args: argparse.Namespace) -> Session:
    """The environment: pydantic from the carried wheels where missing, the data, the caches, Ray if any."""
    results, work = args.results.resolve(), args.work.resolve()
    results.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    s = Session(args, results, work, time.monotonic() + args.budget)
    if s.cuda:
        probe = subprocess.run(
            [args.python, "-c", "import torch; raise SystemExit(not torch.cuda.is_available())"], capture_output=True
        )
        if probe.returncode:
            raise SystemExit(
                f"--device {args.device}: {args.python} sees no CUDA device (use --device cpu for the rehearsal)"
            )
    env = dict(os.environ)
    paths = [str(REPO)]
    carry = args.carry.resolve() if args.carry else None
    if subprocess.run([args.python, "-c", "import pydantic"], capture_output=True).returncode:
        wheels = sorted((carry / "wheels").glob("*.whl")) if carry else []
        if not wheels:
            raise SystemExit(
                f"{args.python} has no pydantic and no wheels were carried: run `bench/gpu_session.py prepare` first"
            )
        site = work / "site"
        subprocess.run(
            [
                args.python,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--upgrade",
                "--target",
                str(site),
                *map(str, wheels),
            ],
            check=True,
        )
        paths.append(str(site))
        log(f"pydantic installed from {len(wheels)} carried wheels into {site}")
    if carry and (carry / "data").is_dir():
        env["TBN_SHARED_DATA"] = str(carry / "data")
    env["TBN_CACHE"] = str(work / "cache")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("RAY_AUTH_MODE", "disabled")
    s.env = env
    archive = carry / f"ray-{_target_tag(args.python)}.tar.xz" if carry else None
    if archive and archive.is_file() and not args.installed_ray:
        s.ray_archive, s.ray_note = archive, f"trimmed Ray from {archive.name}"
    elif not subprocess.run(
        [args.python, "-c", "import importlib.util as u; raise SystemExit(u.find_spec('ray') is None)"],
        env=env,
        capture_output=True,
    ).returncode:
        s.ray_note = "the installed Ray"
    return s


def _target_tag(python: str) -> str:
    out = subprocess.run(
        [python, "-c", "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or python_tag()


def _done(folder: Path) -> dict[str, Any] | None:
    marker = folder / "stage.json"
    if marker.is_file():
        rec = json.loads(marker.read_text())
        if rec.get("status") == "done":
            return rec
    return None


def _finish(folder: Path, stage: str, seconds: float, s: Session, **extra: Any) -> dict[str, Any]:
    rec = {
        "stage": stage,
        "status": "done",
        "seconds": round(seconds, 1),
        "device": s.args.device,
        "tiny": s.args.tiny,
        "machine": platform.node(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stage.json").write_text(json.dumps(rec, indent=2) + "\n")
    return rec


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
        _finish(out, "engine", secs, s, command=f"bench/certify_throughput.py {' '.join(parts)}")
    return rc, secs


def engine_rows(results: Path) -> list[dict[str, Any]]:
    path = results / "engine" / "certify_throughput.json"
    if not path.is_file():
        return []
    report = json.loads(path.read_text())
    tuned = results / "engine-tuned" / "tuned.json"
    if tuned.is_file():
        report["tuned"] = json.loads(tuned.read_text())
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


def tuned_rows(args: argparse.Namespace) -> None:
    """The tuned engine through tbn-ray's own in-process certification (what ``tbn-ray certify --local``
    runs): packed, bf16, channels-last, BN folded, cuDNN autotuning; then with torch.compile; then
    with the adaptive sample size. The bench's engine rows are fp32 without these options."""
    import torch

    sys.path.insert(0, str(BENCH))
    from certify_throughput import make_run

    from tbn_ray.config import CertifyConfig
    from tbn_ray.jobs.certify import plan_certify, run_plan_in_process
    from tbn_ray.store.storage import Storage

    device = torch.device(args.device)
    run = make_run(args.root / "run", args.arch)
    tuned = {"images_per_pass": args.images_per_pass, "cudnn_autotune": True}
    configs = {
        "tuned fixed n (packed, bf16, channels-last, BN folded, cuDNN autotuning)": tuned,
        f"tuned fixed n + torch.compile ({args.compile})": {**tuned, "compile": args.compile},
        "tuned + adaptive sample size": {**tuned, "adaptive": True},
    }
    rows = []
    for i, (name, options) in enumerate(configs.items()):
        cfg = CertifyConfig(
            sigmas=(0.25,),
            n0=args.n0,
            n=args.n,
            batch_size=args.batch_size,
            max_images=args.images,
            shards=1,
            channels_last=True,
            fold_bn=True,
            amp="bf16",
            **options,
        )
        plan = plan_certify(run, cfg, Storage.open(args.root / f"out-{i}"), device_type=device.type)
        t0 = time.perf_counter()
        location = run_plan_in_process(plan, device, progress=False).outputs[0].location
        wall = time.perf_counter() - t0
        summary = Storage.open(location).read_json("summary.json")
        spi = summary["params"]["compute_seconds"] / summary["images"]
        rows.append(
            {
                "config": name,
                "seconds_per_image": spi,
                "wall_seconds": wall,
                "forward_passes_per_image": summary.get("forward_passes_per_image", args.n0 + args.n),
                "gpu_hours_10k_images_per_sigma": spi * 10_000 / 3600 if device.type == "cuda" else None,
                "certified_accuracy": summary["certified_accuracy"],
                "images": summary["images"],
                "amp": summary["params"]["amp"],
                "run_id": summary["params"]["run_id"],
            }
        )
        print(
            f"{name}: {spi:.3f} s/image, {rows[-1]['forward_passes_per_image']:,.0f} passes/image ({wall:.1f} s in all)",
            flush=True,
        )
    body = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "model": f"{args.arch} (untrained)",
        "n0": args.n0,
        "n": args.n,
        "images": args.images,
        "rows": rows,
        "note": "seconds per image: compute time of the certification (first shard included: compilation, cuDNN search)",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tuned.json").write_text(json.dumps(body, indent=2) + "\n")
    lines = [
        f"# Tuned engine ({body['device']}, {body['model']}, {args.images} images, n0={args.n0}, n={args.n})",
        "",
        "| config | s / image | forward passes / image | GPU-hours, 10k images per sigma |",
        "|---|---|---|---|",
    ]
    for r in rows:
        gh = r["gpu_hours_10k_images_per_sigma"]
        lines.append(
            f"| {r['config']} | {r['seconds_per_image']:.3f} | {r['forward_passes_per_image']:,.0f} | {'-' if gh is None else f'{gh:.2f}'} |"
        )
    (args.out / "tuned.md").write_text("\n".join(lines) + "\n")


def tuned_stage(s: Session) -> tuple[int, float]:
    out = s.results / "engine-tuned"
    a = s.args
    sizes = (
        ["--arch", "resnet110", "--n0", "100", "--batch-size", "4000", "--compile", "inductor"]
        if s.cuda
        else ["--arch", "tiny", "--n0", "10", "--batch-size", "100", "--compile", "eager"]
    )
    cmd = [
        *s.python(),
        str(Path(__file__).resolve()),
        "engine-tuned",
        "--device",
        a.device,
        "--images",
        str(a.engine_images),
        "--n",
        str(a.engine_n),
        "--images-per-pass",
        str(a.images_per_pass if s.cuda else 2),
        *sizes,
        "--root",
        str(s.work / "engine-tuned"),
        "--out",
        str(out),
    ]
    rc, secs = s.run("engine-tuned", cmd)
    if rc == 0:
        _finish(out, "engine-tuned", secs, s)
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
            _finish(
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
            _finish(
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


def make_untrained_run(root: Path, arch: str) -> None:
    """An untrained ``arch`` with TBN statistics at sigma 0.25 (the bench's; speed does not depend on weights)."""
    sys.path.insert(0, str(BENCH))
    from certify_throughput import make_run

    make_run(root, arch)


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
                [*s.python(), str(Path(__file__).resolve()), "make-run", "--root", str(run.parent), "--arch", arch],
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
    _finish(out, "ray", secs, s)
    return 0, secs


# --- the run and its summary --------------------------------------------------------------------


def plan(s: Session, repro: Reproduction) -> list[tuple[str, str, Any]]:
    """(stage, estimate kind, function) in the order they run."""
    stages: list[tuple[str, str, Any]] = [
        ("engine", "engine", lambda: engine_stage(s)),
        ("engine-tuned", "engine-tuned", lambda: tuned_stage(s)),
    ]
    stages += [(f"reproduce-{m}", "reproduce", (lambda m=m: repro.model_stage(m))) for m in repro.models()]
    stages += [("report", "report", repro.report_stage), ("ray", "ray", lambda: ray_stage(s, repro))]
    return stages


def summary(s: Session, status: dict[str, str]) -> str:
    lines = [
        f"# GPU session ({'CPU rehearsal, --tiny' if s.args.tiny else s.args.device})",
        "",
        "| stage | status | seconds |",
        "|---|---|---|",
    ]
    for stage, st in status.items():
        rec = _done(s.results / stage)
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


def pack(s: Session, dest: Path) -> Path:
    """One tar.gz of the results folder (the device's return limit: few files, two folders deep)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / "gpu-results.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(s.results, arcname=s.results.name)
    shutil.copy2(s.results / "summary.md", dest / "summary.md")
    return archive


def _stop(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def run_session(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _stop)
    if args.tiny and args.config == PAPER_FAST:
        args.config = TINY_CONFIG
    s = setup(args)
    repro = Reproduction(s)
    repro.restore()
    wanted = set(args.stages.split(",")) if args.stages else None
    status: dict[str, str] = {}
    failed = False
    for stage, kind, fn in plan(s, repro):
        group = "reproduce" if stage.startswith("reproduce-") else stage
        if wanted is not None and stage not in wanted and group not in wanted:
            continue
        if _done(s.results / stage):
            status[stage] = "done earlier"
            continue
        if stage == "report" and any(not _done(s.results / f"reproduce-{m}") for m in repro.models()):
            status[stage] = "waits for the models"
            continue
        if stage == "ray" and not s.ray_note:
            status[stage] = f"skipped: no Ray for {args.python} (carry ray-{_target_tag(args.python)}.tar.xz)"
            continue
        est, left = s.estimate(kind), s.remaining()
        if est > left:
            status[stage] = f"left for the next call (estimate {est:.0f} s, {left:.0f} s left)"
            log(f"{stage}: {status[stage]}")
            continue
        rc, secs = fn()
        status[stage] = "done" if rc == 0 else f"failed (exit {rc}, {secs:.0f} s; logs/{stage}.log)"
        failed |= rc != 0
    text = summary(s, status)
    (s.results / "summary.md").write_text(text)
    (s.results / "summary.json").write_text(
        json.dumps({"status": status, "engine": engine_rows(s.results)}, indent=2) + "\n"
    )
    if args.pack:
        log(f"packed: {pack(s, args.pack)}")
    print(text)
    return 1 if failed else 0


PAPER_FAST = REPO / "configs" / "paper-fast.yaml"
TINY_CONFIG = BENCH / "gpu-tiny.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="fill the carry folder (needs the network)")
    p.add_argument("--carry", type=Path, default=REPO / ".gpu-carry")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    p.add_argument(
        "--shared-data", type=Path, default=None, help="shared/data to copy (default: found above the checkout)"
    )
    p.add_argument("--no-ray", action="store_true", help="no trimmed Ray")
    r = sub.add_parser("run", help="run the stages not finished yet")
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
        "--carry", type=Path, default=REPO / ".gpu-carry", help="what prepare made (wheels, data, trimmed Ray)"
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
    t = sub.add_parser("engine-tuned", help=argparse.SUPPRESS)
    t.add_argument("--device", required=True)
    t.add_argument("--arch", required=True)
    t.add_argument("--images", type=int, required=True)
    t.add_argument("--n0", type=int, required=True)
    t.add_argument("--n", type=int, required=True)
    t.add_argument("--batch-size", type=int, required=True)
    t.add_argument("--images-per-pass", type=int, required=True)
    t.add_argument("--compile", required=True)
    t.add_argument("--root", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    m = sub.add_parser("make-run", help=argparse.SUPPRESS)
    m.add_argument("--root", type=Path, required=True)
    m.add_argument("--arch", required=True)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args)
        return 0
    if args.command == "engine-tuned":
        tuned_rows(args)
        return 0
    if args.command == "make-run":
        make_untrained_run(args.root, args.arch)
        return 0
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
