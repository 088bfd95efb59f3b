"""Pieces of rlflow.distributed and the Worker base that need no Ray cluster."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from rlflow.distributed.ray_cluster import _probe_target, _with_worker_env, ensure_auth_mode
from rlflow.distributed.resource_pool import ResourcePool
from rlflow.data.batch_sizes import padding_indices, shard_bounds
from rlflow.errors import ClusterError
from rlflow.workers.base import Worker, _limit_torch_threads


# ---------------------------------------------------------------- sharding arithmetic


def test_padding_copies_last_samples():
    assert padding_indices(5, 1) == [4]
    assert padding_indices(5, 3) == [2, 3, 4]
    # more padding than samples: cycle through the batch
    assert padding_indices(2, 3) == [1, 0, 1]
    assert padding_indices(1, 3) == [0, 0, 0]


def test_shard_bounds_are_contiguous_and_cover_the_batch():
    assert shard_bounds(6, 2) == [(0, 3), (3, 6)]
    assert shard_bounds(5, 2) == [(0, 3), (3, 5)]
    assert shard_bounds(5, 4) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert shard_bounds(2, 3) == [(0, 1), (1, 2), (2, 2)]
    for size in range(1, 12):
        for shards in range(1, 5):
            bounds = shard_bounds(size, shards)
            lengths = [e - s for s, e in bounds]
            assert bounds[0][0] == 0 and bounds[-1][1] == size
            assert all(bounds[i][1] == bounds[i + 1][0] for i in range(shards - 1))
            assert max(lengths) - min(lengths) <= 1


# ---------------------------------------------------------------- cluster address / env


def test_probe_target_parses_addresses():
    assert _probe_target("10.0.0.1:6379") == ("10.0.0.1", 6379)
    assert _probe_target("ray://head.svc:10001") == ("head.svc", 10001)
    assert _probe_target("ray://head.svc") == ("head.svc", 10001)
    assert _probe_target("[::1]:6380") == ("::1", 6380)
    assert _probe_target("auto") is None
    with pytest.raises(ClusterError, match="cluster.address 'head' has no port"):
        _probe_target("head")
    with pytest.raises(ClusterError, match="non-numeric port 'abc'"):
        _probe_target("head:abc")


def test_auth_mode_defaults_to_disabled_and_keeps_user_choice(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert ensure_auth_mode() == "disabled"
    assert os.environ["RAY_AUTH_MODE"] == "disabled"
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert ensure_auth_mode() == "token"


def test_runtime_env_carries_auth_mode(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    user = {"env_vars": {"A": 1}, "working_dir": "/x"}
    env = _with_worker_env(user)
    assert env == {"env_vars": {"RAY_AUTH_MODE": "disabled", "A": "1"}, "working_dir": "/x"}
    assert user == {"env_vars": {"A": 1}, "working_dir": "/x"}  # the caller's dict is untouched
    assert _with_worker_env({"env_vars": {"RAY_AUTH_MODE": "token"}})["env_vars"] == {"RAY_AUTH_MODE": "token"}
    with pytest.raises(TypeError, match="runtime_env must be a dict"):
        _with_worker_env(["env_vars"])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_init_ray_fails_fast_on_unreachable_address(tmp_path):
    # A fresh process: this one may already have Ray initialised by other tests.
    address = f"127.0.0.1:{_closed_port()}"
    code = f"from rlflow.distributed.ray_cluster import init_ray; init_ray(address={address!r})"
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rlflow.errors.ClusterError: cannot reach a Ray cluster at " + repr(address))
    assert "cluster.address" in last
    assert elapsed < 60  # Ray's own retry loop would take minutes


# ---------------------------------------------------------------- resource pool validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_workers": 0}, "actor.num_workers must be a positive int"),
        ({"num_workers": 2, "cpus_per_worker": -1}, "actor.cpus_per_worker must be a non-negative number"),
        ({"num_workers": 2, "cpus_per_worker": 0.0}, "no resources; set actor.cpus_per_worker"),
        ({"num_workers": 2, "strategy": "TIGHT"}, "actor.strategy is 'TIGHT'"),
        ({"num_workers": 2, "custom_resources": {"GPU": 1}}, "use actor.gpus_per_worker"),
    ],
)
def test_resource_pool_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResourcePool("actor", **kwargs)


# ---------------------------------------------------------------- Worker outside Ray


def test_worker_reads_rank_from_env_and_args(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    monkeypatch.setenv("MASTER_PORT", "29500")
    w = Worker()
    assert (w.rank, w.world_size, w.local_rank, w.master_addr, w.master_port) == (1, 3, 1, "10.1.2.3", 29500)
    assert w.ping() == 1
    w = Worker(rank=2, world_size=4, master_port=1234)
    assert (w.rank, w.world_size, w.master_port) == (2, 4, 1234)
    info = w.info()
    assert info["rank"] == 2 and info["pid"] == os.getpid()


def test_worker_defaults_and_bad_values(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    w = Worker()
    assert (w.rank, w.world_size, w.master_addr, w.master_port) == (0, 1, None, None)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got 2"):
        Worker(rank=2, world_size=2)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="environment variable WORLD_SIZE='two' must be an integer"):
        Worker()
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="MASTER_ADDR / MASTER_PORT are not set"):
        Worker(rank=0, world_size=2).init_distributed()


def test_worker_limits_torch_threads_to_omp_once_per_process(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _limit_torch_threads.cache_clear()
    try:
        Worker()
        assert torch.get_num_threads() == 1
        # A role sets its own threads after; a second Worker in the same process (the
        # in-actor rollout) must not reset them to the CPU share.
        torch.set_num_threads(2)
        Worker()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_init_distributed_single_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert Worker().init_distributed() is False  # world_size 1: nothing to join
    assert not dist.is_initialized()
    w = Worker(master_addr="127.0.0.1", master_port=Worker.get_free_port())
    try:
        assert w.init_distributed(backend="gloo", timeout_s=30, force=True) is True
        t = torch.tensor([2.0, 5.0])
        dist.all_reduce(t)
        assert t.tolist() == [2.0, 5.0] and dist.get_world_size() == 1
        assert w.init_distributed() is True  # idempotent
    finally:
        w.destroy_distributed()
    assert not dist.is_initialized()


def test_node_helpers():
    port = Worker.get_free_port()
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind(("", port))  # it really was free
    ip = Worker.get_node_ip()
    assert socket.inet_aton(ip)
