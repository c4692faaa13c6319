"""Typed, validated experiment configuration: the single source of every default.

A YAML file in ``configs/`` has up to five sections (``train``, ``calibrate``,
``certify``, ``evaluate``, ``ray``); anything left out takes the defaults below. CLI flags
override single fields and take their defaults from these models too, so a default lives
in one place. No field accepts NaN or infinity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from tbn_ray.config.base import Number, _Strict
from tbn_ray.config.sequential import SequentialConfig
from tbn_ray.errors import TbnError, warn

Arch = Literal["tiny", "resnet20", "resnet110", "preact_resnet18", "wrn", "imported"]
DataSource = Literal["auto", "official", "jpeg", "partial"]
Norm = Literal["l2", "linf"]
#: Above this noise std an image in [0, 1] (pixel std about 0.25) is all but invisible under its noise.
SIGMA_PLAUSIBLE = 4.0
#: The largest l2 distance between two 3x32x32 images in [0, 1]: sqrt(3072).
L2_DIAMETER = math.sqrt(3 * 32 * 32)


def _plausible_sigma(sigma: float) -> float:
    if sigma > SIGMA_PLAUSIBLE:
        warn(
            f"sigma {sigma:g} is noise {sigma / 0.25:.0f}x the spread of [0, 1] pixels: no image survives it "
            "(papers use 0.12 to 1.0); is it on the 0-255 scale?"
        )
    return sigma


def check_budget(norm: str, eps: float) -> float:
    """Warn of an attack budget that covers every image: on the 0-255 scale, or l2 beyond the image space."""
    if norm == "linf" and eps >= 1:
        warn(
            f"l-inf eps {eps:g} lets the attack reach any image in [0, 1] (every pixel may move by {eps:g}); "
            f"budgets are in [0, 1] pixel units: did you mean {eps:g}/255?"
        )
    elif norm == "l2" and eps >= L2_DIAMETER:
        warn(
            f"l2 eps {eps:g} is at least the distance between any two images in [0, 1] ({L2_DIAMETER:.1f}): the attack can reach any image"
        )
    return eps


Sigma = Annotated[
    float, Field(gt=0, description="Gaussian noise std in [0,1] pixel units"), AfterValidator(_plausible_sigma)
]

#: Radii at which certified accuracy is tabulated (docs/method.md: 0, 0.25, ..., 2.25).
REPORT_RADII: tuple[float, ...] = tuple(round(0.25 * i, 2) for i in range(10))


class DataConfig(_Strict):
    """Where CIFAR-10 comes from (``auto``: official files, else the JPEG mirror, else the exact subset)."""

    source: DataSource = "auto"
    root: str | None = Field(
        None, description="directory of the official cifar-10-batches-py (downloaded here if missing)"
    )
    shared_dir: str | None = Field(None, description="offline copies (shared/data); auto-detected when unset")
    train_limit: int | None = Field(None, ge=1, description="train on the first N training images only")


class ModelSource(_Strict):
    """Where an imported model came from: enough to build its architecture again (the weights
    themselves live in the run's checkpoint) and to name it in every result."""

    kind: Literal["robustbench", "callable"]
    name: str = Field(description="zoo entry (e.g. Engstrom2019Robustness) or module:callable returning an nn.Module")
    threat_model: str | None = Field(None, description="robustbench: the zoo's threat model (L2, Linf, corruptions)")
    dataset: str = "cifar10"
    normalize: tuple[tuple[float, float, float], tuple[float, float, float]] | None = Field(
        None, description="per-channel (mean, std) put in front of the model, which then takes [0, 1] images"
    )
    weights: str | None = Field(None, description="the state_dict file the weights were read from")
    weights_sha256: str | None = None

    @property
    def label(self) -> str:
        """How results name the model: ``robustbench:<name> (<threat model>)`` or ``<module:callable>``."""
        if self.kind == "robustbench":
            return f"robustbench:{self.name} ({self.threat_model})"
        return self.name


class ModelConfig(_Strict):
    arch: Arch = "resnet20"
    depth: int = Field(28, ge=10, description="WideResNet depth (6k+4)")
    width: int = Field(10, ge=1, description="WideResNet widening factor")
    source: ModelSource | None = Field(None, description="arch imported: where the model came from")

    @model_validator(mode="after")
    def _wrn_depth(self) -> ModelConfig:
        if self.arch == "wrn" and (self.depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6k+4 (e.g. 28, 34), got {self.depth}")
        if (self.arch == "imported") != (self.source is not None):
            raise ValueError("an imported model needs its source, and only an imported model has one")
        return self

    @model_serializer(mode="wrap")
    def _without_source(self, handler: Any) -> dict[str, Any]:
        """A model of our own architectures is stored exactly as before sources existed."""
        out = handler(self)
        if out.get("source") is None:
            out.pop("source", None)
        return out

    @property
    def label(self) -> str:
        """How results name the model: the architecture, or an imported model's source."""
        return self.source.label if self.source is not None else self.arch


class AttackConfig(_Strict):
    """A PGD threat model; budgets are in [0,1] pixel units (``8/255`` accepted)."""

    norm: Norm = "l2"
    eps: Number = Field(0.5, gt=0)
    steps: int = Field(7, ge=1)
    step_size: Number | None = Field(None, gt=0, description="default 2.5 * eps / steps (Madry et al.)")
    random_start: bool = True
    restarts: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _budget(self) -> AttackConfig:
        check_budget(self.norm, self.eps)
        return self

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps


class OptimConfig(_Strict):
    epochs: int = Field(30, ge=1, description="training epochs")
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


Objective = Literal["adversarial", "gaussian", "consistency"]


class NoiseTrainingConfig(_Strict):
    """Training on Gaussian-noised images (objectives ``gaussian`` and ``consistency``,
    docs/method.md section 6). The consistency defaults are Jeong & Shin's CIFAR-10 settings for
    sigma 0.25 and 0.5: two noisy copies, lambda 20, eta 0.5."""

    sigma: Sigma = Field(0.25, description="noise level of the gaussian and consistency objectives")
    copies: int = Field(2, ge=2, description="consistency: noisy copies of each image per step (m)")
    consistency_weight: float = Field(20.0, ge=0, description="consistency: weight of the KL term (lambda)")
    entropy_weight: float = Field(
        0.5, ge=0, description="consistency: weight of the entropy of the mean prediction (eta)"
    )


class TrainConfig(_Strict):
    """How a model is trained. ``objective`` picks the loss: PGD adversarial training (``attack``),
    or the randomized-smoothing baselines on noisy images (``noise``)."""

    name: str = Field("run", description="run name")
    seed: int = 0
    device: str = "auto"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    attack: AttackConfig = AttackConfig()
    optim: OptimConfig = OptimConfig()
    eval: EvalConfig = EvalConfig()
    augment: bool = True
    objective: Objective = Field(
        "adversarial",
        description="training loss (adversarial: PGD, the attack section; gaussian: Cohen et al.; "
        "consistency: Jeong & Shin; both at noise.sigma)",
    )
    noise: NoiseTrainingConfig = NoiseTrainingConfig()

    @model_serializer(mode="wrap")
    def _adversarial_as_before(self, handler: Any) -> dict[str, Any]:
        """Adversarial training is stored exactly as before objectives existed (the same config.yaml,
        the same ids); the noise section is stored only where an objective uses it."""
        out = handler(self)
        if out.get("objective") == "adversarial":
            out.pop("objective", None)
            if self.noise == NoiseTrainingConfig():
                out.pop("noise", None)
        return out

    @property
    def objective_label(self) -> str:
        """How results name the training: ``l2-PGD eps 1 (2 steps)``, ``gaussian sigma 0.25``, ..."""
        if self.objective == "adversarial":
            a = self.attack
            return f"{a.norm}-PGD eps {a.eps:.4g} ({a.steps} steps)"
        n = self.noise
        extra = (
            f" (m {n.copies}, lambda {n.consistency_weight:g}, eta {n.entropy_weight:g})"
            if self.objective == "consistency"
            else ""
        )
        return f"{self.objective} sigma {n.sigma:g}{extra}"

    @property
    def noise_trained(self) -> bool:
        """Trained on noisy images: its own BN statistics are those of noisy inputs."""
        return self.objective != "adversarial"

    @property
    def eval_attack(self) -> AttackConfig:
        if self.eval.attack is not None:
            return self.eval.attack
        return self.attack.model_copy(update={"steps": 10, "step_size": None})


def check_sigma(sigma: float) -> float:
    if not (sigma > 0 and math.isfinite(sigma)):
        raise TbnError(f"sigma must be a finite number > 0, got {sigma}")
    return _plausible_sigma(float(sigma))


class CalibrateConfig(_Strict):
    """TBN: BN statistics re-estimated on Gaussian-noised held-out training images."""

    sigmas: tuple[Sigma, ...] = Field(
        (0.12, 0.25, 0.5, 1.0), min_length=1, description="noise levels, one set of statistics each"
    )
    samples: int = Field(10000, ge=1, description="noisy images averaged (held-out images cycled with fresh noise)")
    batch_size: int = Field(500, ge=1, description="images per forward pass")
    seed: int = Field(0, description="seed of the noise and of the held-out images drawn")


class AdaptiveConfig(_Strict):
    """Input-adaptive sample size (``science.adaptive``): n(x) <= n planned from pilot draws that
    the bound never reuses, so the 1 - alpha guarantee is Cohen's. Defaults chosen by simulation
    (``bench/adaptive_sampling.py``) against fixed n on the report radii."""

    pilot: int = Field(1000, ge=1, description="planning draws after the n0 selection draws, never reused in the bound")
    extra_pilots: tuple[Annotated[int, Field(ge=1)], ...] = Field(
        (4000, 10000), description="further planning stages, drawn while the plan asks for more than twice the next one"
    )
    max_loss: float = Field(
        0.02, ge=0, description="expected report radii certified less often than at the full n, per image"
    )
    tolerance: float = Field(
        0.02, ge=0, description="l2: accept an n whose predicted radius is within this of the full n's"
    )
    margin: float = Field(
        0.02, ge=0, description="l2: ... or that clears the highest report radius reached at the full n by this"
    )
    fractions: tuple[Annotated[Number, Field(gt=0, le=1)], ...] = Field(
        (1 / 64, 3 / 128, 1 / 32, 3 / 64, 1 / 16, 3 / 32, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1.0),
        min_length=1,
        description="the estimation sizes the plan picks from, as fractions of n (e.g. 3/128); must include 1 (the full n)",
    )

    @model_validator(mode="after")
    def _full_n(self) -> AdaptiveConfig:
        if max(self.fractions) != 1:
            raise ValueError(f"fractions must include 1 (the full n), got {list(self.fractions)}")
        return self


#: Shards a certification is cut into when ``certify.shards`` is not set (at most one per image).
DEFAULT_SHARDS = 64


class CertifyConfig(_Strict):
    """Cohen et al.'s CERTIFY on the test set (docs/method.md): the one carrier of every setting of
    a certification. A plan is made from this config, a run and an output, nothing else; its run id
    and the parameters stored with every result are ``identity`` of this config (plus what the run
    and the data fix), so a new field changes the run id when set and leaves stored ids alone."""

    sigmas: tuple[Sigma, ...] = Field(
        (0.25,), min_length=1, description="noise levels, each certified with its own statistics"
    )
    n0: int = Field(100, ge=1, description="selection draws (guess the top class)")
    n: int = Field(100000, ge=1, description="estimation draws (at most, with adaptive)")
    alpha: float = Field(0.001, gt=0, lt=1, description="failure probability of each certificate")
    batch_size: int = Field(1000, ge=1, description="noisy copies per forward pass")
    skip: int = Field(1, ge=1, description="certify every skip-th test image (Cohen et al.: 20)")
    start: int = Field(0, ge=0, description="first test index")
    stop: int | None = Field(None, ge=1, description="test indices below this only (default: to the end)")
    max_images: int | None = Field(None, ge=1, description="at most this many images (default: no limit)")
    seed: int = Field(0, ge=0, description="run seed; each example's noise derives from (seed, index)")
    bn: str = Field("tbn", description="tbn (BN statistics calibrated at the same sigma) or clean")
    data: DataConfig | None = Field(None, description="CIFAR-10 source (default: the run's own)")
    shards: int | None = Field(
        None,
        ge=1,
        description=f"fixed shards the images are split into (default: {DEFAULT_SHARDS}, at most one per image)",
    )
    channels_last: bool = Field(False, description="channels-last memory format: faster convolutions (its own run id)")
    fold_bn: bool = Field(False, description="BN folded into the convolutions: faster (its own run id)")
    amp: Literal["off", "bf16", "fp16"] = Field(
        "off", description="autocast dtype of the forward passes, CUDA only (its own run id)"
    )
    images_per_pass: int = Field(
        1,
        ge=1,
        description="images sharing each forward pass: fills the batch with several images' noise (its own run id)",
    )
    sample_size: Literal["fixed", "sequential", "pilot"] = Field(
        "fixed",
        description="fixed: n draws per image (Cohen et al.); sequential: at most n, an anytime-valid bound at a fixed schedule "
        "of looks that stops once the report radius is settled; pilot: at most n, planned from pilot draws (each its own run id)",
    )
    adaptive: bool = Field(
        False,
        description="deprecated alias: --adaptive is --sample-size sequential (pilot with --adaptive-design pilot)",
    )
    adaptive_design: Literal["sequential", "pilot"] = Field(
        "sequential", description="deprecated alias: with --adaptive, the design; use --sample-size"
    )
    sequential: SequentialConfig = SequentialConfig()
    adaptive_sampling: AdaptiveConfig = AdaptiveConfig()
    cudnn_autotune: bool = Field(False, description="cuDNN's per-shape algorithm search, CUDA only (its own run id)")
    compile: str | None = Field(
        None, description="torch.compile backend for the base classifier, e.g. inductor (its own run id)"
    )
    clip: bool = Field(
        False,
        description="clamp each noisy copy to [0, 1] before the network: another fixed base classifier (its own run id)",
    )

    #: Fields the plan records itself (sigma per result, the statistics set, the resolved data and shards).
    _PLANNED: ClassVar[frozenset[str]] = frozenset(
        {"sigmas", "bn", "data", "shards", "sample_size", "adaptive_design", "sequential", "adaptive_sampling"}
    )
    #: Fields stored with every result whatever their value: they are part of every run id.
    _ALWAYS: ClassVar[tuple[str, ...]] = (
        "n0",
        "n",
        "alpha",
        "seed",
        "batch_size",
        "start",
        "skip",
        "stop",
        "max_images",
        "channels_last",
        "fold_bn",
        "amp",
    )
    #: Fields that change nothing off CUDA: recorded at their default elsewhere.
    _CUDA_ONLY: ClassVar[frozenset[str]] = frozenset({"amp", "cudnn_autotune"})

    def identity(self, device_type: str) -> dict[str, Any]:
        """Every setting that changes a certificate, for the run id and every result's parameters.

        A field outside ``_ALWAYS`` is recorded only when it differs from its default, so adding a
        field leaves the ids of stored results unchanged; the device type is recorded too (a CUDA
        generator draws other noise)."""
        out: dict[str, Any] = {"device": device_type}
        for name, info in type(self).model_fields.items():
            if name in self._PLANNED:
                continue
            value = getattr(self, name)
            if name in self._CUDA_ONLY and device_type != "cuda":
                value = info.default
            if (
                name == "adaptive" and value
            ):  # the chosen design's settings (the pilot's under the key its stored ids use)
                value = (
                    self.adaptive_sampling.model_dump(mode="json")
                    if self.adaptive_design == "pilot"
                    else {"design": "sequential", **self.sequential.model_dump(mode="json")}
                )
            if name in self._ALWAYS or value != info.default:
                out[name] = value
        return out

    @field_validator("bn")
    @classmethod
    def _bn_mode(cls, v: str) -> str:
        if v not in ("tbn", "clean"):
            raise ValueError(f"bn must be 'tbn' or 'clean' (a certificate needs frozen statistics), got {v!r}")
        return v

    @field_validator("compile")
    @classmethod
    def _compile_backend(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.strip():
            raise ValueError("compile backend must be a torch.compile backend name (e.g. inductor), or unset")
        import torch._dynamo  # the backend list, checked here rather than inside a worker an hour later

        known = torch._dynamo.list_backends(exclude_tags=())
        if v not in known:
            raise ValueError(f"unknown torch.compile backend {v!r}; use one of {', '.join(known)}")
        return v

    @model_validator(mode="after")
    def _range(self) -> CertifyConfig:
        if self.stop is not None and self.stop <= self.start:
            raise ValueError(f"stop ({self.stop}) must be above start ({self.start})")
        return self

    @model_validator(mode="after")
    def _one_sample_size(self) -> CertifyConfig:
        """``sample_size`` is the setting; ``adaptive``/``adaptive_design`` are its old spelling, kept
        in step with it because the run id is written with them (stored ids do not change)."""
        given = self.model_fields_set
        old = self.adaptive_design if self.adaptive else "fixed"
        if {
            "adaptive",
            "adaptive_design",
        } & given:  # the old spelling, given (dumps never hold it): it wins over a dumped "fixed"
            if "sample_size" in given and self.sample_size not in ("fixed", old):
                raise ValueError(
                    f"sample_size {self.sample_size!r} and the deprecated adaptive/adaptive_design ({old!r}) disagree: give sample_size only"
                )
            object.__setattr__(self, "sample_size", old)
        elif "sample_size" in given:
            object.__setattr__(self, "adaptive", self.sample_size != "fixed")
            object.__setattr__(
                self, "adaptive_design", self.sample_size if self.sample_size != "fixed" else "sequential"
            )
        return self

    @model_serializer(mode="wrap")
    def _without_the_old_spelling(self, handler: Any) -> dict[str, Any]:
        """Dumped with ``sample_size`` only, so a dump with a setting changed validates as that setting."""
        out = handler(self)
        out.pop("adaptive", None)
        out.pop("adaptive_design", None)
        return out

    @property
    def design(self) -> str:
        """The sample size in force, fixed, sequential or pilot: read from the fields the run id is
        written with, so a copy made without validation (``model_copy``) cannot disagree with it."""
        return self.adaptive_design if self.adaptive else "fixed"

    @property
    def unique_sigmas(self) -> tuple[float, ...]:
        """The sigmas in the order given, each once."""
        return tuple(dict.fromkeys(float(s) for s in self.sigmas))


class EvaluateConfig(_Strict):
    """The ``evaluate`` section: defaults of ``tbn-ray evaluate`` (its flags override them)."""

    batch_size: int = Field(
        200,
        ge=1,
        description="images per forward pass, and the test batch of the batch BN modes (TENT's CIFAR-10-C setting)",
    )
    attack_steps: int = Field(50, ge=1, description="iterations per attack run: an evaluation, not training")
    restarts: int = Field(1, ge=1, description="random starts per attack")
    attacks: tuple[str, ...] = Field(
        ("pgd", "apgd-ce"),
        description="pgd | apgd-ce | autoattack (standard AutoAttack, frozen BN modes only; needs tbn-ray[zoo])",
    )
    norm: Norm = Field("l2", description="threat model of the attacks")
    eps: Number = Field(0.5, gt=0, description="attack budget in [0,1] pixel units, e.g. 0.5 or 8/255")
    step_size: float | None = Field(
        None, gt=0, description="PGD step size; APGD sets its own (default: 2.5 eps / steps)"
    )
    seed: int = Field(0, description="random starts derive from (seed, attack, batch)")
    corruptions: str = Field("all", description="'all' (the 15 standard corruptions) or a comma list, e.g. fog,snow")
    severities: str = Field("1-5", description="severities: 1-5, 3 or 1,3,5")
    cifar10c_seed: int = Field(0, description="CIFAR-10-C regeneration seed (per-image randomness derives from it)")

    @model_validator(mode="after")
    def _budget(self) -> EvaluateConfig:
        check_budget(self.norm, self.eps)
        return self


class RayConfig(_Strict):
    """How work is placed on Ray (ignored by --local): Ray Train's workers and recovery for
    ``train``, the actor pool of ``certify`` and ``evaluate``. ``None``: decided by the cluster."""

    workers: int = Field(1, ge=1, description="Ray Train DDP workers")
    cpus_per_worker: float | None = Field(
        None,
        gt=0,
        description="CPUs each worker reserves and uses as torch threads "
        "(default: a local instance's CPUs / workers; on a cluster 1)",
    )
    gpus_per_worker: int = Field(0, ge=0, le=1, description="0: CPU workers (gloo); 1: one GPU per worker (nccl)")
    keep: int = Field(3, ge=1, description="Ray checkpoints kept, the most recent; best.pt is kept besides")
    max_failures: int = Field(3, ge=0, description="worker failures recovered from the last checkpoint")
    start_timeout_s: float | None = Field(
        None,
        gt=0,
        description="seconds to wait for the workers to be placed, per attempt (default: 30 s; 900 s on an autoscaling cluster)",
    )
    actors: int | None = Field(None, ge=1, description="actors to start (default: one per GPU, else one per CPU)")
    gpus_per_actor: float | None = Field(
        None, ge=0, description="GPUs per actor (default: 1 on a cluster with GPUs, else 0)"
    )
    cpus_per_actor: float | None = Field(
        None, gt=0, description="CPUs per actor, also its torch threads (default: the node's CPUs per GPU, else 1)"
    )


class RuntimeConfig(_Strict):
    """Settings of this process, not of an experiment."""

    threads: int | Literal["auto"] = Field(
        "auto",
        description="torch CPU threads; auto: the CPUs this process may use (affinity, cgroup quota) that are idle now",
    )

    @field_validator("threads", mode="before")
    @classmethod
    def _count_or_auto(cls, v: Any) -> Any:
        if v == "auto":
            return v
        try:
            n = int(v)
        except (TypeError, ValueError):
            n = 0
        if n < 1 or (isinstance(v, float) and v != n):
            raise ValueError(f"use a whole number of threads >= 1, or auto; got {v!r}")
        return n


class ExperimentConfig(_Strict):
    train: TrainConfig = TrainConfig()
    calibrate: CalibrateConfig = CalibrateConfig()
    certify: CertifyConfig = CertifyConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    ray: RayConfig = RayConfig()


def _one_line(e: ValidationError, where: str, flags: Mapping[str, str] | None = None) -> str:
    """Every problem on one line, each named by its command-line flag where it came from one.

    A container's "too short after validation" is left out when one of its items failed:
    ``--sigma 0`` is one error (the value), not two."""
    errors = e.errors()
    failed = [tuple(err["loc"]) for err in errors]
    parts, all_flags = [], True
    for err in errors:
        loc = tuple(err["loc"])
        if err["type"] == "too_short" and any(f[: len(loc)] == loc and f != loc for f in failed):
            continue
        dotted = ".".join(str(p) for p in loc) or "(top)"
        flag = next((f for d, f in (flags or {}).items() if dotted == d or dotted.startswith(d + ".")), None)
        all_flags &= flag is not None
        got = err.get("input")
        shown = f" (got {got!r})" if isinstance(got, (str, int, float)) and err["type"] != "value_error" else ""
        parts.append(f"{flag or dotted}: {err['msg'].removeprefix('Value error, ')}{shown}")
    return "; ".join(parts) if all_flags else f"invalid config {where}: " + "; ".join(parts)


def parse_yaml(text: str, where: str, holds: str) -> dict[str, Any]:
    """A YAML document's top-level mapping; bad YAML or a non-mapping is one line naming ``where``."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise TbnError(f"{where} is not valid YAML{at}: {problem}") from None
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


def load_config(
    path: str | Path | None = None, flags: Mapping[str, str] | None = None, **overrides: Any
) -> ExperimentConfig:
    """Read a YAML experiment config (or the defaults), apply dotted overrides, validate.

    ``flags`` names the command-line flag of a dotted field, for the error message."""
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
        raise TbnError(_one_line(e, where, flags)) from None


def parse_config(
    model: type[BaseModel], raw: dict[str, Any], where: str, flags: Mapping[str, str] | None = None
) -> Any:
    """Validate a stored config section (e.g. from a checkpoint) or flags with a one-line error."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise TbnError(_one_line(e, where, flags)) from None


def default(model: type[BaseModel], field: str) -> Any:
    """The default of one field, for CLI help texts."""
    return model.model_fields[field].default


def shown_default(model: type[BaseModel], field: str) -> str:
    """A field's default as a help text writes it: ``off`` for False, ``0.12, 0.25`` for a tuple."""
    value = default(model, field)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


# The sweep's and the reproduction's configs live beside this module and are re-exported here,
# so that every config is imported from ``tbn_ray.config``; they build on the classes above.
from tbn_ray.config.reproduce import (  # noqa: E402
    CostConfig,
    ModelSpec,
    NoiseAccuracyConfig,
    ReproduceConfig,
    ReproduceEvaluateConfig,
    load_reproduce_config,
)
from tbn_ray.config.sweep import (  # noqa: E402
    SWEEP_OBJECTIVES,
    EarlyStopConfig,
    SweepConfig,
    SweepResources,
    ValidationConfig,
    load_sweep_config,
    objective_value,
)

__all__ = [
    "AdaptiveConfig",
    "Arch",
    "AttackConfig",
    "CalibrateConfig",
    "CertifyConfig",
    "check_budget",
    "check_sigma",
    "CostConfig",
    "DataConfig",
    "DataSource",
    "default",
    "DEFAULT_SHARDS",
    "EarlyStopConfig",
    "EvalConfig",
    "EvaluateConfig",
    "ExperimentConfig",
    "L2_DIAMETER",
    "load_config",
    "load_reproduce_config",
    "load_sweep_config",
    "ModelConfig",
    "ModelSource",
    "ModelSpec",
    "NoiseAccuracyConfig",
    "NoiseTrainingConfig",
    "Norm",
    "Objective",
    "objective_value",
    "OptimConfig",
    "parse_config",
    "parse_yaml",
    "RayConfig",
    "REPORT_RADII",
    "ReproduceConfig",
    "ReproduceEvaluateConfig",
    "RuntimeConfig",
    "SequentialConfig",
    "shown_default",
    "Sigma",
    "SIGMA_PLAUSIBLE",
    "SWEEP_OBJECTIVES",
    "SweepConfig",
    "SweepResources",
    "TrainConfig",
    "ValidationConfig",
]
