"""The noise objectives (Gaussian augmentation, consistency regularisation), tested as adversarial
training is: on real CIFAR-10 (exact subset) with the tiny model, the loss falls on a few batches,
the noise is seeded, training resumes exactly, and adversarial runs are stored as before."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tbn_ray.config import TrainConfig
from tbn_ray.errors import TbnError
from tbn_ray.jobs.pipeline import train_run
from tbn_ray.science import data as data_mod
from tbn_ray.science.models import build_model
from tbn_ray.science.objectives import consistency_terms, gaussian_noise, step_loss
from tbn_ray.science.training import fit, make_optimizer, make_scheduler
from tbn_ray.store.cifar10 import load_cifar10
from tbn_ray.store.runs import Run
from tbn_ray.store.storage import Storage

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CPU = torch.device("cpu")
BASE = {
    "seed": 0,
    "model": {"arch": "tiny"},
    "optim": {"epochs": 2, "batch_size": 32, "lr": 0.05},
    "eval": {"images": 64},
}
GAUSSIAN = TrainConfig.model_validate({**BASE, "objective": "gaussian", "noise": {"sigma": 0.25}})
CONSISTENCY = TrainConfig.model_validate({**BASE, "objective": "consistency", "noise": {"sigma": 0.25, "copies": 2}})


@pytest.fixture(scope="module")
def cifar() -> Iterator[data_mod.Cifar10]:
    if not (SHARED / "cifar10-partial").is_dir():
        pytest.skip(f"exact CIFAR-10 subset not found at {SHARED / 'cifar10-partial'}")
    d = load_cifar10("partial", shared_dir=SHARED)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield data_mod.Cifar10(d.source, d.description, d.train.subset(slice(0, 256)), d.heldout, d.test, d.classes)
    torch.set_num_threads(threads)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("cfg", [GAUSSIAN, CONSISTENCY], ids=["gaussian", "consistency"])
def test_the_loss_falls_on_a_few_batches_of_real_images(cfg: TrainConfig, cifar: data_mod.Cifar10) -> None:
    """Thirty SGD steps on the same 64 real images, fresh noise each step: the loss of the last
    five steps is well below that of the first five."""
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = data_mod.to_float(cifar.train.images[:64])
    y = torch.as_tensor(cifar.train.labels[:64], dtype=torch.int64)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        loss, logits = step_loss(model, model, x, y, cfg, generator)
        assert logits.shape == (64, 10)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses


def test_the_noise_is_seeded_float32_and_unclipped() -> None:
    x = torch.full((4, 3, 8, 8), 0.98)
    a = gaussian_noise(x, 0.5, torch.Generator().manual_seed(3))
    b = gaussian_noise(x, 0.5, torch.Generator().manual_seed(3))
    c = gaussian_noise(x, 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32 and a.max() > 1.0 and a.min() < 0.0  # no clipping to [0, 1]
    assert abs(float((a - x).std()) - 0.5) < 0.05


def test_consistency_terms_match_their_definitions() -> None:
    """Cross-entropy averaged over copies, the mean KL(mean || copy) and the entropy of the mean,
    against a direct computation; identical copies have no KL."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 10)
    y = torch.randint(0, 10, (5,))
    xent, kl, ent = consistency_terms(logits, y)
    p = logits.softmax(-1)
    mean = p.mean(0)
    assert math.isclose(float(xent), float(sum(F.cross_entropy(logits[i], y) for i in range(3)) / 3), rel_tol=1e-5)
    direct_kl = sum((mean * (mean.log() - p[i].log())).sum(-1).mean() for i in range(3)) / 3
    assert math.isclose(float(kl), float(direct_kl), rel_tol=1e-5)
    assert math.isclose(float(ent), float(-(mean * mean.log()).sum(-1).mean()), rel_tol=1e-5)
    same = logits[:1].repeat(3, 1, 1)
    assert float(consistency_terms(same, y)[1]) < 1e-6


@pytest.mark.parametrize("cfg", [GAUSSIAN, CONSISTENCY], ids=["gaussian", "consistency"])
def test_fit_is_seeded_and_resumes_exactly(cfg: TrainConfig, cifar: data_mod.Cifar10) -> None:
    """Bitwise on CPU: the same seed gives the same weights, a fit resumed after epoch 0 from its
    model/optimizer/scheduler state gives them too, and another seed draws other noise."""
    snapshots: list[dict[str, Any]] = []
    history: list[dict[str, Any]] = []

    def on_epoch(epoch: int, metrics: dict[str, Any], model: nn.Module, optimizer: Any, scheduler: Any) -> None:
        history.append(metrics)
        snapshots.append(
            copy.deepcopy(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            )
        )

    first = _state(fit(cfg, cifar, CPU, on_epoch=on_epoch, progress=False))
    for m in history:  # the noise objectives are evaluated under their noise, not attacked
        assert m["heldout_pgd_acc"] is None and 0 <= m["heldout_noise_acc"] <= 1 and m["heldout_images"] == 64
    model = build_model(cfg.model)
    model.load_state_dict(snapshots[0]["model"])
    optimizer = make_optimizer(model, cfg.optim)
    optimizer.load_state_dict(snapshots[0]["optimizer"])
    scheduler = make_scheduler(optimizer, cfg.optim, 256 // cfg.optim.batch_size)
    scheduler.load_state_dict(snapshots[0]["scheduler"])
    resumed = _state(
        fit(cfg, cifar, CPU, start_epoch=1, model=model, optimizer=optimizer, scheduler=scheduler, progress=False)
    )
    for k in first:
        assert torch.equal(first[k], resumed[k]), k
    other = cfg.model_copy(update={"noise": cfg.noise.model_copy(update={"sigma": 0.5})})
    assert not torch.equal(first["body.0.weight"], _state(fit(other, cifar, CPU, progress=False))["body.0.weight"])


def test_train_run_resumes_a_noise_run_and_refuses_another_objective(
    cifar: data_mod.Cifar10, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the pipeline and its stored checkpoint: stopped after epoch 1 (when its line is
    logged), then resumed, it ends with the weights of an uninterrupted run; the same name under
    another objective is one clear line."""
    monkeypatch.setattr("tbn_ray.jobs.pipeline.load_from_config", lambda _cfg: cifar)

    class Stop(Exception):
        pass

    def stop_after_first_epoch(msg: str) -> None:
        if msg.startswith("epoch 1/2"):
            raise Stop

    run = Run(Storage.open(tmp_path / "g"))
    with monkeypatch.context() as m:
        m.setattr("tbn_ray.jobs.pipeline.log", stop_after_first_epoch)
        with pytest.raises(Stop):
            train_run(GAUSSIAN, run, progress=False)
    assert run.load_checkpoint().epoch == 1
    resumed = train_run(GAUSSIAN, run, progress=False)
    straight = train_run(GAUSSIAN, Run(Storage.open(tmp_path / "h")), progress=False)
    assert resumed.epoch == straight.epoch == 2
    for k in straight.model:
        assert torch.equal(resumed.model[k], straight.model[k]), k
    assert run.load_checkpoint().config.objective == "gaussian"
    with pytest.raises(TbnError, match="trained with gaussian sigma 0.25, not"):
        train_run(GAUSSIAN.model_copy(update={"objective": "adversarial"}), run, progress=False)


def test_adversarial_training_is_stored_as_before_objectives_existed() -> None:
    """An adversarial config dumps without the new fields (the same config.yaml and checkpoint);
    a noise objective stores its section, and both load back equal."""
    adversarial = TrainConfig()
    dumped = adversarial.model_dump(mode="json")
    assert "objective" not in dumped and "noise" not in dumped
    assert TrainConfig.model_validate(dumped) == adversarial
    for cfg in (GAUSSIAN, CONSISTENCY):
        raw = cfg.model_dump(mode="json")
        assert raw["objective"] == cfg.objective and raw["noise"]["sigma"] == 0.25
        assert TrainConfig.model_validate(raw) == cfg
    assert GAUSSIAN.objective_label == "gaussian sigma 0.25"
    assert CONSISTENCY.objective_label == "consistency sigma 0.25 (m 2, lambda 20, eta 0.5)"
