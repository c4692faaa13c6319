"""The benchmarks whose figures the docs quote still run against the code as it is (tiny sizes):
a benchmark that no longer starts is found here, not on the day its figures are needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .helpers import HANG_S

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, out: Path) -> dict:
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args, "--out", str(out), "--name", "smoke"],
        check=True,
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    return json.loads((out / "smoke.json").read_text())


def test_adaptive_sampling_benchmark_runs_and_compares_the_designs(tmp_path: Path) -> None:
    report = _run("adaptive_sampling.py", "cohen:1.0", "--repeats", "2", "--n", "20000", out=tmp_path)
    modes = report["sigmas"][0]["modes"]
    assert set(modes) == {"fixed", "pilot", "sequential", "sequential-every"}
    assert modes["fixed"]["passes_per_image"][0] == 100 + 20000
    # skipping wrong guesses costs no certified accuracy and saves draws on this population (57% wrong)
    assert modes["sequential"]["passes_ratio"] > 1.5 * modes["sequential-every"]["passes_ratio"] > 1.5
    assert (
        report["sequential"]["skip_misclassified"] is True
        and (tmp_path / "smoke.md").read_text().count("sequential-every") >= 2
    )


def test_sequential_throughput_benchmark_runs_on_a_real_model(tmp_path: Path) -> None:
    report = _run("sequential_throughput.py", "--images", "4", "--n", "600", "--images-per-pass", "1,4", out=tmp_path)
    rows = {(r["mode"], r["images_per_pass"]): r for r in report["rows"]}
    assert set(rows) == {("fixed", 1), ("sequential", 1), ("fixed", 4), ("sequential", 4)}
    assert all(rows[("sequential", p)]["rows"] < rows[("fixed", p)]["rows"] for p in (1, 4))
