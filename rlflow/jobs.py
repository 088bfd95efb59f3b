"""Submit an rlflow run to a Ray cluster as a Ray job, and follow its log.

A Ray job runs its entrypoint (here ``python -m rlflow.main +recipe=NAME key=value ...``) as
a driver process on the cluster's head node, so the training loop keeps going when the
submitting laptop or notebook goes away. This module is a thin layer over Ray's
``JobSubmissionClient`` (the Jobs API of the dashboard, ``http://head:8265``)::

    from rlflow.jobs import submit_run, follow_logs
    job_id = submit_run("http://127.0.0.1:8265", "grpo",
                        ["trainer.total_steps=50", "trainer.output_dir=/mnt/outputs/run1"],
                        working_dir=".")
    status = follow_logs("http://127.0.0.1:8265", job_id)   # streams the log, returns "SUCCEEDED"

Under a job the driver's working directory is a temporary folder Ray deletes with the
session: pass an absolute ``trainer.output_dir`` on shared storage, or set
``RLFLOW_OUTPUT_ROOT`` in ``runtime_env["env_vars"]`` (see ``rlflow.trainer.output_dir``).
The client honours ``RAY_AUTH_MODE`` / ``RAY_AUTH_TOKEN`` like every Ray client; rlflow sets
``RAY_AUTH_MODE=disabled`` when it is unset (see ``rlflow.distributed.ray_cluster``).
"""

from __future__ import annotations

import asyncio
import copy
import os
import shlex
import sys
import threading
import time
from typing import Any, Callable, Coroutine, Optional, Sequence, TextIO

TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
# The log stream can close a moment before the job's final status is recorded.
_FINAL_STATUS_WAIT_S = 30.0


def _check_address(address: Optional[str]) -> Optional[str]:
    if address is None:
        return None  # Ray's own lookup: RAY_API_SERVER_ADDRESS / RAY_ADDRESS / local dashboard
    if not isinstance(address, str) or not address.strip():
        raise TypeError(
            f"address must be the dashboard URL of the cluster, e.g. 'http://127.0.0.1:8265', "
            f"got {address!r}"
        )
    if address.startswith("ray://"):
        raise ValueError(
            f"address {address!r} is a Ray Client address; jobs are submitted to the dashboard "
            "(Jobs API), e.g. 'http://head:8265'"
        )
    return address


def _check_overrides(overrides: Sequence[str]) -> list[str]:
    if isinstance(overrides, str) or not isinstance(overrides, (list, tuple)):
        raise TypeError(
            f"overrides must be a list of 'key=value' strings (one per override), got {overrides!r}"
        )
    bad = [o for o in overrides if not isinstance(o, str) or not o.strip()]
    if bad:
        raise TypeError(f"overrides must hold non-empty 'key=value' strings, got {bad[0]!r}")
    return list(overrides)


def _sets_key(overrides: Sequence[str], key: str) -> bool:
    return any(o.partition("=")[0].lstrip("+~") == key for o in overrides)


def build_entrypoint(
    recipe: Optional[str], overrides: Sequence[str] = (), python: str = "python"
) -> str:
    """The shell command a job runs: ``python -m rlflow.main +recipe=NAME <overrides>``.

    Each argument is shell-quoted (overrides such as ``rollout.custom_resources={a:1}`` carry
    characters a shell would expand). ``trainer.progress_bar=false`` is added unless the
    overrides set it: a job's log is not a terminal, and a redrawn bar only clutters it.
    ``python`` is the interpreter on the cluster's PATH (not this machine's).
    """
    items = _check_overrides(overrides)
    if recipe is not None and (not isinstance(recipe, str) or not recipe.strip()):
        raise TypeError(f"recipe must be a recipe name such as 'grpo' (or None), got {recipe!r}")
    if not isinstance(python, str) or not python.strip():
        raise TypeError(f"python must name the interpreter on the cluster, got {python!r}")
    args = [python, "-m", "rlflow.main"]
    if recipe is not None:
        args.append(f"+recipe={recipe}")
    args.extend(items)
    if not _sets_key(items, "trainer.progress_bar"):
        args.append("trainer.progress_bar=false")
    return " ".join(shlex.quote(a) for a in args)


def _runtime_env(working_dir: Optional[str], runtime_env: Optional[dict]) -> Optional[dict]:
    if runtime_env is not None and not isinstance(runtime_env, dict):
        raise TypeError(
            f"runtime_env must be a dict such as {{'env_vars': {{'KEY': 'value'}}}}, got "
            f"{type(runtime_env).__name__}"
        )
    env = copy.deepcopy(runtime_env) if runtime_env else {}
    if working_dir is not None:
        if not isinstance(working_dir, (str, os.PathLike)):
            raise TypeError(f"working_dir must be a folder path or a URI, got {working_dir!r}")
        if "working_dir" in env:
            raise ValueError(
                "working_dir is given twice (argument and runtime_env['working_dir']); pass only one"
            )
        path = os.fspath(working_dir)
        if "://" not in path:
            path = os.path.abspath(os.path.expanduser(path))
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"working_dir {path} does not exist; pass the folder to upload (e.g. your "
                    "checkout) or None"
                )
        env["working_dir"] = path
    return env or None


def _client(address: Optional[str]) -> Any:
    # Imported here so that `import rlflow.jobs` stays cheap and works without a cluster.
    from ray.job_submission import JobSubmissionClient

    from rlflow.distributed.ray_cluster import ensure_auth_mode

    ensure_auth_mode()
    try:
        return JobSubmissionClient(_check_address(address))
    except ConnectionError as err:
        raise ConnectionError(
            f"cannot reach the Ray Jobs API at {address!r} ({str(err).splitlines()[0]}); start the "
            "head with the dashboard (ray start --head --include-dashboard=true) or fix the address"
        ) from None


def submit_run(
    address: Optional[str],
    recipe: Optional[str],
    overrides: Sequence[str] = (),
    working_dir: Optional[str] = None,
    runtime_env: Optional[dict] = None,
    *,
    submission_id: Optional[str] = None,
    validate: bool = True,
    python: str = "python",
) -> str:
    """Submit ``python -m rlflow.main +recipe=<recipe> <overrides>`` as a Ray job; return its id.

    Args:
        address: the cluster's dashboard URL (``http://head:8265``); None lets Ray find it
            (``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS``).
        recipe: recipe name (``"grpo"``) or None when ``overrides`` carries ``+recipe=NAME``.
        overrides: Hydra overrides, one string each (``["rollout.n=4", ...]``).
        working_dir: a local folder to upload (it becomes the driver's working directory and
            comes first on every worker's ``PYTHONPATH``) or a remote URI; None uploads nothing.
        runtime_env: Ray runtime env for the job (``env_vars``, ``pip``, ...).
        submission_id: the job id to use; None lets Ray pick ``raysubmit_...``.
        validate: compose the config here first, so an unknown key or recipe fails at once
            instead of on the cluster. Turn off when the cluster's rlflow differs from this one.
        python: the interpreter the cluster runs the entrypoint with.

    Raises:
        rlflow.errors.ConfigError: the overrides do not compose (with ``validate``).
        FileNotFoundError: ``working_dir`` is a local path that does not exist.
        TypeError / ValueError: a malformed argument, named in the message.
    """
    entrypoint = build_entrypoint(recipe, overrides, python=python)
    env = _runtime_env(working_dir, runtime_env)
    if validate:
        from rlflow.config.compose import compose_config

        compose_config(recipe, overrides)
    client = _client(address)
    return client.submit_job(entrypoint=entrypoint, runtime_env=env, submission_id=submission_id)


def job_status(address: Optional[str], job_id: str) -> str:
    """The job's status: ``PENDING``, ``RUNNING``, ``SUCCEEDED``, ``FAILED`` or ``STOPPED``."""
    return str(_client(address).get_job_status(job_id).value)


def _run_to_completion(make: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a coroutine to its end from sync code, also where a loop already runs (Jupyter)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(make())
        return
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(make())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=target, name="rlflow-follow-logs", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def follow_logs(address: Optional[str], job_id: str, out: Optional[TextIO] = None) -> str:
    """Stream the job's log to ``out`` (default ``sys.stdout``) until it ends; return its status.

    Works from a script and from a notebook (where the kernel already runs an event loop).
    The returned status is one of ``TERMINAL_STATUSES`` (``SUCCEEDED`` when the run finished),
    unless the log stream broke off early (connection lost): then the job's current status.

    Raises:
        ValueError: the cluster has no job ``job_id``.
    """
    if not isinstance(job_id, str) or not job_id:
        raise TypeError(f"job_id must be the id submit_run returned, got {job_id!r}")
    client = _client(address)
    try:
        client.get_job_info(job_id)
    except RuntimeError as err:
        raise ValueError(
            f"no job {job_id!r} at {address!r} ({str(err).splitlines()[0]}); list jobs with "
            "`ray job list --address ADDRESS`"
        ) from None
    stream = sys.stdout if out is None else out

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            stream.write(chunk)
            stream.flush()

    _run_to_completion(tail)
    deadline = time.monotonic() + _FINAL_STATUS_WAIT_S
    status = str(client.get_job_status(job_id).value)
    while status not in TERMINAL_STATUSES and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(client.get_job_status(job_id).value)
    return status


__all__ = ["TERMINAL_STATUSES", "build_entrypoint", "follow_logs", "job_status", "submit_run"]
