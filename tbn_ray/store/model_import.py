"""Models trained elsewhere, stored as ordinary tbn-ray runs (``tbn-ray import``).

The weights are read once (RobustBench's ``load_model`` from its model directory, or a
state_dict file for a ``module:callable``), fitted to the architecture, and written into a
run directory as a tbn-ray checkpoint at epoch 0 whose config says where the model came
from (``config.ModelSource``: zoo name and threat model, or callable and the weights'
sha256). From then on calibrate, certify, evaluate and show treat it like any run; the
architecture is rebuilt from the source (``science.external``), the weights come from the
checkpoint, so the original file is no longer needed.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tbn_ray.config import DataConfig, ModelConfig, ModelSource, TrainConfig
from tbn_ray.errors import SoundnessError, TbnError, log
from tbn_ray.science.external import (
    Normalized,
    build_architecture,
    import_robustbench,
    split_callable,
    zoo_constructor,
    zoo_threat_models,
)
from tbn_ray.science.smoothing import check_fixed_classifier, check_fixed_function
from tbn_ray.science.tbn import batch_norms, describe_bn, normalization_layers
from tbn_ray.store.runs import Checkpoint, Run, make_checkpoint
from tbn_ray.store.storage import Storage

#: Wrapper prefixes a saved state_dict commonly carries (DataParallel/DDP, torch.compile, wrappers).
KEY_PREFIXES = ("module.", "_orig_mod.", "model.", "net.")
#: Keys a checkpoint file commonly nests its state_dict under.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net")
#: RobustBench's default model directory (``robustbench.utils.load_model``).
ROBUSTBENCH_MODEL_DIR = "./models"
#: CIFAR-10 images as every model sees them here: [0, 1] pixels, NCHW.
INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10


def file_sha256(paths: Sequence[Path]) -> str:
    """sha256 of a weights file; of several (an ensemble's parts), over their digests in order."""
    digests = []
    for path in paths:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digests.append(h.hexdigest())
    return digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()


def parse_normalize(mean: str, std: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """``--normalize MEAN STD``: two comma lists of 3 per-channel numbers (or 1, for all three);
    fractions such as 1/2 accepted; every std > 0."""

    def numbers(text: str, what: str) -> tuple[float, float, float]:
        parts = [p for p in text.replace(",", " ").split() if p]
        try:
            values = [float(Fraction(p)) for p in parts]
        except (ValueError, ZeroDivisionError):
            raise TbnError(
                f"--normalize {what} {text!r}: not numbers; use e.g. --normalize 0.4914,0.4822,0.4465 0.2471,0.2435,0.2616"
            ) from None
        if len(values) == 1:
            values *= 3
        if len(values) != 3 or not all(math.isfinite(v) for v in values):
            raise TbnError(f"--normalize {what} {text!r}: give 3 finite per-channel numbers (R,G,B) or one for all")
        return values[0], values[1], values[2]

    m, s = numbers(mean, "MEAN"), numbers(std, "STD")
    if min(s) <= 0:
        raise TbnError(f"--normalize STD {std!r}: every std must be > 0")
    for what, text, values in (("MEAN", mean, m), ("STD", std, s)):
        if max(values) > 1 or min(values) < 0:
            raise TbnError(
                f"--normalize {what} {text!r} is outside [0, 1]: on the 0-255 scale? give it for [0, 1] images (divide by 255)"
            )
    if min(s) < 1e-3:
        raise TbnError(
            f"--normalize STD {std!r}: a std below 0.001 would scale the image by more than 1000; CIFAR-10's are about 0.25"
        )
    return m, s


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state_dict in a weights file (loaded as data, weights only), also when nested under
    ``state_dict``, ``model``... as training scripts often save it."""
    if path.is_dir():
        raise TbnError(
            f"--weights {path} is a directory: give the state_dict file (saved with torch.save(model.state_dict(), FILE))"
        )
    if not path.is_file():
        raise TbnError(f"weights file not found: {path}")
    try:
        raw: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise TbnError(
            f"{path} is not a readable state_dict file (torch.load, weights only: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
        ) from None
    for _ in range(3):
        if isinstance(raw, dict) and not _tensors_only(raw):
            inner = next((raw[k] for k in NESTED_KEYS if isinstance(raw.get(k), dict)), None)
            if inner is None:
                break
            raw = inner
    if not (isinstance(raw, dict) and raw and _tensors_only(raw)):
        what = f"a dict with keys {sorted(map(str, raw))[:5]}" if isinstance(raw, dict) else f"a {type(raw).__name__}"
        raise TbnError(f"{path} holds {what}, not a state_dict (parameter name -> tensor); save model.state_dict()")
    return dict(raw)


def _tensors_only(d: dict[Any, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def _canonical(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for p in KEY_PREFIXES:
            if key.startswith(p):
                key, stripped = key[len(p) :], True
    return key


def _short(keys: Sequence[str], k: int = 3) -> str:
    shown = ", ".join(sorted(keys)[:k])
    return shown + (f", ... ({len(keys) - k} more)" if len(keys) > k else "")


def fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], where: str, what: str) -> dict[str, torch.Tensor]:
    """``state`` renamed to the model's keys: wrapper prefixes (``module.``, ``_orig_mod.``,
    ``model.``, ``net.``) ignored on either side. Any other difference is one line naming the
    missing, unexpected and differently shaped keys. A missing ``num_batches_tracked`` (older
    torch) is not a difference."""
    expected = model.state_dict()
    by_canon_model = {_canonical(k): k for k in expected}
    by_canon_file = {_canonical(k): k for k in state}
    if len(by_canon_model) != len(expected) or len(by_canon_file) != len(state):  # prefixes carry meaning here
        by_canon_model, by_canon_file = {k: k for k in expected}, {k: k for k in state}
    missing = [
        by_canon_model[c] for c in by_canon_model.keys() - by_canon_file.keys() if not c.endswith("num_batches_tracked")
    ]
    unexpected = [by_canon_file[c] for c in by_canon_file.keys() - by_canon_model.keys()]
    shapes = [
        f"{by_canon_model[c]} (file {tuple(state[by_canon_file[c]].shape)}, model {tuple(expected[by_canon_model[c]].shape)})"
        for c in sorted(by_canon_model.keys() & by_canon_file.keys())
        if state[by_canon_file[c]].shape != expected[by_canon_model[c]].shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{len(missing)} missing ({_short(missing)})" if missing else "",
            f"{len(unexpected)} unexpected ({_short(unexpected)})" if unexpected else "",
            f"{len(shapes)} of another shape ({_short(shapes, 2)})" if shapes else "",
        ]
        raise TbnError(f"{where} does not fit {what}: keys " + "; ".join(p for p in parts if p))
    return {by_canon_model[c]: state[by_canon_file[c]] for c in by_canon_model.keys() & by_canon_file.keys()}


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str, what: str) -> None:
    """Fit and load ``state`` into ``model`` (in place)."""
    fitted = fit_state_dict(model, state, where, what)
    result = model.load_state_dict(fitted, strict=False)
    leftover = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if leftover or result.unexpected_keys:  # fit_state_dict compared the same key sets
        raise AssertionError(f"state_dict fitting left {leftover} missing, {result.unexpected_keys} unexpected")


def robustbench_weights(
    name: str, threat_model: str, model_dir: Path, dataset: str = "cifar10"
) -> tuple[nn.Module, list[Path]]:
    """The zoo model with its weights, as ``robustbench.utils.load_model`` loads them from
    ``model_dir/<dataset>/<threat model>/<name>.pt`` (downloaded there first where the internet
    is reachable), and the weight files read."""
    import_robustbench()
    from robustbench.utils import load_model

    folder = model_dir / dataset / threat_model
    files = [folder / f"{name}.pt"]
    before = _tree(model_dir)
    try:
        model = load_model(name, model_dir=str(model_dir), dataset=dataset, threat_model=threat_model)
    except Exception as e:  # noqa: BLE001 - downloads and checkpoint formats fail in many ways
        _remove_created(model_dir, before)
        if not files[0].is_file() and not any(folder.glob(f"{name}.pt_m*.pt")):
            raise TbnError(
                f"RobustBench could not fetch {name} ({type(e).__name__}; no internet?): put its weights at {files[0]} "
                "(RobustBench's model-directory layout) and pass --model-dir"
            ) from None
        raise TbnError(
            f"RobustBench could not load {name} from {folder}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        ) from None
    parts = sorted(folder.glob(f"{name}.pt_m*.pt"))  # an ensemble's parts
    if parts:
        files = parts
    existing = [f for f in files if f.is_file()]
    if not existing:  # e.g. a timm entry, whose weights timm keeps elsewhere
        raise TbnError(
            f"RobustBench loaded {name} without a file under {folder}; tbn-ray imports zoo models stored there"
        )
    return model, existing


def _tree(root: Path) -> set[Path] | None:
    """Every path under ``root`` (None: ``root`` does not exist)."""
    return {root, *root.rglob("*")} if root.exists() else None


def _remove_created(root: Path, before: set[Path] | None) -> None:
    """Take back what a failed zoo call made under ``root`` (empty folders, partial downloads);
    what was there before stays."""
    kept = before or set()
    for p in sorted(_tree(root) or (), key=lambda q: len(q.parts), reverse=True):
        if p in kept:
            continue
        if p.is_dir() and not p.is_symlink():
            if not any(p.iterdir()):
                p.rmdir()
        else:
            p.unlink(missing_ok=True)


#: Noise of the probe inputs an import is checked on (an image and two noisy copies).
IMPORT_PROBE_SIGMA = 0.25


def check_importable(model: nn.Module, what: str) -> None:
    """What every tbn-ray command assumes of a model, checked on three [0, 1] images: eval mode runs,
    logits are (N, 10), finite, and the same for an image alone as in a batch; every BatchNorm
    keeps running statistics."""
    for name, bn in batch_norms(model):
        if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            raise TbnError(
                f"{what}: BatchNorm layer {name!r} keeps no running statistics (track_running_stats=False); it always "
                "normalises with the batch's statistics, so it has no fixed form to certify or to adapt"
            )
    x = torch.rand(*INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    try:
        check_fixed_function(model.eval(), x, IMPORT_PROBE_SIGMA, NUM_CLASSES)
    except TbnError as e:
        raise type(e)(f"{what}: {e}") from None


#: Exact test images an import's clean accuracy is measured on, and the accuracy below which it warns.
ACCURACY_IMAGES, LOW_ACCURACY = 300, 0.5


def clean_accuracy(model: nn.Module) -> dict[str, Any] | None:
    """Accuracy on the first ``ACCURACY_IMAGES`` byte-exact test images (None where they are absent)."""
    from tbn_ray.science.data import to_float
    from tbn_ray.store.cifar10 import load_cifar10

    try:
        test = load_cifar10("partial").test.subset(slice(0, ACCURACY_IMAGES))
    except TbnError:
        return None
    with torch.no_grad():
        predicted = model.eval()(to_float(test.images)).argmax(1).numpy()
    return {
        "accuracy": float((predicted == test.labels).mean()),
        "images": len(test),
        "data": "CIFAR-10 test (byte-exact subset)",
    }


def say_accuracy(accuracy: dict[str, Any] | None, source: ModelSource) -> None:
    """The clean accuracy in one line; below ``LOW_ACCURACY``, the likeliest mistake too."""
    if accuracy is None:
        log("clean accuracy not measured: the byte-exact CIFAR-10 test subset (shared/data) is not here")
        return
    line = f"clean accuracy {100 * accuracy['accuracy']:.1f}% on the first {accuracy['images']} test images ({accuracy['data']})"
    if accuracy["accuracy"] >= LOW_ACCURACY:
        log(line)
    elif source.kind == "robustbench":
        log(f"warning: {line}: low for a zoo model; check the threat model and the weights file")
    elif source.normalize is None:
        log(
            f"warning: {line}: if the model expects normalised images, import it with --normalize MEAN STD (its training's values)"
        )
    else:
        log(
            f"warning: {line}: if the model takes [0, 1] images itself, import it without --normalize; else check MEAN and STD"
        )


def default_name(source: ModelSource) -> str:
    """``Engstrom2019Robustness-L2``, or the callable's name and the weights' digest: ``ResNet18-1a2b3c4d``."""
    if source.kind == "robustbench":
        return f"{source.name}-{source.threat_model}"
    return f"{source.name.rpartition(':')[2].rpartition('.')[2]}-{(source.weights_sha256 or '')[:8]}"


def imported_model(
    spec: str,
    *,
    threat_model: str | None = None,
    model_dir: str | Path | None = None,
    weights: str | Path | None = None,
    normalize: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None,
    dataset: str = "cifar10",
) -> tuple[nn.Module, ModelSource]:
    """The model ``spec`` names with its weights (eval mode), checked, and its source."""
    kind, _, rest = spec.partition(":")
    if kind == "robustbench":
        if not rest:
            raise TbnError("robustbench: needs a zoo name, e.g. robustbench:Engstrom2019Robustness")
        if normalize is not None:
            raise TbnError(
                "RobustBench models normalise inside (they take [0, 1] images): --normalize does not apply to them"
            )
        if threat_model is None:
            listed = zoo_threat_models(rest, dataset)
            if not listed:
                raise TbnError(
                    f"robustbench:{rest}: no model of that name in RobustBench's {dataset} zoo, under any threat model"
                )
            if len(listed) != 1:
                raise TbnError(
                    f"robustbench:{rest} is listed under {', '.join(listed)}: choose one with --threat-model"
                )
            threat_model = listed[0]
        if weights is not None:  # a zoo architecture with weights of the user's own
            source = ModelSource(kind="robustbench", name=rest, threat_model=threat_model, dataset=dataset)
            model = build_architecture(source, NUM_CLASSES)
            path = Path(weights).resolve()
            load_weights(model, read_state_dict(path), str(path), source.label)
            files = [path]
        else:
            zoo_constructor(rest, threat_model, dataset)  # the name and threat model checked before any download
            model, files = robustbench_weights(
                rest, threat_model, Path(model_dir or ROBUSTBENCH_MODEL_DIR).resolve(), dataset
            )
        source = ModelSource(
            kind="robustbench",
            name=rest,
            threat_model=threat_model,
            dataset=dataset,
            weights=str(files[0] if len(files) == 1 else files[0].parent),
            weights_sha256=file_sha256(files),
        )
    else:
        split_callable(spec)
        if threat_model is not None or model_dir is not None:
            raise TbnError(
                "--threat-model and --model-dir are for robustbench:<name>; a module:callable takes --weights"
            )
        if weights is None:
            raise TbnError(
                f"{spec} needs its weights: --weights FILE (a state_dict saved with torch.save(model.state_dict(), FILE))"
            )
        path = Path(weights).resolve()
        state = read_state_dict(path)
        source = ModelSource(
            kind="callable",
            name=spec,
            dataset=dataset,
            normalize=normalize,
            weights=str(path),
            weights_sha256=file_sha256([path]),
        )
        model = build_architecture(source, NUM_CLASSES)
        load_weights(model, state, str(path), spec)
    if normalize is not None:
        model = Normalized(model, *normalize)
    check_importable(model, source.label)
    return model.eval(), source


def import_run(
    spec: str, root: Storage, *, name: str | None = None, data: DataConfig | None = None, **how: Any
) -> tuple[Run, Checkpoint]:
    """Import ``spec`` (``imported_model``'s arguments in ``how``) as run ``name`` under ``root``:
    a checkpoint at epoch 0 that rebuilds to the same function. Importing the same weights again
    is a no-op; another model under an existing run name is refused."""
    root.check()
    if name is not None and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise TbnError(
            f"--name {name!r}: a run name is one folder name of letters, digits, '.', '_' and '-' (no '/', not empty)"
        )
    model, source = imported_model(spec, **how)
    cfg = TrainConfig(
        name=name or default_name(source), model=ModelConfig(arch="imported", source=source), data=data or DataConfig()
    )
    run = Run(root.child(cfg.name))
    if run.has_checkpoint():
        held = run.load_checkpoint()
        if held.config.model == cfg.model:
            log(
                f"{run.uri} already holds {source.label} (weights sha256 {(source.weights_sha256 or '')[:12]}); nothing to do"
            )
            return run, held
        raise TbnError(f"{run.uri} already holds another model ({held.config.model.label}); use another --name")
    norms = normalization_layers(model)
    accuracy = clean_accuracy(model)
    meta = {
        "imported": source.label,
        "weights": source.weights,
        "weights_sha256": source.weights_sha256,
        "parameters": sum(p.numel() for p in model.parameters()),
        "batchnorm": describe_bn(model) if batch_norms(model) else "none",
        "normalization_layers": norms,
        "note": "imported, not trained by tbn-ray",
        "clean_accuracy": accuracy,
    }
    ckpt = make_checkpoint(model, cfg, 0, meta)
    rebuilt = _round_trip(ckpt, run.uri)
    x = torch.rand(2, *INPUT_SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if not torch.equal(model(x), rebuilt(x)):
            raise TbnError(
                f"{source.label} does not rebuild to the same function from its source and weights (is its constructor random?)"
            )
    run.save_checkpoint(ckpt)
    try:
        check_fixed_classifier(model.eval())
    except SoundnessError as e:
        log(f"note: certification will refuse this model: {e}")
    say_accuracy(accuracy, source)
    bn = meta["batchnorm"]
    log(
        f"imported {source.label} into {run.uri}: {meta['parameters']:,} parameters, BatchNorm: {bn}"
        + (
            ""
            if batch_norms(model)
            else f" (TBN does not apply; {', '.join(norms) or 'no normalization layers'}: use --bn clean)"
        )
    )
    return run, ckpt


def _round_trip(ckpt: Checkpoint, where: str) -> nn.Module:
    """The model as every later command builds it: from the stored config and state only."""
    from tbn_ray.science.models import build_model

    model = build_model(ckpt.config.model)
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as e:
        raise TbnError(
            f"{where}: the imported weights do not load into the rebuilt architecture: {str(e).splitlines()[0][:160]}"
        ) from None
    return model.eval()
