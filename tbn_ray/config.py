"""Typed, validated experiment configuration: the single source of every default.

A YAML file in ``configs/`` has up to three sections (``train``, ``calibrate``,
``certify``); anything left out takes the defaults below. CLI flags override single
fields and take their defaults from these models too, so a default lives in one place.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tbn_ray.errors import TbnError

Arch = Literal["tiny", "resnet20", "resnet110", "preact_resnet18", "wrn"]
DataSource = Literal["auto", "official", "jpeg", "partial"]
Norm = Literal["l2", "linf"]
Sigma = Annotated[float, Field(gt=0, description="Gaussian noise std in [0,1] pixel units")]

#: Radii at which certified accuracy is tabulated (science.md: 0, 0.25, ..., 2.25).
REPORT_RADII: tuple[float, ...] = tuple(round(0.25 * i, 2) for i in range(10))


def _number(v: Any) -> Any:
    """Accept ``8/255``-style strings, the way l-inf budgets are usually written."""
    if isinstance(v, str):
        try:
            return float(Fraction(v.strip()))
        except (ValueError, ZeroDivisionError) as e:
            raise ValueError(f"not a number: {v!r}") from e
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    """Where CIFAR-10 comes from (``auto``: official files, else the JPEG mirror, else the exact subset)."""

    source: DataSource = "auto"
    root: str | None = Field(None, description="directory of the official cifar-10-batches-py (downloaded here if missing)")
    shared_dir: str | None = Field(None, description="offline copies (shared/data); auto-detected when unset")
    train_limit: int | None = Field(None, ge=1, description="train on the first N training images only")


class ModelConfig(_Strict):
    arch: Arch = "resnet20"
    depth: int = Field(28, ge=10, description="WideResNet depth (6k+4)")
    width: int = Field(10, ge=1, description="WideResNet widening factor")

    @model_validator(mode="after")
    def _wrn_depth(self) -> ModelConfig:
        if self.arch == "wrn" and (self.depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6k+4 (e.g. 28, 34), got {self.depth}")
        return self


class AttackConfig(_Strict):
    """A PGD threat model; budgets are in [0,1] pixel units (``8/255`` accepted)."""

    norm: Norm = "l2"
    eps: float = Field(0.5, gt=0)
    steps: int = Field(7, ge=1)
    step_size: float | None = Field(None, gt=0, description="default 2.5 * eps / steps (Madry et al.)")
    random_start: bool = True
    restarts: int = Field(1, ge=1)

    _num = field_validator("eps", "step_size", mode="before")(_number)

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps


class OptimConfig(_Strict):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1, description="global batch size, split across workers")
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: tuple[float, ...] = Field((0.5, 0.75), description="step schedule: fractions of training")
    gamma: float = Field(0.1, gt=0)
    warmup_epochs: float = Field(0.0, ge=0)
    amp: Literal["off", "bf16", "fp16"] = Field("off", description="autocast dtype; used on GPU only")
    channels_last: bool = False


class EvalConfig(_Strict):
    """Held-out evaluation after each epoch (clean and PGD accuracy)."""

    images: int = Field(1000, ge=1, description="held-out images evaluated per epoch")
    attack: AttackConfig | None = Field(None, description="default: the training attack with 10 steps")
    batch_size: int = Field(500, ge=1)


class TrainConfig(_Strict):
    name: str = "run"
    seed: int = 0
    device: str = "auto"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    attack: AttackConfig = AttackConfig()
    optim: OptimConfig = OptimConfig()
    eval: EvalConfig = EvalConfig()
    augment: bool = True

    @property
    def eval_attack(self) -> AttackConfig:
        if self.eval.attack is not None:
            return self.eval.attack
        return self.attack.model_copy(update={"steps": 10, "step_size": None})


def check_sigma(sigma: float) -> float:
    if not sigma > 0:
        raise TbnError(f"sigma must be > 0, got {sigma}")
    return float(sigma)


class CalibrateConfig(_Strict):
    """TBN: BN statistics re-estimated on Gaussian-noised held-out training images."""

    sigmas: tuple[Sigma, ...] = Field((0.12, 0.25, 0.5, 1.0), min_length=1)
    samples: int = Field(10000, ge=1, description="noisy images averaged (held-out images cycled with fresh noise)")
    batch_size: int = Field(500, ge=1)
    seed: int = 0


class CertifyConfig(_Strict):
    """Cohen et al.'s CERTIFY on the test set (science.md)."""

    sigmas: tuple[Sigma, ...] = Field((0.25,), min_length=1)
    n0: int = Field(100, ge=1)
    n: int = Field(100000, ge=1)
    alpha: float = Field(0.001, gt=0, lt=1)
    batch_size: int = Field(1000, ge=1, description="noisy copies per forward pass")
    skip: int = Field(1, ge=1, description="certify every skip-th test image")
    start: int = Field(0, ge=0)
    max_images: int | None = Field(None, ge=1)
    seed: int = 0
    bn: str = Field("tbn", description="'tbn' (BN statistics calibrated at the same sigma) or 'clean'")

    @field_validator("bn")
    @classmethod
    def _bn_mode(cls, v: str) -> str:
        if v not in ("tbn", "clean"):
            raise ValueError(f"bn must be 'tbn' or 'clean' (a certificate needs frozen statistics), got {v!r}")
        return v


class EvaluateConfig(_Strict):
    """The ``evaluate`` section: defaults of ``tbn-ray evaluate`` (its flags override them)."""

    batch_size: int = Field(200, ge=1, description="images per forward pass, and the test batch of the batch BN modes (TENT's CIFAR-10-C setting)")
    attack_steps: int = Field(50, ge=1, description="iterations per attack run: an evaluation, not training")
    restarts: int = Field(1, ge=1, description="random starts per attack")
    attacks: tuple[str, ...] = ("pgd", "apgd-ce")


class ExperimentConfig(_Strict):
    train: TrainConfig = TrainConfig()
    calibrate: CalibrateConfig = CalibrateConfig()
    certify: CertifyConfig = CertifyConfig()
    evaluate: EvaluateConfig = EvaluateConfig()


def _one_line(e: ValidationError, where: str) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top)"
        got = err.get("input")
        shown = f" (got {got!r})" if isinstance(got, (str, int, float)) and err["type"] != "value_error" else ""
        parts.append(f"{loc}: {err['msg']}{shown}")
    return f"invalid config {where}: " + "; ".join(parts)


def parse_yaml(text: str, where: str, holds: str) -> dict[str, Any]:
    """A YAML document's top-level mapping; bad YAML or a non-mapping is one line naming ``where``."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise TbnError(f"{where} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise TbnError(f"{where} must hold a mapping ({holds})")
    return raw


def _read_yaml(path: str | Path, what: str, holds: str) -> dict[str, Any]:
    """A YAML file's top-level mapping; a missing or non-text file is one line too."""
    p = Path(path)
    if not p.is_file():
        raise TbnError(f"{what} not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TbnError(f"{what} {p} is not UTF-8 text: give a YAML file") from None
    return parse_yaml(text, f"{what} {p}", holds)


def load_config(path: str | Path | None = None, **overrides: Any) -> ExperimentConfig:
    """Read a YAML experiment config (or the defaults), apply dotted overrides, validate."""
    raw: dict[str, Any] = {}
    where = "(defaults)"
    if path is not None:
        where = str(path)
        raw = _read_yaml(path, "config file", "train, calibrate, certify, evaluate sections")
    for dotted, value in overrides.items():
        if value is None:
            continue
        where = f"{where} with command-line flags" if "flags" not in where else where
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise TbnError(_one_line(e, where)) from None


def parse_config(model: type[BaseModel], raw: dict[str, Any], where: str) -> Any:
    """Validate a stored config section (e.g. from a checkpoint) with a one-line error."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise TbnError(_one_line(e, where)) from None


def default(model: type[BaseModel], field: str) -> Any:
    """The default of one field, for CLI help texts."""
    return model.model_fields[field].default


# --- tbn-ray sweep -------------------------------------------------------------------------

#: Objectives a sweep can maximise: ACR, or certified accuracy at one of the report radii.
SWEEP_OBJECTIVES = ("acr", *(f"certified_accuracy@{r:g}" for r in REPORT_RADII))


class SweepResources(_Strict):
    """What one trial reserves: a training trial's Ray Train workers (the trial itself reserves
    nothing), or the single process that calibrates and certifies one (epsilon, sigma) pair."""

    workers: int = Field(1, ge=1, description="Ray Train DDP workers per training trial")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: int = Field(0, ge=0, le=1, description="0 (gloo on CPU) or 1 (nccl, one GPU per worker)")
    eval_cpus: float = Field(1.0, gt=0, description="CPUs per evaluation trial (also its torch threads)")
    eval_gpus: float = Field(0.0, ge=0, le=1, description="GPU (or fraction) per evaluation trial")
    max_concurrent_trials: int | None = Field(None, ge=1, description="default, and cap on a fixed-size cluster: as many as fit")
    max_failures: int = Field(1, ge=0, description="retries of a failed trial, and of a lost Train worker group")


class EarlyStopConfig(_Strict):
    """ASHA on the training trials, ranked by held-out PGD accuracy under the sweep's ``pgd`` attack."""

    enabled: bool = False
    grace_period: int = Field(1, ge=1, description="epochs every training trial gets before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="keep the best 1/reduction_factor at each rung")


class ValidationConfig(_Strict):
    """The images the sweep certifies: held-out training images, never the test set."""

    images: int = Field(500, ge=1, description="the LAST held-out images in official order; TBN calibration uses the others")


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
            raise ValueError(f"unknown objective {v!r}: use acr or certified_accuracy@R with R one of {', '.join(f'{r:g}' for r in REPORT_RADII)}")
        return v

    @model_validator(mode="after")
    def _grid_owned(self) -> SweepConfig:
        owned = {
            "train.name": "name" in self.train.model_fields_set,
            "train.attack.eps": "eps" in self.train.attack.model_fields_set,
            "train.eval.attack": "attack" in self.train.eval.model_fields_set,
            "calibrate.sigmas": "sigmas" in self.calibrate.model_fields_set,
            **{f"certify.{k}": k in self.certify.model_fields_set for k in ("sigmas", "skip", "start", "max_images", "bn")},
        }
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
    return parse_config(SweepConfig, _read_yaml(path, "sweep config", "epsilons, sigmas, objective, train, ..."), str(path))
