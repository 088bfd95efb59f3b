"""WorkerGroup: the Ray actors of one role, and the driver's way to call them.

The driver holds one ``WorkerGroup`` per role. A group spawns one actor per bundle of its
``ResourcePool``, gives each its rank through the environment, and offers three ways to
call a method on all ranks:

* ``call_all``: the same arguments to every rank, results in rank order;
* ``call_sharded``: a ``BatchedDataDict`` split contiguously over the ranks, results
  concatenated back in the original sample order;
* ``call_sharded_metrics``: like ``call_sharded`` but returns each rank's result as is
  (e.g. a dict of training metrics).

Every call has an ``*_async`` twin that returns at once, so the driver can keep several
roles busy at the same time. Failures come back as ``WorkerError`` subclasses naming the
role, rank and method.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from rlflow.data.batch_sizes import padding_indices, shard_bounds
from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.distributed.ray_cluster import worker_env_vars
from rlflow.distributed.resource_pool import ResourcePool
from rlflow.workers.base import Worker

# Set by the group for every rank; users may not override them through env_vars.
_RANK_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Ray frees an actor's name shortly after the actor dies, not at ray.kill(); a group
# re-created right after shutdown() waits this long for its names to become free.
_NAME_RELEASE_WAIT_S = 10.0
# A rank whose collective lost its peer raises ("Connection closed by peer") before Ray
# reports the peer's death; this long is given to the other ranks' results to show it.
_PEER_DEATH_GRACE_S = 5.0
# What such a rank raises: gloo's and NCCL's transport errors. Any other error is the call's
# own and is reported at once, without the grace.
_LOST_PEER = re.compile(
    r"connection (closed|reset)|broken pipe|DistBackendError|DistNetworkError|gloo|nccl", re.IGNORECASE
)


class WorkerError(RuntimeError):
    """A worker of a group failed; ``role``, ``rank`` and ``method`` say which and where."""

    def __init__(self, message: str, role: str, rank: int, method: str) -> None:
        super().__init__(message)
        self.role = role
        self.rank = rank
        self.method = method


class WorkerDiedError(WorkerError):
    """The worker's process is gone (crash, OOM kill, node loss, or it failed to start)."""


class WorkerCallError(WorkerError):
    """The worker is alive but the method raised; the original exception is ``__cause__``."""


class WorkerTimeoutError(WorkerError, TimeoutError):
    """The worker did not answer within the timeout."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The line a Python traceback ends with: "ValueError: message", "pkg.mod.MyError: ...".
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b(:|$)")


def _first_line(text: str, limit: int = 300) -> str:
    lines = [ln.strip() for ln in _ANSI.sub("", text).strip().splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _summarise(err: BaseException) -> str:
    """One line saying what went wrong inside the worker."""
    if isinstance(err, RayTaskError):
        cause = getattr(err, "cause", None)
        if cause is not None and not isinstance(cause, RayTaskError):
            return f"{type(cause).__name__}: {_first_line(str(cause))}"
    text = _ANSI.sub("", str(err))
    if getattr(err, "actor_init_failed", False):
        # The constructor's traceback is embedded in the message; its exception line is
        # the last unindented "SomeError: ..." line.
        found = [ln for ln in text.splitlines() if _EXCEPTION_LINE.match(ln)]
        if found:
            return "its constructor raised " + _first_line(found[-1])
    return _first_line(text)


class ShardedCall:
    """A ``call_sharded_async`` in flight: ``result()`` gathers a batch, ``per_rank()`` the
    raw per-rank results. Either may be called once or many times (results are cached)."""

    def __init__(
        self,
        group: WorkerGroup,
        method: str,
        refs: list[ray.ObjectRef],
        shard_sizes: list[int],
        original_size: int,
        num_padded: int,
        pad_value_dict: Mapping[str, int | float] | None,
    ) -> None:
        self.group = group
        self.method = method
        self.refs = refs
        self.shard_sizes = shard_sizes
        self.original_size = original_size
        self.num_padded = num_padded
        self.pad_value_dict = pad_value_dict
        self._results: list[Any] | None = None

    def per_rank(self, timeout_s: float | None = None) -> list[Any]:
        """Each rank's return value, in rank order (includes work on padded copies)."""
        if self._results is None:
            self._results = self.group.get(self.refs, self.method, timeout_s=timeout_s)
        return self._results

    def result(self, timeout_s: float | None = None) -> BatchedDataDict:
        """All ranks' batches concatenated in rank order, which is the input order.

        Each rank must return ``k`` rows per input row (``k`` the same on every rank; ``k=1``
        for per-sample outputs) with a sample's rows adjacent and in input order; when the
        input was padded, the rows of the padded copies (the last ``num_padded * k``) are
        dropped.
        """
        results = self.per_rank(timeout_s)
        group, method = self.group, self.method
        batches = []
        for rank, out in enumerate(results):
            if not isinstance(out, Mapping):
                raise TypeError(
                    f"role {group.role!r} rank {rank} method {method!r} returned a "
                    f"{type(out).__name__}, not a batch; use call_sharded_metrics for per-rank results"
                )
            try:
                batch = out if isinstance(out, BatchedDataDict) else BatchedDataDict(out)
                _ = batch.size
            except (TypeError, ValueError) as err:
                raise TypeError(
                    f"role {group.role!r} rank {rank} method {method!r} returned a dict that is "
                    f"not a batch ({err}); use call_sharded_metrics for per-rank results"
                ) from None
            batches.append(batch)
        sizes = [b.size for b in batches]
        if self.num_padded:
            # Shards are equal, so one multiplier k must hold on every rank to know which
            # rows belong to the padded copies.
            per_shard = self.shard_sizes[0]
            if any(s % per_shard for s in sizes) or len({s // per_shard for s in sizes}) != 1:
                raise ValueError(
                    f"role {group.role!r} method {method!r} returned batch sizes {sizes} for shards "
                    f"of {per_shard} rows; with padding every rank must return the same number of "
                    "rows per input row (or call with pad_to_divisible=False)"
                )
        merged = BatchedDataDict.from_batches(batches, self.pad_value_dict)
        if self.num_padded:
            multiplier = sizes[0] // self.shard_sizes[0]
            merged = BatchedDataDict(merged.slice(0, self.original_size * multiplier).data)
        return merged


class WorkerGroup:
    """``pool.num_workers`` Ray actors of ``worker_cls`` for one role.

    Rank ``i`` runs on bundle ``i`` of ``pool`` with the pool's CPUs / GPUs / custom
    resources, is named ``"rlflow/<role>/<i>"`` in the job's Ray namespace, and is
    constructed as ``worker_cls(**init_kwargs)`` with these environment variables:
    ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` (position among the
    group's workers on the same node), ``MASTER_ADDR`` / ``MASTER_PORT`` (a free port on
    rank 0's node, for ``Worker.init_distributed``), ``RAY_AUTH_MODE`` and
    ``OMP_NUM_THREADS`` (the worker's whole CPUs, at least 1), plus ``env_vars``.

    The constructor waits up to ``ready_timeout_s`` for the pool, then as long again for
    every worker to be constructed (None: no limit). With ``wait=False`` it returns once the
    workers are spawned, and ``wait_ready()`` does the second wait: a driver spawns every
    role first and then waits for all, so the roles load their models at the same time.
    ``call_timeout_s`` bounds every later blocking call (None: wait as long as it takes).
    """

    def __init__(
        self,
        worker_cls: type[Worker],
        role: str,
        pool: ResourcePool,
        init_kwargs: dict[str, Any] | None = None,
        env_vars: dict[str, str] | None = None,
        ready_timeout_s: float | None = 600.0,
        call_timeout_s: float | None = None,
        wait: bool = True,
    ) -> None:
        if not isinstance(worker_cls, type) or not issubclass(worker_cls, Worker):
            raise TypeError(
                f"worker_cls must be a subclass of rlflow.workers.base.Worker (a plain class, not "
                f"ray.remote-wrapped), got {worker_cls!r}"
            )
        if not isinstance(role, str) or not role or "/" in role:
            raise ValueError(f"role must be a non-empty name without '/', got {role!r}")
        if not isinstance(pool, ResourcePool):
            raise TypeError(f"pool must be a ResourcePool, got {type(pool).__name__}")
        if init_kwargs is not None and not isinstance(init_kwargs, dict):
            raise TypeError(f"init_kwargs must be a dict of constructor arguments, got {type(init_kwargs).__name__}")
        user_env = self._check_env_vars(env_vars)
        self.worker_cls = worker_cls
        self.role = role
        self.pool = pool
        self.call_timeout_s = call_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self._workers: list[ray.actor.ActorHandle] = []
        # How each rank was made, so that ``respawn`` can make it again.
        self._options: list[dict] = []
        self._init_kwargs = init_kwargs or {}

        pool.ready(timeout_s=ready_timeout_s)
        master_addr, master_port = self._master_endpoint()
        node_ids = pool.node_ids()
        cpus_threads = str(max(1, math.floor(pool.cpus_per_worker)))
        remote_cls = ray.remote(worker_cls)
        self._remote_cls = remote_cls
        try:
            for rank in range(pool.num_workers):
                same_node = [r for r in range(pool.num_workers) if node_ids[r] == node_ids[rank]]
                env = {
                    **worker_env_vars(),
                    "OMP_NUM_THREADS": cpus_threads,
                    **user_env,
                    "RANK": str(rank),
                    "WORLD_SIZE": str(pool.num_workers),
                    "LOCAL_RANK": str(same_node.index(rank)),
                    "LOCAL_WORLD_SIZE": str(len(same_node)),
                    "MASTER_ADDR": master_addr,
                    "MASTER_PORT": str(master_port),
                }
                options = dict(
                    name=self.actor_name(rank),
                    num_cpus=pool.cpus_per_worker,
                    num_gpus=pool.gpus_per_worker,
                    resources=dict(pool.custom_resources) or None,
                    scheduling_strategy=pool.bundle(rank),
                    runtime_env={"env_vars": env},
                )
                self._options.append(options)
                self._workers.append(self._spawn(remote_cls, options, self._init_kwargs))
        except BaseException:
            self.shutdown(remove_pool=False)
            raise
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until every worker's constructor has returned (``ready_timeout_s`` at most);
        a constructor that raised kills the group and raises ``WorkerDiedError``."""
        try:
            self.get([w.__ray_ready__.remote() for w in self._workers], "__init__", timeout_s=self.ready_timeout_s)
        except BaseException:
            self.shutdown(remove_pool=False)
            raise

    def respawn(self, rank: int) -> None:
        """Replace rank ``rank``'s actor (typically dead) with a new one made like the first: same
        bundle, environment and constructor arguments. Waits until it is constructed. Only for
        roles whose ranks do not share a collective (e.g. rollout engines): the others would
        still be joined to the dead process."""
        try:
            ray.kill(self._workers[rank], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self._workers[rank] = self._spawn(self._remote_cls, self._options[rank], self._init_kwargs)
        self.get([self._workers[rank].__ray_ready__.remote()], "__init__", self.ready_timeout_s, ranks=[rank])

    # ------------------------------------------------------------------ set-up

    @staticmethod
    def _check_env_vars(env_vars: dict[str, str] | None) -> dict[str, str]:
        if env_vars is None:
            return {}
        if not isinstance(env_vars, dict):
            raise TypeError(f"env_vars must be a dict of strings, got {type(env_vars).__name__}")
        clash = sorted(k for k in env_vars if k in _RANK_ENV_KEYS)
        if clash:
            raise ValueError(f"env_vars must not set {clash}; WorkerGroup sets them for every rank")
        return {str(k): str(v) for k, v in env_vars.items()}

    def _master_endpoint(self) -> tuple[str, int]:
        """Rank 0's node IP and a port free there, for the torch.distributed rendezvous."""
        if not ray.util.client.ray.is_connected() and (
            self.pool.node_ids()[0] == ray.get_runtime_context().get_node_id()
        ):
            # Rank 0 lands on the driver's node: the driver can answer without a task.
            return Worker.get_node_ip(), Worker.get_free_port()
        # Otherwise ask a process on rank 0's bundle: the driver is on another node, or
        # outside the cluster altogether (Ray client).
        probe = _probe_endpoint.options(scheduling_strategy=self.pool.bundle(0))
        try:
            ip, port = ray.get(probe.remote(), timeout=120)
        except GetTimeoutError:
            raise WorkerTimeoutError(
                f"role {self.role!r}: no process started on rank 0's node within 120s to pick "
                "MASTER_ADDR/MASTER_PORT; check the cluster's health (`ray status`)",
                self.role, 0, "__init__",
            ) from None
        return str(ip), int(port)

    def _spawn(self, remote_cls: Any, options: dict, init_kwargs: dict) -> ray.actor.ActorHandle:
        deadline = time.monotonic() + _NAME_RELEASE_WAIT_S
        while True:
            try:
                return remote_cls.options(**options).remote(**init_kwargs)
            except ValueError as err:
                if "already taken" not in str(err) and "already exists" not in str(err):
                    raise
                if time.monotonic() > deadline:
                    raise ValueError(
                        f"a Ray actor named {options['name']!r} already exists: another WorkerGroup "
                        f"for role {self.role!r} is alive in this namespace; shut it down first or "
                        "use a different role name"
                    ) from None
                time.sleep(0.2)

    def actor_name(self, rank: int) -> str:
        return f"rlflow/{self.role}/{rank}"

    # ------------------------------------------------------------------ properties

    @property
    def world_size(self) -> int:
        return len(self._workers)

    @property
    def workers(self) -> list[ray.actor.ActorHandle]:
        """The actor handles, by rank."""
        return list(self._workers)

    def __len__(self) -> int:
        return len(self._workers)

    def __repr__(self) -> str:
        return f"WorkerGroup(role={self.role!r}, cls={self.worker_cls.__name__}, world_size={self.world_size})"

    # ------------------------------------------------------------------ calls

    def _method(self, method: str) -> str:
        if not isinstance(method, str) or method.startswith("_") or not callable(
            getattr(self.worker_cls, method, None)
        ):
            raise AttributeError(
                f"role {self.role!r} workers ({self.worker_cls.__name__}) have no public method {method!r}"
            )
        if not self._workers:
            raise RuntimeError(f"the worker group of role {self.role!r} is shut down")
        return method

    def get(
        self,
        refs: Sequence[ray.ObjectRef],
        method: str = "call",
        timeout_s: float | None = None,
        ranks: Sequence[int] | None = None,
    ) -> list[Any]:
        """``ray.get`` on per-rank refs (``refs[i]`` from rank ``i``, or from ``ranks[i]`` when
        given), with errors that name the role, rank and method. Fails on the first rank that
        fails, without waiting for ranks that may now hang on a collective with it.
        ``timeout_s`` None: the group default."""
        timeout_s = self.call_timeout_s if timeout_s is None else timeout_s
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        rank_of = {ref: (ranks[i] if ranks is not None else i) for i, ref in enumerate(refs)}
        position = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        remaining = list(refs)
        while remaining:
            wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, remaining = ray.wait(remaining, num_returns=1, timeout=wait_s)
            if not done:
                waiting = sorted(rank_of[r] for r in remaining)
                raise WorkerTimeoutError(
                    f"role {self.role!r} rank(s) {waiting} did not finish {method!r} within "
                    f"{timeout_s:g}s",
                    self.role, waiting[0], method,
                )
            for ref in done:
                rank = rank_of[ref]
                try:
                    results[position[ref]] = ray.get(ref)
                except RayActorError as err:
                    raise self._died(rank, method, err) from err
                except RayTaskError as err:
                    died = None
                    if _LOST_PEER.search(_summarise(err)):
                        died = self._peer_death([r for r in refs if r != ref], rank_of, method)
                    if died is not None:
                        raise died from err
                    raise WorkerCallError(
                        f"worker {self.actor_name(rank)} (role {self.role!r}, rank {rank}) raised in "
                        f"{method!r}: {_summarise(err)}",
                        self.role, rank, method,
                    ) from err
        return results

    def _died(self, rank: int, method: str, err: RayActorError) -> WorkerDiedError:
        when = "failed to start" if method == "__init__" else f"died during {method!r}"
        return WorkerDiedError(
            f"worker {self.actor_name(rank)} (role {self.role!r}, rank {rank}) {when}: {_summarise(err)}",
            self.role, rank, method,
        )

    def _peer_death(
        self, others: list[ray.ObjectRef], rank_of: dict, method: str
    ) -> WorkerDiedError | None:
        """The death of another rank of this call, if one shows within the grace period: a
        rank that raised because a peer of its collective died is a worker death (which the
        trainer recovers from), not an error of the call."""
        deadline = time.monotonic() + _PEER_DEATH_GRACE_S
        while others:
            done, others = ray.wait(others, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                return None
            try:
                ray.get(done[0])
            except RayActorError as err:
                return self._died(rank_of[done[0]], method, err)
            except RayTaskError:
                continue
        return None

    def call_all_async(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """Start ``method(*args, **kwargs)`` on every rank; returns the refs by rank."""
        name = self._method(method)
        return [getattr(w, name).remote(*args, **kwargs) for w in self._workers]

    def call_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """``method(*args, **kwargs)`` on every rank; returns the results by rank."""
        return self.get(self.call_all_async(method, *args, **kwargs), method)

    def call_rank_async(self, rank: int, method: str, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        """Start ``method(*args, **kwargs)`` on rank ``rank`` only; collect it with
        ``get([ref], method, ranks=[rank])`` so a failure names that rank."""
        name = self._method(method)
        return getattr(self._workers[rank], name).remote(*args, **kwargs)

    def call_rank0(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``method(*args, **kwargs)`` on rank 0 only; returns its result."""
        name = self._method(method)
        return self.get([getattr(self._workers[0], name).remote(*args, **kwargs)], method)[0]

    def call_sharded_async(
        self,
        method: str,
        batch: BatchedDataDict,
        pad_to_divisible: bool = True,
        pad_value_dict: Mapping[str, int | float] | None = None,
        **kwargs: Any,
    ) -> ShardedCall:
        """Split ``batch`` contiguously over the ranks and start ``method(shard, **kwargs)``.

        Rank ``r`` gets rows ``[r * s, (r + 1) * s)``. If the size is not divisible by the
        world size: with ``pad_to_divisible`` (default) the batch is first padded with
        copies of its last samples, so every rank gets the same number of rows (FSDP ranks
        must run the same number of forward passes) and ``result()`` drops the padded
        rows' outputs; without it the first ``size % world_size`` ranks get one extra row.
        Note that padded copies do run through the method: a training step on a padded
        batch sees the last samples twice. ``pad_value_dict`` is passed to
        ``BatchedDataDict.from_batches`` when gathering.
        """
        name = self._method(method)
        if not isinstance(batch, BatchedDataDict):
            raise TypeError(f"call_sharded needs a BatchedDataDict batch, got {type(batch).__name__}")
        size = batch.size
        if size == 0:
            raise ValueError(f"call_sharded({method!r}) got an empty batch for role {self.role!r}")
        world = self.world_size
        num_padded = (-size) % world if pad_to_divisible else 0
        rows = list(range(size)) + padding_indices(size, num_padded)
        bounds = shard_bounds(len(rows), world)
        # Each rank gets a slice, which pickles as its own rows only: no copy is made here
        # unless padding rows must be added.
        padded = batch.select_indices(rows) if num_padded else batch
        refs = [
            getattr(w, name).remote(padded.slice(start, end), **kwargs)
            for w, (start, end) in zip(self._workers, bounds)
        ]
        return ShardedCall(
            self, name, refs, [end - start for start, end in bounds], size, num_padded, pad_value_dict
        )

    def call_sharded(
        self,
        method: str,
        batch: BatchedDataDict,
        pad_to_divisible: bool = True,
        pad_value_dict: Mapping[str, int | float] | None = None,
        **kwargs: Any,
    ) -> BatchedDataDict:
        """``call_sharded_async(...).result()``: the outputs for ``batch`` in its original order."""
        return self.call_sharded_async(method, batch, pad_to_divisible, pad_value_dict, **kwargs).result()

    def call_sharded_metrics(
        self, method: str, batch: BatchedDataDict, pad_to_divisible: bool = True, **kwargs: Any
    ) -> list[Any]:
        """Shard like ``call_sharded`` but return each rank's result as is, by rank (e.g. a
        dict of metrics from a training step)."""
        return self.call_sharded_async(method, batch, pad_to_divisible, **kwargs).per_rank()

    def workers_info(self) -> list[dict[str, Any]]:
        """Per rank: rank, world size, local rank, node id, ip, pid, and the actor name."""
        infos = self.call_all("info")
        for rank, info in enumerate(infos):
            info["actor_name"] = self.actor_name(rank)
        return infos

    # ------------------------------------------------------------------ teardown

    def shutdown(self, remove_pool: bool = True) -> None:
        """Kill every worker (and by default release the pool's resources). Idempotent."""
        for worker in self._workers:
            try:
                ray.kill(worker, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead or Ray shut down: nothing to kill
                pass
        self._workers = []
        if remove_pool:
            self.pool.remove()

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


@ray.remote(num_cpus=0)
def _probe_endpoint() -> tuple[str, int]:
    """Run on rank 0's bundle: that node's IP and a free port there."""
    return Worker.get_node_ip(), Worker.get_free_port()
