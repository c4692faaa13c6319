"""What the two evaluations (``tbn-ray evaluate corruptions|attack``) share, as ``jobs.engine`` jobs.

Work is cut into items written once each to deterministic keys under
``<run>/evaluate/{corruptions,attack}/<eval-id>/``: one (BN mode, corruption, severity) or
one (BN mode, attack, batch of test images) per object. A unit of work (``Task``) is one
corruption x severity, or one attack x batch, for the modes still pending. A re-run skips
items already there with the same parameters; the eval id is a digest of everything else
that changes a number (weights, test images, CIFAR-10-C version, threat model), so a
different evaluation never mixes with it. The Ray layer (``distributed.evaluate``) runs the
same tasks on actors.

The job definitions are ``jobs.evaluate_corruptions`` and ``jobs.evaluate_attack``; the BN
modes are ``science.bn_modes``; the report is ``reports.evaluation``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import nn

from tbn_ray.config import DataConfig
from tbn_ray.errors import TbnError
from tbn_ray.jobs import engine
from tbn_ray.jobs.engine import Metric, pending
from tbn_ray.reports.evaluation import EVALUATE_DIR, RESULT_FORMAT, write_evaluation_report
from tbn_ray.science import data as data_mod
from tbn_ray.science.bn_modes import BNMode, parse_bn_modes
from tbn_ray.science.corruptions import CORRUPTIONS
from tbn_ray.science.tbn import CLEAN, BNStats, use_bn_stats
from tbn_ray.store.cifar10c import index_text
from tbn_ray.store.runs import Run, hash_weights, load_data_for, tensor_bytes
from tbn_ray.store.storage import Storage, map_concurrently

ITEM_FORMAT = "tbn-ray/evaluate-item-v1"


def stats_digest(stats: BNStats) -> str:
    h = hashlib.sha256()
    for layer in sorted(stats):
        for buf in ("running_mean", "running_var"):
            h.update(f"{layer}/{buf}".encode() + tensor_bytes(stats[layer][buf]))
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Task:
    """A unit of work: one corruption x severity, or one attack x batch, for the modes still pending."""

    part: tuple[str, int]  # (corruption, severity) or (attack, batch)
    modes: tuple[str, ...]  # BN mode specs

    @property
    def label(self) -> str:
        what = (
            f"{self.part[0]} severity {self.part[1]}"
            if self.part[0] in CORRUPTIONS
            else f"{self.part[0]} batch {self.part[1]}"
        )
        return f"{what} [{', '.join(self.modes)}]"


@dataclass(frozen=True)
class TaskResult:
    task: Task
    items: int
    images: int
    seconds: float
    worker: dict[str, str]


@dataclass(frozen=True)
class EvalResult:
    eval_id: str
    location: str  # <run>/evaluate/<kind>/<eval-id>
    result: dict[str, Any]  # what result.json holds
    report: str  # <run>/evaluate/report.md
    items_computed: int
    items_skipped: int


@dataclass(frozen=True, eq=False)
class EvalPlan:
    """What both evaluations share: fixed and validated before any work (``plan_corruptions``,
    ``plan_attack``); picklable and self-contained (weights, statistics, images) for Ray actors."""

    run_uri: str
    network: nn.Module  # on CPU, eval mode, clean statistics
    model_label: str  # how results name the model
    epoch: int
    modes: tuple[BNMode, ...]
    stats: dict[str, BNStats]  # by stats name; always holds "clean"
    test: data_mod.Split  # the selected clean test images
    data_source: str
    data_description: str
    batch_size: int
    root: Storage  # <run>/evaluate/<kind>

    kind = ""

    @cached_property
    def model_state(self) -> dict[str, torch.Tensor]:
        return self.network.state_dict()

    # --- what each evaluation defines

    def _id_params(self) -> dict[str, Any]:
        raise NotImplementedError

    def parts(self) -> list[tuple[str, int]]:
        raise NotImplementedError

    def item_key(self, mode: BNMode, part: tuple[str, int]) -> str:
        raise NotImplementedError

    def describe_work(self) -> str:
        raise NotImplementedError

    def run_task(self, model: nn.Module, task: Task, device: torch.device, worker: dict[str, str]) -> int:
        """Compute and write the task's items; the number of images it went through."""
        raise NotImplementedError

    def result_fields(self, items: dict[BNMode, list[dict[str, Any]]]) -> dict[str, Any]:
        """result.json's fields of this kind, ``modes`` included, from each mode's items in ``parts`` order."""
        raise NotImplementedError

    # --- shared

    @cached_property
    def eval_id(self) -> str:
        """``<run name>-<digest>`` of the weights, the test images and ``_id_params``."""
        h = hashlib.sha256()
        hash_weights(h, self.model_state)
        for array in (self.test.index, self.test.labels, self.test.images):
            h.update(np.ascontiguousarray(array).tobytes())
        h.update(
            json.dumps(
                {"run": self.run_uri, "epoch": self.epoch, "data": self.data_source, **self._id_params()},
                sort_keys=True,
            ).encode()
        )
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.run_uri.rstrip("/").rpartition("/")[2]).strip(".-") or "run"
        return f"{name}-{h.hexdigest()[:16]}"

    @property
    def out(self) -> Storage:
        return self.root.child(self.eval_id)

    def mode(self, spec: str) -> BNMode:
        return next(m for m in self.modes if m.spec == spec)

    def build_model(self, device: torch.device) -> nn.Module:
        return copy.deepcopy(self.network).to(device).eval()

    def item_params(self, mode: BNMode, part: tuple[str, int]) -> dict[str, Any]:
        return {
            "eval_id": self.eval_id,
            "mode": mode.spec,
            "stats": stats_digest(self.stats[mode.stats_name]) if (not mode.batch or mode.prior) else None,
            "batch_size": self.batch_size if mode.batch else None,
        }

    @property
    def total_items(self) -> int:
        return len(self.parts()) * len(self.modes)

    def write_item(self, mode: BNMode, part: tuple[str, int], body: dict[str, Any]) -> None:
        """One item as one whole object: present complete, or absent."""
        self.out.write_json(
            self.item_key(mode, part), {"format": ITEM_FORMAT, "params": self.item_params(mode, part), **body}
        )

    def pending(self) -> list[Task]:
        """Tasks for every (part, mode) item not yet stored with these parameters."""
        return pending(self).units

    # --- the job (``jobs.engine.Job``): a unit is a Task, each of its items one JSON object

    amount_unit = "item"
    metrics = (
        Metric("tbn_evaluate_items", "evaluation items computed and written", ("eval_id",)),
        Metric("tbn_evaluate_images", "test images evaluated (per task)", ("eval_id",)),
    )

    @property
    def name(self) -> str:
        return f"evaluate {self.kind}"

    @property
    def job_id(self) -> str:
        return self.eval_id

    def outputs(self) -> list[tuple[tuple[tuple[str, int], str], str]]:
        return [((part, mode.spec), self.item_key(mode, part)) for part in self.parts() for mode in self.modes]

    def usable(self, output: tuple[tuple[str, int], str], key: str) -> bool:
        part, spec = output
        item = _read_item(self.out, key)
        return item is not None and item["params"] == self.item_params(self.mode(spec), part)

    def units(self, missing: Sequence[tuple[tuple[str, int], str]]) -> list[Task]:
        todo: dict[tuple[str, int], list[str]] = {}
        for part, spec in missing:
            todo.setdefault(part, []).append(spec)
        return [Task(part, tuple(specs)) for part, specs in todo.items()]

    def amount(self, unit: Task) -> int:
        return len(unit.modes)

    def label(self, unit: Task) -> str:
        return f"evaluate {unit.label}"

    def describe(self, todo: Sequence[Task], skipped: int) -> str:
        return (
            f"evaluation {self.eval_id}: {len(self.test)} test images, {self.describe_work()}, BN modes {', '.join(m.spec for m in self.modes)}; "
            f"{skipped} of {self.total_items} item(s) already done -> {self.out.uri}"
        )

    def make_worker(self, device: torch.device, worker: dict[str, str], gpus: float) -> TaskRunner:
        return TaskRunner(self, device, worker)

    def measure(self, unit: Task, result: TaskResult) -> list[tuple[str, float, dict[str, str]]]:
        tags = {"eval_id": self.eval_id}
        return [("tbn_evaluate_items", result.items, tags), ("tbn_evaluate_images", result.images, tags)]

    def on_device(self, device_type: str) -> EvalPlan:
        return self  # the items do not depend on the device type

    def finish(self, computed: int, skipped: int) -> EvalResult:
        """Aggregate the items into result.json, rebuild the run's evaluation report."""
        result = aggregate(self)
        files = write_evaluation_report(Storage.open(self.run_uri))
        return EvalResult(self.eval_id, self.out.uri, result, files["report.md"], computed, skipped)


def _read_item(out: Storage, key: str) -> dict[str, Any] | None:
    try:
        item = json.loads(out.read_bytes(key))
    except (ValueError, UnicodeDecodeError):
        return None
    return item if isinstance(item, dict) and item.get("format") == ITEM_FORMAT else None


class TaskRunner:
    """Runs whole tasks of a plan with the model built once: one per process or Ray actor.

    Each (mode, part) item is written once, as one object, to its deterministic key, so a task
    run twice (an actor restarted mid-task, a re-run) writes the same item again.
    """

    def __init__(self, plan: EvalPlan, device: torch.device, worker: dict[str, str]) -> None:
        self.plan = plan
        self.device = device
        self.worker = worker
        self.model = plan.build_model(device)

    def run(self, task: Task) -> TaskResult:
        t0 = time.perf_counter()
        images = self.plan.run_task(self.model, task, self.device, self.worker)
        return TaskResult(task, len(task.modes), images, time.perf_counter() - t0, dict(self.worker))


# --- planning ---------------------------------------------------------------------------------


def select_test(d: data_mod.Cifar10, start: int | None, stop: int | None) -> data_mod.Split:
    """The test images with official index in [start, stop), among those this source has."""
    index = d.test.index
    chosen = np.ones(len(index), dtype=bool)
    if start is not None:
        chosen &= index >= start
    if stop is not None:
        chosen &= index < stop
    if not chosen.any():
        raise TbnError(
            f"no test images with index in [{start or 0}, {stop if stop is not None else 'end'}) in {d.description}"
        )
    return d.test.subset(np.flatnonzero(chosen))


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TbnError(f"--batch-size must be a positive integer, got {batch_size!r}")
    return batch_size


def base_plan(
    run: Run,
    modes: Sequence[str],
    *,
    batch_size: int,
    data_cfg: DataConfig | None,
    start: int | None,
    stop: int | None,
    kind: str,
) -> dict[str, Any]:
    """Everything both plans check first: the modes and their statistics, the checkpoint, the images."""
    parsed = parse_bn_modes(modes)
    _check_batch_size(batch_size)
    model, ckpt = run.load_model("cpu")
    stats = {name: run.bn_stats(name, model) for name in dict.fromkeys([CLEAN, *(m.stats_name for m in parsed)])}
    for s in stats.values():
        with use_bn_stats(model, s):  # a set that does not fit the model fails here
            pass
    d = load_data_for(ckpt, data_cfg)
    test = select_test(d, start, stop)
    return {
        "run_uri": run.uri,
        "network": model,
        "model_label": ckpt.config.model.label,
        "epoch": ckpt.epoch,
        "modes": parsed,
        "stats": stats,
        "test": test,
        "data_source": d.source,
        "data_description": d.description,
        "batch_size": batch_size,
        "root": run.storage.child(EVALUATE_DIR, kind),
    }


# --- running and aggregating ------------------------------------------------------------------------


def run_in_process(
    plan: EvalPlan, device: torch.device, *, progress: bool = True, on_task: Callable[[TaskResult], None] | None = None
) -> EvalResult:
    """Evaluate the pending tasks of ``plan`` in this process, then aggregate and report (no Ray)."""
    return engine.run_in_process(plan, device, progress=progress, on_unit=on_task)


def _read_items(out: Storage, keys: list[str]) -> list[dict[str, Any]]:
    items = map_concurrently(lambda k: _read_item(out, k), keys)
    bad = [k for k, item in zip(keys, items) if item is None]
    if bad:
        raise TbnError(
            f"{out.object_uri(bad[0])} is not a readable evaluation item; delete it and run the same command again"
        )
    return items  # type: ignore[return-value]


def aggregate(plan: EvalPlan) -> dict[str, Any]:
    """result.json of this evaluation from its items: every planned item must be there."""
    keys = set(plan.out.list())
    missing = [plan.item_key(m, p) for p in plan.parts() for m in plan.modes if plan.item_key(m, p) not in keys]
    if missing:
        raise TbnError(
            f"{plan.out.uri}: {len(missing)} item(s) missing (e.g. {missing[0]}); run the same command again"
        )
    items = {mode: _read_items(plan.out, [plan.item_key(mode, p) for p in plan.parts()]) for mode in plan.modes}
    result: dict[str, Any] = {
        "format": RESULT_FORMAT,
        "kind": plan.kind,
        "eval_id": plan.eval_id,
        "run": plan.run_uri,
        "epoch": plan.epoch,
        "model": plan.model_label,
        "data": plan.data_description,
        "data_source": plan.data_source,
        "test_images": len(plan.test),
        "test_indices": index_text(plan.test.index),
        "batch_size": plan.batch_size,
        **plan.result_fields(items),
    }
    # results of earlier commands with the same eval id (other modes) are kept
    previous = plan.out.read_json("result.json") if "result.json" in keys else {}
    result["modes"] = {**previous.get("modes", {}), **result["modes"]}
    plan.out.write_json("result.json", result)
    return result
