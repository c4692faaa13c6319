"""A lost node, not just a lost process: two raylets on this machine (``ray.cluster_utils.Cluster``,
as Ray's own tests do), one actor on each, and the worker node removed in the middle of a
certification. The run completes with every index exactly once, equal to an undisturbed run.

The cluster runs in a child process: a driver joins one Ray cluster for its lifetime, and this
test session may already hold another (``ray_local``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def scenario(root: str) -> None:
    """In the child: head and worker node (1 CPU each), certify on both, remove the worker node
    as soon as the head node's actor finishes a shard (the other is then mid-shard)."""
    from ray.cluster_utils import Cluster

    from tbn_ray.distributed.certify import certify_on_ray

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "dashboard_port": free_port()})
    worker = cluster.add_node(num_cpus=1)
    plan = plan_certify(Run.open(f"{root}/tiny"), CFG, Storage.open(f"{root}/ray"), shards=SHARDS)
    seen: list[dict[str, str]] = []

    def remove_worker_node(result) -> None:  # type: ignore[no-untyped-def]
        seen.append(dict(result.worker))
        if result.worker["node"] == head and worker in cluster.worker_nodes:
            cluster.remove_node(worker)

    head = cluster.head_node.node_id
    try:
        result = certify_on_ray(plan, address=cluster.address, actors=2, cpus_per_actor=1, progress=False, on_shard=remove_worker_node)
        removed = worker not in cluster.worker_nodes
    finally:
        cluster.shutdown()
    report = {"location": result.location, "computed": result.shards_computed, "seen": seen, "head": head, "lost": worker.node_id, "removed": removed}
    print("RESULT " + json.dumps(report), flush=True)


@pytest.mark.ray
@pytest.mark.slow
def test_a_node_lost_mid_certification(tmp_path: Path) -> None:
    pytest.importorskip("ray.cluster_utils", reason='Ray missing: pip install "ray[default,train]==2.60.0"')
    tiny_run(Storage.open(tmp_path))
    child = [sys.executable, "-c", f"from tests.test_lost_node import scenario; scenario({str(tmp_path)!r})"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}
    proc = subprocess.run(child, capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).resolve().parents[1])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-3000:], proc.stderr[-3000:])
    report = json.loads(lines[0].removeprefix("RESULT "))
    assert report["removed"] and report["computed"] == SHARDS
    assert len(report["seen"]) == SHARDS  # each shard counted once, however many copies ran
    assert {w["node"] for w in report["seen"]} <= {report["head"], report["lost"]}

    records = read_records(Storage.open(report["location"]), 0.25)
    plan = plan_certify(Run.open(f"{tmp_path}/tiny"), CFG, Storage.open(tmp_path / "local"), shards=SHARDS)
    undisturbed = run_plan_in_process(plan, torch.device("cpu"), progress=False)
    assert undisturbed.run_id == report["location"].rpartition("/")[2]  # the same certification
    assert [r["idx"] for r in records] == plan.indices.tolist()  # every index exactly once
    assert exact(records) == exact(read_records(Storage.open(undisturbed.location), 0.25))
