"""Configs: one place for defaults, one-line errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from tbn_ray.config import REPORT_RADII, AttackConfig, EvaluateConfig, ExperimentConfig, SweepConfig, load_config, load_sweep_config, parse_config
from tbn_ray.errors import TbnError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    if path.name.startswith("sweep"):
        assert isinstance(load_sweep_config(path), SweepConfig)
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


def test_evaluate_defaults_come_from_config_and_are_validated():
    from tbn_ray.jobs import evaluate as evaluation

    cfg = EvaluateConfig()
    assert (evaluation.DEFAULT_BATCH_SIZE, evaluation.DEFAULT_ATTACK_STEPS, evaluation.ATTACKS) == (cfg.batch_size, cfg.attack_steps, cfg.attacks)
    with pytest.raises(TbnError, match="batch_size"):
        parse_config(EvaluateConfig, {"batch_size": 0}, "evaluate flags")


def test_evaluate_section_of_an_experiment_config(tmp_path):
    path = tmp_path / "experiment.yaml"
    path.write_text("evaluate: {attack_steps: 7, attacks: [pgd]}\n")
    cfg = load_config(path, **{"evaluate.restarts": 3, "evaluate.batch_size": None}).evaluate
    assert (cfg.attack_steps, cfg.attacks, cfg.restarts, cfg.batch_size) == (7, ("pgd",), 3, EvaluateConfig().batch_size)
