"""Architectures: shapes, sizes of the published networks, normalisation inside, plain BN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tbn_ray.config import ModelConfig
from tbn_ray.science.data import CIFAR10_MEAN, CIFAR10_STD
from tbn_ray.science.models import Normalize, build_model, count_parameters

#: (config, published parameter count); tiny has no reference, only a size class.
ARCHS = {
    "resnet20": (ModelConfig(arch="resnet20"), 0.27e6),  # He et al. 2016, Table 6
    "resnet110": (ModelConfig(arch="resnet110"), 1.7e6),
    "preact_resnet18": (ModelConfig(arch="preact_resnet18"), 11.17e6),
    "wrn-28-10": (ModelConfig(arch="wrn", depth=28, width=10), 36.5e6),  # Zagoruyko & Komodakis 2016
    "wrn-34-10": (ModelConfig(arch="wrn", depth=34, width=10), 46.2e6),
    "tiny": (ModelConfig(arch="tiny"), None),
}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: build_model(cfg).eval() for name, (cfg, _) in ARCHS.items()}


@pytest.mark.parametrize("name", ARCHS)
def test_forward_shape_and_size(models: dict[str, nn.Module], name: str) -> None:
    model = models[name]
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    n, published = count_parameters(model), ARCHS[name][1]
    if published is None:
        assert 20_000 <= n <= 150_000, n  # tens of thousands: fast on a CPU
    else:
        assert abs(n - published) / published < 0.05, n


def test_num_classes() -> None:
    with torch.no_grad():
        assert build_model(ModelConfig(arch="resnet20"), num_classes=100).eval()(torch.rand(2, 3, 32, 32)).shape == (
            2,
            100,
        )


@pytest.mark.parametrize("name", ARCHS)
def test_every_bn_is_a_plain_batchnorm2d_with_running_statistics(models: dict[str, nn.Module], name: str) -> None:
    bns = [m for m in models[name].modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) >= 4
    for bn in bns:
        assert type(bn) is nn.BatchNorm2d and bn.track_running_stats and bn.affine
        assert bn.running_mean is not None and bn.running_var is not None


@pytest.mark.parametrize("name", ["tiny", "resnet20", "preact_resnet18"])
def test_normalisation_is_inside_the_model(models: dict[str, nn.Module], name: str) -> None:
    model = models[name]
    assert isinstance(model.normalize, Normalize)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(x), model.body((x - mean) / std), atol=1e-6)
    # the constants are buffers: saved with the weights, moved by .to(), never trained
    state = model.state_dict()
    assert torch.equal(state["normalize.mean"].flatten(), mean.flatten())
    assert torch.equal(state["normalize.std"].flatten(), std.flatten())
    assert all(not name.startswith("normalize.") for name, _ in model.named_parameters())


def test_initialisation_follows_the_global_seed() -> None:
    """Pipelines seed torch before build_model; the same seed must give the same network."""
    torch.manual_seed(3)
    a = build_model(ModelConfig(arch="tiny")).state_dict()
    torch.manual_seed(3)
    b = build_model(ModelConfig(arch="tiny")).state_dict()
    torch.manual_seed(4)
    c = build_model(ModelConfig(arch="tiny")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["body.0.weight"], c["body.0.weight"])
