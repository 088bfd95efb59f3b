"""WorkerGroup, ResourcePool and Worker on a real local Ray cluster (2 CPUs)."""

from __future__ import annotations

import os
import sys
import time

import pytest
import ray
import torch
import torch.distributed as dist

from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.distributed.ray_cluster import init_ray
from rlflow.distributed.resource_pool import ResourcePool
from rlflow.distributed import worker_group
from rlflow.distributed.worker_group import (
    WorkerCallError,
    WorkerDiedError,
    WorkerGroup,
    _probe_endpoint,
)
from rlflow.errors import ClusterError
from rlflow.workers.base import Worker

pytestmark = pytest.mark.ray
# Ray workers cannot import this test module by name; ship its classes by value instead.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class EchoWorker(Worker):
    """Transforms samples in a way that reveals which rank saw which rows."""

    def __init__(self, scale: float = 2.0) -> None:
        super().__init__()
        if not isinstance(scale, float):
            raise ValueError(f"scale must be a float, got {scale!r}")
        self.scale = scale

    def all_reduce_sum(self) -> list[float]:
        self.init_distributed(timeout_s=60)
        t = torch.tensor([self.rank + 1.0, 10.0 * (self.rank + 1)])
        dist.all_reduce(t)
        return t.tolist()

    def backend(self) -> str:
        return dist.get_backend()

    def env(self) -> dict:
        keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS",
                "RAY_AUTH_MODE", "HOME", "RLFLOW_TEST_FLAG"]
        return {**{k: os.environ.get(k) for k in keys}, "torch_threads": torch.get_num_threads()}

    def transform(self, batch: BatchedDataDict) -> BatchedDataDict:
        n = batch.size
        return BatchedDataDict({
            "doubled": batch["x"] * self.scale,
            "rank": torch.full((n,), self.rank),
            "shard_size": torch.full((n,), n),
            # rows in the storage that arrived: a view of the whole batch would show more
            "storage_rows": torch.full((n,), batch["x"].untyped_storage().nbytes() // batch["x"].element_size()),
            "tag": [f"{t}@{self.rank}" for t in batch["tag"]],
        })

    def expand(self, batch: BatchedDataDict, k: int) -> BatchedDataDict:
        # k outputs per input, adjacent (like n samples per prompt).
        out = batch.repeat_interleave(k)
        return BatchedDataDict({"x": out["x"], "sub": torch.arange(k).repeat(batch.size)})

    def shard_stats(self, batch: BatchedDataDict) -> dict:
        return {"rank": self.rank, "n": batch.size, "sum": float(batch["x"].sum())}

    def exit_if_rank(self, rank: int) -> int:
        if self.rank == rank:
            os._exit(3)
        return self.rank

    def fail(self) -> None:
        raise KeyError("no such sample")

    def fail_while_peer_waits(self) -> None:
        """Rank 0 raises an error of its own; rank 1 waits, as in a collective rank 0 left."""
        if self.rank == 1:
            time.sleep(120)
        raise KeyError("no such sample")

    def lose_peer(self) -> None:
        """Rank 1 dies a moment later; rank 0 raises at once, as a collective does when its
        peer's connection closes."""
        if self.rank == 1:
            time.sleep(0.5)
            os._exit(3)
        raise RuntimeError("Connection closed by peer")


@pytest.fixture(scope="module")
def group(ray_cluster):
    pool = ResourcePool("echo", num_workers=2, cpus_per_worker=0.5)
    wg = WorkerGroup(
        EchoWorker, "echo", pool, init_kwargs={"scale": 2.0}, env_vars={"RLFLOW_TEST_FLAG": "on"}
    )
    yield wg
    wg.shutdown()


def _batch(n: int) -> BatchedDataDict:
    return BatchedDataDict({"x": torch.arange(n, dtype=torch.float32) + 1.0, "tag": [f"s{i}" for i in range(n)]})


def test_ranks_environment_and_thread_limits(group):
    infos = group.workers_info()
    assert [i["rank"] for i in infos] == [0, 1]
    assert [i["world_size"] for i in infos] == [2, 2]
    assert [i["actor_name"] for i in infos] == ["rlflow/echo/0", "rlflow/echo/1"]
    assert len({i["pid"] for i in infos}) == 2 and os.getpid() not in {i["pid"] for i in infos}
    assert infos[0]["node_id"] == ray.get_runtime_context().get_node_id()

    envs = group.call_all("env")
    assert [e["RANK"] for e in envs] == ["0", "1"]
    assert [e["WORLD_SIZE"] for e in envs] == ["2", "2"]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1"]  # both on the single node
    assert envs[0]["MASTER_ADDR"] == envs[1]["MASTER_ADDR"] == infos[0]["ip"]
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"] and int(envs[0]["MASTER_PORT"]) > 0
    # 0.5 CPU per worker -> one thread each, so two workers cannot oversubscribe two cores.
    assert [e["OMP_NUM_THREADS"] for e in envs] == ["1", "1"]
    assert [e["torch_threads"] for e in envs] == [1, 1]
    assert [e["RAY_AUTH_MODE"] for e in envs] == ["disabled", "disabled"]
    assert [e["RLFLOW_TEST_FLAG"] for e in envs] == ["on", "on"]
    # Explicit auth mode: ray.init wrote no token into Ray's (private) HOME.
    assert not os.path.exists(os.path.join(envs[0]["HOME"], ".ray", "auth_token"))

    assert group.call_rank0("ping") == 0
    assert ray.get(group.call_all_async("ping")) == [0, 1]


def test_rendezvous_probe_reports_rank0_node(group):
    # The path taken when rank 0 is not on the driver's node (multi-node, Ray client).
    ip, port = ray.get(_probe_endpoint.options(scheduling_strategy=group.pool.bundle(0)).remote())
    assert ip == group.workers_info()[0]["ip"]
    assert isinstance(port, int) and 0 < port < 65536


def test_group_rejects_env_vars_it_owns(ray_cluster):
    pool = ResourcePool("envcheck", num_workers=1, cpus_per_worker=0.25)
    try:
        with pytest.raises(ValueError, match=r"env_vars must not set \['MASTER_PORT', 'RANK'\]"):
            WorkerGroup(EchoWorker, "envcheck", pool, env_vars={"RANK": "3", "MASTER_PORT": "1"})
    finally:
        pool.remove()


def test_gloo_all_reduce(group):
    results = group.call_all("all_reduce_sum")
    expected = [sum(r + 1.0 for r in range(2)), sum(10.0 * (r + 1) for r in range(2))]  # [3, 30]
    assert results == [expected, expected]
    assert group.call_all("backend") == ["gloo", "gloo"]


def test_call_sharded_pads_uneven_batch_and_keeps_order(group):
    batch = _batch(5)
    out = group.call_sharded("transform", batch)
    assert out.size == 5
    torch.testing.assert_close(out["doubled"], batch["x"] * 2.0)
    # contiguous shards [0, 1, 2] and [3, 4] + a copy of sample 4 (dropped again)
    assert out["rank"].tolist() == [0, 0, 0, 1, 1]
    assert out["shard_size"].tolist() == [3, 3, 3, 3, 3]
    assert out["storage_rows"].tolist() == [3, 3, 3, 3, 3]
    assert out["tag"] == ["s0@0", "s1@0", "s2@0", "s3@1", "s4@1"]


def test_call_sharded_without_padding_gives_uneven_shards(group):
    batch = _batch(5)
    out = group.call_sharded("transform", batch, pad_to_divisible=False)
    assert out["rank"].tolist() == [0, 0, 0, 1, 1]
    assert out["shard_size"].tolist() == [3, 3, 3, 2, 2]
    assert out["tag"] == ["s0@0", "s1@0", "s2@0", "s3@1", "s4@1"]


def test_call_sharded_drops_padding_of_multi_row_outputs(group):
    batch = _batch(3)  # shards [1, 2] and [3, 3(copy)]
    out = group.call_sharded("expand", batch, k=2)
    assert out["x"].tolist() == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    assert out["sub"].tolist() == [0, 1, 0, 1, 0, 1]


def test_call_sharded_metrics_and_async(group):
    batch = _batch(5)
    stats = group.call_sharded_metrics("shard_stats", batch)
    # rank 1 holds samples 4, 5 and the padded copy of 5
    assert stats == [{"rank": 0, "n": 3, "sum": 1.0 + 2.0 + 3.0}, {"rank": 1, "n": 3, "sum": 4.0 + 5.0 + 5.0}]

    pending = group.call_sharded_async("transform", batch)
    assert len(pending.refs) == 2 and all(isinstance(r, ray.ObjectRef) for r in pending.refs)
    torch.testing.assert_close(pending.result()["doubled"], batch["x"] * 2.0)


def test_errors_name_role_rank_and_method(group):
    # Both ranks raise; whichever answers first is reported.
    with pytest.raises(WorkerCallError, match=r"role 'echo', rank [01]\) raised in 'fail': KeyError") as info:
        group.call_all("fail")
    assert (info.value.role, info.value.method) == ("echo", "fail") and info.value.rank in (0, 1)
    assert isinstance(info.value.__cause__, ray.exceptions.RayTaskError)
    with pytest.raises(AttributeError, match="role 'echo' workers \\(EchoWorker\\) have no public method 'nope'"):
        group.call_all("nope")
    with pytest.raises(TypeError, match="returned a dict, not a batch|not a batch"):
        group.call_sharded("shard_stats", _batch(2))


def test_init_ray_reuses_running_cluster(ray_cluster):
    assert init_ray(num_cpus=1) == ray.cluster_resources()
    assert ray.cluster_resources()["CPU"] == 2.0


def test_pool_larger_than_cluster_fails_fast(ray_cluster):
    pool = ResourcePool("actor", num_workers=3, cpus_per_worker=1.0)
    with pytest.raises(
        ClusterError,
        match=r"role 'actor' asks for 3 workers x 1 CPU but the cluster has 2 CPU: lower actor.num_workers",
    ):
        pool.ready(timeout_s=5)
    with pytest.raises(ClusterError, match="removed"):
        pool.bundle(0)


def test_pool_that_cannot_get_free_resources_times_out(ray_cluster):
    free = ray.available_resources().get("CPU", 0.0)
    hog = ResourcePool("hog", num_workers=1, cpus_per_worker=free).ready(timeout_s=30)
    try:
        late = ResourcePool("late", num_workers=1, cpus_per_worker=0.5)
        with pytest.raises(ClusterError, match=r"role 'late' could not reserve 1 workers x 0.5 CPU within 1s"):
            late.ready(timeout_s=1)
    finally:
        hog.remove()


def test_dead_worker_surfaces_with_role_and_rank(ray_cluster):
    pool = ResourcePool("doomed", num_workers=2, cpus_per_worker=0.25)
    with WorkerGroup(EchoWorker, "doomed", pool) as wg:
        with pytest.raises(WorkerDiedError, match=r"rlflow/doomed/1 \(role 'doomed', rank 1\) died during 'exit_if_rank'"):
            wg.call_all("exit_if_rank", 1)
        with pytest.raises(WorkerDiedError, match="role 'doomed', rank 1"):
            wg.call_all("ping")


def test_rank_that_raised_because_its_peer_died_reports_the_death(ray_cluster):
    pool = ResourcePool("orphan", num_workers=2, cpus_per_worker=0.25)
    with WorkerGroup(EchoWorker, "orphan", pool) as wg:
        # Rank 0's error arrives first; the death of rank 1 is what the trainer must see.
        with pytest.raises(WorkerDiedError, match=r"rlflow/orphan/1 \(role 'orphan', rank 1\) died during 'lose_peer'"):
            wg.call_all("lose_peer")


def test_an_error_of_the_call_itself_is_reported_without_waiting_for_the_peers(ray_cluster, monkeypatch):
    # Only transport errors wait for a peer's death to show; with a grace far longer than the
    # test, a KeyError that waited for it could not arrive in time.
    monkeypatch.setattr(worker_group, "_PEER_DEATH_GRACE_S", 600.0)
    pool = ResourcePool("stuck", num_workers=2, cpus_per_worker=0.25)
    with WorkerGroup(EchoWorker, "stuck", pool) as wg:
        start = time.monotonic()
        with pytest.raises(WorkerCallError, match=r"rank 0\) raised in 'fail_while_peer_waits': KeyError"):
            wg.call_all("fail_while_peer_waits")
        assert time.monotonic() - start < 60, "the error waited for the sleeping peer"


def test_constructor_failure_names_role_and_cause(ray_cluster):
    pool = ResourcePool("broken", num_workers=1, cpus_per_worker=0.25)
    try:
        with pytest.raises(
            WorkerDiedError,
            match=r"rlflow/broken/0 \(role 'broken', rank 0\) failed to start: its constructor raised "
            r"ValueError: scale must be a float",
        ):
            WorkerGroup(EchoWorker, "broken", pool, init_kwargs={"scale": "two"})
    finally:
        pool.remove()
