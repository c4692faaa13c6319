"""The ``tbn-ray sweep`` config: the grid of training epsilons and sigmas, what trains, what is
evaluated per pair and how the best pair is chosen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from tbn_ray.config import (
    REPORT_RADII,
    AttackConfig,
    CalibrateConfig,
    CertifyConfig,
    TrainConfig,
    _read_yaml,
    _Strict,
    parse_config,
)
from tbn_ray.config.base import _number

#: Objectives a sweep can maximise: ACR, or certified accuracy at one of the report radii.
SWEEP_OBJECTIVES = ("acr", *(f"certified_accuracy@{r:g}" for r in REPORT_RADII))


class SweepResources(_Strict):
    """What the sweep reserves: a training trial's Ray Train workers (the trial itself reserves
    nothing), and each actor that calibrates and certifies (epsilon, sigma) pairs."""

    workers: int = Field(1, ge=1, description="Ray Train DDP workers per training trial")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: int = Field(0, ge=0, le=1, description="0 (gloo on CPU) or 1 (nccl, one GPU per worker)")
    eval_cpus: float = Field(1.0, gt=0, description="CPUs per evaluation actor (also its torch threads)")
    eval_gpus: float = Field(0.0, ge=0, le=1, description="GPU (or fraction) per evaluation actor")
    max_concurrent_trials: int | None = Field(
        None,
        ge=1,
        description="training trials and evaluation actors at once; default, and cap on a fixed-size cluster: as many as fit",
    )
    max_failures: int = Field(
        1, ge=0, description="retries of a failed training trial, and of a lost Train worker group"
    )


class EarlyStopConfig(_Strict):
    """ASHA on the training trials, ranked by held-out PGD accuracy under the sweep's ``pgd`` attack."""

    enabled: bool = False
    grace_period: int = Field(1, ge=1, description="epochs every training trial gets before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="keep the best 1/reduction_factor at each rung")


class ValidationConfig(_Strict):
    """The images the sweep certifies: held-out training images, never the test set."""

    images: int = Field(
        500, ge=1, description="the LAST held-out images in official order; TBN calibration uses the others"
    )


class SweepConfig(_Strict):
    """``tbn-ray sweep``: training epsilon x TBN sigma, each epsilon trained once.

    ``train``/``calibrate``/``certify`` are the usual sections minus what the grid decides:
    the attack's eps, the held-out evaluation attack (``pgd``, the same for every epsilon so
    that PGD accuracies and ASHA's ranking compare), the sigmas and the image selection.
    """

    name: str = Field("sweep", pattern=r"^[A-Za-z0-9_.-]+$", description="results go to <storage>/<name>")
    epsilons: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    sigmas: tuple[float, ...] = (0.12, 0.25, 0.5, 1.0)
    objective: str = Field("certified_accuracy@0.5", description=" | ".join(SWEEP_OBJECTIVES))
    pgd: AttackConfig = AttackConfig(norm="l2", eps=0.5, steps=10)
    train: TrainConfig = TrainConfig()
    calibrate: CalibrateConfig = CalibrateConfig()
    certify: CertifyConfig = CertifyConfig()
    validation: ValidationConfig = ValidationConfig()
    resources: SweepResources = SweepResources()
    early_stopping: EarlyStopConfig = EarlyStopConfig()

    @field_validator("epsilons", "sigmas", mode="before")
    @classmethod
    def _grid(cls, v: Any, info: Any) -> Any:
        values = [_number(x) for x in v] if isinstance(v, (list, tuple)) else v
        if isinstance(values, list):
            if not values:
                raise ValueError(f"the {info.field_name} grid is empty: list at least one value")
            bad = [x for x in values if isinstance(x, (int, float)) and not x > 0]
            if bad:
                raise ValueError(f"every value must be > 0, got {bad[0]}")
            if len(set(values)) != len(values):
                raise ValueError("values repeat: list each once")
        return values

    @field_validator("objective")
    @classmethod
    def _objective(cls, v: str) -> str:
        if v not in SWEEP_OBJECTIVES:
            raise ValueError(
                f"unknown objective {v!r}: use acr or certified_accuracy@R with R one of {', '.join(f'{r:g}' for r in REPORT_RADII)}"
            )
        return v

    @model_validator(mode="after")
    def _grid_owned(self) -> SweepConfig:
        owned = {
            "train.name": "name" in self.train.model_fields_set,
            "train.attack.eps": "eps" in self.train.attack.model_fields_set,
            "train.eval.attack": "attack" in self.train.eval.model_fields_set,
            "calibrate.sigmas": "sigmas" in self.calibrate.model_fields_set,
            **{
                f"certify.{k}": k in self.certify.model_fields_set
                for k in ("sigmas", "skip", "start", "max_images", "bn")
            },
        }
        certify_only = [f"certify.{k}" for k in ("shards", "stop", "data") if k in self.certify.model_fields_set]
        if certify_only:
            raise ValueError(
                f"{', '.join(certify_only)}: settings of tbn-ray certify, not used by a sweep; remove from the config"
            )
        set_here = [k for k, v in owned.items() if v]
        if set_here:
            raise ValueError(
                f"{', '.join(set_here)}: set by the sweep (epsilons, sigmas, pgd, validation, name); remove from the config"
            )
        if self.early_stopping.enabled and self.early_stopping.grace_period >= self.train.optim.epochs:
            raise ValueError(
                f"early_stopping.grace_period {self.early_stopping.grace_period} leaves no epoch to stop at "
                f"(train.optim.epochs {self.train.optim.epochs}): lower it or turn early stopping off"
            )
        return self

    @property
    def objective_radius(self) -> float | None:
        """The radius of a certified-accuracy objective; None for ACR."""
        return float(self.objective.partition("@")[2]) if "@" in self.objective else None


def load_sweep_config(path: str | Path) -> SweepConfig:
    """Read and validate a sweep YAML (configs/sweep.yaml); every problem is a one-line TbnError."""
    return parse_config(
        SweepConfig, _read_yaml(path, "sweep config", "epsilons, sigmas, objective, train, ..."), str(path)
    )


def objective_value(cfg: SweepConfig, row: dict[str, Any]) -> float:
    """What the sweep maximises: ACR, or certified accuracy at the objective's radius."""
    r = cfg.objective_radius
    return float(row["acr"] if r is None else row["certified_accuracy"][str(float(r))])
