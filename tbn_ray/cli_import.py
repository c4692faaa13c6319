"""``tbn-ray import``: a model trained elsewhere becomes a run that calibrate, certify, evaluate
and show work on (``store.model_import``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tbn_ray.cli_options import Command, DataOpt, StorageOpt, data_override, storage_root
from tbn_ray.errors import log


def import_model(
    spec: Annotated[
        str,
        typer.Argument(
            metavar="SPEC",
            help="robustbench:<zoo name> (e.g. robustbench:Engstrom2019Robustness) or module:callable returning an nn.Module (e.g. my_models.resnet:ResNet18)",
            show_default=False,
        ),
    ],
    threat_model: Annotated[
        Optional[str],
        typer.Option(
            "--threat-model",
            help="robustbench: the zoo's threat model, L2 | Linf | corruptions (default: the only one listing the name)",
        ),
    ] = None,
    model_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--model-dir",
            help="robustbench: its model directory, <dir>/cifar10/<threat model>/<name>.pt; downloaded there if missing and online (default: ./models)",
        ),
    ] = None,
    weights: Annotated[
        Optional[Path],
        typer.Option(
            "--weights",
            help="the state_dict file (required for module:callable; for robustbench, instead of the zoo's weights)",
        ),
    ] = None,
    normalize: Annotated[
        Optional[tuple[str, str]],
        typer.Option(
            "--normalize",
            metavar="MEAN STD",
            help="module:callable taking normalised images: per-channel mean and std as comma lists, e.g. --normalize 0.4914,0.4822,0.4465 0.2471,0.2435,0.2616; put in front so the model takes [0, 1] images (default: none, the model takes [0, 1] images)",
        ),
    ] = None,
    name: Annotated[
        Optional[str],
        typer.Option(help="run name (default: <zoo name>-<threat model>, or <callable>-<weights sha256 prefix>)"),
    ] = None,
    storage: StorageOpt = None,
    data: DataOpt = None,
) -> None:
    """Import a model trained elsewhere (RobustBench's zoo, or any module:callable with a state_dict) as a run:
    then calibrate, certify, evaluate and show it like any run. The model must take [0, 1] images."""
    from tbn_ray.store.model_import import import_run, parse_normalize

    norm = parse_normalize(*normalize) if normalize is not None else None
    run, ckpt = import_run(
        spec,
        storage_root(storage),
        name=name,
        data=data_override(data),
        threat_model=threat_model,
        model_dir=model_dir,
        weights=weights,
        normalize=norm,
    )
    log(f"run: {run.uri}; next: tbn-ray calibrate {run.uri} --sigma 0.25")


#: ``import`` alone, for tests and for ``python -m tbn_ray.cli_import``; tbn-ray's own app registers the same function.
app = typer.Typer(add_completion=False, rich_markup_mode=None)
app.command("import", cls=Command)(import_model)


@app.callback()
def _group() -> None:
    """tbn-ray import."""


if __name__ == "__main__":
    app()
