"""Timing helpers of the benchmarks: wall and CPU time, configurations interleaved on a shared machine."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

BUSY_LOOP = "while True: pass"


@contextmanager
def busy_processes(count: int) -> Iterator[list[subprocess.Popen]]:
    """``count`` spinning processes (``while True: pass``), ended by their PIDs whatever happens:
    the other work of a busy machine, started and stopped by the benchmark itself."""
    spinners = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(count)]
    try:
        yield spinners
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, result)."""
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - w0, time.process_time() - c0, result


def interleaved(configs: dict[str, Callable[[int], Any]], units: int, rounds: int) -> dict[str, dict[str, Any]]:
    """Time every config on every unit (an image, or a whole run), ``rounds`` times, interleaved.

    Per config: the sum over units of each unit's best (and median) time. Short units and a
    best-of estimate keep the figures close to an unloaded machine's on a shared one.
    """
    times: dict[str, list[list[tuple[float, float, float]]]] = {name: [[] for _ in range(units)] for name in configs}
    results: dict[str, list[Any]] = {name: [] for name in configs}
    for r in range(rounds):
        for u in range(units):
            for name, fn in configs.items():
                wall, cpu, result = timed(lambda: fn(u))
                times[name][u].append((wall, cpu, os.getloadavg()[0]))
                results[name].append(result)
        loads = [t[-1][2] for per in times.values() for t in per]
        print(
            f"  round {r + 1}/{rounds}: "
            + ", ".join(f"{n}: {sum(t[-1][0] for t in per):.1f} s" for n, per in times.items())
            + f" (load average {min(loads):.1f}-{max(loads):.1f})",
            flush=True,
        )
    return {
        name: {
            "wall_best_s": sum(min(w for w, _, _ in t) for t in per),
            "wall_median_s": sum(statistics.median(w for w, _, _ in t) for t in per),
            "cpu_best_s": sum(min(c for _, c, _ in t) for t in per),
            "load_average_1min": [round(a, 1) for t in per for _, _, a in t],
            "results": results[name],
        }
        for name, per in times.items()
    }
