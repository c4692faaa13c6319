"""How many CPU threads torch uses in this process (``tbn-ray --threads``).

torch starts one intra-op thread per core it sees, whoever else is using those cores: on a
shared 2-core machine two threads under contention ran 5-10x slower than one. ``auto`` takes
the CPU share this process can actually get: its affinity mask, capped by a cgroup CPU quota
(containers), and by the CPUs idle right now (``/proc/stat`` over a fifth of a second; the
1-minute load average where that is missing, which lags: a machine that was busy a minute
ago would get too few threads).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

_CGROUP = Path("/sys/fs/cgroup")


def _cgroup_quota() -> float | None:
    """CPUs allowed by a cgroup v2 (``cpu.max``) or v1 (``cfs_quota_us``) quota; None when unlimited or unreadable."""
    try:
        own = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        own = []
    v2 = [line.partition("::")[2] for line in own if line.startswith("0::")]
    for folder in [_CGROUP / p.lstrip("/") for p in v2 if p.strip("/")] + [_CGROUP]:
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        return None if quota == "max" else int(quota) / int(period)
    try:
        quota_us = int((_CGROUP / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((_CGROUP / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 else None


def cpu_share() -> float:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup quota."""
    try:
        cpus: float = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    return min(cpus, quota) if quota else cpus


def _cpu_ticks() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs since boot, from /proc/stat; None where there is none."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return ticks[3] + ticks[4], sum(ticks)


def idle_cpus(window_s: float = 0.2) -> float | None:
    """How many CPUs of the machine sat idle over the next ``window_s`` seconds; None if unknown."""
    before = _cpu_ticks()
    if before is None:
        return None
    time.sleep(window_s)
    after = _cpu_ticks()
    if after is None or after[1] <= before[1]:
        return None
    cpus = os.cpu_count() or 1
    return cpus * (after[0] - before[0]) / (after[1] - before[1])


def threads_for(share: float, idle: float) -> int:
    """Threads for ``share`` CPUs of which ``idle`` are free now: the free ones, rounded, at least 1."""
    return max(1, min(math.floor(share), math.floor(min(share, idle) + 0.5)))


def auto_threads() -> int:
    """``$OMP_NUM_THREADS`` when the user set it; else the CPU share that is idle now, at least 1."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) >= 1:
        return int(given)
    share = cpu_share()
    idle = idle_cpus()
    if idle is None:
        try:
            idle = share - os.getloadavg()[0]
        except (AttributeError, OSError):
            idle = share
    return threads_for(share, idle)


def apply_threads(setting: int | str) -> int:
    """Use ``setting`` threads (``auto``: ``auto_threads()``) from now on in this process; the count.

    Set before torch loads (``OMP_NUM_THREADS``) and, if it is loaded already, through torch."""
    threads = auto_threads() if setting == "auto" else int(setting)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return threads
