"""Report: Markdown table and PNG from real certification summaries at two sigmas."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tbn_ray.config import REPORT_RADII
from tbn_ray.errors import TbnError
from tbn_ray.reports.certify import ENVELOPE_LABEL, load_summaries, write_report
from tbn_ray.science.smoothing import summarize
from tbn_ray.store.results import read_results, write_results
from tbn_ray.store.storage import Storage

from .helpers import SHARED_DATA, certify_with, partial_test_images

PARTIAL = SHARED_DATA / "cifar10-partial"
SIGMAS = (0.25, 0.5)


def nearest_class_mean(train_images: np.ndarray, train_labels: np.ndarray) -> nn.Module:
    """A fixed linear classifier: logits_c = x.mu_c - |mu_c|^2 / 2 (about 3x chance on CIFAR-10)."""
    x = torch.from_numpy(train_images).permute(0, 3, 1, 2).flatten(1).double() / 255
    means = torch.stack([x[torch.from_numpy(train_labels == c)].mean(0) for c in range(10)])
    linear = nn.Linear(3072, 10)
    with torch.no_grad():
        linear.weight.copy_(means)
        linear.bias.copy_(-0.5 * (means**2).sum(1))
    return nn.Sequential(nn.Flatten(), linear)


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images, labels = partial_test_images(40)
    with np.load(PARTIAL / "cifar10_train_prefix.npz") as train:
        model = nearest_class_mean(train["images"], train["labels"])
    out = tmp_path_factory.mktemp("results")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: intra-op threads only contend
    for sigma in SIGMAS:
        params = dict(
            sigma=sigma,
            n0=20,
            n=300,
            alpha=0.001,
            seed=0,
            batch_size=320,
            bn="clean",
            model="nearest class mean (linear)",
            data_source="CIFAR-10 test, exact subset (cifar10-partial)",
        )
        sampling = {k: params[k] for k in ("sigma", "n0", "n", "alpha", "seed", "batch_size")}
        records = certify_with(model, images, labels, range(40), **sampling, device="cpu")
        write_results(records, summarize(records), out / "certify" / f"sigma={sigma}", params)
    torch.set_num_threads(threads)
    return out


def test_load_summaries_finds_every_sigma(results_dir: Path) -> None:
    summaries = load_summaries(results_dir)
    assert sorted(s["params"]["sigma"] for s in summaries) == list(SIGMAS)
    assert all(s["images"] == 40 for s in summaries)
    with pytest.raises(TbnError, match="no summary.json"):
        load_summaries(results_dir / "certify" / "nowhere")


def test_report_table_plot_and_envelope(results_dir: Path, tmp_path: Path) -> None:
    summaries = load_summaries(results_dir)
    paths = write_report(summaries, tmp_path / "report", title="test report")

    png = Path(paths["certified_accuracy.png"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000

    md = Path(paths["report.md"]).read_text()
    header = next(line for line in md.splitlines() if line.startswith("| "))
    for column in ("model", "data source", "BN mode", "n0", "n", "alpha", "images", "ACR"):
        assert f"| {column} |" in header
    for r in REPORT_RADII:
        assert f"r={r}" in header
    assert "Cohen et al. 2019, published" in md and "| 80.4 | 66.8 | 50.5 | 32.7 |" in md and "0.571" in md
    assert ENVELOPE_LABEL in md and "nearest class mean (linear)" in md

    report = json.loads(Path(paths["report.json"]).read_text())
    curves = [row["certified_accuracy"] for row in report["rows"]]
    assert len(curves) == 2 and curves[0] != curves[1]
    (envelope,) = report["envelopes"]
    assert envelope["label"] == ENVELOPE_LABEL
    for r, best in envelope["certified_accuracy"].items():
        assert all(best >= c[r] for c in curves)
        assert best == max(c[r] for c in curves)
        assert curves[SIGMAS.index(envelope["best_sigma"][r])][r] == best
    assert max(envelope["certified_accuracy"].values()) > 0  # the model certifies something
    assert [ref["sigma"] for ref in report["reference"]] == [0.25, 0.5]


def test_a_report_says_how_many_wrong_guesses_were_not_sampled(results_dir: Path, tmp_path: Path) -> None:
    """Images the sequential design left unsampled are named beside abstain %, which leaves them out."""
    low, high = sorted(load_summaries(results_dir), key=lambda s: s["params"]["sigma"])
    paths = write_report([{**low, "misclassified_unsampled": 0.25}, high], tmp_path)
    md = Path(paths["report.md"]).read_text()
    assert md.count("were not sampled past the selection draws") == 1 and "sigma=0.25: 25.0% of the images" in md
    rows = json.loads(Path(paths["report.json"]).read_text())["rows"]
    assert [r.get("misclassified_unsampled") for r in rows] == [0.25, None]


def test_envelope_only_across_sigma(results_dir: Path, tmp_path: Path) -> None:
    """An envelope may only pick sigma, never mix models, runs or BN statistics."""
    low, high = sorted(load_summaries(results_dir), key=lambda s: s["params"]["sigma"])

    def envelopes(*changes: dict) -> list[dict]:
        summaries = [{**s, "params": {**s["params"], **c}} for s, c in zip((low, high), changes)]
        return json.loads(Path(write_report(summaries, tmp_path)["report.json"]).read_text())["envelopes"]

    # TBN statistics are named per sigma (tbn.bn_key): still one setup
    (tbn,) = envelopes({"bn": "sigma=0.25"}, {"bn": "sigma=0.5"})
    assert tbn["bn"] == "tbn"
    assert envelopes({"bn": "clean"}, {"bn": "sigma=0.5"}) == []
    assert envelopes({"run": "runs/a"}, {"run": "runs/b"}) == []
    assert envelopes({"model": "resnet20"}, {"model": "resnet110"}) == []
    with pytest.raises(TbnError):
        write_report([], tmp_path)


def test_results_and_report_on_s3(results_dir: Path, s3_bucket: str) -> None:
    """The same files through the project's storage layer, on a real (local) S3 server."""
    local = results_dir / "certify" / "sigma=0.25"
    records, summary = read_results(local)
    params = summary.pop("params")
    store = Storage.open(f"{s3_bucket}/certify")
    uris = write_results(records, summary, store.child("sigma=0.25"), params)
    assert uris["summary.json"] == f"{s3_bucket}/certify/sigma=0.25/summary.json"
    assert store.read_bytes("sigma=0.25/certify.tsv") == (local / "certify.tsv").read_bytes()
    assert read_results(store.child("sigma=0.25")) == (records, {**summary, "params": params})
    (loaded,) = load_summaries(store)
    assert loaded["location"] == uris["summary.json"]
    write_report([loaded], store)
    assert store.read_bytes("certified_accuracy.png")[:4] == b"\x89PNG"
    assert "| r=2.25 |" in store.read_text("report.md")
