"""A lost node, not just a lost process: two raylets on this machine (``ray.cluster_utils.Cluster``,
as Ray's own tests do) and the worker node removed in the middle of a certification.

Each cluster runs in a child process: a driver joins one Ray cluster for its lifetime, and this
test session may already hold another (``ray_local``). The child drives the CLI's own path
(``runtime.connected`` to the cluster's address, then the job), and prints one ``RESULT`` line.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tbn_ray.config import CertifyConfig
from tbn_ray.jobs.certify import plan_certify, run_plan_in_process
from tbn_ray.store.runs import Run
from tbn_ray.store.storage import Storage

from .conftest import free_port
from .helpers import tiny_run
from .test_ray_certify import exact, read_records

CFG = CertifyConfig(sigmas=(0.25,), n0=20, n=1000, batch_size=500, max_images=16)
SHARDS = 8
REPO = Path(__file__).resolve().parents[1]
STARTED = time.monotonic()
#: Node deaths noticed within seconds (Ray's default takes about 15 s): faster, as Ray's own tests do.
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000, "health_check_failure_threshold": 5}


@contextlib.contextmanager
def two_nodes(head_cpus: int) -> Iterator[tuple[Any, Any]]:
    """A head node with ``head_cpus`` CPUs and a worker node with 1; the cluster and the worker node."""
    from ray.cluster_utils import Cluster

    head = {"num_cpus": head_cpus, "dashboard_port": free_port(), "_system_config": FAST_HEALTH_CHECKS}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        worker = cluster.add_node(num_cpus=1)
        phase("cluster up")
        yield cluster, worker
    finally:
        cluster.shutdown()


def phase(what: str) -> None:
    """A line in the child's log: where the seconds went when a run is slow."""
    print(f"[lost-node] {time.monotonic() - STARTED:.1f} s: {what}", flush=True)


def report(**values: Any) -> None:
    print("RESULT " + json.dumps(values), flush=True)


def in_child(scenario: str, *args: str, log: Path, timeout_s: float = 300) -> dict[str, Any]:
    """``scenario(*args)`` of this module in a child Python, its output in ``log``; its RESULT line."""
    code = f"from tests.test_lost_node import {scenario}; {scenario}(*{args!r})"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}
    with log.open("w") as out:
        try:
            status = subprocess.run([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s, env=env, cwd=REPO).returncode
        except subprocess.TimeoutExpired:
            pytest.fail(f"{scenario} did not finish within {timeout_s:g} s:\n{log.read_text()[-4000:]}")
    lines = [line for line in log.read_text().splitlines() if line.startswith("RESULT ")]
    assert status == 0 and lines, log.read_text()[-4000:]
    return json.loads(lines[0].removeprefix("RESULT "))


# --- certification ------------------------------------------------------------------------------


def certify_scenario(root: str) -> None:
    """In the child: head and worker node (1 CPU each), certify on both, remove the worker node
    as soon as the head node's actor finishes a shard (the other is then mid-shard)."""
    from tbn_ray.distributed.certify import run_plan_on_ray
    from tbn_ray.distributed.runtime import connected

    plan = plan_certify(Run.open(f"{root}/tiny"), CFG, Storage.open(f"{root}/ray"), shards=SHARDS)
    seen: list[dict[str, str]] = []
    with two_nodes(head_cpus=1) as (cluster, worker):
        head = cluster.head_node.node_id

        def remove_worker_node(result) -> None:  # type: ignore[no-untyped-def]
            seen.append(dict(result.worker))
            if result.worker["node"] == head and worker in cluster.worker_nodes:
                cluster.remove_node(worker)

        with connected(cluster.address) as ray_cluster:
            result = run_plan_on_ray(plan, ray_cluster, actors=2, cpus_per_actor=1, progress=False, on_shard=remove_worker_node)
        removed = worker not in cluster.worker_nodes
    report(location=result.location, computed=result.shards_computed, seen=seen, head=head, lost=worker.node_id, removed=removed)


@pytest.mark.ray
@pytest.mark.slow
def test_a_node_lost_mid_certification(tmp_path: Path) -> None:
    pytest.importorskip("ray.cluster_utils", reason='Ray missing: pip install "ray[default,train]==2.60.0"')
    tiny_run(Storage.open(tmp_path))
    outcome = in_child("certify_scenario", str(tmp_path), log=tmp_path / "child.log")
    assert outcome["removed"] and outcome["computed"] == SHARDS
    assert len(outcome["seen"]) == SHARDS  # each shard counted once, however many copies ran
    assert {w["node"] for w in outcome["seen"]} <= {outcome["head"], outcome["lost"]}

    records = read_records(Storage.open(outcome["location"]), 0.25)
    plan = plan_certify(Run.open(f"{tmp_path}/tiny"), CFG, Storage.open(tmp_path / "local"), shards=SHARDS)
    undisturbed = run_plan_in_process(plan, torch.device("cpu"), progress=False)
    assert undisturbed.run_id == outcome["location"].rpartition("/")[2]  # the same certification
    assert [r["idx"] for r in records] == plan.indices.tolist()  # every index exactly once
    assert exact(records) == exact(read_records(Storage.open(undisturbed.location), 0.25))
