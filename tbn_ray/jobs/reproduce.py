"""``tbn-ray reproduce``: the paper's experiment grid as one resumable pipeline.

Stages run in order for every model of the config: train, calibrate (TBN statistics per
sigma), certify (TBN and, as the paper's contrast, clean statistics), evaluate (accuracy
under noise, CIFAR-10-C per BN mode, attacks with the clean statistics), report. Each stage
calls the same code as the single commands, so each skips the work already stored: a
killed reproduction resumes where it stopped. A finished stage leaves a small record
(``stages/<model>/<stage>.json``: where its results are, on which device) that the report
reads together with the stored results themselves; no number in the report is computed
anywhere else.

Layout under ``<storage>/reproduce/<name>/``: one run directory per model, ``stages/``,
and ``report.md``, ``report.json`` and the plots.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from tbn_ray.config import ModelSpec, ReproduceConfig
from tbn_ray.devices import resolve_device
from tbn_ray.errors import TbnError, log
from tbn_ray.science import autoattack
from tbn_ray.science import data as data_mod
from tbn_ray.science.tbn import bn_key
from tbn_ray.store.certify_layout import certify_output
from tbn_ray.store.cifar10 import load_from_config
from tbn_ray.store.reproduction import STAGES, Reproduction
from tbn_ray.store.storage import Storage

# --- the stages, one model each -------------------------------------------------------------


def train_stage(rep: Reproduction, spec: ModelSpec, progress: bool) -> dict[str, Any]:
    from tbn_ray.jobs.pipeline import train_run

    run = rep.run(spec)
    ckpt = train_run(rep.cfg.train_config(spec), run, progress=progress)
    if not rep.cfg.keep_optimizer and (ckpt.optimizer is not None or ckpt.scheduler is not None):
        run.save_checkpoint(replace(ckpt, optimizer=None, scheduler=None))
    return {"epochs": ckpt.epoch, "run": run.uri}


def _tbn_sigmas(cfg: ReproduceConfig) -> list[float]:
    modes = [float(m.removeprefix("sigma:")) for m in cfg.robustness.corruption_modes if m.startswith("sigma:")]
    return sorted({*cfg.calibrate.sigmas, *cfg.certify.sigmas, *modes})


def calibrate_stage(rep: Reproduction, spec: ModelSpec, progress: bool) -> dict[str, Any]:
    """Calibrates only the sigmas whose stored set was not made with these settings."""
    from tbn_ray.jobs.pipeline import calibrate_run

    run, c = rep.run(spec), rep.cfg.calibrate
    sets = run.load_bn_sets()
    same = {"samples": c.samples, "batch_size": c.batch_size, "seed": c.seed}

    def stored(sigma: float) -> bool:
        meta = sets.get(bn_key(sigma), {}).get("meta", {})
        return all(meta.get(k) == v for k, v in same.items())

    missing = [s for s in _tbn_sigmas(rep.cfg) if not stored(s)]
    if missing:
        calibrate_run(run, c.model_copy(update={"sigmas": tuple(missing)}), device=rep.cfg.device, progress=progress)
    else:
        log(
            f"{run.uri}: TBN statistics for sigma {', '.join(f'{s:g}' for s in _tbn_sigmas(rep.cfg))} already calibrated"
        )
    return {"sigmas": _tbn_sigmas(rep.cfg)}


def certify_stage(rep: Reproduction, spec: ModelSpec, progress: bool) -> dict[str, Any]:
    from tbn_ray.jobs.certify import certify_run

    run = rep.run(spec)
    out = certify_output(run)
    locations = {}
    for bn in rep.cfg.certify_bn(spec):
        cfg = rep.cfg.certify.model_copy(update={"bn": bn, "sigmas": rep.cfg.certify_sigmas(spec)})
        outputs = certify_run(run, cfg, out, device=rep.cfg.device, progress=progress)
        locations[bn] = {f"{o.sigma:g}": o.location for o in outputs}
    return {"certify": locations}


def _noise(rep: Reproduction, spec: ModelSpec) -> str:
    """Accuracy under noise, clean BN vs TBN, on the same noisy images; stored once per setting."""
    from tbn_ray.jobs.pipeline import noise_accuracy

    run, n = rep.run(spec), rep.cfg.noise
    key = "noise_accuracy.json"
    params = {**n.model_dump(), "sigmas": list(rep.cfg.certify.sigmas)}
    if run.storage.exists(key) and run.storage.read_json(key).get("params") == params:
        return run.storage.object_uri(key)
    d = load_from_config(run.load_checkpoint().config.data)
    test = d.test.subset(np.arange(min(n.images, len(d.test))))
    t0 = time.perf_counter()
    rows = noise_accuracy(
        run,
        rep.cfg.certify.sigmas,
        test.images,
        test.labels,
        draws=n.draws,
        seed=n.seed,
        batch_size=n.batch_size,
        device=rep.cfg.device,
    )
    body = {
        "rows": rows,
        **data_mod.data_meta(d),
        "test_images": len(test),
        "params": params,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return run.storage.write_json(key, body)


def evaluate_stage(rep: Reproduction, spec: ModelSpec, progress: bool) -> dict[str, Any]:
    from tbn_ray.jobs.evaluate import run_in_process
    from tbn_ray.jobs.evaluate_attack import plan_attack
    from tbn_ray.jobs.evaluate_corruptions import plan_corruptions

    run, r, e = rep.run(spec), rep.cfg.robustness, rep.cfg.evaluate
    noise = _noise(rep, spec)
    device = resolve_device(rep.cfg.device)
    corruption = plan_corruptions(
        run,
        list(r.corruption_modes),
        e.model_copy(
            update={"corruptions": r.corruptions, "severities": r.severities, "cifar10c_seed": r.cifar10c_seed}
        ),
        cache_root=rep.root,
        stop=r.corruption_images,
        progress=progress,
    )
    c_result = run_in_process(corruption, device, progress=progress)
    out = {"noise": noise, "corruptions": c_result.location}
    if not rep.cfg.attacked(spec):
        return out
    threat = rep.cfg.train_config(spec).attack
    # AutoAttack may run on fewer images than the other attacks: one plan each, the same seed and threat
    groups = [
        ("attack", tuple(a for a in e.attacks if a != autoattack.NAME), r.attack_images),
        ("autoattack", tuple(a for a in e.attacks if a == autoattack.NAME), r.autoattack_images or r.attack_images),
    ]
    for key, attacks, stop in (g for g in groups if g[1]):
        at = {"attacks": attacks, "norm": threat.norm, "eps": threat.eps, "step_size": None, "seed": r.attack_seed}
        plan = plan_attack(run, ["clean"], e.model_copy(update=at), stop=stop)
        out[key] = run_in_process(plan, device, progress=progress).location
    return out


STAGE_FUNCTIONS: dict[str, Callable[[Reproduction, ModelSpec, bool], dict[str, Any]]] = {
    "train": train_stage,
    "calibrate": calibrate_stage,
    "certify": certify_stage,
    "evaluate": evaluate_stage,
}


def reproduce(
    cfg: ReproduceConfig, storage: Storage, *, stages: Sequence[str] = STAGES, progress: bool = True
) -> dict[str, str]:
    """Run ``stages`` (all by default, always in pipeline order) for every model; returns the
    report's files when ``report`` is among them, else {}."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise TbnError(f"unknown stage {unknown[0]!r}: use one of {', '.join(STAGES)}")
    storage.check()
    rep = Reproduction.open(cfg, storage)
    for stage in (s for s in STAGES if s in stages and s != "report"):
        for spec in cfg.models:
            before = STAGES[: STAGES.index(stage)]
            missing = [s for s in before if s not in stages and rep.record(spec, s) is None]
            if missing:
                raise TbnError(
                    f"stage {stage} of model {spec.name} needs stage {missing[0]} first: tbn-ray reproduce --stage {missing[0]}"
                )
            log(f"reproduce {cfg.name}: {stage} {spec.name}")
            t0 = time.perf_counter()
            body = STAGE_FUNCTIONS[stage](rep, spec, progress)
            stored = rep.record(spec, stage)
            if stored is not None and all(stored.get(k) == v for k, v in body.items()):
                continue  # found done: the record of the call that did the work keeps its wall time
            rep.write_record(spec, stage, {**body, "wall_seconds": round(time.perf_counter() - t0, 1)})
    if "report" not in stages:
        return {}
    from tbn_ray.reports.reproduce import write_reproduce_report

    return write_reproduce_report(rep)
