"""Which torch device a setting names: one rule for every layer (the science, the jobs, the Ray
actors and the commands), so ``--device cuda`` means the same everywhere and fails the same way."""

from __future__ import annotations

import torch

from tbn_ray.errors import TbnError


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; an explicit device must exist here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TbnError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TbnError(f"device {name!r} requested but CUDA is not available here; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TbnError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise TbnError(f"device {name!r} requested but MPS is not available here; use --device cpu (or auto)")
    elif device.type != "cpu":
        raise TbnError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device
