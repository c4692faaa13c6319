"""Small shared test helpers (real CIFAR-10 images from the byte-exact subset)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
#: How long a test waits for something that must happen before it calls it a hang: a guard, never a
#: statement about speed, so long enough for a machine whose cores are all busy with other work
#: (Ray's workers run niced there). ``TBN_TEST_HANG_S`` overrides it.
HANG_S = float(os.environ.get("TBN_TEST_HANG_S", "1200"))


def partial_test_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` official test images (uint8 NHWC) and labels, byte-exact."""
    path = SHARED_DATA / "cifar10-partial" / "cifar10_test_prefix.npz"
    if not path.is_file():
        pytest.skip(f"CIFAR-10 subset not found at {path}")
    with np.load(path) as d:
        return d["images"][:n].copy(), d["labels"][:n].astype(np.int64)


def wait_actors_gone(cluster, class_name: str, timeout_s: float = HANG_S) -> None:  # type: ignore[no-untyped-def]
    """Until no actor of ``class_name`` is alive (ray.kill is asynchronous), so that none is still writing."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = list_actors(address=cluster.address, filters=[("class_name", "=", class_name), ("state", "!=", "DEAD")])
        if not alive:
            return
        time.sleep(0.5)
    raise AssertionError(f"{class_name} actors still alive after {timeout_s} s: {alive}")


def kill_soon(pid: int, delay_s: float = 0.5) -> None:
    """SIGKILL ``pid`` after ``delay_s``, from a thread: called when an actor reports a finished
    unit, the driver has handed it the next one by then, so it dies in the middle of that one."""

    def kill() -> None:
        time.sleep(delay_s)
        os.kill(pid, signal.SIGKILL)

    threading.Thread(target=kill, daemon=True).start()


def s3_last_modified(uri: str, keep: Callable[[str], bool]) -> dict[str, float]:
    """LastModified of the objects under ``uri`` (s3://bucket/prefix) whose key ``keep`` accepts, straight from S3."""
    import boto3

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    pages = (
        boto3.session.Session()
        .client("s3")
        .get_paginator("list_objects_v2")
        .paginate(Bucket=bucket, Prefix=prefix + "/")
    )
    return {o["Key"]: o["LastModified"].timestamp() for p in pages for o in p.get("Contents", []) if keep(o["Key"])}


def tiny_run(root, sigmas: tuple[float, ...] = (0.25,)):  # type: ignore[no-untyped-def]
    """A tiny UNTRAINED model (He-initialised, seed 0) saved as run ``tiny`` under ``root`` (a
    Storage), with its own running statistics as the clean set and as each sigma's set: real
    files for the run's readers and a certification in seconds, no calibration."""
    import torch

    from tbn_ray.config import DataConfig, ModelConfig, TrainConfig
    from tbn_ray.science.models import build_model
    from tbn_ray.science.tbn import CLEAN, bn_key, get_bn_stats
    from tbn_ray.store.runs import Run, make_checkpoint

    if not (SHARED_DATA / "cifar10-partial" / "cifar10_test_prefix.npz").is_file():
        pytest.skip(f"CIFAR-10 subset not found under {SHARED_DATA}")
    run = Run(root.child("tiny"))
    cfg = TrainConfig(
        name="tiny", model=ModelConfig(arch="tiny"), data=DataConfig(source="partial", shared_dir=str(SHARED_DATA))
    )
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    run.save_checkpoint(make_checkpoint(model, cfg, 1, {"note": "untrained"}))
    stats = get_bn_stats(model)
    sets = {CLEAN: {"stats": stats, "meta": {"sigma": 0.0}}}
    sets.update({bn_key(s): {"stats": stats, "meta": {"sigma": s}} for s in sigmas})
    run.save_bn_sets(sets)
    return run


def certify_with(
    model, images, labels, indices, *, sigma: float, device="cpu", adaptive=None, compile_backend=None, **fields
):  # type: ignore[no-untyped-def]
    """``smoothing.certify_examples`` with the certify settings given as keywords, made into the
    ``CertifyConfig`` that carries them (a bad value is the config's one-line error)."""
    from tbn_ray.config import AdaptiveConfig, CertifyConfig, parse_config
    from tbn_ray.science.smoothing import certify_examples

    if adaptive is not None:  # an AdaptiveSampling or a SequentialSampling: its config fields
        from tbn_ray.config import SequentialConfig

        if type(adaptive).__name__ == "SequentialSampling":
            fields.update(
                adaptive=True,
                adaptive_design="sequential",
                sequential={k: getattr(adaptive, k) for k in SequentialConfig.model_fields},
            )
        else:
            fields.update(
                adaptive=True,
                adaptive_design="pilot",
                adaptive_sampling={k: getattr(adaptive, k) for k in AdaptiveConfig.model_fields},
            )
    if compile_backend is not None:
        fields["compile"] = compile_backend
    cfg = parse_config(CertifyConfig, {"sigmas": [sigma], **fields}, "test settings")
    return certify_examples(model, images, labels, indices, cfg, sigma=sigma, device=device)


#: A small stored run (tiny model, TBN at sigma 0.25 and 0.5) that tests copy before writing to it.
FIXTURE_RUN = Path(__file__).parent / "fixtures" / "legacy-store" / "runs" / "tiny"


def copy_fixture_run(target: Path, files: tuple[str, ...] = ("checkpoint.pt", "bn_stats.pt", "config.yaml")) -> Path:
    """``FIXTURE_RUN``'s ``files`` copied into the new folder ``target``."""
    import shutil

    target.mkdir(parents=True)
    for name in files:
        shutil.copy(FIXTURE_RUN / name, target / name)
    return target
