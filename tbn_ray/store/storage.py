"""One storage layer for every command: a local directory or ``s3://bucket/prefix``.

Ray Train's ``storage_path`` points at the same root as the project's own files
(configs, metrics, TBN statistics, certified shards, reports), so a run's outputs live in
one place whether it ran on a laptop or a cluster. S3 settings come only from the
standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), so tests against a local S3 server
and production run the same code, and Ray workers inherit the same settings.

Every write is whole-object: a reader (or a re-run after a crash) sees the old object, the
new one, or none, never a partial one. Locally that is a temporary file in the target
directory renamed over the target with ``os.replace``; on S3 a single PUT (or a multipart
upload, which also becomes visible only when complete). This is what lets sharded work
skip a shard whose output already exists.

This module must not import ray: science-side code uses it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from functools import cached_property
from pathlib import Path
from tempfile import SpooledTemporaryFile
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlparse

from tbn_ray.errors import TbnError

if TYPE_CHECKING:
    import pyarrow.fs

#: Default root when neither a flag nor ``TBN_STORAGE`` says otherwise.
DEFAULT_STORAGE = "./tbn-results"

#: Suffix of in-flight local temporary files; never listed, never a valid key.
_TMP_SUFFIX = ".tbn-tmp"

# An unreachable endpoint must fail in seconds: short connect timeout, few attempts.
_CONNECT_TIMEOUT_S = 2
_READ_TIMEOUT_S = 60
_MAX_ATTEMPTS = 3
# S3 writes spill from memory to a temporary file above this size.
_SPOOL_BYTES = 64 * 2**20
# Many small objects (shards, items) are read this many at a time, to hide S3 latency.
_READ_THREADS = 16
# Error codes S3 answers a HEAD of something absent with (no body, so no "NoSuchBucket").
_MISSING = ("404", "NoSuchKey", "NotFound")


def map_concurrently(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``[fn(x) for x in items]`` on a thread pool: for reading many small objects, where S3
    latency, not bandwidth, is the cost."""
    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        return list(pool.map(fn, items))


def default_storage_uri() -> str:
    """The storage root: ``$TBN_STORAGE`` if set, else ``./tbn-results``."""
    return os.environ.get("TBN_STORAGE") or DEFAULT_STORAGE


def _check_key(key: str, *, allow_empty: bool = False) -> str:
    """Keys are relative '/'-separated paths; refuse anything that could escape the root."""
    if key == "" and allow_empty:
        return key
    parts = key.split("/")
    if (
        not key
        or "\\" in key
        or any(p in ("", ".", "..") for p in parts)
        or parts[-1].endswith(_TMP_SUFFIX)
    ):
        raise TbnError(f"invalid storage key {key!r}: use a relative path like 'run/metrics.json'")
    return key


@contextmanager
def _os_errors(what: str) -> Iterator[None]:
    """Local-disk failures (permissions, a full disk, a directory in the way) are user errors."""
    try:
        yield
    except OSError as e:
        raise TbnError(f"{what}: {e.strerror or e}") from None


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
                _check_key(prefix)
            return _S3Storage(parsed.netloc, prefix)
        if text.startswith("file://"):
            text = urlparse(text).path
        elif "://" in text:
            raise TbnError(f"unsupported storage URI {text!r}: use a local path or s3://bucket/prefix")
        if not text:
            raise TbnError("empty storage path: use a local directory or s3://bucket/prefix")
        return _LocalStorage(Path(text).expanduser().resolve())

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
        """Keys (relative to the root) starting with ``prefix``, sorted, recursive."""

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


class _LocalStorage(Storage):
    is_local = True

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = str(root)

    def child(self, *parts: str) -> Storage:
        return _LocalStorage(self.root.joinpath(*(_check_key(p) for p in parts)))

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def object_uri(self, key: str) -> str:
        return str(self._path(key))

    def _mkdir(self, directory: Path) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise TbnError(f"cannot create directory {directory}: a file is in the way") from None
        except NotADirectoryError:
            raise TbnError(f"cannot create directory {directory}: a parent is a file, not a directory") from None
        except OSError as e:
            raise TbnError(f"cannot create directory {directory}: {e.strerror or e}") from None

    @contextmanager
    def writer(self, key: str) -> Iterator[IO[bytes]]:
        target = self._path(key)
        self._mkdir(target.parent)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}")
        failed = f"cannot write {target}"
        with _os_errors(failed):
            # O_EXCL with the default mode keeps the user's umask (mkstemp would force 0600).
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                with _os_errors(failed):
                    f.flush()
                    os.fsync(f.fileno())
            with _os_errors(failed):
                os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def write_bytes(self, key: str, data: bytes) -> str:
        with self.writer(key) as f, _os_errors(f"cannot write {self.object_uri(key)}"):
            f.write(data)
        return self.object_uri(key)

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise TbnError(f"not found: {path}") from None
        except IsADirectoryError:
            raise TbnError(f"not found: {path} (a directory, not a file)") from None
        except OSError as e:
            raise TbnError(f"cannot read {path}: {e.strerror or e}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        _check_key(prefix.rstrip("/"), allow_empty=True)
        # Walk only the folder the prefix is certainly inside, then filter like S3 does.
        base = self.root / prefix.rpartition("/")[0]
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _, filenames in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                key = name if rel == "." else f"{rel}/{name}"
                if not name.endswith(_TMP_SUFFIX) and key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        with _os_errors(f"cannot delete {path}"):
            path.unlink(missing_ok=True)

    def upload_file(self, key: str, path: str | Path) -> str:
        if not Path(path).is_file():
            raise TbnError(f"not found: {path}")
        with (
            self.writer(key) as f,
            _os_errors(f"cannot copy {path} to {self.object_uri(key)}"),
            open(path, "rb") as src,
        ):
            shutil.copyfileobj(src, f, 2**20)
        return self.object_uri(key)

    def download_file(self, key: str, path: str | Path) -> Path:
        source = self._path(key)
        if not source.is_file():
            raise TbnError(f"not found: {source}")
        dest = Path(path)
        with (
            _LocalStorage(dest.parent.resolve()).writer(dest.name) as f,
            _os_errors(f"cannot copy {source} to {dest}"),
            open(source, "rb") as src,
        ):
            shutil.copyfileobj(src, f, 2**20)
        return dest

    def local_path(self, key: str = "") -> Path:
        return self.root / _check_key(key, allow_empty=True)

    def check(self, *, write: bool = True) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise TbnError(f"storage {self.root} is a file, not a directory: pick another path")
        if not write:
            existing = next(p for p in (self.root, *self.root.parents) if p.exists())
            if not existing.is_dir():
                raise TbnError(f"storage {self.root} is unusable: {existing} is a file, not a directory")
            return
        self._mkdir(self.root)
        probe = self.root / f".tbn-check-{secrets.token_hex(6)}{_TMP_SUFFIX}"
        with _os_errors(f"storage {self.root} is not writable"):
            probe.write_bytes(b"")
            probe.unlink()

    def ray_storage(self) -> tuple[str, pyarrow.fs.FileSystem | None]:
        return str(self.root), None


class _S3Storage(Storage):
    is_local = False

    def __init__(self, bucket: str, prefix: str, client: Any = None) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        if client is not None:
            self.__dict__["client"] = client  # children share the parent's connection pool

    @cached_property
    def client(self) -> Any:
        """A boto3 client built from the standard AWS environment, with fail-fast timeouts."""
        import boto3
        from botocore.config import Config

        config = Config(
            connect_timeout=_CONNECT_TIMEOUT_S,
            read_timeout=_READ_TIMEOUT_S,
            retries={"max_attempts": _MAX_ATTEMPTS, "mode": "standard"},
        )
        return boto3.session.Session().client("s3", config=config)

    @property
    def endpoint(self) -> str:
        return str(self.client.meta.endpoint_url)

    def child(self, *parts: str) -> Storage:
        prefix = "/".join(p for p in (self.prefix, *map(_check_key, parts)) if p)
        return _S3Storage(self.bucket, prefix, self.__dict__.get("client"))

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def object_uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    @contextmanager
    def _errors(self, uri: str) -> Iterator[None]:
        """Turn boto3's exceptions into one-line TbnErrors that say what to fix."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )

        try:
            yield
        except ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            if code in _MISSING:
                raise TbnError(f"not found: {uri}") from e
            if code == "NoSuchBucket":
                raise self._no_bucket() from e
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
                raise TbnError(
                    f"no permission for {uri} at {self.endpoint} ({code}): check the AWS credentials and the bucket policy"
                ) from e
            message = " ".join(str(err.get("Message", e)).split())
            raise TbnError(f"S3 request for {uri} failed at {self.endpoint}: {code}: {message}") from e
        except (NoCredentialsError, PartialCredentialsError) as e:
            raise TbnError(
                "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS profile or instance role)"
            ) from e
        except (ConnectionError, ReadTimeoutError) as e:
            raise TbnError(
                f"cannot reach the S3 endpoint {self.endpoint} ({type(e).__name__}): check AWS_ENDPOINT_URL and the network"
            ) from e
        except (BotoCoreError, S3UploadFailedError) as e:
            message = " ".join(str(e).split())
            raise TbnError(f"S3 request for {uri} failed at {self.endpoint}: {message}") from e

    def _head_bucket(self) -> None:
        """Raise the one-line "bucket does not exist" error if it does not (inside ``_errors``)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in (*_MISSING, "NoSuchBucket"):
                raise self._no_bucket() from e
            raise

    def _no_bucket(self) -> TbnError:
        return TbnError(f"bucket '{self.bucket}' does not exist at {self.endpoint}: create it or fix the storage URI")

    def write_bytes(self, key: str, data: bytes) -> str:
        uri = self.object_uri(key)
        with self._errors(uri):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        return uri

    @contextmanager
    def writer(self, key: str) -> Iterator[IO[bytes]]:
        uri = self.object_uri(key)
        with SpooledTemporaryFile(max_size=_SPOOL_BYTES) as f:
            yield f  # type: ignore[misc]
            f.seek(0)
            with self._errors(uri):
                self.client.upload_fileobj(f, self.bucket, self._key(key))

    def read_bytes(self, key: str) -> bytes:
        uri = self.object_uri(key)
        with self._errors(uri):
            # botocore checks the length, and the object's checksum when S3 stored one.
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def exists(self, key: str) -> bool:
        """A HEAD answers 404 alike for a missing key and a missing bucket: the bucket is asked
        about then, so that "no such object" never hides "no such bucket"."""
        from botocore.exceptions import ClientError

        uri = self.object_uri(key)
        with self._errors(uri):
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in _MISSING:
                    self._head_bucket()
                    return False
                raise
        return True

    def list(self, prefix: str = "") -> list[str]:
        _check_key(prefix.rstrip("/"), allow_empty=True)
        root = f"{self.prefix}/" if self.prefix else ""
        keys = []
        with self._errors(f"{self.uri}/{prefix}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=root + prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(root) :]
                    if key and not key.endswith("/"):  # skip console-made "folder" markers
                        keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        with self._errors(self.object_uri(key)):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def upload_file(self, key: str, path: str | Path) -> str:
        uri = self.object_uri(key)
        if not Path(path).is_file():
            raise TbnError(f"not found: {path}")
        with self._errors(uri):
            # Multipart above 8 MiB; the object becomes visible only on completion.
            self.client.upload_file(str(path), self.bucket, self._key(key))
        return uri

    def download_file(self, key: str, path: str | Path) -> Path:
        dest = Path(path)
        with _LocalStorage(dest.parent.resolve()).writer(dest.name) as f, self._errors(self.object_uri(key)):
            self.client.download_fileobj(self.bucket, self._key(key), f)
        return dest

    def local_path(self, key: str = "") -> Path:
        raise TbnError(f"storage {self.uri} is on S3, not a local directory: this step needs local storage")

    def check(self, *, write: bool = True) -> None:
        with self._errors(self.uri):
            self._head_bucket()
            if write:
                probe = self._key(f".tbn-check-{secrets.token_hex(6)}")
                self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"")
                self.client.delete_object(Bucket=self.bucket, Key=probe)

    def ray_storage(self) -> tuple[str, pyarrow.fs.FileSystem | None]:
        # pyarrow (like boto3) reads AWS_ENDPOINT_URL and the credentials from the
        # environment, which Ray workers inherit: a plain URI is enough.
        return self.uri, None
