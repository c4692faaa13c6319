"""The base classifier f whose votes a certificate counts, built from a network and the settings.

Each option (BN folded into the convolutions, channels-last memory, autocast) gives another
fixed function of the input, equally valid for Cohen's certificate but rounding differently,
so each is part of a certification's identity (``CertifyConfig.identity``). The noise and its
addition to the image stay in float32 whatever the network runs in (``smoothing.Smooth``):
rounding the input itself is where floating-point attacks on smoothing live (docs/method.md).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse as fold_conv_bn

from tbn_ray.config import CertifyConfig
from tbn_ray.errors import TbnError
from tbn_ray.science.training import autocast


class Autocast(nn.Module):
    """f under mixed precision: still one fixed function (so a valid base classifier), with fp32 logits."""

    def __init__(self, model: nn.Module, amp: str, device: torch.device) -> None:
        super().__init__()
        self.model, self.amp, self.device = model, amp, device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.amp, self.device):
            return self.model(x).float()


def _folded(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with each BN folded into the convolution before it (torch.fx traces it)."""
    try:
        return fold_conv_bn(net)
    except Exception as e:  # noqa: BLE001 - tracing fails in many ways on architectures from elsewhere
        raise TbnError(
            f"--fold-bn: this architecture cannot be traced to fold its BatchNorm ({type(e).__name__}); certify without --fold-bn"
        ) from None


def base_classifier(net: nn.Module, cfg: CertifyConfig, device: torch.device) -> nn.Module:
    """f for the statistics now in ``net`` (eval mode): BN folded into a copy, channels-last and
    autocast as ``cfg`` asks. Autocast applies on CUDA only, as in training."""
    f = _folded(net) if cfg.fold_bn else net
    if cfg.channels_last:
        f = f.to(memory_format=torch.channels_last)
    f = Autocast(f, cfg.amp, device) if cfg.amp != "off" and device.type == "cuda" else f
    return nn.Sequential(Clip(), f) if cfg.clip else f


class Clip(nn.Module):
    """x + noise clamped to the image range [0, 1]: f(clip(.)) is as fixed a function as f."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 1.0)
