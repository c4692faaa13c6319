"""The README's test command with every core kept busy: the suite must pass on a busy machine,
since no test may depend on how fast the machine runs.

Starts one spinning process per core (``while True: pass``), runs pytest, and ends the spinners by
their PIDs whatever happens; prints pytest's summary line and the wall time, and exits with
pytest's status. With ``--name`` it also writes ``<name>.json`` and ``.md`` under ``--out``
(``bench/results``): one row per run, with the commit, pytest's summary line and the wall time. Run it from a clean checkout's
root:

    python bench/busy_suite.py --repeat 3 --name busy_suite   # the whole suite, three times in a row
    python bench/busy_suite.py -- tests/test_ray_claims.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from timing import busy_processes

RESULTS = Path(__file__).resolve().parent / "results"


def run_busy(pytest_args: list[str], spinners: int) -> tuple[int, float, str]:
    """pytest beside ``spinners`` busy processes: its exit status, wall seconds and summary line.

    pytest's output is passed through as it comes; its last line is pytest's summary."""
    t0 = time.perf_counter()
    last = ""
    with busy_processes(spinners) as busy:
        print(f"busy: {spinners} spinning processes, PIDs {' '.join(str(p.pid) for p in busy)}", flush=True)
        with subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        ) as pytest_run:
            assert pytest_run.stdout is not None
            for line in pytest_run.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                if line.strip():
                    last = line.strip()
            rc = pytest_run.wait()
    return rc, time.perf_counter() - t0, last


def commit() -> str:
    """The checkout's commit, with ``+changes`` when its tracked files differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"]).returncode != 0
    return (head or "unknown") + ("+changes" if dirty else "")


def write_record(out: Path, name: str, rows: list[dict], command: str) -> None:
    """``<name>.json`` (the rows) and ``<name>.md`` (a table) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        f"# The test suite with every core busy ({os.cpu_count()} cores)",
        "",
        f"`{command}`",
        "",
        "| run | commit | busy processes | exit | wall min | pytest's summary | finished (UTC) |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['run']} | {r['commit']} | {r['spinners']} | {r['exit']} | {r['wall_min']:.1f} | {r['summary']} "
            f"| {r['finished']} |"
            for r in rows
        ),
        "",
        f"Machine: {rows[0]['machine']}." if rows else "No run.",
    ]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs in a row (default: 1)")
    parser.add_argument(
        "--spinners", type=int, default=os.cpu_count() or 2, help="busy processes (default: one per core)"
    )
    parser.add_argument("--name", help="write NAME.json and NAME.md under --out (default: print only)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where --name's files go (default: bench/results)")
    parser.add_argument("pytest_args", nargs="*", help="after --: what pytest runs (default: the whole suite)")
    args = parser.parse_args()
    command = "python bench/busy_suite.py " + " ".join(sys.argv[1:])
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    rows: list[dict] = []
    for i in range(args.repeat):
        rc, seconds, summary = run_busy(args.pytest_args, args.spinners)
        print(
            f"run {i + 1}/{args.repeat}: exit {rc}, {seconds / 60:.1f} min with {args.spinners} busy processes",
            flush=True,
        )
        rows.append(
            {
                "run": i + 1,
                "commit": commit(),
                "spinners": args.spinners,
                "exit": rc,
                "wall_min": round(seconds / 60, 2),
                "summary": summary,
                "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
                "machine": machine,
            }
        )
        if args.name:
            write_record(args.out, args.name, rows, command)
        if rc != 0:
            sys.exit(rc)


if __name__ == "__main__":
    main()
