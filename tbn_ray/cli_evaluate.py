"""``tbn-ray data`` and ``tbn-ray evaluate``: CIFAR-10-C, and robustness per BN mode.

Their defaults are the ``evaluate`` section of the experiment config (``config.EvaluateConfig``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from tbn_ray.cli_options import (
    Command,
    ConfigOpt,
    DataOpt,
    IndicesOpt,
    ProgressOpt,
    RunArg,
    Settings,
    StorageOpt,
    Where,
    about_run,
    config_options,
    data_override,
    load_flags,
    option_group,
    parse_indices,
    pool_options,
    require_ray,
    storage_root,
    where_options,
)
from tbn_ray.config import EvaluateConfig, ExperimentConfig
from tbn_ray.errors import log


def _help_when_bare(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit()


data_app = typer.Typer(
    rich_markup_mode=None,
    invoke_without_command=True,
    callback=_help_when_bare,
    help="Data sets derived from CIFAR-10, cached in the storage layer.",
)
evaluate_app = typer.Typer(
    rich_markup_mode=None,
    invoke_without_command=True,
    callback=_help_when_bare,
    help="Corruption (CIFAR-10-C) and adversarial robustness per BN mode, sharded across Ray actors.",
)


@dataclass(frozen=True)
class Cifar10cChoice:
    """Which test images' CIFAR-10-C arrays a command writes or reads: regenerated (the corruptions,
    severities and seed are the ``evaluate`` section's flags) or imported from the released files."""

    indices: str | None
    released: Path | None


#: The options of ``Cifar10cChoice``, for every command that reads or writes CIFAR-10-C.
cifar10c_options = option_group(
    "cifar10c",
    Cifar10cChoice,
    {
        "indices": (Optional[str], IndicesOpt.__metadata__[0], None),
        "released": (
            Optional[Path],
            typer.Option(
                help="folder of the released CIFAR-10-C (<corruption>.npy, labels.npy), imported instead of regenerated (default: regenerate)"
            ),
            None,
        ),
    },
)
#: The ``evaluate`` section's CIFAR-10-C fields as flags.
cifar10c_settings = config_options(
    "evaluate",
    EvaluateConfig,
    only=("corruptions", "severities", "cifar10c_seed"),
    rename={"cifar10c_seed": "--seed"},
    param="corruption_settings",
)
BnOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--bn",
        help="BN mode, repeatable: clean | sigma:<s> (calibrated TBN set) | test-batch | test-batch:<N> (prior mixing) (required, at least one)",
    ),
]


def _evaluate_config(config: Path | None, flags: dict[str, tuple[str, Any]], where: Where) -> ExperimentConfig:
    """Local-versus-Ray checks, then the experiment config with the flags applied."""
    return load_flags(config, {**flags, **where.flags()})


def _run_evaluation(plan, cfg: ExperimentConfig, where: Where) -> None:  # type: ignore[no-untyped-def]
    """The planned evaluation in this process (--local) or on Ray; prints the run's evaluation report."""
    from tbn_ray.devices import resolve_device
    from tbn_ray.jobs.evaluate import run_in_process
    from tbn_ray.reports.evaluation import evaluation_section
    from tbn_ray.store.storage import Storage

    if where.local:
        result = run_in_process(plan, resolve_device(cfg.train.device), progress=where.progress)
    else:
        require_ray(", or evaluate in this process with --local")
        from tbn_ray.distributed.evaluate import run_plan_on_ray
        from tbn_ray.distributed.runtime import connected

        with connected(where.address, job_name=f"tbn-ray evaluate {plan.job_id}", log=log) as cluster:
            result = run_plan_on_ray(plan, cluster, **pool_options(cfg.ray), progress=where.progress)
    print(evaluation_section(Storage.open(plan.run_uri), image=None))
    log(
        f"results in {result.location}: {result.items_computed} item(s) computed now, {result.items_skipped} reused; report {result.report}"
    )


@data_app.command("cifar10c", cls=Command)
@cifar10c_settings
@cifar10c_options
def data_cifar10c(
    data: DataOpt = None,
    storage: StorageOpt = None,
    progress: ProgressOpt = True,
    cifar10c: Cifar10cChoice = None,  # type: ignore[assignment]  (the options of cifar10c_options)
    corruption_settings: Settings = None,  # type: ignore[assignment]  (the options of cifar10c_settings)
) -> None:
    """Regenerate CIFAR-10-C from the test set once (Hendrycks & Dietterich's CIFAR parameters, seeded),
    one array per corruption and severity under <storage>/cifar10c/; or import the released files (--released)."""
    import numpy as np

    from tbn_ray.jobs.evaluate import select_test
    from tbn_ray.science.corruptions import parse_corruptions, parse_severities
    from tbn_ray.store.cifar10 import load_from_config
    from tbn_ray.store.cifar10c import generate_cifar10c, regenerated_cifar10c, released_cifar10c

    ev = load_flags(None, corruption_settings).evaluate
    names, levels = parse_corruptions(ev.corruptions), parse_severities(ev.severities)
    start, stop = parse_indices(cifar10c.indices)
    root = storage_root(storage)
    root.check()
    released = cifar10c.released
    if released is not None:
        c10c = released_cifar10c(
            root, released, np.arange(start or 0, 10_000 if stop is None else stop), names, levels, progress=progress
        )
        c10c.write_metadata()
        log(
            f"{c10c.description}: {len(names)} x {len(levels)} arrays of {len(c10c.index)} images in {c10c.storage.uri}"
        )
        return
    d = load_from_config(data_override(data or "auto"))
    c10c = regenerated_cifar10c(
        root, select_test(d, start, stop), seed=ev.cifar10c_seed, data_description=d.description
    )
    written, present = generate_cifar10c(c10c, names, levels, progress=progress)
    log(
        f"{c10c.description}: {written} array(s) written, {present} already there, {len(c10c.index)} images each -> {c10c.storage.uri}"
    )
    log(f"sample grid: {c10c.storage.object_uri('sample_grid.png')}")


@evaluate_app.command("corruptions", cls=Command)
@where_options("evaluate in this process, without Ray")
@cifar10c_settings
@config_options("evaluate", EvaluateConfig, only=("batch_size",))
@cifar10c_options
def evaluate_corruptions(
    run: RunArg,
    bn: BnOpt = None,
    config: ConfigOpt = None,
    storage: Annotated[
        Optional[str],
        typer.Option(
            help="root of the CIFAR-10-C cache, as tbn-ray data cifar10c --storage (default: the run's parent)"
        ),
    ] = None,
    data: DataOpt = None,
    cifar10c: Cifar10cChoice = None,  # type: ignore[assignment]  (the options of cifar10c_options)
    settings: Settings = None,  # type: ignore[assignment]  (the evaluate section's batch size)
    corruption_settings: Settings = None,  # type: ignore[assignment]  (the options of cifar10c_settings)
    where: Where = None,  # type: ignore[assignment]  (the options of where_options)
) -> None:
    """Accuracy on CIFAR-10-C per corruption and severity for each BN mode, into RUN/evaluate/;
    resumable: the same command again skips finished items. Missing arrays are generated and cached."""
    from tbn_ray.jobs.evaluate_corruptions import plan_corruptions
    from tbn_ray.store.runs import Run

    cfg = _evaluate_config(config, {**settings, **corruption_settings}, where)
    ev = cfg.evaluate
    start, stop = parse_indices(cifar10c.indices)
    with about_run(run):
        plan = plan_corruptions(
            Run.open(run),
            bn or [],
            ev,
            cache_root=storage_root(storage) if storage else None,
            released=cifar10c.released,
            data_cfg=data_override(data),
            start=start,
            stop=stop,
            progress=where.progress,
        )
    _run_evaluation(plan, cfg, where)


@evaluate_app.command("attack", cls=Command)
@where_options("evaluate in this process, without Ray")
@config_options(
    "evaluate",
    EvaluateConfig,
    only=("norm", "eps", "attacks", "attack_steps", "restarts", "step_size", "batch_size", "seed"),
    rename={"attacks": "--attack", "attack_steps": "--steps"},
)
def evaluate_attack(
    run: RunArg,
    bn: BnOpt = None,
    config: ConfigOpt = None,
    indices: IndicesOpt = None,
    data: DataOpt = None,
    settings: Settings = None,  # type: ignore[assignment]  (the evaluate section's attack flags)
    where: Where = None,  # type: ignore[assignment]  (the options of where_options)
) -> None:
    """Empirical robustness (PGD, APGD-CE, AutoAttack) for each BN mode; test-batch modes are attacked through
    their batch statistics (not by AutoAttack). Into RUN/evaluate/; resumable like certify."""
    from tbn_ray.jobs.evaluate_attack import plan_attack
    from tbn_ray.store.runs import Run

    cfg = _evaluate_config(config, settings, where)
    ev = cfg.evaluate
    start, stop = parse_indices(indices)
    with about_run(run):
        plan = plan_attack(
            Run.open(run),
            bn or [],
            ev,
            data_cfg=data_override(data),
            start=start,
            stop=stop,
        )
    _run_evaluation(plan, cfg, where)
