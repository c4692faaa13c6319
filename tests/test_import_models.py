"""Models from elsewhere, end to end through the CLI on real CIFAR-10 images (exact subset):
a RobustBench zoo architecture from its model directory, AutoAttack's example ResNet-18 as a
module:callable, TBN on BatchNorm variants we did not write, the refusals for models TBN
cannot adapt, and AutoAttack in the attack evaluation."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from tbn_ray.errors import SoundnessError, TbnError

from .helpers import SHARED_DATA, partial_test_images

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "cifar10-partial").is_dir(), reason="CIFAR-10 subset absent")
pyautoattack = pytest.importorskip("pyautoattack")

AA_EXAMPLES = Path(pyautoattack.__file__).parent / "examples"
needs_robustbench = pytest.mark.skipif(
    importlib.util.find_spec("robustbench") is None, reason="robustbench (tbn-ray[zoo]) not installed"
)
HERE = "tests.test_import_models"  # this module, importable as module:callable from the checkout


def cli():  # type: ignore[no-untyped-def]
    """tbn-ray's app (``import`` is one of its commands)."""
    from tbn_ray.cli import app

    assert any(c.name == "import" for c in app.registered_commands)
    return app


def tbn(*args: str | Path, fails: bool = False) -> str:
    """One CLI call in this process; its output, or (``fails``) its one-line TbnError message."""
    result = CliRunner().invoke(cli(), [str(a) for a in args])
    if fails:
        assert isinstance(result.exception, TbnError), (result.exception, result.output[-2000:])
        message = str(result.exception)
        assert "\n" not in message
        return message
    if result.exception is not None:
        raise result.exception
    assert result.exit_code == 0, result.output[-2000:]
    return result.output


CERTIFY = (
    "--n0",
    "4",
    "--n",
    "16",
    "--alpha",
    "0.01",
    "--skip",
    "100",
    "--max-images",
    "2",
    "--batch-size",
    "16",
    "--local",
)
CALIBRATE = ("--samples", "32", "--batch-size", "32")


# --- architectures for module:callable, built from this module --------------------------------


def bn_variety() -> nn.Module:
    """BatchNorm kinds torch has, none of them tbn-ray's: no affine, SyncBatchNorm, 1d, momentum=None."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2),
        nn.BatchNorm2d(8, affine=False),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.SyncBatchNorm(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 16),
        nn.BatchNorm1d(16, momentum=None),
        nn.ReLU(),
        nn.Linear(16, 10),
    )


def layer_norm_only() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.Flatten(),
        nn.LayerNorm(8 * 15 * 15),
        nn.Linear(8 * 15 * 15, 10),
    )


def no_norm() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


class BatchMeanNorm(nn.BatchNorm2d):
    """A BatchNorm whose forward always normalises with the batch: votes depend on the batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean((0, 2, 3), keepdim=True)) / (x.std((0, 2, 3), keepdim=True) + self.eps)


class OwnForwardNorm(nn.BatchNorm2d):
    """A BatchNorm with a forward of its own (here harmless): the certificate's check cannot know that."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


def batch_dependent() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), BatchMeanNorm(4), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


def own_forward() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), OwnForwardNorm(4), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


def untracked_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=4),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )


def saved(tmp: Path, name: str, factory, prefix: str = "") -> Path:  # type: ignore[no-untyped-def]
    """A freshly initialised model's state_dict in a file (seeded, keys optionally prefixed)."""
    torch.manual_seed(0)
    state = {prefix + k: v for k, v in factory().state_dict().items()}
    path = tmp / f"{name}.pt"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zoo")


# --- RobustBench's zoo --------------------------------------------------------------------------


@needs_robustbench
def test_a_zoo_model_from_robustbench_model_dir_is_imported_calibrated_and_certified(store):
    from tbn_ray.science.external import zoo_constructor

    name = "Rice2020Overfitting"  # PreAct ResNet-18 (L2), normalisation inside, 17 BatchNorm layers
    model_dir = store / "models"
    (model_dir / "cifar10" / "L2").mkdir(parents=True)
    torch.manual_seed(0)
    reference = zoo_constructor(name, "L2")().eval()
    weights = model_dir / "cifar10" / "L2" / f"{name}.pt"
    torch.save({"module." + k: v for k, v in reference.state_dict().items()}, weights)  # as DataParallel saved them

    out = tbn(
        "import",
        f"robustbench:{name}",
        "--threat-model",
        "L2",
        "--model-dir",
        model_dir,
        "--storage",
        store,
        "--data",
        "partial",
    )
    run = store / f"{name}-L2"
    assert f"robustbench:{name} (L2)" in out and "17 BatchNorm layers" in out
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    source = ckpt["config"]["model"]["source"]
    assert ckpt["epoch"] == 0 and ckpt["config"]["model"]["arch"] == "imported"
    assert source["kind"] == "robustbench" and source["name"] == name and source["threat_model"] == "L2"
    assert source["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()

    from tbn_ray.store.runs import Run

    model, stored = Run.open(str(run)).load_model()
    assert stored.config.model.label == f"robustbench:{name} (L2)"
    images, labels = partial_test_images(4)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))  # the same function as the zoo's own model with these weights

    # importing the same weights again changes nothing; another model under the name is refused
    assert "nothing to do" in tbn(
        "import", f"robustbench:{name}", "--threat-model", "L2", "--model-dir", model_dir, "--storage", store
    )
    other = saved(store, "other", no_norm)
    assert "already holds another model" in tbn(
        "import", f"{HERE}:no_norm", "--weights", other, "--name", f"{name}-L2", "--storage", store, fails=True
    )

    tbn("calibrate", run, "--sigma", "0.25", *CALIBRATE)
    sets = torch.load(run / "bn_stats.pt", weights_only=True)["sets"]
    assert len(sets["sigma=0.25"]["stats"]) == 17 == len(sets["clean"]["stats"])
    tbn("certify", run, "--sigma", "0.25", *CERTIFY)
    (tsv,) = run.rglob("certify.tsv")
    with open(tsv) as f:
        assert [int(r["idx"]) for r in csv.DictReader(f, delimiter="\t")] == [0, 100]
    assert f"{name}" in tbn("show", run)


@needs_robustbench
def test_zoo_errors_are_one_line(store):
    assert "did you mean Rice2020Overfitting" in tbn(
        "import", "robustbench:Rice2020Overfit", "--threat-model", "L2", "--storage", store, fails=True
    )
    assert "choose one with --threat-model" in tbn(
        "import", "robustbench:Rice2020Overfitting", "--storage", store, fails=True
    )
    assert "normalise inside" in tbn(
        "import", "robustbench:Rice2020Overfitting", "--normalize", "0.5", "0.5", "--storage", store, fails=True
    )
    missing = tbn(
        "import",
        "robustbench:Engstrom2019Robustness",
        "--threat-model",
        "L2",
        "--model-dir",
        store / "empty",
        "--storage",
        store,
        fails=True,
    )
    assert (
        "put its weights at" in missing
        and str(store / "empty" / "cifar10" / "L2" / "Engstrom2019Robustness.pt") in missing
    )
    assert not (store / "empty").exists()  # the failed download leaves no empty model-dir tree behind
    (store / "mine" / "cifar10").mkdir(parents=True)
    (store / "mine" / "cifar10" / "notes.txt").write_text("the user's")
    tbn(
        "import",
        "robustbench:Engstrom2019Robustness",
        "--threat-model",
        "L2",
        "--model-dir",
        store / "mine",
        "--storage",
        store,
        fails=True,
    )
    assert sorted(p.relative_to(store).as_posix() for p in (store / "mine").rglob("*")) == [
        "mine/cifar10",
        "mine/cifar10/notes.txt",
    ]


def test_without_the_zoo_packages_the_error_says_how_to_install(monkeypatch):
    from tbn_ray.science import autoattack, external

    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # import pyautoattack now raises ImportError
    with pytest.raises(TbnError, match=r"pip install 'tbn-ray\[zoo\]'"):
        external.import_robustbench()
    with pytest.raises(TbnError, match=r"pip install 'tbn-ray\[zoo\]'"):
        autoattack.require_pyautoattack()


# --- AutoAttack's example ResNet-18 as module:callable -----------------------------------------


@pytest.fixture(scope="module")
def aa_run(store) -> Path:
    tbn(
        "import",
        "pyautoattack.examples.resnet:ResNet18",
        "--weights",
        AA_EXAMPLES / "model_test.pt",
        "--name",
        "aa",
        "--storage",
        store,
        "--data",
        "partial",
    )
    tbn("calibrate", store / "aa", "--sigma", "0.25", *CALIBRATE)
    return store / "aa"


def test_autoattacks_example_model_is_a_real_classifier_after_import(aa_run):
    from tbn_ray.store.runs import Run

    model, ckpt = Run.open(str(aa_run)).load_model()
    source = ckpt.config.model.source
    assert source.kind == "callable" and source.name == "pyautoattack.examples.resnet:ResNet18"
    assert source.weights_sha256 == hashlib.sha256((AA_EXAMPLES / "model_test.pt").read_bytes()).hexdigest()
    images, labels = partial_test_images(32)
    with torch.no_grad():
        accuracy = (
            model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).argmax(1).numpy() == labels
        ).mean()
    assert accuracy >= 0.7  # trained weights, [0, 1] inputs: wrong normalisation or keys would be near chance
    sets = torch.load(aa_run / "bn_stats.pt", weights_only=True)["sets"]
    assert len(sets["sigma=0.25"]["stats"]) == 20
    tbn("certify", aa_run, "--sigma", "0.25", *CERTIFY)
    tbn(
        "certify",
        aa_run,
        "--sigma",
        "0.25",
        "--bn",
        "clean",
        *CERTIFY[:-5],
        "--max-images",
        "1",
        "--batch-size",
        "16",
        "--local",
    )
    assert len(list(aa_run.rglob("certify.tsv"))) == 2


def test_autoattack_in_the_attack_evaluation_clean_and_tbn(aa_run):
    # the example model is not robust: every image falls to APGD-CE, the first of the four attacks, which keeps this quick
    tbn(
        "evaluate",
        "attack",
        aa_run,
        "--attack",
        "autoattack",
        "--attack",
        "apgd-ce",
        "--steps",
        "5",
        "--norm",
        "linf",
        "--eps",
        "8/255",
        "--bn",
        "clean",
        "--bn",
        "sigma:0.25",
        "--indices",
        "0:2",
        "--batch-size",
        "2",
        "--local",
    )
    (result,) = aa_run.glob("evaluate/attack/*/result.json")
    r = json.loads(result.read_text())
    assert "AutoAttack standard" in r["attack"]["autoattack"] and r["attack"]["attacks"] == ["autoattack", "apgd-ce"]
    clean = r["modes"]["clean"]["variants"]["standard"]
    assert (
        clean["images"] == 2
        and clean["clean_accuracy"] == 1.0
        and clean["autoattack"] == 0.0
        and clean["worst_case"] == 0.0
    )
    assert "sigma=0.25" in r["modes"]
    item = json.loads(next(aa_run.glob("evaluate/attack/*/clean/autoattack/batch-*.json")).read_text())
    assert item["params"]["autoattack"].startswith("pyautoattack ") and item["params"]["attack"] == "autoattack"
    report = (aa_run / "evaluate" / "report.md").read_text()  # the settings of the attacks that ran, no PGD step
    assert "5 steps, 1 restart(s) (apgd-ce), AutoAttack's standard version" in report and "PGD step" not in report
    for mode in ("test-batch", "test-batch:16"):
        refused = tbn(
            "evaluate",
            "attack",
            aa_run,
            "--attack",
            "autoattack",
            "--bn",
            "clean",
            "--bn",
            mode,
            "--indices",
            "0:3",
            "--local",
            fails=True,
        )
        assert "re-batches" in refused


def test_autoattack_is_seeded_restores_torch_rng_and_stays_in_budget():
    from tbn_ray.config import AttackConfig, ModelConfig
    from tbn_ray.science.autoattack import autoattack
    from tbn_ray.science.bn_modes import BNMode
    from tbn_ray.science.models import build_model
    from tbn_ray.science.robustness import attack_variants

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="tiny")).eval()
    images, _ = partial_test_images(8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # not contiguous: AutoAttack needs it to be
    with torch.no_grad():
        y = model(x).argmax(1)  # every image correct, so attacked: a budget large enough for APGD-CE alone
    threat = AttackConfig(norm="l2", eps=3.0)
    state = torch.random.get_rng_state()
    a = autoattack(model, x, y, threat, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, autoattack(model, x, y, threat, seed=7))
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert float((a - x).flatten(1).norm(dim=1).max()) <= 3.0 * (1 + 1e-4) and a.min() >= 0 and a.max() <= 1
    with torch.no_grad():
        assert bool((model(a).argmax(1) != y).all())
    with pytest.raises(TbnError, match="re-batches"):
        attack_variants(model, x, y, BNMode("test-batch", "clean", batch=True), {}, {}, "autoattack", threat, seed=0)


# --- TBN on BatchNorm layers we did not write, and models TBN cannot adapt ---------------------


def test_every_batchnorm_kind_gets_per_sigma_statistics(store):
    weights = saved(store, "variety", bn_variety, prefix="module.")  # DataParallel's prefix, handled
    out = tbn(
        "import",
        f"{HERE}:bn_variety",
        "--weights",
        weights,
        "--name",
        "variety",
        "--storage",
        store,
        "--data",
        "partial",
        "--normalize",
        "0.4914,0.4822,0.4465",
        "0.2471,0.2435,0.2616",
    )
    assert "3 BatchNorm layers (BatchNorm2d x 1, SyncBatchNorm x 1, BatchNorm1d x 1)" in out
    run = store / "variety"
    tbn("calibrate", run, "--sigma", "0.5", *CALIBRATE)
    sets = torch.load(run / "bn_stats.pt", weights_only=True)["sets"]
    assert set(sets["sigma=0.5"]["stats"]) == {"body.1", "body.4", "body.9"}
    for layer, s in sets["sigma=0.5"]["stats"].items():
        assert not torch.equal(s["running_mean"], sets["clean"]["stats"][layer]["running_mean"]), layer
    tbn("certify", run, "--sigma", "0.5", *CERTIFY)  # SyncBatchNorm on CPU, eval mode, no process group

    from tbn_ray.store.runs import Run

    model, ckpt = Run.open(str(run)).load_model()
    assert ckpt.config.model.source.normalize == ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
    torch.manual_seed(0)
    body = bn_variety().eval()
    x = torch.rand(3, 3, 32, 32)
    mean, std = (
        torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1),
        torch.tensor([0.2471, 0.2435, 0.2616]).view(1, 3, 1, 1),
    )
    with torch.no_grad():
        assert torch.allclose(model(x), body((x - mean) / std), atol=1e-6)


def test_a_model_without_batchnorm_is_refused_for_tbn_and_certified_with_clean_statistics(store):
    weights = saved(store, "ln", layer_norm_only)
    out = tbn(
        "import",
        f"{HERE}:layer_norm_only",
        "--weights",
        weights,
        "--name",
        "ln",
        "--storage",
        store,
        "--data",
        "partial",
    )
    assert "TBN does not apply" in out
    refused = tbn("calibrate", store / "ln", "--sigma", "0.25", *CALIBRATE, fails=True)
    assert "no BatchNorm layers (GroupNorm x 1, LayerNorm x 1)" in refused and "--bn clean" in refused
    tbn("certify", store / "ln", "--sigma", "0.25", "--bn", "clean", *CERTIFY)
    assert len(list((store / "ln").rglob("certify.tsv"))) == 1
    assert "no BatchNorm" in tbn(
        "evaluate", "attack", store / "ln", "--bn", "test-batch", "--indices", "0:2", "--local", fails=True
    )

    tbn(
        "import",
        f"{HERE}:no_norm",
        "--weights",
        saved(store, "plain", no_norm),
        "--name",
        "plain",
        "--storage",
        store,
        "--data",
        "partial",
    )
    assert "no normalization layers at all" in tbn(
        "calibrate", store / "plain", "--sigma", "0.25", *CALIBRATE, fails=True
    )


def test_the_fixed_classifier_checks_apply_to_imported_models(store):
    out = tbn(
        "import",
        f"{HERE}:own_forward",
        "--weights",
        saved(store, "own", own_forward),
        "--name",
        "own",
        "--storage",
        store,
        "--data",
        "partial",
    )
    assert "certification will refuse this model" in out
    result = CliRunner().invoke(cli(), ["certify", str(store / "own"), "--sigma", "0.25", "--bn", "clean", *CERTIFY])
    assert isinstance(result.exception, SoundnessError) and "runs a forward of its own" in str(result.exception)
    dependent = tbn(
        "import",
        f"{HERE}:batch_dependent",
        "--weights",
        saved(store, "dep", batch_dependent),
        "--storage",
        store,
        fails=True,
    )
    assert "depends on the batch" in dependent
    untracked = tbn(
        "import",
        f"{HERE}:untracked_bn",
        "--weights",
        saved(store, "untracked", untracked_bn),
        "--storage",
        store,
        fails=True,
    )
    assert "keeps no running statistics" in untracked


# --- weights files ------------------------------------------------------------------------------


def test_state_dict_prefixes_and_nesting_are_handled_and_mismatches_named(store):
    from tbn_ray.store.model_import import fit_state_dict, read_state_dict

    torch.manual_seed(0)
    model = bn_variety()
    state = model.state_dict()
    for wrapped in (
        {"_orig_mod." + k: v for k, v in state.items()},
        {"state_dict": {"module.model." + k: v for k, v in state.items()}, "epoch": 3},
    ):
        torch.save(wrapped, store / "wrapped.pt")
        fitted = fit_state_dict(model, read_state_dict(store / "wrapped.pt"), "wrapped.pt", "net")
        assert fitted.keys() == state.keys() and all(torch.equal(fitted[k], state[k]) for k in state)
    bad = {k: v for k, v in state.items() if not k.startswith("0.")}
    bad["head.weight"] = torch.zeros(1)
    bad["8.weight"] = torch.zeros(16, 31)
    torch.save(bad, store / "bad.pt")
    message = tbn("import", f"{HERE}:bn_variety", "--weights", store / "bad.pt", "--storage", store, fails=True)
    assert (
        "does not fit" in message
        and "2 missing (0.bias, 0.weight)" in message
        and "1 unexpected (head.weight)" in message
    )
    assert "8.weight (file (16, 31), model (16, 32))" in message
    torch.save([1, 2], store / "list.pt")
    assert "not a state_dict" in tbn(
        "import", f"{HERE}:bn_variety", "--weights", store / "list.pt", "--storage", store, fails=True
    )
    assert "needs its weights" in tbn("import", f"{HERE}:bn_variety", "--storage", store, fails=True)
    assert "no attribute" in tbn(
        "import", f"{HERE}:nothing_here", "--weights", store / "bad.pt", "--storage", store, fails=True
    )
    assert "3 finite per-channel" in tbn(
        "import",
        f"{HERE}:bn_variety",
        "--weights",
        store / "bad.pt",
        "--normalize",
        "1,2",
        "3",
        "--storage",
        store,
        fails=True,
    )


# --- every remaining message names its origin -----------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--normalize", "0.5", "--name", "x"],
            "--normalize takes 2 values (MEAN STD); it got '0.5' and then the option --name",
        ),
        (["--normalize", "125,123,114", "63,62,66"], "outside [0, 1]: on the 0-255 scale?"),
        (["--normalize", "0.5", "1e-30"], "a std below 0.001"),
        (["--name", ""], "--name '': a run name is one folder name"),
        (["--name", "other/certify"], "--name 'other/certify': a run name is one folder name"),
    ],
    ids=["normalize-one-value", "normalize-255", "normalize-tiny-std", "empty-name", "nested-name"],
)
def test_import_flags_are_named_in_their_one_line(store, args, expected):
    weights = saved(store, "plain-msg", no_norm)
    assert expected in tbn("import", f"{HERE}:no_norm", "--weights", weights, "--storage", store, *args, fails=True)


def test_import_sources_are_named_in_their_one_line(store, tmp_path, monkeypatch):
    weights = saved(store, "plain-src", no_norm)
    assert "is a directory: give the state_dict file" in tbn(
        "import", f"{HERE}:no_norm", "--weights", store, "--storage", store, fails=True
    )
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bad_syntax.py").write_text("def f(:\n    pass\n")
    (pkg / "raises.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    syntax = tbn("import", "userpkg.bad_syntax:f", "--weights", weights, "--storage", store, fails=True)
    assert (
        "importing 'userpkg.bad_syntax'" in syntax
        and "SyntaxError" in syntax
        and "line 1" in syntax
        and "f() failed" not in syntax
    )
    raised = tbn("import", "userpkg.raises:f", "--weights", weights, "--storage", store, fails=True)
    assert "importing 'userpkg.raises'" in raised and "RuntimeError: no GPU here" in raised


@needs_robustbench
def test_an_unknown_zoo_name_says_so(store):
    out = tbn("import", "robustbench:NoSuchModel", "--storage", store, fails=True)
    assert "no model of that name in RobustBench's cifar10 zoo" in out and "listed under" not in out


def test_a_model_without_batchnorm_under_tbn_is_told_to_use_clean_statistics(store):
    tbn(
        "import",
        f"{HERE}:no_norm",
        "--weights",
        saved(store, "plain-bn", no_norm),
        "--name",
        "plain-bn",
        "--storage",
        store,
        "--data",
        "partial",
    )
    line = tbn("certify", store / "plain-bn", "--sigma", "0.25", *CERTIFY, fails=True)
    assert "has no BatchNorm layers" in line and "--bn clean" in line and "tbn-ray calibrate" not in line


def test_the_import_measures_clean_accuracy_and_names_a_wrong_normalisation(store, aa_run):
    """AutoAttack's example ResNet-18 takes [0, 1] images: imported as it is, its accuracy on the exact
    test images is recorded and high; imported with an unneeded --normalize, the import says so."""
    from tbn_ray.store.runs import Run

    measured = Run.open(str(aa_run)).load_checkpoint().meta["clean_accuracy"]
    assert measured["images"] == 300 and measured["accuracy"] >= 0.8 and "byte-exact" in measured["data"]
    out = tbn(
        "import",
        "pyautoattack.examples.resnet:ResNet18",
        "--weights",
        AA_EXAMPLES / "model_test.pt",
        "--name",
        "aa-normalized",
        "--normalize",
        "0.4914,0.4822,0.4465",
        "0.2471,0.2435,0.2616",
        "--storage",
        store,
        "--data",
        "partial",
    )
    assert "warning: clean accuracy" in out and "import it without --normalize" in out
