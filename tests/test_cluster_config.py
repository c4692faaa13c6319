"""cluster/gpu.yaml: valid for the Ray cluster launcher (offline, against Ray's own schema) and shaped
as the project needs (a head that schedules nothing, GPU workers, S3 access everywhere, token auth)."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("ray.autoscaler", reason='Ray missing: pip install "ray[default]==2.60.0"')

from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402  (internal API: Ray is pinned)

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster" / "gpu.yaml"


@pytest.fixture
def raw() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER.read_text())


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` checks before any cloud call."""
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_validates_against_the_ray_schema(raw: dict[str, Any]) -> None:
    prepared = validate(raw)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["available_node_types"][prepared["head_node_type"]]["resources"] == {"CPU": 0}


@pytest.mark.parametrize(
    ("why", "breaks", "message"),
    [
        ("typo in a key", lambda c: c["available_node_types"]["gpu_1x_spot"].update(min_worker=0), "min_worker"),
        ("fractional GPU", lambda c: c["available_node_types"]["gpu_1x_spot"]["resources"].update(GPU=0.5), "integer"),
        ("unknown head type", lambda c: c.update(head_node_type="head_typo"), "head_node_type"),
        (
            "more nodes at start than allowed",
            lambda c: c["available_node_types"]["gpu_1x_spot"].update(min_workers=11),
            "max_workers",
        ),
        ("unknown top-level key", lambda c: c.update(max_worker=4), "max_worker"),
    ],
)
def test_broken_copies_are_rejected(raw: dict[str, Any], why: str, breaks: Any, message: str) -> None:
    broken = copy.deepcopy(raw)
    breaks(broken)
    with pytest.raises(Exception, match=message):
        validate(broken)


def test_shape_the_project_needs(raw: dict[str, Any]) -> None:
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    workers = {name: t for name, t in types.items() if name != raw["head_node_type"]}
    assert head["resources"] == {"CPU": 0}  # the head schedules no training work
    # a single-GPU spot type and a multi-GPU type, nothing started before it is needed
    gpus = {name: t["resources"]["GPU"] for name, t in workers.items()}
    assert 1 in gpus.values() and max(gpus.values()) >= 4, gpus
    spot = [t for t in workers.values() if t["resources"]["GPU"] == 1]
    assert all(t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for t in spot)
    assert all(t["min_workers"] == 0 for t in workers.values())
    # S3 access on EVERY node type (else "Unable to locate credentials" on the workers)
    for name, t in types.items():
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    # the dashboard reachable for `ray dashboard`, token authentication on for every node
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(raw["worker_start_ray_commands"])
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # the project itself is installed on every node, from the checkout copied there
    assert raw["file_mounts"]["~/tbn-ray"] == "."
    assert any("pip install" in c and "tbn-ray[ray]" in c for c in raw["setup_commands"])


def test_cluster_ray_matches_the_pinned_ray(raw: dict[str, Any]) -> None:
    """Driver (the user's machine), image and workers must run the same Ray."""
    import ray

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pinned = re.search(r"==([\d.]+)", " ".join(pyproject["project"]["optional-dependencies"]["ray"])).group(1)
    image_version = re.search(r":([\d.]+)-", raw["docker"]["image"]).group(1)
    assert image_version == pinned == ray.__version__
