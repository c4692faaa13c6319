"""``tbn-ray sweep`` on a real local Ray cluster (dashboard on, ``ray_local``) and a real S3 server.

Every sweep is configs/sweep_tiny.yaml (the exact CIFAR-10 subset, the tiny model, 3 epochs of
512 images, 64 validation images, n=128) with a test-specific name, grid or resources. Sweeps
that might hang or that get killed run as ``tbn-ray`` processes joining the session's cluster.
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from tbn_ray.config import load_sweep_config
from tbn_ray.errors import TbnError
from tbn_ray.store.runs import Run
from tbn_ray.store.storage import Storage

pytest.importorskip("ray.tune", reason='Ray missing: pip install "ray[default,tune,train]==2.60.0"')

from tbn_ray.cli import main  # noqa: E402
from tbn_ray.distributed.sweep import prepare  # noqa: E402
from tbn_ray.jobs.sweep_pairs import SPLIT_KEYS, trained_epochs  # noqa: E402
from tbn_ray.reports.sweep import EVALUATED, STOPPED, best_pair  # noqa: E402

from .helpers import HANG_S

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = REPO / "configs" / "sweep_tiny.yaml"
#: The CLI's entry point, independent of how old the installed console script is.
TBN_RAY = [sys.executable, "-c", "from tbn_ray.cli import main; main()"]
EPOCHS = 3  # configs/sweep_tiny.yaml
FILLED = (
    "clean_acc",
    "pgd_acc",
    "smoothed_clean_acc",
    "certified_acc@0.25",
    "certified_acc@0.5",
    "certified_acc@0.75",
    "certified_acc@1",
    "acr",
    "abstain_rate",
    "objective",
    "train_seconds",
    "calibrate_seconds",
    "certify_seconds",
)


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def tiny_sweep(tmp_path: Path, name: str, **changes: Any) -> Path:
    """configs/sweep_tiny.yaml under another name (and with ``changes``), pointing at the exact subset."""
    if not (SHARED / "cifar10-partial").is_dir():
        pytest.skip(f"exact CIFAR-10 subset not found at {SHARED / 'cifar10-partial'}")
    raw = _merge(yaml.safe_load(TINY.read_text()), {"name": name, "train": {"data": {"shared_dir": str(SHARED)}}})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_merge(raw, changes)))
    return path


def cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """``tbn-ray ARGS`` in this process (joining the session's Ray instance); the exit status."""
    monkeypatch.setattr(sys, "argv", ["tbn-ray", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return int(exit_info.value.code or 0)


def training_runs(root: Storage) -> dict[str, Run]:
    """The sweep's training runs that hold a checkpoint, by directory name."""
    names = {k.split("/")[1] for k in root.list("train/") if k.endswith("/checkpoint.pt")}
    return {name: Run(root.child("train", name)) for name in sorted(names)}


def table(root: Storage) -> list[dict[str, Any]]:
    return pq.read_table(io.BytesIO(root.read_bytes("results.parquet"))).to_pylist()


def check_complete_sweep(root: Storage, epsilons: list[float], sigmas: list[float]) -> list[dict[str, Any]]:
    """Every (epsilon, sigma) evaluated with every column filled, in every output; best.json usable."""
    rows = table(root)
    assert [(r["epsilon"], r["sigma"]) for r in rows] == [(e, s) for e in epsilons for s in sigmas]
    for r in rows:
        assert r["status"] == EVALUATED and r["epochs"] == EPOCHS
        assert all(r[k] is not None for k in FILLED), r
        assert 0 <= r["certified_acc@1"] <= r["certified_acc@0.25"] <= r["smoothed_clean_acc"] <= 1
    assert len(root.read_text("results.csv").strip().splitlines()) == 1 + len(rows)
    assert root.read_text("results.md").count("| evaluated |") == len(rows)
    assert root.read_bytes("heatmap.png")[:8] == b"\x89PNG\r\n\x1a\n"
    best = root.read_json("best.json")
    assert best["value"] == max(r["objective"] for r in rows)
    ckpt = Run.open(best["checkpoint"]).load_checkpoint()  # an existing checkpoint, of the chosen epsilon
    assert ckpt.epoch == EPOCHS and ckpt.config.attack.eps == best["epsilon"]
    model, _ = Run.open(best["run"]).load_model()
    Run.open(best["run"]).bn_stats(best["bn_stats"], model)  # the TBN statistics `tbn-ray certify` needs
    # validation images (certified) and calibration images (TBN) are disjoint parts of the held-out split
    split = best["validation"]
    assert split["calibration_index"][1] < split["validation_index"][0] and split["validation_images"] == 64
    return rows


def _wait(condition, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            pytest.fail(
                f"the sweep ended (status {proc.returncode}) before it could be interrupted:\n{log.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no progress within {timeout_s:g} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def test_sweep_2x2_on_s3_interrupted_and_resumed_trains_each_epsilon_once(
    ray_local, s3_bucket: str, tmp_path: Path, monkeypatch
) -> None:
    """The 2 x 2 sweep and its resume in one test (one sweep's time): the first run is killed once
    one epsilon is trained; --resume finishes it without training that epsilon again."""
    config = tiny_sweep(tmp_path, "grid", resources={"max_concurrent_trials": 1})  # one epsilon after the other
    storage = f"{s3_bucket}/tbn"
    root = Storage.open(f"{storage}/grid")
    log = tmp_path / "first.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*TBN_RAY, "sweep", "--config", str(config), "--storage", storage, "--address", ray_local.address],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        # SIGKILL (a lost driver or head node: nothing saved on the way out) once the first epsilon is trained.
        _wait(lambda: any(trained_epochs(r) == EPOCHS for r in training_runs(root).values()), proc, log, HANG_S)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    (done,) = training_runs(root).values()
    before = done.load_checkpoint()
    assert before.epoch == EPOCHS and not root.exists("results.csv")

    assert cli(monkeypatch, "sweep", "--config", str(config), "--storage", storage, "--resume") == 0

    runs = training_runs(root)
    assert len(runs) == 2 and done.storage.uri.rpartition("/")[2] in runs  # one run per epsilon, not per pair
    # the finished epsilon was not trained again (the same checkpoint: time written, weights)
    after = done.load_checkpoint()
    assert after.meta["saved"] == before.meta["saved"] and after.epoch == EPOCHS
    assert all(torch.equal(after.model[k], v) for k, v in before.model.items())
    for run in runs.values():  # each trained exactly once, from epoch 0, with the sweep's one PGD attack
        ckpt = run.load_checkpoint()
        assert ckpt.epoch == EPOCHS and ckpt.meta["started_at_epochs"] == [0]
        assert ckpt.config.eval.attack is not None and ckpt.config.eval.attack.eps == 0.25
    assert sorted(run.load_checkpoint().config.attack.eps for run in runs.values()) == [0.25, 1.0]
    check_complete_sweep(root, [0.25, 1.0], [0.25, 0.5])


def test_asha_stopped_trial_frees_the_cluster_for_the_next(ray_local, tmp_path: Path) -> None:
    # Each training trial takes all 4 CPUs of the session's cluster, so the trials run one after the
    # other and a stopped trial that kept its Train workers' placement group would starve the next
    # (whose workers then fail to start within the start timeout: an error, not a hang). ASHA decides
    # after epochs 1, 2 and 4 of 5; a trial stopped at epoch 1 has 4 to go, so it cannot finish
    # before its process ends.
    config = tiny_sweep(
        tmp_path,
        "asha",
        epsilons=[0.25, 16.0, 32.0],
        sigmas=[0.25],
        train={"optim": {"epochs": 5}},
        resources={"workers": 1, "cpus_per_worker": 4},
        early_stopping={"enabled": True, "grace_period": 1, "reduction_factor": 2},
    )
    # In a process of its own, so that a hang is a failed test (TimeoutExpired), not a stuck session.
    done = subprocess.run(
        [
            *TBN_RAY,
            "sweep",
            "--config",
            str(config),
            "--storage",
            str(tmp_path / "results"),
            "--address",
            ray_local.address,
        ],
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    root = Storage.open(tmp_path / "results" / "asha")
    rows = {r["epsilon"]: r for r in table(root)}
    # a huge epsilon trains on saturated images: worse held-out PGD accuracy after epoch 1, so ASHA stops it
    assert rows[16.0]["status"] == STOPPED and rows[16.0]["epochs"] < 5
    assert rows[16.0]["certified_acc@0.25"] is None and rows[16.0]["objective"] is None
    # the trial after the stopped one got the whole cluster and trained (a checkpoint, Ray's at least)
    assert any(name.startswith("eps=32-") for name in training_runs(root))
    assert rows[0.25]["status"] == EVALUATED and rows[0.25]["epochs"] == 5 and rows[0.25]["objective"] is not None
    assert root.read_json("best.json")["epsilon"] == 0.25
    assert "stopped early (ASHA)" in root.read_text("results.md")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"epsilons": []}, "the epsilons grid is empty"),
        ({"sigmas": [0.25, -0.5]}, "every value must be > 0, got -0.5"),
        ({"epsilons": [-1.0, 0.5]}, "every value must be > 0, got -1.0"),
        ({"objective": "accuracy"}, "unknown objective 'accuracy'"),
        ({"certify": {"sigmas": [0.25]}}, "certify.sigmas: set by the sweep"),
        ({"validation": {"images": 505}}, "leaves no held-out image for TBN calibration"),
    ],
)
def test_bad_input_fails_before_ray_starts(changes, message, tmp_path: Path, monkeypatch, capsys) -> None:
    config = tiny_sweep(tmp_path, "bad", **changes)
    assert cli(monkeypatch, "sweep", "--config", str(config), "--storage", str(tmp_path / "results")) == 2
    err = capsys.readouterr().err
    assert err.startswith("tbn-ray: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "results" / "bad").exists()


def test_requests_the_cluster_cannot_hold_fail_before_any_trial(ray_local, tmp_path: Path, monkeypatch, capsys) -> None:
    storage = tmp_path / "results"
    for name, resources, message in (
        (
            "workers",
            {"workers": 8},
            "a training trial (8 worker(s) x {'CPU': 1.0}) needs 8 CPU, but the Ray cluster has 4",
        ),
        ("gpus", {"eval_gpus": 1}, "an evaluation actor needs 1 GPU, but the Ray cluster has 0"),
    ):
        config = tiny_sweep(tmp_path, name, resources=resources)
        assert cli(monkeypatch, "sweep", "--config", str(config), "--storage", str(storage)) == 2
        assert message in capsys.readouterr().err
        assert not (storage / name).exists()  # no trial, no state: the name stays free
    # nothing to resume, and a stored sweep cannot be continued with another config
    config = tiny_sweep(tmp_path, "never")
    assert cli(monkeypatch, "sweep", "--config", str(config), "--storage", str(storage), "--resume") == 2
    assert "nothing to resume" in capsys.readouterr().err
    Storage.open(storage / "changed").write_text("sweep.yaml", yaml.safe_dump({"name": "changed", "epsilons": [0.5]}))
    with pytest.raises(TbnError, match="was started with another config"):
        prepare(load_sweep_config(tiny_sweep(tmp_path, "changed")), Storage.open(storage), resume=False)


def test_best_pair_breaks_objective_ties_by_acr() -> None:
    cfg = load_sweep_config(TINY)
    rows = [
        {"epsilon": 1.0, "sigma": 0.25, "status": EVALUATED, "objective": 0.22, "acr": 0.09},
        {"epsilon": 1.0, "sigma": 0.5, "status": EVALUATED, "objective": 0.22, "acr": 0.15},
        {"epsilon": 0.25, "sigma": 0.5, "status": EVALUATED, "objective": 0.20, "acr": 0.30},
        {"epsilon": 2.0, "sigma": 0.5, "status": STOPPED, "objective": None, "acr": None},
    ]
    pair = {"run": "r", "checkpoint": "r/checkpoint.pt", "epoch": 3, "data": "d", **{k: 0 for k in SPLIT_KEYS}}
    best = best_pair(cfg, rows, {(r["epsilon"], r["sigma"]): pair for r in rows})
    assert (best["epsilon"], best["sigma"], best["value"]) == (1.0, 0.5, 0.22)
