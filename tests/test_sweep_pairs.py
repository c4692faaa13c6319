"""Sweep pairs evaluated in plain torch (no Ray), alone and as the engine job: a 1-epoch tiny model on the exact CIFAR-10 subset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tbn_ray.config import SweepConfig, parse_config
from tbn_ray.errors import TbnError
from tbn_ray.jobs.engine import pending, run_in_process
from tbn_ray.jobs.pipeline import train_run
from tbn_ray.jobs.sweep_pairs import ROW, SPLIT_KEYS, PairsJob, evaluate_pair, pair_key, split_heldout, train_config
from tbn_ray.science.tbn import bn_key
from tbn_ray.store.cifar10 import load_from_config
from tbn_ray.store.results import read_results
from tbn_ray.store.runs import Run
from tbn_ray.store.storage import Storage

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
EPS, SIGMA, VALIDATION = 0.25, 0.25, 16
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cfg() -> SweepConfig:
    """configs/sweep_tiny.yaml cut to seconds: 64 training images, one epoch, 16 validation images."""
    if not (SHARED / "cifar10-partial").is_dir():
        pytest.skip(f"exact CIFAR-10 subset not found at {SHARED / 'cifar10-partial'}")
    raw = yaml.safe_load((REPO / "configs" / "sweep_tiny.yaml").read_text())
    raw["train"]["data"].update(shared_dir=str(SHARED), train_limit=64)
    raw["train"]["optim"]["epochs"] = 1
    raw["train"]["eval"]["images"] = 32
    raw["calibrate"]["samples"] = 64
    raw["certify"].update(n0=8, n=32)
    raw["validation"]["images"] = VALIDATION
    return parse_config(SweepConfig, raw, "test sweep")


@pytest.fixture(scope="module")
def run(cfg: SweepConfig, tmp_path_factory: pytest.TempPathFactory) -> Run:
    torch.set_num_threads(1)
    run = Run(Storage.open(tmp_path_factory.mktemp("train") / "eps=0.25-t"))
    train_run(train_config(cfg, EPS, "eps=0.25-t"), run, progress=False)
    return run


def test_a_pair_is_evaluated_on_validation_images_with_tbn_from_the_disjoint_rest(
    cfg: SweepConfig, run: Run, tmp_path: Path
) -> None:
    first, again = Storage.open(tmp_path / "pair"), Storage.open(tmp_path / "again")
    row = evaluate_pair(cfg, run, EPS, SIGMA, first, CPU)
    assert first.read_json(ROW) == row
    records, summary = read_results(first)
    # the row reports the stored certification, of exactly the last VALIDATION held-out images
    heldout = load_from_config(cfg.train.data).heldout
    calibration, validation = split_heldout(heldout, VALIDATION)
    assert [r["idx"] for r in records] == validation.index.tolist()
    assert (row["acr"], row["certified_accuracy"]) == (summary["acr"], summary["certified_accuracy"])
    params = summary["params"]
    assert params["epsilon"] == EPS and params["bn"] == bn_key(SIGMA) and params["n"] == 32
    assert {k: params[k] for k in SPLIT_KEYS} == {k: row[k] for k in SPLIT_KEYS}
    assert row["calibration_index"][1] < row["validation_index"][0] and row["calibration_images"] == len(calibration)
    # the TBN set was estimated on the calibration part only, and fits the model
    (tbn,) = Run(first).load_bn_sets().values()
    assert tbn["meta"]["heldout_images"] == len(heldout) - VALIDATION
    model, _ = run.load_model()
    Run(first).bn_stats(bn_key(SIGMA), model)
    # per-example seeds: a re-evaluation certifies the same votes
    evaluate_pair(cfg, run, EPS, SIGMA, again, CPU)
    drop_time = lambda rs: [{k: v for k, v in r.items() if k != "time"} for r in rs]  # noqa: E731
    assert drop_time(read_results(again)[0]) == drop_time(records)


def test_an_unfinished_run_is_not_evaluated(cfg: SweepConfig, run: Run, tmp_path: Path) -> None:
    longer = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"optim": cfg.train.optim.model_copy(update={"epochs": 2})})}
    )
    with pytest.raises(TbnError, match="at epoch 1 of 2: run the sweep again"):
        evaluate_pair(longer, run, EPS, SIGMA, Storage.open(tmp_path / "pair"), CPU)
    assert not (tmp_path / "pair").exists()


def test_the_pairs_job_evaluates_each_pair_once_and_again_only_what_is_damaged(
    cfg: SweepConfig, run: Run, tmp_path: Path
) -> None:
    root = Storage.open(tmp_path / "sweep")
    job = PairsJob(cfg, root, ((EPS, run.uri),))
    assert [o for o, _ in job.outputs()] == [(EPS, s) for s in cfg.sigmas] and len(cfg.sigmas) == 2
    done: list[dict] = []
    rows = run_in_process(job, CPU, progress=False, on_unit=done.append)
    assert len(done) == 2 and rows == {(EPS, s): root.read_json(f"pairs/{pair_key(EPS, s)}/{ROW}") for s in cfg.sigmas}
    assert all(rows[(EPS, s)]["sigma"] == s and rows[(EPS, s)]["epsilon"] == EPS for s in cfg.sigmas)
    # the same job again: both rows stored and valid, nothing evaluated
    assert pending(job).missing == 0
    assert run_in_process(job, CPU, progress=False, on_unit=done.append) == rows and len(done) == 2
    # a damaged row, and one that names another pair, are evaluated again (whole), the rest kept
    first, second = (f"pairs/{pair_key(EPS, s)}/{ROW}" for s in cfg.sigmas)
    root.write_bytes(first, b"{not json")
    root.write_json(second, {**rows[(EPS, cfg.sigmas[1])], "sigma": 9.0})
    assert pending(job).missing == 2
    again = run_in_process(job, CPU, progress=False, on_unit=done.append)
    assert len(done) == 4
    timing = ("calibrate_seconds", "certify_seconds")
    for key in rows:  # per-example seeds: the same numbers
        assert {k: v for k, v in again[key].items() if k not in timing} == {
            k: v for k, v in rows[key].items() if k not in timing
        }
