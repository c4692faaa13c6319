"""The small runner of ``bench/gpu_session.py``: stages in order under one deadline, each a
subprocess in its own process group, skipped when finished in an earlier call, started only when
its estimate fits the time left, stopped with SIGTERM at the deadline. It imports neither torch
nor Ray: the stages' commands do."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpu_carry import python_tag

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


def log(msg: str) -> None:
    print(f"[gpu-session {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Session:
    """One call: where things are, the environment the commands get, the deadline."""

    args: argparse.Namespace
    results: Path
    work: Path
    deadline: float
    estimates: dict[str, float]
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
        return self.estimates[kind]

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


def setup(args: argparse.Namespace, estimates: dict[str, float]) -> Session:
    """The environment: pydantic from the carried wheels where missing, the data, the caches, Ray if any."""
    results, work = args.results.resolve(), args.work.resolve()
    results.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    s = Session(args, results, work, time.monotonic() + args.budget, estimates)
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
                f"{args.python} has no pydantic and no wheels were carried: run `bench/gpu_carry.py` first"
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
    archive = carry / f"ray-{target_tag(args.python)}.tar.xz" if carry else None
    if archive and archive.is_file() and not args.installed_ray:
        s.ray_archive, s.ray_note = archive, f"trimmed Ray from {archive.name}"
    elif not subprocess.run(
        [args.python, "-c", "import importlib.util as u; raise SystemExit(u.find_spec('ray') is None)"],
        env=env,
        capture_output=True,
    ).returncode:
        s.ray_note = "the installed Ray"
    return s


def target_tag(python: str) -> str:
    out = subprocess.run(
        [python, "-c", "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or python_tag()


def done(folder: Path) -> dict[str, Any] | None:
    marker = folder / "stage.json"
    if marker.is_file():
        rec = json.loads(marker.read_text())
        if rec.get("status") == "done":
            return rec
    return None


def finish(folder: Path, stage: str, seconds: float, s: Session, **extra: Any) -> dict[str, Any]:
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


@dataclass(frozen=True)
class Stage:
    """One row of the stage table: its name (also its folder), the kind its estimate is read
    under, what runs it (exit status, seconds), and why it cannot start now (``None``: it can)."""

    name: str
    kind: str
    run: Callable[[], tuple[int, float]]
    blocked: Callable[[], str | None] = lambda: None

    @property
    def group(self) -> str:
        return self.name.partition("-")[0] if self.kind == "reproduce" else self.name


def run_stages(s: Session, table: list[Stage], wanted: set[str] | None) -> tuple[dict[str, str], bool]:
    """The stages of ``table`` (those ``wanted``, by name or group) not finished yet, in order, each
    when its estimate fits the time left; returns each stage's status, and whether one failed."""
    status: dict[str, str] = {}
    failed = False
    for stage in table:
        if wanted is not None and stage.name not in wanted and stage.group not in wanted:
            continue
        if done(s.results / stage.name):
            status[stage.name] = "done earlier"
            continue
        reason = stage.blocked()
        if reason is not None:
            status[stage.name] = reason
            continue
        est, left = s.estimate(stage.kind), s.remaining()
        if est > left:
            status[stage.name] = f"left for the next call (estimate {est:.0f} s, {left:.0f} s left)"
            log(f"{stage.name}: {status[stage.name]}")
            continue
        rc, secs = stage.run()
        status[stage.name] = "done" if rc == 0 else f"failed (exit {rc}, {secs:.0f} s; logs/{stage.name}.log)"
        failed |= rc != 0
    return status, failed


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


def stop_on_sigterm() -> None:
    """A SIGTERM to the driver ends it as an exception, so that the running command is stopped too."""

    def _stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _stop)
