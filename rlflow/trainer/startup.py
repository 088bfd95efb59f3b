"""Start-up steps every driver shares: the run folder, Ray, resource pools, the worker log.

Used by the RL and DPO trainers and by the data engine, so all of them read ``trainer.*`` and
``cluster.*`` the same way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from rlflow.distributed.ray_cluster import init_ray
from rlflow.distributed.resource_pool import ResourcePool
from rlflow.distributed.worker_group import WorkerGroup
from rlflow.trainer.output_dir import default_output_dir

logger = logging.getLogger("rlflow")


def prepare_output_dir(cfg: DictConfig) -> str:
    """Create the run's folder and write the resolved config to ``config.yaml`` in it.

    The folder is ``trainer.output_dir``, or when that is empty the durable default for
    ``trainer.experiment_name`` (see ``rlflow.trainer.output_dir``). Returns its absolute path.
    """
    output_dir = os.path.abspath(cfg.trainer.output_dir or default_output_dir(cfg.trainer.experiment_name))
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))
    return output_dir


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
        num_workers=int(role_cfg.num_workers),
        cpus_per_worker=float(role_cfg.cpus_per_worker),
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
