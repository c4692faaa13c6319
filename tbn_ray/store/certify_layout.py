"""The stored layout of one certification, ``<output>/<run-id>/sigma=<s>/shard-<k>-of-<n>.parquet``:
which shard files a folder holds, and whether one of them holds what a shard must.

The run id covers everything that changes a certificate but not the shard count (the same
images cut differently give the same numbers), so one folder could hold two shard sets.
Two rules keep it unambiguous: certify does not start a second count where shards of
another are stored, and aggregation without a plan refuses a sigma folder holding two.
"""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa

from tbn_ray.errors import TbnError
from tbn_ray.store.storage import Storage

SHARD_KEY = re.compile(r"^(sigma=[^/]+)/shard-(\d{5})-of-(\d{5})\.parquet$")

#: Columns of a shard, as ``ShardCertifier`` writes them, by the kind of value they hold.
_COLUMNS = {
    pa.types.is_integer: ("idx", "label", "predict", "correct", "count", "c_a_hat", "n0", "n"),
    pa.types.is_floating: ("radius", "p_a_lower", "time"),
    pa.types.is_list: ("counts", "counts_selection"),
    pa.types.is_string: ("actor", "node"),
}
#: Metadata fields of a shard and their types (``bool`` is refused where a number is meant).
_META = {
    "format": str,
    "sigma": (int, float),
    "shard": int,
    "shards": int,
    "indices": list,
    "images_total": int,
    "params": dict,
    "worker": dict,
    "gpus": (int, float),
    "started": (int, float),
    "seconds": (int, float),
}


def shard_sets(keys: list[str]) -> dict[str, dict[int, dict[int, str]]]:
    """The shard files among ``keys``: sigma folder -> shard count -> shard number -> key."""
    found: dict[str, dict[int, dict[int, str]]] = {}
    for key in keys:
        m = SHARD_KEY.match(key)
        if m:
            found.setdefault(m.group(1), {}).setdefault(int(m.group(3)), {})[int(m.group(2))] = key
    return found


def refuse_other_shard_count(out: Storage, shards: int) -> None:
    """Before certifying into ``out`` (``<output>/<run-id>``) in ``shards`` shards: refuse if it
    holds shards of another count, which a resumed run would otherwise leave beside the new set."""
    counts = sorted({n for by_count in shard_sets(out.list()).values() for n in by_count if n != shards})
    if counts:
        raise TbnError(
            f"{out.uri} holds this certification cut into {counts[0]} shards, not {shards}: resume it with "
            f"--shards {counts[0]}, or delete {out.uri} to start over in {shards}"
        )


def refuse_two_shard_sets(out: Storage, found: dict[str, dict[int, dict[int, str]]]) -> None:
    """Before aggregating ``shard_sets`` without a plan: a sigma folder with two shard counts
    is refused rather than one of them picked."""
    for name, by_count in sorted(found.items()):
        if len(by_count) > 1:
            counts = " and ".join(str(n) for n in sorted(by_count))
            raise TbnError(
                f"{out.uri}/{name} holds two shard sets ({counts} shards): delete the shard-*-of-<n>.parquet "
                "files of the one you do not want, then run tbn-ray report again"
            )


def _typed(value: Any, kind: type | tuple[type, ...]) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def shard_problem(table: pa.Table, meta: Any) -> str | None:
    """What is wrong with a stored shard's columns or metadata (a damaged or foreign file), or None."""
    if not isinstance(meta, dict):
        return "has no shard metadata"
    for field, kind in _META.items():
        if not _typed(meta.get(field), kind):
            return f"has no valid metadata field {field!r}"
    if not all(_typed(i, int) for i in meta["indices"]) or not isinstance(meta["worker"].get("actor"), str):
        return "has damaged metadata (indices or worker)"
    for is_kind, names in _COLUMNS.items():
        for name in names:
            column = table.schema.field(name) if name in table.schema.names else None
            if column is None or not is_kind(column.type) or table.column(name).null_count:
                return f"has no valid column {name!r}"
    return None


#: Where a run's certifications go when no output is given: ``<run>/certify``.
CERTIFY_DIR = "certify"


def certify_output(run: Any, output: str | None = None) -> Storage:
    """The results root of a certification: ``output`` if given, else the run's ``certify/`` folder."""
    return Storage.open(output) if output else run.storage.child(CERTIFY_DIR)
