"""Corruption robustness (CIFAR-10-C) and empirical adversarial robustness, per BN mode (``tbn-ray evaluate``).

BN modes: the ways one set of trained weights normalises its activations.

* ``clean``: the trained running statistics, frozen (eval mode).
* ``sigma:<s>``: the TBN set calibrated at noise level ``s`` (``tbn-ray calibrate``), frozen.
* ``test-batch``: transductive BN (Schneider et al. 2020; TENT's "norm"): every forward pass
  normalises each BN layer's input with the per-channel mean and (biased) variance of the
  current batch. Numbers depend on the batch size, which is part of every result's name.
* ``test-batch:N``: Schneider et al.'s prior mixing with pseudo sample size N: the layer uses
  mean = N/(N+n) * mean_clean + n/(N+n) * mean_batch (the same for the variance), n the
  batch size. N = 0 is ``test-batch``; N -> infinity is ``clean``.

Soundness (science.md, rule 3): batch modes are legitimate for corruption accuracy. Under
attack the attacker controls the batch, so the ``adaptive`` result attacks the whole batch
through its statistics; the other variants (``ATTACK_VARIANTS``) say what the number means
when the attacker controls less (one image alone, one image among fixed clean images) and
what a non-adaptive attack would overstate.

Work is cut into items written once each to deterministic keys under
``<run>/evaluate/{corruptions,attack}/<eval-id>/``: one (BN mode, corruption, severity) or
one (BN mode, attack, batch of test images) per object. A re-run skips items already there
with the same parameters; the eval id is a digest of everything else that changes a number
(weights, test images, CIFAR-10-C version, threat model), so a different evaluation never
mixes with it. The Ray layer (``distributed.evaluate``) runs the same tasks on actors.

CIFAR-10-C is cached in the storage layer under ``<root>/cifar10c/<variant>/`` (``corruptions.Cifar10C``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import socket
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tbn_ray.science import corruptions as C
from tbn_ray.science import data as data_mod
from tbn_ray.science.attacks import apgd_ce, pgd
from tbn_ray.config import AttackConfig, DataConfig, EvaluateConfig, ModelConfig, default, parse_config
from tbn_ray.errors import TbnError, log
from tbn_ray.science.models import build_model
from tbn_ray.store.runs import Run, hash_weights, load_data_for, tensor_bytes
from tbn_ray.store.storage import Storage, map_concurrently
from tbn_ray.science.tbn import CLEAN, BNStats, batch_statistics, bn_key, bn_layers, use_bn_stats
from tbn_ray.science.training import eval_mode

# The defaults live in config.EvaluateConfig.
DEFAULT_BATCH_SIZE: int = default(EvaluateConfig, "batch_size")
DEFAULT_ATTACK_STEPS: int = default(EvaluateConfig, "attack_steps")
DEFAULT_RESTARTS: int = default(EvaluateConfig, "restarts")
ATTACKS: tuple[str, ...] = default(EvaluateConfig, "attacks")
ITEM_FORMAT = "tbn-ray/evaluate-item-v1"
RESULT_FORMAT = "tbn-ray/evaluate-result-v1"
EVALUATE_DIR = "evaluate"
#: The pseudo corruption of the uncorrupted test images (each mode's clean accuracy).
NONE = "none"



# --- BN modes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BNMode:
    """One way of normalising: frozen statistics (``batch=False``) or batch statistics."""

    spec: str  # canonical: clean | sigma:<s> | test-batch | test-batch:<N>
    stats_name: str  # the stored set used (frozen), or mixed in as the prior (batch, N > 0)
    batch: bool = False
    prior: float = 0.0  # Schneider et al.'s pseudo sample size N

    def key(self, batch_size: int) -> str:
        """Folder name; a batch mode's numbers depend on the batch size, so it is in the name."""
        if not self.batch:
            return self.stats_name
        return f"test-batch-b{batch_size}" + (f"-N{self.prior:g}" if self.prior else "")

    def definition(self, batch_size: int) -> str:
        if not self.batch:
            if self.stats_name == CLEAN:
                return "clean: the trained BN running statistics, frozen (eval mode)"
            return f"{self.spec}: TBN statistics calibrated on Gaussian-noised held-out images at {self.stats_name}, frozen"
        if not self.prior:
            return (
                f"test-batch (batch size {batch_size}): each BN layer normalises with the per-channel mean and biased "
                "variance of the current batch (transductive, Schneider et al. 2020 / TENT 'norm')"
            )
        return (
            f"test-batch:{self.prior:g} (batch size {batch_size}): Schneider et al. 2020 prior mixing, statistics = "
            f"N/(N+n) clean + n/(N+n) batch with N={self.prior:g}, n={batch_size}"
        )


_MODE_HELP = "use clean, sigma:<s> (calibrated TBN statistics), test-batch or test-batch:<N> (prior mixing, N >= 0)"


def parse_bn_mode(text: str) -> BNMode:
    """``clean``, ``sigma:0.25``, ``test-batch``, ``test-batch:16``."""
    kind, sep, arg = text.strip().partition(":")
    try:
        if kind == CLEAN and not sep:
            return BNMode(CLEAN, CLEAN)
        if kind == "sigma" and arg:
            sigma = float(arg)
            if sigma > 0 and math.isfinite(sigma):
                return BNMode(f"sigma:{sigma:g}", bn_key(sigma))
        if kind == "test-batch":
            prior = float(arg) if sep else 0.0
            if prior >= 0 and math.isfinite(prior):
                return BNMode(f"test-batch:{prior:g}" if prior else "test-batch", CLEAN, batch=True, prior=prior)
    except ValueError:
        pass
    raise TbnError(f"unknown BN mode {text!r}; {_MODE_HELP}")


def parse_bn_modes(texts: Sequence[str]) -> tuple[BNMode, ...]:
    if not texts:
        raise TbnError(f"no BN mode given (--bn); {_MODE_HELP}")
    return tuple(dict.fromkeys(parse_bn_mode(t) for t in texts))


def _moments(bn: nn.Module, x: torch.Tensor, prior: float, per_sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and variance a batch mode normalises ``x`` with: (C,), or (N, C) per sample.

    Batch statistics as BN computes them in training mode (biased variance), mixed with the
    layer's running statistics (the clean set, installed by ``bn_mode``) when ``prior`` > 0.
    """
    dims = tuple(range(2, x.dim())) if per_sample else (0, *range(2, x.dim()))
    mean, var = x.mean(dims), x.var(dims, unbiased=False)
    if prior:
        w = prior / (prior + (1 if per_sample else x.shape[0]))
        mean = w * bn.running_mean + (1 - w) * mean
        var = w * bn.running_var + (1 - w) * var
    return mean, var


@contextlib.contextmanager
def _custom_batch_norm(model: nn.Module, prior: float, per_sample: bool) -> Iterator[nn.Module]:
    """BN from ``_moments`` (differentiable through them), for what train-mode BN cannot do:
    prior mixing, and every image as its own batch of one in a single vectorised pass."""
    layers = [bn for _, bn in bn_layers(model)]

    def make_forward(bn: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            mean, var = _moments(bn, x, prior, per_sample)
            shape = (*mean.shape, *([1] * (x.dim() - 2))) if per_sample else (1, -1, *([1] * (x.dim() - 2)))
            out = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + bn.eps)
            if bn.affine:
                out = out * bn.weight.view(1, -1, *([1] * (x.dim() - 2))) + bn.bias.view(1, -1, *([1] * (x.dim() - 2)))
            return out

        return forward

    try:
        for bn in layers:
            bn.forward = make_forward(bn)  # an instance attribute shadows the class's forward
        yield model
    finally:
        for bn in layers:
            bn.__dict__.pop("forward", None)


@contextlib.contextmanager
def bn_mode(model: nn.Module, mode: BNMode, stats: BNStats, *, per_sample: bool = False) -> Iterator[nn.Module]:
    """The model in eval mode normalising as ``mode`` says; modes and statistics restored afterwards.

    ``stats``: the set named by ``mode.stats_name``. ``per_sample`` (batch modes only) makes
    every image its own batch of one.
    """
    with eval_mode(model), use_bn_stats(model, stats):
        if not mode.batch:
            yield model
        elif mode.prior or per_sample:
            with _custom_batch_norm(model, mode.prior, per_sample):
                yield model
        else:
            with batch_statistics(model):
                yield model


@torch.no_grad()
def used_bn_stats(model: nn.Module, x: torch.Tensor, mode: BNMode, stats: BNStats) -> BNStats:
    """The statistics a batch mode normalises the batch ``x`` with, per BN layer (as a frozen set:
    installed in eval mode they reproduce the batch mode's outputs on ``x``)."""
    recorded: BNStats = {}
    hooks = []

    def make_hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(bn: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            mean, var = _moments(bn, inputs[0], mode.prior, False)
            recorded[name] = {"running_mean": mean.detach().cpu(), "running_var": var.detach().cpu()}

        return hook

    with bn_mode(model, mode, stats):
        try:
            hooks = [bn.register_forward_pre_hook(make_hook(name)) for name, bn in bn_layers(model)]
            model(x)
        finally:
            for h in hooks:
                h.remove()
    return recorded


def stats_digest(stats: BNStats) -> str:
    h = hashlib.sha256()
    for layer in sorted(stats):
        for buf in ("running_mean", "running_var"):
            h.update(f"{layer}/{buf}".encode() + tensor_bytes(stats[layer][buf]))
    return h.hexdigest()[:16]


# --- corruption accuracy ------------------------------------------------------------------------


@torch.no_grad()
def correct_predictions(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, mode: BNMode, stats: BNStats, *,
    batch_size: int, device: torch.device,
) -> np.ndarray:
    """Per-image correctness (bool) of uint8 NHWC ``images`` in consecutive batches of ``batch_size``
    (in a batch mode these are the test batches; the last one may be smaller). Batches are
    copied: arrays from Ray's object store are read-only."""
    out = np.zeros(len(images), dtype=bool)
    with bn_mode(model, mode, stats):
        for i in range(0, len(images), batch_size):
            xb = data_mod.to_float(np.array(images[i : i + batch_size]), device)
            yb = torch.tensor(labels[i : i + batch_size], dtype=torch.int64, device=device)
            out[i : i + batch_size] = (model(xb).argmax(1) == yb).cpu().numpy()
    return out


# --- adversarial evaluation -----------------------------------------------------------------

#: What each adversarial result of a batch mode means (frozen modes have one: ``standard``).
ATTACK_VARIANTS: dict[str, str] = {
    "standard": "frozen statistics: the attack and the evaluation use the same fixed model (eval mode)",
    "adaptive": (
        "the attacker perturbs every image of a test batch (each within eps) and the attack's gradients "
        "go through the batch statistics; the perturbed batch is classified with its own statistics"
    ),
    "batch-1": (
        "batch size 1: each image is its own test batch, so test-batch BN degenerates to instance "
        "normalisation (every channel normalised by that image's own spatial mean and variance, then "
        "BN's gamma/beta; with test-batch:N, mixed with the clean statistics at weight N/(N+1)); "
        "attacked adaptively through those statistics"
    ),
    "fixed-clean-batch": (
        "the statistics are those the batch mode computes on the CLEAN test batch (the unperturbed "
        "images of the same batch), then frozen; each adversarial image is normalised with them, so "
        "the attacker controls only its own image and not the statistics"
    ),
    "non-adaptive": (
        "NOT a robustness claim, shown for contrast: adversarial examples computed against the frozen "
        "clean statistics, then classified with the batch mode's statistics of the perturbed batch"
    ),
}
#: Variants whose prediction for an image depends on the other perturbed images of its batch.
COUPLED_VARIANTS = frozenset({"adaptive", "non-adaptive"})


def parse_attacks(names: Sequence[str]) -> tuple[str, ...]:
    if not names:
        raise TbnError(f"no attack given (--attack); use {' or '.join(ATTACKS)}")
    for name in names:
        if name not in ATTACKS:
            raise TbnError(f"unknown attack {name!r}; use {', '.join(ATTACKS)}")
    return tuple(dict.fromkeys(names))


def parse_eps(text: str | float) -> float:
    """A budget in [0,1] pixel units; ``8/255`` accepted."""
    try:
        eps = float(Fraction(text.strip())) if isinstance(text, str) else float(text)
    except (ValueError, ZeroDivisionError):
        raise TbnError(f"--eps {text!r} is not a number; use e.g. 0.5 or 8/255") from None
    if not eps > 0 or not math.isfinite(eps):
        raise TbnError(f"--eps must be > 0 (a budget in [0,1] pixel units, e.g. 0.5 or 8/255), got {text}")
    return eps


def run_attack(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str, threat: AttackConfig, *,
    seed: int, coupled: bool,
) -> torch.Tensor:
    """``pgd`` or ``apgd-ce`` on the model as it is (its BN mode decides what is attacked).

    ``coupled``: the model's prediction of one image depends on the batch, so restarts and
    iterates are compared and kept as whole batches, never spliced per image. Random starts
    come from a CPU generator seeded with ``seed``: the same starts on every device and mode.
    """
    generator = torch.Generator().manual_seed(seed)
    if name == "apgd-ce":
        return apgd_ce(model, x, y, threat, generator=generator, per_example=not coupled)
    if not coupled or threat.restarts == 1 or not threat.random_start:
        return pgd(model, x, y, threat, generator=generator)
    best, best_key = x, (-1, -math.inf)
    for _ in range(threat.restarts):
        cand = pgd(model, x, y, threat.model_copy(update={"restarts": 1}), generator=generator)
        with torch.no_grad():
            logits = model(cand).float()
            key = (int((logits.argmax(1) != y).sum()), float(F.cross_entropy(logits, y, reduction="sum")))
        if key > best_key:
            best, best_key = cand, key
    return best


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return (model(x).argmax(1) == y).cpu().numpy()


def attack_variants(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: BNMode, stats: BNStats, clean_stats: BNStats,
    name: str, threat: AttackConfig, *, seed: int,
) -> dict[str, dict[str, np.ndarray]]:
    """Clean and adversarial correctness of one batch ``x`` (float NCHW in [0,1]) per variant.

    Frozen modes: ``standard``. Batch modes: ``adaptive``, ``batch-1``, ``fixed-clean-batch``,
    ``non-adaptive`` (``ATTACK_VARIANTS``). Every variant draws the same random starts (``seed``).
    """
    def attacked(per_sample: bool = False, frozen: BNStats | None = None, coupled: bool = False) -> dict[str, np.ndarray]:
        m, s = (BNMode("fixed", "fixed"), frozen) if frozen is not None else (mode, stats)
        with bn_mode(model, m, s, per_sample=per_sample):
            clean = _correct(model, x, y)
            x_adv = run_attack(model, x, y, name, threat, seed=seed, coupled=coupled)
            return {"clean": clean, "adversarial": _correct(model, x_adv, y)}

    if not mode.batch:
        return {"standard": attacked()}
    out = {
        "adaptive": attacked(coupled=True),
        "batch-1": attacked(per_sample=True),
        "fixed-clean-batch": attacked(frozen=used_bn_stats(model, x, mode, stats)),
    }
    with bn_mode(model, BNMode(CLEAN, CLEAN), clean_stats):
        x_transfer = run_attack(model, x, y, name, threat, seed=seed, coupled=False)
    with bn_mode(model, mode, stats):
        out["non-adaptive"] = {"clean": out["adaptive"]["clean"], "adversarial": _correct(model, x_transfer, y)}
    return out


# --- plans, tasks and items ------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A unit of work: one corruption x severity, or one attack x batch, for the modes still pending."""

    part: tuple[str, int]  # (corruption, severity) or (attack, batch)
    modes: tuple[str, ...]  # BN mode specs

    @property
    def label(self) -> str:
        what = f"{self.part[0]} batch {self.part[1]}" if self.part[0] in ATTACKS else f"{self.part[0]} severity {self.part[1]}"
        return f"{what} [{', '.join(self.modes)}]"


@dataclass(frozen=True)
class TaskResult:
    task: Task
    items: int
    images: int
    seconds: float
    worker: dict[str, str]


@dataclass(frozen=True, eq=False)
class EvalPlan:
    """What both evaluations share: fixed and validated before any work (``plan_corruptions``,
    ``plan_attack``); picklable and self-contained (weights, statistics, images) for Ray actors."""

    run_uri: str
    model_config: ModelConfig
    model_state: dict[str, torch.Tensor]
    epoch: int
    modes: tuple[BNMode, ...]
    stats: dict[str, BNStats]  # by stats name; always holds "clean"
    test: data_mod.Split  # the selected clean test images
    data_source: str
    data_description: str
    batch_size: int
    root: Storage  # <run>/evaluate/<kind>

    kind = ""

    def _id_params(self) -> dict[str, Any]:
        raise NotImplementedError

    @cached_property
    def eval_id(self) -> str:
        """``<run name>-<digest>`` of the weights, the test images and ``_id_params``."""
        h = hashlib.sha256()
        hash_weights(h, self.model_state)
        for array in (self.test.index, self.test.labels, self.test.images):
            h.update(np.ascontiguousarray(array).tobytes())
        h.update(json.dumps({"run": self.run_uri, "epoch": self.epoch, "data": self.data_source, **self._id_params()}, sort_keys=True).encode())
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.run_uri.rstrip("/").rpartition("/")[2]).strip(".-") or "run"
        return f"{name}-{h.hexdigest()[:16]}"

    @property
    def out(self) -> Storage:
        return self.root.child(self.eval_id)

    def mode(self, spec: str) -> BNMode:
        return next(m for m in self.modes if m.spec == spec)

    def build_model(self, device: torch.device) -> nn.Module:
        model = build_model(self.model_config)
        model.load_state_dict(self.model_state)
        return model.to(device).eval()

    def item_params(self, mode: BNMode, part: tuple[str, int]) -> dict[str, Any]:
        return {
            "eval_id": self.eval_id,
            "mode": mode.spec,
            "stats": stats_digest(self.stats[mode.stats_name]) if (not mode.batch or mode.prior) else None,
            "batch_size": self.batch_size if mode.batch else None,
        }

    def item_key(self, mode: BNMode, part: tuple[str, int]) -> str:
        raise NotImplementedError

    def parts(self) -> list[tuple[str, int]]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def pending(self) -> list[Task]:
        """Tasks for every (part, mode) item not yet stored with these parameters."""
        present = set(self.out.list())
        jobs = [(part, mode) for part in self.parts() for mode in self.modes]

        def done(job: tuple[tuple[str, int], BNMode]) -> bool:
            part, mode = job
            key = self.item_key(mode, part)
            if key not in present:
                return False
            item = _read_item(self.out, key)
            return item is not None and item["params"] == self.item_params(mode, part)

        finished = map_concurrently(done, jobs)
        todo: dict[tuple[str, int], list[str]] = {}
        for (part, mode), ok in zip(jobs, finished):
            if not ok:
                todo.setdefault(part, []).append(mode.spec)
        return [Task(part, tuple(specs)) for part, specs in todo.items()]

    @property
    def total_items(self) -> int:
        return len(self.parts()) * len(self.modes)

    def write_item(self, mode: BNMode, part: tuple[str, int], body: dict[str, Any]) -> None:
        """One item as one whole object: present complete, or absent."""
        self.out.write_json(self.item_key(mode, part), {"format": ITEM_FORMAT, "params": self.item_params(mode, part), **body})


def _read_item(out: Storage, key: str) -> dict[str, Any] | None:
    try:
        item = json.loads(out.read_bytes(key))
    except (ValueError, UnicodeDecodeError):
        return None
    return item if isinstance(item, dict) and item.get("format") == ITEM_FORMAT else None


@dataclass(frozen=True, eq=False)
class CorruptionPlan(EvalPlan):
    cifar10c: C.Cifar10C | None = None
    corruptions: tuple[str, ...] = C.CORRUPTIONS
    severities: tuple[int, ...] = C.SEVERITIES

    kind = "corruptions"

    def _id_params(self) -> dict[str, Any]:
        assert self.cifar10c is not None
        return {"kind": self.kind, "cifar10c": self.cifar10c.variant}

    def parts(self) -> list[tuple[str, int]]:
        return [(NONE, 0)] + [(c, s) for c in self.corruptions for s in self.severities]

    def describe(self) -> str:
        assert self.cifar10c is not None
        return f"{self.cifar10c.description}: {len(self.corruptions)} corruption(s) x {len(self.severities)} severities + clean"

    def item_key(self, mode: BNMode, part: tuple[str, int]) -> str:
        return f"{mode.key(self.batch_size)}/{part[0]}/severity-{part[1]}.json"

    def item_params(self, mode: BNMode, part: tuple[str, int]) -> dict[str, Any]:
        return {**super().item_params(mode, part), "corruption": part[0], "severity": part[1]}


@dataclass(frozen=True, eq=False)
class AttackPlan(EvalPlan):
    attacks: tuple[str, ...] = ATTACKS
    threat: AttackConfig = field(default_factory=AttackConfig)
    seed: int = 0

    kind = "attack"

    def _id_params(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.threat_params(), "batch_size": self.batch_size}

    def threat_params(self) -> dict[str, Any]:
        t = self.threat
        return {"norm": t.norm, "eps": t.eps, "steps": t.steps, "restarts": t.restarts, "pgd_step_size": t.alpha, "seed": self.seed}

    @property
    def batches(self) -> int:
        return math.ceil(len(self.test) / self.batch_size)

    def batch_rows(self, k: int) -> slice:
        return slice(k * self.batch_size, min((k + 1) * self.batch_size, len(self.test)))

    def parts(self) -> list[tuple[str, int]]:
        return [(a, k) for a in self.attacks for k in range(self.batches)]

    def describe(self) -> str:
        return f"{', '.join(self.attacks)} ({self.threat.norm}, eps={self.threat.eps:g}, {self.threat.steps} steps) on {self.batches} batch(es)"

    def item_key(self, mode: BNMode, part: tuple[str, int]) -> str:
        return f"{mode.key(self.batch_size)}/{part[0]}/batch-{part[1]:05d}-of-{self.batches:05d}.json"

    def item_params(self, mode: BNMode, part: tuple[str, int]) -> dict[str, Any]:
        # the batch size fixes which images an item holds, in every mode
        return {**super().item_params(mode, part), "attack": part[0], "batch": part[1], "batches": self.batches, "batch_size": self.batch_size}

    def item_seed(self, part: tuple[str, int]) -> int:
        """Per (run seed, attack, batch): the same random starts for every mode and variant."""
        key = int.from_bytes(part[0].encode(), "little")
        return int(np.random.SeedSequence([self.seed, key, part[1]]).generate_state(1, np.uint32)[0])


class TaskRunner:
    """Runs whole tasks of a plan with the model built once: one per process or Ray actor.

    Each (mode, part) item is written once, as one object, to its deterministic key, so a task
    run twice (an actor restarted mid-task, a re-run) writes the same item again.
    """

    def __init__(self, plan: EvalPlan, device: torch.device, worker: dict[str, str]) -> None:
        self.plan = plan
        self.device = device
        self.worker = worker
        self.model = plan.build_model(device)

    def run(self, task: Task) -> TaskResult:
        t0 = time.perf_counter()
        if isinstance(self.plan, CorruptionPlan):
            images = self._corruption(task)
        else:
            assert isinstance(self.plan, AttackPlan)
            images = self._attack(task)
        return TaskResult(task, len(task.modes), images, time.perf_counter() - t0, dict(self.worker))

    def _corruption(self, task: Task) -> int:
        plan = self.plan
        assert isinstance(plan, CorruptionPlan) and plan.cifar10c is not None
        corruption, severity = task.part
        images = plan.test.images if corruption == NONE else plan.cifar10c.load(corruption, severity)
        for spec in task.modes:
            mode = plan.mode(spec)
            t0 = time.perf_counter()
            correct = correct_predictions(
                self.model, images, plan.test.labels, mode, plan.stats[mode.stats_name], batch_size=plan.batch_size, device=self.device
            )
            plan.write_item(mode, task.part, {
                "correct": int(correct.sum()), "images": len(correct), "seconds": time.perf_counter() - t0, "worker": self.worker,
            })  # fmt: skip
        return len(images)

    def _attack(self, task: Task) -> int:
        plan = self.plan
        assert isinstance(plan, AttackPlan)
        rows = plan.batch_rows(task.part[1])
        x = data_mod.to_float(np.array(plan.test.images[rows]), self.device)  # copies: the object store's arrays are read-only
        y = torch.tensor(plan.test.labels[rows], dtype=torch.int64, device=self.device)
        for spec in task.modes:
            mode = plan.mode(spec)
            t0 = time.perf_counter()
            variants = attack_variants(
                self.model, x, y, mode, plan.stats[mode.stats_name], plan.stats[CLEAN], task.part[0], plan.threat, seed=plan.item_seed(task.part)
            )
            plan.write_item(mode, task.part, {
                "indices": plan.test.index[rows].tolist(),
                "variants": {v: {k: r.astype(int).tolist() for k, r in res.items()} for v, res in variants.items()},
                "seconds": time.perf_counter() - t0,
                "worker": self.worker,
            })  # fmt: skip
        return len(y)


# --- planning ---------------------------------------------------------------------------------


def select_test(d: data_mod.Cifar10, start: int | None, stop: int | None) -> data_mod.Split:
    """The test images with official index in [start, stop), among those this source has."""
    index = d.test.index
    chosen = np.ones(len(index), dtype=bool)
    if start is not None:
        chosen &= index >= start
    if stop is not None:
        chosen &= index < stop
    if not chosen.any():
        raise TbnError(f"no test images with index in [{start or 0}, {stop if stop is not None else 'end'}) in {d.description}")
    return d.test.subset(np.flatnonzero(chosen))


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TbnError(f"--batch-size must be a positive integer, got {batch_size!r}")
    return batch_size


def _base_plan(
    run: Run, modes: Sequence[str], *, batch_size: int, data_cfg: DataConfig | None, start: int | None, stop: int | None, kind: str,
) -> dict[str, Any]:
    """Everything both plans check first: the modes and their statistics, the checkpoint, the images."""

    parsed = parse_bn_modes(modes)
    _check_batch_size(batch_size)
    model, ckpt = run.load_model("cpu")
    stats = {name: run.bn_stats(name, model) for name in dict.fromkeys([CLEAN, *(m.stats_name for m in parsed)])}
    for s in stats.values():
        with use_bn_stats(model, s):  # a set that does not fit the model fails here
            pass
    d = load_data_for(ckpt, data_cfg)
    test = select_test(d, start, stop)
    return {
        "run_uri": run.uri,
        "model_config": ckpt.config.model,
        "model_state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "epoch": ckpt.epoch,
        "modes": parsed,
        "stats": stats,
        "test": test,
        "data_source": d.source,
        "data_description": d.description,
        "batch_size": batch_size,
        "root": run.storage.child(EVALUATE_DIR, kind),
    }


def default_cifar10c_root(run: Run) -> Storage:
    """Where ``tbn-ray data cifar10c`` caches by default for this run: the run's parent (the
    ``--storage`` root it was trained under)."""
    parent = run.uri.rstrip("/").rpartition("/")[0]
    return Storage.open(parent or ".")


def plan_corruptions(
    run: Run,
    modes: Sequence[str],
    *,
    cache_root: Storage | None = None,
    corruptions: str = "all",
    severities: str = "1-5",
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    released: str | Path | None = None,
    data_cfg: DataConfig | None = None,
    start: int | None = None,
    stop: int | None = None,
    progress: bool = True,
) -> CorruptionPlan:
    """Check everything a corruption evaluation needs before any work (modes, statistics,
    corruption names, severities, storage); with ``released``, import the needed arrays.
    ``corruptions``/``severities``: as ``tbn-ray data cifar10c`` takes them ("all", "1-5")."""
    names, levels = C.parse_corruptions(corruptions), C.parse_severities(severities)
    base = _base_plan(run, modes, batch_size=batch_size, data_cfg=data_cfg, start=start, stop=stop, kind=CorruptionPlan.kind)
    cache_root = cache_root or default_cifar10c_root(run)
    cache_root.check()
    run.storage.check()
    if released is not None:
        c10c = C.released_cifar10c(cache_root, released, base["test"].index, names, levels, progress=progress)
        if not np.array_equal(c10c.labels, base["test"].labels):
            raise TbnError(f"the labels in {released}/labels.npy do not match the CIFAR-10 test labels; is it CIFAR-10-C?")
    else:
        c10c = C.regenerated_cifar10c(cache_root, base["test"], seed=seed, data_description=base["data_description"])
    c10c.write_metadata()
    return CorruptionPlan(**base, cifar10c=c10c, corruptions=names, severities=levels)


def plan_attack(
    run: Run,
    modes: Sequence[str],
    *,
    attacks: Sequence[str] = ATTACKS,
    norm: str = "l2",
    eps: str | float = 0.5,
    steps: int = DEFAULT_ATTACK_STEPS,
    restarts: int = DEFAULT_RESTARTS,
    step_size: float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    data_cfg: DataConfig | None = None,
    start: int | None = None,
    stop: int | None = None,
) -> AttackPlan:
    """Check the threat model, modes, statistics, images and storage before any work."""
    attacks = parse_attacks(attacks)
    eps_value = parse_eps(eps)
    if norm not in ("l2", "linf"):
        raise TbnError(f"--norm must be l2 or linf, got {norm!r}")
    threat = parse_config(
        AttackConfig, {"norm": norm, "eps": eps_value, "steps": steps, "restarts": restarts, "step_size": step_size}, "attack options"
    )
    base = _base_plan(run, modes, batch_size=batch_size, data_cfg=data_cfg, start=start, stop=stop, kind=AttackPlan.kind)
    run.storage.check()
    return AttackPlan(**base, attacks=attacks, threat=threat, seed=seed)


# --- running in this process ----------------------------------------------------------------------


@dataclass(frozen=True)
class EvalResult:
    eval_id: str
    location: str  # <run>/evaluate/<kind>/<eval-id>
    result: dict[str, Any]  # what result.json holds
    report: str  # <run>/evaluate/report.md
    items_computed: int
    items_skipped: int


class Progress:
    """The driver's progress bar over items (tqdm)."""

    def __init__(self, plan: EvalPlan, todo: Sequence[Task], enabled: bool) -> None:
        from tqdm.auto import tqdm

        left = sum(len(t.modes) for t in todo)
        self.bar = tqdm(total=plan.total_items, initial=plan.total_items - left, unit="item", desc=f"evaluate {plan.kind}", disable=not enabled, dynamic_ncols=True)

    def update(self, result: TaskResult) -> None:
        self.bar.set_postfix_str(result.task.label[:60], refresh=False)
        self.bar.update(result.items)

    def close(self) -> None:
        self.bar.close()


def describe_plan(plan: EvalPlan, todo: Sequence[Task]) -> str:
    left = sum(len(t.modes) for t in todo)
    return (
        f"evaluation {plan.eval_id}: {len(plan.test)} test images, {plan.describe()}, BN modes {', '.join(m.spec for m in plan.modes)}; "
        f"{plan.total_items - left} of {plan.total_items} item(s) already done -> {plan.out.uri}"
    )


def run_in_process(
    plan: EvalPlan, device: torch.device, *, progress: bool = True, on_task: Callable[[TaskResult], None] | None = None
) -> EvalResult:
    """Evaluate the pending tasks of ``plan`` in this process, then aggregate and report (no Ray)."""
    todo = plan.pending()
    log(describe_plan(plan, todo) + f", device {device}")
    if todo:
        runner = TaskRunner(plan, device, {"actor": "in-process", "node": socket.gethostname()})
        bar = Progress(plan, todo, progress)
        try:
            for task in todo:
                result = runner.run(task)
                bar.update(result)
                if on_task is not None:
                    on_task(result)
        finally:
            bar.close()
    return finish(plan, computed=sum(len(t.modes) for t in todo))


def finish(plan: EvalPlan, *, computed: int) -> EvalResult:
    """Aggregate the items into result.json, rebuild the run's evaluation report."""
    result = aggregate(plan)
    files = write_evaluation_report(Storage.open(plan.run_uri))
    return EvalResult(plan.eval_id, plan.out.uri, result, files["report.md"], computed, plan.total_items - computed)


# --- aggregation ------------------------------------------------------------------------------


def _read_items(out: Storage, keys: list[str]) -> list[dict[str, Any]]:
    items = map_concurrently(lambda k: _read_item(out, k), keys)
    bad = [k for k, item in zip(keys, items) if item is None]
    if bad:
        raise TbnError(f"{out.object_uri(bad[0])} is not a readable evaluation item; delete it and run the same command again")
    return items  # type: ignore[return-value]


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _corruption_mode(items: list[dict[str, Any]], plan: CorruptionPlan, mode: BNMode) -> dict[str, Any]:
    grid: dict[str, dict[str, float]] = {}
    images = {}
    clean_acc = None
    for item in items:
        p = item["params"]
        acc = item["correct"] / item["images"]
        images[(p["corruption"], p["severity"])] = item["images"]
        if p["corruption"] == NONE:
            clean_acc = acc
        else:
            grid.setdefault(p["corruption"], {})[str(p["severity"])] = acc
    corruptions = [c for c in C.CORRUPTIONS if c in grid]
    severities = sorted({int(s) for row in grid.values() for s in row})
    full = all(len(grid[c]) == len(severities) for c in corruptions)
    cells = [grid[c][str(s)] for c in corruptions for s in severities if str(s) in grid[c]]
    return {
        "spec": mode.spec,
        "definition": mode.definition(plan.batch_size),
        "batch_size": plan.batch_size if mode.batch else None,
        "clean_accuracy": clean_acc,
        "accuracy": grid,
        "mean": _mean(cells),
        "grid": f"{len(corruptions)} x {len(severities)}" + ("" if full else " (incomplete)"),
        "standard_grid": corruptions == list(C.CORRUPTIONS) and severities == list(C.SEVERITIES) and full,
        "severity_mean": {str(s): _mean([grid[c][str(s)] for c in corruptions if str(s) in grid[c]]) for s in severities},
        "corruption_mean": {c: _mean(list(grid[c].values())) for c in corruptions},
    }


def _attack_mode(items: list[dict[str, Any]], mode: BNMode) -> dict[str, Any]:
    """Accuracies per variant and attack; the worst case over attacks per image (independent
    variants) or per batch (coupled variants, whose batches cannot be spliced)."""
    by_attack: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        by_attack.setdefault(item["params"]["attack"], []).append(item)
    out: dict[str, Any] = {}
    for variant in items[0]["variants"]:
        row: dict[str, Any] = {"definition": ATTACK_VARIANTS[variant]}
        per_attack = {}
        for attack, its in sorted(by_attack.items()):
            its = sorted(its, key=lambda i: i["params"]["batch"])
            clean = np.concatenate([i["variants"][variant]["clean"] for i in its]).astype(bool)
            adv = [np.asarray(i["variants"][variant]["adversarial"], dtype=bool) for i in its]
            per_attack[attack] = adv
            row["clean_accuracy"] = float(clean.mean())
            row[attack] = float(np.concatenate(adv).mean())
            row["images"] = int(len(clean))
        if len(per_attack) > 1:
            attacks = list(per_attack)
            if variant in COUPLED_VARIANTS:
                worst = sum(min(int(per_attack[a][b].sum()) for a in attacks) for b in range(len(per_attack[attacks[0]])))
            else:
                worst = int(np.logical_and.reduce([np.concatenate(per_attack[a]) for a in attacks]).sum())
            row["worst_case"] = worst / row["images"]
        out[variant] = row
    return {"spec": mode.spec, "definition": mode.definition(items[0]["params"]["batch_size"]), "variants": out}


def aggregate(plan: EvalPlan) -> dict[str, Any]:
    """result.json of this evaluation from its items: every planned item must be there."""
    keys = set(plan.out.list())
    missing = [plan.item_key(m, p) for p in plan.parts() for m in plan.modes if plan.item_key(m, p) not in keys]
    if missing:
        raise TbnError(f"{plan.out.uri}: {len(missing)} item(s) missing (e.g. {missing[0]}); run the same command again")
    result: dict[str, Any] = {
        "format": RESULT_FORMAT,
        "kind": plan.kind,
        "eval_id": plan.eval_id,
        "run": plan.run_uri,
        "epoch": plan.epoch,
        "model": plan.model_config.arch,
        "data": plan.data_description,
        "data_source": plan.data_source,
        "test_images": len(plan.test),
        "test_indices": C.index_text(plan.test.index),
        "batch_size": plan.batch_size,
    }
    modes: dict[str, Any] = {}
    if isinstance(plan, CorruptionPlan):
        assert plan.cifar10c is not None
        result["cifar10c"] = plan.cifar10c.manifest()
        result["source"] = plan.cifar10c.description
        for mode in plan.modes:
            items = _read_items(plan.out, [plan.item_key(mode, p) for p in plan.parts()])
            modes[mode.key(plan.batch_size)] = _corruption_mode(items, plan, mode)
    else:
        assert isinstance(plan, AttackPlan)
        result["attack"] = {**plan.threat_params(), "attacks": list(plan.attacks), "apgd": "APGD-CE, Croce & Hein 2020: momentum 0.75, rho 0.75, initial step 2 eps, checkpoints p_1=0.22"}
        result["source"] = plan.data_description
        for mode in plan.modes:
            items = _read_items(plan.out, [plan.item_key(mode, p) for p in plan.parts()])
            modes[mode.key(plan.batch_size)] = _attack_mode(items, mode)
    # results of earlier commands with the same eval id (other modes) are kept
    previous = plan.out.read_json("result.json") if "result.json" in keys else {}
    result["modes"] = {**previous.get("modes", {}), **modes}
    plan.out.write_json("result.json", result)
    return result


# --- the report -----------------------------------------------------------------------------------


def load_results(run_storage: Storage) -> list[dict[str, Any]]:
    """Every result.json under ``<run>/evaluate/``, corruption results first, oldest layout order."""
    keys = [k for k in run_storage.list(f"{EVALUATE_DIR}/") if k.endswith("/result.json")]
    results = [run_storage.read_json(k) for k in keys]
    results = [r for r in results if isinstance(r, dict) and r.get("format") == RESULT_FORMAT]
    return sorted(results, key=lambda r: (r["kind"] != "corruptions", r["eval_id"]))


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _corruption_markdown(r: dict[str, Any]) -> list[str]:
    modes = list(r["modes"].values())
    sev = sorted({s for m in modes for s in m["severity_mean"]}, key=int)
    lines = [
        f"### Corruption robustness: {r['source']}",
        "",
        f"Run {r['run']} (epoch {r['epoch']}, {r['model']}), {r['test_images']} test images ({r['test_indices']}); eval id `{r['eval_id']}`.",
        "",
        "| BN mode | batch size | clean | mean | grid | " + " | ".join(f"severity {s}" for s in sev) + " |",
        "|" + "---|" * (5 + len(sev)),
    ]
    for m in modes:
        cells = [_pct(m["severity_mean"].get(s)) for s in sev]
        lines.append(f"| {m['spec']} | {m['batch_size'] or '-'} | {_pct(m['clean_accuracy'])} | **{_pct(m['mean'])}** | {m['grid']} | " + " | ".join(cells) + " |")
    corr = [c for c in C.CORRUPTIONS if any(c in m["corruption_mean"] for m in modes)]
    lines += ["", "Accuracy (%) per corruption, mean over the severities:", "", "| corruption | " + " | ".join(m["spec"] for m in modes) + " |", "|" + "---|" * (1 + len(modes))]
    lines += [f"| {c} | " + " | ".join(_pct(m["corruption_mean"].get(c)) for m in modes) + " |" for c in corr]
    lines += ["", *(f"- {m['definition']}" for m in modes), ""]
    return lines


def _attack_markdown(r: dict[str, Any]) -> list[str]:
    a = r["attack"]
    attacks = a["attacks"]
    lines = [
        f"### Adversarial robustness: {a['norm']}, eps={a['eps']:g}" + (f" ({255 * a['eps']:.3g}/255)" if a["norm"] == "linf" else "") + f" ({r['source']})",
        "",
        f"Run {r['run']} (epoch {r['epoch']}, {r['model']}), {r['test_images']} test images ({r['test_indices']}), "
        f"{a['steps']} steps, {a['restarts']} restart(s), PGD step {a['pgd_step_size']:g}, seed {a['seed']}, batch size {r['batch_size']}; "
        f"eval id `{r['eval_id']}`.",
        "",
        "| BN mode | variant | clean | " + " | ".join(attacks) + (" | worst case |" if len(attacks) > 1 else " |"),
        "|" + "---|" * (3 + len(attacks) + (len(attacks) > 1)),
    ]
    used = set()
    for m in r["modes"].values():
        for variant, row in m["variants"].items():
            used.add(variant)
            cells = [_pct(row.get(x)) for x in attacks] + ([_pct(row.get("worst_case"))] if len(attacks) > 1 else [])
            label = m["spec"] + (" (reference)" if m["spec"] == CLEAN else "")
            lines.append(f"| {label} | {variant} | {_pct(row['clean_accuracy'])} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Accuracy (%) on the perturbed images. The clean-statistics row is the reference the paper says TBN "
        "maintains. Worst case: per image the strongest of the attacks (per batch for adaptive / non-adaptive, "
        "whose batches cannot be spliced).",
        "",
        *(f"- {m['definition']}" for m in r["modes"].values()),
        *(f"- variant {v}: {ATTACK_VARIANTS[v]}" for v in ATTACK_VARIANTS if v in used),
        "",
    ]
    return lines


def evaluation_section(storage: Storage, *, image: str | None = "evaluate/corruption_accuracy.png") -> str | None:
    """Markdown of every evaluation of a run (``storage``: the run's location), for ``tbn-ray
    report`` next to the certification results; None when the run has no evaluation.

    ``image``: the link to the corruption plot as seen from where the markdown is written
    (default: from the run directory), or None for no link."""
    results = load_results(storage)
    if not results:
        return None
    lines = ["## Corruption and adversarial robustness (tbn-ray evaluate)", ""]
    for r in results:
        lines += _corruption_markdown(r) if r["kind"] == "corruptions" else _attack_markdown(r)
    if image and any(r["kind"] == "corruptions" for r in results):
        lines += [f"![corruption accuracy per BN mode]({image})", ""]
    return "\n".join(lines)


def _plot(results: list[dict[str, Any]]):  # type: ignore[no-untyped-def]
    from matplotlib.figure import Figure

    rs = [r for r in results if r["kind"] == "corruptions"]
    fig = Figure(figsize=(11, 3.8 * len(rs)), dpi=110)
    for row, r in enumerate(rs):
        modes = list(r["modes"].values())
        ax_bar, ax_sev = fig.add_subplot(len(rs), 2, 2 * row + 1), fig.add_subplot(len(rs), 2, 2 * row + 2)
        means = [100 * (m["mean"] or 0) for m in modes]
        bars = ax_bar.bar(range(len(modes)), means, color=[f"C{i}" for i in range(len(modes))])
        ax_bar.bar_label(bars, fmt="%.1f", fontsize=7)
        ax_bar.set_xticks(range(len(modes)), [m["spec"] for m in modes], fontsize=7, rotation=15)
        ax_bar.set(ylabel=f"mean accuracy (%) over {modes[0]['grid']}", ylim=(0, 100), title="\n".join(textwrap.wrap(r["source"], 70)))
        ax_bar.title.set_fontsize(7)
        for i, m in enumerate(modes):
            sev = sorted(m["severity_mean"], key=int)
            xs = [0, *map(int, sev)]
            ys = [100 * (m["clean_accuracy"] or 0), *(100 * m["severity_mean"][s] for s in sev)]
            ax_sev.plot(xs, ys, marker="o", color=f"C{i}", label=m["spec"] + (f" (batch {m['batch_size']})" if m["batch_size"] else ""))
        ax_sev.set(xlabel="severity (0: clean test images)", ylabel="accuracy (%)", ylim=(0, 100), title=f"{r['test_images']} test images, {r['model']}")
        ax_sev.title.set_fontsize(7)
        ax_sev.grid(alpha=0.3)
        ax_sev.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_evaluation_report(run_storage: Storage) -> dict[str, str]:
    """``<run>/evaluate/report.md``, ``corruption_accuracy.png`` and ``evaluation.json`` (every number,
    the data sources, BN mode and variant definitions, attack parameters), from the result.json files."""
    results = load_results(run_storage)
    out = run_storage.child(EVALUATE_DIR)
    section = evaluation_section(run_storage, image="corruption_accuracy.png") or ""
    files = {}
    if any(r["kind"] == "corruptions" for r in results):
        with out.writer("corruption_accuracy.png") as f:
            _plot(results).savefig(f, format="png")
        files["corruption_accuracy.png"] = out.object_uri("corruption_accuracy.png")
    files["report.md"] = out.write_text("report.md", section + "\n")
    files["evaluation.json"] = out.write_text(
        "evaluation.json", json.dumps({"run": run_storage.uri, "variants": ATTACK_VARIANTS, "results": results}, indent=2, sort_keys=True) + "\n"
    )
    return files
