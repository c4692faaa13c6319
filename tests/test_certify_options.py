"""The sampling-engine options through the sharded job: packed forward passes and the adaptive
sample size each get their own run id, store what they did, and resume like any certification.
(Their soundness against a classifier with a known radius: tests/test_sampling.py, test_adaptive.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from tbn_ray.config import AdaptiveConfig, CertifyConfig, DataConfig
from tbn_ray.jobs.certify import plan_certify, run_plan_in_process
from tbn_ray.science.sequential import STOP_REASONS
from tbn_ray.store.runs import Run
from tbn_ray.store.storage import Storage

from .helpers import SHARED_DATA

FIXTURE_RUN = Path(__file__).parent / "fixtures" / "legacy-store" / "runs" / "tiny"
CPU = torch.device("cpu")


@pytest.fixture
def run(tmp_path: Path) -> Run:
    if not (SHARED_DATA / "cifar10-partial" / "cifar10_test_prefix.npz").is_file():
        pytest.skip(f"CIFAR-10 subset not found under {SHARED_DATA}")
    target = tmp_path / "tiny"
    target.mkdir()
    for name in ("checkpoint.pt", "bn_stats.pt", "config.yaml"):
        shutil.copy(FIXTURE_RUN / name, target / name)
    return Run.open(str(target))


def _certify(run: Run, cfg: CertifyConfig, out: Storage):  # type: ignore[no-untyped-def]
    data = DataConfig(source="partial", shared_dir=str(SHARED_DATA))
    return run_plan_in_process(
        plan_certify(run, cfg.model_copy(update={"data": data, "shards": 2}), out), CPU, progress=False
    )


def _records(location: str) -> list[dict]:
    return pq.read_table(Path(location) / "radii.parquet").to_pylist()


def test_packed_and_adaptive_runs_have_their_own_ids_records_and_resume(run: Run, tmp_path: Path) -> None:
    out = Storage.open(tmp_path / "certify")
    base = CertifyConfig(sigmas=(0.25,), n0=20, n=2000, batch_size=250, skip=3, max_images=6)
    fixed = _certify(run, base, out)
    packed = _certify(run, base.model_copy(update={"images_per_pass": 3}), out)
    adaptive_cfg = AdaptiveConfig(pilot=200, extra_pilots=(), max_loss=0.1)
    pilot = {"adaptive": True, "adaptive_design": "pilot", "adaptive_sampling": adaptive_cfg}
    adaptive = _certify(run, base.model_copy(update=pilot), out)
    sequential = _certify(run, base.model_copy(update={"adaptive": True}), out)  # the default design
    assert len({fixed.run_id, packed.run_id, adaptive.run_id, sequential.run_id}) == 4
    s = _records(sequential.outputs[0].location)
    assert [r["c_a_hat"] for r in s] == [r["c_a_hat"] for r in _records(fixed.outputs[0].location)]
    assert all(r["stopped"] in STOP_REASONS and r["n_bound"] <= sum(r["counts"]) <= base.n for r in s)
    # a guess that is not the label is not sampled further (skip_misclassified, the default)
    assert all((r["stopped"] == "misclassified") == (r["c_a_hat"] != r["label"]) for r in s)
    assert all(r["samples"] == base.n0 and r["predict"] == -1 for r in s if r["stopped"] == "misclassified")
    seq_params = json.loads((Path(sequential.outputs[0].location) / "summary.json").read_text())["params"]["adaptive"]
    assert seq_params["design"] == "sequential" and seq_params["growth"] == CertifyConfig().sequential.growth

    f, p, a = (_records(r.outputs[0].location) for r in (fixed, packed, adaptive))
    # packing changes which images share a forward pass, not any image's noise: the same selection
    assert [r["c_a_hat"] for r in p] == [r["c_a_hat"] for r in f]
    assert sum(r["counts"] == q["counts"] for r, q in zip(p, f)) >= 5
    # the pilot design: the same selection draws, at most n estimation draws, what it did is stored,
    # and its parameters exactly as stored before designs existed (so stored pilot runs keep their ids)
    assert [r["c_a_hat"] for r in a] == [r["c_a_hat"] for r in f]
    assert all(r["n_bound"] <= base.n and r["n"] == base.n for r in a)
    summary = json.loads((Path(adaptive.outputs[0].location) / "summary.json").read_text())
    assert summary["params"]["adaptive"] == adaptive_cfg.model_dump(mode="json")
    assert summary["forward_passes_per_image"] == pytest.approx(sum(r["samples"] for r in a) / len(a))
    assert "adaptive" not in json.loads((Path(fixed.outputs[0].location) / "summary.json").read_text())["params"]

    again = _certify(run, base.model_copy(update=pilot), out)
    assert (again.run_id, again.shards_computed, again.shards_skipped) == (adaptive.run_id, 0, 2)


def test_clipped_noise_is_a_base_classifier_of_its_own(run: Run, tmp_path: Path) -> None:
    """clip: the same noise and selection as without it, another run id, and the votes of f(clip(x + noise))."""
    out = Storage.open(tmp_path / "certify")
    base = CertifyConfig(sigmas=(0.5,), n0=20, n=400, batch_size=200, skip=5, max_images=4)
    plain = _certify(run, base, out)
    clipped = _certify(run, base.model_copy(update={"clip": True}), out)
    assert plain.run_id != clipped.run_id
    assert json.loads(Path(clipped.outputs[0].location, "summary.json").read_text())["params"]["clip"] is True
    p, c = (_records(r.outputs[0].location) for r in (plain, clipped))
    assert [r["idx"] for r in p] == [r["idx"] for r in c]
    assert any(r["counts"] != q["counts"] for r, q in zip(p, c))  # at sigma 0.5 clamping changes votes
