"""The stored layout of one certification, ``<output>/<run-id>/sigma=<s>/shard-<k>-of-<n>.parquet``:
the shard keys, and whether a stored shard holds what a shard must.
"""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa

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
    "format": str, "sigma": (int, float), "shard": int, "shards": int, "indices": list, "images_total": int,
    "params": dict, "worker": dict, "gpus": (int, float), "started": (int, float), "seconds": (int, float),
}  # fmt: skip


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
