"""One storage layer for every command: a local directory or ``s3://bucket/prefix``.

Ray Train's ``storage_path`` points at the same root as the project's own files
(configs, metrics, TBN statistics, certified shards, reports), so a run's outputs live in
one place whether it ran on a laptop or a cluster. S3 settings come only from the
standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), so tests against a local S3 server
and production run the same code, and Ray workers inherit the same settings.

Every write is whole-object: a reader (or a re-run after a crash) sees the old object, the
new one, or none, never a partial one. Locally that is a temporary file in the target
directory renamed over the target with ``os.replace`` (``storage_local``); on S3 a single PUT
(or a multipart upload, which also becomes visible only when complete; ``storage_s3``). This
is what lets sharded work skip a shard whose output already exists.

This module holds the interface every caller uses (``Storage.open``) and what both backends
share. It must not import ray: science-side code uses it.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlparse

from tbn_ray.errors import TbnError

if TYPE_CHECKING:
    import pyarrow.fs

#: Default root when neither a flag nor ``TBN_STORAGE`` says otherwise.
DEFAULT_STORAGE = "./tbn-results"

#: Suffix of in-flight local temporary files; never listed, never a valid key.
TMP_SUFFIX = ".tbn-tmp"

# Many small objects (shards, items) are read this many at a time, to hide S3 latency.
_READ_THREADS = 16


def map_concurrently(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``[fn(x) for x in items]`` on a thread pool: for reading many small objects, where S3
    latency, not bandwidth, is the cost."""
    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        return list(pool.map(fn, items))


def default_storage_uri() -> str:
    """The storage root: ``$TBN_STORAGE`` if set, else ``./tbn-results``."""
    return os.environ.get("TBN_STORAGE") or DEFAULT_STORAGE


def check_key(key: str, *, allow_empty: bool = False) -> str:
    """Keys are relative '/'-separated paths; refuse anything that could escape the root."""
    if key == "" and allow_empty:
        return key
    parts = key.split("/")
    if not key or "\\" in key or any(p in ("", ".", "..") for p in parts) or parts[-1].endswith(TMP_SUFFIX):
        raise TbnError(f"invalid storage key {key!r}: use a relative path like 'run/metrics.json'")
    return key


class Storage(ABC):
    """A root location: a local directory or s3://bucket/prefix."""

    uri: str
    is_local: bool

    @staticmethod
    def open(uri: str | Path) -> Storage:
        """A local path (created lazily on first write), ``file://`` path, or ``s3://bucket/prefix``."""
        text = str(uri)
        if text.startswith("s3://"):
            parsed = urlparse(text)
            if not parsed.netloc:
                raise TbnError(f"storage URI {text!r} has no bucket: use s3://bucket/prefix")
            prefix = "/".join(p for p in parsed.path.split("/") if p)
            if prefix:
                check_key(prefix)
            from tbn_ray.store.storage_s3 import S3Storage

            return S3Storage(parsed.netloc, prefix)
        if text.startswith("file://"):
            text = urlparse(text).path
        elif "://" in text:
            raise TbnError(f"unsupported storage URI {text!r}: use a local path or s3://bucket/prefix")
        if not text:
            raise TbnError("empty storage path: use a local directory or s3://bucket/prefix")
        from tbn_ray.store.storage_local import LocalStorage

        return LocalStorage(Path(text).expanduser().resolve())

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # Ray ships Storage to workers: send the URI, the worker builds its own client.
        return Storage.open, (self.uri,)

    @abstractmethod
    def child(self, *parts: str) -> Storage:
        """A sub-location, e.g. ``root.child("runs", name)``."""

    @abstractmethod
    def object_uri(self, key: str) -> str:
        """The full URI of ``key`` (local: an absolute path), for messages and manifests."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> str:
        """Write a whole object atomically; returns its URI."""

    def create_bytes(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if no object is there (True), else leave it (False). The local and S3
        storages do it in one step (a hard link; S3's ``If-None-Match: *``); this fallback, for other
        storages, checks first and can lose a race."""
        if self.exists(key):
            return False
        self.write_bytes(key, data)
        return True

    @abstractmethod
    def writer(self, key: str) -> AbstractContextManager[IO[bytes]]:
        """Context manager yielding a binary file; the object appears only if the block succeeds.

        For producers that stream (``torch.save``, ``pyarrow.parquet.write_table``): an
        exception inside the block leaves no object behind (an existing one is kept).
        """

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The object's bytes; ``TbnError("not found: <uri>")`` if missing."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object (not a folder) exists at ``key``."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys (relative to the root) starting with ``prefix``, sorted, recursive. Locally, the
        stale temporary files of writes that died are removed from the folders it walks."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; deleting a missing object is not an error (re-runs stay idempotent)."""

    @abstractmethod
    def upload_file(self, key: str, path: str | Path) -> str:
        """Copy a local file (e.g. a big checkpoint) into the store as a whole object; returns its URI."""

    @abstractmethod
    def download_file(self, key: str, path: str | Path) -> Path:
        """Copy an object to a local file, replacing it atomically; returns the path."""

    @abstractmethod
    def local_path(self, key: str = "") -> Path:
        """The filesystem path of ``key``; local storage only (libraries that insist on a path)."""

    @abstractmethod
    def check(self, *, write: bool = True) -> None:
        """Fail fast, with one clear line, if the root cannot be read (or written)."""

    @abstractmethod
    def ray_storage(self) -> tuple[str, pyarrow.fs.FileSystem | None]:
        """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig``."""

    def write_text(self, key: str, text: str) -> str:
        return self.write_bytes(key, text.encode("utf-8"))

    def read_text(self, key: str) -> str:
        data = self.read_bytes(key)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise TbnError(f"not UTF-8 text: {self.object_uri(key)}") from None

    def write_json(self, key: str, obj: Any) -> str:
        """Write JSON with sorted keys and indentation, so outputs diff cleanly."""
        return self.write_text(key, json.dumps(obj, sort_keys=True, indent=2) + "\n")

    def read_json(self, key: str) -> Any:
        text = self.read_text(key)
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise TbnError(f"not valid JSON: {self.object_uri(key)} ({e.msg} at line {e.lineno})") from None
