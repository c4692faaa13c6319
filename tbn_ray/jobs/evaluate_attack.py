"""Empirical adversarial robustness per BN mode (``tbn-ray evaluate attack``): a ``jobs.evaluate`` job.

One item: per-image clean and adversarial correctness of one BN mode under one attack on one
batch of test images, per variant (``science.robustness.ATTACK_VARIANTS``). The batch is the
test batch a batch mode normalises with, so the batch size is part of the eval id; random
starts are seeded per (seed, attack, batch), the same for every mode and variant.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from tbn_ray.config import AttackConfig, DataConfig, EvaluateConfig, default
from tbn_ray.errors import TbnError
from tbn_ray.jobs.evaluate import EvalPlan, Task, base_plan
from tbn_ray.science import autoattack
from tbn_ray.science import data as data_mod
from tbn_ray.science.bn_modes import BNMode, parse_bn_modes
from tbn_ray.science.robustness import ATTACK_VARIANTS, COUPLED_VARIANTS, attack_variants
from tbn_ray.science.tbn import CLEAN
from tbn_ray.store.runs import Run

#: How result.json names the APGD variant used.
APGD = "APGD-CE, Croce & Hein 2020: momentum 0.75, rho 0.75, initial step 2 eps, checkpoints p_1=0.22"


#: Every attack name; the default set (``EvaluateConfig.attacks``) is smaller, so stored evaluations keep their items.
KNOWN_ATTACKS: tuple[str, ...] = (*default(EvaluateConfig, "attacks"), autoattack.NAME)


def parse_attacks(names: Sequence[str]) -> tuple[str, ...]:
    if not names:
        raise TbnError(f"no attack given (--attack); use {', '.join(KNOWN_ATTACKS)}")
    for name in names:
        if name not in KNOWN_ATTACKS:
            raise TbnError(f"unknown attack {name!r}; use {', '.join(KNOWN_ATTACKS)}")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True, eq=False)
class AttackPlan(EvalPlan):
    attacks: tuple[str, ...] = default(EvaluateConfig, "attacks")
    threat: AttackConfig = field(default_factory=AttackConfig)
    seed: int = 0

    kind = "attack"

    def _id_params(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.threat_params(), "batch_size": self.batch_size}

    def threat_params(self) -> dict[str, Any]:
        t = self.threat
        return {
            "norm": t.norm,
            "eps": t.eps,
            "steps": t.steps,
            "restarts": t.restarts,
            "pgd_step_size": t.alpha,
            "seed": self.seed,
        }

    @property
    def batches(self) -> int:
        return math.ceil(len(self.test) / self.batch_size)

    def batch_rows(self, k: int) -> slice:
        return slice(k * self.batch_size, min((k + 1) * self.batch_size, len(self.test)))

    def parts(self) -> list[tuple[str, int]]:
        return [(a, k) for a in self.attacks for k in range(self.batches)]

    def describe_work(self) -> str:
        steps = (
            f", {self.threat.steps} steps" if set(self.attacks) - {autoattack.NAME} else ""
        )  # AutoAttack's are its own
        return f"{', '.join(self.attacks)} ({self.threat.norm}, eps={self.threat.eps:g}{steps}) on {self.batches} batch(es)"

    def item_key(self, mode: BNMode, part: tuple[str, int]) -> str:
        return f"{mode.key(self.batch_size)}/{part[0]}/batch-{part[1]:05d}-of-{self.batches:05d}.json"

    def item_params(self, mode: BNMode, part: tuple[str, int]) -> dict[str, Any]:
        # the batch size fixes which images an item holds, in every mode
        params = {
            **super().item_params(mode, part),
            "attack": part[0],
            "batch": part[1],
            "batches": self.batches,
            "batch_size": self.batch_size,
        }
        if part[0] == autoattack.NAME:  # another AutoAttack release is another attack
            params["autoattack"] = autoattack.version()
        return params

    def item_seed(self, part: tuple[str, int]) -> int:
        """Per (run seed, attack, batch): the same random starts for every mode and variant."""
        key = int.from_bytes(part[0].encode(), "little")
        return int(np.random.SeedSequence([self.seed, key, part[1]]).generate_state(1, np.uint32)[0])

    def run_task(self, model: nn.Module, task: Task, device: torch.device, worker: dict[str, str]) -> int:
        rows = self.batch_rows(task.part[1])
        x = data_mod.to_float(
            np.array(self.test.images[rows]), device
        )  # copies: the object store's arrays are read-only
        y = torch.tensor(self.test.labels[rows], dtype=torch.int64, device=device)
        for spec in task.modes:
            mode = self.mode(spec)
            t0 = time.perf_counter()
            variants = attack_variants(
                model,
                x,
                y,
                mode,
                self.stats[mode.stats_name],
                self.stats[CLEAN],
                task.part[0],
                self.threat,
                seed=self.item_seed(task.part),
            )
            self.write_item(
                mode,
                task.part,
                {
                    "indices": self.test.index[rows].tolist(),
                    "variants": {v: {k: r.astype(int).tolist() for k, r in res.items()} for v, res in variants.items()},
                    "seconds": time.perf_counter() - t0,
                    "worker": worker,
                },
            )
        return len(y)

    def result_fields(self, items: dict[BNMode, list[dict[str, Any]]]) -> dict[str, Any]:
        return {
            "attack": {
                **self.threat_params(),
                "attacks": list(self.attacks),
                "apgd": APGD,
                **(
                    {"autoattack": f"{autoattack.DESCRIPTION}, {autoattack.version()}"}
                    if autoattack.NAME in self.attacks
                    else {}
                ),
            },
            "source": self.data_description,
            "modes": {mode.key(self.batch_size): _mode_result(its, mode) for mode, its in items.items()},
        }


def _mode_result(items: list[dict[str, Any]], mode: BNMode) -> dict[str, Any]:
    """Accuracies per variant and attack; the worst case over attacks per image (independent
    variants) or per batch (coupled variants, whose batches cannot be spliced)."""
    by_attack: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        by_attack.setdefault(item["params"]["attack"], []).append(item)
    out: dict[str, Any] = {}
    for variant in items[0]["variants"]:
        row: dict[str, Any] = {"definition": ATTACK_VARIANTS[variant]}
        per_attack = {}
        for attack, its in sorted(by_attack.items()):
            its = sorted(its, key=lambda i: i["params"]["batch"])
            clean = np.concatenate([i["variants"][variant]["clean"] for i in its]).astype(bool)
            adv = [np.asarray(i["variants"][variant]["adversarial"], dtype=bool) for i in its]
            per_attack[attack] = adv
            row["clean_accuracy"] = float(clean.mean())
            row[attack] = float(np.concatenate(adv).mean())
            row["images"] = int(len(clean))
        if len(per_attack) > 1:
            attacks = list(per_attack)
            if variant in COUPLED_VARIANTS:
                worst = sum(
                    min(int(per_attack[a][b].sum()) for a in attacks) for b in range(len(per_attack[attacks[0]]))
                )
            else:
                worst = int(np.logical_and.reduce([np.concatenate(per_attack[a]) for a in attacks]).sum())
            row["worst_case"] = worst / row["images"]
        out[variant] = row
    return {"spec": mode.spec, "definition": mode.definition(items[0]["params"]["batch_size"]), "variants": out}


def plan_attack(
    run: Run,
    modes: Sequence[str],
    cfg: EvaluateConfig,
    *,
    data_cfg: DataConfig | None = None,
    start: int | None = None,
    stop: int | None = None,
) -> AttackPlan:
    """Check the threat model, modes, statistics, images and storage before any work."""
    attacks = parse_attacks(cfg.attacks)
    threat = AttackConfig(
        norm=cfg.norm, eps=cfg.eps, steps=cfg.attack_steps, restarts=cfg.restarts, step_size=cfg.step_size
    )
    if autoattack.NAME in attacks:
        for mode in parse_bn_modes(modes):
            autoattack.check_frozen_bn(mode.batch, mode.spec)
        autoattack.require_pyautoattack()  # installed: before any work
    base = base_plan(
        run, modes, batch_size=cfg.batch_size, data_cfg=data_cfg, start=start, stop=stop, kind=AttackPlan.kind
    )
    run.storage.check()
    return AttackPlan(**base, attacks=attacks, threat=threat, seed=cfg.seed)
