"""The Python API: the same records as the CLI for the same seeds, on a module or a run; results
kept and resumed under storage, nothing left behind without it; settings validated by the configs."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import tbn_ray
from tbn_ray.errors import TbnError
from tbn_ray.store.runs import Run

from .helpers import HANG_S, SHARED_DATA, copy_fixture_run

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "cifar10-partial").is_dir(), reason="CIFAR-10 subset absent")

SETTINGS = {"n0": 20, "n": 300, "alpha": 0.01, "skip": 7, "max_images": 5, "batch_size": 150, "seed": 3}
COMPARED = ("idx", "label", "predict", "radius", "correct", "count", "counts", "counts_selection", "p_a_lower")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return copy_fixture_run(tmp_path / "tiny")


def _same(records: list[dict]) -> list[tuple]:
    return [tuple(str(r[k]) for k in COMPARED) for r in sorted(records, key=lambda r: r["idx"])]


def test_api_on_a_module_gives_the_clis_records(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "tbn_ray",
            "certify",
            str(run_dir),
            "--sigma",
            "0.25",
            "--local",
            "--data",
            "partial",
            "--output",
            str(tmp_path / "cli"),
            "--no-progress",
            *flags,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    (cli_parquet,) = (tmp_path / "cli").glob("*/sigma=0.25/radii.parquet")
    by_cli = pq.read_table(cli_parquet).to_pylist()

    model, _ = Run.open(str(run_dir)).load_model()
    stats = Run.open(str(run_dir)).load_bn_sets()
    own_tmp = tmp_path / "tmp"  # this test's own temporary folder: other workers write to the shared one
    own_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(own_tmp))
    before = set(os.listdir(tempfile.gettempdir()))
    by_module = tbn_ray.certify(model, stats, sigma=0.25, data="partial", **SETTINGS)
    left = {e for e in set(os.listdir(tempfile.gettempdir())) - before if e.startswith("tbn-ray-")}
    assert left == set()  # the temporary results are gone
    assert by_module.location is None and _same(by_module.records[0.25]) == _same(by_cli)
    assert len({r["predict"] for r in by_cli}) > 1 or any(r["radius"] > 0 for r in by_cli)  # not a vacuous comparison

    by_run = tbn_ray.certify(str(run_dir), sigma=0.25, data="partial", **SETTINGS)
    assert _same(by_run.records[0.25]) == _same(by_cli)
    frame = by_run.to_pandas()
    assert list(frame["idx"]) == sorted(r["idx"] for r in by_cli) and "r=0.25" in by_run.table()
    assert by_run.summaries[0.25]["model"] == "tiny" and by_module.summaries[0.25]["model"].endswith(":Classifier")


def test_api_calibrate_then_certify_a_module_resumes_under_storage(run_dir: Path, tmp_path: Path) -> None:
    model, _ = Run.open(str(run_dir)).load_model()
    stats = tbn_ray.calibrate(model, sigmas=[0.5], samples=200, batch_size=100, data="partial")
    assert set(stats.sets) == {"clean", "sigma=0.5"} and stats.sets["sigma=0.5"]["meta"]["samples"] == 200
    first = tbn_ray.certify(model, stats, sigma=0.5, data="partial", storage=tmp_path / "kept", name="mine", **SETTINGS)
    assert first.location is not None and first.location.startswith(str(tmp_path / "kept" / "mine"))
    shard = next(Path(first.location).glob("sigma=0.5/shard-*.parquet"))
    stamp = shard.stat().st_mtime_ns
    again = tbn_ray.certify(model, stats, sigma=0.5, data="partial", storage=tmp_path / "kept", name="mine", **SETTINGS)
    assert again.run_id == first.run_id and shard.stat().st_mtime_ns == stamp  # resumed: nothing certified again
    assert _same(again.records[0.5]) == _same(first.records[0.5])


def test_api_settings_are_the_configs(run_dir: Path) -> None:
    with pytest.raises(TbnError, match="n0=: Input should be greater than or equal to 1"):
        tbn_ray.certify(str(run_dir), sigma=0.25, n0=0)
    with pytest.raises(TbnError, match="Extra inputs are not permitted"):
        tbn_ray.certify(str(run_dir), sigma=0.25, n_samples=10)
    with pytest.raises(TbnError, match="no TBN statistics 'sigma=0.33'"):
        tbn_ray.certify(str(run_dir), sigma=0.33, data="partial", **SETTINGS)
    model, _ = Run.open(str(run_dir)).load_model()
    with pytest.raises(TbnError, match="stats= is for a module"):
        tbn_ray.certify(str(run_dir), {"clean": {}}, sigma=0.25)
    with pytest.raises(TbnError, match="no TBN statistics"):  # a module without stats has only its clean ones
        tbn_ray.certify(model, sigma=0.25, data="partial", **SETTINGS)


def test_api_evaluate_attack_on_a_module_per_bn_mode(run_dir: Path) -> None:
    model, _ = Run.open(str(run_dir)).load_model()
    stats = Run.open(str(run_dir)).load_bn_sets()
    result = tbn_ray.evaluate_attack(
        model,
        stats,
        bn=["clean", "sigma:0.25"],
        attacks=["pgd"],
        attack_steps=2,
        batch_size=8,
        indices=(0, 8),
        data="partial",
    )
    rows = {(r["bn"], r["variant"]): r for r in result.rows()}
    assert {bn for bn, _ in rows} == {"clean", "sigma=0.25"}
    for row in rows.values():
        assert row["images"] == 8 and 0 <= row["pgd"] <= row["clean_accuracy"] <= 1
    assert result.location is None and len(result.to_pandas()) == len(rows)


def test_load_model_and_the_result_accessors(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tbn_ray.load_model for a run (path or bare name under the storage root) and for
    module:callable with weights; the accessors agree with the stored summary and the records."""
    import torch

    model = tbn_ray.load_model(str(run_dir))
    monkeypatch.setenv("TBN_STORAGE", str(run_dir.parent))
    by_name = tbn_ray.load_model("tiny")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert not model.training and torch.equal(model(x), by_name(x))
    with pytest.raises(TbnError, match="weights=, threat_model= and normalize= are for"):
        tbn_ray.load_model(str(run_dir), weights="w.pt")
    result = tbn_ray.certify(model, sigma=0.25, bn="clean", data="partial", **SETTINGS)
    summary = result.summaries[0.25]
    assert result.acr(0.25) == summary["acr"]
    for r in ("0.0", "0.25", "0.5"):
        assert result.certified_accuracy(0.25, float(r)) == pytest.approx(summary["certified_accuracy"][r])
    with pytest.raises(TbnError, match="no certification at sigma 0.5"):
        result.acr(0.5)
    attack = tbn_ray.evaluate_attack(
        model, bn="clean", data="partial", indices=(0, 4), attacks=["pgd"], attack_steps=1, batch_size=4
    )
    assert 0 <= attack.accuracy("clean", "pgd") <= 1
    with pytest.raises(TbnError, match="name the attack"):
        attack.accuracy("clean")
