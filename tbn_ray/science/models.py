"""CIFAR-10 classifiers (32x32 inputs) with the input normalisation inside the model.

Every model is ``Classifier(Normalize(mean, std), body)``: it takes images in [0,1]
pixel space, so PGD budgets and randomized-smoothing noise (docs/method.md: noise is added
before the normalisation layer) are in the units users and papers state them in.

Every BatchNorm is a plain ``nn.BatchNorm2d`` with running statistics: TBN swaps those
statistics, and nothing else, per noise level.

Architectures:

* ``resnet20`` / ``resnet110``: He et al.'s CIFAR ResNet (depth 6n+2, basic blocks,
  16/32/64 channels), as in Cohen et al.'s ``archs/cifar_resnet.py`` (1x1 convolution + BN
  projection shortcut where the shape changes).
* ``preact_resnet18``: He et al.'s pre-activation ResNet-18, as used by Rice et al. (2020).
* ``wrn``: Zagoruyko & Komodakis' WideResNet-depth-width (pre-activation, no dropout).
* ``tiny``: a four-layer conv net (about 100k parameters) for tests and the CPU quickstart.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tbn_ray.config import ModelConfig
from tbn_ray.science.data import CIFAR10_MEAN, CIFAR10_STD


class Normalize(nn.Module):
    """(x - mean) / std per channel; buffers, so they move with ``.to()`` and live in checkpoints."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """A network applied to normalised inputs; callers feed [0,1] pixels."""

    def __init__(
        self, body: nn.Module, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


# --- He et al.'s CIFAR ResNet (post-activation) ----------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Depth 6n+2: a stem conv, three stages of n basic blocks (16, 32, 64 channels), pool, linear."""

    def __init__(self, depth: int, num_classes: int) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(_conv3x3(3, 16), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        stages, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            blocks = [BasicBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


# --- pre-activation blocks: PreAct ResNet-18 and WideResNet --------------------------------


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; the shortcut (1x1 conv where the shape changes) takes the first activation."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu(self.bn1(x))
        skip = self.shortcut(a) if self.shortcut is not None else x
        out = self.conv1(a)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + skip


class PreActNet(nn.Module):
    """Stem conv, stages of pre-activation blocks, final BN-ReLU, global pool, linear.

    PreAct ResNet-18: widths (64, 128, 256, 512), 2 blocks each, stem width 64.
    WRN-d-k: widths (16k, 32k, 64k), (d-4)/6 blocks each, stem width 16.
    """

    def __init__(self, stem: int, widths: Sequence[int], blocks: int, num_classes: int) -> None:
        super().__init__()
        self.stem = _conv3x3(3, stem)
        stages, cin = [], stem
        for i, cout in enumerate(widths):
            stages.append(
                nn.Sequential(
                    *[PreActBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1) for j in range(blocks)]
                )
            )
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn(self.stages(self.stem(x))))
        return self.fc(self.pool(out).flatten(1))


# --- tiny ----------------------------------------------------------------------------------


def tiny_net(num_classes: int) -> nn.Sequential:
    """conv-BN-ReLU x4 (16, 32, 64, 128 channels; the last three stride 2), global pool, linear.

    Sized for CPU adversarial training in minutes: a PGD-7 step costs eight forward/backward
    passes, dominated by the full-resolution layer, so that layer is the narrowest and the
    width doubles as the resolution halves.
    """
    layers: list[nn.Module] = []
    cin = 3
    for cout, stride in ((16, 1), (32, 2), (64, 2), (128, 2)):
        layers += [_conv3x3(cin, cout, stride), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


def _init_weights(model: nn.Module) -> None:
    """He initialisation for convolutions (as in the CIFAR ResNet and WRN papers), BN at identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def build_model(cfg: ModelConfig, num_classes: int = 10) -> nn.Module:
    """The architecture ``cfg`` names, freshly initialised from torch's global RNG (seed it first)."""
    body: nn.Module
    if cfg.arch == "imported":  # an architecture from elsewhere, with its own initialisation
        from tbn_ray.science.external import build_external

        return build_external(cfg.source, num_classes)
    if cfg.arch == "tiny":
        body = tiny_net(num_classes)
    elif cfg.arch == "resnet20":
        body = CifarResNet(20, num_classes)
    elif cfg.arch == "resnet110":
        body = CifarResNet(110, num_classes)
    elif cfg.arch == "preact_resnet18":
        body = PreActNet(64, (64, 128, 256, 512), 2, num_classes)
    elif cfg.arch == "wrn":
        k = cfg.width
        body = PreActNet(16, (16 * k, 32 * k, 64 * k), (cfg.depth - 4) // 6, num_classes)
    else:  # ModelConfig validates arch; a new Literal value without a branch is a bug
        raise ValueError(f"unknown architecture {cfg.arch!r}")
    _init_weights(body)
    return Classifier(body)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (normalisation constants and BN statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
