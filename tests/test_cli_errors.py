"""One line for every bad input, named where it entered (a flag, or a YAML file and key), and run
names resolved under the storage root: through the real CLI, on a stored run (no training, no Ray)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import HANG_S, SHARED_DATA
from .test_cli import TINY, tbn

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "cifar10-partial").is_dir(), reason="CIFAR-10 subset absent")

FIXTURE_RUN = Path(__file__).parent / "fixtures" / "legacy-store" / "runs" / "tiny"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A stored run (the legacy fixture's tiny model, calibrated at sigma 0.25 and 0.5), under <root>/results."""
    run = tmp_path_factory.mktemp("cli-errors") / "results" / "tiny"
    run.mkdir(parents=True)
    for name in ("checkpoint.pt", "bn_stats.pt", "config.yaml"):
        shutil.copy(FIXTURE_RUN / name, run / name)
    return run


def one_error_line(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tbn-ray: error: "), p.stderr
    return lines[0]


def test_every_bad_value_is_named_where_it_entered(trained, tmp_path):
    """A flag's bad value names the flag; a YAML file's names the file and key, never a flag that was
    not given; a value click cannot even parse is one line too, not a usage block."""
    line = one_error_line(tbn("certify", str(trained), "--local", "--sigma", "abc", cwd=tmp_path))
    assert "'--sigma'" in line and "Usage:" not in line
    (tmp_path / "epochs.yaml").write_text(TINY.replace("epochs: 1", "epochs: one"))
    line = one_error_line(tbn("train", "--config", "epochs.yaml", "--local", cwd=tmp_path))
    assert "epochs.yaml" in line and "train.optim.epochs" in line and "--epochs" not in line
    (tmp_path / "n.yaml").write_text(TINY.replace("n: 100", "n: 0"))
    line = one_error_line(tbn("certify", str(trained), "--config", "n.yaml", "--local", cwd=tmp_path))
    assert "n.yaml" in line and "certify.n:" in line and "--n:" not in line
    line = one_error_line(tbn("certify", str(trained), "--compile", "bogus", "--local", cwd=tmp_path))
    assert "--compile: unknown torch.compile backend 'bogus'" in line and "inductor" in line


def test_the_show_hint_only_where_it_helps_and_bare_run_names(trained, tmp_path):
    line = one_error_line(tbn("certify", str(trained), "--local", "--start", "5000", cwd=tmp_path))
    assert "no test images selected" in line and "tbn-ray show" not in line  # beyond the data: show cannot help
    line = one_error_line(tbn("certify", str(trained), "--local", "--sigma", "0.3", cwd=tmp_path))
    assert "tbn-ray show" in line  # missing statistics: show lists what the run has
    env_root = trained.parent  # TBN_STORAGE of tbn(): a bare run name resolves under it from any directory
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shown = subprocess.run(
        [sys.executable, "-m", "tbn_ray", "show", trained.name],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env={**os.environ, "TBN_STORAGE": str(env_root)},
        timeout=HANG_S,
    )
    assert shown.returncode == 0 and shown.stdout.startswith(f"run: {trained}"), shown.stderr
