"""The ``tbn-ray reproduce`` config (configs/paper.yaml): the models of the paper's grid and what
each stage computes for them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from tbn_ray.config import (
    CalibrateConfig,
    CertifyConfig,
    EvaluateConfig,
    Sigma,
    TrainConfig,
    _read_yaml,
    _Strict,
    parse_config,
)


class ModelSpec(_Strict):
    """One trained model of the reproduction: a name and what its training changes from the shared ``train`` section."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of the shared train section")
    sigmas: tuple[Sigma, ...] | None = Field(
        None, min_length=1, description="the sigmas this model is certified at (default: every certify sigma)"
    )
    bn: tuple[Literal["tbn", "clean"], ...] | None = Field(
        None,
        min_length=1,
        description="statistics it is certified with (default: tbn, and clean with certify_clean; "
        "a noise-trained model: clean, its own statistics of noisy inputs)",
    )
    attack: bool | None = Field(
        None, description="attacked in the evaluate stage (default: adversarially trained models only)"
    )


class NoiseAccuracyConfig(_Strict):
    """Base-classifier accuracy under Gaussian noise, clean BN vs TBN (claim a)."""

    images: int = Field(1000, ge=1, description="first test images used")
    draws: int = Field(4, ge=1, description="noise draws per image")
    batch_size: int = Field(500, ge=1)
    seed: int = 0


class ReproduceEvaluateConfig(_Strict):
    """CIFAR-10-C per BN mode (claim d) and attacks with clean statistics (claim e)."""

    corruptions: str = Field("all", description="'all' or a comma list")
    severities: str = "1-5"
    corruption_modes: tuple[str, ...] = Field(("clean", "test-batch"), min_length=1)
    corruption_images: int | None = Field(None, ge=1, description="first test images of CIFAR-10-C (default: all)")
    attack_images: int = Field(1000, ge=1, description="first test images attacked")
    autoattack_images: int | None = Field(
        None,
        ge=1,
        description="AutoAttack, when among the attacks, on the first of these only (default: attack_images)",
    )
    cifar10c_seed: int = 0
    attack_seed: int = 0


class CostConfig(_Strict):
    """How device time becomes money in the reports."""

    price_per_gpu_hour: float = Field(
        3.5, ge=0, description="USD; default: low end of on-demand H200 prices at specialty GPU clouds, May 2026"
    )
    price_source: str = "on-demand H200 SXM at specialty GPU clouds, $3.50-4.50 per GPU-hour (May 2026 price surveys)"


class ReproduceConfig(_Strict):
    """``tbn-ray reproduce``: the paper's experiment grid as one resumable pipeline (configs/paper.yaml)."""

    name: str = Field("paper", pattern=r"^[A-Za-z0-9_.-]+$")
    train: dict[str, Any] = Field(default_factory=dict, description="train section shared by every model")
    models: tuple[ModelSpec, ...] = Field(min_length=1)
    calibrate: CalibrateConfig = CalibrateConfig()
    certify: CertifyConfig = CertifyConfig(sigmas=(0.12, 0.25, 0.5, 1.0), skip=20)
    certify_clean: bool = Field(True, description="also certify with the clean statistics: the contrast of claim (a)")
    noise: NoiseAccuracyConfig = NoiseAccuracyConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    robustness: ReproduceEvaluateConfig = ReproduceEvaluateConfig()
    cost: CostConfig = CostConfig()
    device: str = "auto"
    keep_optimizer: bool = Field(
        True,
        description="keep the optimizer and scheduler in a finished model's checkpoint (needed only to train it further); off: weights only, small enough to commit",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> ReproduceConfig:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        return self

    def certify_sigmas(self, spec: ModelSpec) -> tuple[float, ...]:
        return spec.sigmas if spec.sigmas is not None else self.certify.unique_sigmas

    def certify_bn(self, spec: ModelSpec) -> tuple[str, ...]:
        if spec.bn is not None:
            return spec.bn
        if self.train_config(spec).noise_trained:
            return ("clean",)
        return ("tbn", "clean") if self.certify_clean else ("tbn",)

    def attacked(self, spec: ModelSpec) -> bool:
        return spec.attack if spec.attack is not None else not self.train_config(spec).noise_trained

    def train_config(self, spec: ModelSpec) -> TrainConfig:
        """The shared train section with the model's overrides merged in (nested dicts merge)."""
        return parse_config(
            TrainConfig,
            _merge({**self.train, "name": spec.name, "device": self.device}, spec.train),
            f"models[{spec.name}].train",
        )


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_reproduce_config(path: str | Path) -> ReproduceConfig:
    raw = _read_yaml(
        path, "reproduce config", "name, train, models, calibrate, certify, noise, evaluate, robustness, cost"
    )
    cfg = parse_config(ReproduceConfig, raw, str(path))
    for spec in cfg.models:
        cfg.train_config(spec)  # every model's training config is valid before anything runs
    return cfg
