"""Start or join Ray: an embedded local instance (always with the dashboard) or an existing cluster.

The dashboard is not optional here: besides being where users watch a run (Jobs, Train,
Actors views), its state API is what Ray uses to clean up the placement groups of stopped
Train runs; without it a later run can wait forever.

A local instance takes the dashboard port 8265 when free (else any free port) and names its
dashboard to the tasks and actors of this process's job (``RAY_API_SERVER_ADDRESS``): Ray's
own actors otherwise find the state API by searching the machine for a Ray instance, which
fails as soon as a second one runs there. (This process itself is left alone: in its
environment the variable would also redirect ``ray job submit`` subprocesses aimed at
another cluster. State API calls from here should pass ``address=cluster.address``.)

Token authentication (Ray >= 2.59): ``RAY_AUTH_MODE`` is only ever read from the
environment, never set here. A new local instance gets Ray's default (token auth on, the
token in ``~/.ray/auth_token``); joining a cluster by explicit address sends a token only
when ``RAY_AUTH_MODE=token`` is set, so a refused connection is turned into a one-line
error that says so.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

from tbn_ray.errors import TbnError
from tbn_ray.signals import reclaim_sigterm

#: Where a local instance's dashboard listens (loopback only: it can run code).
DASHBOARD_HOST = "127.0.0.1"
#: Ray's default dashboard port, used for a local instance when free.
DEFAULT_DASHBOARD_PORT = 8265
#: Seconds to wait for a cluster's GCS port to accept a connection.
PROBE_TIMEOUT_S = 5.0
#: Read by Ray's state API client in every process of the job (ray.dashboard.utils).
STATE_API_ENV = "RAY_API_SERVER_ADDRESS"
#: The key of a job's metadata that the dashboard shows as the job's name.
JOB_NAME_KEY = "job_name"
#: Ray's own setting for how long ray.init waits for a new dashboard (its default: 60 s).
DASHBOARD_WAIT_ENV = "RAY_DASHBOARD_STARTUP_TIMEOUT_S"
#: The wait used when that setting is not given: on a busy machine (a few CPU-bound processes
#: per core) the dashboard takes over a minute to come up, and a certification then would fail
#: before its first shard for a view that was only slow.
DASHBOARD_WAIT_S = 240


@dataclass(frozen=True)
class RayCluster:
    """The Ray cluster this process is connected to."""

    address: str  # the GCS address (host:port)
    dashboard_url: str  # http://host:port
    started_here: bool  # a new local instance, started by this call
    connected_here: bool  # this call made the connection (disconnect() undoes it)
    autoscaling: bool  # the cluster has an autoscaler config (it may add nodes on demand)

    def resources(self) -> dict[str, float]:
        """Total logical resources of the nodes alive now."""
        import ray

        return {k: float(v) for k, v in ray.cluster_resources().items()}

    def multi_node(self) -> bool:
        """More than one node now, or possibly later: then only shared storage (S3) reaches every worker."""
        import ray

        return self.autoscaling or sum(1 for n in ray.nodes() if n.get("Alive")) > 1


def auth_mode() -> str:
    """``token`` or ``disabled``, as this process will use it (Ray puts it in the environment)."""
    return (os.environ.get("RAY_AUTH_MODE") or "disabled").lower()


def _has_autoscaler() -> bool:
    # Internal API (Ray is pinned): the same source Ray Train uses for its own resource check.
    from ray._private.state import state

    return state.get_max_resources_from_cluster_config() is not None


def _dashboard_port() -> int:
    """8265 when free, else any free port (another Ray instance on this machine may hold 8265)."""
    for port in (DEFAULT_DASHBOARD_PORT, 0):
        with socket.socket() as s:
            try:
                s.bind((DASHBOARD_HOST, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise TbnError(f"no free TCP port on {DASHBOARD_HOST} for the Ray dashboard")


#: The GCS's cheapest call (in Ray's ``ray.rpc`` gRPC package): any answer but "unimplemented" is a GCS.
GCS_PROBE_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"

_TRY = "start one (ray start --head, or ray up cluster/gpu.yaml), check the address (the head node's GCS port, 6379 by default), or leave out --address for a local instance"


def _unreachable(address: str, why: str) -> TbnError:
    return TbnError(f"no Ray cluster reachable at {address} ({why}): {_TRY}")


def _probe(address: str) -> None:
    """Refuse, within ``PROBE_TIMEOUT_S`` and in one line, an address where no Ray GCS answers.

    ray.init would retry for minutes, its C++ client logging each attempt to stderr. A port that
    accepts connections is not enough (another server, a hung process, a raylet's port): one gRPC
    call to the GCS, which needs no token to say it is one (an unauthenticated call is refused as
    such, and ray.init then reports the token)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise _unreachable(address, e.strerror or str(e) or type(e).__name__) from None
    tls = (os.environ.get("RAY_USE_TLS") or "0").lower() in ("1", "true")
    if address.startswith("ray://") or tls:
        return  # Ray Client's server is not a GCS; a plain channel cannot speak TLS
    import grpc

    with grpc.insecure_channel(f"{host}:{port}") as channel:
        call = channel.unary_unary(GCS_PROBE_METHOD)
        try:
            call(b"", timeout=PROBE_TIMEOUT_S)
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise _unreachable(
                    address, f"the port accepts connections but no Ray GCS answered within {PROBE_TIMEOUT_S:g} s"
                ) from None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                raise _unreachable(
                    address, "a gRPC server answers there, but not a Ray GCS: another Ray port?"
                ) from None
            if code == grpc.StatusCode.UNAVAILABLE:
                raise _unreachable(address, "the port accepts connections but does not speak gRPC") from None


def _describe(*, started_here: bool, connected_here: bool) -> RayCluster:
    import ray

    gcs = ray.get_runtime_context().gcs_address
    dashboard = ray._private.worker.get_dashboard_url()
    if not dashboard:
        raise TbnError(
            "Ray is running without its dashboard, which tbn-ray needs: "
            'install "ray[default]" (pip install "tbn-ray[ray]") and restart the cluster with the dashboard on'
        )
    return RayCluster(
        address=gcs,
        dashboard_url=dashboard if dashboard.startswith("http") else f"http://{dashboard}",
        started_here=started_here,
        connected_here=connected_here,
        autoscaling=_has_autoscaler(),
    )


def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    dashboard_port: int | None = None,
    job_name: str | None = None,
    log: Callable[[str], None] = print,
) -> RayCluster:
    """Join ``address`` (or ``$RAY_ADDRESS``, as under ``ray job submit``), else start a local instance.

    A process already connected (a test session, a Tune trial) keeps its connection.
    ``num_cpus``/``num_gpus``/``dashboard_port`` apply to a new local instance only. ``job_name``
    is the Name column of the dashboard's Jobs view (under ``ray job submit`` the submission's
    own name wins: Ray puts it over the driver's).
    """
    import ray

    job_config = ray.job_config.JobConfig(metadata={JOB_NAME_KEY: job_name}) if job_name else None
    if ray.is_initialized():
        cluster = _describe(started_here=False, connected_here=False)
    elif address or os.environ.get("RAY_ADDRESS"):
        cluster = _join(address, job_config)
    else:
        cluster = _start_local(
            num_cpus=num_cpus, num_gpus=num_gpus, dashboard_port=dashboard_port, job_config=job_config, log=log
        )
    reclaim_sigterm()  # Ray's native SIGTERM handler aborts with a stack dump
    where = "local Ray instance" if cluster.started_here else f"Ray cluster {cluster.address}"
    auth = (
        "token authentication on: `ray get-auth-token` prints the token the dashboard asks for"
        if auth_mode() == "token"
        else "token authentication off"
    )
    log(f"{where}: dashboard {cluster.dashboard_url} ({auth})")
    return cluster


def _join(address: str | None, job_config: Any = None) -> RayCluster:
    """Join ``address`` (None: ``$RAY_ADDRESS``); a refused connection is one line that says why."""
    import ray

    target = address or os.environ["RAY_ADDRESS"]
    _probe(target)
    try:
        ray.init(address=address, logging_level="WARNING", job_config=job_config)
    except ConnectionError as e:
        raise _unreachable(target, " ".join(str(e).split()) or type(e).__name__) from None
    except ray.exceptions.AuthenticationError:
        raise TbnError(
            f"the Ray cluster at {target} refused the connection (token authentication): set RAY_AUTH_MODE=token "
            "and put the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN (ray get-auth-token on the head node)"
        ) from None
    return _describe(started_here=False, connected_here=True)


def _start_local(
    *,
    num_cpus: int | None,
    num_gpus: int | None,
    dashboard_port: int | None,
    job_config: Any,
    log: Callable[[str], None],
) -> RayCluster:
    """A new local instance with its dashboard. A start that fails (an overloaded machine on which
    Ray's own processes time out, an unusable temporary directory) is one line that says what to try."""
    import ray

    port = dashboard_port or _dashboard_port()
    url = f"http://{DASHBOARD_HOST}:{port}"
    _wait_longer_for_the_dashboard()
    try:
        ray.init(
            address="local",  # a new instance, never a `ray start` cluster that happens to run on this machine
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=True,
            dashboard_host=DASHBOARD_HOST,
            dashboard_port=port,
            logging_level="WARNING",
            job_config=job_config,
            # Ray's own actors (Train's placement-group cleaner) find the state API by looking for a
            # local Ray instance and give up if there are several on this machine: name ours.
            runtime_env={"env_vars": {STATE_API_ENV: url}},
        )
    except Exception as e:
        with suppress(Exception):
            ray.shutdown()  # whatever the failed start left running
        cause = " ".join(str(e).split())[:200] or type(e).__name__
        raise TbnError(
            f"could not start a local Ray instance ({cause}): run the command again when the machine is less busy, "
            "check that Ray's temporary directory (RAY_TMPDIR, else /tmp) is writable with space left, "
            "or join a running cluster with --address"
        ) from e
    cluster = _describe(started_here=True, connected_here=True)
    if cluster.dashboard_url != url:
        log(
            f"warning: the dashboard came up at {cluster.dashboard_url}, not {url}: Ray's cleanup of stopped runs may not find it"
        )
    return cluster


def _wait_longer_for_the_dashboard() -> None:
    """Give a new dashboard ``DASHBOARD_WAIT_S`` unless the user set Ray's own variable.

    Ray reads the variable once, when it is imported (``ray_constants``), and services.py looks
    the constant up at each start: setting the constant is what reaches this process's start."""
    if DASHBOARD_WAIT_ENV in os.environ:
        return
    from ray._private import ray_constants

    ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S = max(ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S, DASHBOARD_WAIT_S)


def disconnect(cluster: RayCluster) -> None:
    """Undo ``connect``: stop an instance it started, leave a joined cluster running, keep a prior connection."""
    import ray

    if cluster.connected_here and ray.is_initialized():
        ray.shutdown()


@contextmanager
def connected(address: str | None = None, **options) -> Iterator[RayCluster]:  # type: ignore[no-untyped-def]
    """``connect(address, **options)`` for the block, ``disconnect`` after it, however it ends."""
    cluster = connect(address, **options)
    try:
        yield cluster
    finally:
        disconnect(cluster)
