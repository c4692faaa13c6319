"""The Python API: one function per question, on an ``nn.Module`` or a stored run.

    import tbn_ray
    stats = tbn_ray.calibrate(model, sigmas=[0.25, 0.5])                 # frozen per-sigma BN statistics
    result = tbn_ray.certify(model, stats, sigma=0.25, n=100_000, skip=20)  # result.table(), result.to_pandas()

Keyword settings are fields of the typed configs (``CalibrateConfig``, ``CertifyConfig``,
``EvaluateConfig``), validated there with the CLI's defaults: the API, like the CLI, only maps
onto them (``sigma=`` is one sigma of ``sigmas``). The work runs in this process, through the
same plans, shards and files as ``tbn-ray ... --local``, so the same seeds give the same records.
A model passed as a module must take [0, 1] images (normalisation inside it); its results go to a
temporary folder, or under ``storage`` where they are kept and a second call resumes.
"""

from __future__ import annotations

import copy
import hashlib
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel
from torch import nn

from tbn_ray.config import (
    CalibrateConfig,
    CertifyConfig,
    DataConfig,
    EvaluateConfig,
    ModelConfig,
    ModelSource,
    TrainConfig,
    parse_config,
)
from tbn_ray.errors import TbnError
from tbn_ray.store.runs import Checkpoint, Run, hash_weights, usable_bn_sets
from tbn_ray.store.storage import Storage

ModelLike = nn.Module | Run | str | Path


def _settings(model: type[BaseModel], base: BaseModel | None, given: Mapping[str, Any], where: str) -> Any:
    """A config from ``base`` (or the defaults) with the keyword settings applied, validated once."""
    raw = base.model_dump() if base is not None else {}
    return parse_config(model, {**raw, **given}, where, {k: f"{k}=" for k in given})


@dataclass(frozen=True)
class ModuleRun(Run):
    """A run whose model is a module in memory: its checkpoint is made, not read, and its
    statistics and results live in ``storage`` like any run's."""

    network: nn.Module = field(default=None, compare=False)  # type: ignore[assignment]
    data: DataConfig = DataConfig()
    name: str = "module"
    temporary: bool = False  # its folder is removed after the call: errors name the stats= given instead

    @property
    def stats_origin(self) -> str:
        return "the stats= given" if self.temporary else f"the stats= given and {self.storage.uri}"

    def calibrate_hint(self, sigma: str) -> str:
        return f"calibrate it with tbn_ray.calibrate(model, sigmas=[{sigma}]) and pass the result as stats="

    def has_checkpoint(self) -> bool:
        return True

    def load_checkpoint(self) -> Checkpoint:
        state = {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}
        h = hashlib.sha256()
        hash_weights(h, state)
        cls = type(self.network)
        source = ModelSource(kind="callable", name=f"{cls.__module__}:{cls.__qualname__}", weights_sha256=h.hexdigest())
        cfg = TrainConfig(name=self.name, model=ModelConfig(arch="imported", source=source), data=self.data)
        return Checkpoint(model=state, config=cfg, epoch=0, meta={"source": "a module passed to the Python API"})

    def load_model(self, device: torch.device | str = "cpu") -> tuple[nn.Module, Checkpoint]:
        return copy.deepcopy(self.network).to(device).eval(), self.load_checkpoint()


class _Table:
    """Results that read as rows, for pandas."""

    def rows(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def to_pandas(self):  # type: ignore[no-untyped-def]
        """The rows as a pandas DataFrame (pandas is imported only when asked for)."""
        import pandas as pd

        return pd.DataFrame(self.rows())


@dataclass(frozen=True)
class Calibration(_Table):
    """Frozen BN statistics: "clean" plus one set per sigma, each with what it was estimated from."""

    sets: dict[str, dict[str, Any]]

    def rows(self) -> list[dict[str, Any]]:
        """One row per statistics set: its name and the scalar facts of how it was estimated."""
        return [
            {"set": name, **{k: v for k, v in entry.get("meta", {}).items() if not isinstance(v, (dict, list))}}
            for name, entry in self.sets.items()
        ]


@dataclass(frozen=True)
class Certification(_Table):
    """Per-sigma certificates: ``records`` in Cohen's format plus vote counts, ``summaries`` with
    certified accuracy at the report radii, ACR and every parameter that produced them."""

    run_id: str
    location: str | None  # where the files are kept (None: a temporary folder, removed)
    records: dict[float, list[dict[str, Any]]]
    summaries: dict[float, dict[str, Any]]

    def rows(self) -> list[dict[str, Any]]:
        """One row per (sigma, image): sigma, idx, label, predict, radius, correct, p_a_lower, ..."""
        return [{"sigma": sigma, **r} for sigma, recs in self.records.items() for r in recs]

    def certified_accuracy(self, sigma: float, radius: float) -> float:
        """The share of the certified images that are correct with a radius of at least ``radius``,
        at ``sigma`` (any radius, not only the report radii)."""
        from tbn_ray.science.smoothing import summarize

        return float(next(iter(summarize(self._at(sigma), radii=[radius])["certified_accuracy"].values())))

    def acr(self, sigma: float) -> float:
        """The average certified radius at ``sigma``: mean of radius x correct."""
        return float(self._summary(sigma)["acr"])

    def _summary(self, sigma: float) -> dict[str, Any]:
        key = next((k for k in self.summaries if abs(k - sigma) < 1e-12), None)
        if key is None:
            raise TbnError(
                f"no certification at sigma {sigma:g} here; certified: {', '.join(f'{k:g}' for k in self.summaries)}"
            )
        return self.summaries[key]

    def _at(self, sigma: float) -> list[dict[str, Any]]:
        self._summary(sigma)
        return next(v for k, v in self.records.items() if abs(k - sigma) < 1e-12)

    def table(self) -> str:
        """The certified-accuracy table (markdown), as ``tbn-ray certify`` prints it."""
        from tbn_ray.reports.certify import accuracy_table

        return accuracy_table([{**s, "params": s} for s in self.summaries.values()])


@dataclass(frozen=True)
class Evaluation(_Table):
    """One evaluation's result.json: per BN mode, accuracies per corruption/severity or per attack."""

    eval_id: str
    location: str | None
    result: dict[str, Any]

    def accuracy(self, mode: str, attack: str | None = None) -> float:
        """Accuracy of BN ``mode`` (``clean``, ``sigma:0.25``, ``test-batch``...): under ``attack``
        (``pgd``, ``apgd-ce``, ``autoattack``, ``worst_case``; its standard variant) for an attack
        evaluation, or the mean over corruptions and severities for a corruption evaluation."""
        modes = self.result["modes"]
        key = next((k for k, v in modes.items() if k == mode or v.get("spec") == mode), None)
        if key is None:
            raise TbnError(f"no BN mode {mode!r} in this evaluation; evaluated: {', '.join(modes)}")
        body = modes[key]
        if "variants" not in body:
            if attack is not None:
                raise TbnError("a corruption evaluation has no attacks: call accuracy(mode)")
            return float(body["mean"])
        row = body["variants"]["standard"]
        if attack is None or attack not in row:
            known = [k for k in row if k not in ("images", "clean_accuracy")]
            raise TbnError(f"name the attack: one of {', '.join(known)}")
        return float(row[attack])

    def rows(self) -> list[dict[str, Any]]:
        """One row per BN mode (and attack variant): its accuracies and the settings that produced them."""
        out = []
        for mode, body in self.result["modes"].items():
            if "variants" in body:  # attacks: one row per variant
                for variant, row in body["variants"].items():
                    out.append({"bn": mode, "variant": variant, **{k: v for k, v in row.items() if k != "definition"}})
            else:
                out.append(
                    {
                        "bn": mode,
                        **{k: v for k, v in body.items() if not isinstance(v, (dict, list)) and k != "definition"},
                    }
                )
        return out


@contextmanager
def _run_of(
    model: ModelLike,
    stats: Calibration | Mapping[str, Any] | None,
    storage: str | Path | None,
    name: str | None,
    data: str | DataConfig | None,
) -> Iterator[tuple[Run, str | None]]:
    """The run a call works on and where its files are kept (None: a temporary folder, removed after)."""
    if isinstance(model, (str, Path)):
        model = Run.open(str(model))
    if isinstance(model, Run):
        if stats is not None:
            raise TbnError(
                "stats= is for a module; a run holds its own (tbn_ray.calibrate(run, ...) stores them there)"
            )
        yield model, model.uri
        return
    if not isinstance(model, nn.Module):
        raise TbnError(f"model must be an nn.Module, a run directory or a Run, got {type(model).__name__}")
    data_cfg = data if isinstance(data, DataConfig) else DataConfig(source=data or "auto")
    tmp = None if storage is not None else tempfile.mkdtemp(prefix="tbn-ray-")
    root = Storage.open(str(storage) if storage is not None else tmp)
    # the caller's module is left as it was (mode, device): the run works on a copy, and without a
    # name= its folder is named by the weights, so two modules of one class never share statistics
    network = copy.deepcopy(model).cpu().eval()
    label = name or f"{type(model).__name__}-{_weights_digest(network)[:12]}"
    run = ModuleRun(root.child(label), network=network, data=data_cfg, name=label, temporary=tmp is not None)
    try:
        if stats is not None:
            given = dict(stats.sets) if isinstance(stats, Calibration) else stats
            if not usable_bn_sets(given):
                raise TbnError(
                    "stats= must be what tbn_ray.calibrate returns (or its .sets: {'sigma=0.25': {'stats': ..., 'meta': ...}}), "
                    f"got {type(stats).__name__}"
                )
            given = dict(given)
            held = run.load_bn_sets()
            _no_other_statistics(held, given, run.uri)
            run.save_bn_sets({**held, **given})
        yield run, None if tmp else run.uri
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def load_model(
    spec: str | Path,
    *,
    weights: str | Path | None = None,
    threat_model: str | None = None,
    normalize: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None,
) -> nn.Module:
    """The model ``spec`` names, in eval mode, taking [0, 1] images: a run (its name under the
    storage root, its directory or a checkpoint file), ``robustbench:NAME`` (RobustBench's zoo,
    ``threat_model`` when the name is listed under several), or ``module:callable`` with its
    ``weights`` (a state_dict file; ``normalize``: (mean, std) put in front)."""
    from tbn_ray.store.model_import import imported_model

    text = str(spec)
    if text.startswith("robustbench:") or (":" in text and "://" not in text and not Path(text).exists()):
        model, _ = imported_model(text, threat_model=threat_model, weights=weights, normalize=normalize)
        return model
    if weights is not None or threat_model is not None or normalize is not None:
        raise TbnError(
            "weights=, threat_model= and normalize= are for robustbench:NAME and module:callable; a run holds its own"
        )
    return Run.open(text).load_model()[0]


def _weights_digest(network: nn.Module) -> str:
    h = hashlib.sha256()
    hash_weights(h, {k: v.detach().cpu() for k, v in network.state_dict().items()})
    return h.hexdigest()


def _same_set(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    sa, sb = a.get("stats", {}), b.get("stats", {})

    def same(x: Any, y: Any) -> bool:
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            return x.shape == y.shape and torch.equal(x, y)
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        return x == y

    return same(sa, sb)


def _no_other_statistics(held: Mapping[str, Any], given: Mapping[str, Any], where: str) -> None:
    """``stats=`` may add statistics sets to a module's stored run, never replace one it holds."""
    for key, value in given.items():
        if key in held and not _same_set(held[key], value):
            raise TbnError(
                f"{where} already holds other {key} statistics than the stats= given: pass another name=, or the stats stored there"
            )


def calibrate(
    model: ModelLike,
    *,
    config: CalibrateConfig | None = None,
    storage: str | Path | None = None,
    name: str | None = None,
    data: str | DataConfig | None = None,
    device: str = "auto",
    progress: bool = False,
    replace: bool = False,
    **settings: Any,
) -> Calibration:
    """TBN: BN statistics estimated once per sigma on Gaussian-noised held-out training images
    (never the test set), returned (and, for a run, stored in its bn_stats.pt). ``settings``:
    ``CalibrateConfig`` fields (sigmas, samples, batch_size, seed). A set stored with other
    settings is refused unless ``replace``."""
    from tbn_ray.jobs.pipeline import calibrate_run

    cfg = _settings(CalibrateConfig, config, settings, "tbn_ray.calibrate")
    with _run_of(model, None, storage, name, data) as (run, _):
        override = (
            None
            if isinstance(run, ModuleRun) or data is None
            else (data if isinstance(data, DataConfig) else DataConfig(source=data))
        )
        return Calibration(
            calibrate_run(run, cfg, data_cfg=override, device=device, progress=progress, replace=replace)
        )


def certify(
    model: ModelLike,
    stats: Calibration | Mapping[str, Any] | None = None,
    *,
    config: CertifyConfig | None = None,
    storage: str | Path | None = None,
    name: str | None = None,
    data: str | DataConfig | None = None,
    device: str = "auto",
    progress: bool = False,
    **settings: Any,
) -> Certification:
    """Cohen's CERTIFY on the selected test images at each sigma, with that sigma's frozen TBN
    statistics (``bn="tbn"``, from ``stats`` for a module) or the clean ones (``bn="clean"``).
    ``settings``: ``CertifyConfig`` fields (``sigma=`` for one sigma); with probability at least
    1 - alpha per image, each non-abstaining prediction holds within its radius."""
    from tbn_ray.devices import resolve_device
    from tbn_ray.jobs.certify import plan_certify, run_plan_in_process
    from tbn_ray.store.certify_layout import certify_output
    from tbn_ray.store.results import read_results

    if "sigma" in settings:
        if "sigmas" in settings:
            raise TbnError("give sigma= or sigmas=, not both")
        settings["sigmas"] = [settings.pop("sigma")]
    cfg = _settings(CertifyConfig, config, settings, "tbn_ray.certify")
    with _run_of(model, stats, storage, name, data) as (run, kept):
        if data is not None and not isinstance(run, ModuleRun):
            cfg = cfg.model_copy(update={"data": data if isinstance(data, DataConfig) else DataConfig(source=data)})
        dev = resolve_device(device)
        result = run_plan_in_process(
            plan_certify(run, cfg, certify_output(run), device_type=dev.type), dev, progress=progress
        )
        records, summaries = {}, {}
        for o in result.outputs:
            records[o.sigma], summaries[o.sigma] = read_results(o.location)[0], o.summary
        return Certification(result.run_id, result.location if kept else None, records, summaries)


def _evaluation(
    kind: Literal["attack", "corruptions"],
    model: ModelLike,
    stats: Calibration | Mapping[str, Any] | None,
    *,
    bn: Sequence[str] | str,
    config: EvaluateConfig | None,
    storage: str | Path | None,
    name: str | None,
    data: str | DataConfig | None,
    device: str,
    progress: bool,
    settings: dict[str, Any],
) -> Evaluation:
    """The one body of ``evaluate_attack`` and ``evaluate_corruptions``: the same run, modes and
    images; only the plan differs."""
    from tbn_ray.devices import resolve_device
    from tbn_ray.jobs.evaluate import run_in_process

    bn = [bn] if isinstance(bn, str) else bn  # bn="clean" is one mode, not the letters of one
    indices = settings.pop("indices", None)
    ev = _settings(EvaluateConfig, config, settings, f"tbn_ray.evaluate_{kind}")
    start, stop = indices if indices is not None else (None, None)
    with _run_of(model, stats, storage, name, data) as (run, kept):
        override = (
            None
            if isinstance(run, ModuleRun) or data is None
            else (data if isinstance(data, DataConfig) else DataConfig(source=data))
        )
        if kind == "attack":
            from tbn_ray.jobs.evaluate_attack import plan_attack

            plan = plan_attack(
                run,
                list(bn),
                ev,
                data_cfg=override,
                start=start,
                stop=stop,
            )
        else:
            from tbn_ray.jobs.evaluate_corruptions import plan_corruptions

            plan = plan_corruptions(
                run,
                list(bn),
                ev,
                data_cfg=override,
                start=start,
                stop=stop,
                progress=progress,
            )
        result = run_in_process(plan, resolve_device(device), progress=progress)
        return Evaluation(result.eval_id, result.location if kept else None, result.result)


def evaluate_attack(
    model: ModelLike,
    stats: Calibration | Mapping[str, Any] | None = None,
    *,
    bn: Sequence[str] = ("clean",),
    config: EvaluateConfig | None = None,
    storage: str | Path | None = None,
    name: str | None = None,
    data: str | DataConfig | None = None,
    device: str = "auto",
    progress: bool = False,
    **settings: Any,
) -> Evaluation:
    """Empirical robustness per BN mode (``bn``: clean, sigma:<s>, test-batch[:N]) under the
    attacks of ``settings`` (``EvaluateConfig`` fields: attacks, norm, eps, attack_steps, ...;
    ``indices=(start, stop)`` of the test set)."""
    return _evaluation(
        "attack",
        model,
        stats,
        bn=bn,
        config=config,
        storage=storage,
        name=name,
        data=data,
        device=device,
        progress=progress,
        settings=settings,
    )


def evaluate_corruptions(
    model: ModelLike,
    stats: Calibration | Mapping[str, Any] | None = None,
    *,
    bn: Sequence[str] = ("clean",),
    config: EvaluateConfig | None = None,
    storage: str | Path | None = None,
    name: str | None = None,
    data: str | DataConfig | None = None,
    device: str = "auto",
    progress: bool = False,
    **settings: Any,
) -> Evaluation:
    """CIFAR-10-C accuracy (regenerated, seeded) per corruption and severity for each BN mode
    (``settings``: ``EvaluateConfig`` fields corruptions, severities, batch_size, cifar10c_seed;
    ``indices=(start, stop)``)."""
    return _evaluation(
        "corruptions",
        model,
        stats,
        bn=bn,
        config=config,
        storage=storage,
        name=name,
        data=data,
        device=device,
        progress=progress,
        settings=settings,
    )
