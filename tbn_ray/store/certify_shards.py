"""The stored form of a certification: one Parquet object per (sigma, shard), checked and merged.

A shard object holds its records (Cohen's fields plus vote counts, time, actor, node) and, in
its schema metadata, what produced it (``params``), the indices it was planned with and who
computed it when. Merging checks that every planned index appears exactly once, then writes
each sigma's ``certify.tsv``, ``radii.parquet`` and ``summary.json``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tbn_ray.errors import TbnError, log
from tbn_ray.science.smoothing import summarize
from tbn_ray.store.certify_layout import SHARD_KEY, refuse_two_shard_sets, shard_problem, shard_sets
from tbn_ray.store.results import write_results
from tbn_ray.store.storage import Storage, map_concurrently


class CertifyPlan(Protocol):
    """What merging needs of a plan (``jobs.certify.CertifyPlan``): its sigmas and shards."""

    sigmas: tuple[float, ...]
    shards: int
    indices: np.ndarray

    def shard_indices(self, shard: int) -> np.ndarray: ...


SHARD_FORMAT = "tbn-ray/certify-shard-v1"
_SHARD_META = b"tbn_ray.shard"


def sigma_dir(sigma: float) -> str:
    return f"sigma={float(sigma):g}"


def shard_key(sigma: float, shard: int, shards: int) -> str:
    return f"{sigma_dir(sigma)}/shard-{shard:05d}-of-{shards:05d}.parquet"


def write_shard(out: Storage, key: str, records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """One shard as one whole object (present complete, or absent); its URI."""
    table = pa.Table.from_pylist(records).replace_schema_metadata({_SHARD_META: json.dumps(meta)})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return out.write_bytes(key, buf.getvalue())


class UnusableShard(TbnError):
    """A stored shard that cannot be used (corrupt, or another plan's): certify it again."""


def read_shard(
    out: Storage, key: str, expected: list[int] | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A shard's records and metadata, checked: it holds exactly the indices it was planned with.

    An unreachable store raises TbnError; a shard that is there but unusable, ``UnusableShard``.
    """
    data = out.read_bytes(key)
    where = out.object_uri(key)
    try:
        table = pq.read_table(io.BytesIO(data))
        meta = json.loads((table.schema.metadata or {})[_SHARD_META])
    except (pa.ArrowException, KeyError, ValueError, OSError) as e:
        raise UnusableShard(f"{where} is not a readable shard ({type(e).__name__})") from None
    problem = shard_problem(table, meta)
    if problem is not None:
        raise UnusableShard(f"{where} {problem}: not a usable tbn-ray shard")
    m = SHARD_KEY.match(key)
    if meta.get("format") != SHARD_FORMAT or m is None:
        raise UnusableShard(f"{where} is not a tbn-ray shard ({SHARD_FORMAT})")
    if (sigma_dir(meta["sigma"]), meta["shard"], meta["shards"]) != (m.group(1), int(m.group(2)), int(m.group(3))):
        raise UnusableShard(
            f"{where} holds sigma={meta['sigma']} shard {meta['shard']}/{meta['shards']}, not what its key says"
        )
    records = table.to_pylist()
    params = meta["params"]
    if any(r["n0"] != params.get("n0") or r["n"] != params.get("n") for r in records):
        raise UnusableShard(f"{where} holds records sampled with another n0 or n than its parameters say")
    planned = meta["indices"] if expected is None else expected
    if meta["indices"] != planned or [r["idx"] for r in records] != planned:
        raise UnusableShard(f"{where} does not hold the indices planned for it")
    return records, meta


@dataclass(frozen=True)
class CertifyOutput:
    sigma: float
    summary: dict[str, Any]
    location: str


def _choose_shards(out: Storage, plan: CertifyPlan | None) -> dict[str, list[str]]:
    """Per sigma folder, the keys of the shards to merge (see ``merge_shards``)."""
    found = shard_sets(out.list())
    chosen: dict[str, list[str]] = {}
    if plan is not None:
        for sigma in plan.sigmas:
            have = found.get(sigma_dir(sigma), {}).get(plan.shards, {})
            missing = sorted(set(range(plan.shards)) - set(have))
            if missing:
                raise TbnError(
                    f"{out.uri}/{sigma_dir(sigma)}: shards {missing[:5]} missing; run the same certify command again"
                )
            chosen[sigma_dir(sigma)] = [have[k] for k in range(plan.shards)]
    else:
        refuse_two_shard_sets(out, found)
        for name, by_count in sorted(found.items()):
            complete = [n for n, have in by_count.items() if len(have) == n]
            if complete:
                n = max(complete)
                chosen[name] = [by_count[n][k] for k in range(n)]
            else:
                n, have = max(by_count.items(), key=lambda item: len(item[1]) / item[0])
                log(
                    f"{out.uri}/{name}: {n - len(have)} of {n} shards missing, left out (run the certify command again to finish)"
                )
        if not chosen:
            raise TbnError(
                f"no complete certification under {out.uri}: point at <output>/<run-id> of a finished (or resumed) tbn-ray certify"
            )
    return chosen


def merge_shards(out: Storage, plan: CertifyPlan | None = None) -> list[CertifyOutput]:
    """Merge the shards under ``out`` into per-sigma results (files and summaries). With a
    ``plan``, every planned shard must be there with its planned indices; without, each sigma
    uses its complete set of shards and incomplete sigmas are left out (and named)."""
    return [_merge_sigma(out, name, keys, plan) for name, keys in _choose_shards(out, plan).items()]


def _merge_sigma(out: Storage, name: str, keys: list[str], expected: CertifyPlan | None) -> CertifyOutput:
    """One sigma's shards -> certify.tsv, radii.parquet, summary.json, after checking every index appears once."""
    if expected is None:
        shards = map_concurrently(lambda key: read_shard(out, key), keys)
    else:
        shards = map_concurrently(
            lambda k: read_shard(out, keys[k], expected.shard_indices(k).tolist()), list(range(len(keys)))
        )
    records = [r for recs, _ in shards for r in recs]
    metas = [meta for _, meta in shards]
    idx = [r["idx"] for r in records]
    if len(set(idx)) != len(idx):
        raise TbnError(f"{out.uri}/{name}: an index appears in two shards; delete that folder and certify again")
    total = metas[0]["images_total"]
    wanted = set(expected.indices.tolist()) if expected is not None else None
    if len(idx) != total or (wanted is not None and set(idx) != wanted):
        raise TbnError(f"{out.uri}/{name}: the shards hold {len(idx)} images, the certification {total}; certify again")
    params = metas[0]["params"]
    if any(m["params"] != params for m in metas):
        raise TbnError(f"{out.uri}/{name}: shards from different certifications; delete that folder and certify again")
    finished = max(m["started"] + m["seconds"] for m in metas)
    params = {
        **params,
        "wall_seconds": round(finished - min(m["started"] for m in metas), 3),  # first shard start to last shard end
        "compute_seconds": round(sum(m["seconds"] for m in metas), 3),
        "gpu_hours": round(sum(m["seconds"] * m["gpus"] for m in metas) / 3600, 6),
        "workers": len({m["worker"]["actor"] for m in metas}),
    }
    summary = summarize(records)
    where = out.child(name)
    try:
        write_results(records, summary, where, params)
    except ValueError as e:  # records that disagree with their own parameters: a damaged or foreign shard
        raise TbnError(
            f"{where.uri}: the shards do not agree with their parameters ({e}); delete that folder and certify again"
        ) from None
    return CertifyOutput(float(params["sigma"]), {**summary, **params}, where.uri)
