"""``tbn-ray show RUN``: what a run holds, read from its stored files alone (local or S3).

The model and its training (config, epochs, best held-out accuracies), the calibrated TBN
statistics, and every certification and evaluation under the run, finished or not: a user
sees what exists before asking for what does not.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from typing import Any

from tbn_ray.errors import TbnError
from tbn_ray.reports.certify import radius_cap
from tbn_ray.store.certify_layout import certify_output
from tbn_ray.store.runs import BN_STATS, Run
from tbn_ray.store.storage import Storage, map_concurrently

_SIGMA_FILE = re.compile(r"^(?P<id>[^/]+)/(?P<sigma>sigma=[^/]+)/(?P<file>[^/]+)$")
_SHARD = re.compile(r"^shard-\d{5}-of-(?P<of>\d{5})\.parquet$")
_EVAL_FILE = re.compile(r"^(?P<kind>corruptions|attack)/(?P<id>[^/]+)/(?P<rest>.+)$")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _training(run: Run) -> Iterator[str]:
    if not run.has_checkpoint():
        yield f"model: no checkpoint ({run.checkpoint_key}): train first (tbn-ray train)"
        return
    ckpt = run.load_checkpoint()
    cfg = ckpt.config
    source = cfg.model.source
    if source is not None:  # imported: where it came from, no training of ours
        digest = f", weights sha256 {source.weights_sha256[:16]}" if source.weights_sha256 else ""
        yield f"model: {cfg.model.label}, imported{digest} ({run.checkpoint_key}, saved {ckpt.meta.get('saved', '?')})"
        yield f"data: {ckpt.meta.get('data', cfg.data.source)}"
        return
    yield f"model: {cfg.model.arch}, trained {ckpt.epoch} of {cfg.optim.epochs} epochs ({run.checkpoint_key}, saved {ckpt.meta.get('saved', '?')})"
    yield f"data: {ckpt.meta.get('data', cfg.data.source)}"
    yield f"training: {cfg.objective_label}; batch {cfg.optim.batch_size}, seed {cfg.seed}"
    history = ckpt.meta.get("history") or []
    for key, what in (
        ("heldout_clean_acc", "clean"),
        ("heldout_pgd_acc", "PGD"),
        ("heldout_noise_acc", "under its training noise"),
    ):
        scored = [(row[key], int(row.get("epoch", i)) + 1) for i, row in enumerate(history) if row.get(key) is not None]
        if scored:
            best, epoch = max(scored)
            yield f"best held-out {what} accuracy: {_pct(best)} (epoch {epoch})"


def _statistics(run: Run) -> Iterator[str]:
    if not run.storage.exists(BN_STATS):
        yield "TBN statistics: none calibrated (tbn-ray calibrate RUN --sigma S)"
        return
    sets = run.load_bn_sets()
    sigmas = sorted((s for s in sets if s.startswith("sigma=")), key=lambda s: float(s.removeprefix("sigma=")))
    yield f"TBN statistics: {', '.join(sigmas) or 'none'} (besides the clean set)"
    for name in sigmas:
        meta = sets[name].get("meta", {})
        yield f"  {name}: {meta.get('samples', '?')} noisy samples of {meta.get('heldout_images', '?')} held-out images, seed {meta.get('seed', '?')}"
        if "replaced" in meta:
            yield (
                f"    replaced {meta['replaced'].get('at', '?')} (--replace): certifications at {name} made before then used the "
                f"replaced set ({meta['replaced'].get('made_from', {}).get('samples', '?')} samples)"
            )


def _shard_counts(store: Storage, keys: list[str]) -> tuple[int, int | None]:
    """Images in the shards written so far, and the certification's total (from a shard's metadata)."""
    import pyarrow.parquet as pq

    def read(key: str) -> tuple[int, int | None]:
        meta = pq.read_metadata(io.BytesIO(store.read_bytes(key)))
        total = None
        for value in (meta.metadata or {}).values():
            try:
                total = json.loads(value).get("images_total", total)
            except (ValueError, AttributeError):
                continue
        return meta.num_rows, total

    counts = map_concurrently(read, keys)
    totals = [t for _, t in counts if t is not None]
    return sum(n for n, _ in counts), (totals[0] if totals else None)


def _sigma_line(store: Storage, sigma: str, files: list[str]) -> str:
    if "summary.json" in files:
        s = store.read_json(f"{sigma}/summary.json")
        p = s["params"]
        acc = s["certified_accuracy"]
        cap = radius_cap(p["sigma"], p["n"], p["alpha"])
        return (
            f"  {sigma}: {s['images']}/{s['images']} images, n0={p['n0']} n={p['n']} alpha={p['alpha']:g} bn={p.get('bn', '?')}: "
            f"certified accuracy {_pct(acc.get('0.0'))} at r=0, {_pct(acc.get('0.5'))} at r=0.5, ACR {s['acr']:.3f} (max r {cap:.2f})"
        )
    shards = [f for f in files if _SHARD.match(f)]
    if not shards:
        return f"  {sigma}: no shards yet"
    done, total = _shard_counts(store, [f"{sigma}/{f}" for f in shards])
    of = int(_SHARD.match(shards[0]).group("of"))  # type: ignore[union-attr]
    return f"  {sigma}: unfinished, {done}/{total if total is not None else '?'} images in {len(shards)}/{of} shards (the same certify command resumes)"


def _certifications(run: Run) -> Iterator[str]:
    store = certify_output(run)
    found: dict[str, dict[str, list[str]]] = {}
    for key in store.list():
        m = _SIGMA_FILE.match(key)
        if m:
            found.setdefault(m.group("id"), {}).setdefault(m.group("sigma"), []).append(m.group("file"))
    if not found:
        yield "certifications: none (tbn-ray certify RUN --sigma S)"
        return
    yield f"certifications ({store.uri}):"
    for run_id, sigmas in sorted(found.items()):
        yield f"- {run_id}"
        for sigma in sorted(sigmas, key=lambda s: float(s.removeprefix("sigma="))):
            yield _sigma_line(store.child(run_id), sigma, sigmas[sigma])


def _worst(row: dict[str, Any]) -> float | None:
    """The worst case over attacks (stored for two or more), else the one attack's accuracy."""
    if "worst_case" in row:
        return row["worst_case"]
    return min((v for k, v in row.items() if k not in ("definition", "clean_accuracy", "images")), default=None)


def _evaluation_lines(result: dict[str, Any]) -> Iterator[str]:
    for key, mode in sorted(result.get("modes", {}).items()):
        if result["kind"] == "corruptions":
            yield f"  {key}: mean accuracy {_pct(mode.get('mean'))} over {mode.get('grid', '?')} corruptions x severities, clean {_pct(mode.get('clean_accuracy'))}"
        else:
            parts = [f"{variant} {_pct(_worst(row))}" for variant, row in mode.get("variants", {}).items()]
            yield f"  {key}: robust accuracy (worst over attacks) " + ", ".join(parts)


def _evaluations(run: Run) -> Iterator[str]:
    store = run.storage.child("evaluate")
    found: dict[tuple[str, str], list[str]] = {}
    for key in store.list():
        m = _EVAL_FILE.match(key)
        if m:
            found.setdefault((m.group("kind"), m.group("id")), []).append(m.group("rest"))
    if not found:
        yield "evaluations: none (tbn-ray evaluate corruptions|attack RUN --bn ...)"
        return
    yield f"evaluations ({store.uri}):"
    for (kind, eval_id), files in sorted(found.items()):
        if "result.json" not in files:
            yield f"- {kind} {eval_id}: unfinished, {len(files)} item(s) stored (the same evaluate command resumes)"
            continue
        r = store.read_json(f"{kind}/{eval_id}/result.json")
        extra = (
            f", {r['attack'].get('norm')} eps {r['attack'].get('eps')}"
            if kind == "attack" and isinstance(r.get("attack"), dict)
            else ""
        )
        yield f"- {kind} {eval_id}: {r.get('test_images', '?')}/{r.get('test_images', '?')} test images, {r.get('source', '?')}, batch {r.get('batch_size', '?')}{extra}"
        yield from _evaluation_lines(r)


def describe_run(run: Run) -> str:
    """Everything ``tbn-ray show`` prints about ``run``."""
    if not run.storage.list():
        raise TbnError(f"nothing stored at {run.uri}: check the path (runs live under $TBN_STORAGE or ./tbn-results)")
    lines = [f"run: {run.uri}", *_training(run), *_statistics(run), *_certifications(run), *_evaluations(run)]
    if run.storage.exists("noise_accuracy.json"):
        for row in run.storage.read_json("noise_accuracy.json").get("rows", []):
            lines.append(
                f"accuracy under N(0, {row['sigma']:g}^2) noise: clean BN {_pct(row['accuracy_clean_bn'])} -> TBN {_pct(row['accuracy_tbn'])}"
            )
    return "\n".join(lines)
