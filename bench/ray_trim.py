"""A trimmed, compressed Ray install small enough to carry to a machine without Ray or network.

Ray's wheel (about 79 MB, 200 MB unpacked) is mostly native binaries with debug symbols, the
Java jars, the dashboard's front-end build and libraries tbn-ray never imports (RLlib, Serve,
Data, LLM). What ``ray.init`` and actors need is the core: ``_raylet.so``, the GCS server, the
raylet, the Python package around them, and the runtime-env agent's own aiohttp copy. This
script unpacks a Ray wheel, drops the rest, strips the binaries' symbols and packs the result
as one ``tar.xz`` whose top folder goes on ``PYTHONPATH``.

    python bench/ray_trim.py WHEEL OUT.tar.xz [--keep-dashboard-client] [--json sizes.json]

Ray's Python dependencies that the target machine lacks (jsonschema for the core; opencensus,
opentelemetry, aiohttp_cors and Google's common protos for the dashboard) are added as wheels
(``--extra WHEEL``, repeatable): their files are unpacked beside ``ray/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

#: Top-level subpackages of ``ray`` that neither ``ray.init``, actors nor tbn-ray's certify need.
DROP_PACKAGES = ("rllib", "serve", "data", "llm", "jars", "workflow", "cpp", "tests")
#: The dashboard's compiled front end, replaced by a one-page stub: the dashboard process refuses
#: to start without ``client/build`` (and its ``static/``), but its HTTP and state APIs need none of it.
DASHBOARD_CLIENT = "dashboard/client"
STUB_INDEX = (
    "<!doctype html><title>Ray dashboard</title><p>The dashboard's front end is not installed "
    "(trimmed Ray); its HTTP and state APIs are served.</p>\n"
)
#: File name suffixes never needed at run time.
DROP_SUFFIXES = (".pyi", ".pxd", ".h", ".hpp", ".pyx")


def _extract(wheel: Path, target: Path) -> None:
    """Unzip keeping the files' modes (zipfile drops them: the GCS server and raylet must stay executable)."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            path = Path(z.extract(info, target))
            mode = (info.external_attr >> 16) & 0o777
            if mode and not info.is_dir():
                path.chmod(mode)


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def trim(
    wheel: Path,
    out: Path,
    *,
    keep_dashboard_client: bool = False,
    extras: tuple[Path, ...] = (),
    strip: str | None = "strip",
) -> dict[str, object]:
    """Unpack ``wheel`` (and ``extras``), remove what is not needed, strip ELF symbols, write ``out``
    (tar.xz, top folder ``site/``); returns the sizes and what was removed."""
    with tempfile.TemporaryDirectory(prefix="ray-trim-") as tmp:
        site = Path(tmp) / "site"
        site.mkdir()
        _extract(wheel, site)
        unpacked = _tree_bytes(site)
        removed: dict[str, int] = {}

        def drop(path: Path, label: str) -> None:
            if path.exists():
                removed[label] = removed.get(label, 0) + (_tree_bytes(path) if path.is_dir() else path.stat().st_size)
                shutil.rmtree(path) if path.is_dir() else path.unlink()

        ray = site / "ray"
        for name in DROP_PACKAGES:
            drop(ray / name, f"ray/{name}")
        if not keep_dashboard_client:
            drop(ray / DASHBOARD_CLIENT, f"ray/{DASHBOARD_CLIENT}")
            build = ray / DASHBOARD_CLIENT / "build"
            (build / "static").mkdir(parents=True)
            (build / "index.html").write_text(STUB_INDEX)
        for p in sorted(site.rglob("*")):
            if p.is_dir() and p.name in ("__pycache__", "tests") and p.exists():
                drop(p, p.name + "/ folders")
            elif p.is_file() and p.suffix in DROP_SUFFIXES:
                drop(p, "headers and stubs")
        for extra in extras:
            _extract(extra, site)
        stripped_before = stripped_after = 0
        if strip and shutil.which(strip):
            for p in site.rglob("*"):
                if p.is_file() and not p.is_symlink() and _is_elf(p):
                    before = p.stat().st_size
                    subprocess.run([strip, "--strip-unneeded", str(p)], check=True, capture_output=True)
                    stripped_before += before
                    stripped_after += p.stat().st_size
        trimmed = _tree_bytes(site)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out, "w:xz", preset=9) as tar:
            tar.add(site, arcname="site")
    return {
        "wheel": wheel.name,
        "wheel_bytes": wheel.stat().st_size,
        "unpacked_bytes": unpacked,
        "removed_bytes": removed,
        "elf_bytes_before_strip": stripped_before,
        "elf_bytes_after_strip": stripped_after,
        "extras": [e.name for e in extras],
        "trimmed_bytes": trimmed,
        "archive": out.name,
        "archive_bytes": out.stat().st_size,
        "dashboard_client": keep_dashboard_client,
    }


def unpack(archive: Path, target: Path) -> Path:
    """Unpack an archive made by :func:`trim` into ``target``; returns the folder for ``PYTHONPATH``."""
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:xz") as tar:
        tar.extractall(target, filter="data")
    return target / "site"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument(
        "--extra", type=Path, action="append", default=[], help="a dependency wheel unpacked beside ray/"
    )
    parser.add_argument("--keep-dashboard-client", action="store_true", help="keep the dashboard's front-end build")
    parser.add_argument("--json", type=Path, default=None, help="write the measurements here too")
    args = parser.parse_args()
    sizes = trim(args.wheel, args.out, keep_dashboard_client=args.keep_dashboard_client, extras=tuple(args.extra))
    text = json.dumps(sizes, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
