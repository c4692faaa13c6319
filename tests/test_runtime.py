"""Joining a Ray cluster by address: an address where no cluster answers is one clean line, soon.

Real sockets and the real CLI in a subprocess; no Ray instance is started (the refusal comes first).
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tbn_ray.store.storage import Storage

from .conftest import free_port
from .helpers import HANG_S, tiny_run

REPO = Path(__file__).resolve().parents[1]
TBN_RAY = [sys.executable, "-c", "from tbn_ray.cli import main; main()"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = Storage.open(tmp_path_factory.mktemp("runs"))
    return tiny_run(root).storage.uri


def _serve(handle) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A loopback listener whose accepted connections ``handle`` takes; yields its address."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            handle(conn, held)

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()
        for conn in held:
            conn.close()


@pytest.fixture
def address(request: pytest.FixtureRequest) -> Iterator[str]:
    """closed: nothing listens; silent: a process accepts and never answers (a hung server);
    http: a web server, as on the dashboard's port given instead of the GCS's."""
    if request.param == "closed":
        yield f"127.0.0.1:{free_port()}"
    elif request.param == "silent":
        yield from _serve(lambda conn, held: held.append(conn))
    else:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()


@pytest.mark.parametrize("address", ["closed", "silent", "http"], indirect=True)
def test_an_address_where_no_cluster_answers_is_one_clean_line_within_seconds(
    run_dir: str, address: str, tmp_path: Path
) -> None:
    """Ray's own client would retry for minutes and log every attempt to stderr from C++; the user
    gets one line that names the address, a reason in whole words, and what to try."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_USE_TLS")} | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            *TBN_RAY,
            "certify",
            run_dir,
            "--sigma",
            "0.25",
            "--max-images",
            "2",
            "--output",
            str(tmp_path / "out"),
            "--address",
            address,
        ],
        capture_output=True,
        text=True,
        timeout=HANG_S,
        cwd=REPO,
        env=env,
    )
    lines = out.stderr.splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]
    (line,) = lines
    assert line.startswith(f"tbn-ray: error: no Ray cluster reachable at {address} ("), line
    assert line.endswith("or leave out --address for a local instance"), line
    assert "ray start --head" in line and "RAY_ADDRES)" not in line
    assert "dashboard" not in out.stdout  # refused before any Ray instance started


@pytest.mark.parametrize(("given", "waited"), [(None, "240"), ("7", "7")])
def test_a_new_dashboard_is_given_minutes_unless_the_user_says_otherwise(given: str | None, waited: str) -> None:
    """Ray's 60 s is too short on a busy machine; the user's own RAY_DASHBOARD_STARTUP_TIMEOUT_S wins."""
    pytest.importorskip("ray")
    env = {k: v for k, v in os.environ.items() if k != "RAY_DASHBOARD_STARTUP_TIMEOUT_S"}
    if given is not None:
        env["RAY_DASHBOARD_STARTUP_TIMEOUT_S"] = given
    code = (
        "import ray._private.services as services\n"
        "from tbn_ray.distributed import runtime\n"
        "runtime._wait_longer_for_the_dashboard()\n"
        "print(services.ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=HANG_S, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [waited]
