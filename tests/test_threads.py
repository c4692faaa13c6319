"""``--threads auto``: the CPUs idle now, not the cores the machine has (oversubscribed torch
threads ran 5-10x slower on a shared 2-core machine)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from tbn_ray.threads import apply_threads, auto_threads, idle_cpus, threads_for


@pytest.mark.parametrize(
    ("share", "idle", "threads"),
    [
        (2, 2.0, 2),
        (2, 1.6, 2),
        (2, 1.4, 1),
        (2, 0.0, 1),
        (2, -1.5, 1),
        (8, 5.6, 6),
        (8, 12.0, 8),
        (1.5, 4.0, 1),
        (4, 3.5, 4),
    ],
)
def test_threads_follow_the_idle_cpus_within_the_share(share: float, idle: float, threads: int) -> None:
    assert threads_for(share, idle) == threads


def test_the_users_omp_num_threads_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert auto_threads() == 3


@pytest.mark.skipif(
    not os.path.exists("/proc/stat") or (os.cpu_count() or 1) > 8, reason="needs /proc/stat and at most 8 CPUs to fill"
)
def test_a_machine_full_of_busy_processes_gets_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(1.0)  # past the interpreters' start
        idle = idle_cpus()
        assert idle is not None and idle < 0.8, idle
        assert auto_threads() == 1
    finally:
        for s in spinners:
            s.kill()
            s.wait()


def test_apply_threads_sets_torch_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        assert apply_threads(1) == 1 and torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)
