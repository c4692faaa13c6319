"""SIGTERM to a running ``tbn-ray certify``: one line, exit status 143, finished shards kept and
reused by the same command again (a real process, through the console entry point). On Ray the
driver's SIGTERM went to Ray's native handler: a stack dump and exit status 134."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tbn_ray.cli import app
from tbn_ray.store.storage import Storage

from .helpers import tiny_run

ENTRY = [sys.executable, "-c", "from tbn_ray.cli import main; main()"]


def _certify(run_uri: str, output: Path, where: list[str]) -> list[str]:
    # 8 shards of one image, each 1000 noisy copies: a few seconds of work in all
    small = ["--n0", "10", "--n", "1000", "--batch-size", "500", "--max-images", "8", "--shards", "8"]
    return ["certify", run_uri, *where, "--sigma", "0.25", *small, "--no-progress", "--output", str(output)]


def _shards(output: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in output.glob("*/sigma=0.25/shard-*.parquet")}


@pytest.mark.parametrize(
    "where",
    [
        pytest.param(["--local"], id="local"),
        pytest.param(["--actors", "2", "--cpus-per-actor", "1"], id="ray", marks=pytest.mark.ray),
    ],
)
def test_sigterm_stops_certify_cleanly_and_the_rerun_reuses_its_shards(tmp_path: Path, where: list[str]) -> None:
    run = tiny_run(Storage.open(tmp_path))
    output = tmp_path / "certify"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "OMP_NUM_THREADS": "1"
    }  # Ray: a local instance of its own
    proc = subprocess.Popen(
        [*ENTRY, *_certify(run.uri, output, where)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    deadline = time.monotonic() + 300
    while not _shards(output) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 143, (proc.returncode, stderr[-2000:])
    assert lines == ["tbn-ray: stopped by SIGTERM; finished work is kept: run the same command again to resume"], stderr
    kept = _shards(output)
    assert 1 <= len(kept) < 8, stdout
    if where == ["--local"]:  # a shard being written when the signal came left nothing behind (actors are killed)
        assert not list(output.rglob("*.tbn-tmp"))

    again = CliRunner().invoke(
        app, _certify(run.uri, output, ["--local"])
    )  # in this process; Ray's shards are the same
    assert again.exit_code == 0, again.output
    assert f"{8 - len(kept)} shard(s) certified now, {len(kept)} reused" in again.output
    after = _shards(output)
    assert len(after) == 8 and all(after[name] == data for name, data in kept.items())  # kept shards untouched
