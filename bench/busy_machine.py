"""The quickstart on an idle machine and beside CPU-bound processes, per torch thread setting.

A user's laptop is a busy machine. With ``k`` busy processes on ``c`` cores, a fair share is
``c / (k + 1)`` of the cores, so the quickstart should slow down by about ``(k + 1)`` when
``k >= c`` (two busy loops on two cores: about 2x, or 3x counting the share a fair scheduler
gives; both far from the 5-10x of oversubscribed torch threads). Each run is a whole
``tbn-ray quickstart`` process into a fresh storage folder; a run past ``--timeout`` is
stopped and reported as "at least" that long.

    python bench/busy_machine.py --settings auto 2 --busy 0 2 --timeout 900
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import busy_processes

RESULTS = Path(__file__).resolve().parent / "results"


def run_quickstart(threads: str, busy: int, timeout: float) -> dict:
    """One quickstart with ``threads`` (``--threads``) beside ``busy`` spinning processes."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "TBN_THREADS")}
    with busy_processes(busy), tempfile.TemporaryDirectory(prefix="tbn-busy-") as storage:
        time.sleep(5 if busy else 0)  # let the load average see them, as it would on a busy laptop
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tbn_ray", "--threads", threads, "quickstart", "--storage", storage],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
            finished = proc.returncode == 0
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            finished = False
        wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "threads": threads,
        "busy_processes": busy,
        "finished": finished,
        "wall_s": round(wall, 1),
        "cpu_s_incl_busy": round(cpu, 1),
        "load_average_at_start": round(load, 2),
        "tail": out.strip().splitlines()[-1:] if out else [],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=["auto", "2"], help="--threads values to compare")
    p.add_argument("--busy", nargs="+", type=int, default=[0, 2], help="numbers of busy processes beside it")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before a run is stopped")
    p.add_argument("--name", default="busy_machine")
    args = p.parse_args()
    rows = []
    for busy in args.busy:
        for threads in args.settings:
            row = run_quickstart(threads, busy, args.timeout)
            print(json.dumps(row), flush=True)
            rows.append(row)
    idle = {r["threads"]: r["wall_s"] for r in rows if r["busy_processes"] == 0 and r["finished"]}
    lines = [
        f"# Quickstart on a busy machine ({os.cpu_count()} cores)",
        "",
        f"`python bench/busy_machine.py --settings {' '.join(args.settings)} --busy {' '.join(map(str, args.busy))} --timeout {args.timeout:g}`",
        "",
        "| --threads | busy processes | load at start | wall s | slowdown vs idle (same setting) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        wall = f"{r['wall_s']}" if r["finished"] else f">= {r['wall_s']} (stopped)"
        base = idle.get(r["threads"])
        slow = f"{'>= ' if not r['finished'] else ''}{r['wall_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {r['threads']} | {r['busy_processes']} | {r['load_average_at_start']} | {wall} | {slow} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
