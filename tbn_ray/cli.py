"""The ``tbn-ray`` command line: thin wrappers over ``pipeline`` (and, later, the Ray layer).

Flags default to ``None`` and fall back to the YAML config, whose defaults live in
``config.py``: one source of truth. Every ``TbnError`` becomes one line on stderr and
exit status 2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from .config import CalibrateConfig, CertifyConfig, default, load_config
from .errors import TbnError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Certified and corruption-robust CIFAR-10 classifiers from adversarially trained models, "
    "with test-time adaptive batch normalization (TBN).",
)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="experiment YAML (configs/*.yaml)")]
DataOpt = Annotated[
    Optional[str], typer.Option("--data", help="CIFAR-10 source: auto | official | jpeg | partial (env TBN_DATA)")
]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda | cuda:N [default: auto]")]
StorageOpt = Annotated[
    Optional[str], typer.Option("--storage", help="results root: a directory or s3://bucket/prefix (env TBN_STORAGE)")
]
SigmaOpt = Annotated[Optional[list[float]], typer.Option("--sigma", help="noise level(s), repeatable")]


def _storage_root(storage: str | None):
    from .storage import Storage, default_storage_uri

    return Storage.open(storage or default_storage_uri())


@app.command()
def train(
    config: ConfigOpt = None,
    name: Annotated[Optional[str], typer.Option(help="run name (default: from the config)")] = None,
    storage: StorageOpt = None,
    epochs: Annotated[Optional[int], typer.Option(help="override optim.epochs")] = None,
    data: DataOpt = None,
    device: DeviceOpt = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="start over instead of resuming")] = False,
) -> None:
    """PGD adversarial training (resumes the run of the same name)."""
    from .pipeline import log, train_run
    from .runs import Run

    cfg = load_config(config, **{"train.name": name, "train.optim.epochs": epochs, "train.data.source": data, "train.device": device})
    root = _storage_root(storage)
    root.check()
    run = Run(root.child(cfg.train.name))
    ckpt = train_run(cfg.train, run, fresh=fresh)
    log(f"run: {run.uri} (epoch {ckpt.epoch})")


@app.command()
def calibrate(
    run: Annotated[str, typer.Argument(help="run directory (or its checkpoint.pt), local or s3://")],
    sigma: SigmaOpt = None,
    config: ConfigOpt = None,
    samples: Annotated[Optional[int], typer.Option(help=f"noisy samples per sigma [default {default(CalibrateConfig, 'samples')}]")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="images per forward pass")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    data: DataOpt = None,
    device: DeviceOpt = None,
) -> None:
    """TBN: estimate frozen BN statistics per sigma on noisy held-out training images."""
    from .pipeline import calibrate_run, log
    from .runs import Run

    cfg = load_config(
        config,
        **{"calibrate.sigmas": sigma or None, "calibrate.samples": samples, "calibrate.batch_size": batch_size, "calibrate.seed": seed},
    )
    r = Run.open(run)
    calibrate_run(r, cfg.calibrate, data_cfg=_data_override(data), device=device or cfg.train.device)
    log(f"TBN statistics stored in {r.uri}/bn_stats.pt")


def _data_override(source: str | None):
    from .config import DataConfig, parse_config

    return None if source is None else parse_config(DataConfig, {"source": source}, "--data")


@app.command()
def certify(
    run: Annotated[str, typer.Argument(help="run directory (or its checkpoint.pt), local or s3://")],
    sigma: SigmaOpt = None,
    config: ConfigOpt = None,
    n0: Annotated[Optional[int], typer.Option(help=f"selection samples [default {default(CertifyConfig, 'n0')}]")] = None,
    n: Annotated[Optional[int], typer.Option(help=f"estimation samples [default {default(CertifyConfig, 'n')}]")] = None,
    alpha: Annotated[Optional[float], typer.Option(help=f"failure probability [default {default(CertifyConfig, 'alpha')}]")] = None,
    skip: Annotated[Optional[int], typer.Option(help="certify every skip-th test image (Cohen: 20)")] = None,
    start: Annotated[Optional[int], typer.Option(help="first test index")] = None,
    max_images: Annotated[Optional[int], typer.Option(help="stop after this many images")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="noisy copies per forward pass")] = None,
    seed: Annotated[Optional[int], typer.Option(help="run seed; per-example seeds derive from (seed, index)")] = None,
    bn: Annotated[Optional[str], typer.Option(help="tbn (statistics calibrated at the same sigma) | clean")] = None,
    output: Annotated[Optional[str], typer.Option(help="results location (default: <run>/certify)")] = None,
    data: DataOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Randomized-smoothing certification (Cohen et al. CERTIFY) with frozen TBN statistics."""
    from .pipeline import certify_run, log
    from .report import load_summaries, write_report
    from .runs import Run
    from .storage import Storage

    cfg = load_config(
        config,
        **{
            "certify.sigmas": sigma or None,
            "certify.n0": n0,
            "certify.n": n,
            "certify.alpha": alpha,
            "certify.skip": skip,
            "certify.start": start,
            "certify.max_images": max_images,
            "certify.batch_size": batch_size,
            "certify.seed": seed,
            "certify.bn": bn,
        },
    )
    r = Run.open(run)
    out = Storage.open(output) if output else r.storage.child("certify")
    out.check()
    certify_run(r, cfg.certify, out, data_cfg=_data_override(data), device=device or cfg.train.device)
    files = write_report(load_summaries(out), out, title=f"Certification of {r.uri}")
    log(f"results in {out.uri}; report {files['report.md']}")


@app.command()
def report(results: Annotated[str, typer.Argument(help="a certification results directory (local or s3://)")]) -> None:
    """Rebuild the markdown table and plot from stored results."""
    from .pipeline import log
    from .report import load_summaries, write_report
    from .storage import Storage

    out = Storage.open(results)
    summaries = load_summaries(out)
    if not summaries:
        raise TbnError(f"no certification results (summary.json) under {out.uri}")
    files = write_report(summaries, out, title=f"Certification results in {out.uri}")
    print(out.read_text("report.md"))
    log(f"report: {files['report.md']}, plot: {files['certified_accuracy.png']}")


@app.command()
def quickstart(
    config: Annotated[Path, typer.Option("--config", "-c")] = Path("configs/quickstart.yaml"),
    storage: StorageOpt = None,
    data: DataOpt = None,
    device: DeviceOpt = None,
) -> None:
    """The whole pipeline at CPU scale: train briefly, calibrate TBN, certify a few dozen images, report."""
    from .pipeline import quickstart_run

    t0 = time.perf_counter()
    quickstart_run(config, _storage_root(storage), data=data, device=device)
    print(f"[tbn-ray] quickstart finished in {time.perf_counter() - t0:.0f} s")


def main() -> None:
    """Console entry point: user errors become one line and exit status 2."""
    try:
        app()
    except TbnError as e:
        print(f"tbn-ray: error: {e}", file=sys.stderr)
        sys.exit(2)
