"""tbn-ray evaluate without Ray: BN modes, APGD-CE, adaptive attacks on batch statistics,
CIFAR-10-C caching (regenerated and released layout), resumable items, CLI errors.

The model is the tiny CNN briefly PGD-trained (l2, a few hundred steps' worth of images) on
the byte-exact CIFAR-10 subset and TBN-calibrated at sigma 0.25: weak (about 30% clean
accuracy) but trained, so attacks have something to break.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tbn_ray.config import AttackConfig, CalibrateConfig, CertifyConfig, EvaluateConfig, TrainConfig, parse_config
from tbn_ray.errors import TbnError
from tbn_ray.jobs.certify import aggregate, certify_run
from tbn_ray.jobs.evaluate import run_in_process
from tbn_ray.jobs.evaluate_attack import plan_attack
from tbn_ray.jobs.evaluate_corruptions import plan_corruptions
from tbn_ray.jobs.pipeline import calibrate_run
from tbn_ray.reports.evaluation import evaluation_section
from tbn_ray.science import corruptions as C
from tbn_ray.science import data as data_mod
from tbn_ray.science.attacks import apgd_ce, pgd
from tbn_ray.science.bn_modes import BNMode, bn_mode, parse_bn_mode, used_bn_stats
from tbn_ray.science.robustness import attack_variants, correct_predictions, run_attack
from tbn_ray.science.tbn import CLEAN, batch_statistics, bn_layers
from tbn_ray.science.training import fit
from tbn_ray.store.cifar10 import load_cifar10
from tbn_ray.store.cifar10c import Cifar10C
from tbn_ray.store.runs import Run, make_checkpoint
from tbn_ray.store.storage import Storage

from .helpers import SHARED_DATA

CPU = torch.device("cpu")
TRAIN = TrainConfig.model_validate(
    {
        "name": "tiny",
        "seed": 0,
        "model": {"arch": "tiny"},
        "data": {"source": "partial", "shared_dir": str(SHARED_DATA)},
        "attack": {"norm": "l2", "eps": 0.25, "steps": 1},
        "optim": {"epochs": 2, "batch_size": 32, "lr": 0.05},
        "eval": {"images": 32, "attack": {"norm": "l2", "eps": 0.25, "steps": 1}},
    }
)


@pytest.fixture(scope="module")
def cifar() -> Iterator[data_mod.Cifar10]:
    if not (SHARED_DATA / "cifar10-partial" / "cifar10_test_prefix.npz").is_file():
        pytest.skip(f"CIFAR-10 subset not found under {SHARED_DATA}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores
    yield load_cifar10("partial", shared_dir=SHARED_DATA)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(cifar: data_mod.Cifar10, tmp_path_factory: pytest.TempPathFactory) -> Run:
    d = data_mod.Cifar10(
        cifar.source, cifar.description, cifar.train.subset(slice(0, 1024)), cifar.heldout, cifar.test, cifar.classes
    )
    model = fit(TRAIN, d, CPU, progress=False)
    r = Run(Storage.open(tmp_path_factory.mktemp("runs")).child("tiny"))
    r.save_checkpoint(make_checkpoint(model, TRAIN, TRAIN.optim.epochs, {"data": d.description}))
    calibrate_run(r, CalibrateConfig(sigmas=(0.25,), samples=512, batch_size=256), device="cpu", progress=False)
    return r


@pytest.fixture(scope="module")
def test_batch(cifar: data_mod.Cifar10) -> tuple[torch.Tensor, torch.Tensor]:
    return data_mod.to_float(cifar.test.images[:128]), torch.as_tensor(cifar.test.labels[:128])


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# --- BN modes ------------------------------------------------------------------------------------


def test_test_batch_normalises_with_the_batch_moments_and_restores_everything(run: Run, test_batch) -> None:
    model, _ = run.load_model()
    x, _ = test_batch
    before = _state(model)
    stats = run.bn_stats(CLEAN, model)
    seen: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    hooks = [
        bn.register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(
                name, (i[0].detach().double().numpy(), o.detach().double().numpy())
            )
        )
        for name, bn in bn_layers(model)
    ]
    with bn_mode(model, parse_bn_mode("test-batch"), stats):
        model(x)
        used = used_bn_stats(model, x, parse_bn_mode("test-batch"), stats)
    for h in hooks:
        h.remove()
    layers = dict(bn_layers(model))
    assert set(seen) == set(layers)
    for name, (inp, out) in seen.items():
        # independently: numpy float64 per-channel moments over (batch, height, width)
        mean, var = inp.mean(axis=(0, 2, 3)), inp.var(axis=(0, 2, 3))
        bn = layers[name]
        gamma, beta = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
        expected = (inp - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + bn.eps) * gamma[
            None, :, None, None
        ] + beta[None, :, None, None]
        assert np.allclose(out, expected, atol=1e-4), name
        assert np.allclose(used[name]["running_mean"].numpy(), mean, atol=1e-5)
        assert np.allclose(used[name]["running_var"].numpy(), var, rtol=1e-4, atol=1e-6)
        # the running statistics really differ from the batch's (otherwise this test proves nothing)
        assert not np.allclose(bn.running_mean.numpy(), mean, atol=1e-3)
    after = _state(model)
    assert after.keys() == before.keys() and all(
        torch.equal(after[k], before[k]) for k in before
    )  # weights, gamma/beta, buffers
    assert not any(m.training for m in model.modules())
    assert all(bn.track_running_stats and "forward" not in bn.__dict__ for bn in layers.values())


def test_batch_one_and_prior_mixing_match_their_definitions(run: Run, test_batch) -> None:
    model, _ = run.load_model()
    x, _ = test_batch
    stats = run.bn_stats(CLEAN, model)
    before = _state(model)
    mode = parse_bn_mode("test-batch")
    with bn_mode(model, mode, stats, per_sample=True), torch.no_grad():
        vectorised = model(x[:6])
    with torch.no_grad(), batch_statistics(model):  # each image alone in train-mode BN
        one_by_one = torch.cat([model(x[i : i + 1]) for i in range(6)])
    assert torch.allclose(vectorised, one_by_one, atol=1e-4)
    # the statistics a batch mode uses on a batch, frozen, reproduce its outputs on that batch
    for spec in ("test-batch", "test-batch:64"):
        m = parse_bn_mode(spec)
        with bn_mode(model, m, stats), torch.no_grad():
            live = model(x)
        with bn_mode(model, BNMode("fixed", "fixed"), used_bn_stats(model, x, m, stats)), torch.no_grad():
            frozen = model(x)
        assert torch.allclose(live, frozen, atol=1e-3), spec
    # prior mixing: N/(N+n) clean + n/(N+n) batch at the first BN layer (its input does not depend on BN)
    name, bn = bn_layers(model)[0]
    mixed = used_bn_stats(model, x, parse_bn_mode("test-batch:64"), stats)[name]["running_mean"]
    pure = used_bn_stats(model, x, parse_bn_mode("test-batch"), stats)[name]["running_mean"]
    w = 64 / (64 + len(x))
    assert torch.allclose(mixed, w * stats[name]["running_mean"] + (1 - w) * pure, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())


def test_bn_mode_parsing() -> None:
    assert parse_bn_mode("clean") == BNMode("clean", "clean")
    assert parse_bn_mode("sigma:0.250") == BNMode("sigma:0.25", "sigma=0.25")
    assert parse_bn_mode("test-batch:0") == parse_bn_mode("test-batch")
    assert parse_bn_mode("test-batch:16").key(200) == "test-batch-b200-N16"
    for bad in ("Clean", "sigma", "sigma:-1", "sigma:x", "test-batch:-2", "tbn", "test-batch:inf"):
        with pytest.raises(TbnError, match="unknown BN mode"):
            parse_bn_mode(bad)


# --- attacks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm, eps", [("l2", 0.5), ("linf", 8 / 255)])
def test_apgd_in_budget_and_at_least_as_strong_as_pgd(run: Run, test_batch, norm: str, eps: float) -> None:
    model, _ = run.load_model()
    x, y = test_batch
    threat = AttackConfig(norm=norm, eps=eps, steps=10)
    before = _state(model)
    x_apgd = apgd_ce(model, x, y, threat, generator=torch.Generator().manual_seed(0))
    x_pgd = pgd(model, x, y, threat, generator=torch.Generator().manual_seed(0))
    delta = (x_apgd - x).flatten(1)
    size = delta.norm(dim=1) if norm == "l2" else delta.abs().amax(dim=1)
    assert float(size.max()) <= eps * (1 + 1e-5)
    assert float(x_apgd.min()) >= 0 and float(x_apgd.max()) <= 1
    clean, robust_apgd, robust_pgd = _accuracy(model, x, y), _accuracy(model, x_apgd, y), _accuracy(model, x_pgd, y)
    assert clean > 0.2 and robust_apgd < clean  # a trained model that the attack hurts
    assert robust_apgd <= robust_pgd  # same 10-iteration budget, same random start seed
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())


def test_adaptive_attack_on_test_batch_is_not_weaker_than_a_transferred_one(run: Run, test_batch) -> None:
    """Same images, seeds and budget: attacking through the batch statistics beats attacking the
    clean-statistics model and then classifying with batch statistics (docs/method.md, rule 3)."""
    model, _ = run.load_model()
    x, y = test_batch
    stats = run.bn_stats(CLEAN, model)
    threat = AttackConfig(norm="l2", eps=0.5, steps=5)
    for attack in ("pgd", "apgd-ce"):
        v = attack_variants(model, x, y, parse_bn_mode("test-batch"), stats, stats, attack, threat, seed=3)
        adaptive, transferred = v["adaptive"]["adversarial"].mean(), v["non-adaptive"]["adversarial"].mean()
        assert adaptive <= transferred, (attack, adaptive, transferred)
        assert adaptive < v["adaptive"]["clean"].mean()
        # fixed clean batch: the clean images are classified exactly as in the adaptive mode
        assert np.array_equal(v["fixed-clean-batch"]["clean"], v["adaptive"]["clean"])
    # a coupled attack returns one real batch: its accuracy is what the attack saw, not a splice
    with bn_mode(model, parse_bn_mode("test-batch"), stats):
        x_adv = run_attack(model, x, y, "apgd-ce", threat.model_copy(update={"restarts": 2}), seed=3, coupled=True)
        assert _accuracy(model, x_adv, y) <= v["adaptive"]["adversarial"].mean()


# --- CIFAR-10-C and the sharded, resumable evaluations (in process) ------------------------------


def _write_released(directory: Path, c10c: Cifar10C, corruptions: tuple[str, ...], all_labels: np.ndarray) -> None:
    """A released-layout copy holding the regenerated arrays at their rows (other rows zero)."""
    directory.mkdir()
    np.save(directory / "labels.npy", np.tile(all_labels, 5).astype(np.uint8))
    for corruption in corruptions:
        arr = np.lib.format.open_memmap(
            directory / f"{corruption}.npy", mode="w+", dtype=np.uint8, shape=(50_000, 32, 32, 3)
        )
        for s in C.SEVERITIES:
            arr[(s - 1) * 10_000 + c10c.index] = c10c.load(corruption, s)
        arr.flush()
        del arr


def test_corruption_evaluation_caches_resumes_and_accepts_released_files(
    run: Run, cifar: data_mod.Cifar10, tmp_path: Path
) -> None:
    modes = ["clean", "sigma:0.25", "test-batch", "test-batch:32"]
    ev = EvaluateConfig(corruptions="gaussian_noise,contrast", severities="1,5", batch_size=32)
    kw = dict(start=0, stop=64, progress=False)
    plan = plan_corruptions(run, modes, ev, cache_root=Storage.open(tmp_path / "cache"), **kw)
    result = run_in_process(plan, CPU, progress=False)
    assert (result.items_computed, result.items_skipped) == (5 * 4, 0)
    c10c = plan.cifar10c
    assert c10c.description == f"CIFAR-10-C (regenerated, seed 0, from {cifar.description})"
    # one uint8 array per (corruption, severity), row i = test image i: the released block layout
    arr = np.load(tmp_path / "cache" / "cifar10c" / c10c.variant / "contrast" / "severity-5.npy")
    assert arr.dtype == np.uint8 and np.array_equal(arr, C.corrupt(cifar.test.images[:64], "contrast", 5, seed=0))
    assert (tmp_path / "cache" / "cifar10c" / c10c.variant / "sample_grid.png").read_bytes()[:4] == b"\x89PNG"

    model, _ = run.load_model()
    r = result.result
    assert r["source"] == c10c.description
    for spec in modes:
        mode = parse_bn_mode(spec)
        row = r["modes"][mode.key(32)]
        # recomputed independently of the items
        stats = run.bn_stats(mode.stats_name, model)
        images = C.corrupt(cifar.test.images[:64], "gaussian_noise", 5, seed=0)
        expected = correct_predictions(
            model, images, cifar.test.labels[:64], mode, stats, batch_size=32, device=CPU
        ).mean()
        assert row["accuracy"]["gaussian_noise"]["5"] == pytest.approx(expected)
        assert row["mean"] == pytest.approx(
            np.mean([row["accuracy"][c][s] for c in ("gaussian_noise", "contrast") for s in ("1", "5")])
        )
        assert row["severity_mean"]["5"] == pytest.approx(
            (row["accuracy"]["gaussian_noise"]["5"] + row["accuracy"]["contrast"]["5"]) / 2
        )
        assert row["grid"] == "2 x 2" and not row["standard_grid"]

    # the same command again: every item reused
    again = run_in_process(
        plan_corruptions(run, modes, ev, cache_root=Storage.open(tmp_path / "cache"), **kw), CPU, progress=False
    )
    assert (again.items_computed, again.items_skipped) == (0, 20) and again.result["modes"] == r["modes"]
    # the report: markdown, plot, every number in one JSON
    evaluate = run.storage.child("evaluate")
    assert c10c.description in evaluate.read_text("report.md")
    assert evaluate.read_bytes("corruption_accuracy.png")[:4] == b"\x89PNG"
    assert (
        evaluate.read_json("evaluation.json")["results"][0]["modes"]["clean"]["accuracy"]
        == r["modes"]["clean"]["accuracy"]
    )
    section = evaluation_section(run.storage)
    assert section is not None and "| test-batch:32 | 32 |" in section

    # released .npy files: imported into the storage cache, the same pixels give the same numbers
    released = tmp_path / "released"
    with np.load(SHARED_DATA / "cifar10-partial" / "cifar10_test_prefix.npz") as z:
        _write_released(released, c10c, ("gaussian_noise", "contrast"), z["all_labels"])
    rel = run_in_process(
        plan_corruptions(run, modes, ev, cache_root=Storage.open(tmp_path / "cache"), released=released, **kw),
        CPU,
        progress=False,
    )
    assert rel.result["source"] == "CIFAR-10-C (released)" and rel.eval_id != result.eval_id
    for key, row in rel.result["modes"].items():
        assert row["accuracy"] == r["modes"][key]["accuracy"]


def test_attack_evaluation_items_and_resume(run: Run, tmp_path: Path) -> None:
    ev = EvaluateConfig(attacks=("pgd", "apgd-ce"), norm="l2", eps=0.5, attack_steps=3, batch_size=24)
    kw = dict(start=0, stop=48)
    plan = plan_attack(run, ["clean", "test-batch"], ev, **kw)
    assert plan.batches == 2
    result = run_in_process(plan, CPU, progress=False)
    assert result.items_computed == 2 * 2 * 2
    r = result.result
    assert (
        r["attack"]["eps"] == 0.5
        and r["attack"]["steps"] == 3
        and r["attack"]["pgd_step_size"] == pytest.approx(2.5 * 0.5 / 3)
    )
    clean = r["modes"]["clean"]["variants"]["standard"]
    tb = r["modes"]["test-batch-b24"]["variants"]
    assert set(tb) == {"adaptive", "batch-1", "fixed-clean-batch", "non-adaptive"}
    assert clean["images"] == 48 and clean["worst_case"] <= min(clean["pgd"], clean["apgd-ce"])
    assert tb["adaptive"]["worst_case"] <= min(tb["adaptive"]["pgd"], tb["adaptive"]["apgd-ce"])
    # items hold per-image flags for the selected indices; the aggregate is their mean
    item = plan.out.read_json(plan.item_key(parse_bn_mode("clean"), ("pgd", 1)))
    assert item["indices"] == list(range(24, 48))
    flags = (
        item["variants"]["standard"]["adversarial"]
        + plan.out.read_json(plan.item_key(parse_bn_mode("clean"), ("pgd", 0)))["variants"]["standard"]["adversarial"]
    )
    assert clean["pgd"] == pytest.approx(np.mean(flags))
    # adding a mode later reuses the finished ones
    more = run_in_process(plan_attack(run, ["clean", "test-batch", "sigma:0.25"], ev, **kw), CPU, progress=False)
    assert (more.items_computed, more.items_skipped) == (4, 8)
    assert set(more.result["modes"]) == {"clean", "test-batch-b24", "sigma=0.25"}
    assert "l2, eps=0.5" in (evaluation_section(run.storage) or "")


def test_certification_report_includes_the_runs_evaluation(run: Run) -> None:
    run_in_process(
        plan_attack(
            run, ["clean"], EvaluateConfig(attacks=("pgd",), eps=0.25, attack_steps=1, batch_size=16), start=0, stop=16
        ),
        CPU,
        progress=False,
    )
    cfg = CertifyConfig(sigmas=(0.25,), n0=10, n=40, batch_size=40, max_images=3)
    (out,) = certify_run(run, cfg, run.storage.child("certify"), device="cpu", progress=False)
    certify_dir = Storage.open(out.location.rsplit("/", 1)[0])  # <output>/<run-id>
    report = certify_dir.read_text("report.md")
    assert report.startswith(f"# Certification of {run.uri}")
    assert "## Corruption and adversarial robustness" in report and "l2, eps=0.25" in report
    # a corruption plot (when an earlier test wrote one) is linked relative to the report
    for link in re.findall(r"!\[corruption accuracy per BN mode\]\(([^)]+)\)", report):
        assert (certify_dir.local_path() / link).resolve() == run.storage.local_path(
            "evaluate/corruption_accuracy.png"
        ).resolve()
    # `tbn-ray report` rebuilds the same report from the shard files alone
    certify_dir.local_path("report.md").unlink()
    aggregate(certify_dir)
    assert certify_dir.read_text("report.md") == report


def test_bad_input_fails_before_any_work(run: Run, tmp_path: Path) -> None:
    cache = Storage.open(tmp_path / "cache")
    ev = EvaluateConfig()
    cases = [
        (
            lambda: plan_corruptions(run, ["clean"], EvaluateConfig(corruptions="fog,smog"), cache_root=cache),
            "unknown corruption 'smog'",
        ),
        (
            lambda: plan_corruptions(run, ["clean"], EvaluateConfig(severities="1-6"), cache_root=cache),
            "severities must lie in 1..5",
        ),
        (lambda: plan_corruptions(run, ["clean", "median"], ev, cache_root=cache), "unknown BN mode 'median'"),
        (lambda: plan_corruptions(run, ["sigma:0.5"], ev, cache_root=cache), "tbn-ray calibrate .* --sigma 0.5"),
        (lambda: plan_corruptions(run, [], ev, cache_root=cache), "no BN mode given"),
        # the settings are checked once, by the config, with the flag or key they came from
        (
            lambda: parse_config(EvaluateConfig, {"eps": "0"}, "x", {"eps": "--eps"}),
            "--eps: Input should be greater than 0",
        ),
        (
            lambda: parse_config(EvaluateConfig, {"eps": "-8/255"}, "x", {"eps": "--eps"}),
            "--eps: Input should be greater",
        ),
        (lambda: plan_attack(run, ["clean"], EvaluateConfig(attacks=("fgsm",))), "unknown attack 'fgsm'"),
        (
            lambda: parse_config(EvaluateConfig, {"norm": "l1"}, "x", {"norm": "--norm"}),
            "--norm: Input should be 'l2' or 'linf'",
        ),
        (lambda: plan_attack(run, ["clean"], ev, start=5000), "no test images"),
    ]
    for make, message in cases:
        with pytest.raises(TbnError, match=message):
            make()
    assert not (tmp_path / "cache").exists()


def test_cli_bad_input_one_line_exit_2(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The console entry point (tbn-ray = tbn_ray.cli:main), in this process: one stderr line, exit 2."""
    from tbn_ray.cli import main

    common = ["--local", "--storage", str(tmp_path / "cache")]
    cases = {
        "corruption": (
            ["evaluate", "corruptions", run.uri, "--bn", "clean", "--corruptions", "fog,smog", *common],
            "unknown corruption 'smog'",
        ),
        "sigma": (
            ["evaluate", "corruptions", run.uri, "--bn", "test-batch", "--bn", "sigma:0.12", *common],
            "tbn-ray calibrate",
        ),
        "eps": (
            ["evaluate", "attack", run.uri, "--bn", "clean", "--eps", "0", "--local"],
            "--eps: Input should be greater than 0",
        ),
        "mode": (["evaluate", "attack", run.uri, "--bn", "adabn", "--local"], "unknown BN mode 'adabn'"),
        "severity": (
            ["data", "cifar10c", "--severities", "0-5", "--storage", str(tmp_path / "cache")],
            "severities must lie in 1..5",
        ),
    }
    for name, (args, message) in cases.items():
        monkeypatch.setattr(sys, "argv", ["tbn-ray", *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
        stderr = capsys.readouterr().err
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert exit_info.value.code == 2, (name, stderr)
        assert len(lines) == 1 and lines[0].startswith("tbn-ray: error: ") and message in lines[0], (name, stderr)
    assert not (tmp_path / "cache").exists()


def test_cli_takes_evaluation_defaults_from_the_config_and_flags_override_them(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tbn_ray.cli import main
    from tbn_ray.reports.evaluation import load_results

    config = tmp_path / "experiment.yaml"
    config.write_text("evaluate: {batch_size: 4, attack_steps: 1, restarts: 2, attacks: [pgd]}\n")
    args = [
        "evaluate",
        "attack",
        run.uri,
        "--bn",
        "clean",
        "--eps",
        "0.125",
        "--indices",
        "0:8",
        "--local",
        "--no-progress",
    ]
    monkeypatch.setattr(sys, "argv", ["tbn-ray", *args, "--config", str(config), "--restarts", "1"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    (result,) = [r for r in load_results(run.storage) if r["kind"] == "attack" and r["attack"]["eps"] == 0.125]
    assert (result["batch_size"], result["test_images"]) == (4, 8)
    assert (result["attack"]["steps"], result["attack"]["restarts"], result["attack"]["attacks"]) == (1, 1, ["pgd"])
