"""Base class of every role worker (rollout, actor, ref, critic, reward).

A ``Worker`` is a plain Python class; ``WorkerGroup`` turns it into Ray actors, one per
rank, and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` in each actor's environment. Workers own no loop: subclasses add role
methods (``generate(batch)``, ``compute_log_prob(batch)``, ``update_policy(batch)``, ...)
that the driver calls through the group.

The class also works outside Ray (rank 0 of 1 unless the environment says otherwise), so a
role can be unit-tested by constructing it directly.
"""

from __future__ import annotations

import datetime
import functools
import os
import socket
from typing import Any

import torch
import torch.distributed as dist


def _int_setting(name: str, value: int | None, env_key: str, default: int | None) -> int | None:
    """``value`` if given, else the ``env_key`` environment variable, else ``default``."""
    if value is None:
        raw = os.environ.get(env_key)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"environment variable {env_key}={raw!r} must be an integer") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


@functools.cache
def _limit_torch_threads() -> None:
    # Ray (and WorkerGroup) size OMP_NUM_THREADS to the worker's CPU share; torch reads it
    # only at import in some builds, so apply it explicitly to keep small workers from each
    # spinning one thread per core. Once per process: a role's own torch_threads, set after
    # it, must survive a second Worker built in the same process (the in-actor rollout).
    raw = os.environ.get("OMP_NUM_THREADS")
    if raw and raw.isdigit() and int(raw) > 0 and torch.get_num_threads() != int(raw):
        torch.set_num_threads(int(raw))


class Worker:
    """Rank bookkeeping and process-group setup shared by all role workers.

    Args (each falls back to its environment variable, then to the default):
        rank: ``RANK``, default 0.
        world_size: ``WORLD_SIZE``, default 1.
        local_rank: ``LOCAL_RANK`` (rank among this node's workers), default 0.
        master_addr: ``MASTER_ADDR``, rank 0's address for the rendezvous; default None.
        master_port: ``MASTER_PORT``; default None.
    """

    def __init__(
        self,
        rank: int | None = None,
        world_size: int | None = None,
        local_rank: int | None = None,
        master_addr: str | None = None,
        master_port: int | None = None,
    ) -> None:
        world = _int_setting("world_size", world_size, "WORLD_SIZE", 1)
        own = _int_setting("rank", rank, "RANK", 0)
        local = _int_setting("local_rank", local_rank, "LOCAL_RANK", 0)
        if world < 1:
            raise ValueError(f"world_size must be >= 1, got {world}")
        if not 0 <= own < world:
            raise ValueError(f"rank must be in [0, world_size={world}), got {own}")
        if local < 0:
            raise ValueError(f"local_rank must be >= 0, got {local}")
        self._rank = own
        self._world_size = world
        self._local_rank = local
        self._master_addr = master_addr if master_addr is not None else os.environ.get("MASTER_ADDR") or None
        self._master_port = _int_setting("master_port", master_port, "MASTER_PORT", None)
        _limit_torch_threads()

    # ------------------------------------------------------------------ identity

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def local_rank(self) -> int:
        return self._local_rank

    @property
    def master_addr(self) -> str | None:
        return self._master_addr

    @property
    def master_port(self) -> int | None:
        return self._master_port

    @staticmethod
    def get_node_ip() -> str:
        """This node's IP as Ray sees it (falls back to the address of the default route)."""
        try:
            import ray

            return ray.util.get_node_ip_address()
        except Exception:  # noqa: BLE001 - any failure: use the socket trick below
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:
                    s.connect(("10.255.255.255", 1))  # no packet is sent for UDP connect
                    return s.getsockname()[0]
                except OSError:
                    return "127.0.0.1"

    @staticmethod
    def get_free_port() -> int:
        """A TCP port that is free on this node right now (the OS picks it)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return int(s.getsockname()[1])

    def node_id(self) -> str | None:
        """Ray node id (hex) of this process, or None outside Ray."""
        import ray

        if not ray.is_initialized():
            return None
        return ray.get_runtime_context().get_node_id()

    def ping(self) -> int:
        """Liveness check; returns this worker's rank."""
        return self._rank

    def info(self) -> dict[str, Any]:
        """Where this worker runs: rank, world size, local rank, node id, ip, pid."""
        return {
            "rank": self._rank,
            "world_size": self._world_size,
            "local_rank": self._local_rank,
            "node_id": self.node_id(),
            "ip": self.get_node_ip(),
            "pid": os.getpid(),
        }

    # ------------------------------------------------------------------ process group

    def cuda_device_index(self) -> int:
        """CUDA device this worker should use: Ray usually exposes only the assigned GPU
        (index 0); with several visible GPUs, pick by local rank."""
        count = torch.cuda.device_count()
        return 0 if count <= 1 else self._local_rank % count

    def init_distributed(
        self, backend: str | None = None, timeout_s: float = 600.0, force: bool = False
    ) -> bool:
        """Join the default ``torch.distributed`` process group of this worker group.

        ``backend`` None picks ``nccl`` when CUDA is available (and selects this worker's
        device first) and ``gloo`` otherwise. With ``world_size == 1`` this is a no-op unless
        ``force``. Collectives that wait longer than ``timeout_s`` fail instead of hanging.
        Returns True when a process group is initialised afterwards. Idempotent.
        """
        if dist.is_initialized():
            return True
        if self._world_size == 1 and not force:
            return False
        if not dist.is_available():
            raise RuntimeError("torch.distributed is not available in this torch build")
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend not in ("gloo", "nccl", "cpu:gloo,cuda:nccl"):
            raise ValueError(f"backend must be 'gloo', 'nccl' or None (auto), got {backend!r}")
        if "nccl" in backend:
            if not torch.cuda.is_available():
                raise ValueError("backend 'nccl' needs CUDA, which this worker does not see; use 'gloo'")
            torch.cuda.set_device(self.cuda_device_index())
        if self._master_addr is None or self._master_port is None:
            raise ValueError(
                "MASTER_ADDR / MASTER_PORT are not set: start the worker through WorkerGroup "
                "or pass master_addr and master_port to Worker.__init__"
            )
        host = self._master_addr
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # IPv6 literal in a URL
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{host}:{self._master_port}",
            rank=self._rank,
            world_size=self._world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        return True

    def destroy_distributed(self) -> None:
        """Leave the default process group if this worker joined one. Idempotent."""
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    # ----------------------------------------------------------------- checkpoints
    # For workers that train a model: they keep it in ``self.model`` with ``self.optimizer``,
    # ``self.lr_scheduler`` and ``self.global_step`` (the actor and the critic).

    def save_checkpoint(self, folder: str) -> None:
        """Write this rank's part of the worker's state; every rank must call it."""
        from rlflow.workers.checkpointing import save_worker_state

        save_worker_state(
            folder, self.rank, self.model, getattr(self, "optimizer", None),
            getattr(self, "lr_scheduler", None), {"global_step": int(getattr(self, "global_step", 0))},
        )

    def load_checkpoint(self, folder: str) -> int:
        """Restore what ``save_checkpoint`` wrote; returns the worker's step counter."""
        from rlflow.workers.checkpointing import load_worker_state

        extra = load_worker_state(
            folder, self.rank, self.model, getattr(self, "optimizer", None), getattr(self, "lr_scheduler", None)
        )
        self.global_step = int(extra.get("global_step", 0))
        return self.global_step
