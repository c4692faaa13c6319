"""Fill the carry folder a GPU call takes along: the GPU machine is bare (no Ray, no pydantic, no
network), so what ``bench/gpu_session.py`` needs there travels with the checkout, under 64 MiB.

    python bench/gpu_carry.py                          # --python-version 3.12: the GPU machine's
    python bench/gpu_carry.py --python-version 3.11 --carry .gpu-carry-build/cp311   # this machine's, for the test

It downloads pydantic's wheels for the target Python (at the versions installed here), copies
``shared/data`` and builds a trimmed Ray (``bench/ray_trim.py``); needs the network.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

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


def log(msg: str) -> None:
    print(f"[gpu-carry {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def python_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--carry", type=Path, default=REPO / ".gpu-carry")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    parser.add_argument(
        "--shared-data", type=Path, default=None, help="shared/data to copy (default: found above the checkout)"
    )
    parser.add_argument("--no-ray", action="store_true", help="no trimmed Ray")
    prepare(parser.parse_args(argv))


if __name__ == "__main__":
    main()
