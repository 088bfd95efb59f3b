"""Where a run writes its outputs when ``trainer.output_dir`` is not set.

The folder is ``<root>/<experiment_name>/<YYYYmmdd-HHMMSS>``, with ``root`` chosen so that
the outputs outlive the process that wrote them:

1. ``$RLFLOW_OUTPUT_ROOT`` when it is set (an absolute path; ``~`` is expanded). It wins
   everywhere, so one variable points every run, local or submitted, at durable storage.
2. ``~/rlflow_outputs`` when the driver runs as a Ray job entrypoint (``ray job submit``,
   ``JobSubmissionClient``, a KubeRay RayJob). Such a driver starts in a temporary folder
   that Ray creates for the job (``<ray temp>/session_*/runtime_resources/
   working_dir_files/_ray_pkg_*`` with ``--working-dir``) and deletes with the session, so
   ``./outputs`` there would vanish.
3. ``./outputs`` in the current working directory otherwise (a shell or a notebook).

Nothing here creates the folder; the trainer does.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import PurePath
from typing import Mapping, Optional

logger = logging.getLogger("rlflow")

OUTPUT_ROOT_ENV_VAR = "RLFLOW_OUTPUT_ROOT"
# Set by Ray's job supervisor in the environment of every job entrypoint (the driver).
RAY_JOB_ENTRYPOINT_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Set by Ray in its worker processes; a driver started from inside a task or actor has it.
RAY_JOB_ID_ENV_VAR = "RAY_JOB_ID"
JOB_OUTPUT_ROOT = os.path.join("~", "rlflow_outputs")
LOCAL_OUTPUT_ROOT = "outputs"
TIMESTAMP_FORMAT = "%Y%m%d-%H%M%S"


def is_ray_temporary_dir(path: str) -> bool:
    """True when ``path`` lies inside a folder Ray manages per session (and deletes with it).

    That is anything under ``.../session_<...>/runtime_resources/``, where Ray unpacks a job's
    ``working_dir`` and other runtime-env packages.
    """
    parts = PurePath(os.path.abspath(path)).parts
    for i in range(1, len(parts)):
        if parts[i] == "runtime_resources" and parts[i - 1].startswith("session_"):
            return True
    return False


def is_ray_job_driver(environ: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None) -> bool:
    """True when this process looks like a Ray job's entrypoint (or runs inside Ray's job dirs).

    Checks the variables Ray sets for job entrypoints and worker processes, then whether
    ``cwd`` (default: the current working directory) is one of Ray's temporary folders.
    """
    env = os.environ if environ is None else environ
    if env.get(RAY_JOB_ENTRYPOINT_ENV_VAR) or env.get(RAY_JOB_ID_ENV_VAR):
        return True
    return is_ray_temporary_dir(os.getcwd() if cwd is None else cwd)


def _check_experiment_name(experiment_name: object) -> str:
    if not isinstance(experiment_name, str) or not experiment_name.strip():
        raise ValueError(
            f"trainer.experiment_name must be a non-empty string (it names the output folder), "
            f"got {experiment_name!r}"
        )
    path = PurePath(experiment_name)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(
            f"trainer.experiment_name {experiment_name!r} must be a relative name without '..'; "
            "to choose the folder itself set trainer.output_dir=/abs/path"
        )
    return experiment_name


def output_root(environ: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None) -> str:
    """The absolute folder that holds ``<experiment_name>/<timestamp>`` (see the module docs)."""
    env = os.environ if environ is None else environ
    here = os.getcwd() if cwd is None else cwd
    configured = env.get(OUTPUT_ROOT_ENV_VAR)
    if configured:
        root = os.path.expanduser(configured)
        if not os.path.isabs(root):
            raise ValueError(
                f"{OUTPUT_ROOT_ENV_VAR}={configured!r} must be an absolute path (a relative one "
                "would follow the working directory, which Ray jobs put in a temporary folder)"
            )
        return os.path.normpath(root)
    if is_ray_job_driver(env, here):
        home = env.get("HOME")
        root = os.path.join(home, "rlflow_outputs") if home else os.path.expanduser(JOB_OUTPUT_ROOT)
        return os.path.normpath(root)
    return os.path.normpath(os.path.join(here, LOCAL_OUTPUT_ROOT))


def default_output_dir(
    experiment_name: str,
    *,
    environ: Optional[Mapping[str, str]] = None,
    cwd: Optional[str] = None,
    now: Optional[float] = None,
) -> str:
    """Absolute ``<root>/<experiment_name>/<YYYYmmdd-HHMMSS>`` for a run without ``trainer.output_dir``.

    Args:
        experiment_name: ``trainer.experiment_name``; a relative name (``a/b`` nests folders).
        environ, cwd, now: the environment, working directory and time (seconds since the
            epoch, local time) to decide from; default the current process's. For tests.

    Raises:
        ValueError: an empty or escaping experiment name, or a relative ``RLFLOW_OUTPUT_ROOT``.
    """
    name = _check_experiment_name(experiment_name)
    env = os.environ if environ is None else environ
    here = os.getcwd() if cwd is None else cwd
    root = output_root(env, here)
    stamp = time.strftime(TIMESTAMP_FORMAT, time.localtime(now))
    path = os.path.join(root, name, stamp)
    if not env.get(OUTPUT_ROOT_ENV_VAR) and is_ray_job_driver(env, here):
        logger.warning(
            "running as a Ray job without trainer.output_dir: writing outputs to %s on the node "
            "that runs the driver; set trainer.output_dir or %s to shared storage to keep them",
            path, OUTPUT_ROOT_ENV_VAR,
        )
    return path


__all__ = [
    "OUTPUT_ROOT_ENV_VAR",
    "default_output_dir",
    "is_ray_job_driver",
    "is_ray_temporary_dir",
    "output_root",
]
