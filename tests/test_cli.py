"""The command line end to end on real CIFAR-10 images (exact subset), and its one-line errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .helpers import HANG_S, SHARED_DATA

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "cifar10-partial").is_dir(), reason="CIFAR-10 subset absent")

TINY = """
train:
  name: tiny
  data: {source: partial, train_limit: 256}
  model: {arch: tiny}
  attack: {norm: l2, eps: 0.5, steps: 2}
  optim: {epochs: 1, batch_size: 64}
  eval: {images: 64}
calibrate:
  sigmas: [0.25]
  samples: 256
  batch_size: 128
certify:
  sigmas: [0.25]
  n0: 10
  n: 100
  alpha: 0.01
  skip: 100
  max_images: 6
  batch_size: 50
"""


def tbn(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TBN_STORAGE": str(cwd / "results")}
    return subprocess.run(
        [sys.executable, "-m", "tbn_ray", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG_S
    )


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run trained, calibrated and certified through the CLI, in-process (no Ray)."""
    work = tmp_path_factory.mktemp("cli")
    (work / "tiny.yaml").write_text(TINY)
    ok(tbn("train", "--config", "tiny.yaml", "--local", cwd=work))
    run = work / "results" / "tiny"
    ok(tbn("calibrate", str(run), "--config", "tiny.yaml", cwd=work))
    ok(tbn("certify", str(run), "--config", "tiny.yaml", "--local", cwd=work))
    return run


def test_train_calibrate_certify_report_through_the_cli(trained):
    ckpt = torch.load(trained / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["meta"]["data_source"] == "partial"
    assert (trained / "metrics.csv").is_file()
    bn = torch.load(trained / "bn_stats.pt", weights_only=True)
    assert {"clean", "sigma=0.25"} <= set(bn["sets"])
    tsvs = list(trained.rglob("certify.tsv"))
    assert len(tsvs) == 1
    with open(tsvs[0]) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [int(r["idx"]) for r in rows] == [0, 100, 200, 300, 400, 500]
    assert list(rows[0]) == ["idx", "label", "predict", "radius", "correct", "time"]
    summary = json.loads(tsvs[0].with_name("summary.json").read_text())
    params = summary["params"]
    assert summary["images"] == 6 and params["n"] == 100 and params["sigma"] == 0.25
    assert "byte-exact" in params["data"] and params["bn"] == "sigma=0.25"
    acr = sum(float(r["radius"]) * int(r["correct"]) for r in rows) / len(rows)
    assert summary["acr"] == pytest.approx(acr, abs=1e-3)
    rep = ok(tbn("report", str(tsvs[0].parent.parent), cwd=trained.parent.parent))
    assert "0.25" in rep.stdout and "Cohen" in rep.stdout


def test_fresh_training_discards_everything_derived_from_the_old_model(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "results" / "tiny")
    (tmp_path / "tiny.yaml").write_text(TINY)
    p = ok(tbn("train", "--config", "tiny.yaml", "--local", "--fresh", cwd=tmp_path))
    assert "--fresh: deleted the" in p.stdout and "nothing to do" not in p.stdout  # trained again, from scratch
    run = tmp_path / "results" / "tiny"
    # TBN statistics and certificates of the old model must not meet the new one
    assert not (run / "bn_stats.pt").exists() and not [p for p in (run / "certify").rglob("*") if p.is_file()]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_calibrate_refuses_a_missing_checkpoint(tmp_path):
    p = tbn("calibrate", str(tmp_path / "nowhere"), "--sigma", "0.25", cwd=tmp_path)
    assert p.returncode == 2
    assert "no checkpoint" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sigma", "0"], "--sigma: Input should be greater than 0 (got 0.0)"),
        (["--sigma", "-0.5"], "greater than 0"),
        (["--n0", "0"], "n0"),
        (["--n", "0"], "--n: Input should be greater than or equal to 1"),
        (["--alpha", "1.5"], "alpha"),
        (["--alpha", "0"], "alpha"),
    ],
)
def test_certify_bad_numbers_are_one_line_errors(trained, args, message):
    p = tbn("certify", str(trained), "--local", *args, cwd=trained.parent)
    assert p.returncode == 2, p.stdout
    assert message in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_unknown_architecture_and_missing_data_directory(tmp_path):
    (tmp_path / "bad.yaml").write_text(TINY.replace("arch: tiny", "arch: resnet9000"))
    p = tbn("train", "--config", "bad.yaml", "--local", cwd=tmp_path)
    assert p.returncode == 2 and "resnet9000" in p.stderr and "Traceback" not in p.stderr
    (tmp_path / "nodata.yaml").write_text(
        TINY.replace("source: partial", f"source: partial, shared_dir: {tmp_path / 'none'}")
    )
    p = tbn("train", "--config", "nodata.yaml", "--local", cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_corrupt_checkpoint_names_the_file(trained, tmp_path):
    bad = tmp_path / "run"
    bad.mkdir()
    data = (trained / "checkpoint.pt").read_bytes()
    (bad / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    p = tbn("calibrate", str(bad), "--sigma", "0.25", cwd=tmp_path)
    assert p.returncode == 2 and "checkpoint.pt" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    (bad / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
    p = tbn("certify", str(bad), "--local", cwd=tmp_path)
    assert p.returncode == 2 and "checkpoint.pt" in p.stderr and "Traceback" not in p.stderr


def test_wrong_architecture_checkpoint(trained, tmp_path):
    ckpt = torch.load(trained / "checkpoint.pt", weights_only=True)
    ckpt["config"]["model"]["arch"] = "resnet20"
    run = tmp_path / "wrong"
    run.mkdir()
    torch.save(ckpt, run / "checkpoint.pt")
    p = tbn("calibrate", str(run), "--sigma", "0.25", cwd=tmp_path)
    assert p.returncode == 2 and "does not fit architecture 'resnet20'" in p.stderr


def test_the_quickstart_config_is_found_from_any_directory(tmp_path, monkeypatch):
    from tbn_ray.cli import shipped_config
    from tbn_ray.config import load_config
    from tbn_ray.errors import TbnError

    monkeypatch.chdir(tmp_path)
    found = shipped_config("quickstart.yaml")
    assert found == Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    assert load_config(found).train.name == "quickstart"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "quickstart.yaml").write_text("train: {name: mine}\n")  # the working directory's wins
    assert load_config(shipped_config("quickstart.yaml")).train.name == "mine"
    with pytest.raises(TbnError, match="pass --config PATH"):
        shipped_config("nope.yaml")


def test_show_a_run_with_and_without_certifications(trained, tmp_path):
    from tbn_ray.jobs.show import describe_run
    from tbn_ray.store.runs import Run

    full = ok(tbn("show", str(trained), cwd=tmp_path)).stdout
    summary = json.loads(next(trained.rglob("summary.json")).read_text())
    assert "model: tiny, trained 1 of 1 epochs" in full and "byte-exact" in full
    assert "TBN statistics: sigma=0.25" in full and "best held-out PGD accuracy" in full
    assert f"- {summary['params']['run_id']}" in full and "sigma=0.25: 6/6 images, n0=10 n=100 alpha=0.01" in full
    assert "evaluations: none" in full
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(trained / "checkpoint.pt", bare / "checkpoint.pt")
    text = describe_run(Run.open(str(bare)))
    assert "certifications: none" in text and "TBN statistics: none calibrated" in text and "trained 1 of 1" in text


def test_show_a_run_on_s3(trained, s3_bucket):
    from tbn_ray.jobs.show import describe_run
    from tbn_ray.store.runs import Run
    from tbn_ray.store.storage import Storage

    remote = Storage.open(f"{s3_bucket}/runs/tiny")
    for path in trained.rglob("*"):
        if path.is_file():
            remote.write_bytes(path.relative_to(trained).as_posix(), path.read_bytes())
    text = describe_run(Run.open(remote.uri))
    assert (
        text.startswith(f"run: {remote.uri}")
        and "sigma=0.25: 6/6 images" in text
        and "TBN statistics: sigma=0.25" in text
    )


def test_missing_things_point_at_show_and_bad_numbers_fail_before_ray(trained, tmp_path):
    p = tbn("certify", str(trained), "--local", "--sigma", "0.3", cwd=tmp_path)
    assert p.returncode == 2 and f"tbn-ray show {trained}" in p.stderr and "tbn-ray calibrate" in p.stderr
    p = tbn("certify", str(trained), "--actors", "0", "--sigma", "inf", cwd=tmp_path)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert (
        "--sigma: Input should be a finite number" in p.stderr
        and "--actors: Input should be greater than or equal to 1" in p.stderr
    )
    assert "Ray" not in p.stdout  # refused before a Ray instance starts


def test_a_local_ray_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    """A local Ray instance that fails to start (here for real: its temporary directory is a file)
    is a one-line error that says what to try, not a traceback."""
    (tmp_path / "tiny.yaml").write_text(TINY)
    (tmp_path / "a-file").write_text("")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "a-file"))
    p = tbn("train", "--config", "tiny.yaml", cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    [line] = [x for x in p.stderr.splitlines() if x.startswith("tbn-ray: error:")]
    assert "could not start a local Ray instance" in line and "--address" in line
