"""A run: one trained model and everything derived from it, in one storage location.

Layout under ``<storage>/<run-name>/`` (local directory or S3 prefix)::

    checkpoint.pt     model + optimizer + scheduler + epoch + config + metadata (latest epoch)
    config.yaml       the training config, human-readable
    metrics.csv       one row per epoch (and metrics.png)
    bn_stats.pt       TBN statistics sets: "clean" plus one per calibrated sigma
    certify/          certification results (see smoothing.write_results)

Everything is written as whole objects through ``storage.Storage`` and loaded with
``torch.load(weights_only=True)``: a checkpoint is data, never code.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from tbn_ray.config import DataConfig, TrainConfig, parse_config
from tbn_ray.errors import TbnError
from tbn_ray.science import data as data_mod
from tbn_ray.science.models import build_model
from tbn_ray.science.tbn import CLEAN, BNStats, batch_norms, get_bn_stats
from tbn_ray.store.cifar10 import load_from_config
from tbn_ray.store.storage import Storage, default_storage_uri

CHECKPOINT = "checkpoint.pt"
BN_STATS = "bn_stats.pt"
FORMAT = "tbn-ray/checkpoint-v1"
BN_FORMAT = "tbn-ray/bn-stats-v1"


def tensor_bytes(t: torch.Tensor) -> bytes:
    """A tensor's raw bytes, for digests."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def hash_weights(h: Any, model_state: dict[str, torch.Tensor]) -> None:
    """Feed a state dict into ``h`` (a hashlib object), name by name: the weights part of the
    run id of a certification and of the id of an evaluation."""
    for name in sorted(model_state):
        h.update(name.encode() + tensor_bytes(model_state[name]))


@dataclass
class Checkpoint:
    model: dict[str, torch.Tensor]
    config: TrainConfig
    epoch: int
    meta: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save(
            {
                "format": FORMAT,
                "model": self.model,
                "config": self.config.model_dump(mode="json"),
                "epoch": self.epoch,
                "meta": self.meta,
                "optimizer": self.optimizer,
                "scheduler": self.scheduler,
            },
            buf,
        )
        return buf.getvalue()

    def resume_into(self, model: nn.Module, optimizer: Any, scheduler: Any, model_config: Any, where: str) -> None:
        """Load the states training continues from; another architecture under the same name is refused."""
        if self.config.model != model_config:
            raise TbnError(f"{where} holds a {self.config.model.arch} run; use another --name or --fresh")
        model.load_state_dict(self.model)
        if self.optimizer is not None:
            optimizer.load_state_dict(self.optimizer)
        if self.scheduler is not None:
            scheduler.load_state_dict(self.scheduler)


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel wrapper (state_dict keys without 'module.')."""
    return getattr(model, "module", model)


def make_checkpoint(
    model: nn.Module, config: TrainConfig, epoch: int, meta: dict[str, Any], optimizer=None, scheduler=None
) -> Checkpoint:
    return Checkpoint(
        model={k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()},
        config=config,
        epoch=epoch,
        meta={**meta, "saved": datetime.now(UTC).isoformat(timespec="seconds"), "torch": str(torch.__version__)},
        optimizer=optimizer.state_dict() if optimizer is not None else None,
        scheduler=scheduler.state_dict() if scheduler is not None else None,
    )


def _torch_load(data: bytes, where: str, what: str, remedy: str) -> Any:
    """``torch.load`` of stored bytes, weights only; any failure is the file's fault, one line.

    Torch's weights-only unpickler raises almost any exception type on damaged bytes
    (``IndexError``, ``TypeError``, ``UnicodeDecodeError``...), and its messages suggest
    ``weights_only=False``, which would run code from the file: neither reaches the user.
    """
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every parse failure of untrusted bytes means the same
        raise TbnError(
            f"{where} is not a readable tbn-ray {what} (corrupt or truncated, {type(e).__name__}): {remedy}"
        ) from None


def _tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _optional_dict(value: Any) -> bool:
    return value is None or isinstance(value, dict)


def checkpoint_from_bytes(data: bytes, where: str) -> Checkpoint:
    remedy = "train again (tbn-ray train --fresh) or point at another checkpoint"
    raw = _torch_load(data, where, "checkpoint", remedy)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise TbnError(f"{where} is not a tbn-ray checkpoint (expected format {FORMAT}): {remedy}")
    epoch = raw.get("epoch")
    fields_ok = (
        _tensor_dict(raw.get("model"))
        and isinstance(raw.get("config"), dict)
        and isinstance(epoch, int)
        and not isinstance(epoch, bool)
        and epoch >= 0
        and all(_optional_dict(raw.get(k)) for k in ("meta", "optimizer", "scheduler"))
    )
    if not fields_ok:
        raise TbnError(f"{where} is a damaged tbn-ray checkpoint (a field is missing or of the wrong type): {remedy}")
    return Checkpoint(
        model=raw["model"],
        config=parse_config(TrainConfig, raw["config"], where),
        epoch=epoch,
        meta=dict(raw.get("meta") or {}),
        optimizer=raw.get("optimizer"),
        scheduler=raw.get("scheduler"),
    )


def _usable_stats(stats: Any) -> bool:
    """A statistics set as ``tbn.get_bn_stats`` makes it: per layer, finite means and non-negative variances."""
    if not isinstance(stats, dict):
        return False
    for layer, bufs in stats.items():
        if not isinstance(layer, str) or not isinstance(bufs, dict):
            return False
        mean, var = bufs.get("running_mean"), bufs.get("running_var")
        if (
            not (isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor))
            or mean.shape != var.shape
            or mean.dim() != 1
        ):
            return False
        if not (
            mean.is_floating_point()
            and var.is_floating_point()
            and bool(mean.isfinite().all())
            and bool((var >= 0).all())
        ):
            return False
    return True


def bn_sets_from_bytes(data: bytes, where: str) -> dict[str, dict[str, Any]]:
    """The statistics sets of a ``bn_stats.pt``, checked down to the tensors."""
    remedy = "delete it and run tbn-ray calibrate again"
    raw = _torch_load(data, where, "BN statistics file", remedy)
    if not isinstance(raw, dict) or raw.get("format") != BN_FORMAT:
        raise TbnError(f"{where} is not a tbn-ray BN statistics file (expected format {BN_FORMAT}): {remedy}")
    sets = raw.get("sets")
    if not usable_bn_sets(sets):
        raise TbnError(
            f"{where} is a damaged tbn-ray BN statistics file (a set is missing or of the wrong type): {remedy}"
        )
    return sets


def usable_bn_sets(sets: Any) -> bool:
    """Statistics sets as tbn-ray stores and passes them: name -> {"stats": {layer: mean, var}, "meta": {...}}."""
    return isinstance(sets, dict) and all(
        isinstance(name, str)
        and isinstance(entry, dict)
        and _usable_stats(entry.get("stats"))
        and _optional_dict(entry.get("meta"))
        for name, entry in sets.items()
    )


@dataclass(frozen=True)
class Run:
    """Where a run lives; ``checkpoint_key`` lets a user point at a specific checkpoint file."""

    storage: Storage
    checkpoint_key: str = CHECKPOINT

    @staticmethod
    def open(uri: str) -> Run:
        """A run directory, or a checkpoint file inside one (``.../run/checkpoint.pt``). A relative
        path that names nothing here is looked up under the storage root (``$TBN_STORAGE``, else
        ``./tbn-results``), where commands put runs: ``tbn-ray show quickstart`` finds the quickstart."""
        text = str(uri).rstrip("/")
        if "://" not in text and not Path(text).is_absolute() and not Path(text).exists():
            root = default_storage_uri().rstrip("/")
            if root not in (".", "") and Storage.open(root).exists(
                text if text.endswith(".pt") else f"{text}/{CHECKPOINT}"
            ):
                text = f"{root}/{text}"
        if text.endswith(".pt"):
            parent, _, name = text.rpartition("/")
            return Run(Storage.open(parent or "."), name)
        return Run(Storage.open(text))

    @property
    def uri(self) -> str:
        return self.storage.uri

    def save_checkpoint(self, ckpt: Checkpoint) -> str:
        self.storage.write_text("config.yaml", yaml.safe_dump(ckpt.config.model_dump(mode="json"), sort_keys=False))
        return self.storage.write_bytes(self.checkpoint_key, ckpt.to_bytes())

    def clear(self) -> int:
        """What ``--fresh`` does: empty the run directory (Ray's state included); the objects deleted.

        Everything in it (checkpoints, metrics, TBN statistics, certificates) derives from the model
        being discarded, and TBN statistics of an old model must not meet a new one.
        """
        keys = self.storage.list()
        for key in keys:
            self.storage.delete(key)
        return len(keys)

    def has_checkpoint(self) -> bool:
        return self.storage.exists(self.checkpoint_key)

    def load_checkpoint(self) -> Checkpoint:
        where = f"{self.storage.uri}/{self.checkpoint_key}"
        if not self.storage.exists(self.checkpoint_key):
            raise TbnError(f"no checkpoint at {where}: train first (tbn-ray train) or pass the run directory")
        return checkpoint_from_bytes(self.storage.read_bytes(self.checkpoint_key), where)

    def load_model(self, device: torch.device | str = "cpu") -> tuple[nn.Module, Checkpoint]:
        """The trained model (eval mode, clean BN statistics) and its checkpoint."""
        ckpt = self.load_checkpoint()
        model = build_model(ckpt.config.model)
        try:
            model.load_state_dict(ckpt.model)
        except RuntimeError as e:
            raise TbnError(
                f"{self.storage.uri}/{self.checkpoint_key} does not fit architecture {ckpt.config.model.arch!r}: "
                f"{str(e).splitlines()[0][:160]}"
            ) from None
        return model.to(device).eval(), ckpt

    # --- TBN statistics sets -------------------------------------------------------------

    def load_bn_sets(self) -> dict[str, dict[str, Any]]:
        """All statistics sets: name -> {"stats": BNStats, "meta": {...}} (empty if none yet)."""
        if not self.storage.exists(BN_STATS):
            return {}
        return bn_sets_from_bytes(self.storage.read_bytes(BN_STATS), self.storage.object_uri(BN_STATS))

    def save_bn_sets(self, sets: dict[str, dict[str, Any]]) -> str:
        buf = io.BytesIO()
        torch.save({"format": BN_FORMAT, "sets": sets}, buf)
        return self.storage.write_bytes(BN_STATS, buf.getvalue())

    def bn_stats(self, name: str, model: nn.Module) -> BNStats:
        """A named statistics set; ``clean`` is always available (the trained statistics)."""
        sets = self.load_bn_sets()
        if name in sets:
            return sets[name]["stats"]
        if name == CLEAN:
            return get_bn_stats(model)
        if not batch_norms(model):
            raise TbnError(
                f"no TBN statistics {name!r}: the model has no BatchNorm layers, so TBN does not apply; use --bn clean (bn='clean')"
            )
        known = ", ".join(sorted(sets)) or "none"
        raise TbnError(
            f"no TBN statistics {name!r} in {self.stats_origin} (calibrated: {known}); {self.calibrate_hint(name.removeprefix('sigma='))}"
        )

    @property
    def stats_origin(self) -> str:
        """Where this run's statistics come from, as an error names it."""
        return self.storage.uri

    def calibrate_hint(self, sigma: str) -> str:
        """How to calibrate the missing ``sigma``, for an error."""
        return f"run: tbn-ray calibrate {self.storage.uri} --sigma {sigma}"


def load_data_for(ckpt: Checkpoint, override: DataConfig | None) -> data_mod.Cifar10:
    """The data the run was trained on, unless the user names another source."""
    return load_from_config(override if override is not None else ckpt.config.data)
