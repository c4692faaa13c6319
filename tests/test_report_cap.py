"""The report states the largest radius certifiable at its n and alpha, from stored summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scipy.stats import norm

from tbn_ray.reports.certify import ABOVE_CAP, accuracy_table, load_summaries, radius_cap, write_report
from tbn_ray.science.smoothing import lower_confidence_bound

from .test_report import results_dir  # noqa: F401  (real summaries at sigma 0.25 and 0.5, n=300)


@pytest.mark.parametrize(("n", "factor"), [(2_000, 2.70), (100_000, 3.81)])
def test_cap_is_the_radius_of_a_unanimous_vote(n, factor):
    assert radius_cap(1.0, n, 0.001) == pytest.approx(factor, abs=0.01)
    assert radius_cap(0.5, n, 0.001) == pytest.approx(0.5 * norm.ppf(lower_confidence_bound(n, n, 0.001)), rel=1e-9)


def test_report_table_plot_and_json_state_the_cap(results_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    summaries = load_summaries(results_dir)
    paths = write_report(summaries, tmp_path, title=f"Certification of {results_dir} (x)")
    report = json.loads(Path(paths["report.json"]).read_text())
    md = Path(paths["report.md"]).read_text()
    for row in report["rows"]:
        cap = radius_cap(row["sigma"], row["n"], row["alpha"])
        assert row["radius_cap"] == pytest.approx(cap)
        above = [r for r in row["certified_accuracy"] if float(r) > cap]
        assert above and all(row["certified_accuracy"][r] == 0 for r in above)  # nothing is certified past the cap
        assert f"| {cap:.2f} |" in md
    assert ABOVE_CAP in md and "max r" in md
    assert all(
        ref["radius_cap"] == pytest.approx(radius_cap(ref["sigma"], 100_000, 0.001)) for ref in report["reference"]
    )
    assert "Cohen et al. 2019, published (sigma=0.25" in md and "envelope: best sigma per radius" in md
    table = accuracy_table(summaries)
    assert "max r" in table and f"0.0{ABOVE_CAP}" in table
