"""Results stored by an earlier version are still found, reused and rebuilt byte for byte.

``fixtures/legacy-store`` is the content of an S3 bucket as the job code of commit c832da7 left
it (see its README): a tiny model trained here for one epoch on 384 images of the byte-exact
subset, TBN statistics at two sigmas, a certification (2 sigmas, 8 images, 2 shards, n=50), a
corruption evaluation (2 corruptions x 2 severities + clean, 16 images, 3 BN modes) and an
attack evaluation (PGD and APGD-CE, 12 images, 2 BN modes). The run lives at a fixed S3 URI
(a real moto server), so the run and eval ids, which name the run, are the stored ones.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from tbn_ray.config import CertifyConfig, DataConfig, EvaluateConfig
from tbn_ray.jobs.certify import plan_certify, run_plan_in_process
from tbn_ray.jobs.evaluate import run_in_process
from tbn_ray.jobs.evaluate_attack import plan_attack
from tbn_ray.jobs.evaluate_corruptions import plan_corruptions
from tbn_ray.store.runs import Run
from tbn_ray.store.storage import Storage

from .helpers import SHARED_DATA

FIXTURE = Path(__file__).parent / "fixtures" / "legacy-store"
BUCKET = "tbn-legacy"
RUN_URI = f"s3://{BUCKET}/runs/tiny"
RUN_ID = "tiny-n50-4deae9292058d77c"
CORRUPTIONS_ID = "tiny-53efd59e1afd9589"
ATTACK_ID = "tiny-41550639af200af5"
CPU = torch.device("cpu")
#: The run itself (weights, configuration, TBN statistics): what a fresh run starts from.
RUN_FILES = ("runs/tiny/checkpoint.pt", "runs/tiny/config.yaml", "runs/tiny/bn_stats.pt")
#: Files the jobs rebuild from the stored units (shards, items) on every run.
_CERTIFY = f"runs/tiny/certify/{RUN_ID}"
AGGREGATED = (
    *(
        f"{_CERTIFY}/sigma={s}/{name}"
        for s in ("0.25", "0.5")
        for name in ("certify.tsv", "radii.parquet", "summary.json")
    ),
    f"{_CERTIFY}/report.md",
    f"{_CERTIFY}/report.json",
    f"{_CERTIFY}/certified_accuracy.png",
    f"runs/tiny/evaluate/corruptions/{CORRUPTIONS_ID}/result.json",
    f"runs/tiny/evaluate/attack/{ATTACK_ID}/result.json",
    "runs/tiny/evaluate/report.md",
    "runs/tiny/evaluate/evaluation.json",
    "runs/tiny/evaluate/corruption_accuracy.png",
)
#: What depends on when and where a unit ran, not on what it computed.
WHEN_AND_WHERE = {
    "time",
    "seconds",
    "started",
    "wall_seconds",
    "compute_seconds",
    "gpu_hours",
    "seconds_per_image",
    "worker",
    "actor",
    "node",
}


def _files() -> dict[str, bytes]:
    return {
        p.relative_to(FIXTURE).as_posix(): p.read_bytes()
        for p in sorted(FIXTURE.rglob("*"))
        if p.is_file() and p.name != "README.md"
    }


@pytest.fixture
def bucket(s3_server: str) -> Storage:
    """The fixture's bucket, empty (a fixed name: the run's URI is part of every id)."""
    import boto3

    s3 = boto3.session.Session().resource("s3", endpoint_url=s3_server)
    b = s3.Bucket(BUCKET)
    if b.creation_date is None:
        b.create()
    b.objects.all().delete()
    return Storage.open(f"s3://{BUCKET}")


def _run_all(bucket: Storage) -> dict[str, Any]:
    """The three jobs of the fixture, planned exactly as when it was made, run in this process."""
    if not (SHARED_DATA / "cifar10-partial" / "cifar10_test_prefix.npz").is_file():
        pytest.skip(f"CIFAR-10 subset not found under {SHARED_DATA}")
    data = DataConfig(source="partial", shared_dir=str(SHARED_DATA))
    run = Run.open(RUN_URI)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        corruptions = run_in_process(
            plan_corruptions(
                run,
                ["clean", "sigma:0.25", "test-batch"],
                EvaluateConfig(corruptions="gaussian_noise,contrast", severities="1,5", batch_size=8),
                start=0,
                stop=16,
                data_cfg=data,
                progress=False,
            ),
            CPU,
            progress=False,
        )
        attack = run_in_process(
            plan_attack(
                run,
                ["clean", "test-batch"],
                EvaluateConfig(
                    attacks=("pgd", "apgd-ce"), norm="l2", eps=0.5, attack_steps=2, restarts=1, batch_size=6
                ),
                start=0,
                stop=12,
                data_cfg=data,
            ),
            CPU,
            progress=False,
        )
        cfg = CertifyConfig(sigmas=(0.25, 0.5), n0=20, n=50, batch_size=50, skip=3, max_images=8)
        certify = run_plan_in_process(
            plan_certify(run, cfg.model_copy(update={"data": data, "shards": 2}), run.storage.child("certify")),
            CPU,
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    assert (certify.run_id, corruptions.eval_id, attack.eval_id) == (RUN_ID, CORRUPTIONS_ID, ATTACK_ID)
    return {"certify": certify, "corruptions": corruptions, "attack": attack}


def test_stored_units_are_reused_and_the_aggregates_rebuilt_byte_for_byte(bucket: Storage) -> None:
    stored = _files()
    for key, data in stored.items():
        if key not in AGGREGATED:
            bucket.write_bytes(key, data)
    done = _run_all(bucket)
    assert (done["certify"].shards_computed, done["certify"].shards_skipped) == (0, 4)
    assert (done["corruptions"].items_computed, done["corruptions"].items_skipped) == (0, 15)
    assert (done["attack"].items_computed, done["attack"].items_skipped) == (0, 8)
    for key in AGGREGATED:
        assert bucket.read_bytes(key) == stored[key], key
    for key in stored:  # the stored units themselves are left as they were
        assert bucket.read_bytes(key) == stored[key], key


def _without(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without(v) for k, v in value.items() if k not in WHEN_AND_WHERE}
    if isinstance(value, list):
        return [_without(v) for v in value]
    return value


def _comparable(key: str, data: bytes) -> Any:
    """A file's content less when and where it was computed (times, worker, host)."""
    if key.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
        meta = {k.decode(): json.loads(v) for k, v in (table.schema.metadata or {}).items() if k == b"tbn_ray.shard"}
        return _without(table.to_pylist()), _without(meta)
    if key.endswith(".tsv"):
        return _without(list(csv.DictReader(io.StringIO(data.decode()), delimiter="\t")))
    if key.endswith(".json"):
        return _without(json.loads(data))
    if key.endswith(".md"):  # the markdown names no time: compared as it is
        return data.decode()
    return data


def test_a_fresh_run_rebuilds_the_stored_files(bucket: Storage) -> None:
    stored = _files()
    for key in RUN_FILES:
        bucket.write_bytes(key, stored[key])
    done = _run_all(bucket)
    assert (done["certify"].shards_computed, done["corruptions"].items_computed, done["attack"].items_computed) == (
        4,
        15,
        8,
    )
    made = {k for k in bucket.list() if not k.endswith("sample_grid.png")}
    assert made == set(stored)
    for key in sorted(made - set(RUN_FILES)):
        assert _comparable(key, bucket.read_bytes(key)) == _comparable(key, stored[key]), key
