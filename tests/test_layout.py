"""One certification folder, one shard count: the run id leaves the count out (the numbers do
not depend on it), so two ``--shards`` values could fill one folder with two shard sets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tbn_ray.config import CertifyConfig
from tbn_ray.errors import TbnError
from tbn_ray.jobs.certify import aggregate, certify_run, plan_certify
from tbn_ray.store.certify_layout import refuse_other_shard_count, refuse_two_shard_sets, shard_sets
from tbn_ray.store.storage import Storage

from .helpers import tiny_run


def test_a_second_shard_count_is_refused_and_two_sets_are_never_merged(tmp_path: Path) -> None:
    run = tiny_run(Storage.open(tmp_path))
    cfg = CertifyConfig(sigmas=(0.25,), n0=10, n=50, batch_size=50, max_images=4)
    output = Storage.open(tmp_path / "certify")
    (first,) = certify_run(run, cfg.model_copy(update={"shards": 2}), output, device="cpu", progress=False)
    out = Storage.open(first.location.rpartition("/")[0])
    refuse_other_shard_count(out, 2)  # resuming with the same count is fine
    refuse_other_shard_count(Storage.open(tmp_path / "nothing-yet"), 4)  # and so is a new folder
    with pytest.raises(TbnError) as excinfo:
        refuse_other_shard_count(out, 4)
    assert str(excinfo.value) == (
        f"{out.uri} holds this certification cut into 2 shards, not 4: resume it with --shards 2, "
        f"or delete {out.uri} to start over in 4"
    )
    refuse_two_shard_sets(out, shard_sets(out.list()))

    # certify itself now refuses a second count in that folder
    with pytest.raises(TbnError, match="holds this certification cut into 2 shards, not 4"):
        certify_run(run, cfg.model_copy(update={"shards": 4}), output, device="cpu", progress=False)
    # a folder that holds two sets anyway (left by an older version): aggregation never picks one
    (elsewhere,) = certify_run(
        run, cfg.model_copy(update={"shards": 4}), Storage.open(tmp_path / "elsewhere"), device="cpu", progress=False
    )
    other = Storage.open(elsewhere.location.rpartition("/")[0])
    for key in shard_sets(other.list())["sigma=0.25"][4].values():
        out.write_bytes(key, other.read_bytes(key))
    found = shard_sets(out.list())
    assert {n: len(keys) for n, keys in found["sigma=0.25"].items()} == {2: 2, 4: 4}
    with pytest.raises(TbnError, match=r"sigma=0\.25 holds two shard sets \(2 and 4 shards\): delete"):
        refuse_two_shard_sets(out, found)
    with pytest.raises(TbnError, match=r"holds two shard sets"):
        aggregate(out)


def test_the_folder_a_gpu_pool_certifies_into_is_checked_too(tmp_path: Path) -> None:
    """Planning checks the CPU run id's folder; a GPU Ray pool re-plans on CUDA (another noise
    stream, another run id), and that folder gets the same one-count check."""
    run = tiny_run(Storage.open(tmp_path))
    cfg = CertifyConfig(sigmas=(0.25,), n0=10, n=50, batch_size=50, max_images=4)
    output = Storage.open(tmp_path / "certify")
    on_gpu = plan_certify(run, cfg.model_copy(update={"shards": 4}), output, device_type="cuda")
    on_gpu.out.write_bytes("sigma=0.25/shard-00000-of-00004.parquet", b"a shard a GPU pool stored")
    plan = plan_certify(run, cfg.model_copy(update={"shards": 2}), output)
    assert plan.on_device("cpu").out.uri == plan.out.uri != on_gpu.out.uri
    with pytest.raises(
        TbnError, match=re.escape(f"{on_gpu.out.uri} holds this certification cut into 4 shards, not 2")
    ):
        plan.on_device("cuda")
    assert (
        plan_certify(run, cfg.model_copy(update={"shards": 4}), output).on_device("cuda").out.uri == on_gpu.out.uri
    )  # the same count resumes
