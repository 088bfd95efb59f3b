"""Start or join the Ray cluster the driver runs on.

``init_ray`` is the one place rlflow calls ``ray.init``. It either starts an embedded
single-node cluster (laptop, CI, one GPU box) or connects to an existing one (``ray start``,
KubeRay, a ``ray job submit`` entrypoint), and returns the cluster's total resources.

Two pieces of environment hygiene live here because every later process inherits them:

* ``RAY_AUTH_MODE``: since Ray 2.60 a local ``ray.init()`` with the variable unset turns on
  token authentication and writes ``~/.ray/auth_token``; a later ``ray start --head`` in the
  same HOME then finds the token and protects that cluster too, which breaks clients that
  don't know about it. rlflow always sets the variable explicitly (``"disabled"`` unless the
  user chose a mode) before ``ray.init`` and forwards it to workers.
* Thread counts: worker processes get ``OMP_NUM_THREADS`` from ``WorkerGroup`` (see there),
  so several small workers on a 2-core machine do not each start one thread per core.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
from typing import Any

import ray

from rlflow.errors import ClusterError

logger = logging.getLogger(__name__)

AUTH_MODE_ENV_VAR = "RAY_AUTH_MODE"
DEFAULT_AUTH_MODE = "disabled"
_KNOWN_AUTH_MODES = ("disabled", "token")
# Ray's own retry loop spends minutes (then calls sys.exit) on an unreachable address, so
# rlflow probes the port first and fails within this many seconds.
_CONNECT_PROBE_TIMEOUT_S = 5.0
_RAY_CLIENT_DEFAULT_PORT = 10001
# An embedded cluster runs only rlflow's actors, and each actor needs a process of its own
# (its runtime env carries its rank): idle workers prestarted for plain tasks would only
# compete with them for the CPU at start-up, and the default cap of one starting process per
# core would start the roles' processes a few at a time.
_LOCAL_SYSTEM_CONFIG = {
    "enable_worker_prestart": False,
    "prestart_worker_first_driver": False,
    "worker_maximum_startup_concurrency": 16,
    # Arguments and results up to 2 MiB (a demo step's batches are 150-250 KB) travel inside
    # the call instead of through the shared-memory object store, whose extra round trips
    # cost about 13% of a demo step on 2 cores.
    "max_direct_call_object_size": 2 * 1024 * 1024,
}


def ensure_auth_mode() -> str:
    """Make ``RAY_AUTH_MODE`` explicit in this process and return it.

    Keeps a value the user already exported; otherwise sets ``"disabled"``. An unknown value
    only warns, since newer Ray releases may add modes.
    """
    mode = os.environ.get(AUTH_MODE_ENV_VAR)
    if not mode:
        os.environ[AUTH_MODE_ENV_VAR] = DEFAULT_AUTH_MODE
        return DEFAULT_AUTH_MODE
    if mode.lower() not in _KNOWN_AUTH_MODES:
        logger.warning(
            "%s=%r is not a mode this Ray version is known to accept (%s)",
            AUTH_MODE_ENV_VAR, mode, ", ".join(_KNOWN_AUTH_MODES),
        )
    return mode


def worker_env_vars() -> dict[str, str]:
    """Environment variables every rlflow worker process must carry (currently the auth mode)."""
    return {AUTH_MODE_ENV_VAR: ensure_auth_mode()}


def _with_worker_env(runtime_env: dict | None) -> dict:
    """``runtime_env`` with the auth mode added to ``env_vars`` (user values win)."""
    if runtime_env is not None and not isinstance(runtime_env, dict):
        raise TypeError(
            f"runtime_env must be a dict like {{'env_vars': {{...}}}}, got {type(runtime_env).__name__}"
        )
    merged = copy.deepcopy(runtime_env) if runtime_env else {}
    env_vars = merged.get("env_vars") or {}
    if not isinstance(env_vars, dict):
        raise TypeError(f"runtime_env['env_vars'] must be a dict of strings, got {type(env_vars).__name__}")
    merged["env_vars"] = {**worker_env_vars(), **{str(k): str(v) for k, v in env_vars.items()}}
    return merged


def _probe_target(address: str) -> tuple[str, int] | None:
    """``(host, port)`` to test-connect before joining ``address``; None when Ray resolves it."""
    if address == "auto":
        return None  # Ray finds the local cluster itself and fails fast when there is none
    target = address
    default_port = None
    if "://" in target:
        scheme, target = target.split("://", 1)
        if scheme == "ray":
            default_port = _RAY_CLIENT_DEFAULT_PORT
        target = target.split("/", 1)[0]
    if target.startswith("["):  # [ipv6]:port
        host, _, rest = target[1:].partition("]")
        port_text = rest.lstrip(":")
    elif target.count(":") == 1:
        host, port_text = target.split(":")
    else:
        host, port_text = target, ""
    if not port_text:
        if default_port is None:
            raise ClusterError(
                f"cluster.address {address!r} has no port; use host:port (GCS, usually 6379), "
                "ray://host:10001, 'auto', or null for a local cluster"
            )
        return host, default_port
    try:
        return host, int(port_text)
    except ValueError:
        raise ClusterError(
            f"cluster.address {address!r} has a non-numeric port {port_text!r}; use host:port"
        ) from None


def _check_reachable(address: str) -> None:
    target = _probe_target(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=_CONNECT_PROBE_TIMEOUT_S):
            pass
    except OSError as err:
        raise ClusterError(
            f"cannot reach a Ray cluster at {address!r} ({err.__class__.__name__}: {err}); "
            "start it with `ray start --head`, fix cluster.address, or set cluster.address=null "
            "for a local cluster"
        ) from None


def _check_count(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ClusterError(f"{name} must be a non-negative int or null, got {value!r}")


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    dashboard_host: str = "127.0.0.1",
    include_dashboard: bool = False,
    runtime_env: dict | None = None,
    namespace: str | None = None,
    temp_dir: str | None = None,
) -> dict[str, float]:
    """Start or join Ray and return ``ray.cluster_resources()``.

    Args:
        address: None starts an embedded local cluster, unless ``RAY_ADDRESS`` is set (as
            under ``ray job submit``), in which case that cluster is joined. ``"local"``
            always starts a new one. Anything else (``"auto"``, ``"host:6379"``,
            ``"ray://host:10001"``) joins an existing cluster; an unreachable address fails
            in a few seconds with a ``ClusterError``.
        num_cpus, num_gpus: resources of the embedded cluster (None: detect). Ignored, with a
            warning, when joining an existing cluster, whose size is fixed.
        dashboard_host, include_dashboard: dashboard of the embedded cluster; loopback and off
            by default because the dashboard accepts job submissions.
        runtime_env: Ray runtime env for every worker of this job; ``RAY_AUTH_MODE`` is added
            to its ``env_vars`` unless given there.
        namespace: Ray namespace for named actors.
        temp_dir: Ray's session/log/socket root for the embedded cluster (tests use a private
            one). Keep it short: Unix socket paths under it are limited to ~100 characters.

    If Ray is already initialised in this process (e.g. by the user in a notebook), it is
    reused as is and the arguments are ignored.
    """
    _check_count("num_cpus", num_cpus)
    _check_count("num_gpus", num_gpus)
    ensure_auth_mode()
    if ray.is_initialized():
        logger.info("Ray is already initialised in this process; reusing it")
        return ray.cluster_resources()

    if address is None:
        address = os.environ.get("RAY_ADDRESS") or None
    env = _with_worker_env(runtime_env)

    if address is None or address == "local":
        ray.init(
            address="local",
            _system_config=_LOCAL_SYSTEM_CONFIG,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=include_dashboard,
            dashboard_host=dashboard_host,
            runtime_env=env,
            namespace=namespace,
            _temp_dir=temp_dir,
        )
        return ray.cluster_resources()

    if num_cpus is not None or num_gpus is not None:
        logger.warning(
            "cluster.num_cpus / cluster.num_gpus only size a local cluster; ignored when "
            "joining the existing cluster at %s",
            address,
        )
    _check_reachable(address)
    try:
        ray.init(address=address, runtime_env=env, namespace=namespace)
    except (ConnectionError, SystemExit) as err:
        # Ray exits the process (SystemExit) when the GCS never answers; turn both into one line.
        raise ClusterError(
            f"could not join the Ray cluster at {address!r}: {str(err).splitlines()[0] if str(err) else err!r}; "
            "check cluster.address (and RAY_AUTH_MODE if the cluster uses token auth)"
        ) from None
    return ray.cluster_resources()


def shutdown_ray() -> None:
    """Disconnect from Ray; stops the embedded cluster if this process started one. Idempotent."""
    if ray.is_initialized():
        ray.shutdown()
