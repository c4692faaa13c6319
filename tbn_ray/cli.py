"""The ``tbn-ray`` command line: thin wrappers over the in-process modules and the Ray layer.

Flags default to ``None`` and fall back to the YAML config, whose defaults live in
``tbn_ray.config``: one source of truth (``cli_options`` maps flags onto it). Every ``TbnError``
becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

import tbn_ray
from tbn_ray.cli_evaluate import data_app, evaluate_app
from tbn_ray.cli_import import import_model
from tbn_ray.cli_options import (
    AddressOpt,
    Command,
    ConfigOpt,
    DataOpt,
    DeviceOpt,
    ProgressOpt,
    RunArg,
    Settings,
    StorageOpt,
    Where,
    about,
    about_run,
    check_local,
    config_options,
    data_override,
    index_range,
    load_flags,
    pool_options,
    require_ray,
    storage_root,
    where_options,
)
from tbn_ray.config import (
    CalibrateConfig,
    CertifyConfig,
    ExperimentConfig,
    RayConfig,
    RuntimeConfig,
    TrainConfig,
    parse_config,
)
from tbn_ray.errors import TbnError, TbnWarning, log
from tbn_ray.store.storage import DEFAULT_STORAGE

app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,  # plain help: switches without a type, arguments as RUN and RESULTS
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(data_app, name="data")
app.add_typer(evaluate_app, name="evaluate")
app.command("import", cls=Command)(import_model)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tbn-ray {tbn_ray.__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _start(
    ctx: typer.Context,
    threads: Annotated[
        Optional[str],
        typer.Option(
            envvar="TBN_THREADS",
            show_envvar=False,
            help=about(
                "torch CPU threads of this process: a number or auto (the CPUs it may use that are idle now; $OMP_NUM_THREADS if set); env TBN_THREADS",
                RuntimeConfig,
                "threads",
            ),
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Certified and corruption-robust CIFAR-10 classifiers from adversarially trained models,
    with test-time adaptive batch normalization (TBN)."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit()
    from tbn_ray.threads import apply_threads

    setting = parse_config(
        RuntimeConfig, {} if threads is None else {"threads": threads}, "--threads", {"threads": "--threads"}
    )
    apply_threads(setting.threads)


@app.command(cls=Command)
@config_options(
    "ray",
    RayConfig,
    only=("workers", "cpus_per_worker", "gpus_per_worker", "keep", "max_failures", "start_timeout_s"),
    rename={"start_timeout_s": "--start-timeout"},
    param="placement",
)
@config_options(
    "train",
    TrainConfig,
    only=("name", "optim.epochs", "objective", "noise.sigma"),
    rename={"noise.sigma": "--noise-sigma"},
)
def train(
    config: ConfigOpt = None,
    storage: StorageOpt = None,
    data: DataOpt = None,
    device: DeviceOpt = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="start over instead of resuming")] = False,
    local: Annotated[
        bool, typer.Option("--local", help="train in this process without Ray (one device, --device)")
    ] = False,
    address: AddressOpt = None,
    settings: Settings = None,  # type: ignore[assignment]  (the train section's flags)
    placement: Settings = None,  # type: ignore[assignment]  (the ray section's flags)
) -> None:
    """Training on Ray Train (DDP), or in this process with --local; resumes the run of the same name.

    --objective adversarial (default) is PGD adversarial training; gaussian and consistency are the randomized-smoothing baselines (Cohen et al.; Jeong & Shin) at --noise-sigma.

    The global batch size (optim.batch_size) is the same for any number of workers: each worker trains on batch_size / workers images per step.
    """
    from tbn_ray.store.runs import Run

    check_local(local, device, "--gpus-per-worker", {"--address": address, **{f: v for f, (_, v) in placement.items()}})
    cfg = load_flags(
        config,
        {**settings, "--data": ("train.data.source", data), "--device": ("train.device", device), **placement},
    )
    root = storage_root(storage)
    if local:
        from tbn_ray.jobs.pipeline import train_run

        root.check()
        run = Run(root.child(cfg.train.name))
        ckpt = train_run(cfg.train, run, fresh=fresh)
        log(f"run: {run.uri} (epoch {ckpt.epoch})")
        return
    require_ray(", or train in this process with --local")
    from tbn_ray.distributed.runtime import connected
    from tbn_ray.distributed.train import Recovery, Scaling, train_on_ray

    r = cfg.ray
    scaling = Scaling(workers=r.workers, cpus_per_worker=r.cpus_per_worker, gpus_per_worker=r.gpus_per_worker)
    recovery = Recovery(keep=r.keep, max_failures=r.max_failures, start_timeout_s=r.start_timeout_s)
    scaling.per_worker_batch(cfg.train.optim.batch_size)
    root.check()  # a missing or unreachable bucket fails here, before Ray starts
    with connected(address, job_name=f"tbn-ray train {cfg.train.name}", log=log) as cluster:
        ckpt = train_on_ray(cfg.train, root, scaling, cluster, recovery=recovery, fresh=fresh)
    log(f"run: {root.child(cfg.train.name).uri} (epoch {ckpt.epoch})")


@app.command(cls=Command)
@config_options("calibrate", CalibrateConfig, rename={"sigmas": "--sigma"})
def calibrate(
    run: RunArg,
    config: ConfigOpt = None,
    data: DataOpt = None,
    device: DeviceOpt = None,
    replace: Annotated[
        bool, typer.Option("--replace", help="replace a stored set made with other settings (refused without it)")
    ] = False,
    settings: Settings = None,  # type: ignore[assignment]  (one flag per field of CalibrateConfig)
) -> None:
    """TBN: estimate frozen BN statistics per sigma on noisy held-out training images."""
    from tbn_ray.jobs.pipeline import calibrate_run
    from tbn_ray.store.runs import Run

    cfg = load_flags(config, {**settings, "--device": ("train.device", device)})
    with about_run(run):
        r = Run.open(run)
        calibrate_run(r, cfg.calibrate, data_cfg=data_override(data), device=cfg.train.device, replace=replace)
    log(f"TBN statistics stored in {r.uri}/bn_stats.pt")


@app.command(cls=Command)
@where_options("certify in this process, without Ray")
@config_options("certify", CertifyConfig, skip=("data", "stop"), rename={"sigmas": "--sigma", "compile": "--compile"})
def certify(
    run: RunArg,
    config: ConfigOpt = None,
    indices: Annotated[
        Optional[str],
        typer.Option(
            help="test indices START:STOP, STOP excluded; with --skip, every skip-th (default: from --start to the end)"
        ),
    ] = None,
    output: Annotated[
        Optional[str], typer.Option(help="results root; results go to <output>/<run-id> (default: RUN/certify)")
    ] = None,
    data: DataOpt = None,
    where: Where = None,  # type: ignore[assignment]  (the options of where_options)
    settings: Settings = None,  # type: ignore[assignment]  (one flag per field of CertifyConfig)
) -> None:
    """Randomized-smoothing certification (Cohen et al. CERTIFY) with frozen TBN statistics,
    sharded across Ray actors; resumable: the same command again skips finished shards."""
    from tbn_ray.devices import resolve_device
    from tbn_ray.jobs.certify import plan_certify
    from tbn_ray.store.certify_layout import certify_output
    from tbn_ray.store.runs import Run

    given = dict(settings)
    if indices is not None:
        if given["--start"][1] is not None:
            raise TbnError("--indices and --start both set the first test index: give one of them")
        start, stop = index_range(indices)
        given.update({"--start": ("certify.start", start), "--indices": ("certify.stop", stop)})
    cfg = load_flags(config, {**given, "--data": ("certify.data.source", data), **where.flags()})
    with about_run(run):
        r = Run.open(run)
        dev = resolve_device(cfg.train.device) if where.local else None
        # Everything is checked here, before Ray starts; on Ray the device follows the actors' GPUs.
        plan = plan_certify(
            r, cfg.certify, certify_output(r, output), device_type=dev.type if dev is not None else "cpu"
        )
    _run_certification(plan, dev, cfg, where)


def _run_certification(plan, dev, cfg: ExperimentConfig, where: Where) -> None:  # type: ignore[no-untyped-def]
    """The planned certification on ``dev`` in this process (--local), else on Ray; prints the
    certified accuracy table and where the results went."""
    from tbn_ray.jobs.certify import run_plan_in_process
    from tbn_ray.reports.certify import accuracy_table, cap_note

    if dev is not None:
        result = run_plan_in_process(plan, dev, progress=where.progress)
    else:
        require_ray(", or certify in this process with --local")
        from tbn_ray.distributed.certify import run_plan_on_ray
        from tbn_ray.distributed.runtime import connected

        with connected(where.address, job_name=f"tbn-ray certify {plan.job_id}", log=log) as cluster:
            result = run_plan_on_ray(plan, cluster, **pool_options(cfg.ray), progress=where.progress)
    print(accuracy_table([{**o.summary, "params": o.summary} for o in result.outputs]))
    for o in result.outputs:
        log(cap_note(o.sigma, cfg.certify.n, cfg.certify.alpha))
    log(
        f"results in {result.location}: {result.shards_computed} shard(s) certified now, {result.shards_skipped} reused; report {result.report}"
    )


@app.command(cls=Command)
def report(
    results: Annotated[
        str,
        typer.Argument(
            metavar="RESULTS", help="a certification's results, <output>/<run-id> (local or s3://)", show_default=False
        ),
    ],
) -> None:
    """Rebuild the per-sigma results, the markdown table and the plot from the shard files alone."""
    from tbn_ray.jobs.certify import aggregate
    from tbn_ray.store.storage import Storage

    out = Storage.open(results)
    aggregate(out)
    print(out.read_text("report.md"))
    log(f"report: {out.object_uri('report.md')}, plot: {out.object_uri('certified_accuracy.png')}")


@app.command(cls=Command)
def show(run: RunArg) -> None:
    """What a run holds: model and training, calibrated sigmas, certifications and evaluations (read from its files)."""
    from tbn_ray.jobs.show import describe_run
    from tbn_ray.store.runs import Run

    print(describe_run(Run.open(run)))


def shipped_config(name: str) -> Path:
    """``configs/<name>`` of the working directory, else of the checkout tbn_ray runs from, so
    the default works from any directory of an editable install."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (root / "configs" / name).is_file():
            return root / "configs" / name
    raise TbnError(
        f"configs/{name} is neither in the working directory nor beside the tbn_ray package: pass --config PATH"
    )


@app.command(
    cls=Command,
    help="The whole pipeline at CPU scale: train briefly, calibrate TBN, certify a few dozen images, report.\n\n"
    f"Results go to <storage>/quickstart: $TBN_STORAGE if set, else {DEFAULT_STORAGE} in the working directory "
    "(checkpoint, TBN statistics, certify/<run-id>/report.md and certified_accuracy.png). Run again, it resumes.",
)
def quickstart(
    config: Annotated[
        Optional[Path], typer.Option("--config", "-c", help="experiment YAML (default: configs/quickstart.yaml)")
    ] = None,
    storage: StorageOpt = None,
    data: DataOpt = None,
    device: DeviceOpt = None,
) -> None:
    from tbn_ray.jobs.pipeline import quickstart_run

    t0 = time.perf_counter()
    quickstart_run(config or shipped_config("quickstart.yaml"), storage_root(storage), data=data, device=device)
    log(f"quickstart finished in {time.perf_counter() - t0:.0f} s")


@app.command(cls=Command)
def sweep(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="sweep YAML, e.g. configs/sweep.yaml (required)", show_default=False)
    ],
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
    require_ray("")
    from tbn_ray.distributed.runtime import connected
    from tbn_ray.distributed.sweep import prepare, run_sweep

    root = prepare(cfg, storage_root(storage), resume=resume)  # config, data and sizes: before Ray starts
    t0 = time.perf_counter()
    with connected(address, job_name=f"tbn-ray sweep {cfg.name}", log=log) as cluster:
        result = run_sweep(cfg, root, cluster)
    print(root.read_text("results.md"))
    log(
        f"sweep finished in {time.perf_counter() - t0:.0f} s; best: epsilon {result.best['epsilon']:g}, sigma {result.best['sigma']:g}"
    )
    log(f"results: {result.files['results.md']}, {result.files['heatmap.png']}, {result.files['best.json']}")


@app.command(cls=Command)
def reproduce(
    config: Annotated[
        Optional[Path], typer.Option("--config", "-c", help="reproduction YAML (default: configs/paper.yaml)")
    ] = None,
    storage: StorageOpt = None,
    stage: Annotated[
        Optional[list[str]],
        typer.Option(
            "--stage",
            help="train | calibrate | certify | evaluate | report, repeatable (default: all, in this order)",
            show_default=False,
        ),
    ] = None,
    progress: ProgressOpt = True,
) -> None:
    """The paper's claims on one experiment grid: train, calibrate, certify (TBN and clean statistics), evaluate,
    report; resumable: every stage skips the work already stored. Report in <storage>/reproduce/<name>/report.md."""
    from tbn_ray.config import load_reproduce_config
    from tbn_ray.jobs.reproduce import reproduce as run_reproduction
    from tbn_ray.store.reproduction import STAGES, Reproduction

    cfg = load_reproduce_config(config or shipped_config("paper.yaml"))
    root = storage_root(storage)
    t0 = time.perf_counter()
    files = run_reproduction(cfg, root, stages=stage or STAGES, progress=progress)
    if files:
        print(Reproduction.open(cfg, root).root.read_text("report.md"))
        log(f"report: {files['report.md']}, {files['certified_accuracy.png']}")
    log(
        f"reproduce {cfg.name}: stage(s) {', '.join(s for s in STAGES if s in (stage or STAGES))} finished in {time.perf_counter() - t0:.0f} s"
    )


def main() -> None:
    """Console entry point: user errors become one line and exit status 2; SIGTERM one line and 143."""
    from tbn_ray import signals

    signals.stop_on_sigterm()
    _warnings_as_lines()
    try:
        code = app(prog_name="tbn-ray", standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Abort:
        print("tbn-ray: aborted", file=sys.stderr)
        sys.exit(1)
    except Exception as e:
        if getattr(e, "exit_code", None) != 2 or not hasattr(e, "format_message"):  # not click's usage error
            _one_line_or_raise(e)
        ctx = getattr(e, "ctx", None)
        hint = (
            f" (see tbn-ray {ctx.command_path.removeprefix('tbn-ray').strip()} -h)".replace("  ", " ")
            if ctx is not None
            else ""
        )
        print(f"tbn-ray: error: {' '.join(e.format_message().split())}{hint}", file=sys.stderr)
        sys.exit(2)
    except BaseException as e:
        _one_line_or_raise(e)


def _warnings_as_lines() -> None:
    """A ``TbnWarning`` is one line on stderr, like an error; other warnings keep Python's form."""
    import warnings

    show = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        if issubclass(category, TbnWarning):
            print(f"tbn-ray: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = one_line


def _one_line_or_raise(e: BaseException) -> None:
    """SIGTERM and user errors end in one line; anything else is a bug and keeps its traceback."""
    from tbn_ray import signals

    if signals.received():
        print(
            "tbn-ray: stopped by SIGTERM; finished work is kept: run the same command again to resume", file=sys.stderr
        )
        sys.exit(signals.EXIT_STATUS)
    if isinstance(e, TbnError):
        print(f"tbn-ray: error: {e}", file=sys.stderr)
        sys.exit(2)
    raise e
