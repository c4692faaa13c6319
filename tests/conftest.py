"""Shared fixtures: a real S3 server (moto over HTTP on loopback) for the whole session.

Ray worker processes cannot see an in-process ``@mock_aws``; they inherit the
environment, so the server's endpoint and test credentials go into ``os.environ``.

The suite is spread over xdist's two workers test by test (``--dist load``): each worker that runs
a Ray test starts its own session instance (``ray_local``), and a module fixture that costs minutes
shares its result across the workers itself (``test_gpu_session.rehearsal``). ``xdist_group`` is
not used: with pytest >= 9 the xdist versions here ignore the marker.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator

import pytest

from .helpers import HANG_S

# Ray >= 2.59 turns on token auth for ray.init() clusters; tests need it off before the first init.
os.environ["RAY_AUTH_MODE"] = "disabled"
# Ray starts its workers at niceness 15. Beside other busy processes they then get a few percent of a
# core, and a Ray test waits for minutes on scheduling priority, not on the code it checks: the
# tests' Ray instances (and those of the commands they start) run their workers at the priority
# of the test itself.
os.environ.setdefault("RAY_worker_niceness", "0")
# Ray waits 60 s for a dashboard it starts (`ray start --head`, ``Cluster``); a busy machine may need
# longer, and the tests' one hang guard is HANG_S.
os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", str(int(HANG_S)))

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Settings from the developer's own AWS setup that would override or confuse the test server.
_S3_ENV_CLEARED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3")


class HeldRequest:
    """The first request whose path holds ``key_part``, held by the S3 server until ``release``:
    a test waits for ``held`` (an upload has begun) and acts while it cannot complete, so the
    outcome depends on events, not on how fast the machine is."""

    def __init__(self, key_part: str) -> None:
        self.key_part = key_part
        self.held, self.release = threading.Event(), threading.Event()
        self.ended = False

    def before(self, path: str) -> None:
        if self.key_part in path and not self.held.is_set():
            self.held.set()
            self.release.wait(timeout=HANG_S)

    def end(self) -> None:
        """Let everything through, and wake whoever waits for ``held``."""
        self.ended = True
        self.release.set()
        self.held.set()


class MotoS3:
    """moto's S3 server (its WSGI application, served over HTTP by werkzeug, as moto's
    ``ThreadedMotoServer`` does) on a fixed loopback port, which can be stopped and started again,
    and can hold one request (``hold``).

    moto keeps its buckets in a process-global backend, so a server restarted on the
    same port still serves what was written before it stopped (like a real S3 outage).
    """

    def __init__(self) -> None:
        self.hold: HeldRequest | None = None
        self._server, self._thread = self._make(0)
        self.port = int(self._server.server_port)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.running = True

    def _make(self, port: int):  # type: ignore[no-untyped-def]
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import WSGIRequestHandler, make_server

        app = DomainDispatcherApplication(create_backend_app)

        def wsgi(environ, start_response):  # type: ignore[no-untyped-def]
            hold = self.hold
            if hold is not None:
                hold.before(environ.get("PATH_INFO", ""))
            return app(environ, start_response)

        class Quiet(WSGIRequestHandler):
            def log_request(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
                pass

        server = make_server("127.0.0.1", port, wsgi, threaded=True, request_handler=Quiet)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        return server, thread

    def stop(self) -> None:
        if self.running:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self.running = False

    def start(self) -> None:
        if not self.running:
            self._server, self._thread = self._make(self.port)
            self.running = True


@pytest.fixture(scope="session")
def _moto_s3() -> Iterator[MotoS3]:
    pytest.importorskip("moto.server", reason='moto server missing: pip install "moto[s3]" flask flask-cors')
    server = MotoS3()
    with pytest.MonkeyPatch.context() as mp:
        for name in _S3_ENV_CLEARED:
            mp.delenv(name, raising=False)
        for name, value in {**_S3_ENV, "AWS_ENDPOINT_URL": server.endpoint}.items():
            mp.setenv(name, value)
        yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(_moto_s3: MotoS3) -> str:
    """The endpoint URL of a session-wide S3 server; AWS_* variables point at it."""
    return _moto_s3.endpoint


@pytest.fixture
def restartable_s3(_moto_s3: MotoS3) -> Iterator[MotoS3]:
    """The session's S3 server with ``.stop()``/``.start()`` (same port, data kept); running again after the test."""
    yield _moto_s3
    _moto_s3.start()


@pytest.fixture
def s3_hold(_moto_s3: MotoS3) -> Iterator[Callable[[str], HeldRequest]]:
    """``s3_hold(key_part)`` makes the session's S3 server hold the first request for such a key;
    everything passes again after the test."""

    def arm(key_part: str) -> HeldRequest:
        _moto_s3.hold = HeldRequest(key_part)
        return _moto_s3.hold

    yield arm
    if _moto_s3.hold is not None:
        _moto_s3.hold.end()
    _moto_s3.hold = None


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, uniquely named bucket on the session server, as ``s3://<bucket>``."""
    import boto3

    name = f"tbn-test-{uuid.uuid4().hex[:16]}"
    boto3.session.Session().client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


def free_port() -> int:
    """A TCP port free on loopback now (for servers that must not collide with other sessions)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: The name the test session's Ray job shows in the dashboard.
SESSION_JOB_NAME = "tbn-ray tests"


@pytest.fixture(scope="session")
def ray_local(s3_server: str):  # type: ignore[no-untyped-def]
    """One local Ray instance for the whole session, started once, with the dashboard.

    4 logical CPUs (on 2 cores) leave room for 2 Train workers plus actors. Depends on the
    S3 server so that AWS_* point at it before Ray starts: the workers inherit them.
    """
    pytest.importorskip("ray.train.torch", reason='Ray missing: pip install "ray[default,train]==2.60.0"')
    from tbn_ray.distributed.runtime import connect, disconnect

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)  # a local instance of our own, never a developer's cluster
        cluster = connect(num_cpus=4, dashboard_port=free_port(), job_name=SESSION_JOB_NAME)
        yield cluster
    disconnect(cluster)
