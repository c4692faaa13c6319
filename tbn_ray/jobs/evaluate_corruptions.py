"""Corruption robustness per BN mode (``tbn-ray evaluate corruptions``): a ``jobs.evaluate`` job.

One item: the accuracy of one BN mode on one (corruption, severity) of CIFAR-10-C, or on the
uncorrupted test images (``none``, severity 0). The arrays come from the storage layer
(``store.cifar10c``), generated where first needed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tbn_ray.config import DataConfig, EvaluateConfig
from tbn_ray.errors import TbnError
from tbn_ray.jobs.evaluate import EvalPlan, Task, base_plan
from tbn_ray.science.bn_modes import BNMode
from tbn_ray.science.corruptions import CORRUPTIONS, SEVERITIES, parse_corruptions, parse_severities
from tbn_ray.science.robustness import correct_predictions
from tbn_ray.store.cifar10c import Cifar10C, regenerated_cifar10c, released_cifar10c
from tbn_ray.store.runs import Run
from tbn_ray.store.storage import Storage

#: The pseudo corruption of the uncorrupted test images (each mode's clean accuracy).
NONE = "none"


@dataclass(frozen=True, eq=False)
class CorruptionPlan(EvalPlan):
    cifar10c: Cifar10C | None = None
    corruptions: tuple[str, ...] = CORRUPTIONS
    severities: tuple[int, ...] = SEVERITIES

    kind = "corruptions"

    def _id_params(self) -> dict[str, Any]:
        assert self.cifar10c is not None
        return {"kind": self.kind, "cifar10c": self.cifar10c.variant}

    def parts(self) -> list[tuple[str, int]]:
        return [(NONE, 0)] + [(c, s) for c in self.corruptions for s in self.severities]

    def describe_work(self) -> str:
        assert self.cifar10c is not None
        return f"{self.cifar10c.description}: {len(self.corruptions)} corruption(s) x {len(self.severities)} severities + clean"

    def item_key(self, mode: BNMode, part: tuple[str, int]) -> str:
        return f"{mode.key(self.batch_size)}/{part[0]}/severity-{part[1]}.json"

    def item_params(self, mode: BNMode, part: tuple[str, int]) -> dict[str, Any]:
        return {**super().item_params(mode, part), "corruption": part[0], "severity": part[1]}

    def run_task(self, model: nn.Module, task: Task, device: torch.device, worker: dict[str, str]) -> int:
        assert self.cifar10c is not None
        corruption, severity = task.part
        images = self.test.images if corruption == NONE else self.cifar10c.load(corruption, severity)
        for spec in task.modes:
            mode = self.mode(spec)
            t0 = time.perf_counter()
            correct = correct_predictions(
                model,
                images,
                self.test.labels,
                mode,
                self.stats[mode.stats_name],
                batch_size=self.batch_size,
                device=device,
            )
            self.write_item(
                mode,
                task.part,
                {
                    "correct": int(correct.sum()),
                    "images": len(correct),
                    "seconds": time.perf_counter() - t0,
                    "worker": worker,
                },
            )
        return len(images)

    def result_fields(self, items: dict[BNMode, list[dict[str, Any]]]) -> dict[str, Any]:
        assert self.cifar10c is not None
        return {
            "cifar10c": self.cifar10c.manifest(),
            "source": self.cifar10c.description,
            "modes": {
                mode.key(self.batch_size): _mode_result(its, mode, self.batch_size) for mode, its in items.items()
            },
        }


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _mode_result(items: list[dict[str, Any]], mode: BNMode, batch_size: int) -> dict[str, Any]:
    """Accuracy per corruption and severity, and its means over each, of one BN mode."""
    grid: dict[str, dict[str, float]] = {}
    clean_acc = None
    for item in items:
        p = item["params"]
        acc = item["correct"] / item["images"]
        if p["corruption"] == NONE:
            clean_acc = acc
        else:
            grid.setdefault(p["corruption"], {})[str(p["severity"])] = acc
    corruptions = [c for c in CORRUPTIONS if c in grid]
    severities = sorted({int(s) for row in grid.values() for s in row})
    full = all(len(grid[c]) == len(severities) for c in corruptions)
    cells = [grid[c][str(s)] for c in corruptions for s in severities if str(s) in grid[c]]
    return {
        "spec": mode.spec,
        "definition": mode.definition(batch_size),
        "batch_size": batch_size if mode.batch else None,
        "clean_accuracy": clean_acc,
        "accuracy": grid,
        "mean": _mean(cells),
        "grid": f"{len(corruptions)} x {len(severities)}" + ("" if full else " (incomplete)"),
        "standard_grid": corruptions == list(CORRUPTIONS) and severities == list(SEVERITIES) and full,
        "severity_mean": {
            str(s): _mean([grid[c][str(s)] for c in corruptions if str(s) in grid[c]]) for s in severities
        },
        "corruption_mean": {c: _mean(list(grid[c].values())) for c in corruptions},
    }


def default_cifar10c_root(run: Run) -> Storage:
    """Where ``tbn-ray data cifar10c`` caches by default for this run: the run's parent (the
    ``--storage`` root it was trained under)."""
    parent = run.uri.rstrip("/").rpartition("/")[0]
    return Storage.open(parent or ".")


def plan_corruptions(
    run: Run,
    modes: Sequence[str],
    cfg: EvaluateConfig,
    *,
    cache_root: Storage | None = None,
    released: str | Path | None = None,
    data_cfg: DataConfig | None = None,
    start: int | None = None,
    stop: int | None = None,
    progress: bool = True,
) -> CorruptionPlan:
    """Check everything a corruption evaluation needs before any work (modes, statistics,
    corruption names, severities, storage); with ``released``, import the needed arrays.
    ``cfg.corruptions``/``cfg.severities``: as ``tbn-ray data cifar10c`` takes them ("all", "1-5")."""
    names, levels = parse_corruptions(cfg.corruptions), parse_severities(cfg.severities)
    base = base_plan(
        run, modes, batch_size=cfg.batch_size, data_cfg=data_cfg, start=start, stop=stop, kind=CorruptionPlan.kind
    )
    cache_root = cache_root or default_cifar10c_root(run)
    cache_root.check()
    run.storage.check()
    if released is not None:
        c10c = released_cifar10c(cache_root, released, base["test"].index, names, levels, progress=progress)
        if not np.array_equal(c10c.labels, base["test"].labels):
            raise TbnError(
                f"the labels in {released}/labels.npy do not match the CIFAR-10 test labels; is it CIFAR-10-C?"
            )
    else:
        c10c = regenerated_cifar10c(
            cache_root, base["test"], seed=cfg.cifar10c_seed, data_description=base["data_description"]
        )
    c10c.write_metadata()
    return CorruptionPlan(**base, cifar10c=c10c, corruptions=names, severities=levels)
