"""PGD: stays in the budget and the image box, raises the loss, has no side effects, reproduces."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tbn_ray.config import AttackConfig, ModelConfig
from tbn_ray.science.attacks import pgd
from tbn_ray.science.models import build_model

from .helpers import partial_test_images

ATTACKS = {
    "l2": AttackConfig(norm="l2", eps=0.5, steps=5),
    "linf": AttackConfig(norm="linf", eps="8/255", steps=5),
}


def _no_gradient(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient is zero: PGD then returns its random start (clipped)."""
    return 0 * logits.sum(1)


@pytest.fixture(scope="module")
def cifar() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = partial_test_images(256)
    return torch.as_tensor(x).permute(0, 3, 1, 2).float() / 255, torch.as_tensor(y)


@pytest.fixture(scope="module")
def model(cifar: tuple[torch.Tensor, torch.Tensor]) -> Iterator[nn.Module]:
    """A tiny model trained briefly (clean SGD on the first 192 images, 30 steps), in eval mode.

    One torch thread while this module runs: on two shared cores, two threads contend.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = build_model(ModelConfig(arch="tiny"))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x, y = cifar[0][:192], cifar[1][:192]
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        i = torch.randperm(len(x), generator=gen)[:64]
        opt.zero_grad()
        F.cross_entropy(net(x[i]), y[i]).backward()
        opt.step()
    net.zero_grad(set_to_none=True)
    yield net.eval()
    torch.set_num_threads(threads)


def _norms(d: torch.Tensor, norm: str) -> torch.Tensor:
    return d.flatten(1).norm(dim=1) if norm == "l2" else d.flatten(1).abs().amax(dim=1)


@pytest.mark.parametrize("norm", ATTACKS)
def test_budget_box_and_loss_increase(model: nn.Module, cifar: tuple[torch.Tensor, torch.Tensor], norm: str) -> None:
    attack = ATTACKS[norm]
    x, y = cifar[0][192:], cifar[1][192:]  # images the model was not trained on
    adv = pgd(model, x, y, attack, generator=torch.Generator().manual_seed(0))
    assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
    assert (_norms(adv - x, norm) <= attack.eps + 1e-5).all()
    assert adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        clean_logits, adv_logits = model(x), model(adv)
    clean_loss = F.cross_entropy(clean_logits, y, reduction="none")
    adv_loss = F.cross_entropy(adv_logits, y, reduction="none")
    assert (clean_logits.argmax(1) == y).float().mean() > 0.15  # the model learned something
    assert adv_loss.mean() > clean_loss.mean() + 0.5
    assert (adv_loss >= clean_loss - 1e-4).float().mean() > 0.9  # nearly every example, not just on average
    assert (adv_logits.argmax(1) == y).float().mean() < (clean_logits.argmax(1) == y).float().mean()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_no_side_effects_on_mode_or_gradients(
    model: nn.Module, cifar: tuple[torch.Tensor, torch.Tensor], mode: str
) -> None:
    model.train(mode == "train")
    model.body[1].train(mode != "train")  # a mixed setting must survive too
    before = [m.training for m in model.modules()]
    try:
        pgd(model, cifar[0][:32], cifar[1][:32], ATTACKS["l2"], generator=torch.Generator().manual_seed(0))
        assert [m.training for m in model.modules()] == before
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()


def test_seeded_generator_reproduces(model: nn.Module, cifar: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = cifar[0][:32], cifar[1][:32]
    attack = ATTACKS["linf"]
    a = pgd(model, x, y, attack, generator=torch.Generator().manual_seed(7))
    b = pgd(model, x, y, attack, generator=torch.Generator().manual_seed(7))
    c = pgd(model, x, y, attack, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # without a random start the attack is deterministic whatever the generator
    fixed = attack.model_copy(update={"random_start": False})
    assert torch.equal(pgd(model, x, y, fixed, generator=torch.Generator().manual_seed(1)), pgd(model, x, y, fixed))


def test_runs_under_no_grad_and_autocast(model: nn.Module, cifar: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Evaluation code calls the attack inside no_grad and (on GPU) autocast; here CPU bf16."""
    x, y = cifar[0][:32], cifar[1][:32]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        adv = pgd(model, x, y, ATTACKS["l2"], generator=torch.Generator().manual_seed(0))
    assert adv.dtype == torch.float32
    assert (_norms(adv - x, "l2") <= 0.5 + 1e-5).all() and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)


def test_restarts_keep_the_worst_case_per_example(model: nn.Module, cifar: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Three restarts pick, per example, the misclassified or highest-loss one of the three
    single runs that the same generator stream produces one after another."""
    x, y = cifar[0][192:256], cifar[1][192:256]
    attack = AttackConfig(norm="l2", eps=0.25, steps=2, restarts=3)
    best = pgd(model, x, y, attack, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    single = [pgd(model, x, y, attack.model_copy(update={"restarts": 1}), generator=gen) for _ in range(3)]
    with torch.no_grad():
        logits = [model(c) for c in single]
    wrong = torch.stack([lg.argmax(1) != y for lg in logits])
    loss = torch.stack([F.cross_entropy(lg, y, reduction="none") for lg in logits])
    score = wrong.double() * 1e6 + loss.double()  # misclassified first, then loss
    pick = score.argmax(0)
    expected = torch.stack(single)[pick, torch.arange(len(x))]
    assert torch.equal(best, expected)
    assert len(set(pick.tolist())) > 1  # the restarts mattered for this batch


def test_linf_random_start_is_uniform_in_the_box(model: nn.Module) -> None:
    eps = 0.1
    x = torch.full((64, 3, 32, 32), 0.5)  # far enough from 0 and 1 that no clipping happens
    adv = pgd(
        model,
        x,
        torch.zeros(64, dtype=torch.int64),
        AttackConfig(norm="linf", eps=eps, steps=1),
        generator=torch.Generator().manual_seed(0),
        loss_fn=_no_gradient,
    )
    d = (adv - x).flatten().double()
    assert d.abs().max() <= eps + 1e-6
    assert abs(float(d.mean())) < 0.01 * eps
    assert float(d.var()) == pytest.approx(eps**2 / 3, rel=0.02)  # variance of U(-eps, eps)
    counts = np.histogram(d.numpy(), bins=10, range=(-eps, eps))[0]
    assert counts.min() > 0.95 * counts.mean()


def test_l2_random_start_is_uniform_in_the_ball() -> None:
    """In 2 dimensions the radius of a uniform point in the disc has P(r <= eps*t) = t^2,
    and its angle is uniform."""
    eps, n = 0.2, 20_000
    flat = nn.Sequential(nn.Flatten(), nn.Linear(2, 3))
    x = torch.full((n, 1, 1, 2), 0.5)
    adv = pgd(
        flat,
        x,
        torch.zeros(n, dtype=torch.int64),
        AttackConfig(norm="l2", eps=eps, steps=1),
        generator=torch.Generator().manual_seed(0),
        loss_fn=_no_gradient,
    )
    d = (adv - x).view(n, 2).double()
    r = d.norm(dim=1)
    assert r.max() <= eps + 1e-6
    for t in (0.25, 0.5, 0.75):
        assert float((r <= eps * t).double().mean()) == pytest.approx(t * t, abs=0.015)
    angle = torch.atan2(d[:, 1], d[:, 0])
    quadrants = np.histogram(angle.numpy(), bins=4, range=(-np.pi, np.pi))[0]
    assert quadrants.min() > 0.95 * n / 4
