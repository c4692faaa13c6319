"""Configs: one place for defaults, one-line errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from tbn_ray.config import (
    REPORT_RADII,
    AttackConfig,
    EvaluateConfig,
    ExperimentConfig,
    SweepConfig,
    load_config,
    load_reproduce_config,
    load_sweep_config,
    parse_config,
)
from tbn_ray.errors import TbnError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    if path.name.startswith("sweep"):
        assert isinstance(load_sweep_config(path), SweepConfig)
    elif path.name.startswith("paper"):
        cfg = load_reproduce_config(path)
        expected = {
            "paper.yaml": ["l2", "l2", "l2", "linf"],
            "paper-fast.yaml": ["l2", "linf"],
            "paper-cpu.yaml": [
                "l2-PGD eps 1 (2 steps)",
                "gaussian sigma 0.25",
                "gaussian sigma 0.5",
                "linf-PGD eps 0.03137 (2 steps)",
            ],
        }[path.name]
        labels = [
            cfg.train_config(m).objective_label if path.name == "paper-cpu.yaml" else cfg.train_config(m).attack.norm
            for m in cfg.models
        ]
        assert labels == expected
        if path.name == "paper-cpu.yaml":  # the baselines are certified with their own statistics at their own sigma
            assert [(cfg.certify_sigmas(m), cfg.certify_bn(m), cfg.attacked(m)) for m in cfg.models] == [
                ((0.25, 0.5), ("tbn", "clean"), True),
                ((0.25,), ("clean",), False),
                ((0.5,), ("clean",), False),
                ((0.25, 0.5), ("tbn", "clean"), True),
            ]
    else:
        assert isinstance(load_config(path), ExperimentConfig)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"certify.sigmas": [0.0]}, "certify.sigmas.0"),
        ({"certify.sigmas": [-0.25]}, "greater than 0"),
        ({"calibrate.sigmas": []}, "calibrate.sigmas"),
        ({"certify.n0": 0}, "certify.n0"),
        ({"certify.n": 0}, "certify.n"),
        ({"certify.alpha": 1.0}, "certify.alpha"),
        ({"certify.alpha": 0.0}, "certify.alpha"),
        ({"certify.bn": "test-batch"}, "frozen statistics"),
        ({"train.model.arch": "resnet9000"}, "train.model.arch"),
        ({"train.attack.eps": "eight"}, "not a number"),
        ({"train.optim.epochs": 0}, "train.optim.epochs"),
        ({"train.bogus": 1}, "train.bogus"),
        ({"evaluate.restarts": 0}, "evaluate.restarts"),
    ],
)
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(TbnError) as e:
        load_config(None, **override)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_linf_budgets_can_be_written_as_fractions_and_step_size_defaults_to_madry():
    a = AttackConfig(norm="linf", eps="8/255", steps=10)
    assert a.eps == pytest.approx(8 / 255)
    assert a.alpha == pytest.approx(2.5 * (8 / 255) / 10)


def test_wide_resnet_depth_must_be_6k_plus_4():
    with pytest.raises(TbnError, match="6k\\+4"):
        load_config(None, **{"train.model.arch": "wrn", "train.model.depth": 27})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(TbnError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(TbnError, match="not valid YAML"):
        load_config(bad)


def test_report_radii_are_cohens_grid():
    assert REPORT_RADII[0] == 0.0 and REPORT_RADII[-1] == 2.25 and len(REPORT_RADII) == 10


def test_evaluate_defaults_come_from_config_and_are_validated(tmp_path):
    """What `tbn-ray evaluate` does without flags, written out: the config's evaluate section, the
    defaults its help shows, and what a plan made from Python gets agree; a bad value is refused in
    one line that names its flag, or its key in a YAML file."""
    import re

    from typer.testing import CliRunner

    from tbn_ray.cli import app
    from tbn_ray.config import DataConfig
    from tbn_ray.jobs.evaluate_attack import plan_attack
    from tbn_ray.store.storage import Storage

    from .helpers import SHARED_DATA, tiny_run

    cfg = load_config(None).evaluate
    assert (cfg.batch_size, cfg.attack_steps, cfg.restarts, cfg.attacks, cfg.norm, cfg.eps, cfg.seed) == (
        200,
        50,
        1,
        ("pgd", "apgd-ce"),
        "l2",
        0.5,
        0,
    )
    assert (cfg.corruptions, cfg.severities, cfg.cifar10c_seed) == ("all", "1-5", 0)
    shown = CliRunner().invoke(app, ["evaluate", "attack", "--help"], terminal_width=1000).output
    for flag, default in {
        "--batch-size": "200",
        "--steps": "50",
        "--restarts": "1",
        "--attack": "pgd, apgd-ce",
        "--norm": "l2",
        "--eps": "0.5",
    }.items():
        assert re.search(rf"^  {flag} <.*\(default: {re.escape(default)}\)$", shown, re.M), (flag, shown)
    run = tiny_run(Storage.open(tmp_path / "runs"))
    plan = plan_attack(
        run, ["clean"], EvaluateConfig(), data_cfg=DataConfig(source="partial", shared_dir=str(SHARED_DATA)), stop=4
    )
    t = plan.threat
    assert (plan.batch_size, plan.attacks, t.steps, t.restarts, t.norm, t.eps, plan.seed) == (
        200,
        ("pgd", "apgd-ce"),
        50,
        1,
        "l2",
        0.5,
        0,
    )

    for flag in ("--batch-size", "--restarts"):
        result = CliRunner().invoke(app, ["evaluate", "attack", run.storage.uri, "--bn", "clean", "--local", flag, "0"])
        error = result.exception
        assert (
            isinstance(error, TbnError) and str(error) == f"{flag}: Input should be greater than or equal to 1 (got 0)"
        ), (flag, error)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("evaluate: {attack_steps: 0}\n")
    with pytest.raises(TbnError) as e:
        load_config(bad_yaml)
    assert "evaluate.attack_steps" in str(e.value) and str(bad_yaml) in str(e.value) and "\n" not in str(e.value)


def test_evaluate_section_of_an_experiment_config(tmp_path):
    path = tmp_path / "experiment.yaml"
    path.write_text("evaluate: {attack_steps: 7, attacks: [pgd]}\n")
    cfg = load_config(path, **{"evaluate.restarts": 3, "evaluate.batch_size": None}).evaluate
    assert (cfg.attack_steps, cfg.attacks, cfg.restarts, cfg.batch_size) == (
        7,
        ("pgd",),
        3,
        EvaluateConfig().batch_size,
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"calibrate.sigmas": [float("inf")]}, "--sigma: Input should be a finite number"),
        ({"certify.alpha": float("nan")}, "--alpha: Input should be a finite number"),
        ({"ray.start_timeout_s": float("inf")}, "--start-timeout: Input should be a finite number"),
        ({"evaluate.eps": "inf"}, "--eps: Input should be a finite number"),
        ({"train.optim.lr": float("inf")}, "train.optim.lr: Input should be a finite number"),
    ],
)
def test_no_field_takes_nan_or_infinity_and_errors_name_the_flag(override, message):
    flags = {
        "calibrate.sigmas": "--sigma",
        "certify.alpha": "--alpha",
        "ray.start_timeout_s": "--start-timeout",
        "evaluate.eps": "--eps",
    }
    with pytest.raises(TbnError) as e:
        load_config(None, flags=flags, **override)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_bad_sigma_is_one_error_not_two():
    with pytest.raises(TbnError) as e:
        load_config(None, flags={"certify.sigmas": "--sigma"}, **{"certify.sigmas": [-0.5]})
    assert str(e.value) == "--sigma: Input should be greater than 0 (got -0.5)"


def test_ray_placement_and_threads_are_validated_before_anything_starts():
    for field, value in (("actors", 0), ("cpus_per_actor", 0), ("gpus_per_actor", -1), ("workers", 0), ("keep", 0)):
        with pytest.raises(TbnError, match=f"ray.{field}"):
            load_config(None, **{f"ray.{field}": value})
    from tbn_ray.config import RuntimeConfig

    assert parse_config(RuntimeConfig, {"threads": "3"}, "--threads").threads == 3
    assert RuntimeConfig().threads == "auto"
    for bad in ("0", "two", 1.5):
        with pytest.raises(TbnError, match="whole number of threads"):
            parse_config(RuntimeConfig, {"threads": bad}, "--threads")


def test_certify_only_settings_are_refused_in_a_sweep(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("certify: {n: 100, shards: 8}\n")
    with pytest.raises(TbnError, match="certify.shards: settings of tbn-ray certify"):
        load_sweep_config(path)
    path.write_text("certify: {n: 100, fold_bn: true}\n")  # the base classifier's options the sweep honours
    assert load_sweep_config(path).certify.fold_bn


def test_broken_yaml_names_the_line_and_column() -> None:
    from tbn_ray.config import parse_yaml

    with pytest.raises(TbnError, match=r"configs/x.yaml is not valid YAML \(line \d+, column \d+\): "):
        parse_yaml("train:\n  optim: {epochs: 1\ncertify: [\n", "configs/x.yaml", "sections")


def test_a_sample_size_too_small_for_any_radius_says_so_without_a_negative_cap() -> None:
    from tbn_ray.reports.certify import cap_note, radius_cap

    assert radius_cap(0.25, 1, 0.001) == 0.0
    assert (
        "no radius is certifiable with n=1" in cap_note(0.25, 1, 0.001)
        and "-" not in cap_note(0.25, 1, 0.001).split("alpha=")[0]
    )
    assert radius_cap(0.25, 100_000, 0.001) == pytest.approx(0.25 * 3.8, abs=0.01)


def test_sample_size_is_one_setting_and_the_old_spelling_keeps_stored_ids() -> None:
    from tbn_ray.config import CertifyConfig

    for design in ("fixed", "sequential", "pilot"):
        new = CertifyConfig(sample_size=design)
        old = CertifyConfig(adaptive=design != "fixed", **({"adaptive_design": design} if design != "fixed" else {}))
        assert new.design == old.design == old.sample_size == design
        assert new.identity("cpu") == old.identity("cpu")  # the run id is written as before sample_size existed
    assert "sample_size" not in CertifyConfig(sample_size="sequential").identity("cpu")
    with pytest.raises(Exception, match="disagree: give sample_size only"):
        CertifyConfig(sample_size="pilot", adaptive=True)  # adaptive alone means the sequential design
    cfg = load_config(None, **{"certify.sample_size": "sequential"})
    assert cfg.certify.adaptive and cfg.certify.adaptive_design == "sequential"


def test_a_sigma_or_a_budget_no_image_survives_is_warned_of_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys
    import warnings

    from tbn_ray.config import CalibrateConfig, CertifyConfig
    from tbn_ray.errors import TbnWarning

    with pytest.warns(TbnWarning, match=r"sigma 1e\+09 .* 0-255 scale"):
        CertifyConfig(sigmas=(1e9,))
    with pytest.warns(TbnWarning, match="sigma 50"):
        CalibrateConfig(sigmas=(0.25, 50))
    with pytest.warns(TbnWarning, match="did you mean 5/255"):
        AttackConfig(norm="linf", eps=5)
    with pytest.warns(TbnWarning, match="distance between any two images"):
        AttackConfig(norm="l2", eps=60)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the values papers use pass in silence
        CertifyConfig(sigmas=(0.12, 0.25, 0.5, 1.0))
        AttackConfig(norm="linf", eps=8 / 255)
        AttackConfig(norm="l2", eps=2.0)
    # the command line prints it as one line before going on (here: to the missing run's error)
    out = subprocess.run(
        [sys.executable, "-m", "tbn_ray", "certify", str(tmp_path / "none"), "--sigma", "1e9"],
        capture_output=True,
        text=True,
    )
    lines = out.stderr.strip().splitlines()
    assert (
        out.returncode == 2
        and lines[0].startswith("tbn-ray: warning: sigma 1e+09")
        and lines[-1].startswith("tbn-ray: error:")
    ), out.stderr
    assert len(lines) == 2
