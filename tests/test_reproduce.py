"""tbn-ray reproduce at tiny scale: the whole grid end to end, stage by stage (as after a kill
between stages), a re-run that computes nothing, and a report whose claim tables are read
from the stored results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tbn_ray.config import load_reproduce_config
from tbn_ray.errors import TbnError
from tbn_ray.jobs.reproduce import reproduce
from tbn_ray.store.reproduction import Reproduction
from tbn_ray.store.storage import Storage

from .helpers import HANG_S

TINY = {
    "name": "tiny",
    "device": "cpu",
    "train": {
        "data": {"source": "partial", "train_limit": 256},
        "model": {"arch": "tiny"},
        "optim": {"epochs": 1, "batch_size": 64},
        "eval": {"images": 32},
    },
    "models": [
        {"name": "l2", "train": {"attack": {"norm": "l2", "eps": 0.5, "steps": 2}}},
        {"name": "linf", "train": {"attack": {"norm": "linf", "eps": "8/255", "steps": 2}}},
        {"name": "g", "train": {"objective": "gaussian", "noise": {"sigma": 0.25}}, "sigmas": [0.25]},
    ],
    "calibrate": {"sigmas": [0.25], "samples": 256, "batch_size": 128},
    "certify": {"sigmas": [0.25], "n0": 10, "n": 60, "skip": 1, "max_images": 4, "batch_size": 60, "shards": 2},
    "noise": {"images": 32, "draws": 1},
    "evaluate": {"batch_size": 16, "attack_steps": 2, "restarts": 1, "attacks": ["pgd", "autoattack"]},
    "robustness": {
        "corruptions": "gaussian_noise",
        "severities": "1",
        "corruption_modes": ["clean", "test-batch"],
        "corruption_images": 32,
        "attack_images": 16,
        "autoattack_images": 8,
    },
    "keep_optimizer": False,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("reproduce")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    return config, root / "results"


def _mtimes(folder: Path, pattern: str) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob(pattern)}


def test_stages_run_in_order_resume_and_report_from_stored_results(tiny: tuple[Path, Path]) -> None:
    config, results = tiny
    cfg = load_reproduce_config(config)
    storage = Storage.open(results)
    reproduce(cfg, storage, stages=["train"], progress=False)
    rep = Reproduction.open(cfg, storage)
    assert {s.name for s in cfg.models if rep.record(s, "train")} == {"l2", "linf", "g"}
    for spec in cfg.models:  # weights only: the finished checkpoints are small enough to commit
        ckpt = rep.run(spec).load_checkpoint()
        assert ckpt.optimizer is None and ckpt.scheduler is None and ckpt.epoch == 1
    assert rep.run(cfg.models[2]).load_checkpoint().config.objective == "gaussian"
    # the records name the results relative to the reproduction, so a copy elsewhere finds them
    raw = json.loads((Path(rep.root.uri) / "stages" / "l2" / "train.json").read_text())
    assert raw["run"] == "./l2" and rep.record(cfg.models[0], "train")["run"] == rep.run(cfg.models[0]).uri
    with pytest.raises(TbnError, match="needs stage calibrate first"):
        reproduce(cfg, storage, stages=["certify"], progress=False)

    files = reproduce(cfg, storage, progress=False)  # the rest, after a stop between stages
    report = json.loads(Path(files["report.json"]).read_text())
    for name in ("l2", "linf"):
        m = report["models"][name]
        assert m["training"]["epochs"] == 1
        assert set(m["certify"]) == {"tbn", "clean"}
        stored = json.loads(
            (Path(rep.run(next(s for s in cfg.models if s.name == name)).uri))
            .joinpath("noise_accuracy.json")
            .read_text()
        )
        assert m["noise"]["rows"] == stored["rows"]
        assert set(m["corruptions"]["modes"]) == {"clean", "test-batch-b16"}
        assert m["attack"]["modes"]["clean"]["variants"]["standard"]["images"] == 16
        assert m["attack"]["attack"]["attacks"] == ["pgd"]
        assert m["autoattack"]["modes"]["clean"]["variants"]["standard"]["images"] == 8  # AutoAttack on its own count
        assert all(v > 0 for v in m["seconds"].values())
    g = report["models"]["g"]  # the baseline: its own statistics, at its own sigma, not attacked
    assert set(g["certify"]) == {"clean"} and set(g["certify"]["clean"]) == {"0.25"}
    assert "attack" not in g and "autoattack" not in g and g["training"]["noise_trained"]
    assert [c["claim"] for c in report["claims"]] == ["a", "b", "c", "d", "e"]
    assert {c["verdict"] for c in report["claims"]} <= {
        "holds",
        "does not hold",
        "not measured",
        "reported (context, no target)",
    }
    assert len(report["claims"][1]["checks"]) == 2  # l2 vs g at r = 0.25 and 0.5
    md = Path(files["report.md"]).read_text()
    for heading in ("## Certified accuracy, side by side", "## Verdicts", "(a)", "(b)", "(c)", "(d)", "(e)", "## Cost"):
        assert heading in md
    assert "| radius | l2 TBN | l2 clean BN | linf TBN | linf clean BN | g own BN |" in md
    assert "SmoothAdv (Salman et al. 2019), published" in md and "| linf |" in md

    # a second full run computes nothing: checkpoints, shards and evaluation items are reused
    kept = ("checkpoint.pt", "shard-*.parquet", "bn_stats.pt", "stages/*/*.json")
    before = {k: v for pattern in kept for k, v in _mtimes(results, pattern).items()}
    reproduce(cfg, storage, progress=False)
    after = {k: v for pattern in kept for k, v in _mtimes(results, pattern).items()}
    assert (
        before == after and len(before) == 2 * (1 + 1 + 2 * 2) + (1 + 1 + 2) + 3 * 4
    )  # stage records keep their wall times

    # the claim tables are read from the stored results: change one stored summary, rebuild the report
    l2 = report["models"]["l2"]["certify"]["tbn"]["0.25"]
    summary_path = Path(rep.run(cfg.models[0]).uri) / "certify" / l2["params"]["run_id"] / "sigma=0.25" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["acr"] = 0.987654
    summary_path.write_text(json.dumps(summary))
    reproduce(cfg, storage, stages=["report"], progress=False)
    assert "0.988" in Path(files["report.md"]).read_text()


def test_cli_reproduce_report_stage_and_bad_config(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    config, results = tiny
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "models": [{"name": "a"}, {"name": "a"}]}))
    out = subprocess.run(
        [sys.executable, "-m", "tbn_ray", "reproduce", "--config", str(bad), "--storage", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    assert out.returncode == 2 and "model names must be unique" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tbn_ray",
            "reproduce",
            "--config",
            str(config),
            "--storage",
            str(tmp_path / "empty"),
            "--stage",
            "report",
        ],
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    assert out.returncode == 2 and "stage train has not finished" in out.stderr, out.stderr[-1500:]


def test_the_certify_section_of_the_config_is_what_is_certified(tiny: tuple[Path, Path]) -> None:
    """certify: {fold_bn: true, images_per_pass: 2} in the reproduction's YAML makes another base
    classifier: another run id, and the stored parameters say so (nothing of the section is dropped)."""
    from tbn_ray.jobs.reproduce import certify_stage

    config, results = tiny
    cfg = load_reproduce_config(config)
    storage = Storage.open(results)
    reproduce(cfg, storage, stages=["train", "calibrate"], progress=False)
    raw = yaml.safe_load(config.read_text())
    raw["certify"] = {**raw["certify"], "fold_bn": True, "images_per_pass": 2}
    raw["certify_clean"] = False
    tuned_path = config.with_name("tuned.yaml")
    tuned_path.write_text(yaml.safe_dump(raw))
    tuned = load_reproduce_config(tuned_path)
    spec = cfg.models[0]
    plain = certify_stage(Reproduction.open(cfg, storage), spec, progress=False)["certify"]["tbn"]["0.25"]
    fast = certify_stage(Reproduction.open(tuned, storage), spec, progress=False)["certify"]["tbn"]["0.25"]
    assert plain != fast  # another run id, so another folder
    params = json.loads(Path(fast, "summary.json").read_text())["params"]
    assert params["fold_bn"] is True and params["images_per_pass"] == 2
    assert json.loads(Path(plain, "summary.json").read_text())["params"]["fold_bn"] is False


def test_the_quickstart_certifies_what_its_config_says(tmp_path: Path) -> None:
    from tbn_ray.jobs.pipeline import quickstart_run

    quick = {
        "train": {**TINY["train"], "name": "quick"},
        "calibrate": TINY["calibrate"],
        "certify": {**TINY["certify"], "fold_bn": True, "images_per_pass": 2},
    }
    config = tmp_path / "quick.yaml"
    config.write_text(yaml.safe_dump(quick))
    out = quickstart_run(config, Storage.open(tmp_path / "results"))
    (summary,) = out["certify"]
    assert summary["fold_bn"] is True and summary["images_per_pass"] == 2 and summary["n"] == TINY["certify"]["n"]
