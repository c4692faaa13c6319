"""The README's test command with every core kept busy: the suite must pass on a busy machine,
since no test may depend on how fast the machine runs.

Starts one spinning process per core (``while True: pass``), runs pytest, and ends the spinners by
their PIDs whatever happens; prints pytest's summary line and the wall time, and exits with
pytest's status. Run it from a clean checkout's root:

    python bench/busy_suite.py --repeat 3            # the whole suite, three times in a row
    python bench/busy_suite.py -- tests/test_ray_claims.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

BUSY_LOOP = "while True: pass"


def run_busy(pytest_args: list[str], spinners: int) -> tuple[int, float]:
    """pytest beside ``spinners`` busy processes; its exit status and wall seconds."""
    busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(spinners)]
    print(f"busy: {spinners} spinning processes, PIDs {' '.join(str(p.pid) for p in busy)}", flush=True)
    t0 = time.perf_counter()
    try:
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args])
    finally:
        for p in busy:
            p.kill()
            p.wait()
    return rc, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs in a row (default: 1)")
    parser.add_argument(
        "--spinners", type=int, default=os.cpu_count() or 2, help="busy processes (default: one per core)"
    )
    parser.add_argument("pytest_args", nargs="*", help="after --: what pytest runs (default: the whole suite)")
    args = parser.parse_args()
    for i in range(args.repeat):
        rc, seconds = run_busy(args.pytest_args, args.spinners)
        print(
            f"run {i + 1}/{args.repeat}: exit {rc}, {seconds / 60:.1f} min with {args.spinners} busy processes",
            flush=True,
        )
        if rc != 0:
            sys.exit(rc)


if __name__ == "__main__":
    main()
