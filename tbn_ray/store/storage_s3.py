"""The S3 backend of ``storage.Storage``: ``s3://bucket/prefix`` through boto3.

Settings come only from the standard AWS environment (``AWS_ENDPOINT_URL``, the credentials,
``AWS_DEFAULT_REGION``), so a local test server and production run the same code. Every
boto3 failure becomes a one-line ``TbnError`` that says what to fix; an unreachable endpoint
fails in seconds.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from tempfile import SpooledTemporaryFile
from typing import IO, TYPE_CHECKING, Any

from tbn_ray.errors import TbnError
from tbn_ray.store.storage import Storage, check_key
from tbn_ray.store.storage_local import LocalStorage

if TYPE_CHECKING:
    import pyarrow.fs

# An unreachable endpoint must fail in seconds: short connect timeout, few attempts.
_CONNECT_TIMEOUT_S = 2
_READ_TIMEOUT_S = 60
_MAX_ATTEMPTS = 3
# S3 writes spill from memory to a temporary file above this size.
_SPOOL_BYTES = 64 * 2**20
# Error codes S3 answers a HEAD of something absent with (no body, so no "NoSuchBucket").
_MISSING = ("404", "NoSuchKey", "NotFound")


class S3Storage(Storage):
    """``s3://bucket/prefix``: whole-object PUTs (multipart uploads appear only when complete)."""

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
        prefix = "/".join(p for p in (self.prefix, *map(check_key, parts)) if p)
        return S3Storage(self.bucket, prefix, self.__dict__.get("client"))

    def _key(self, key: str) -> str:
        check_key(key)
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
            if code in (
                "AccessDenied",
                "403",
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "ExpiredToken",
                "InvalidToken",
            ):
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

    def create_bytes(self, key: str, data: bytes) -> bool:
        """S3's conditional write (``If-None-Match: *``): refused with 412 (or 409 for a write in
        flight) when the key exists, so of two runs creating one key at once exactly one succeeds."""
        from botocore.exceptions import ClientError

        uri = self.object_uri(key)
        with self._errors(uri):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code")
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                    return False
                raise
        return True

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
        check_key(prefix.rstrip("/"), allow_empty=True)
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
        with LocalStorage(dest.parent.resolve()).writer(dest.name) as f, self._errors(self.object_uri(key)):
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
