"""How many CPU threads torch uses in this process (``tbn-ray --threads``).

torch starts one intra-op thread per core it sees, whoever else is using those cores: on a
shared 2-core machine two threads under contention ran 5-10x slower than one. ``auto`` takes
the CPU share this process can actually get: its affinity mask, capped by a cgroup CPU quota
(containers), less the load already on the machine (the 1-minute load average).
"""

from __future__ import annotations

import math
import os
import sys
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


def auto_threads() -> int:
    """``$OMP_NUM_THREADS`` when the user set it; else the CPU share less the load, at least 1."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) >= 1:
        return int(given)
    share = cpu_share()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return max(1, min(math.floor(share), math.floor(share - load + 0.5)))


def apply_threads(setting: int | str) -> int:
    """Use ``setting`` threads (``auto``: ``auto_threads()``) from now on in this process; the count.

    Set before torch loads (``OMP_NUM_THREADS``) and, if it is loaded already, through torch."""
    threads = auto_threads() if setting == "auto" else int(setting)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return threads
