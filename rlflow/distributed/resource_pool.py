"""Resource pools: one Ray placement group per role, one bundle per worker.

A placement group reserves every worker's resources at once (gang scheduling), so a role
either gets all its workers or none, and two roles never deadlock by each holding half of
what they need. Resources may be fractional (``cpus_per_worker=0.5`` puts four small
workers on two cores).
"""

from __future__ import annotations

import math
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlflow.errors import ClusterError

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# Ray tracks resources in units of 1e-4; compare with that tolerance so 3 x 0.1 CPU fits 0.3.
_EPS = 1e-4


def _check_amount(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{field} must be a non-negative number, got {value!r}")
    return float(value)


def _fmt(amount: float) -> str:
    return f"{amount:g}"


class ResourcePool:
    """A placement group with ``num_workers`` identical bundles for the role ``name``.

    Each bundle holds ``cpus_per_worker`` CPUs, ``gpus_per_worker`` GPUs and
    ``custom_resources`` (e.g. ``{"TPU": 1}``). The group is requested at construction
    (Ray must be initialised); ``ready()`` waits until it is placed. ``strategy`` is Ray's
    placement strategy: ``PACK`` (default, fewest nodes), ``SPREAD``, ``STRICT_PACK`` (one
    node) or ``STRICT_SPREAD`` (one worker per node).
    """

    def __init__(
        self,
        name: str,
        num_workers: int,
        cpus_per_worker: float = 1.0,
        gpus_per_worker: float = 0.0,
        custom_resources: dict[str, float] | None = None,
        strategy: str = "PACK",
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"ResourcePool name must be a non-empty string (the role), got {name!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"{name}.num_workers must be a positive int, got {num_workers!r}")
        cpus = _check_amount(f"{name}.cpus_per_worker", cpus_per_worker)
        gpus = _check_amount(f"{name}.gpus_per_worker", gpus_per_worker)
        if custom_resources is not None and not isinstance(custom_resources, dict):
            raise TypeError(
                f"{name}.custom_resources must be a dict of resource name -> amount, "
                f"got {type(custom_resources).__name__}"
            )
        custom = {
            str(k): _check_amount(f"{name}.custom_resources[{k!r}]", v)
            for k, v in (custom_resources or {}).items()
        }
        for reserved in ("CPU", "GPU"):
            if reserved in custom:
                raise ValueError(
                    f"{name}.custom_resources must not contain {reserved!r}; "
                    f"use {name}.{reserved.lower()}s_per_worker"
                )
        if strategy not in STRATEGIES:
            raise ValueError(f"{name}.strategy is {strategy!r}; choose one of {list(STRATEGIES)}")
        bundle = {"CPU": cpus, "GPU": gpus, **custom}
        bundle = {k: v for k, v in bundle.items() if v > 0}
        if not bundle:
            raise ValueError(
                f"role {name!r} asks for workers with no resources; set {name}.cpus_per_worker "
                "or gpus_per_worker above 0"
            )
        if not ray.is_initialized():
            raise ClusterError(
                f"Ray is not initialised; call rlflow.distributed.ray_cluster.init_ray() before "
                f"creating the resource pool for role {name!r}"
            )
        self.name = name
        self.num_workers = num_workers
        self.cpus_per_worker = cpus
        self.gpus_per_worker = gpus
        self.custom_resources = custom
        self.strategy = strategy
        self.bundle_resources: dict[str, float] = bundle
        self._pg: PlacementGroup | None = placement_group(
            [dict(bundle) for _ in range(num_workers)], strategy=strategy, name=f"rlflow/{name}"
        )
        self._ready = False

    # ------------------------------------------------------------------ placement

    @property
    def placement_group(self) -> PlacementGroup:
        if self._pg is None:
            raise ClusterError(f"the resource pool of role {self.name!r} was removed; create a new one")
        return self._pg

    def _need_text(self) -> str:
        parts = []
        for key, amount in self.bundle_resources.items():
            parts.append(f"{_fmt(amount)} {key}")
        return f"{self.num_workers} workers x " + " + ".join(parts)

    def _fix_hint(self) -> str:
        return (
            f"lower {self.name}.num_workers or the per-worker resources "
            f"({self.name}.cpus_per_worker / gpus_per_worker), or give Ray more "
            "(cluster.num_cpus / cluster.num_gpus, or add nodes)"
        )

    def infeasibility(self) -> str | None:
        """Why the alive nodes can never hold this pool, or None if they can (free or not).

        Checks the cluster's totals, that one bundle fits on some node, and the STRICT_*
        strategies' per-node constraints. Resources held by other pools don't count here.
        """
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        totals: dict[str, float] = {}
        for res in nodes:
            for key, amount in res.items():
                totals[key] = totals.get(key, 0.0) + float(amount)
        for key, amount in self.bundle_resources.items():
            need = amount * self.num_workers
            have = totals.get(key, 0.0)
            if need > have + _EPS:
                return (
                    f"role {self.name!r} asks for {self.num_workers} workers x {_fmt(amount)} {key} "
                    f"but the cluster has {_fmt(have)} {key}: {self._fix_hint()}"
                )

        def fits(res: dict, scale: int = 1) -> bool:
            return all(float(res.get(k, 0.0)) + _EPS >= v * scale for k, v in self.bundle_resources.items())

        per_worker = " + ".join(f"{_fmt(v)} {k}" for k, v in self.bundle_resources.items())
        fitting = sum(1 for res in nodes if fits(res))
        if fitting == 0:
            return (
                f"role {self.name!r} needs {per_worker} per worker but no single node has that "
                f"much: {self._fix_hint()}"
            )
        if self.strategy == "STRICT_PACK" and not any(fits(res, self.num_workers) for res in nodes):
            return (
                f"role {self.name!r} uses STRICT_PACK and needs {self._need_text()} on one node, "
                f"but no node is that large: use {self.name}.strategy=PACK or {self._fix_hint()}"
            )
        if self.strategy == "STRICT_SPREAD" and fitting < self.num_workers:
            return (
                f"role {self.name!r} uses STRICT_SPREAD and needs {self.num_workers} nodes with "
                f"{per_worker} each, but only {fitting} qualify: use {self.name}.strategy=SPREAD "
                f"or {self._fix_hint()}"
            )
        return None

    def ready(self, timeout_s: float | None = 300.0, fail_fast: bool = True) -> ResourcePool:
        """Block until every bundle is placed; returns self. Idempotent.

        With ``fail_fast`` (default) a pool the cluster can never hold raises at once; pass
        False on an autoscaling cluster, where nodes may still join. A pool that fits but
        whose resources stay taken by others raises after ``timeout_s`` seconds (None: wait
        without limit). On either error the request is withdrawn (the pool is removed), so
        it cannot grab resources later.

        Raises:
            ClusterError: one line naming the role, what it asks for and how to fix it.
        """
        if self._ready:
            return self
        pg = self.placement_group
        if fail_fast:
            reason = self.infeasibility()
            if reason is not None:
                self.remove()
                raise ClusterError(reason)
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            reason = self.infeasibility()
            if reason is None:
                free = ray.available_resources()
                free_text = ", ".join(f"{_fmt(free.get(k, 0.0))} {k}" for k in self.bundle_resources)
                reason = (
                    f"role {self.name!r} could not reserve {self._need_text()} within "
                    f"{timeout_s:g}s: only {free_text} are free (other roles or jobs hold the "
                    f"rest); {self._fix_hint()}"
                )
            self.remove()
            raise ClusterError(reason)
        self._ready = True
        return self

    def bundle(self, index: int) -> PlacementGroupSchedulingStrategy:
        """Scheduling strategy that places an actor or task on bundle ``index``."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_workers:
            raise IndexError(
                f"bundle index {index!r} out of range for role {self.name!r} "
                f"with {self.num_workers} workers"
            )
        return PlacementGroupSchedulingStrategy(
            placement_group=self.placement_group,
            placement_group_bundle_index=index,
            # Tasks a worker spawns should not compete for its own bundle.
            placement_group_capture_child_tasks=False,
        )

    def node_ids(self) -> list[str]:
        """Node id (hex) of each bundle, by bundle index; the pool must be ready."""
        if not self._ready:
            self.ready()
        table = ray.util.placement_group_table(self.placement_group)
        mapping = table.get("bundles_to_node_id", {})
        return [str(mapping[i]) for i in range(self.num_workers)]

    def remove(self) -> None:
        """Release the reserved resources. Idempotent; actors on the pool are killed by Ray."""
        if self._pg is not None and ray.is_initialized():
            remove_placement_group(self._pg)
        self._pg = None
        self._ready = False

    def __repr__(self) -> str:
        state = "removed" if self._pg is None else ("ready" if self._ready else "pending")
        return f"ResourcePool({self.name!r}, {self._need_text()}, strategy={self.strategy}, {state})"
