"""Test-time adaptive BN: statistics are exactly the noisy activations', nothing else moves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tbn_ray.errors import TbnError
from tbn_ray.science import tbn

from .helpers import partial_test_images


def small_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    x, _ = partial_test_images(96)
    return torch.as_tensor(x).permute(0, 3, 1, 2).float() / 255


def trained_like(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Give the BN layers non-trivial clean statistics, as training would."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model(images)
    return model.eval()


def test_estimated_statistics_equal_the_noisy_activations_statistics(images):
    model = trained_like(small_bn_net(), images)
    sigma, samples, batch = 0.25, 160, 32  # 96 images cycled with fresh noise, 5 batches
    est = tbn.estimate_bn_stats(model, images, sigma=sigma, samples=samples, batch_size=batch, seed=3)

    # Independently: the same noisy batches through the model with batch-statistics BN,
    # every BN input captured and pooled with torch's own mean/var.
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, inp, name=name: captured.setdefault(name, []).append(inp[0].detach()))
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    with tbn.batch_statistics(model), torch.no_grad():
        n = 0
        for x in tbn.noisy_batches(images, sigma, samples, batch, seed=3):
            model(x)
            n += len(x)
    for h in hooks:
        h.remove()
    assert n == samples
    for name, acts in captured.items():
        a = torch.cat(acts).double().transpose(0, 1).reshape(acts[0].shape[1], -1)
        torch.testing.assert_close(est[name]["running_mean"], a.mean(1).float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(est[name]["running_var"], a.var(1, unbiased=True).float(), rtol=1e-5, atol=1e-6)


def test_first_layer_statistics_match_a_direct_computation(images):
    """Layer 1's input does not depend on any BN: check it from the raw noisy images."""
    model = trained_like(small_bn_net(), images)
    est = tbn.estimate_bn_stats(model, images, sigma=0.5, samples=96, batch_size=96, seed=1)
    noisy = next(tbn.noisy_batches(images, 0.5, 96, 96, seed=1))
    with torch.no_grad():
        a = model[0](noisy).double()
    torch.testing.assert_close(est["1"]["running_mean"], a.mean((0, 2, 3)).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(est["1"]["running_var"], a.var((0, 2, 3), unbiased=True).float(), rtol=1e-5, atol=1e-6)


def test_estimation_leaves_weights_affine_statistics_and_modes_untouched(images):
    model = trained_like(small_bn_net(), images)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    est = tbn.estimate_bn_stats(model, images, sigma=0.25, samples=64, batch_size=32, seed=0)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert not model.training and all(not m.training for m in model.modules())
    # The estimate differs from the clean statistics: noise changes the activations.
    assert tbn.stats_distance(est, tbn.get_bn_stats(model)) > 0.05


def test_switching_sets_changes_predictions_and_switching_back_restores_them_exactly(images):
    model = trained_like(small_bn_net(), images)
    clean = tbn.get_bn_stats(model)
    noisy_stats = tbn.estimate_bn_stats(model, images, sigma=0.5, samples=96, batch_size=48, seed=0)
    x = images[:32] + 0.5 * torch.randn(images[:32].shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        with tbn.use_bn_stats(model, noisy_stats):
            switched = model(x)
        back = model(x)
    assert not torch.allclose(ref, switched)
    assert torch.equal(ref, back)
    tbn.set_bn_stats(model, noisy_stats)
    tbn.set_bn_stats(model, clean)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_estimation_is_reproducible_for_a_seed(images):
    model = trained_like(small_bn_net(), images)
    a = tbn.estimate_bn_stats(model, images, sigma=0.25, samples=64, batch_size=32, seed=7)
    b = tbn.estimate_bn_stats(model, images, sigma=0.25, samples=64, batch_size=32, seed=7)
    c = tbn.estimate_bn_stats(model, images, sigma=0.25, samples=64, batch_size=32, seed=8)
    for name in a:
        assert torch.equal(a[name]["running_mean"], b[name]["running_mean"])
        assert not torch.equal(a[name]["running_var"], c[name]["running_var"])


def test_batch_statistics_mode_normalises_with_the_batch_and_restores_everything(images):
    model = trained_like(small_bn_net(), images)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = images[:40]
    with torch.no_grad(), tbn.batch_statistics(model):
        out = model(x)
        assert all(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        # the first BN layer's output is its input standardised with the batch's own statistics
        a = model[0](x)
        bn = model[1]
        manual = (a - a.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
            a.var((0, 2, 3), unbiased=False, keepdim=True) + bn.eps
        )
        manual = manual * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
        torch.testing.assert_close(bn(a), manual, rtol=1e-4, atol=1e-4)
    for k, v in before.items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert all(not m.training and m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        assert not torch.allclose(out, model(x))  # eval mode uses the stored statistics again


def test_bad_inputs_are_user_errors(images):
    model = trained_like(small_bn_net(), images)
    with pytest.raises(TbnError, match="no BatchNorm"):
        tbn.estimate_bn_stats(nn.Linear(3, 2), images, sigma=0.25, samples=10)
    assert tbn.get_bn_stats(nn.Linear(3, 2)) == {}  # a BN-less model's clean set: nothing to swap
    other = tbn.get_bn_stats(model)
    other.pop("1")
    with pytest.raises(TbnError, match="do not fit"):
        tbn.set_bn_stats(model, other)
    with pytest.raises(TbnError, match="no images"):
        tbn.estimate_bn_stats(model, images[:0], sigma=0.25, samples=10)


def test_bn_key_names_sets_by_sigma():
    assert tbn.bn_key(0.25) == "sigma=0.25"
    assert tbn.bn_key(1) == "sigma=1"
    assert np.isclose(float(tbn.bn_key(0.12).split("=")[1]), 0.12)


def test_certification_refuses_every_batch_dependent_bn_even_in_eval_mode(images):
    """Prior mixing (test-batch:N) keeps the layers in eval mode and replaces their forward: the
    votes then depend on the batch, and Smooth must refuse the model (as it does train mode)."""
    from tbn_ray.errors import SoundnessError
    from tbn_ray.science.bn_modes import bn_mode, parse_bn_mode
    from tbn_ray.science.smoothing import Smooth

    model = trained_like(small_bn_net(), images)
    clean = tbn.get_bn_stats(model)
    Smooth(model, 10, 0.25)  # frozen statistics: a fixed classifier
    for spec, per_sample in (("test-batch:16", False), ("test-batch", True), ("test-batch", False)):
        with torch.no_grad(), bn_mode(model, parse_bn_mode(spec), clean, per_sample=per_sample):
            if not per_sample:  # the same image, another batch, other logits: not one fixed f
                assert not torch.allclose(model(images[:8])[0], model(images[[0, *range(40, 47)]])[0])
            with pytest.raises(SoundnessError, match="BatchNorm layer '1'"):
                Smooth(model, 10, 0.25)
    Smooth(model, 10, 0.25)  # the mode's context restored the torch forward

    handle = model[4].register_forward_pre_hook(lambda bn, inputs: (inputs[0] - inputs[0].mean(0),))
    with pytest.raises(SoundnessError, match="BatchNorm layer '4' has forward hooks"):
        Smooth(model, 10, 0.25)
    handle.remove()

    class OwnBatchNorm(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.batch_norm(x, None, None, self.weight, self.bias, True)

    model[1] = OwnBatchNorm(8).eval()
    with pytest.raises(SoundnessError, match="runs a forward of its own"):
        Smooth(model, 10, 0.25)
