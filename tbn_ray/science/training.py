"""Training (PGD adversarial, or the noise objectives of ``objectives``) and held-out evaluation.

One training loop, ``fit``, for both ways of running it: alone in a process (the in-process
pipeline), or as one worker of a data-parallel group (Ray Train with DDP). A distributed
driver passes its framework's calls in through ``DataParallel`` (wrapping the model, preparing
the loader, collectives over the process group) and checkpoints and reports through
``on_epoch``, so nothing here knows Ray; ``train_epoch`` and ``evaluate`` are the steps.

BatchNorm during training (documented choice)
    PGD examples are generated with the model in TRAINING mode, as in Madry et al. and
    Rice et al.: every forward pass normalises with its batch's statistics, so the attack
    ascends the very loss the SGD step then descends. Unlike their code, the running
    statistics are saved before the attack and restored after it, so the intermediate PGD
    iterates (and the random start) never enter them: the running mean/variance are an
    exponential average over the adversarial examples actually trained on, one update per
    SGD step. These are the "clean" statistics TBN later replaces per noise level.
    The attack runs on the unwrapped module (``model.module`` of a DDP wrapper): its
    forward passes need no buffer broadcast or gradient-reducer bookkeeping, the
    parameters being identical on all workers.

Reproducibility: ``fit`` on CPU is bitwise reproducible from ``cfg.seed`` (model
initialisation, data order, augmentation and PGD random starts are all drawn from
generators seeded from (seed, epoch)), and resuming at an epoch boundary from a
checkpoint of model, optimizer and scheduler gives the same weights as not stopping.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm.auto import tqdm

from tbn_ray.config import AttackConfig, OptimConfig, TrainConfig
from tbn_ray.errors import TbnError
from tbn_ray.science import data as data_mod
from tbn_ray.science.attacks import pgd
from tbn_ray.science.models import build_model
from tbn_ray.science.objectives import gaussian_noise, step_loss

EpochCallback = Callable[
    [int, dict[str, Any], nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler], None
]

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A well-mixed 63-bit seed per (run seed, epoch, purpose), so a resumed epoch draws what it would have."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _check_batch(images: int, batch_size: int) -> None:
    if images < batch_size:
        raise TbnError(f"batch size {batch_size} exceeds the {images} training images; lower optim.batch_size")


def make_loader(
    x_uint8_nchw: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = True,
) -> DataLoader:
    """Batches of uint8 images (a quarter of float32's bytes), converted on the training device."""
    if drop_last:
        _check_batch(len(x_uint8_nchw), batch_size)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        TensorDataset(x_uint8_nchw, y),
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        generator=generator,
        num_workers=0,
    )


def make_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)


def lr_factor(step: int, optim: OptimConfig, steps_per_epoch: int) -> float:
    """Multiplier of ``optim.lr`` at iteration ``step``: linear warmup, then the schedule.

    Cosine decays from 1 at the end of warmup to 0 at the last iteration; step multiplies by
    ``gamma`` at each milestone (a fraction of all iterations).
    """
    total = optim.epochs * steps_per_epoch
    warmup = min(round(optim.warmup_epochs * steps_per_epoch), total)
    if step < warmup:
        return (step + 1) / warmup
    if optim.schedule == "cosine":
        t = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    if optim.schedule == "step":
        return optim.gamma ** sum(step >= m * total for m in optim.milestones)
    return 1.0


def make_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per iteration (not per epoch), so warmup and decay are smooth at any epoch count.

    To resume, build it on the fresh optimizer, then load both state dicts.
    """
    if steps_per_epoch < 1:
        raise TbnError("no full batch per epoch: lower optim.batch_size or use more training images")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, optim, steps_per_epoch))


def make_grad_scaler(optim: OptimConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 autocast needs loss scaling; bf16 and fp32 do not. Keep one scaler for the whole run."""
    if optim.amp == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision on CUDA only; on CPU the setting is ignored (full precision)."""
    if amp == "off" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=_AMP_DTYPES[amp])


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a (Distributed)DataParallel wrapper, else the model itself."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Forward passes inside leave every BN layer's running statistics exactly as they were."""
    saved = [
        (buf, buf.clone())
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buf is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """model.eval() inside; afterwards every submodule gets back its own previous mode."""
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in saved:
            m.training = training


def _optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
) -> None:
    """Backward, step (through the fp16 GradScaler when there is one), then the per-iteration schedule."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    scheduler.step()


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainConfig,
    device: torch.device,
    *,
    scaler: torch.amp.GradScaler | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """One pass of training with ``cfg.objective`` over ``loader`` (uint8 NCHW batches + labels).

    Leaves the model in training mode. The scheduler steps once per iteration. Metrics are
    this process's own (a distributed driver aggregates them): loss and accuracy on the
    examples trained on (adversarial or noisy), images, seconds and images per second.
    """
    device = torch.device(device)
    if cfg.optim.amp == "fp16" and device.type == "cuda" and scaler is None:
        raise ValueError("fp16 training needs a GradScaler (make_grad_scaler) kept across epochs")
    target = unwrap(model)
    model.train()
    # The scheduler decides the learning rate. Building a LambdaLR resets the optimizer's lr to
    # its step-0 value, so a resume that loads the optimizer before building the scheduler
    # would otherwise start the epoch at the wrong rate.
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    images = 0
    t0 = time.perf_counter()
    bar = tqdm(loader, desc="train", unit="batch", disable=not progress, leave=False)
    for step, (xb, yb) in enumerate(bar):
        x = data_mod.to_float(xb, device)
        y = yb.to(device, non_blocking=True)
        if cfg.augment:
            x = data_mod.augment(x, generator)
        if cfg.optim.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(cfg.optim.amp, device):
            loss, logits = step_loss(model, target, x, y, cfg, generator)
        _optimizer_step(loss, optimizer, scheduler, scaler)
        loss_sum += loss.detach().double() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        images += len(y)
        if progress and step % 10 == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / images:.3f}", acc=f"{correct.item() / images:.3f}")
    bar.close()
    seconds = time.perf_counter() - t0
    return {
        "train_loss": loss_sum.item() / max(images, 1),
        "train_acc": correct.item() / max(images, 1),
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds if seconds > 0 else 0.0,
    }


def evaluate(
    model: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    attack: AttackConfig | None,
    device: torch.device,
    *,
    batch_size: int = 500,
    seed: int = 0,
    amp: str = "off",
    noise_sigma: float | None = None,
) -> dict[str, Any]:
    """Clean and PGD accuracy in eval mode (the stored BN statistics), then the previous modes back;
    with ``noise_sigma``, also the accuracy on one noisy copy of each image.

    ``x``: uint8 images (NHWC as in a Split, or NCHW) or float NCHW in [0,1]. The PGD
    random starts and the noise come from a generator seeded with ``seed``, so a re-evaluation agrees.
    """
    device = torch.device(device)
    labels = torch.as_tensor(y, dtype=torch.int64)
    images = torch.as_tensor(x)
    generator = torch.Generator(device=device).manual_seed(seed)
    clean = robust = noisy = 0
    with eval_mode(unwrap(model)) as net:
        for i in range(0, len(images), batch_size):
            xb = images[i : i + batch_size]
            xb = data_mod.to_float(xb, device) if xb.dtype == torch.uint8 else xb.to(device, torch.float32)
            yb = labels[i : i + batch_size].to(device)
            with autocast(amp, device):
                with torch.no_grad():
                    clean += int((net(xb).argmax(1) == yb).sum())
                    if noise_sigma is not None:
                        noisy += int((net(gaussian_noise(xb, noise_sigma, generator)).argmax(1) == yb).sum())
                if attack is not None:
                    x_adv = pgd(net, xb, yb, attack, generator=generator)
                    with torch.no_grad():
                        robust += int((net(x_adv).argmax(1) == yb).sum())
    n = len(images)
    out = {
        "clean_acc": clean / n if n else None,
        "pgd_acc": robust / n if (n and attack is not None) else None,
        "images": n,
    }
    if noise_sigma is not None:
        out["noise_acc"] = noisy / n if n else None
    return out


def initial_model(cfg: TrainConfig, num_classes: int, device: torch.device) -> nn.Module:
    """The untrained network, the same for a seed whoever builds it (this process, every DDP
    worker), without touching the caller's random state; channels-last if the config asks."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, num_classes=num_classes)
    return prepare_model(model, cfg, device)


def prepare_model(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """On ``device``, in the config's memory format."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if cfg.optim.channels_last else model


@dataclass(frozen=True)
class Batches:
    """The training batches of every epoch: ``steps`` SGD steps each, ``for_epoch(e)`` those of epoch ``e``."""

    steps: int
    for_epoch: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]


class Alone:
    """Training alone in this process: all the data, a fresh loader each epoch shuffled by a
    generator seeded from (seed, epoch), every held-out image, nothing to exchange."""

    rank, world = 0, 1

    def batches(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> Batches:
        _check_batch(len(x), batch_size)
        return Batches(
            len(x) // batch_size, lambda epoch: make_loader(x, y, batch_size, seed=epoch_seed(seed, epoch, 0))
        )

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def sync_buffers(self, model: nn.Module) -> None:
        pass

    def reduce_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return metrics


@dataclass(frozen=True)
class DataParallel:
    """This process as worker ``rank`` of ``world`` in data-parallel (DDP) training, and the calls
    that join it to the others.

    The framework driving the workers passes its own calls in (Ray Train's ``prepare_model`` and
    ``prepare_data_loader``, collectives over the process group), so this module needs none of it.
    The global batch ``optim.batch_size`` is split evenly: each worker trains on ``batch_size / world``
    images of a disjoint ``1/world`` of the data (a ``DistributedSampler`` seeded with the run's seed,
    reshuffled per epoch) and evaluates every ``world``-th held-out image.
    """

    rank: int
    world: int
    prepare_model: Callable[[nn.Module], nn.Module]  # wraps the model for gradient averaging (DDP)
    prepare_loader: Callable[[DataLoader], DataLoader]  # e.g. moves batches to the worker's device
    sync_buffers: Callable[[nn.Module], None]  # rank 0's BN statistics to every worker, before evaluation
    reduce_metrics: Callable[[dict[str, Any]], dict[str, Any]]  # this worker's epoch metrics -> the group's

    def batches(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> Batches:
        dataset = TensorDataset(x, y)
        sampler = DistributedSampler(
            dataset, num_replicas=self.world, rank=self.rank, shuffle=True, seed=seed, drop_last=True
        )
        per_worker = batch_size // self.world
        if len(sampler) < per_worker:
            raise TbnError(
                f"{len(x)} training images give each of {self.world} workers fewer than its {per_worker} images "
                "per batch: lower optim.batch_size or use fewer workers"
            )
        loader = self.prepare_loader(DataLoader(dataset, batch_size=per_worker, sampler=sampler, drop_last=True))

        def for_epoch(epoch: int) -> DataLoader:
            sampler.set_epoch(epoch)
            return loader

        return Batches(len(loader), for_epoch)


def _heldout_metrics(
    model: nn.Module, heldout: data_mod.Split, cfg: TrainConfig, device: torch.device, replica: Alone | DataParallel
) -> dict[str, Any]:
    """Clean and PGD accuracy on this worker's held-out images with rank 0's BN statistics, and the seconds it took."""
    t0 = time.perf_counter()
    replica.sync_buffers(model)
    noisy = cfg.noise_trained
    ev = evaluate(
        model,
        heldout.images,
        heldout.labels,
        None if noisy else cfg.eval_attack,
        device,
        batch_size=cfg.eval.batch_size,
        seed=cfg.seed,
        amp=cfg.optim.amp,
        noise_sigma=cfg.noise.sigma if noisy else None,
    )
    out = {
        "heldout_clean_acc": ev["clean_acc"],
        "heldout_pgd_acc": ev["pgd_acc"],
        "heldout_images": ev["images"],
        "eval_seconds": time.perf_counter() - t0,
    }
    if noisy:
        out["heldout_noise_acc"] = ev["noise_acc"]
    return out


def selection_metric(cfg: TrainConfig) -> str:
    """The held-out metric the best epoch is chosen by: PGD accuracy for adversarial training,
    accuracy under the training noise for the noise objectives (which are not attacked per epoch)."""
    return "heldout_noise_acc" if cfg.noise_trained else "heldout_pgd_acc"


#: Loads a saved state into the model, optimizer and scheduler ``fit`` built; returns the epoch to continue at.
Resume = Callable[[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler], int]


def fit(
    cfg: TrainConfig,
    data: data_mod.Cifar10,
    device: torch.device,
    *,
    start_epoch: int = 0,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    resume: Resume | None = None,
    parallel: DataParallel | None = None,
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
) -> nn.Module:
    """Adversarial training for epochs ``start_epoch .. cfg.optim.epochs - 1``, alone in this process
    or, with ``parallel``, as one worker of a data-parallel group; returns the (unwrapped) model.

    Builds what is not passed (the model from ``cfg.seed`` without touching the global RNG), then
    ``resume`` loads a saved state into it and says where to continue. After each epoch evaluates
    on the first ``cfg.eval.images`` held-out images (clean and ``cfg.eval_attack``) and calls
    ``on_epoch(epoch, metrics, model, optimizer, scheduler)`` so the caller can checkpoint and
    report; ``metrics["lr"]`` is the learning rate the epoch started with.
    """
    device = torch.device(device)
    replica = parallel or Alone()
    model = initial_model(cfg, len(data.classes), device) if model is None else prepare_model(model, cfg, device)
    x, y = data_mod.as_tensors(data.train)
    batches = replica.batches(x, y, cfg.optim.batch_size, cfg.seed)
    optimizer = optimizer if optimizer is not None else make_optimizer(model, cfg.optim)
    scheduler = scheduler if scheduler is not None else make_scheduler(optimizer, cfg.optim, batches.steps)
    if resume is not None:
        start_epoch = resume(model, optimizer, scheduler)
    trained = replica.prepare_model(model)
    scaler = make_grad_scaler(cfg.optim, device)
    heldout = data.heldout.subset(slice(0, cfg.eval.images)).subset(slice(replica.rank, None, replica.world))
    for epoch in range(start_epoch, cfg.optim.epochs):
        generator = torch.Generator(device=device).manual_seed(epoch_seed(cfg.seed, epoch, 1 + replica.rank))
        lr = optimizer.param_groups[0]["lr"]
        train = train_epoch(
            trained,
            batches.for_epoch(epoch),
            optimizer,
            scheduler,
            cfg,
            device,
            scaler=scaler,
            generator=generator,
            progress=progress,
        )
        metrics = replica.reduce_metrics(
            {"epoch": epoch, "lr": lr, **train, **_heldout_metrics(model, heldout, cfg, device, replica)}
        )
        if on_epoch is not None:
            on_epoch(epoch, metrics, model, optimizer, scheduler)
    return model
