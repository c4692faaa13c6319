"""PGD adversarial training on real CIFAR-10 (exact subset) with the tiny model."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from tbn_ray.config import OptimConfig, TrainConfig
from tbn_ray.devices import resolve_device
from tbn_ray.errors import TbnError
from tbn_ray.science import data as data_mod
from tbn_ray.science.models import build_model
from tbn_ray.science.training import (
    DataParallel,
    evaluate,
    fit,
    frozen_bn_stats,
    make_loader,
    make_optimizer,
    make_scheduler,
    train_epoch,
)
from tbn_ray.store.cifar10 import load_cifar10

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CPU = torch.device("cpu")
#: Small and quick, still adversarial: l2 PGD-2 training, PGD-3 evaluation on 128 held-out images.
CFG = TrainConfig.model_validate(
    {
        "seed": 0,
        "model": {"arch": "tiny"},
        "attack": {"norm": "l2", "eps": 0.25, "steps": 2},
        "optim": {"epochs": 2, "batch_size": 32, "lr": 0.05},
        "eval": {"images": 128, "attack": {"norm": "l2", "eps": 0.25, "steps": 3}},
    }
)


@pytest.fixture(scope="module")
def cifar() -> Iterator[data_mod.Cifar10]:
    """The exact subset with 512 training images; one torch thread meanwhile (two shared cores contend)."""
    if not (SHARED / "cifar10-partial").is_dir():
        pytest.skip(f"exact CIFAR-10 subset not found at {SHARED / 'cifar10-partial'}")
    d = load_cifar10("partial", shared_dir=SHARED)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield data_mod.Cifar10(d.source, d.description, d.train.subset(slice(0, 512)), d.heldout, d.test, d.classes)
    torch.set_num_threads(threads)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def two_epochs(cifar: data_mod.Cifar10) -> dict[str, Any]:
    """fit() for 2 epochs from scratch, with a checkpoint-like snapshot after the first."""
    history: list[dict[str, Any]] = []
    snapshots: list[dict[str, Any]] = []

    def on_epoch(epoch: int, metrics: dict[str, Any], model: nn.Module, optimizer: Any, scheduler: Any) -> None:
        history.append(metrics)
        snapshots.append(
            copy.deepcopy(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            )
        )

    model = fit(CFG, cifar, CPU, on_epoch=on_epoch, progress=False)
    return {"model": model, "history": history, "snapshots": snapshots}


def test_fit_learns_and_reports(two_epochs: dict[str, Any], cifar: data_mod.Cifar10) -> None:
    history = two_epochs["history"]
    assert [m["epoch"] for m in history] == [0, 1]
    for m in history:
        assert m["images"] == 512 and m["images_per_s"] > 0 and m["seconds"] > 0
        assert m["heldout_images"] == 128
        assert 0 <= m["heldout_pgd_acc"] <= m["heldout_clean_acc"] <= 1
    assert history[0]["lr"] == CFG.optim.lr and 0 < history[1]["lr"] < CFG.optim.lr
    assert history[1]["train_loss"] < history[0]["train_loss"] - 0.05
    # 32 SGD steps of adversarial training: modest, but above chance (0.1) by more than 4
    # binomial standard deviations on the images trained on (eval mode, stored statistics)
    # and on held-out images
    model = two_epochs["model"]
    ev = evaluate(model, cifar.train.images[:256], cifar.train.labels[:256], None, CPU)
    assert ev["clean_acc"] > 0.18 and ev["pgd_acc"] is None and ev["images"] == 256
    assert history[1]["heldout_clean_acc"] > 0.18
    assert model.training  # fit leaves the model as train_epoch does


def test_fit_is_reproducible_and_resumes_exactly(two_epochs: dict[str, Any], cifar: data_mod.Cifar10) -> None:
    """Bitwise on CPU (no deterministic-algorithms switch needed): a second fit from the seed,
    and a fit resumed after epoch 0 from a checkpoint of model/optimizer/scheduler state,
    both give exactly the weights and BN statistics of the first."""
    first = _state(two_epochs["model"])
    again = _state(fit(CFG, cifar, CPU, progress=False))
    snap = two_epochs["snapshots"][0]
    model = build_model(CFG.model)
    model.load_state_dict(snap["model"])
    optimizer = make_optimizer(model, CFG.optim)
    # loaded before the scheduler is built, which resets the optimizer's lr: train_epoch must
    # take the rate from the restored scheduler
    optimizer.load_state_dict(snap["optimizer"])
    scheduler = make_scheduler(optimizer, CFG.optim, 512 // CFG.optim.batch_size)
    scheduler.load_state_dict(snap["scheduler"])
    resumed = _state(
        fit(CFG, cifar, CPU, start_epoch=1, model=model, optimizer=optimizer, scheduler=scheduler, progress=False)
    )
    for k in first:
        assert torch.equal(first[k], again[k]), k
        assert torch.equal(first[k], resumed[k]), k
    other = _state(
        fit(
            CFG.model_copy(update={"seed": 1, "optim": CFG.optim.model_copy(update={"epochs": 1})}),
            cifar,
            CPU,
            progress=False,
        )
    )
    assert not torch.equal(first["body.0.weight"], other["body.0.weight"])


def _loader(cifar: data_mod.Cifar10, n: int = 128) -> DataLoader:
    x, y = data_mod.as_tensors(cifar.train.subset(slice(0, n)))
    return make_loader(x, y, 64, shuffle=False)


def test_bn_statistics_see_only_the_trained_adversarial_batches(cifar: data_mod.Cifar10) -> None:
    """The attack's forward passes (train mode) leave the running statistics alone: one
    update per SGD step, not one per PGD iterate."""
    torch.manual_seed(0)
    model = build_model(CFG.model)
    optimizer = make_optimizer(model, CFG.optim)
    scheduler = make_scheduler(optimizer, CFG.optim, 2)
    out = train_epoch(model, _loader(cifar), optimizer, scheduler, CFG, CPU, generator=torch.Generator().manual_seed(0))
    assert out["images"] == 128
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(int(bn.num_batches_tracked) == 2 for bn in bns)
    assert model.training and scheduler.last_epoch == 2
    before = _state(model)
    with frozen_bn_stats(model):
        model(torch.rand(16, 3, 32, 32))
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_evaluate_restores_modes_and_touches_nothing(cifar: data_mod.Cifar10) -> None:
    torch.manual_seed(0)
    model = build_model(CFG.model).train()
    model.body[1].eval()  # a mixed setting (e.g. one BN frozen) must come back as it was
    modes = [m.training for m in model.modules()]
    state = _state(model)
    x, y = cifar.heldout.images[:64], cifar.heldout.labels[:64]
    ev = evaluate(model, x, y, CFG.eval_attack, CPU, batch_size=25)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(state[k], v) for k, v in _state(model).items())  # eval mode: BN statistics unchanged
    assert all(p.grad is None for p in model.parameters())
    assert ev["images"] == 64 and 0 <= ev["pgd_acc"] <= ev["clean_acc"] <= 1
    # float NCHW input gives the same answer as uint8 NHWC, and the PGD draws are seeded
    again = evaluate(model, data_mod.to_float(x), torch.as_tensor(y), CFG.eval_attack, CPU, batch_size=64)
    assert again == ev


def test_train_epoch_accepts_a_ddp_model_and_distributed_sampler(cifar: data_mod.Cifar10, tmp_path: Path) -> None:
    """As under Ray Train: a DDP-wrapped model (one gloo worker) and a DistributedSampler give
    the same weights as the bare model with the same batches."""
    x, y = data_mod.as_tensors(cifar.train.subset(slice(0, 128)))
    cfg = CFG.model_copy(update={"augment": False})
    results = []
    for wrapped in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg.model)
        optimizer = make_optimizer(model, cfg.optim)
        scheduler = make_scheduler(optimizer, cfg.optim, 2)
        gen = torch.Generator().manual_seed(0)
        if not wrapped:
            train_epoch(model, make_loader(x, y, 64, shuffle=False), optimizer, scheduler, cfg, CPU, generator=gen)
            results.append(_state(model))
            continue
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
        try:
            ddp = nn.parallel.DistributedDataParallel(model)
            dataset = TensorDataset(x, y)
            loader = DataLoader(
                dataset, batch_size=64, sampler=DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=False)
            )
            out = train_epoch(ddp, loader, optimizer, scheduler, cfg, CPU, generator=gen)
            assert out["images"] == 128
            assert evaluate(ddp, x[:32], y[:32], cfg.eval_attack, CPU)["images"] == 32
        finally:
            dist.destroy_process_group()
        results.append(_state(model))
    bare, ddp_state = results
    for k in bare:
        assert torch.allclose(bare[k], ddp_state[k], atol=1e-6), k


def test_fit_as_one_worker_of_a_group_uses_the_hooks_and_resumes_exactly(
    cifar: data_mod.Cifar10, tmp_path: Path
) -> None:
    """fit as a DDP worker, as Ray Train runs it (one gloo worker here): the model is wrapped, batches
    come from a DistributedSampler reshuffled each epoch, BN buffers are synced before each evaluation,
    on_epoch gets the reduced metrics, and the resume hook continues bit for bit."""
    cfg = CFG.model_copy(update={"eval": CFG.eval.model_copy(update={"images": 32})})
    d = data_mod.Cifar10(
        cifar.source, cifar.description, cifar.train.subset(slice(0, 128)), cifar.heldout, cifar.test, cifar.classes
    )
    wrapped: list[nn.Module] = []
    loaders: list[DataLoader] = []
    synced: list[nn.Module] = []

    def prepare_model(model: nn.Module) -> nn.Module:
        wrapped.append(nn.parallel.DistributedDataParallel(model))
        return wrapped[-1]

    def prepare_loader(loader: DataLoader) -> DataLoader:
        loaders.append(loader)
        return loader

    parallel = DataParallel(0, 1, prepare_model, prepare_loader, synced.append, lambda m: {**m, "workers": 1})
    seen: list[dict[str, Any]] = []
    snapshots: list[dict[str, Any]] = []

    def on_epoch(epoch: int, metrics: dict[str, Any], model: nn.Module, optimizer: Any, scheduler: Any) -> None:
        seen.append(metrics)
        snapshots.append(
            copy.deepcopy(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            )
        )

    def resume(model: nn.Module, optimizer: Any, scheduler: Any) -> int:
        model.load_state_dict(snapshots[0]["model"])
        optimizer.load_state_dict(snapshots[0]["optimizer"])
        scheduler.load_state_dict(snapshots[0]["scheduler"])
        return 1

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = fit(cfg, d, CPU, parallel=parallel, on_epoch=on_epoch, progress=False)
        resumed = fit(cfg, d, CPU, parallel=parallel, resume=resume, progress=False)
    finally:
        dist.destroy_process_group()
    assert wrapped[0].module is model and resumed is wrapped[1].module  # trained wrapped, returned bare
    assert isinstance(loaders[0].sampler, DistributedSampler) and loaders[0].sampler.epoch == 1
    assert synced == [model, model, resumed]  # before each epoch's evaluation
    assert [m["epoch"] for m in seen] == [0, 1]
    assert all(m["workers"] == 1 and m["images"] == 128 and m["heldout_images"] == 32 for m in seen)
    for k, v in _state(model).items():
        assert torch.equal(v, _state(resumed)[k]), k


def test_scheduler_shapes() -> None:
    param = nn.Parameter(torch.zeros(1))

    def lrs(optim: OptimConfig, steps_per_epoch: int) -> list[float]:
        opt = make_optimizer(nn.ParameterList([param]), optim)
        sched = make_scheduler(opt, optim, steps_per_epoch)
        out = []
        for _ in range(optim.epochs * steps_per_epoch):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    cos = lrs(OptimConfig(epochs=10, lr=0.1, schedule="cosine"), 10)
    assert cos[0] == pytest.approx(0.1)
    assert cos[50] == pytest.approx(0.05)
    assert cos[25] == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert cos[-1] == pytest.approx(0.05 * (1 + math.cos(math.pi * 99 / 100))) and cos[-1] < 1e-4
    assert all(a >= b for a, b in zip(cos, cos[1:]))
    warm = lrs(OptimConfig(epochs=10, lr=0.1, schedule="cosine", warmup_epochs=1), 10)
    assert warm[0] == pytest.approx(0.01) and warm[9] == pytest.approx(0.1) and warm[10] == pytest.approx(0.1)
    assert warm[55] == pytest.approx(0.05)
    step = lrs(OptimConfig(epochs=4, lr=0.1, schedule="step", milestones=(0.5, 0.75), gamma=0.1), 25)
    assert step[49] == pytest.approx(0.1) and step[50] == pytest.approx(0.01) and step[75] == pytest.approx(0.001)
    assert lrs(OptimConfig(epochs=2, lr=0.1, schedule="constant"), 5) == pytest.approx([0.1] * 10)


def test_loader_order_is_seeded_and_small_data_is_refused(cifar: data_mod.Cifar10) -> None:
    x, y = data_mod.as_tensors(cifar.train.subset(slice(0, 100)))
    order = [torch.cat([b[1] for b in make_loader(x, y, 10, seed=s)]) for s in (0, 0, 1)]
    assert torch.equal(order[0], order[1]) and not torch.equal(order[0], order[2])
    assert sorted(order[0].tolist()) == sorted(y.tolist())
    xb, _ = next(iter(make_loader(x, y, 10, shuffle=False)))
    assert xb.dtype == torch.uint8 and xb.shape == (10, 3, 32, 32)
    with pytest.raises(TbnError, match="batch size"):
        make_loader(x, y, 128)


def test_resolve_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == CPU
    with pytest.raises(TbnError, match="device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(TbnError, match="CUDA is not available"):
            resolve_device("cuda")
