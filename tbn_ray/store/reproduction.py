"""Where one reproduction lives (``<storage>/reproduce/<name>/``) and the records its stages leave:
one run directory per model, ``stages/<model>/<stage>.json`` (where a stage's results are, on which
device), and the report beside them. Read by the stages that write it and by the report."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from typing import Any

from tbn_ray.config import ModelSpec, ReproduceConfig
from tbn_ray.errors import TbnError
from tbn_ray.store.runs import Run
from tbn_ray.store.storage import Storage

STAGES = ("train", "calibrate", "certify", "evaluate", "report")
RECORD_FORMAT = "tbn-ray/reproduce-stage-v1"


def device_name(device: str) -> str:
    """What the report names as the hardware: the GPU's marketing name, else the CPU's."""
    import torch

    from tbn_ray.devices import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"CPU: {model or platform.processor() or platform.machine()}"


@dataclass(frozen=True)
class Reproduction:
    """Where one reproduction lives, and its config."""

    cfg: ReproduceConfig
    root: Storage  # <storage>/reproduce/<name>

    @staticmethod
    def open(cfg: ReproduceConfig, storage: Storage) -> Reproduction:
        return Reproduction(cfg, storage.child("reproduce", cfg.name))

    def run(self, spec: ModelSpec) -> Run:
        return Run(self.root.child(spec.name))

    def record_key(self, spec: ModelSpec, stage: str) -> str:
        return f"stages/{spec.name}/{stage}.json"

    def record(self, spec: ModelSpec, stage: str) -> dict[str, Any] | None:
        key = self.record_key(spec, stage)
        if not self.root.exists(key):
            return None
        rec = self.root.read_json(key)
        if not isinstance(rec, dict) or rec.get("format") != RECORD_FORMAT:
            raise TbnError(
                f"{self.root.object_uri(key)} is not a tbn-ray reproduce record; delete it and run the stage again"
            )
        return _locations(rec, lambda v: self.root.uri + v[1:] if v.startswith(f"{HERE}/") else v)

    def write_record(self, spec: ModelSpec, stage: str, body: dict[str, Any]) -> None:
        """Locations inside the reproduction are stored relative to it, so a copied or committed
        reproduction (a clone elsewhere, another bucket) still finds its results."""
        inside = self.root.uri.rstrip("/") + "/"
        rec = {
            "format": RECORD_FORMAT,
            "stage": stage,
            "model": spec.name,
            "device": self.cfg.device,
            "device_name": device_name(self.cfg.device),
            "finished": time.time(),
            **body,
        }
        self.root.write_json(
            self.record_key(spec, stage),
            _locations(rec, lambda v: HERE + v[len(inside) - 1 :] if v.startswith(inside) else v),
        )


#: How a record writes the reproduction's own folder.
HERE = "."


def _locations(value: Any, change: Any) -> Any:
    """``value`` with ``change`` applied to every string in it (records are JSON: dicts, lists, strings)."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, dict):
        return {k: _locations(v, change) for k, v in value.items()}
    if isinstance(value, list):
        return [_locations(v, change) for v in value]
    return value
