"""Architectures tbn-ray did not write: RobustBench's model zoo, or any ``module:callable``.

``build_external`` builds, without weights, the architecture a ``config.ModelSource`` names,
with the given per-channel normalisation in front (``models.Normalize``), so that the model
takes images in [0, 1] pixel space as randomized smoothing needs (its noise is added before
any normalisation). The weights come from the run's checkpoint (``store.model_import`` writes
it); nothing here reads files. ``robustbench`` and ``pyautoattack`` are optional and imported
only when a zoo model is built.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from tbn_ray.config import ModelSource
from tbn_ray.errors import TbnError
from tbn_ray.science.models import Normalize

#: The one-line remedy when the optional zoo packages are missing.
INSTALL_ZOO = "pip install 'tbn-ray[zoo]'"

#: RobustBench's threat-model names, as its folders spell them.
THREAT_MODELS = ("L2", "Linf", "corruptions")


def import_robustbench() -> Any:
    """The ``robustbench`` package, or a one-line TbnError saying how to install it.

    robustbench 1.1.1 imports a module ``autoattack`` that the registry's AutoAttack package
    installs as ``pyautoattack``, and ``pkg_resources`` (setuptools < 81): both are arranged here.
    """
    try:
        import pyautoattack

        sys.modules.setdefault("autoattack", pyautoattack)
        with warnings.catch_warnings():  # its pkg_resources and torch.jit deprecation notices, every process
            warnings.simplefilter("ignore", (UserWarning, FutureWarning, DeprecationWarning))
            import robustbench  # noqa: F401
            import robustbench.model_zoo
            import robustbench.utils  # noqa: F401
    except ImportError as e:
        raise TbnError(f"RobustBench models need the optional zoo packages ({e.name or e}): {INSTALL_ZOO}") from None
    return robustbench


def zoo_models(dataset: str = "cifar10") -> dict[str, dict[str, Any]]:
    """RobustBench's entries for ``dataset``: threat model -> {name: entry}."""
    rb = import_robustbench()
    from robustbench.model_zoo.enums import BenchmarkDataset

    try:
        per_threat = rb.model_zoo.model_dicts[BenchmarkDataset(dataset)]
    except ValueError:
        raise TbnError(f"RobustBench has no dataset {dataset!r}; tbn-ray certifies cifar10 models") from None
    return {threat.value: dict(entries) for threat, entries in per_threat.items()}


def zoo_threat_models(name: str, dataset: str = "cifar10") -> list[str]:
    """The threat models under which RobustBench lists ``name``."""
    return [threat for threat, entries in zoo_models(dataset).items() if name in entries]


def zoo_constructor(
    name: str, threat_model: str, dataset: str = "cifar10", num_classes: int = 10
) -> Callable[[], nn.Module]:
    """The zoo entry's constructor (no weights); an unknown name is one line with close matches."""
    zoo = zoo_models(dataset)
    if threat_model not in zoo:
        raise TbnError(
            f"RobustBench threat model {threat_model!r} does not exist for {dataset}; use one of {', '.join(zoo)}"
        )
    entries = zoo[threat_model]
    if name not in entries:
        import difflib

        close = difflib.get_close_matches(name, list(entries), n=3, cutoff=0.6)
        elsewhere = [t for t, e in zoo.items() if name in e]
        hint = (
            f"; it is listed under {', '.join(elsewhere)} (--threat-model)"
            if elsewhere
            else (f"; did you mean {', '.join(close)}?" if close else "")
        )
        raise TbnError(f"RobustBench lists no {dataset} {threat_model} model {name!r}{hint}")
    timm_name = f"{name.lower().replace('-', '_')}_{dataset}_{threat_model.lower()}"
    import timm

    if timm.is_model(timm_name):  # robustbench.utils.load_model prefers timm's entry of the same name
        return lambda: timm.create_model(timm_name, num_classes=num_classes, pretrained=False)
    return entries[name]["model"]


def split_callable(spec: str) -> tuple[str, str]:
    """``package.module:attr`` -> (module, attr); anything else is one line saying the form."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr or not all(p.isidentifier() for p in module.split(".") + attr.split(".")):
        raise TbnError(f"{spec!r} is not module:callable (e.g. my_models.resnet:ResNet18) nor robustbench:<zoo name>")
    return module, attr


def resolve_callable(spec: str) -> Callable[..., Any]:
    """The object ``module:callable`` names. The working directory is importable, as for
    ``python -m``: ``my_models.resnet:ResNet18`` works from where ``my_models/`` lives."""
    module_name, attr = split_callable(spec)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and module_name.startswith(e.name):
            raise TbnError(
                f"cannot import {module_name!r} for {spec}: no module {e.name!r} on the Python path"
            ) from None
        raise TbnError(f"importing {module_name!r} for {spec} failed: {e}") from None
    except SyntaxError as e:
        raise TbnError(
            f"importing {module_name!r} for {spec} failed: SyntaxError in {e.filename}, line {e.lineno}: {e.msg}"
        ) from None
    except Exception as e:  # noqa: BLE001 - the user's module: whatever its import raises is its failure
        raise TbnError(
            f"importing {module_name!r} for {spec} failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TbnError(f"{module_name!r} has no attribute {attr!r} ({spec})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TbnError(f"{spec} is not callable: give a function or class that returns an nn.Module")
    return obj


class Normalized(nn.Module):
    """An imported network behind ``(x - mean) / std``: it then takes [0, 1] images."""

    def __init__(self, body: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = body

    def forward(self, x: Any) -> Any:
        return self.body(self.normalize(x))


def build_architecture(source: ModelSource, num_classes: int = 10) -> nn.Module:
    """The bare network ``source`` names (its own initialisation, no weights, no normalisation added)."""
    if source.kind == "robustbench":
        if source.threat_model is None:
            raise TbnError(f"robustbench:{source.name} needs its threat model ({', '.join(THREAT_MODELS)})")
        model = zoo_constructor(source.name, source.threat_model, source.dataset, num_classes)()
        what = source.label
    else:
        try:
            model = resolve_callable(source.name)()
        except TbnError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's constructor: whatever it raises is its failure
            raise TbnError(
                f"{source.name}() failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            ) from None
        what = source.name
    if not isinstance(model, nn.Module):
        raise TbnError(f"{what} returned a {type(model).__name__}, not a torch nn.Module")
    return model


def build_external(source: ModelSource | None, num_classes: int = 10) -> nn.Module:
    """The imported model as tbn-ray runs it: the architecture, behind ``Normalize`` when the source
    gives a normalisation. Its state_dict is what the run's checkpoint holds."""
    if source is None:
        raise TbnError("an imported model needs its source (config model.source)")
    body = build_architecture(source, num_classes)
    if source.normalize is None:
        return body
    mean, std = source.normalize
    return Normalized(body, mean, std)
