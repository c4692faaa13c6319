"""The storage layer on both backends: a local directory and S3 (moto over real HTTP)."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tbn_ray.errors import TbnError
from tbn_ray.store.storage import TMP_SUFFIX, Storage, default_storage_uri
from tbn_ray.store.storage_local import STALE_TMP_S


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return Storage.open(tmp_path / "root")
    return Storage.open(request.getfixturevalue("s3_bucket") + "/runs/prefix")


def _free_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _one_line_error(excinfo: pytest.ExceptionInfo[TbnError]) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    assert "Traceback" not in message
    return message


class _ProducerFailed(RuntimeError):
    pass


def test_round_trip_nested_keys(storage: Storage) -> None:
    uri = storage.write_bytes("a/b/c.bin", b"\x00\x01payload")
    assert uri == storage.object_uri("a/b/c.bin")
    assert uri.endswith("/a/b/c.bin") and uri.startswith(storage.uri)
    assert storage.read_bytes("a/b/c.bin") == b"\x00\x01payload"
    storage.write_text("a/top.txt", "héllo")
    storage.write_bytes("z.bin", b"z")
    assert storage.read_text("a/top.txt") == "héllo"
    assert storage.exists("a/b/c.bin") and not storage.exists("a/b") and not storage.exists("nope")
    assert storage.list() == ["a/b/c.bin", "a/top.txt", "z.bin"]
    assert storage.list("a/") == ["a/b/c.bin", "a/top.txt"]
    assert storage.list("a/b") == ["a/b/c.bin"]  # plain prefix match, as on S3
    assert storage.list("a/t") == ["a/top.txt"]
    assert storage.list("missing/") == []
    storage.delete("a/b/c.bin")
    storage.delete("a/b/c.bin")  # idempotent
    assert not storage.exists("a/b/c.bin")
    assert storage.list() == ["a/top.txt", "z.bin"]


def test_json_helpers(storage: Storage) -> None:
    obj = {"sigma": 0.25, "radii": [0.0, 0.5], "name": "run", "nested": {"b": 1, "a": None}}
    storage.write_json("metrics.json", obj)
    assert storage.read_json("metrics.json") == obj
    text = storage.read_text("metrics.json")
    assert text.index('"name"') < text.index('"nested"') < text.index('"radii"') < text.index('"sigma"')
    assert text.endswith("}\n") and "\n  " in text  # sorted and indented
    storage.write_bytes("bad.json", b"{not json")
    with pytest.raises(TbnError, match="not valid JSON") as excinfo:
        storage.read_json("bad.json")
    assert storage.object_uri("bad.json") in _one_line_error(excinfo)


def test_child_locations(storage: Storage) -> None:
    run = storage.child("runs", "r1")
    assert run.uri == storage.uri + "/runs/r1" and run.is_local == storage.is_local
    run.write_json("config.json", {"x": 1})
    assert storage.read_json("runs/r1/config.json") == {"x": 1}
    assert storage.child("runs/r1").list() == ["config.json"]


def test_missing_key_names_the_uri(storage: Storage) -> None:
    with pytest.raises(TbnError, match="not found") as excinfo:
        storage.read_bytes("shards/0007.json")
    assert storage.object_uri("shards/0007.json") in _one_line_error(excinfo)


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "../escape", "a/./b", "a\\b", "a/"])
def test_invalid_keys_refused(storage: Storage, key: str) -> None:
    with pytest.raises(TbnError, match="invalid storage key"):
        storage.write_bytes(key, b"x")


def test_no_partial_object_visible_during_write(storage: Storage) -> None:
    storage.write_bytes("shard.bin", b"old")
    with storage.writer("shard.bin") as f:
        f.write(b"new-part-1")
        assert storage.read_bytes("shard.bin") == b"old"
        assert storage.list() == ["shard.bin"]  # no temporary name is listed
        with storage.writer("fresh.bin") as g:
            g.write(b"half")
            assert not storage.exists("fresh.bin")
            assert storage.list() == ["shard.bin"]
        f.write(b"-part-2")
    assert storage.read_bytes("shard.bin") == b"new-part-1-part-2"
    assert storage.read_bytes("fresh.bin") == b"half"


def test_crash_mid_write_leaves_nothing(storage: Storage) -> None:
    storage.write_bytes("kept.bin", b"previous")
    for key in ("new.bin", "kept.bin"):
        with pytest.raises(_ProducerFailed), storage.writer(key) as f:
            f.write(b"x" * 1000)
            raise _ProducerFailed("the producer died mid-write")
    assert not storage.exists("new.bin")
    assert storage.read_bytes("kept.bin") == b"previous"
    assert storage.list() == ["kept.bin"]
    if storage.is_local:
        assert sorted(os.listdir(storage.local_path())) == ["kept.bin"]  # no temp file left


_KILLED_WRITER = """
import sys, time
from tbn_ray.store.storage import Storage
with Storage.open(sys.argv[1]).writer("sigma=0.25/shard.parquet") as f:
    f.write(b"half a shard")
    f.flush()
    print("writing", flush=True)
    time.sleep(120)
"""


def test_a_killed_writers_temp_file_is_removed_by_a_listing_once_stale(tmp_path: Path) -> None:
    """A process killed mid-write (SIGKILL: no cleanup of its own runs) leaves its temporary file;
    listing that folder removes it once it is older than STALE_TMP_S, never a fresh one (a live write)."""
    root = tmp_path / "root"
    with subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(root)], stdout=subprocess.PIPE, text=True
    ) as writer:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "writing"
        writer.kill()
    folder = root / "sigma=0.25"
    [dead] = folder.iterdir()
    store = Storage.open(root)
    assert store.list("sigma=0.25/") == [] and dead.exists()  # fresh: it could be a write still going on
    old = time.time() - STALE_TMP_S - 60
    os.utime(dead, (old, old))
    live = folder / f".other.parquet.0123456789ab{TMP_SUFFIX}"
    live.write_bytes(b"")
    store.write_bytes("sigma=0.25/done.parquet", b"whole")
    assert store.list("sigma=0.25/") == ["sigma=0.25/done.parquet"]
    assert not dead.exists() and live.exists()


def test_overwrite_is_atomic_for_concurrent_readers(storage: Storage) -> None:
    size = 256 * 1024
    versions = [b"a" * size, b"b" * size]
    storage.write_bytes("obj", versions[0])
    done = threading.Event()

    def write_loop() -> None:
        try:
            for i in range(12):
                storage.write_bytes("obj", versions[i % 2])
        finally:
            done.set()

    writer = threading.Thread(target=write_loop)
    writer.start()
    reads = 0
    while not done.is_set() or reads == 0:
        data = storage.read_bytes("obj")
        assert data in versions, f"partial object seen: {len(data)} bytes"
        reads += 1
    writer.join()
    assert storage.read_bytes("obj") == versions[1]
    # Measured: about 140 reads (local) and 13 (S3) interleave with the 12 writes, seeing both versions.


def test_upload_and_download_file(storage: Storage, tmp_path: Path) -> None:
    src = tmp_path / "ckpt.pt"
    payload = os.urandom(9 * 2**20)  # above boto3's 8 MiB multipart threshold
    src.write_bytes(payload)
    uri = storage.upload_file("ckpt/model.pt", src)
    assert uri == storage.object_uri("ckpt/model.pt")
    dest = tmp_path / "out" / "model.pt"
    dest.parent.mkdir()
    dest.write_bytes(b"stale")
    assert storage.download_file("ckpt/model.pt", dest) == dest
    assert dest.read_bytes() == payload
    assert os.listdir(dest.parent) == ["model.pt"]
    with pytest.raises(TbnError, match="not found") as excinfo:
        storage.download_file("ckpt/missing.pt", dest)
    _one_line_error(excinfo)
    assert dest.read_bytes() == payload and os.listdir(dest.parent) == ["model.pt"]
    with pytest.raises(TbnError, match="not found"):
        storage.upload_file("ckpt/x.pt", tmp_path / "absent.pt")


def test_pickles_as_its_uri(storage: Storage) -> None:
    """Ray ships Storage objects to workers, which build their own S3 client."""
    storage.write_bytes("k", b"v")
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.uri == storage.uri and clone is not storage
    assert clone.read_bytes("k") == b"v"


def test_check_passes_on_a_usable_root(storage: Storage) -> None:
    storage.check(write=False)
    storage.check()
    assert storage.list() == []  # the write probe was removed


def test_ray_storage_filesystem_reads_and_writes(storage: Storage) -> None:
    """What Ray Train will use: the pyarrow filesystem for (storage_path, storage_filesystem)."""
    import pyarrow.fs

    path, fs = storage.ray_storage()
    if fs is None:
        fs, path = pyarrow.fs.FileSystem.from_uri(path)
    fs.create_dir(f"{path}/exp", recursive=True)  # on S3 a "folder" marker object, which list() hides
    with fs.open_output_stream(f"{path}/exp/.validate_storage_marker") as out:
        out.write(b"from-arrow")
    assert storage.read_bytes("exp/.validate_storage_marker") == b"from-arrow"
    storage.write_bytes("exp/checkpoint_0/state.pt", b"from-storage")
    with fs.open_input_stream(f"{path}/exp/checkpoint_0/state.pt") as f:
        assert f.read() == b"from-storage"
    assert storage.list() == ["exp/.validate_storage_marker", "exp/checkpoint_0/state.pt"]


def test_open_normalises_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    local = Storage.open("rel/dir")
    assert local.is_local and local.uri == str(tmp_path.resolve() / "rel" / "dir")
    assert Storage.open(f"file://{tmp_path}").uri == str(tmp_path.resolve())
    assert not (tmp_path / "rel").exists()  # created lazily, on first write
    s3 = Storage.open("s3://bkt/a//b/")
    assert not s3.is_local and s3.uri == "s3://bkt/a/b"
    assert Storage.open("s3://bkt").child("x").uri == "s3://bkt/x"
    for bad in ("s3://", "gs://bkt/p", "s3://bkt/../p"):
        with pytest.raises(TbnError):
            Storage.open(bad)
    monkeypatch.delenv("TBN_STORAGE", raising=False)
    assert default_storage_uri() == "./tbn-results"
    monkeypatch.setenv("TBN_STORAGE", "s3://bkt/results")
    assert default_storage_uri() == "s3://bkt/results"


def test_local_check_errors(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for root in (a_file, a_file / "below"):
        for write in (True, False):
            with pytest.raises(TbnError, match="file") as excinfo:
                Storage.open(root).check(write=write)
            assert str(a_file) in _one_line_error(excinfo)
    with pytest.raises(TbnError, match="a file is in the way"):
        Storage.open(a_file).write_bytes("k", b"x")
    with pytest.raises(TbnError, match="a parent is a file"):
        Storage.open(a_file / "below").write_bytes("k", b"x")
    fresh = tmp_path / "new" / "root"
    Storage.open(fresh).check()
    assert fresh.is_dir() and os.listdir(fresh) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_local_check_read_only(tmp_path: Path) -> None:
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(TbnError, match="not writable|permission denied"):
            Storage.open(tmp_path).check()
    finally:
        tmp_path.chmod(0o755)


def test_local_path_only_for_local(tmp_path: Path, s3_bucket: str) -> None:
    local = Storage.open(tmp_path)
    assert local.local_path("a/b.pt") == tmp_path.resolve() / "a" / "b.pt"
    assert local.local_path() == tmp_path.resolve()
    with pytest.raises(TbnError, match="not a local directory"):
        Storage.open(s3_bucket).local_path("a")


def test_s3_missing_bucket_fails_fast(s3_server: str) -> None:
    store = Storage.open("s3://no-such-bucket-tbn/prefix")
    t0 = time.monotonic()
    with pytest.raises(TbnError) as excinfo:
        store.check()
    assert time.monotonic() - t0 < 10
    assert _one_line_error(excinfo) == (
        f"bucket 'no-such-bucket-tbn' does not exist at {s3_server}: create it or fix the storage URI"
    )
    with pytest.raises(TbnError, match="bucket 'no-such-bucket-tbn' does not exist"):
        store.write_bytes("k", b"x")


def test_a_run_in_a_missing_bucket_names_the_bucket(s3_server: str, s3_bucket: str) -> None:
    """A HEAD answers 404 for a missing key and a missing bucket alike: the bucket is what is named."""
    from typer.testing import CliRunner

    from tbn_ray.cli import app
    from tbn_ray.store.runs import Run

    missing = "s3://no-such-bucket-tbn/runs/tiny"
    expected = f"bucket 'no-such-bucket-tbn' does not exist at {s3_server}: create it or fix the storage URI"
    with pytest.raises(TbnError) as excinfo:
        Run.open(missing).load_checkpoint()
    assert _one_line_error(excinfo) == expected
    with pytest.raises(TbnError, match="bucket 'no-such-bucket-tbn' does not exist"):
        Run.open(missing + "/checkpoint.pt").load_bn_sets()
    cli = CliRunner().invoke(app, ["calibrate", missing, "--sigma", "0.25"])
    assert cli.exit_code == 1 and str(cli.exception) == expected
    # a missing key in an existing bucket is still just missing
    assert Storage.open(s3_bucket + "/runs/tiny").exists("checkpoint.pt") is False
    with pytest.raises(TbnError, match="no checkpoint at s3://.*/runs/tiny/checkpoint.pt: train first"):
        Run.open(s3_bucket + "/runs/tiny").load_checkpoint()


def test_s3_unreachable_endpoint_fails_fast(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    store = Storage.open(s3_bucket)
    for op in (store.check, lambda: store.read_bytes("k"), lambda: store.write_bytes("k", b"x"), store.list):
        t0 = time.monotonic()
        with pytest.raises(TbnError, match="cannot reach the S3 endpoint") as excinfo:
            op()
        assert time.monotonic() - t0 < 15
        assert endpoint in _one_line_error(excinfo)


def test_s3_without_credentials(s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(TbnError, match="no AWS credentials found") as excinfo:
        Storage.open(s3_bucket).check()
    _one_line_error(excinfo)


def test_s3_server_outage_then_recovery(restartable_s3, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    """A stopped server gives a clear error; after it returns, the data written before is still there."""
    store = Storage.open(s3_bucket + "/p")
    store.write_json("done/0.json", {"shard": 0})
    restartable_s3.stop()
    with pytest.raises(TbnError, match="cannot reach the S3 endpoint") as excinfo:
        store.write_json("done/1.json", {"shard": 1})
    assert restartable_s3.endpoint in _one_line_error(excinfo)
    restartable_s3.start()
    store.write_json("done/1.json", {"shard": 1})
    assert store.list("done/") == ["done/0.json", "done/1.json"]
    assert store.read_json("done/0.json") == {"shard": 0}


def test_streaming_producers_write_through_writer(storage: Storage) -> None:
    """torch.save and Parquet write to a file object; writer() gives them one on both backends."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    model = torch.nn.Linear(4, 3)
    with storage.writer("ckpt/model.pt") as f:
        torch.save(model.state_dict(), f)
    state = torch.load(io.BytesIO(storage.read_bytes("ckpt/model.pt")), weights_only=True)
    assert torch.equal(state["weight"], model.weight.detach())
    table = pa.table({"idx": [0, 7], "radius": [0.5, 0.0]})
    with storage.writer("certify/shard-0000.parquet") as f:
        pq.write_table(table, f)
    assert pq.read_table(io.BytesIO(storage.read_bytes("certify/shard-0000.parquet"))).equals(table)


def test_local_key_shadowed_by_a_folder(tmp_path: Path) -> None:
    """S3 allows objects "d" and "d/x" side by side; a directory cannot: a clear error, nothing half-written."""
    store = Storage.open(tmp_path)
    store.write_bytes("d/x", b"1")
    with pytest.raises(TbnError, match="cannot write .*/d: Is a directory") as excinfo:
        store.write_bytes("d", b"2")
    _one_line_error(excinfo)
    with pytest.raises(TbnError, match="a directory, not a file"):
        store.read_bytes("d")
    assert store.list() == ["d/x"]


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_create_if_absent_lets_exactly_one_of_many_writers_win(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Eight threads create one key at once: one gets True, the object holds its bytes, the rest get False."""
    import threading

    root = str(tmp_path / "c") if backend == "local" else f"{request.getfixturevalue('s3_bucket')}/c"
    store = Storage.open(root)
    barrier = threading.Barrier(8)
    won: list[tuple[int, bool]] = []

    def writer(i: int) -> None:
        barrier.wait()
        won.append((i, store.create_bytes("claims/x.claim", f"writer {i}".encode())))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [i for i, ok in won if ok]
    assert len(won) == 8 and len(winners) == 1
    assert store.read_bytes("claims/x.claim") == f"writer {winners[0]}".encode()
    assert store.create_bytes("claims/x.claim", b"late") is False and [k for k in store.list("claims/")] == [
        "claims/x.claim"
    ]
