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


def _spinner_pids(output: str) -> list[int]:
    return [
        int(pid) for line in output.splitlines() if line.startswith("busy:") for pid in line.split("PIDs")[1].split()
    ]


def _spinning(pid: int) -> bool:
    try:
        return "while True" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def test_busy_suite_records_each_run_ends_its_spinners_and_stops_at_a_failure(tmp_path: Path) -> None:
    """The busy-core check of the suite: one row per run with pytest's summary line, its busy
    processes ended by PID after every run, and a failed run ends the series with pytest's status."""
    tests = tmp_path / "suite"
    tests.mkdir()
    (tests / "test_one.py").write_text("def test_passes():\n    assert 1 + 1 == 2\n")
    (tests / "test_two.py").write_text("def test_fails():\n    assert 1 + 1 == 3\n")
    script = str(ROOT / "bench" / "busy_suite.py")

    def busy_suite(*args: str) -> subprocess.CompletedProcess[str]:
        common = ["--spinners", "1", "--out", str(tmp_path / "out"), "--name", "smoke"]
        return subprocess.run(
            [sys.executable, script, *common, *args], cwd=tests, capture_output=True, text=True, timeout=HANG_S
        )

    passed = busy_suite("--repeat", "2", "--", "test_one.py")
    assert passed.returncode == 0, passed.stdout + passed.stderr
    rows = json.loads((tmp_path / "out" / "smoke.json").read_text())
    assert [(r["run"], r["exit"], r["spinners"]) for r in rows] == [(1, 0, 1), (2, 0, 1)]
    assert all("1 passed" in r["summary"] for r in rows), rows
    assert "| 2 |" in (tmp_path / "out" / "smoke.md").read_text()
    pids = _spinner_pids(passed.stdout)
    assert len(pids) == 2 and not any(map(_spinning, pids)), passed.stdout

    failed = busy_suite("--repeat", "3", "--", "test_two.py")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    rows = json.loads((tmp_path / "out" / "smoke.json").read_text())
    assert [(r["run"], r["exit"]) for r in rows] == [(1, 1)] and "1 failed" in rows[0]["summary"], rows
    assert not any(map(_spinning, _spinner_pids(failed.stdout)))
