"""The local backend of ``storage.Storage``: a directory, written whole-object.

A write goes to a temporary file in the target's directory, is fsynced, and is renamed over
the target with ``os.replace``: a reader sees the old file, the new one or none. A process
killed mid-write (an actor stopped by the OOM killer, a lost node's shared disk) leaves its
temporary file behind; listing a folder removes those older than ``STALE_TMP_S``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING

from tbn_ray.errors import TbnError
from tbn_ray.store.storage import TMP_SUFFIX, Storage, check_key

if TYPE_CHECKING:
    import pyarrow.fs

#: A temporary file untouched this long belongs to a write that died: no live writer pauses so long.
STALE_TMP_S = 30 * 60


@contextmanager
def os_errors(what: str) -> Iterator[None]:
    """Local-disk failures (permissions, a full disk, a directory in the way) are user errors."""
    try:
        yield
    except OSError as e:
        raise TbnError(f"{what}: {e.strerror or e}") from None


class LocalStorage(Storage):
    """A local directory, created on the first write; every write a temporary file renamed into place."""

    is_local = True

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = str(root)

    def child(self, *parts: str) -> Storage:
        return LocalStorage(self.root.joinpath(*(check_key(p) for p in parts)))

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

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
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}{TMP_SUFFIX}")
        failed = f"cannot write {target}"
        with os_errors(failed):
            # O_EXCL with the default mode keeps the user's umask (mkstemp would force 0600).
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                with os_errors(failed):
                    f.flush()
                    os.fsync(f.fileno())
            with os_errors(failed):
                os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def write_bytes(self, key: str, data: bytes) -> str:
        with self.writer(key) as f, os_errors(f"cannot write {self.object_uri(key)}"):
            f.write(data)
        return self.object_uri(key)

    def create_bytes(self, key: str, data: bytes) -> bool:
        """Written whole to a temporary file, then hard-linked into place: the link fails if the
        name exists, so of two runs creating one key at once exactly one succeeds."""
        target = self._path(key)
        self._mkdir(target.parent)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}{TMP_SUFFIX}")
        try:
            with os_errors(f"cannot write {target}"):
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            try:
                os.link(tmp, target)
            except FileExistsError:
                return False
            except OSError as e:
                raise TbnError(f"cannot write {target}: {e.strerror or e}") from None
            return True
        finally:
            tmp.unlink(missing_ok=True)

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
        check_key(prefix.rstrip("/"), allow_empty=True)
        # Walk only the folder the prefix is certainly inside, then filter like S3 does.
        base = self.root / prefix.rpartition("/")[0]
        if not base.is_dir():
            return []
        keys = []
        stale_before = time.time() - STALE_TMP_S
        for dirpath, _, filenames in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                key = name if rel == "." else f"{rel}/{name}"
                if name.endswith(TMP_SUFFIX):
                    _remove_if_stale(Path(dirpath) / name, stale_before)
                elif key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        with os_errors(f"cannot delete {path}"):
            path.unlink(missing_ok=True)

    def upload_file(self, key: str, path: str | Path) -> str:
        if not Path(path).is_file():
            raise TbnError(f"not found: {path}")
        with (
            self.writer(key) as f,
            os_errors(f"cannot copy {path} to {self.object_uri(key)}"),
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
            LocalStorage(dest.parent.resolve()).writer(dest.name) as f,
            os_errors(f"cannot copy {source} to {dest}"),
            open(source, "rb") as src,
        ):
            shutil.copyfileobj(src, f, 2**20)
        return dest

    def local_path(self, key: str = "") -> Path:
        return self.root / check_key(key, allow_empty=True)

    def check(self, *, write: bool = True) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise TbnError(f"storage {self.root} is a file, not a directory: pick another path")
        if not write:
            existing = next(p for p in (self.root, *self.root.parents) if p.exists())
            if not existing.is_dir():
                raise TbnError(f"storage {self.root} is unusable: {existing} is a file, not a directory")
            return
        self._mkdir(self.root)
        probe = self.root / f".tbn-check-{secrets.token_hex(6)}{TMP_SUFFIX}"
        with os_errors(f"storage {self.root} is not writable"):
            probe.write_bytes(b"")
            probe.unlink()

    def ray_storage(self) -> tuple[str, pyarrow.fs.FileSystem | None]:
        return str(self.root), None


def _remove_if_stale(path: Path, before: float) -> None:
    """Remove a dead write's temporary file (last written before ``before``); a live one stays, and
    one that cannot be removed (a read-only folder, another process first) is left alone."""
    with contextlib.suppress(OSError):
        if path.stat().st_mtime < before:
            path.unlink()
