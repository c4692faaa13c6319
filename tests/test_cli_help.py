"""The command line explains itself: every command's help, every option described, defaults from tbn_ray.config."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer.main

import tbn_ray
from tbn_ray.cli import app
from tbn_ray.config import CertifyConfig, EvaluateConfig, RayConfig, shown_default


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
    return subprocess.run([sys.executable, "-m", "tbn_ray", *args], env=env, capture_output=True, text=True, timeout=120)


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
            assert "(default: " in param.help or "(required" in param.help, f"{' '.join(path)} {param.opts}: no default in {param.help!r}"
        if param.param_type_name == "argument":
            assert (param.metavar or "").isupper(), param.name


@pytest.mark.parametrize(
    ("path", "flag", "model", "field"),
    [
        (("certify",), "--skip", CertifyConfig, "skip"),
        (("certify",), "--sigma", CertifyConfig, "sigmas"),
        (("certify",), "--shards", CertifyConfig, "shards"),
        (("certify",), "--amp", CertifyConfig, "amp"),
        (("certify",), "--fold-bn", CertifyConfig, "fold_bn"),
        (("train",), "--keep", RayConfig, "keep"),
        (("train",), "--max-failures", RayConfig, "max_failures"),
        (("evaluate", "attack"), "--eps", EvaluateConfig, "eps"),
        (("evaluate", "attack"), "--norm", EvaluateConfig, "norm"),
        (("evaluate", "corruptions"), "--severities", EvaluateConfig, "severities"),
    ],
)
def test_defaults_shown_are_the_configs(path, flag, model, field):
    cmd = dict(ALL)[path]
    param = next(p for p in cmd.params if flag in p.opts)
    assert param.help.endswith(f"(default: {shown_default(model, field)})")
    assert param.default in (None, False)  # the flag itself defers to the config


def test_help_version_and_bare_commands():
    bare = tbn()
    assert bare.returncode == 0 and "Usage: tbn-ray" in bare.stdout and "show" in bare.stdout
    assert tbn("--version").stdout.strip() == f"tbn-ray {tbn_ray.__version__}"
    short = tbn("certify", "-h")
    assert short.returncode == 0 and "Usage: tbn-ray certify [OPTIONS] RUN" in short.stdout
    assert tbn("evaluate").returncode == 0
    quick = tbn("quickstart", "--help").stdout
    assert "./tbn-results" in quick and "TBN_STORAGE" in quick
