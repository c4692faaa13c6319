"""The ``tbn-ray`` command line: thin wrappers over the in-process modules and the Ray layer.

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

from tbn_ray.config import CalibrateConfig, CertifyConfig, EvaluateConfig, default, load_config
from tbn_ray.errors import TbnError, log

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
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda | cuda:N (default: auto)")]
StorageOpt = Annotated[
    Optional[str], typer.Option("--storage", help="results root: a directory or s3://bucket/prefix (env TBN_STORAGE)")
]
SigmaOpt = Annotated[Optional[list[float]], typer.Option("--sigma", help="noise level(s), repeatable")]
AddressOpt = Annotated[Optional[str], typer.Option(help="Ray cluster to join (auto | host:port; default: $RAY_ADDRESS, else a local instance with the dashboard)")]
ActorsOpt = Annotated[Optional[int], typer.Option(help="actors to start (default: one per GPU, else one per CPU)")]
GpusPerActorOpt = Annotated[Optional[float], typer.Option(help="GPUs per actor (default: 1 on a cluster with GPUs, else 0)")]
CpusPerActorOpt = Annotated[Optional[float], typer.Option(help="CPUs per actor, also its torch threads (default: the node's CPUs per GPU, else 1)")]
LocalDeviceOpt = Annotated[Optional[str], typer.Option("--device", help="with --local: auto | cpu | cuda | cuda:N (default: auto)")]
ProgressOpt = Annotated[bool, typer.Option(help="progress bar")]


def _storage_root(storage: str | None):
    from tbn_ray.store.storage import Storage, default_storage_uri

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
    local: Annotated[
        bool, typer.Option("--local", help="train in this process without Ray (one device, --device)")
    ] = False,
    workers: Annotated[Optional[int], typer.Option(help="Ray Train DDP workers (default: 1)")] = None,
    cpus_per_worker: Annotated[
        Optional[float],
        typer.Option(help="CPUs each worker reserves (default: a local instance's CPUs / workers; on a cluster 1)"),
    ] = None,
    gpus_per_worker: Annotated[
        Optional[int], typer.Option(help="0 (gloo on CPU, the default) or 1 (nccl, one GPU per worker)")
    ] = None,
    address: AddressOpt = None,
    keep: Annotated[Optional[int], typer.Option(help="Ray checkpoints kept, the most recent; best.pt is kept besides (default: 3)")] = None,
    max_failures: Annotated[
        Optional[int], typer.Option(help="worker failures recovered from the last checkpoint (default: 3)")
    ] = None,
    start_timeout: Annotated[
        Optional[float],
        typer.Option(help="seconds to wait for the workers to be placed, per attempt (default: 30; 900 on an autoscaling cluster)"),
    ] = None,
) -> None:
    """PGD adversarial training on Ray Train (DDP), or in this process with --local; resumes the run of the same name.

    The global batch size (optim.batch_size) is the same for any number of workers: each worker trains on batch_size / workers images per step.
    """
    from tbn_ray.store.runs import Run

    ray_flags = {
        "--workers": workers, "--cpus-per-worker": cpus_per_worker, "--gpus-per-worker": gpus_per_worker,
        "--address": address, "--keep": keep, "--max-failures": max_failures, "--start-timeout": start_timeout,
    }  # fmt: skip
    if local and any(v is not None for v in ray_flags.values()):
        raise TbnError(f"{', '.join(k for k, v in ray_flags.items() if v is not None)} need Ray: drop --local")
    cfg = load_config(config, **{"train.name": name, "train.optim.epochs": epochs, "train.data.source": data, "train.device": device})
    root = _storage_root(storage)
    if local:
        from tbn_ray.jobs.pipeline import train_run

        root.check()
        run = Run(root.child(cfg.train.name))
        ckpt = train_run(cfg.train, run, fresh=fresh)
        log(f"run: {run.uri} (epoch {ckpt.epoch})")
        return
    if device is not None:
        raise TbnError("--device applies to --local runs; on Ray, --gpus-per-worker decides (0: CPU, 1: one GPU per worker)")
    from tbn_ray.distributed.runtime import connect, disconnect
    from tbn_ray.distributed.train import Recovery, Scaling, train_on_ray

    given = {"workers": workers, "cpus_per_worker": cpus_per_worker, "gpus_per_worker": gpus_per_worker}
    scaling = Scaling(**{k: v for k, v in given.items() if v is not None})
    options = {"keep": keep, "max_failures": max_failures, "start_timeout_s": start_timeout}
    recovery = Recovery(**{k: v for k, v in options.items() if v is not None})
    scaling.per_worker_batch(cfg.train.optim.batch_size)
    root.check()  # a missing or unreachable bucket fails here, before Ray starts
    cluster = connect(address, log=log)
    try:
        ckpt = train_on_ray(cfg.train, root, scaling, cluster, recovery=recovery, fresh=fresh)
    finally:
        disconnect(cluster)
    log(f"run: {root.child(cfg.train.name).uri} (epoch {ckpt.epoch})")


@app.command()
def calibrate(
    run: Annotated[str, typer.Argument(help="run directory (or its checkpoint.pt), local or s3://")],
    sigma: SigmaOpt = None,
    config: ConfigOpt = None,
    samples: Annotated[Optional[int], typer.Option(help=f"noisy samples per sigma (default: {default(CalibrateConfig, 'samples')})")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="images per forward pass")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    data: DataOpt = None,
    device: DeviceOpt = None,
) -> None:
    """TBN: estimate frozen BN statistics per sigma on noisy held-out training images."""
    from tbn_ray.jobs.pipeline import calibrate_run
    from tbn_ray.store.runs import Run

    cfg = load_config(
        config,
        **{"calibrate.sigmas": sigma or None, "calibrate.samples": samples, "calibrate.batch_size": batch_size, "calibrate.seed": seed},
    )
    r = Run.open(run)
    calibrate_run(r, cfg.calibrate, data_cfg=_data_override(data), device=device or cfg.train.device)
    log(f"TBN statistics stored in {r.uri}/bn_stats.pt")


def _data_override(source: str | None):
    from tbn_ray.config import DataConfig, parse_config

    return None if source is None else parse_config(DataConfig, {"source": source}, "--data")


def _index_range(text: str) -> tuple[int, int]:
    start, sep, stop = text.partition(":")
    try:
        first, last = int(start), int(stop)
    except ValueError:
        first = last = -1
    if not sep or not 0 <= first < last:
        raise TbnError(f"--indices {text!r}: use START:STOP with 0 <= START < STOP, e.g. 0:10000")
    return first, last


@app.command()
def certify(
    run: Annotated[str, typer.Argument(help="run directory (or its checkpoint.pt), local or s3://")],
    sigma: SigmaOpt = None,
    config: ConfigOpt = None,
    n0: Annotated[Optional[int], typer.Option(help=f"selection samples (default: {default(CertifyConfig, 'n0')})")] = None,
    n: Annotated[Optional[int], typer.Option(help=f"estimation samples (default: {default(CertifyConfig, 'n')})")] = None,
    alpha: Annotated[Optional[float], typer.Option(help=f"failure probability (default: {default(CertifyConfig, 'alpha')})")] = None,
    skip: Annotated[Optional[int], typer.Option(help="certify every skip-th test image (Cohen: 20)")] = None,
    start: Annotated[Optional[int], typer.Option(help="first test index")] = None,
    indices: Annotated[Optional[str], typer.Option(help="test indices START:STOP (STOP excluded; with --skip, every skip-th)")] = None,
    max_images: Annotated[Optional[int], typer.Option(help="stop after this many images")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="noisy copies per forward pass")] = None,
    seed: Annotated[Optional[int], typer.Option(help="run seed; per-example seeds derive from (seed, index)")] = None,
    bn: Annotated[Optional[str], typer.Option(help="tbn (statistics calibrated at the same sigma) | clean")] = None,
    output: Annotated[Optional[str], typer.Option(help="results root; results go to <output>/<run-id> (default: <run>/certify)")] = None,
    shards: Annotated[Optional[int], typer.Option(help="fixed shards the images are split into (default: 64, at most one per image)")] = None,
    local: Annotated[bool, typer.Option("--local", help="certify in this process, without Ray")] = False,
    address: AddressOpt = None,
    actors: ActorsOpt = None,
    gpus_per_actor: GpusPerActorOpt = None,
    cpus_per_actor: CpusPerActorOpt = None,
    channels_last: Annotated[bool, typer.Option(help="channels-last memory format: faster convolutions (its own run id)")] = False,
    fold_bn: Annotated[bool, typer.Option(help="fold the frozen BN statistics into the convolutions: faster (its own run id)")] = False,
    amp: Annotated[str, typer.Option(help="forward passes in off | bf16 | fp16 on CUDA (its own run id)")] = "off",
    progress: ProgressOpt = True,
    data: DataOpt = None,
    device: LocalDeviceOpt = None,
) -> None:
    """Randomized-smoothing certification (Cohen et al. CERTIFY) with frozen TBN statistics,
    sharded across Ray actors; resumable: the same command again skips finished shards."""
    from tbn_ray.jobs.certify import plan_certify, run_plan_in_process
    from tbn_ray.store.runs import Run
    from tbn_ray.store.storage import Storage
    from tbn_ray.science.training import resolve_device

    stop = None
    if indices is not None:
        if start is not None:
            raise TbnError("--indices and --start both set the first test index: give one of them")
        start, stop = _index_range(indices)
    ray_flags = {"--address": address, "--actors": actors, "--gpus-per-actor": gpus_per_actor, "--cpus-per-actor": cpus_per_actor}
    if local and any(v is not None for v in ray_flags.values()):
        raise TbnError(f"{', '.join(k for k, v in ray_flags.items() if v is not None)} need Ray: drop --local")
    if not local and device is not None:
        raise TbnError("--device applies to --local; Ray actors use a GPU when --gpus-per-actor > 0")
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
    dev = resolve_device(device or cfg.train.device) if local else None
    # Everything is checked here, before Ray starts; on Ray the device follows the actors' GPUs.
    plan = plan_certify(
        r, cfg.certify, out, data_cfg=_data_override(data), shards=shards, stop=stop,
        device_type=dev.type if dev is not None else "cpu", channels_last=channels_last, fold_bn=fold_bn, amp=amp,
    )
    if dev is not None:
        result = run_plan_in_process(plan, dev, progress=progress)
    else:
        try:
            from tbn_ray.distributed.certify import certify_on_ray
        except ImportError as e:
            raise TbnError(f"Ray is not installed ({e.name}): pip install 'tbn-ray[ray]', or certify in this process with --local") from None
        result = certify_on_ray(
            plan, address=address, actors=actors, gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, progress=progress
        )
    log(
        f"results in {result.location}: {result.shards_computed} shard(s) certified now, {result.shards_skipped} reused; "
        f"report {result.report}"
    )


@app.command()
def report(
    results: Annotated[str, typer.Argument(help="a certification's results, <output>/<run-id> (local or s3://)")],
) -> None:
    """Rebuild the per-sigma results, the markdown table and the plot from the shard files alone."""
    from tbn_ray.jobs.certify import aggregate
    from tbn_ray.store.storage import Storage

    out = Storage.open(results)
    aggregate(out)
    print(out.read_text("report.md"))
    log(f"report: {out.object_uri('report.md')}, plot: {out.object_uri('certified_accuracy.png')}")


def shipped_config(name: str) -> Path:
    """``configs/<name>`` of the working directory, else of the checkout tbn_ray runs from, so
    the default works from any directory of an editable install."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (root / "configs" / name).is_file():
            return root / "configs" / name
    raise TbnError(f"configs/{name} is neither in the working directory nor beside the tbn_ray package: pass --config PATH")


@app.command()
def quickstart(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="experiment YAML (default: configs/quickstart.yaml)")] = None,
    storage: StorageOpt = None,
    data: DataOpt = None,
    device: DeviceOpt = None,
) -> None:
    """The whole pipeline at CPU scale: train briefly, calibrate TBN, certify a few dozen images, report."""
    from tbn_ray.jobs.pipeline import quickstart_run

    t0 = time.perf_counter()
    quickstart_run(config or shipped_config("quickstart.yaml"), _storage_root(storage), data=data, device=device)
    log(f"quickstart finished in {time.perf_counter() - t0:.0f} s")


@app.command()
def sweep(
    config: Annotated[Path, typer.Option("--config", "-c", help="sweep YAML (configs/sweep.yaml)")],
    storage: StorageOpt = None,
    address: AddressOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue the stored sweep of this name (an error if there is none)")
    ] = False,
) -> None:
    """Ray Tune over the training epsilon and the TBN sigma: each epsilon trained once, every (epsilon, sigma)
    calibrated and certified on held-out validation images; a table, a heatmap and best.json. Re-running resumes."""
    from tbn_ray.config import load_sweep_config

    cfg = load_sweep_config(config)
    try:
        from tbn_ray.distributed.sweep import prepare, run_sweep
    except ImportError as e:
        raise TbnError(f"Ray is not installed ({e.name}): pip install 'tbn-ray[ray]'") from None
    from tbn_ray.distributed.runtime import connect, disconnect

    root = prepare(cfg, _storage_root(storage), resume=resume)  # config, data and sizes: before Ray starts
    t0 = time.perf_counter()
    cluster = connect(address, log=log)
    try:
        result = run_sweep(cfg, root, cluster)
    finally:
        disconnect(cluster)
    print(root.read_text("results.md"))
    log(f"sweep finished in {time.perf_counter() - t0:.0f} s; best: epsilon {result.best['epsilon']:g}, sigma {result.best['sigma']:g}")
    log(f"results: {result.files['results.md']}, {result.files['heatmap.png']}, {result.files['best.json']}")


# --- data and evaluate (issue #6) ------------------------------------------------------------

data_app = typer.Typer(no_args_is_help=True, help="Data sets derived from CIFAR-10, cached in the storage layer.")
app.add_typer(data_app, name="data")
evaluate_app = typer.Typer(
    no_args_is_help=True, help="Corruption (CIFAR-10-C) and adversarial robustness per BN mode, sharded across Ray actors."
)
app.add_typer(evaluate_app, name="evaluate")

CorruptionsOpt = Annotated[str, typer.Option(help="'all' (the 15 standard corruptions) or a comma list, e.g. fog,snow")]
SeveritiesOpt = Annotated[str, typer.Option(help="severities: 1-5, 3 or 1,3,5")]
Cifar10cSeedOpt = Annotated[int, typer.Option("--seed", help="CIFAR-10-C regeneration seed (per-image randomness derives from it)")]
IndicesOpt = Annotated[Optional[str], typer.Option(help="test indices START:STOP (STOP excluded) (default: every test image of the source)")]
ReleasedOpt = Annotated[
    Optional[Path], typer.Option(help="folder of the released CIFAR-10-C (<corruption>.npy, labels.npy): imported instead of regenerated")
]
BnOpt = Annotated[
    Optional[list[str]],
    typer.Option("--bn", help="BN mode, repeatable: clean | sigma:<s> (calibrated TBN set) | test-batch | test-batch:<N> (prior mixing)"),
]
LocalOpt = Annotated[bool, typer.Option("--local", help="evaluate in this process, without Ray")]


def _indices(indices: str | None) -> tuple[int | None, int | None]:
    return _index_range(indices) if indices is not None else (None, None)


def _run_evaluation(plan, *, local: bool, device: str | None, address, actors, gpus_per_actor, cpus_per_actor, progress: bool):  # type: ignore[no-untyped-def]
    """The planned evaluation in this process (--local) or on Ray; prints the run's evaluation report."""
    from tbn_ray.jobs.evaluate import evaluation_section, run_in_process
    from tbn_ray.store.storage import Storage
    from tbn_ray.science.training import resolve_device

    if local:
        result = run_in_process(plan, resolve_device(device or "auto"), progress=progress)
    else:
        try:
            from tbn_ray.distributed.evaluate import evaluate_on_ray
        except ImportError as e:
            raise TbnError(f"Ray is not installed ({e.name}): pip install 'tbn-ray[ray]', or evaluate in this process with --local") from None
        result = evaluate_on_ray(plan, address=address, actors=actors, gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, progress=progress)
    print(evaluation_section(Storage.open(plan.run_uri), image=None))
    log(f"results in {result.location}: {result.items_computed} item(s) computed now, {result.items_skipped} reused; report {result.report}")


def _check_ray_flags(local: bool, device: str | None, **flags) -> None:  # type: ignore[no-untyped-def]
    given = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None]
    if local and given:
        raise TbnError(f"{', '.join(given)} need Ray: drop --local")
    if not local and device is not None:
        raise TbnError("--device applies to --local; Ray actors use a GPU when --gpus-per-actor > 0")


@data_app.command("cifar10c")
def data_cifar10c(
    severities: SeveritiesOpt = "1-5",
    corruptions: CorruptionsOpt = "all",
    seed: Cifar10cSeedOpt = 0,
    data: DataOpt = None,
    indices: IndicesOpt = None,
    released: ReleasedOpt = None,
    storage: StorageOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Regenerate CIFAR-10-C from the test set once (Hendrycks & Dietterich's CIFAR parameters, seeded),
    one array per corruption and severity under <storage>/cifar10c/; or import the released files (--released)."""
    import numpy as np

    from tbn_ray.science.corruptions import generate_cifar10c, parse_corruptions, parse_severities, regenerated_cifar10c, released_cifar10c
    from tbn_ray.science.data import load_from_config
    from tbn_ray.jobs.evaluate import select_test

    names, levels = parse_corruptions(corruptions), parse_severities(severities)
    start, stop = _indices(indices)
    root = _storage_root(storage)
    root.check()
    if released is not None:
        c10c = released_cifar10c(root, released, np.arange(start or 0, 10_000 if stop is None else stop), names, levels, progress=progress)
        c10c.write_metadata()
        log(f"{c10c.description}: {len(names)} x {len(levels)} arrays of {len(c10c.index)} images in {c10c.storage.uri}")
        return
    d = load_from_config(_data_override(data or "auto"))
    c10c = regenerated_cifar10c(root, select_test(d, start, stop), seed=seed, data_description=d.description)
    written, present = generate_cifar10c(c10c, names, levels, progress=progress)
    log(f"{c10c.description}: {written} array(s) written, {present} already there, {len(c10c.index)} images each -> {c10c.storage.uri}")
    log(f"sample grid: {c10c.storage.object_uri('sample_grid.png')}")


@evaluate_app.command("corruptions")
def evaluate_corruptions(
    run: Annotated[str, typer.Argument(help="run directory (or its checkpoint.pt), local or s3://")],
    bn: BnOpt = None,
    config: ConfigOpt = None,
    batch_size: Annotated[Optional[int], typer.Option(help=f"images per forward pass: the test batch of the test-batch modes (default: {default(EvaluateConfig, 'batch_size')})")] = None,
    corruptions: CorruptionsOpt = "all",
    severities: SeveritiesOpt = "1-5",
    seed: Cifar10cSeedOpt = 0,
    indices: IndicesOpt = None,
    released: ReleasedOpt = None,
    storage: Annotated[
        Optional[str], typer.Option(help="root of the CIFAR-10-C cache (tbn-ray data cifar10c --storage) (default: the run's parent)")
    ] = None,
    data: DataOpt = None,
    local: LocalOpt = False,
    address: AddressOpt = None,
    actors: ActorsOpt = None,
    gpus_per_actor: GpusPerActorOpt = None,
    cpus_per_actor: CpusPerActorOpt = None,
    device: LocalDeviceOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Accuracy on CIFAR-10-C per corruption and severity for each BN mode, into <run>/evaluate/;
    resumable: the same command again skips finished items. Missing arrays are generated and cached."""
    from tbn_ray.jobs.evaluate import plan_corruptions
    from tbn_ray.store.runs import Run

    _check_ray_flags(local, device, address=address, actors=actors, gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor)
    cfg = load_config(config, **{"evaluate.batch_size": batch_size}).evaluate
    start, stop = _indices(indices)
    plan = plan_corruptions(
        Run.open(run), bn or [], cache_root=_storage_root(storage) if storage else None, corruptions=corruptions, severities=severities,
        batch_size=cfg.batch_size, seed=seed, released=released, data_cfg=_data_override(data), start=start, stop=stop, progress=progress,
    )  # fmt: skip
    _run_evaluation(plan, local=local, device=device, address=address, actors=actors, gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, progress=progress)


@evaluate_app.command("attack")
def evaluate_attack(
    run: Annotated[str, typer.Argument(help="run directory (or its checkpoint.pt), local or s3://")],
    bn: BnOpt = None,
    norm: Annotated[str, typer.Option(help="l2 | linf")] = "l2",
    eps: Annotated[str, typer.Option(help="budget in [0,1] pixel units, e.g. 0.5 or 8/255")] = "0.5",
    config: ConfigOpt = None,
    attack: Annotated[Optional[list[str]], typer.Option("--attack", help=f"pgd | apgd-ce, repeatable (default: {' and '.join(default(EvaluateConfig, 'attacks'))})")] = None,
    steps: Annotated[Optional[int], typer.Option(help=f"iterations per attack run (default: {default(EvaluateConfig, 'attack_steps')})")] = None,
    restarts: Annotated[Optional[int], typer.Option(help=f"random restarts (default: {default(EvaluateConfig, 'restarts')})")] = None,
    step_size: Annotated[Optional[float], typer.Option(help="PGD step size (default: 2.5 eps / steps); APGD sets its own")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=f"images per batch: the test batch the test-batch modes normalise with (default: {default(EvaluateConfig, 'batch_size')})")] = None,
    seed: Annotated[int, typer.Option(help="random starts derive from (seed, attack, batch)")] = 0,
    indices: IndicesOpt = None,
    data: DataOpt = None,
    local: LocalOpt = False,
    address: AddressOpt = None,
    actors: ActorsOpt = None,
    gpus_per_actor: GpusPerActorOpt = None,
    cpus_per_actor: CpusPerActorOpt = None,
    device: LocalDeviceOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Empirical robustness (PGD, APGD-CE) for each BN mode; test-batch modes are attacked through
    their batch statistics. Into <run>/evaluate/; resumable like certify."""
    from tbn_ray.jobs.evaluate import plan_attack
    from tbn_ray.store.runs import Run

    _check_ray_flags(local, device, address=address, actors=actors, gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor)
    cfg = load_config(
        config, **{"evaluate.attacks": attack or None, "evaluate.attack_steps": steps, "evaluate.restarts": restarts, "evaluate.batch_size": batch_size}
    ).evaluate
    start, stop = _indices(indices)
    plan = plan_attack(
        Run.open(run), bn or [], attacks=cfg.attacks, norm=norm, eps=eps, steps=cfg.attack_steps, restarts=cfg.restarts,
        step_size=step_size, batch_size=cfg.batch_size, seed=seed, data_cfg=_data_override(data), start=start, stop=stop,
    )  # fmt: skip
    _run_evaluation(plan, local=local, device=device, address=address, actors=actors, gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, progress=progress)


def main() -> None:
    """Console entry point: user errors become one line and exit status 2; SIGTERM one line and 143."""
    from tbn_ray import signals

    signals.stop_on_sigterm()
    try:
        app()
    except BaseException as e:
        if signals.received():
            print("tbn-ray: stopped by SIGTERM; finished work is kept: run the same command again to resume", file=sys.stderr)
            sys.exit(signals.EXIT_STATUS)
        if isinstance(e, TbnError):
            print(f"tbn-ray: error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
