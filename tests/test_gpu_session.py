"""The CPU rehearsal of bench/gpu_session.py: every stage's code path on the tiny config, in two
calls with the scratch folder wiped between them (as a GPU machine is given back), so the second
call must resume from the results folder alone; a budget too small for any stage; the Ray
trimming recipe on a small synthetic wheel."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import free_port

from .helpers import HANG_S

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_session.py"
sys.path.insert(0, str(REPO / "bench"))


#: The script's own budget: on a machine busy enough to overrun it, the script stops its commands
#: cleanly (the test's timeout would kill the script alone and leave them running).
BUDGET_S = 1200


def _session(*args: str | Path, timeout: float = BUDGET_S + 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TBN_CACHE", "RAY_ADDRESS")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--budget", str(BUDGET_S), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO,
    )


@contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock`` (created if absent) for the block."""
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> dict[str, object]:
    """The two calls, made once per test run: the xdist workers that get a test of this file share
    them (the first builds them under a lock, the others wait and read), since they cost minutes."""
    pytest.importorskip("ray", reason="the Ray stage needs Ray")
    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    root = shared / "gpu-session-rehearsal"
    with _exclusive(shared / "gpu-session-rehearsal.lock"):
        outputs = root / "outputs.json"
        if not outputs.exists():
            shutil.rmtree(root, ignore_errors=True)
            t0 = time.monotonic()
            results, work, none = root / "results", root / "work", root / "no-carry"
            first = _session(
                "--stages",
                "engine,reproduce-l2_eps1.0",
                "--results",
                results,
                "--work",
                work,
                "--carry",
                none,
                "--pack",
                root / "out1",
            )
            assert first.returncode == 0, first.stdout + first.stderr
            shutil.rmtree(work)  # the machine is given back: only the results folder survives
            second = _session("--results", results, "--work", work, "--carry", none, "--pack", root / "out2")
            assert second.returncode == 0, second.stdout + second.stderr
            outputs.write_text(
                json.dumps({"first": first.stdout, "second": second.stdout, "seconds": time.monotonic() - t0})
            )
    calls = json.loads(outputs.read_text())
    return {"root": root, "results": root / "results", **calls}


def test_first_call_runs_only_its_stages(rehearsal: dict[str, object]) -> None:
    assert (rehearsal["root"] / "out1" / "gpu-results.tar.gz").is_file()  # type: ignore[operator]
    # the second call's summary: what the first did is "done earlier", the rest done now
    status = json.loads((rehearsal["results"] / "summary.json").read_text())["status"]  # type: ignore[operator]
    assert status == {
        "engine": "done earlier",
        "engine-tuned": "done",
        "reproduce-l2_eps1.0": "done earlier",
        "reproduce-linf_8": "done",
        "report": "done",
        "ray": "done",
    }
    first = rehearsal["first"]
    assert "| engine | done |" in first and "| reproduce-l2_eps1.0 | done |" in first
    assert "reproduce-linf_8" not in first  # not asked for in that call
    assert "restored into" in rehearsal["second"]  # type: ignore[operator]


def test_engine_table_has_the_reference_loop_and_engine_rows(rehearsal: dict[str, object]) -> None:
    report = json.loads((rehearsal["results"] / "engine" / "certify_throughput.json").read_text())  # type: ignore[operator]
    assert report["cpu"]["semantics_check"] == {"images": 2, "identical_counts_predictions_radii": 2}
    assert report["cpu"]["rows"][0]["config"].startswith("baseline (reference style")
    rows = {r["config"]: r for r in report["engine"]["rows"]}
    fixed = rows["fixed n, one image at a time"]
    assert fixed["forward_passes_per_image"] == 10 + 100  # n0 + n
    assert any(name.startswith("adaptive") for name in rows)
    assert all(r["seconds_per_image"] > 0 for r in rows.values())
    summary = (rehearsal["results"] / "summary.md").read_text()  # type: ignore[operator]
    assert "| engine | fixed n, one image at a time |" in summary
    tuned = json.loads((rehearsal["results"] / "engine-tuned" / "certify_throughput.json").read_text())["tuned"]  # type: ignore[operator]
    names = [r["config"] for r in tuned["rows"]]
    assert len(names) == 3 and "torch.compile (eager)" in names[1] and "sequential" in names[2]
    assert [r["forward_passes_per_image"] for r in tuned["rows"][:2]] == [110, 110]
    assert len({r["run_id"] for r in tuned["rows"]}) == 3 and all(r["images"] == 2 for r in tuned["rows"])
    assert "| tuned | tuned fixed n" in summary


def test_reproduction_report_reads_both_models_across_calls(rehearsal: dict[str, object]) -> None:
    kept = rehearsal["results"] / "reproduce" / "gpu-tiny"  # type: ignore[operator]
    report = json.loads((kept / "report.json").read_text())
    assert set(report["models"]) == {"l2_eps1.0", "linf_8"}
    for m in report["models"].values():
        assert set(m["certify"]) == {"tbn", "clean"}
        assert set(m["certify"]["tbn"]) == {"0.25", "0.5"}
        assert m["certify"]["tbn"]["0.25"]["images"] == 4
        assert m["certify"]["tbn"]["0.25"]["params"]["n"] == 200
        noise = {r["sigma"]: r for r in m["noise"]["rows"]}
        assert set(noise) == {0.25, 0.5} and all(
            0 <= r["accuracy_clean_bn"] <= 1 and 0 <= r["accuracy_tbn"] <= 1 for r in noise.values()
        )
        assert all(r["images"] == 32 for r in noise.values())
        assert m["seconds"]["train"] > 0 and m["training"]["epochs"] == 1
    assert report["totals"]["seconds"] > 0
    text = (kept / "report.md").read_text()
    assert "## Cost" in text and "l2_eps1.0" in text and "linf_8" in text
    assert (kept / "certified_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(kept.rglob("checkpoint*.pt"))  # no weights in the results
    assert "Total" in (rehearsal["results"] / "summary.md").read_text()  # type: ignore[operator]


def test_ray_actors_agree_with_in_process(rehearsal: dict[str, object]) -> None:
    r = json.loads((rehearsal["results"] / "ray" / "ray.json").read_text())  # type: ignore[operator]
    assert r["images"] == 4 and r["n"] == 100
    assert r["identical_predictions_radii"] == 4
    assert r["trained_epochs"] == 1  # the model trained in this call, not an untrained stand-in
    assert r["command_seconds"]["ray"] > 0 and r["command_seconds"]["local"] > 0
    assert r["dashboard"] and "dashboard http://" in r["dashboard"]
    with open(rehearsal["results"] / "ray" / "certify-ray.tsv") as f:  # type: ignore[operator]
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [int(row["idx"]) for row in rows] == [0, 20, 40, 60]


def test_pack_holds_the_results_folder(rehearsal: dict[str, object]) -> None:
    out = rehearsal["root"] / "out2"  # type: ignore[operator]
    assert sorted(p.name for p in out.iterdir()) == ["gpu-results.tar.gz", "summary.md"]
    with tarfile.open(out / "gpu-results.tar.gz") as tar:
        names = tar.getnames()
    assert "results/summary.md" in names and "results/ray/ray.json" in names
    assert "results/reproduce/gpu-tiny/report.md" in names
    assert (out / "gpu-results.tar.gz").stat().st_size < 16 * 2**20
    print(f"rehearsal: {rehearsal['seconds']:.0f} s for both calls")


def test_budget_too_small_starts_nothing(tmp_path: Path) -> None:
    out = _session(
        "--budget",
        "5",
        "--results",
        tmp_path / "results",
        "--work",
        tmp_path / "work",
        "--carry",
        tmp_path / "none",
        timeout=HANG_S,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    status = json.loads((tmp_path / "results" / "summary.json").read_text())["status"]
    assert status["engine"].startswith("left for the next call") and status["engine-tuned"].startswith(
        "left for the next call"
    )
    assert status["report"] == "waits for the models"
    assert not (tmp_path / "results" / "engine").exists()


def test_ray_trim_drops_unneeded_parts_and_keeps_modes(tmp_path: Path) -> None:
    import ray_trim

    wheel = tmp_path / "ray-0-cp311-cp311-manylinux2014_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, body in {
            "ray/__init__.py": "",
            "ray/rllib/big.py": "x" * 1000,
            "ray/jars/a.jar": "j" * 500,
            "ray/dashboard/client/build/index.html": "<html>" * 100,
            "ray/dashboard/head.py": "",
            "ray/_raylet.pyi": "",
            "ray/util/__pycache__/x.pyc": "c",
        }.items():
            z.writestr(name, body)
        info = zipfile.ZipInfo("ray/core/src/ray/raylet/raylet")
        info.external_attr = 0o755 << 16
        z.writestr(info, "#!/bin/sh\necho raylet\n")
    extra = tmp_path / "dep-1-py3-none-any.whl"
    with zipfile.ZipFile(extra, "w") as z:
        z.writestr("dep/__init__.py", "VALUE = 1\n")
    sizes = ray_trim.trim(wheel, tmp_path / "ray.tar.xz", extras=(extra,), strip=None)
    assert sizes["removed_bytes"]["ray/rllib"] == 1000 and sizes["removed_bytes"]["ray/jars"] == 500
    assert sizes["removed_bytes"]["ray/dashboard/client"] == 600
    site = ray_trim.unpack(tmp_path / "ray.tar.xz", tmp_path / "unpacked")
    assert not (site / "ray" / "rllib").exists() and not (site / "ray" / "_raylet.pyi").exists()
    assert (
        site / "ray" / "dashboard" / "client" / "build" / "static"
    ).is_dir()  # the dashboard refuses to start without it
    assert "not installed" in (site / "ray" / "dashboard" / "client" / "build" / "index.html").read_text()
    assert os.access(site / "ray" / "core" / "src" / "ray" / "raylet" / "raylet", os.X_OK)
    assert (site / "dep" / "__init__.py").read_text() == "VALUE = 1\n"
    assert sizes["archive_bytes"] == (tmp_path / "ray.tar.xz").stat().st_size > 0


_TAG = f"cp{sys.version_info[0]}{sys.version_info[1]}"
#: A trimmed Ray for this Python: made by ``bench/gpu_carry.py`` (the GPU machine's) or ``ray_trim.py`` by hand.
TRIMMED = next(
    iter(
        [*(REPO / ".gpu-carry").glob(f"ray-{_TAG}.tar.xz"), *(REPO / ".gpu-carry-build").glob(f"**/ray-{_TAG}.tar.xz")]
    ),
    REPO / ".gpu-carry" / f"ray-{_TAG}.tar.xz",
)


@pytest.mark.skipif(
    not TRIMMED.is_file(), reason="no trimmed Ray for this Python (bench/ray_trim.py, see results/gpu/README.md)"
)
def test_trimmed_ray_starts_with_dashboard_and_runs_an_actor_pool(tmp_path: Path) -> None:
    import ray_trim

    site = ray_trim.unpack(TRIMMED, tmp_path)
    probe = (
        "import os, ray\nfrom ray.util import ActorPool\n"
        "assert ray.__file__.startswith(os.environ['TRIMMED'])\n"
        f"ray.init(address='local', num_cpus=2, include_dashboard=True, dashboard_host='127.0.0.1', dashboard_port={free_port()})\n"
        "@ray.remote(num_cpus=1)\nclass Sq:\n    def f(self, x): return x * x\n"
        "pool = ActorPool([Sq.remote() for _ in range(2)])\n"
        "print('dashboard', ray._private.worker.get_dashboard_url(), 'results', list(pool.map(lambda a, v: a.f.remote(v), range(5))))\n"
        "ray.shutdown()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "TRIMMED": str(site), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=HANG_S)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "results [0, 1, 4, 9, 16]" in out.stdout
    assert "dashboard 127.0.0.1:" in out.stdout


def test_paper_fast_config_is_the_gpu_reproduction_and_the_tiny_one_mirrors_it() -> None:
    from tbn_ray.config import load_reproduce_config

    fast = load_reproduce_config(REPO / "configs" / "paper-fast.yaml")
    tiny = load_reproduce_config(REPO / "bench" / "gpu-tiny.yaml")
    attacks = {m.name: fast.train_config(m).attack for m in fast.models}
    assert {k: (a.norm, round(a.eps, 6)) for k, a in attacks.items()} == {
        "l2_eps1.0": ("l2", 1.0),
        "linf_8": ("linf", round(8 / 255, 6)),
    }
    train = fast.train_config(fast.models[0])
    assert train.model.arch == "preact_resnet18" and 20 <= train.optim.epochs <= 30 and train.data.source == "jpeg"
    c = fast.certify
    assert (c.sigmas, c.n, c.skip, c.max_images, c.adaptive, fast.certify_clean) == (
        (0.25, 0.5),
        100_000,
        20,
        500,
        True,
        True,
    )
    assert fast.calibrate.sigmas == (0.25, 0.5) and set(fast.evaluate.attacks) == {"pgd", "apgd-ce"}
    # the rehearsal takes the same paths: the same models, sigmas, engine options and evaluations, smaller
    assert [m.name for m in tiny.models] == [m.name for m in fast.models]
    assert tiny.certify.sigmas == c.sigmas and tiny.certify_clean
    assert (tiny.certify.images_per_pass > 1, tiny.certify.adaptive, tiny.certify.adaptive_design) == (
        c.images_per_pass > 1,
        c.adaptive,
        c.adaptive_design,
    )
    assert (tiny.certify.amp, tiny.certify.channels_last, tiny.certify.fold_bn) == (c.amp, c.channels_last, c.fold_bn)
    assert (
        tiny.robustness.corruption_modes == fast.robustness.corruption_modes
        and tiny.evaluate.attacks == fast.evaluate.attacks
    )
