"""What the ``tbn-ray`` commands share: their options, and how flags map onto the typed configs.

A flag that has a config field defaults to ``None`` (the YAML given with ``--config`` decides,
else the field's default in ``tbn_ray.config``), and its help shows that default, read from the
model: no default is written here.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer
from pydantic import BaseModel, BeforeValidator
from pydantic.fields import FieldInfo
from typer.core import TyperCommand

from tbn_ray.config import DataConfig, ExperimentConfig, RayConfig, TrainConfig, load_config, shown_default
from tbn_ray.config.base import _number
from tbn_ray.errors import TbnError
from tbn_ray.store.storage import DEFAULT_STORAGE


class Command(TyperCommand):
    """Usage lines write arguments as the README does (``RUN``), not as ``{RUN}``; an option of
    several values given too few is named in one line, before click takes the next option as one."""

    def collect_usage_pieces(self, ctx):  # type: ignore[no-untyped-def]
        return [piece.strip("{}") for piece in super().collect_usage_pieces(ctx)]

    def parse_args(self, ctx, args):  # type: ignore[no-untyped-def]
        for param in self.params:
            if getattr(param, "nargs", 1) <= 1 or not getattr(
                param, "opts", None
            ):  # typer vendors its own click: no isinstance
                continue
            for i, token in enumerate(args):
                if token not in param.opts:
                    continue
                values = args[i + 1 : i + 1 + param.nargs]
                flag = next((v for v in values if v.startswith("--")), None)
                if flag is not None or len(values) < param.nargs:
                    got = ", ".join(repr(v) for v in (values[: values.index(flag)] if flag else values)) or "nothing"
                    then = f" and then the option {flag}" if flag else ""
                    raise TbnError(
                        f"{token} takes {param.nargs} values ({param.metavar or 'values'}); it got {got}{then}"
                    )
        return super().parse_args(ctx, args)


def about(text: str, model: type[BaseModel], field: str) -> str:
    """A help text that ends with the field's default, as ``tbn_ray.config`` sets it."""
    return f"{text} (default: {shown_default(model, field)})"


def field_help(model: type[BaseModel], name: str, *, repeated: bool = False) -> str:
    """A flag's help, written once in the config: the field's description, its choices, and its
    default (or what decides it, where the description says so)."""
    info = model.model_fields[name]
    text = (info.description or name) + ("; repeatable" if repeated else "")
    if typing.get_origin(info.annotation) is Literal:
        text = f"{text}: {' | '.join(typing.get_args(info.annotation))}"
    if info.default is not None:
        return f"{text} (default: {shown_default(model, name)})"
    return text if "(default: " in text else f"{text} (default: none)"


RunArg = Annotated[
    str,
    typer.Argument(
        metavar="RUN", help="run directory (or a checkpoint file in it), local or s3://", show_default=False
    ),
]
ConfigOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--config", "-c", help="experiment YAML, configs/*.yaml (default: none, every default from tbn_ray/config/)"
    ),
]
DataOpt = Annotated[
    Optional[str],
    typer.Option(
        "--data", help=about("CIFAR-10 source: auto | official | jpeg | partial; env TBN_DATA", DataConfig, "source")
    ),
]
DeviceOpt = Annotated[
    Optional[str], typer.Option("--device", help=about("auto | cpu | cuda | cuda:N", TrainConfig, "device"))
]
LocalDeviceOpt = Annotated[
    Optional[str],
    typer.Option("--device", help=about("with --local: auto | cpu | cuda | cuda:N", TrainConfig, "device")),
]
StorageOpt = Annotated[
    Optional[str],
    typer.Option(
        "--storage",
        help=f"results root: a directory or s3://bucket/prefix (default: $TBN_STORAGE, else {DEFAULT_STORAGE})",
    ),
]
AddressOpt = Annotated[
    Optional[str],
    typer.Option(
        help="Ray cluster to join: auto | host:port (default: $RAY_ADDRESS, else a local instance with the dashboard)"
    ),
]
ActorsOpt = Annotated[Optional[int], typer.Option(help=field_help(RayConfig, "actors"))]
GpusPerActorOpt = Annotated[Optional[float], typer.Option(help=field_help(RayConfig, "gpus_per_actor"))]
CpusPerActorOpt = Annotated[Optional[float], typer.Option(help=field_help(RayConfig, "cpus_per_actor"))]
ProgressOpt = Annotated[
    bool, typer.Option("--progress/--no-progress", help="show a progress bar (default: on)", show_default=False)
]
IndicesOpt = Annotated[
    Optional[str], typer.Option(help="test indices START:STOP, STOP excluded (default: every test image of the source)")
]

#: The flags of a ``config_options`` group as the command receives them: flag -> (dotted field, value or None).
Settings = dict[str, tuple[str, Any]]

#: Ray placement flags of certify and evaluate: flag -> config field.
POOL_FLAGS = {
    "--actors": "ray.actors",
    "--gpus-per-actor": "ray.gpus_per_actor",
    "--cpus-per-actor": "ray.cpus_per_actor",
}


def load_flags(config: Path | None, flags: dict[str, tuple[str, Any]]) -> ExperimentConfig:
    """The experiment config with the flags given applied: ``{flag: (dotted field, value or None)}``.
    A bad value is a one-line error that names its flag."""
    given = {
        field: flag for flag, (field, value) in flags.items() if value is not None
    }  # a YAML value is named by its file and key
    return load_config(config, flags=given, **dict(flags.values()))


def check_local(local: bool, device: str | None, gpu_flag: str, ray_flags: dict[str, Any]) -> None:
    """Flags that only make sense with Ray (or only with ``--local``) are refused before anything starts."""
    given = [flag for flag, value in ray_flags.items() if value is not None]
    if local and given:
        raise TbnError(f"{', '.join(given)} need Ray: drop --local")
    if not local and device is not None:
        raise TbnError(f"--device applies to --local runs; on Ray, {gpu_flag} decides (0: CPU)")


def pool_options(ray: RayConfig) -> dict[str, Any]:
    """The actor pool's shape as ``run_plan_on_ray`` takes it."""
    return {"actors": ray.actors, "gpus_per_actor": ray.gpus_per_actor, "cpus_per_actor": ray.cpus_per_actor}


def index_range(text: str) -> tuple[int, int]:
    start, sep, stop = text.partition(":")
    try:
        first, last = int(start), int(stop)
    except ValueError:
        first = last = -1
    if not sep or not 0 <= first < last:
        raise TbnError(f"--indices {text!r}: use START:STOP with 0 <= START < STOP, e.g. 0:10000")
    return first, last


def parse_indices(text: str | None) -> tuple[int | None, int | None]:
    return index_range(text) if text is not None else (None, None)


def data_override(source: str | None) -> DataConfig | None:
    from tbn_ray.config import parse_config

    return None if source is None else parse_config(DataConfig, {"source": source}, "--data")


def storage_root(storage: str | None):  # type: ignore[no-untyped-def]
    from tbn_ray.store.storage import Storage, default_storage_uri

    return Storage.open(storage or default_storage_uri())


#: Errors about what a run holds, where ``tbn-ray show RUN`` helps (not credentials, not the data's range).
_ABOUT_THE_RUN = ("no checkpoint", "no TBN statistics", "no certification", "no evaluation", "nothing stored")


@contextmanager
def about_run(run: str) -> Iterator[None]:
    """A missing checkpoint, statistics set or result in ``run`` points the user at ``tbn-ray show``."""
    try:
        yield
    except TbnError as e:
        if str(e).startswith(_ABOUT_THE_RUN) and "tbn-ray show" not in str(e):
            raise type(e)(f"{e} (tbn-ray show {run} lists what the run holds)") from None
        raise


def require_ray(alternative: str) -> None:
    """A one-line error where Ray is not installed."""
    try:
        import ray  # noqa: F401
    except ImportError as e:
        raise TbnError(f"Ray is not installed ({e.name}): pip install 'tbn-ray[ray]'{alternative}") from None


@dataclass(frozen=True)
class Where:
    """Where a sharded job runs: in this process (``--local``, ``--device``) or on a Ray actor pool."""

    local: bool
    device: str | None
    address: str | None
    actors: int | None
    gpus_per_actor: float | None
    cpus_per_actor: float | None
    progress: bool

    def flags(self) -> dict[str, tuple[str, Any]]:
        """The device and pool flags as ``load_flags`` takes them, after the local-versus-Ray check."""
        pool = {
            "--actors": self.actors,
            "--gpus-per-actor": self.gpus_per_actor,
            "--cpus-per-actor": self.cpus_per_actor,
        }
        check_local(self.local, self.device, "--gpus-per-actor", {"--address": self.address, **pool})
        return {"--device": ("train.device", self.device), **{f: (POOL_FLAGS[f], v) for f, v in pool.items()}}


def option_group(
    param: str, make: Callable[..., Any], options: dict[str, tuple[Any, Any, Any]]
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the flags ``options`` (name -> (type, typer option, default)), declared once
    for every command that takes them; the command receives them as one argument ``param``,
    ``make(**values)``. The flags follow the command's own in its help."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command, eval_str=True)
        kept = [p for name, p in signature.parameters.items() if name != param]
        added = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option])
            for name, (kind, option, default) in options.items()
        ]

        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            value = make(**{name: kwargs.pop(name) for name in options})
            return command(*args, **{param: value}, **kwargs)

        run.__signature__ = signature.replace(parameters=[*kept, *added])  # type: ignore[attr-defined]
        run.__annotations__ = {k: v for k, v in command.__annotations__.items() if k != param}
        return run

    return decorate


def _flag_type(info: FieldInfo) -> tuple[Any, bool]:
    """The CLI type of a config field, and whether it is a repeatable list. A ``Number`` field's flag
    takes text, so that ``8/255`` reaches the config that reads it."""
    if any(isinstance(m, BeforeValidator) and m.func is _number for m in info.metadata):
        return str, False
    return _annotation_type(info.annotation)


def _annotation_type(annotation: Any) -> tuple[Any, bool]:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is tuple:
        inner = typing.get_args(args[0])[0] if typing.get_origin(args[0]) is Annotated else args[0]
        return list[inner], True  # type: ignore[valid-type]
    if origin is Literal:
        return str, False
    if origin in (typing.Union, types.UnionType):
        return _annotation_type(args[0])
    return annotation, False


def _owner(model: type[BaseModel], dotted: str) -> tuple[type[BaseModel], str]:
    """The config model that declares a dotted field (``optim.epochs`` of the train section), and its name."""
    *parents, name = dotted.split(".")
    for parent in parents:
        model = type(model.model_fields[parent].default)
    return model, name


def config_options(
    section: str,
    model: type[BaseModel],
    *,
    only: tuple[str, ...] | None = None,
    skip: tuple[str, ...] = (),
    rename: dict[str, str] | None = None,
    param: str = "settings",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One flag per field of ``model`` (the ``section`` of the experiment config), or per field of
    ``only`` (dotted into nested sections), named, typed and described by the field itself, so a
    field added to the config is a flag at once. The command receives them as one argument
    ``param``: ``{flag: (dotted field, value or None)}``, as ``load_flags`` takes it."""
    rename = rename or {}
    if only is None:
        only = tuple(
            n for n, info in model.model_fields.items() if n not in skip and not isinstance(info.default, BaseModel)
        )
    options: dict[str, tuple[Any, Any, Any]] = {}
    fields: dict[str, tuple[str, str]] = {}
    for dotted in only:
        owner, name = _owner(model, dotted)
        info = owner.model_fields[name]
        kind, repeated = _flag_type(info)
        flag = rename.get(dotted, "--" + name.replace("_", "-"))
        decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
        key = f"{param}_{dotted.replace('.', '_')}"
        help_text = field_help(owner, name, repeated=repeated)
        options[key] = (Optional[kind], typer.Option(*decls, help=help_text, show_default=False), None)
        fields[key] = (flag, f"{section}.{dotted}")

    def make(**values: Any) -> dict[str, tuple[str, Any]]:
        return {fields[k][0]: (fields[k][1], v if v != [] else None) for k, v in values.items()}

    return option_group(param, make, options)


def where_options(local_help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options that say where a sharded job runs, as one ``where: Where`` argument."""
    return option_group(
        "where",
        Where,
        {
            "local": (bool, typer.Option("--local", help=local_help), False),
            "address": (Optional[str], AddressOpt.__metadata__[0], None),
            "actors": (Optional[int], ActorsOpt.__metadata__[0], None),
            "gpus_per_actor": (Optional[float], GpusPerActorOpt.__metadata__[0], None),
            "cpus_per_actor": (Optional[float], CpusPerActorOpt.__metadata__[0], None),
            "device": (Optional[str], LocalDeviceOpt.__metadata__[0], None),
            "progress": (bool, ProgressOpt.__metadata__[0], True),
        },
    )
