"""Every file the tool reads back, fed random bytes, truncations and type-confused content.

Whatever is in the file, reading it either works or ends in one ``TbnError`` line that names
the file; never another exception (a traceback). Files are real: a tiny model's checkpoint and
TBN statistics, shards certified from real CIFAR-10 images, the shipped sweep config. Example
counts are small: each property runs a few dozen examples.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

hypothesis = pytest.importorskip("hypothesis", reason="pip install hypothesis (the test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tbn_ray.config import CertifyConfig, DataConfig, load_config, load_sweep_config  # noqa: E402
from tbn_ray.errors import TbnError  # noqa: E402
from tbn_ray.jobs.certify import aggregate, certify_run  # noqa: E402
from tbn_ray.reports.certify import load_summaries, write_report  # noqa: E402
from tbn_ray.science.corruptions import load_released  # noqa: E402
from tbn_ray.science.tbn import bn_key  # noqa: E402
from tbn_ray.store.runs import Run  # noqa: E402
from tbn_ray.store.storage import Storage  # noqa: E402

from .helpers import SHARED_DATA, tiny_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FUZZ = settings(
    max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# --- what a damaged file can hold -----------------------------------------------------------

#: Values of the wrong type for any field: scalars, strings, tensors, and small nests of them.
confused_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats()
    | st.text(max_size=6)
    | st.integers(0, 3).map(lambda n: torch.full((n,), float("nan"))),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
#: The same for JSON and YAML (no tensors, finite numbers).
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def damaged(valid: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes (some not UTF-8), a truncation of ``valid``, or ``valid`` with a few bytes overwritten."""
    truncated = st.integers(0, max(len(valid) - 1, 0)).map(lambda k: valid[:k])
    overwritten = st.lists(st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)), min_size=1, max_size=8).map(
        lambda edits: _overwrite(valid, edits)
    )
    not_utf8 = st.binary(max_size=64).map(lambda b: b"\xff" + b)
    return st.binary(max_size=512) | st.just(b"q\x00") | not_utf8 | truncated | overwritten


def _overwrite(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos] = value
    return bytes(out)


def confused(valid: dict[str, Any], values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """``valid`` with one field (top level, or one level down) dropped or given a wrong-typed value."""
    paths = [(k,) for k in valid] + [(k, sub) for k, v in valid.items() if isinstance(v, dict) for sub in list(v)[:6]]

    def mutate(path: tuple[str, ...], value: Any, drop: bool) -> dict[str, Any]:
        out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in valid.items()}
        parent = out if len(path) == 1 else out[path[0]]
        if drop:
            parent.pop(path[-1])
        else:
            parent[path[-1]] = value
        return out

    return st.builds(mutate, st.sampled_from(paths), values, st.booleans())


def torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def read_or_one_line_error(read: Callable[[], Any], names: str) -> None:
    """``read()`` works, or fails with one TbnError line that names the file."""
    try:
        read()
    except TbnError as e:
        message = str(e)
        assert message and "\n" not in message, message
        assert names in message, message
        assert "weights_only" not in message and "Traceback" not in message, message


# --- real files to damage -------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return tiny_run(Storage.open(tmp_path_factory.mktemp("fuzz")))


@pytest.fixture(scope="module")
def certified(run: Run) -> Storage:
    """A finished certification (two shards of real test images) under <output>/<run-id>."""
    cfg = CertifyConfig(sigmas=(0.25,), n0=10, n=50, batch_size=50, max_images=4)
    (output,) = certify_run(
        run, cfg.model_copy(update={"shards": 2}), run.storage.child("certify"), device="cpu", progress=False
    )
    return Storage.open(output.location.rpartition("/")[0])


class _Backup:
    """Restores a file's bytes after each example."""

    def __init__(self, path: Path) -> None:
        self.path, self.data = path, path.read_bytes()

    def put(self, data: bytes) -> None:
        self.path.write_bytes(data)

    def restore(self) -> None:
        self.path.write_bytes(self.data)


# --- checkpoint.pt and bn_stats.pt ----------------------------------------------------------


def test_checkpoint_fed_junk(run: Run) -> None:
    path = run.storage.local_path("checkpoint.pt")
    file = _Backup(path)
    valid = torch.load(io.BytesIO(file.data), weights_only=True)

    @FUZZ
    @given(st.one_of(damaged(file.data), confused(valid, confused_values).map(torch_bytes)))
    def check(data: bytes) -> None:
        file.put(data)
        read_or_one_line_error(lambda: Run.open(run.uri).load_model(), str(path))

    try:
        check()
        file.put(b"q\x00")  # two bytes: torch's unpickler ends in IndexError
        with pytest.raises(TbnError, match=r"is not a readable tbn-ray checkpoint .*: train again") as excinfo:
            Run.open(run.uri).load_model()
        assert "weights_only" not in str(excinfo.value) and str(path) in str(excinfo.value)
    finally:
        file.restore()


def test_bn_stats_fed_junk(run: Run) -> None:
    path = run.storage.local_path("bn_stats.pt")
    file = _Backup(path)
    valid = torch.load(io.BytesIO(file.data), weights_only=True)
    entry = valid["sets"][bn_key(0.25)]
    layer = next(iter(entry["stats"]))

    def confused_set(value: Any) -> bytes:
        stats = {**entry["stats"], layer: {"running_mean": value, "running_var": entry["stats"][layer]["running_var"]}}
        return torch_bytes({**valid, "sets": {bn_key(0.25): {"stats": stats, "meta": {}}}})

    @FUZZ
    @given(
        st.one_of(
            damaged(file.data), confused(valid, confused_values).map(torch_bytes), confused_values.map(confused_set)
        )
    )
    def check(data: bytes) -> None:
        file.put(data)
        read_or_one_line_error(lambda: Run.open(run.uri).load_bn_sets(), str(path))

    try:
        check()
        file.put(np.random.default_rng(0).bytes(300))
        with pytest.raises(
            TbnError, match="is not a readable tbn-ray BN statistics file .*: delete it and run tbn-ray calibrate"
        ):
            Run.open(run.uri).load_bn_sets()
    finally:
        file.restore()


# --- certification outputs: shards and summaries --------------------------------------------


def test_shard_fed_junk(certified: Storage) -> None:
    key = next(k for k in certified.list() if "/shard-00001-" in k)
    file = _Backup(certified.local_path(key))
    table = pq.read_table(io.BytesIO(file.data))
    meta = json.loads(table.schema.metadata[b"tbn_ray.shard"])

    def with_meta(m: Any) -> bytes:
        buf = io.BytesIO()
        pq.write_table(table.replace_schema_metadata({b"tbn_ray.shard": json.dumps(m)}), buf)
        return buf.getvalue()

    def without_column(name: str) -> bytes:
        buf = io.BytesIO()
        pq.write_table(table.drop_columns([name]).replace_schema_metadata(table.schema.metadata), buf)
        return buf.getvalue()

    @FUZZ
    @given(
        st.one_of(
            damaged(file.data),
            confused(meta, json_values).map(with_meta),
            json_values.map(with_meta),
            st.sampled_from(table.column_names).map(without_column),
        )
    )
    def check(data: bytes) -> None:
        file.put(data)
        read_or_one_line_error(lambda: aggregate(certified), certified.uri)

    try:
        check()
    finally:
        file.restore()


def test_summary_fed_junk(certified: Storage) -> None:
    path = certified.local_path("sigma=0.25/summary.json")
    file = _Backup(path)
    valid = json.loads(file.data)

    def report() -> None:
        write_report(load_summaries(certified), certified.child("fuzz-report"), title="fuzz")

    @settings(FUZZ, max_examples=15)
    @given(st.one_of(damaged(file.data), confused(valid, json_values).map(lambda s: json.dumps(s).encode())))
    def check(data: bytes) -> None:
        file.put(data)
        read_or_one_line_error(report, str(path))

    try:
        check()
    finally:
        file.restore()


# --- configs and sweep state ------------------------------------------------------------------


def test_config_yaml_fed_junk(tmp_path: Path) -> None:
    shipped = (REPO / "configs" / "quickstart.yaml").read_bytes()
    valid = yaml.safe_load(shipped)
    path = tmp_path / "experiment.yaml"

    @FUZZ
    @given(st.one_of(damaged(shipped), confused(valid, json_values).map(lambda c: yaml.safe_dump(c).encode())))
    def check(data: bytes) -> None:
        path.write_bytes(data)
        read_or_one_line_error(lambda: load_config(path), str(path))

    check()


def test_sweep_state_fed_junk(tmp_path: Path) -> None:
    """The stored sweep.yaml a re-run compares with, and a run's metrics.csv the sweep counts epochs from."""
    from tbn_ray.distributed.sweep import prepare
    from tbn_ray.jobs.sweep_pairs import training_record as _training

    cfg = load_sweep_config(REPO / "configs" / "sweep_tiny.yaml")
    root = Storage.open(tmp_path / "sweeps")
    stored = root.child(cfg.name)
    stored.write_text("sweep.yaml", yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True)))
    valid_yaml = stored.read_bytes("sweep.yaml")
    train_root = stored.child("train")
    run = train_root.child("eps=0.5-trial")
    run.write_bytes("checkpoint.pt", b"")  # found by name; not read
    valid_csv = b"epoch,seconds,eval_seconds,train_loss\n1,2.5,0.5,2.1\n2,2.4,0.5,1.9\n"

    @FUZZ
    @given(
        st.one_of(
            damaged(valid_yaml),
            confused(yaml.safe_load(valid_yaml), json_values).map(lambda c: yaml.safe_dump(c).encode()),
        )
    )
    def check_yaml(data: bytes) -> None:
        stored.write_bytes("sweep.yaml", data)
        # the file, or (for a readable config that differs) the sweep it belongs to
        read_or_one_line_error(lambda: prepare(cfg, root, resume=True, say=lambda _: None), f"{root.uri}")

    @FUZZ
    @given(damaged(valid_csv))
    def check_csv(data: bytes) -> None:
        run.write_bytes("metrics.csv", data)
        read_or_one_line_error(lambda: _training(train_root, 0.5), run.object_uri("metrics.csv"))

    check_yaml()
    check_csv()


# --- CIFAR-10-C arrays ------------------------------------------------------------------------


def test_released_cifar10c_fed_junk(tmp_path: Path) -> None:
    """The released files a user points at; valid but small arrays stand in for the 150 MB ones."""
    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros(50_000, dtype=np.int64))
    images = tmp_path / "fog.npy"
    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 32, 32, 3), dtype=np.uint8))
    valid = buf.getvalue()

    def npy(value: Any) -> bytes:
        out = io.BytesIO()
        np.save(out, np.asarray(value, dtype=object) if isinstance(value, (dict, list)) else np.asarray(value))
        return out.getvalue()

    @FUZZ
    @given(st.one_of(damaged(valid), json_values.map(npy)))
    def check(data: bytes) -> None:
        images.write_bytes(data)
        read_or_one_line_error(lambda: load_released(tmp_path, "fog"), str(tmp_path))

    check()


def test_cached_cifar10c_array_fed_junk(tmp_path: Path) -> None:
    """An unusable array in the cache is made again, whatever its bytes: never an error."""
    from tbn_ray.store.cifar10 import load_from_config
    from tbn_ray.store.cifar10c import regenerated_cifar10c

    d = load_from_config(DataConfig(source="partial", shared_dir=str(SHARED_DATA)))
    c10c = regenerated_cifar10c(
        Storage.open(tmp_path), d.test.by_index(d.test.index[:2]), seed=0, data_description=d.description
    )
    good = c10c.load("brightness", 1)
    key = c10c.key("brightness", 1)
    valid = c10c.storage.read_bytes(key)

    @settings(FUZZ, max_examples=8)
    @given(damaged(valid))
    def check(data: bytes) -> None:
        c10c.storage.write_bytes(key, data)
        arr = c10c.load("brightness", 1)  # made again, or a readable array of the right shape (no checksum)
        assert arr.dtype == np.uint8 and arr.shape == good.shape

    check()


# --- through the command line: exit status 2, one line ---------------------------------------


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    from tbn_ray.cli import main

    monkeypatch.setattr("sys.argv", ["tbn-ray", *argv])
    with pytest.raises(SystemExit) as excinfo:
        main()
    return int(excinfo.value.code or 0), capsys.readouterr().err


def test_cli_exit_2_for_each_file_kind(
    run: Run, certified: Storage, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = Run(Storage.open(tmp_path / "broken"))
    broken.storage.write_bytes("checkpoint.pt", b"q\x00")
    bad_stats = Run(Storage.open(tmp_path / "bad-stats"))
    bad_stats.storage.write_bytes("checkpoint.pt", run.storage.read_bytes("checkpoint.pt"))
    bad_stats.storage.write_bytes("bn_stats.pt", np.random.default_rng(1).bytes(300))
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_bytes(b"\xff\xfe train: [")
    shard = next(k for k in certified.list() if "/shard-00000-" in k)
    shard_file = _Backup(certified.local_path(shard))
    released = tmp_path / "released"
    released.mkdir()
    (released / "fog.npy").write_bytes(b"\x93NUMPY\x01\x00{'descr'")
    np.save(released / "labels.npy", np.zeros(50_000, dtype=np.int64))
    certify = ["--sigma", "0.25", "--local", "--max-images", "2", "--n0", "10", "--n", "20", "--no-progress"]
    cases = [
        (["certify", broken.uri, *certify], broken.storage.object_uri("checkpoint.pt")),
        (["certify", bad_stats.uri, *certify], bad_stats.storage.object_uri("bn_stats.pt")),
        (["certify", run.uri, "--config", str(bad_yaml), *certify], str(bad_yaml)),
        (["report", certified.uri], certified.uri),
        (
            [
                "data",
                "cifar10c",
                "--released",
                str(released),
                "--corruptions",
                "fog",
                "--severities",
                "1",
                "--indices",
                "0:2",
                "--storage",
                str(tmp_path / "cache"),
                "--no-progress",
            ],
            str(released),
        ),
    ]
    try:
        shard_file.put(b"PAR1\x00\x00")
        for argv, names in cases:
            status, err = _cli(argv, capsys, monkeypatch)
            lines = [line for line in err.splitlines() if line.strip()]
            assert status == 2, (argv, err)
            assert len(lines) == 1 and lines[0].startswith("tbn-ray: error: ") and names in lines[0], (argv, err)
    finally:
        shard_file.restore()
