"""AutoAttack (Croce & Hein 2020), the number RobustBench reports, from the ``pyautoattack`` package.

The standard version: APGD-CE, APGD-T (9 target classes), FAB-T (9 targets), Square (5,000
queries), one restart each, in l2 or l-inf. It attacks the model as it is, so it suits the
frozen BN modes only: AutoAttack classifies the batch, then attacks only the images still
classified correctly, in batches of its own, so with batch statistics every re-batching would
change the function under attack (``check_frozen_bn``).

Reproducible per call: every sub-attack seeds torch's global generator with ``seed``, and that
generator is restored afterwards, so nothing else's randomness depends on whether (or how
often) AutoAttack ran.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import torch
from torch import nn

from tbn_ray.config import AttackConfig
from tbn_ray.errors import TbnError

NAME = "autoattack"
#: How results name the attack.
DESCRIPTION = "AutoAttack standard (Croce & Hein 2020; pyautoattack): APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5000 queries)"

_NORMS = {"l2": "L2", "linf": "Linf"}


def require_pyautoattack() -> Any:
    try:
        import pyautoattack
    except ImportError:
        raise TbnError(
            "the autoattack attack needs the optional pyautoattack package: pip install 'tbn-ray[zoo]'"
        ) from None
    return pyautoattack


def version() -> str:
    """``pyautoattack <version> standard``: stored with every AutoAttack result."""
    try:
        v = importlib.metadata.version("pyautoattack")
    except importlib.metadata.PackageNotFoundError:
        v = "?"
    return f"pyautoattack {v} standard"


def check_frozen_bn(batch_mode: bool, spec: str) -> None:
    """AutoAttack only for frozen statistics (see the module docstring)."""
    if batch_mode:
        raise TbnError(
            f"autoattack cannot attack BN mode {spec}: AutoAttack re-batches the images it attacks (only those still "
            "correct, in its own batches), so batch statistics would change under it; use --bn clean or sigma:<s>, "
            "or pgd / apgd-ce for the test-batch modes"
        )


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: AttackConfig, *, seed: int) -> torch.Tensor:
    """Standard AutoAttack adversarial examples for ``x`` (float NCHW in [0, 1]) within ``threat.eps``
    in ``threat.norm`` (``steps``, ``restarts`` and ``step_size`` are AutoAttack's own here).

    The model is attacked in its current mode; parameters get no gradients (they are frozen for
    the call), torch's global generator is seeded with ``seed`` inside and restored afterwards.
    Images the model already misclassifies come back unchanged.
    """
    aa = require_pyautoattack()
    if threat.norm not in _NORMS:
        raise TbnError(f"autoattack supports l2 and linf, got {threat.norm!r}")
    frozen = [p for p in model.parameters() if p.requires_grad]
    devices = (
        [x.device.index if x.device.index is not None else torch.cuda.current_device()]
        if x.device.type == "cuda"
        else []
    )
    try:
        for p in frozen:
            p.requires_grad_(False)
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            adversary = aa.AutoAttack(
                model, norm=_NORMS[threat.norm], eps=threat.eps, version="standard", device=x.device, seed=int(seed)
            )
            adversary.verbose = False
            # contiguous NCHW: its attacks .view() the inputs (channels-last or permuted ones fail)
            x_adv, _ = adversary.run_standard_evaluation(x.contiguous(), y, batch_size=len(x))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    x_adv = x_adv.detach().to(x.dtype)
    _check_budget(x, x_adv, threat)
    return x_adv


def _check_budget(x: torch.Tensor, x_adv: torch.Tensor, threat: AttackConfig) -> None:
    """Every example inside the eps ball and the image box (a result outside would overstate the attack)."""
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if threat.norm == "linf" else delta.norm(dim=1)
    if bool((size > threat.eps * (1 + 1e-4) + 1e-6).any()) or bool((x_adv < 0).any() or (x_adv > 1).any()):
        raise AssertionError(
            f"AutoAttack returned a point outside the {threat.norm} ball of {threat.eps:g} or [0, 1]: {float(size.max()):.6g}"
        )
