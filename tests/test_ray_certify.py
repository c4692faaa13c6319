"""Sharded certification: shard plan, per-example reproducibility, Ray actors on a real local Ray
with a real S3 server (moto over HTTP), fault tolerance, resumption and CLI errors.

The model is a tiny CNN, UNTRAINED (He-initialised, seed 0) but TBN-calibrated at each sigma on
noisy held-out images of the byte-exact CIFAR-10 subset: its smoothed predictions mix certified
images and abstentions, which is what the exact-equality checks need, at a fraction of the cost
of training. Certification is small (n0=20, n=200) so that shards take about a second.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from tbn_ray.cli import app
from tbn_ray.config import CalibrateConfig, CertifyConfig, DataConfig, ModelConfig, TrainConfig
from tbn_ray.errors import TbnError
from tbn_ray.jobs.certify import ShardResult, certify_run, plan_certify, run_plan_in_process
from tbn_ray.jobs.engine import pending
from tbn_ray.jobs.pipeline import calibrate_run
from tbn_ray.science.models import build_model
from tbn_ray.science.smoothing import certify_examples
from tbn_ray.store.runs import Run, make_checkpoint
from tbn_ray.store.storage import Storage

from .helpers import HANG_S, SHARED_DATA, kill_soon, s3_last_modified, wait_actors_gone

SIGMAS = (0.25, 0.5)
SMALL = {"n0": 20, "n": 200, "batch_size": 100, "skip": 7}
# Fields of a record that depend only on (model, statistics, seed, index, n0, n, batch size).
EXACT = ("idx", "label", "predict", "radius", "correct", "p_a_lower", "count", "c_a_hat", "counts", "counts_selection")
TIMING = ("wall_seconds", "compute_seconds", "gpu_hours", "workers")
CLI_SMALL = ["--n0", "20", "--n", "200", "--batch-size", "100", "--skip", "7"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """An untrained tiny model with TBN statistics calibrated at both sigmas (local storage)."""
    if not (SHARED_DATA / "cifar10-partial" / "cifar10_test_prefix.npz").is_file():
        pytest.skip(f"CIFAR-10 subset not found under {SHARED_DATA}")
    r = Run(Storage.open(tmp_path_factory.mktemp("runs")).child("tiny"))
    cfg = TrainConfig(
        name="tiny", model=ModelConfig(arch="tiny"), data=DataConfig(source="partial", shared_dir=str(SHARED_DATA))
    )
    torch.manual_seed(0)
    r.save_checkpoint(make_checkpoint(build_model(cfg.model), cfg, 0, {"note": "untrained"}))
    calibrate_run(r, CalibrateConfig(sigmas=SIGMAS, samples=256, batch_size=128), device="cpu", progress=False)
    return r


def certify_cfg(images: int, sigmas: tuple[float, ...] = SIGMAS, **overrides) -> CertifyConfig:
    return CertifyConfig(sigmas=sigmas, max_images=images, **{**SMALL, **overrides})


def read_records(out: Storage, sigma: float) -> list[dict]:
    table = pq.read_table(io.BytesIO(out.read_bytes(f"sigma={sigma:g}/radii.parquet")))
    return sorted(table.to_pylist(), key=lambda r: r["idx"])


def exact(records: list[dict]) -> list[tuple]:
    return [tuple(r[k] for k in EXACT) for r in records]


def shard_keys(out: Storage) -> list[str]:
    return [k for k in out.list() if "/shard-" in k]


def last_modified(out: Storage) -> dict[str, float]:
    """LastModified of every shard object, straight from S3."""
    return s3_last_modified(out.uri, lambda key: "/shard-" in key)


# --- no Ray ---------------------------------------------------------------------------------


def test_shard_plan_is_fixed_and_run_id_tracks_what_changes_numbers(run: Run, tmp_path: Path) -> None:
    out = Storage.open(tmp_path)
    plan = plan_certify(run, certify_cfg(30, shards=8), out)
    again = plan_certify(run, certify_cfg(30, shards=8), out)
    shards = [plan.shard_indices(k) for k in range(8)]
    # a partition of the selection into contiguous near-equal shards, identical on every re-plan
    assert np.array_equal(np.concatenate(shards), plan.indices)
    assert {len(s) for s in shards} <= {3, 4}
    assert all(np.array_equal(a, again.shard_indices(k)) for k, a in enumerate(shards))
    assert plan.run_id == again.run_id
    assert plan.shard_key(0.25, 7) == "sigma=0.25/shard-00007-of-00008.parquet"
    # the default number of shards is capped at the number of images
    assert plan_certify(run, certify_cfg(5), out).shards == 5
    # anything that changes a certificate changes the run id; the shard count does not
    assert plan_certify(run, certify_cfg(30, shards=3), out).run_id == plan.run_id
    for other in (
        plan_certify(run, certify_cfg(30, n=201, shards=8), out),
        plan_certify(run, certify_cfg(30, seed=1, shards=8), out),
        plan_certify(run, certify_cfg(30, batch_size=50, shards=8), out),
        plan_certify(run, certify_cfg(30, sigmas=(0.25,), shards=8), out),
        plan_certify(run, certify_cfg(31, shards=8), out),
        plan_certify(run, certify_cfg(30, shards=8, channels_last=True), out),
        plan_certify(run, certify_cfg(30, shards=8, fold_bn=True), out),
    ):
        assert other.run_id != plan.run_id


def test_bad_plans_fail_before_any_work(run: Run, tmp_path: Path) -> None:
    out = Storage.open(tmp_path / "out")
    with pytest.raises(TbnError, match="--shards 31"):
        plan_certify(run, certify_cfg(30, shards=31), out)
    with pytest.raises(TbnError, match="no TBN statistics 'sigma=0.33'"):
        plan_certify(run, certify_cfg(30, sigmas=(0.25, 0.33)), out)
    with pytest.raises(TbnError, match="no test images selected"):
        plan_certify(run, certify_cfg(30, start=5000), out)
    for bad in ("10:5", "7", "a:b"):
        result = CliRunner().invoke(
            app, ["certify", run.uri, "--local", "--indices", bad, "--output", str(tmp_path / "out")]
        )
        assert isinstance(result.exception, TbnError) and "--indices" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_counts_of_an_image_do_not_depend_on_its_shard(run: Run, tmp_path: Path) -> None:
    """Per-example seeds: 3 shards, 8 shards and one certify_examples call give identical counts."""
    cfg = certify_cfg(8, sigmas=(0.5,))
    by_shards = {}
    for shards in (3, 8):
        out = Storage.open(tmp_path / f"s{shards}")
        outputs = certify_run(run, cfg.model_copy(update={"shards": shards}), out, device="cpu", progress=False)
        by_shards[shards] = read_records(Storage.open(outputs[0].location.rpartition("/")[0]), 0.5)
    assert exact(by_shards[3]) == exact(by_shards[8])
    plan = plan_certify(run, cfg, Storage.open(tmp_path / "direct"))
    model = plan.build_model(torch.device("cpu"))
    from tbn_ray.science.tbn import set_bn_stats

    set_bn_stats(model, plan.stats[0.5])
    direct = certify_examples(model, plan.test.images, plan.test.labels, plan.indices, cfg, sigma=0.5, device="cpu")
    assert exact(direct) == exact(by_shards[3])
    assert len({r["predict"] for r in direct}) > 1  # not a degenerate constant classifier


def test_local_cli_resume_recomputes_only_unusable_shards(run: Run, tmp_path: Path) -> None:
    """`certify --local`; then one shard corrupt and one holding another shard's records: only those two are redone."""
    args = [
        "certify",
        run.uri,
        "--local",
        "--sigma",
        "0.5",
        "--max-images",
        "8",
        *CLI_SMALL,
        "--shards",
        "4",
        "--output",
        str(tmp_path),
    ]
    first = CliRunner().invoke(app, [*args, "--no-progress"])
    assert first.exit_code == 0, first.output
    assert "4 shard(s) certified now, 0 reused" in first.output
    (sigma_dir,) = tmp_path.glob("*/sigma=0.5")
    before = {p.name: p.read_bytes() for p in sigma_dir.glob("shard-*")}
    (sigma_dir / "shard-00001-of-00004.parquet").write_bytes(b"PAR1 truncated")
    (sigma_dir / "shard-00002-of-00004.parquet").write_bytes(before["shard-00000-of-00004.parquet"])
    again = CliRunner().invoke(app, [*args, "--no-progress"])
    assert again.exit_code == 0, again.output
    assert "2 shard(s) certified now, 2 reused" in again.output
    records = read_records(Storage.open(sigma_dir.parent), 0.5)
    assert len(records) == 8 and len({r["idx"] for r in records}) == 8
    # per-example seeds: the recomputed shards hold the very same records as the first time
    for name, data in before.items():
        table = pq.read_table(io.BytesIO((sigma_dir / name).read_bytes()))
        assert exact(table.to_pylist()) == exact(pq.read_table(io.BytesIO(data)).to_pylist())


def test_actor_pool_shape_follows_the_nodes() -> None:
    from tbn_ray.distributed.pool import actor_shape

    def node(cpu: float, gpu: float = 0, alive: bool = True) -> dict:
        return {"Alive": alive, "Resources": {"CPU": cpu, **({"GPU": gpu} if gpu else {})}}

    # a GPU cluster: head schedules nothing, two g5.xlarge-like workers, a dead node ignored
    gpu_cluster = [node(0), node(4, 1), node(4, 1), node(8, 1, alive=False)]
    assert actor_shape(gpu_cluster, work=64) == actor_shape(gpu_cluster, work=64, gpus_per_actor=1)
    shape = actor_shape(gpu_cluster, work=64)
    assert (shape.actors, shape.cpus, shape.gpus, shape.threads) == (2, 4.0, 1.0, 4)
    assert actor_shape(gpu_cluster, work=1).actors == 1  # never more actors than pending shards
    assert actor_shape(gpu_cluster, work=64, gpus_per_actor=0.5).actors == 4
    # CPU only: one single-threaded actor per core
    assert actor_shape([node(2)], work=64) == type(shape)(actors=2, cpus=1.0, gpus=0.0)
    with pytest.raises(TbnError, match="no node of this Ray cluster has 1 CPU \\+ 1 GPU"):
        actor_shape([node(2)], work=64, gpus_per_actor=1)
    assert actor_shape([node(2)], work=64, gpus_per_actor=1, autoscaling=True).actors == 1  # the autoscaler may add one


@pytest.mark.ray
def test_the_driver_lists_the_nodes_at_most_every_few_seconds(ray_local, monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver looks for units stranded on dead nodes on every wait; it asks ``ray.nodes()`` (a
    GCS round trip listing every node) again only after NODES_TTL_S, or at once for a node it has
    not listed yet. The real ``ray.nodes`` of a running Ray, every call counted, on an injected
    clock: the outcome does not depend on how fast this machine runs."""
    import ray

    from tbn_ray.distributed import pool

    now = [100.0]
    calls: list[float] = []
    real_nodes = ray.nodes

    def counted_nodes() -> list[dict]:
        calls.append(now[0])
        return real_nodes()

    monkeypatch.setattr(pool.ray, "nodes", counted_nodes)
    bookkeeping = pool._Pool(plan_ref=None, units=None, label=str, clock=lambda: now[0])  # type: ignore[arg-type]
    node = real_nodes()[0]["NodeID"]
    for t in (100.0, 101.0, 103.0, 104.9, 105.2, 106.0, 110.0, 110.3):
        now[0] = t
        assert bookkeeping.alive({node}) == {node}
    assert calls == [100.0, 105.2, 110.3]  # the first look, then once NODES_TTL_S (5 s) has passed each time
    now[0] = 111.0
    assert (
        bookkeeping.alive({node, "a-node-not-listed-yet"}) == {node} and calls[-1] == 111.0
    )  # an unknown node: asked at once


# --- Ray ------------------------------------------------------------------------------------


@pytest.mark.ray
def test_8_shards_on_2_actors_to_s3_equal_in_process(run: Run, ray_local, s3_bucket: str, tmp_path: Path) -> None:
    from tbn_ray.distributed.certify import run_plan_on_ray

    cfg = certify_cfg(16)
    cfg = cfg.model_copy(
        update={"shards": 8, "channels_last": True, "fold_bn": True}
    )  # the fast base classifier, built alike in every process
    plan = plan_certify(run, cfg, Storage.open(f"{s3_bucket}/certify"))
    result = run_plan_on_ray(plan, ray_local, actors=2, cpus_per_actor=1, progress=False)
    assert (result.shards_computed, result.shards_skipped) == (16, 0)
    out = Storage.open(result.location)
    assert len(shard_keys(out)) == 16
    local = run_plan_in_process(plan_certify(run, cfg, Storage.open(tmp_path)), torch.device("cpu"), progress=False)
    assert local.run_id == result.run_id  # same parameters, same device type: the same certification
    for sigma in SIGMAS:
        records = read_records(out, sigma)
        assert [r["idx"] for r in records] == plan.indices.tolist()  # every index exactly once
        tsv = out.read_text(f"sigma={sigma:g}/certify.tsv").splitlines()
        assert tsv[0].split("\t") == ["idx", "label", "predict", "radius", "correct", "time"]
        assert sorted(int(line.split("\t")[0]) for line in tsv[1:]) == plan.indices.tolist()
        assert exact(records) == exact(read_records(Storage.open(local.location), sigma))
        assert len({r["actor"] for r in records}) == 2  # both actors did work
        summary = out.read_json(f"sigma={sigma:g}/summary.json")
        expected = Storage.open(local.location).read_json(f"sigma={sigma:g}/summary.json")
        for s in (summary, expected):
            s.pop("seconds_per_image")
            for key in TIMING:
                s["params"].pop(key)
        assert summary == expected
    assert b"PNG" in out.read_bytes("certified_accuracy.png")[:8]
    assert "best sigma per radius" in out.read_text("report.md")

    # `tbn-ray report` rebuilds the results and the report from the shard files alone
    for sigma in SIGMAS:
        for name in ("certify.tsv", "radii.parquet", "summary.json"):
            out.delete(f"sigma={sigma:g}/{name}")
    out.delete("report.md")
    cli = CliRunner().invoke(app, ["report", result.location])
    assert cli.exit_code == 0, cli.output
    assert "| measured | 0.25 |" in cli.output
    for sigma in SIGMAS:
        assert exact(read_records(out, sigma)) == exact(read_records(Storage.open(local.location), sigma))


@pytest.mark.ray
def test_actor_killed_mid_shard_run_completes(run: Run, ray_local, s3_bucket: str) -> None:
    from tbn_ray.distributed.certify import run_plan_on_ray

    plan = plan_certify(run, certify_cfg(16, sigmas=(0.25,), n=600, shards=8), Storage.open(f"{s3_bucket}/certify"))
    results: list[ShardResult] = []
    killed: list[str] = []

    def on_shard(result: ShardResult) -> None:
        results.append(result)
        if not killed:
            killed.append(result.worker["pid"])
            kill_soon(int(result.worker["pid"]))

    result = run_plan_on_ray(plan, ray_local, actors=2, cpus_per_actor=1, progress=False, on_shard=on_shard)
    assert result.shards_computed == 8
    # the shard in flight when the actor died was retried on its restarted process
    restarted = [r for r in results if r.worker["restarted"] == "True"]
    assert restarted and all(r.worker["pid"] != killed[0] for r in restarted)
    records = read_records(Storage.open(result.location), 0.25)
    assert [r["idx"] for r in records] == plan.indices.tolist()


@pytest.mark.ray
def test_interrupted_driver_resumes_only_missing_shards(run: Run, ray_local, s3_bucket: str) -> None:
    from tbn_ray.distributed.certify import run_plan_on_ray

    # the run itself on S3 too
    s3_run = Run(Storage.open(f"{s3_bucket}/runs/tiny"))
    s3_run.save_checkpoint(run.load_checkpoint())
    s3_run.save_bn_sets(run.load_bn_sets())
    plan = plan_certify(s3_run, certify_cfg(16, sigmas=(0.25,), shards=8), Storage.open(f"{s3_bucket}/certify"))

    seen: list[int] = []

    def interrupt_after_3(result: ShardResult) -> None:
        seen.append(result.shard)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_plan_on_ray(plan, ray_local, actors=2, cpus_per_actor=1, progress=False, on_shard=interrupt_after_3)
    wait_actors_gone(ray_local, "CertifyActor")
    before = last_modified(plan.out)
    assert 3 <= len(before) < 8
    # resumed by the command line (Ray path, joining the session's cluster): same plan, same run id
    args = [
        s3_run.uri,
        "--sigma",
        "0.25",
        "--max-images",
        "16",
        *CLI_SMALL,
        "--shards",
        "8",
        "--output",
        f"{s3_bucket}/certify",
    ]
    cli = CliRunner().invoke(app, ["certify", *args, "--actors", "2", "--cpus-per-actor", "1", "--no-progress"])
    assert cli.exit_code == 0, cli.output
    assert f"{8 - len(before)} shard(s) certified now, {len(before)} reused" in cli.output
    after = last_modified(plan.out)
    assert len(after) == 8 and all(after[k] == t for k, t in before.items())  # finished shards untouched
    assert [r["idx"] for r in read_records(plan.out, 0.25)] == plan.indices.tolist()


@pytest.mark.ray
def test_s3_outage_fails_clearly_and_rerun_finishes(run: Run, ray_local, s3_bucket: str, restartable_s3) -> None:
    from tbn_ray.distributed.certify import run_plan_on_ray

    plan = plan_certify(run, certify_cfg(16, sigmas=(0.25,), shards=8), Storage.open(f"{s3_bucket}/certify"))

    seen: list[int] = []

    def stop_s3_after_2(result: ShardResult) -> None:
        seen.append(result.shard)
        if len(seen) == 2:
            restartable_s3.stop()

    with pytest.raises(TbnError, match="cannot reach the S3 endpoint"):
        run_plan_on_ray(plan, ray_local, actors=2, cpus_per_actor=1, progress=False, on_shard=stop_s3_after_2)
    wait_actors_gone(ray_local, "CertifyActor")
    restartable_s3.start()
    present = shard_keys(plan.out)
    assert 2 <= len(present) < 8
    assert len(pending(plan).units) == 8 - len(present)  # every object there is a complete, verified shard
    resumed = run_plan_on_ray(plan, ray_local, actors=2, cpus_per_actor=1, progress=False)
    assert (resumed.shards_computed, resumed.shards_skipped) == (8 - len(present), len(present))
    assert [r["idx"] for r in read_records(plan.out, 0.25)] == plan.indices.tolist()


# --- the command line ---------------------------------------------------------------------


def test_cli_bad_input_one_line_exit_2(run: Run, s3_server: str, tmp_path: Path) -> None:
    """Each error comes before Ray starts: one stderr line, exit status 2."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")
    # the console entry point pyproject declares (tbn-ray = tbn_ray.cli:main), as a fresh process
    entry = [sys.executable, "-c", "from tbn_ray.cli import main; main()"]
    common = ["--n0", "20", "--n", "200", "--max-images", "16", "--output", str(tmp_path / "out")]
    cases = {
        "--shards 17": ([run.uri, "--sigma", "0.25", *common, "--shards", "17"], "--shards 17"),
        "unknown sigma": ([run.uri, "--sigma", "0.33", *common], "no TBN statistics 'sigma=0.33'"),
        "unreadable checkpoint": ([str(broken), "--sigma", "0.25", *common], "not a readable tbn-ray checkpoint"),
        "missing bucket": (
            [run.uri, "--sigma", "0.25", *common, "--output", "s3://no-such-bucket-tbn/x"],
            "bucket 'no-such-bucket-tbn' does not exist",
        ),
    }
    procs = {
        name: subprocess.Popen([*entry, "certify", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (args, _) in cases.items()
    }
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=HANG_S)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, (name, stderr)
        assert lines[-1].startswith("tbn-ray: error: ") and cases[name][1] in lines[-1], (name, stderr)
        assert "Traceback" not in stderr and "dashboard" not in stderr, (name, stderr)  # Ray never started
