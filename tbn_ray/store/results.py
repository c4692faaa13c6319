"""Certification result files: the community TSV, radii.parquet (every record field) and
summary.json, written whole to local or S3 storage, and read back.

The algorithm (``science.smoothing``) produces records; this module only stores them.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tbn_ray.errors import TbnError
from tbn_ray.science.smoothing import summarize
from tbn_ray.store.storage import Storage

#: Header of the community per-example format (Cohen et al.'s certify.py output).
TSV_HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"

#: Keys ``write_results`` requires in ``params``: every result names what produced it.
RESULT_PARAMS = ("sigma", "n0", "n", "alpha", "seed", "batch_size", "bn", "model", "data_source")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {value!r}")


def _tsv_line(r: dict[str, Any]) -> str:
    # the exact shortest round-trip radius (never rounded up across a reported radius), >= 3 decimals
    radius = np.format_float_positional(r["radius"], unique=True, min_digits=3)
    return f"{r['idx']}\t{r['label']}\t{r['predict']}\t{radius}\t{r['correct']}\t{r['time']:.4f}\n"


def as_storage(out: Storage | str | Path) -> Storage:
    """Results go wherever the run's storage is: a local directory or s3://bucket/prefix."""
    return out if isinstance(out, Storage) else Storage.open(out)


def write_results(
    records: Sequence[dict[str, Any]], summary: dict[str, Any], out: Storage | str | Path, params: dict[str, Any]
) -> dict[str, str]:
    """Write certify.tsv (community format), radii.parquet (every record field) and, last,
    summary.json (``summary`` plus ``params`` under "params"); returns their URIs by name.

    ``summary`` must be ``summarize(records, radii)``: it is recomputed and compared, so a
    stale or partial summary is never written next to the records. ``params`` must name at
    least ``RESULT_PARAMS`` (extra keys, e.g. a "data" description, are kept). Each file is
    written whole (``Storage``); summary.json is removed first and written last, so a
    summary.json always marks a complete, consistent result.
    """
    missing = [k for k in RESULT_PARAMS if k not in params]
    if missing:
        raise ValueError(f"params lack {missing}; results must name what produced them")
    if summarize(records, summary["radii"]) != summary:
        raise ValueError("summary does not match the records; pass summarize(records)")
    for key in ("n0", "n"):
        if any(r[key] != params[key] for r in records):
            raise ValueError(f"records were certified with a different {key} than params[{key!r}]={params[key]}")
    store = as_storage(out)
    store.delete("summary.json")  # while rewriting, no summary.json may describe other files
    records = sorted(records, key=lambda r: r["idx"])
    params_json = json.dumps(params, default=_json_default, sort_keys=True)
    table = pa.Table.from_pylist(list(records)).replace_schema_metadata({"tbn_ray.params": params_json})
    uris = {"certify.tsv": store.write_text("certify.tsv", TSV_HEADER + "\n" + "".join(_tsv_line(r) for r in records))}
    with store.writer("radii.parquet") as f:
        pq.write_table(table, f)
    uris["radii.parquet"] = store.object_uri("radii.parquet")
    summary_json = json.dumps({**summary, "params": params}, indent=2, default=_json_default)
    uris["summary.json"] = store.write_text("summary.json", summary_json + "\n")
    return uris


def read_results(out: Storage | str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The records (from radii.parquet) and summary (with "params") of ``write_results``."""
    store = as_storage(out)
    for key in ("summary.json", "radii.parquet"):
        if not store.exists(key):
            raise TbnError(
                f"no certification results at {store.object_uri(key)}; run certification into {store.uri} first"
            )
    return pq.read_table(io.BytesIO(store.read_bytes("radii.parquet"))).to_pylist(), store.read_json("summary.json")
