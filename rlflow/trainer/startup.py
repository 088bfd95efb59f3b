"""Start-up steps every driver shares: the run folder and its lock, Ray, resource pools, the
worker log.

Used by the RL and DPO trainers and by the data engine, so all of them read ``trainer.*`` and
``cluster.*`` the same way.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from rlflow.distributed.ray_cluster import init_ray
from rlflow.distributed.resource_pool import ResourcePool
from rlflow.distributed.worker_group import WorkerGroup
from rlflow.errors import ConfigError
from rlflow.trainer.checkpoint import checkpoints_root
from rlflow.trainer.output_dir import default_output_dir
from rlflow.utils.atomic import remove_stale_temporaries

logger = logging.getLogger("rlflow")


LOCK_FILE = ".rlflow.lock"


class RunLock:
    """An exclusive lock on a run folder, so two runs never write into one.

    It is an ``flock`` on ``<output_dir>/.rlflow.lock``: the kernel drops it when the process
    ends, however it ends, so a crashed run never leaves the folder locked. The file keeps a
    note of the holder for the message a second run prints.
    """

    def __init__(self, output_dir: str) -> None:
        import fcntl

        path = os.path.join(output_dir, LOCK_FILE)
        try:
            self._file: Any = open(path, "a+", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"trainer.output_dir '{output_dir}' is not writable ({exc.strerror}): pick a folder "
                "you can write to"
            ) from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise ConfigError(
                f"trainer.output_dir '{output_dir}' is in use by another run ({holder}): wait for it "
                "to finish, or set another trainer.output_dir"
            ) from None
        except OSError:  # a file system without locks (some network mounts): run unlocked
            logger.warning("cannot lock %s; make sure no other run writes to this folder", path)
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file drops the flock
            self._file = None


def _blocking_file(path: str) -> Optional[str]:
    """The first component of ``path`` that exists but is not a folder."""
    parts = os.path.abspath(path).split(os.sep)
    for n in range(2, len(parts) + 1):
        prefix = os.sep.join(parts[:n])
        if os.path.exists(prefix) and not os.path.isdir(prefix):
            return prefix
    return None


def prepare_output_dir(cfg: DictConfig) -> tuple[str, RunLock]:
    """Create and lock the run's folder, remove half-written checkpoints a crash left there,
    and write the resolved config to ``config.yaml`` in it.

    The folder is ``trainer.output_dir``, or when that is empty the durable default for
    ``trainer.experiment_name`` (see ``rlflow.trainer.output_dir``). Returns its absolute path
    and the lock, which the trainer releases when it closes.
    """
    output_dir = os.path.abspath(cfg.trainer.output_dir or default_output_dir(cfg.trainer.experiment_name))
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as exc:
        blocking = _blocking_file(output_dir)
        reason = f"'{blocking}' is a file" if blocking else exc.strerror
        raise ConfigError(
            f"trainer.output_dir '{output_dir}' cannot be created ({reason}): pick a folder you can write to"
        ) from None
    lock = RunLock(output_dir)
    try:
        remove_stale_temporaries(checkpoints_root(output_dir))
        with open(os.path.join(output_dir, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(OmegaConf.to_yaml(cfg, resolve=True))
    except BaseException:
        lock.release()
        raise
    return output_dir, lock


def total_training_steps(trainer_cfg: Any, batches_per_epoch: int) -> int:
    """``trainer.total_steps`` when set, else ``trainer.total_epochs`` passes over the data.

    As in verl (``total_training_steps`` over ``total_epochs``), a step count wins; when the
    epochs were changed from their default too, one line says which one the run follows. (A
    recipe's step count yields to epochs given on the command line, see ``compose_config``.)
    """
    epochs = int(trainer_cfg.total_epochs)
    if not trainer_cfg.total_steps:  # None (or 0): count epochs
        return batches_per_epoch * epochs
    steps = int(trainer_cfg.total_steps)
    if epochs != 1:
        line = (
            f"[rlflow] trainer.total_steps={steps} and trainer.total_epochs={epochs} are both set: "
            f"the run takes {steps} steps ({batches_per_epoch} per epoch); set trainer.total_steps=null "
            f"to train for {epochs} epochs"
        )
        logger.warning(line)
        tqdm.write(line)
    return steps


def init_ray_from_config(cluster: Any) -> dict[str, float]:
    """Start or join Ray as the ``cluster.*`` config section says; returns the cluster's
    resources. ``cluster.env_vars`` become the job's runtime environment variables."""
    return init_ray(
        address=cluster.address,
        num_cpus=cluster.num_cpus,
        num_gpus=cluster.num_gpus,
        dashboard_host=cluster.dashboard_host,
        include_dashboard=cluster.include_dashboard,
        namespace=cluster.namespace,
        runtime_env={"env_vars": dict(cluster.env_vars)} if cluster.env_vars else None,
    )


def build_pool(name: str, role_cfg: Any) -> ResourcePool:
    """The resource pool of one role: ``num_workers`` x (``cpus_per_worker``, optional
    ``gpus_per_worker`` and ``custom_resources``) from the role's config section."""
    return ResourcePool(
        name,
        num_workers=role_cfg.num_workers,
        cpus_per_worker=role_cfg.cpus_per_worker,
        gpus_per_worker=float(getattr(role_cfg, "gpus_per_worker", 0.0)),
        custom_resources=dict(getattr(role_cfg, "custom_resources", {}) or {}),
    )


def wait_ready(groups: Mapping[str, WorkerGroup]) -> None:
    """Wait for groups spawned with ``wait=False``: every role loads its model at once, so
    start-up costs the slowest role, not the sum of all of them."""
    for wg in groups.values():
        wg.wait_ready()


def log_workers(groups: Mapping[str, WorkerGroup]) -> None:
    """One line per role naming each worker's rank, process id and node, to the log and the
    console (where a progress bar may be running)."""
    for role, wg in groups.items():
        infos = wg.workers_info()
        desc = ", ".join(f"rank {i['rank']} pid {i['pid']} node {str(i['node_id'])[:8]}" for i in infos)
        line = f"[rlflow] role {role}: {len(infos)} worker(s): {desc}"
        logger.info(line)
        tqdm.write(line)
