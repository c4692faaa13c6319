"""A lost node, not just a lost process: two raylets on this machine (``ray.cluster_utils.Cluster``,
as Ray's own tests do) and the worker node removed in the middle of a certification, of a
``tbn-ray train --workers 2`` with one Train worker on each node, and of a sweep's training trial.

Each cluster runs in a child process: a driver joins one Ray cluster for its lifetime, and this
test session may already hold another (``ray_local``). The child drives the CLI's own path
(``runtime.connected`` to the cluster's address, then the job), and prints one ``RESULT`` line.
Training and sweeps on several nodes need shared storage: the session's S3 server, which the
child and every raylet reach through the inherited ``AWS_*`` variables.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tbn_ray.config import CertifyConfig
from tbn_ray.jobs.certify import plan_certify, run_plan_in_process
from tbn_ray.store.runs import Run
from tbn_ray.store.storage import Storage

from .conftest import free_port
from .helpers import HANG_S, tiny_run
from .test_ray_certify import exact, read_records

CFG = CertifyConfig(sigmas=(0.25,), n0=20, n=1000, batch_size=500, max_images=16)
SHARDS = 8
EPOCHS = 2  # of the training run: the node is lost during the second
REPO = Path(__file__).resolve().parents[1]
STARTED = time.monotonic()
#: Node deaths noticed within seconds (Ray's default takes about 15 s): faster, as Ray's own tests do.
FAST_HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 5,
}


@contextlib.contextmanager
def two_nodes(**head: Any) -> Iterator[tuple[Any, Any]]:
    """A head node with the resources ``head`` and a worker node with 1 CPU; the cluster and the worker node."""
    from ray.cluster_utils import Cluster

    head_args = {**head, "dashboard_port": free_port(), "_system_config": FAST_HEALTH_CHECKS}
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    try:
        worker = cluster.add_node(num_cpus=1)
        phase("cluster up")
        yield cluster, worker
    finally:
        cluster.shutdown()


def lose_node_when(cluster: Any, node: Any, ready: Callable[[], bool], driver: subprocess.Popen) -> dict[str, Any]:
    """While ``driver`` runs: once ``ready()`` holds, kill every process of ``node`` (SIGKILL: no goodbye
    to the cluster), then add a node of the same size, as an autoscaler would. What it did.
    Ray starts a node only from a main thread: hence the command in a process of its own."""
    while not ready():
        if driver.poll() is not None:
            return {"missed": f"the command ended (status {driver.returncode}) before the node could be lost"}
        time.sleep(0.2)
    cluster.remove_node(node, allow_graceful=False)
    spare = cluster.add_node(num_cpus=1)
    phase(f"node {node.node_id} lost, node {spare.node_id} joined")
    return {"lost": node.node_id, "spare": spare.node_id}


def tbn_ray_process(*args: str) -> subprocess.Popen:
    """``tbn-ray ARGS`` as a process of its own (the CLI's entry point, however old the installed script)."""
    return subprocess.Popen([sys.executable, "-c", "from tbn_ray.cli import main; main()", *args])


def finish(proc: subprocess.Popen, timeout_s: float) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()  # not left behind when the test gives up on this child
        raise


def phase(what: str) -> None:
    """A line in the child's log: where the seconds went when a run is slow."""
    print(f"[lost-node] {time.monotonic() - STARTED:.1f} s: {what}", flush=True)


def report(**values: Any) -> None:
    print("RESULT " + json.dumps(values), flush=True)


def in_child(scenario: str, *args: str, log: Path, timeout_s: float = HANG_S) -> dict[str, Any]:
    """``scenario(*args)`` of this module in a child Python, its output in ``log``; its RESULT line."""
    code = f"from tests.test_lost_node import {scenario}; {scenario}(*{args!r})"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}
    with log.open("w") as out:
        try:
            child = subprocess.run(
                [sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s, env=env, cwd=REPO
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"{scenario} did not finish within {timeout_s:g} s:\n{log.read_text()[-4000:]}")
    lines = [line for line in log.read_text().splitlines() if line.startswith("RESULT ")]
    assert child.returncode == 0 and lines, log.read_text()[-4000:]
    return json.loads(lines[0].removeprefix("RESULT "))


# --- certification ------------------------------------------------------------------------------


def certify_scenario(root: str) -> None:
    """In the child: head and worker node (1 CPU each), certify on both, remove the worker node
    as soon as the head node's actor finishes a shard (the other is then mid-shard)."""
    from tbn_ray.distributed.certify import run_plan_on_ray
    from tbn_ray.distributed.runtime import connected

    plan = plan_certify(
        Run.open(f"{root}/tiny"), CFG.model_copy(update={"shards": SHARDS}), Storage.open(f"{root}/ray")
    )
    seen: list[dict[str, str]] = []
    with two_nodes(num_cpus=1) as (cluster, worker):
        head = cluster.head_node.node_id

        def remove_worker_node(result) -> None:  # type: ignore[no-untyped-def]
            seen.append(dict(result.worker))
            if result.worker["node"] == head and worker in cluster.worker_nodes:
                cluster.remove_node(worker)

        with connected(cluster.address) as ray_cluster:
            result = run_plan_on_ray(
                plan, ray_cluster, actors=2, cpus_per_actor=1, progress=False, on_shard=remove_worker_node
            )
        removed = worker not in cluster.worker_nodes
    report(
        location=result.location,
        computed=result.shards_computed,
        seen=seen,
        head=head,
        lost=worker.node_id,
        removed=removed,
    )


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
    plan = plan_certify(
        Run.open(f"{tmp_path}/tiny"), CFG.model_copy(update={"shards": SHARDS}), Storage.open(tmp_path / "local")
    )
    undisturbed = run_plan_in_process(plan, torch.device("cpu"), progress=False)
    assert undisturbed.run_id == outcome["location"].rpartition("/")[2]  # the same certification
    assert [r["idx"] for r in records] == plan.indices.tolist()  # every index exactly once
    assert exact(records) == exact(read_records(Storage.open(undisturbed.location), 0.25))


# --- training -----------------------------------------------------------------------------------


def train_scenario(storage: str, config: str) -> None:
    """In the child: head and worker node, 1 CPU each, so that the 2 Train workers take one each.
    ``tbn-ray train --workers 2`` loses the worker node once epoch 1 is checkpointed."""
    with two_nodes(num_cpus=1) as (cluster, worker):
        args = (
            "train",
            "--config",
            config,
            "--storage",
            storage,
            "--address",
            cluster.address,
            "--workers",
            "2",
            "--cpus-per-worker",
            "1",
        )
        checkpointed = Storage.open(f"{storage}/lost")
        driver = tbn_ray_process(*args, "--max-failures", "2")
        loss = lose_node_when(cluster, worker, lambda: checkpointed.exists("checkpoint.pt"), driver)
        status = finish(driver, HANG_S)
        phase(f"training done: status {status}")
    report(status=status, loss=loss)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.cluster
def test_a_node_lost_mid_training_resumes_from_the_last_checkpoint(s3_bucket: str, tmp_path: Path) -> None:
    """No undisturbed run to compare weights with (a Ray Train run costs about a minute here): that
    resuming at an epoch boundary gives the weights of not stopping is ``training.fit``'s property,
    tested without Ray; what is checked here is that Ray Train resumed, from the checkpoint."""
    pytest.importorskip("ray.train.torch", reason='Ray missing: pip install "ray[default,train]==2.60.0"')
    from .test_ray_train import TRAIN_IMAGES, tiny

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"train": tiny("lost", EPOCHS)}))
    storage = f"{s3_bucket}/runs"
    outcome = in_child("train_scenario", storage, str(config), log=tmp_path / "child.log", timeout_s=HANG_S)
    assert outcome["status"] == 0 and "spare" in outcome["loss"], outcome

    run = Run.open(f"{storage}/lost")
    final = run.load_checkpoint()
    # one restart, from epoch 1's checkpoint, not from scratch; every epoch trained exactly once, by 2 workers
    assert final.meta["started_at_epochs"] == [0, 1]
    assert final.epoch == EPOCHS and [h["epoch"] for h in final.meta["history"]] == list(range(EPOCHS))
    assert final.meta["workers"] == 2 and all(h["images"] == TRAIN_IMAGES for h in final.meta["history"])
    assert len(run.storage.read_text("metrics.csv").strip().splitlines()) == 1 + EPOCHS


# --- a sweep ------------------------------------------------------------------------------------


def sweep_scenario(storage: str, config: str, name: str) -> None:
    """In the child: a head node with neither CPUs nor memory to give (the driver, Tune's controller)
    and a worker node with 1 CPU, so that the training trial (which reserves a byte of memory) and
    its Train worker both run on the worker node, which is lost once epoch 1 is checkpointed; a node
    of the same size joins after it. A failed first run is resumed once, as a user would."""
    with two_nodes(num_cpus=0, memory=0) as (cluster, worker):
        root = Storage.open(f"{storage}/{name}")
        args = ("sweep", "--config", config, "--storage", storage, "--address", cluster.address)
        driver = tbn_ray_process(*args)
        loss = lose_node_when(
            cluster, worker, lambda: any(k.endswith("/checkpoint.pt") for k in root.list("train/")), driver
        )
        first = finish(driver, HANG_S)
        phase(f"sweep done: status {first}")
        again = None if first == 0 else finish(tbn_ray_process(*args, "--resume"), HANG_S)
    report(first=first, again=again, loss=loss)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.cluster
def test_a_node_lost_with_a_sweep_trial_the_sweep_still_finishes(s3_bucket: str, tmp_path: Path) -> None:
    pytest.importorskip("ray.tune", reason='Ray missing: pip install "ray[default,tune,train]==2.60.0"')
    from .test_ray_sweep import EPOCHS as SWEEP_EPOCHS
    from .test_ray_sweep import check_complete_sweep, tiny_sweep, training_runs

    config = tiny_sweep(tmp_path, "lostsweep", epsilons=[0.25], sigmas=[0.25], train={"data": {"train_limit": 256}})
    storage = f"{s3_bucket}/sweeps"
    outcome = in_child(
        "sweep_scenario", storage, str(config), "lostsweep", log=tmp_path / "child.log", timeout_s=HANG_S
    )
    assert "spare" in outcome["loss"], outcome["loss"]
    assert outcome["first"] == 0 or outcome["again"] == 0, outcome

    root = Storage.open(f"{storage}/lostsweep")
    (run,) = training_runs(root).values()  # the retried trial continued the lost trial's run
    starts = run.load_checkpoint().meta["started_at_epochs"]
    assert len(starts) >= 2 and starts[0] == 0 and all(1 <= s < SWEEP_EPOCHS for s in starts[1:]), (
        starts
    )  # never from scratch
    check_complete_sweep(root, [0.25], [0.25])
