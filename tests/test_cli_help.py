"""The command line explains itself: every command's help, every option described, defaults from tbn_ray.config."""

from __future__ import annotations

import os
import subprocess
import sys
import typing

import pytest
import typer.main

import tbn_ray
from tbn_ray.cli import app
from tbn_ray.cli_options import field_help
from tbn_ray.config import (
    CalibrateConfig,
    CertifyConfig,
    EvaluateConfig,
    NoiseTrainingConfig,
    OptimConfig,
    RayConfig,
    TrainConfig,
)

from .helpers import HANG_S


def commands(group, path: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    """(path, command) for every command and group below ``group``, the group itself first.
    Duck-typed: some typer versions ship their own copy of click."""
    yield path, group
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


ROOT = typer.main.get_command(app)
ALL = list(commands(ROOT))


def tbn(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "tbn_ray", *args], env=env, capture_output=True, text=True, timeout=HANG_S
    )


@pytest.mark.parametrize(("path", "cmd"), ALL, ids=[" ".join(p) or "tbn-ray" for p, _ in ALL])
def test_every_option_is_described_with_its_default(path, cmd):
    with cmd.make_context("tbn-ray", [], resilient_parsing=True) as ctx:
        text = cmd.get_help(ctx)
    assert "<bool>" not in text and "{" not in text.splitlines()[0], text  # switches are switches; RUN, not {run}
    for param in cmd.params:
        if param.name == "help":
            continue
        assert param.help, f"{' '.join(path)} {param.opts}: no help"
        if param.param_type_name == "option" and not param.is_flag and not param.required:
            assert "(default: " in param.help or "(required" in param.help, (
                f"{' '.join(path)} {param.opts}: no default in {param.help!r}"
            )
        if param.param_type_name == "argument":
            assert (param.metavar or "").isupper(), param.name


@pytest.mark.parametrize(
    ("path", "flag", "shown"),
    [
        (("certify",), "--skip", "(default: 1)"),
        (("certify",), "--sigma", "(default: 0.25)"),
        (("certify",), "--n", "(default: 100000)"),
        (("certify",), "--shards", "(default: 64, at most one per image)"),
        (("certify",), "--amp", "off | bf16 | fp16 (default: off)"),
        (("certify",), "--fold-bn", "(default: off)"),
        (("certify",), "--compile", "(default: none)"),
        (("train",), "--keep", "(default: 3)"),
        (("train",), "--max-failures", "(default: 3)"),
        (("evaluate", "attack"), "--eps", "(default: 0.5)"),
        (("evaluate", "attack"), "--norm", "(default: l2)"),
        (("evaluate", "corruptions"), "--severities", "(default: 1-5)"),
    ],
)
def test_defaults_shown_are_the_documented_ones(path, flag, shown):
    """The defaults a user reads in the help, written out here: a changed default or a help text
    that stops showing it fails, and the flag itself defers to the config."""
    cmd = dict(ALL)[path]
    param = next(p for p in cmd.params if flag in p.opts)
    assert param.help.endswith(shown), param.help
    assert param.default in (None, False)


def test_a_certify_flag_and_its_yaml_key_set_the_same_field(tmp_path):
    """Every CertifyConfig field is a flag of the same name: setting it either way gives one config."""
    from tbn_ray.cli_options import load_flags

    (tmp_path / "c.yaml").write_text("certify: {images_per_pass: 3, fold_bn: true}\n")
    from_yaml = load_flags(tmp_path / "c.yaml", {}).certify
    cmd = dict(ALL)[("certify",)]
    opts = {o for p in cmd.params for o in p.opts}
    assert {"--images-per-pass", "--fold-bn", "--n0", "--cudnn-autotune", "--adaptive"} <= opts
    from_flags = load_flags(
        None, {"--images-per-pass": ("certify.images_per_pass", 3), "--fold-bn": ("certify.fold_bn", True)}
    ).certify
    assert from_yaml == from_flags and from_yaml.identity("cpu") != CertifyConfig().identity("cpu")


@pytest.mark.parametrize(
    ("path", "flag", "model", "field"),
    [
        (("train",), "--name", TrainConfig, "name"),
        (("train",), "--epochs", OptimConfig, "epochs"),
        (("train",), "--objective", TrainConfig, "objective"),
        (("train",), "--noise-sigma", NoiseTrainingConfig, "sigma"),
        (("train",), "--start-timeout", RayConfig, "start_timeout_s"),
        (("train",), "--workers", RayConfig, "workers"),
        (("calibrate",), "--sigma", CalibrateConfig, "sigmas"),
        (("calibrate",), "--samples", CalibrateConfig, "samples"),
        (("evaluate", "attack"), "--eps", EvaluateConfig, "eps"),
        (("evaluate", "attack"), "--steps", EvaluateConfig, "attack_steps"),
        (("evaluate", "attack"), "--step-size", EvaluateConfig, "step_size"),
        (("evaluate", "corruptions"), "--batch-size", EvaluateConfig, "batch_size"),
        (("evaluate", "corruptions"), "--seed", EvaluateConfig, "cifar10c_seed"),
        (("data", "cifar10c"), "--severities", EvaluateConfig, "severities"),
        (("certify",), "--n0", CertifyConfig, "n0"),
        (("certify",), "--actors", RayConfig, "actors"),
    ],
)
def test_a_flag_is_described_by_its_config_field(path, flag, model, field):
    """Each command's settings are flags made from their config fields: the help is the field's own
    description and default, and nothing in the command restates them."""
    cmd = dict(ALL)[path]
    param = next(p for p in cmd.params if flag in p.opts)
    repeated = typing.get_origin(model.model_fields[field].annotation) is tuple
    assert param.help == field_help(model, field, repeated=repeated)
    assert param.default is None and model.model_fields[field].description


def test_a_budget_flag_takes_a_fraction_as_the_config_does(tmp_path):
    """``--eps 8/255`` reaches the config (a Number field's flag takes text); a bad budget is refused
    in one line that names the flag."""
    from typer.testing import CliRunner

    missing = str(tmp_path / "no-run")
    ok = CliRunner().invoke(
        app, ["evaluate", "attack", missing, "--bn", "clean", "--local", "--norm", "linf", "--eps", "8/255"]
    )
    assert "no checkpoint" in str(ok.exception), ok.exception  # past the config, at the run
    bad = CliRunner().invoke(app, ["evaluate", "attack", missing, "--bn", "clean", "--local", "--eps", "1/0"])
    assert str(bad.exception).startswith("--eps: ") and "not a number: '1/0'" in str(bad.exception), bad.exception


def test_help_version_and_bare_commands():
    bare = tbn()
    assert bare.returncode == 0 and "Usage: tbn-ray" in bare.stdout and "show" in bare.stdout
    assert tbn("--version").stdout.strip() == f"tbn-ray {tbn_ray.__version__}"
    short = tbn("certify", "-h")
    assert short.returncode == 0 and "Usage: tbn-ray certify [OPTIONS] RUN" in short.stdout
    assert tbn("evaluate").returncode == 0
    quick = tbn("quickstart", "--help").stdout
    assert "./tbn-results" in quick and "TBN_STORAGE" in quick
