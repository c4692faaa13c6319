"""Distributed adversarial training on a real local Ray cluster (dashboard on) and a real S3 server.

All tests share the session's Ray instance (``ray_local``) except the ``ray job submit``
one, which needs a head node of its own. Tiny everything: the exact CIFAR-10 subset cut
to 256 training images, the tiny model, PGD with 2 steps, 64 held-out images.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tbn_ray.config import CalibrateConfig, TrainConfig
from tbn_ray.errors import TbnError
from tbn_ray.science.models import build_model
from tbn_ray.store.runs import Run, make_checkpoint
from tbn_ray.store.storage import Storage

from .conftest import HeldRequest, free_port

pytest.importorskip("ray.train.torch", reason='Ray missing: pip install "ray[default,train]==2.60.0"')

from tbn_ray.distributed import train as ray_train  # noqa: E402  (imports ray)
from tbn_ray.distributed.train import Recovery, Scaling, train_on_ray  # noqa: E402
from tbn_ray.jobs.pipeline import calibrate_run  # noqa: E402

from .helpers import HANG_S

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BIN = Path(sys.executable).parent
#: The CLI's entry point, independent of how old the installed console script is.
TBN_RAY = [sys.executable, "-c", "from tbn_ray.cli import main; main()"]
TRAIN_IMAGES, BATCH = 256, 64


def tiny(name: str, epochs: int) -> dict[str, Any]:
    if not (SHARED / "cifar10-partial").is_dir():
        pytest.skip(f"exact CIFAR-10 subset not found at {SHARED / 'cifar10-partial'}")
    return {
        "name": name,
        "data": {"source": "partial", "shared_dir": str(SHARED), "train_limit": TRAIN_IMAGES},
        "model": {"arch": "tiny"},
        "attack": {"norm": "l2", "eps": 0.25, "steps": 2},
        "optim": {"epochs": epochs, "batch_size": BATCH, "lr": 0.05},
        "eval": {"images": 64, "attack": {"norm": "l2", "eps": 0.25, "steps": 2}},
    }


def tiny_cfg(name: str, epochs: int) -> TrainConfig:
    return TrainConfig.model_validate(tiny(name, epochs))


def ray_checkpoints(run: Run) -> list[str]:
    return sorted({k.split("/")[0] for k in run.storage.list() if k.startswith(ray_train.RAY_CHECKPOINT_PREFIX)})


def test_local_instance_has_the_dashboard_and_names_it_to_nested_actors(ray_local) -> None:
    """Ray Train's placement-group cleaner (an actor started by the controller actor, which sets
    env vars of its own) must reach this instance's state API even with other Ray instances around."""
    import urllib.request

    import ray

    with urllib.request.urlopen(f"{ray_local.dashboard_url}/api/version", timeout=10) as r:
        assert json.loads(r.read())["ray_version"] == ray.__version__

    @ray.remote(num_cpus=0)
    class Inner:
        def env(self) -> str | None:
            return os.environ.get("RAY_API_SERVER_ADDRESS")

    @ray.remote(num_cpus=0, runtime_env={"env_vars": {"SOME_SETTING": "1"}})
    class Outer:
        def inner_env(self) -> str | None:
            return ray.get(Inner.remote().env.remote())

    assert ray.get(Outer.remote().inner_env.remote()) == ray_local.dashboard_url


def test_the_job_has_its_name_in_the_dashboards_jobs_view(ray_local) -> None:
    """The Jobs view's Name column is the job's metadata ``job_name``: what connect(job_name=) sets
    (the commands name theirs ``tbn-ray certify <run id>``, ``tbn-ray train <run>``, ...)."""
    import urllib.request

    from .conftest import SESSION_JOB_NAME

    with urllib.request.urlopen(f"{ray_local.dashboard_url}/api/jobs/", timeout=30) as r:
        jobs = json.loads(r.read())
    assert SESSION_JOB_NAME in [(j.get("metadata") or {}).get("job_name") for j in jobs], jobs


def test_two_workers_on_s3_then_resume_with_more_epochs(ray_local, s3_bucket: str) -> None:
    root = Storage.open(f"{s3_bucket}/runs")
    run = Run(root.child("resume"))
    first = train_on_ray(
        tiny_cfg("resume", 2), root, Scaling(workers=2, cpus_per_worker=1), ray_local, recovery=Recovery(keep=2)
    )

    assert first.epoch == 2 and first.meta["started_at_epochs"] == [0]
    assert first.meta["workers"] == 2 and first.meta["global_batch_size"] == BATCH
    assert ray_checkpoints(run) == ["checkpoint_epoch0001", "checkpoint_epoch0002"]
    for key in ("checkpoint.pt", "best.pt", "config.yaml", "metrics.csv", "metrics.png"):
        assert run.storage.exists(key), key
    assert run.storage.read_bytes("metrics.png")[:8] == b"\x89PNG\r\n\x1a\n"
    # global batch 64 = 2 x 32; each worker sees 128 images: 4 steps an epoch, all 256 images trained on
    assert [h["images"] for h in first.meta["history"]] == [TRAIN_IMAGES, TRAIN_IMAGES]
    assert first.scheduler is not None and first.scheduler["last_epoch"] == 2 * 4
    assert Run.open(f"{run.uri}/checkpoint_epoch0002/checkpoint.pt").load_checkpoint().epoch == 2

    second = train_on_ray(
        tiny_cfg("resume", 4), root, Scaling(workers=2, cpus_per_worker=1), ray_local, recovery=Recovery(keep=2)
    )

    # resumed at epoch 2: one restart recorded, the first two epochs carried over, not trained again
    assert second.epoch == 4 and second.meta["started_at_epochs"] == [0, 2]
    assert [h["epoch"] for h in second.meta["history"]] == [0, 1, 2, 3]
    assert second.meta["history"][:2] == first.meta["history"]
    assert second.scheduler is not None and second.scheduler["last_epoch"] == 4 * 4
    assert ray_checkpoints(run) == ["checkpoint_epoch0003", "checkpoint_epoch0004"]  # the last K=2
    assert Run.open(f"{run.uri}/checkpoint_epoch0003/checkpoint.pt").load_checkpoint().meta["started_at_epochs"] == [
        0,
        2,
    ]
    assert len(run.storage.read_text("metrics.csv").strip().splitlines()) == 1 + 4
    best = Run.open(f"{run.uri}/best.pt").load_checkpoint()
    assert best.meta["best_heldout_pgd_acc"] == max(h["heldout_pgd_acc"] for h in best.meta["history"])

    # the same command once more: nothing to do, no worker started
    again = train_on_ray(tiny_cfg("resume", 4), root, Scaling(workers=2, cpus_per_worker=1), ray_local)
    assert again.epoch == 4 and again.meta["started_at_epochs"] == [0, 2]  # no worker started again

    # the Ray-trained run calibrates like a local one, straight from S3
    sets = calibrate_run(run, CalibrateConfig(sigmas=(0.25,), samples=64, batch_size=64), device="cpu", progress=False)
    assert "sigma=0.25" in sets and run.storage.exists("bn_stats.pt")


def _kill_one_worker_while_held(held: HeldRequest, dashboard: str, outcome: list[Any]) -> None:
    """Once the held checkpoint upload has started, SIGKILL one Train worker process, then let the upload go."""
    from ray.util.state import list_actors

    try:
        if not held.held.wait(timeout=HANG_S) or held.ended:
            outcome.append(f"the run ended, or {HANG_S} s passed, without a request for {held.key_part}")
            return
        deadline = time.monotonic() + HANG_S
        while not outcome and time.monotonic() < deadline:
            alive = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
            workers = list_actors(address=dashboard, filters=alive, raise_on_missing_output=False)
            if workers:
                pid = int(max(workers, key=lambda a: a.pid).pid)
                os.kill(pid, signal.SIGKILL)
                outcome.append(pid)
            else:
                time.sleep(0.2)  # the state API lists the workers a moment after they start
    except Exception as e:  # reported by the test, not lost with the thread
        outcome.append(e)
    finally:
        held.release.set()


def test_worker_killed_mid_run_recovers_from_last_checkpoint(
    ray_local, s3_bucket: str, s3_hold: Callable[[str], HeldRequest]
) -> None:
    """The epoch-2 checkpoint's upload is held by the S3 server while a worker is killed: the run
    cannot finish before the kill, and resumes from epoch 1's checkpoint (or epoch 2's)."""
    held = s3_hold(f"{ray_train.RAY_CHECKPOINT_PREFIX}0002")
    root = Storage.open(f"{s3_bucket}/runs")
    cfg = tiny_cfg("killed", 4)
    run = Run(root.child(cfg.name))
    killed: list[Any] = []
    killer = threading.Thread(
        target=_kill_one_worker_while_held, args=(held, ray_local.dashboard_url, killed), daemon=True
    )
    killer.start()
    try:
        final = train_on_ray(
            cfg, root, Scaling(workers=2, cpus_per_worker=1), ray_local, recovery=Recovery(keep=2, max_failures=2)
        )
    finally:
        held.end()
        killer.join(timeout=HANG_S)

    assert killed and isinstance(killed[0], int), f"no worker was killed: {killed}"
    starts = final.meta["started_at_epochs"]
    # one restart, from a checkpoint (epoch >= 1), not from scratch; every epoch trained exactly once
    assert len(starts) == 2 and starts[0] == 0 and 1 <= starts[1] < 4, starts
    assert final.epoch == 4 and [h["epoch"] for h in final.meta["history"]] == [0, 1, 2, 3]
    assert run.load_checkpoint().epoch == 4


def test_infeasible_requests_fail_fast_with_a_clear_message(ray_local, tmp_path: Path) -> None:
    root = Storage.open(tmp_path / "runs")
    cfg = tiny_cfg("infeasible", 1)
    with pytest.raises(TbnError, match=r"need 1 GPU, but the Ray cluster has 0"):
        train_on_ray(cfg, root, Scaling(workers=1, gpus_per_worker=1), ray_local)
    with pytest.raises(TbnError, match=r"8 workers x 1 CPU need 8 CPU, but the Ray cluster has 4"):
        train_on_ray(cfg, root, Scaling(workers=8), ray_local)

    # Past that check (a request that could fit in total but not be placed, or an autoscaling cluster
    # that cannot grow enough), Ray Train's bounded start is what fails instead of waiting forever.
    scaling = Scaling(workers=1, cpus_per_worker=1, gpus_per_worker=1)
    with pytest.raises(TbnError, match=r"could not start 1 Ray Train workers .*2 attempts of 5 s"):
        ray_train.fit_trainer(ray_train.make_trainer(cfg, root, scaling, Recovery()), scaling, timeout_s=5)
    assert not (tmp_path / "runs" / "infeasible" / "checkpoint.pt").exists()


def test_batch_rule_and_scaling_are_checked_before_ray(ray_local, tmp_path: Path) -> None:
    root = Storage.open(tmp_path)
    with pytest.raises(TbnError, match="not divisible by 3 workers"):
        train_on_ray(tiny_cfg("odd", 1), root, Scaling(workers=3), ray_local)
    with pytest.raises(TbnError, match="must be 0 or 1"):
        Scaling(gpus_per_worker=2)
    assert Scaling(workers=8).per_worker_batch(128) == 16 and Scaling(workers=1).per_worker_batch(128) == 128


def test_missing_bucket_fails_before_training(ray_local, s3_server: str) -> None:
    root = Storage.open("s3://tbn-no-such-bucket-8f3a/runs")
    with pytest.raises(TbnError, match="tbn-no-such-bucket-8f3a"):
        train_on_ray(tiny_cfg("nobucket", 1), root, Scaling(workers=2, cpus_per_worker=1), ray_local)


def test_cli_missing_bucket_or_cluster_exits_2_before_training(s3_server: str, tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"train": tiny("cli-nobucket", 1)}))
    out = subprocess.run(
        [*TBN_RAY, "train", "--config", str(config), "--storage", "s3://tbn-no-such-bucket-77c1/x", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=HANG_S,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("tbn-ray: error:") and "tbn-no-such-bucket-77c1" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert "dashboard" not in out.stdout  # failed before any Ray instance was started

    # a cluster address nothing listens on: refused at once (ray.init alone would retry for minutes)
    nowhere = f"127.0.0.1:{free_port()}"
    out = subprocess.run(
        [*TBN_RAY, "train", "--config", str(config), "--storage", str(tmp_path), "--address", nowhere],
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    assert out.returncode == 2 and f"no Ray cluster reachable at {nowhere}" in out.stderr, out.stderr[-2000:]


def test_cli_train_on_a_local_instance_prints_no_ray_internals(tmp_path: Path) -> None:
    """A successful `tbn-ray train` on a local Ray instance shows tbn-ray's own lines only: Ray Train's
    messages (worker-group start, reports, retried internal requests with their tracebacks) stay in
    its log files."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"train": tiny("quiet", 1)}))
    # A Ray temp dir of its own (short: Ray's socket paths must stay under 107 bytes): ray.init
    # joins a cluster that `ray start` left on this machine instead of starting an instance.
    ray_tmp = Path(tempfile.mkdtemp(prefix="tbnray-", dir="/tmp"))
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": str(ray_tmp)}
    try:
        out = subprocess.run(
            [*TBN_RAY, "train", "--config", str(config), "--storage", str(tmp_path), "--workers", "1"],
            capture_output=True,
            text=True,
            timeout=HANG_S,
            env=env,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "local Ray instance" in out.stdout  # started its own
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert not [line for line in lines if "Traceback" in line], out.stderr[-3000:]
    # Nothing from Ray Train's controller and workers but tbn-ray's lines (Ray core may still print
    # a line of its own from other processes, e.g. under heavy CPU contention).
    train_lines = [line for line in lines if "(TrainController" in line or "(RayTrainWorker" in line]
    assert not [line for line in train_lines if "[tbn-ray]" not in line], out.stderr[-3000:]
    assert any("[tbn-ray] epoch 1/1: loss" in line for line in lines), out.stderr[-3000:]  # progress kept
    assert Run.open(str(tmp_path / "quiet")).load_checkpoint().epoch == 1


def _start_head(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str, Path]:
    """``ray start --head --block`` on free ports, its dashboard's URL once it answers, and its temp dir.

    Ray gives its own start-up steps fixed waits (30 s for the raylet to register); on a busy machine
    a head can exit on one of them. Such a head is started again, on new ports, until one comes up
    or the tests' hang guard passes: the test waits on the head, not on Ray's clock."""
    import urllib.request

    deadline = time.monotonic() + HANG_S
    attempts = 0
    while time.monotonic() < deadline:
        attempts += 1
        port, dashboard = free_port(), free_port()
        # Ports Ray would otherwise take at fixed defaults (52365 for the job agent), shared with other sessions.
        agent_ports = [
            f"--{flag}={free_port()}"
            for flag in (
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "metrics-export-port",
                "runtime-env-agent-port",
            )
        ]
        # Ray's unix socket paths must stay under 107 bytes: a short temp dir, not pytest's.
        temp_dir = Path(tempfile.mkdtemp(prefix="tbnray-", dir="/tmp"))
        with log.open("a") as out:
            head = subprocess.Popen(
                [
                    str(BIN / "ray"),
                    "start",
                    "--head",
                    "--block",
                    f"--port={port}",
                    f"--dashboard-port={dashboard}",
                    "--dashboard-host=127.0.0.1",
                    "--include-dashboard=true",
                    "--num-cpus=2",
                    f"--temp-dir={temp_dir}",
                    "--disable-usage-stats",
                    *agent_ports,
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{dashboard}"
        while head.poll() is None and time.monotonic() < deadline:
            # the dashboard may answer before the raylet has registered: up means `ray start` said so
            if "Ray runtime started" in log.read_text(errors="replace").split("Local node IP")[-1]:
                try:
                    with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                        return head, url, temp_dir
                except OSError:
                    pass
            time.sleep(1)
        _stop_head(head, temp_dir)
    pytest.fail(f"no head came up in {attempts} attempt(s) within {HANG_S} s: {log.read_text()[-2000:]}")


def _stop_head(head: subprocess.Popen, temp_dir: Path) -> None:
    """Stop a head of ``_start_head`` (its session's processes too) and remove its temp dir."""
    head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=10)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_cli_local_trains_in_process_without_ray(tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"train": tiny("local", 1)}))
    out = subprocess.run(
        [*TBN_RAY, "train", "--local", "--config", str(config), "--storage", str(tmp_path), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=HANG_S,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dashboard" not in out.stdout  # no Ray instance
    run = Run.open(str(tmp_path / "local"))
    ckpt = run.load_checkpoint()
    assert ckpt.epoch == 1 and "trainer" not in ckpt.meta
    assert run.storage.read_bytes("metrics.png")[:8] == b"\x89PNG\r\n\x1a\n"  # the same plot as on Ray


@pytest.mark.slow
def test_ray_job_submit_runs_a_tiny_training(tmp_path: Path) -> None:
    """The documented cluster flow against a separate local head: ray start, ray job submit, stop."""
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # stop at once on SIGTERM (no node drain)
    }
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # they would override --address
        env.pop(name, None)
    head, url, temp_dir = _start_head(env, tmp_path / "head.log")
    try:
        config = tmp_path / "tiny.yaml"
        config.write_text(yaml.safe_dump({"train": tiny("job", 1)}))
        storage = tmp_path / "results"
        # a previous run of another architecture under the same name, with derived files: --fresh discards it
        old = TrainConfig.model_validate({**tiny("job", 1), "model": {"arch": "resnet20"}})
        previous = Run(Storage.open(storage / "job"))
        previous.save_checkpoint(make_checkpoint(build_model(old.model), old, 7, {}))
        previous.storage.write_bytes("bn_stats.pt", b"statistics of the old model")
        command = [
            str(BIN / "ray"),
            "job",
            "submit",
            f"--address={url}",
            f"--working-dir={REPO}",
            "--runtime-env-json",
            '{"excludes": [".git", ".venv", "tbn-results"]}',
            "--",
            "tbn-ray",
            "train",
            "--config",
            str(config),
            "--storage",
            str(storage),
            "--workers",
            "2",
            "--fresh",
        ]
        deadline = time.monotonic() + HANG_S
        while True:  # the dashboard answers before the head's job agent is ready
            submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=HANG_S)
            if "No available agent" not in submit.stdout + submit.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
        assert (
            "succeeded" in submit.stdout and "Ray cluster" in submit.stdout
        )  # joined the head, no instance of its own
        ckpt = Run.open(str(storage / "job")).load_checkpoint()
        assert ckpt.epoch == 1 and ckpt.meta["trainer"] == "ray" and ckpt.meta["workers"] == 2
        assert ckpt.config.model.arch == "tiny" and ckpt.meta["started_at_epochs"] == [0]
        assert not previous.storage.exists("bn_stats.pt")
    finally:
        _stop_head(head, temp_dir)
