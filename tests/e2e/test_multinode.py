"""Roles pinned to nodes with Ray custom resources, on a real two-node Ray cluster.

Both nodes run on this machine (``ray start`` twice, joined through 127.0.0.1): the head
offers ``node_head``, the other node ``node_worker``. The run is the CLI as a user types it,
joining the cluster with ``cluster.address=127.0.0.1:<port>``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from loopback_ray import LoopbackCluster

# Each test here starts Ray clusters of its own (a head for job submission, or two nodes),
# which is what makes them long.
pytestmark = [pytest.mark.ray, pytest.mark.long]

ROLE_LINE = re.compile(r"\[rlflow\] role (\w+): (\d+) worker\(s\): (.*)")
NODE_ID = re.compile(r"node ([0-9a-f]+)")
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def two_nodes():
    """``(cluster, {"node_head": node_id, "node_worker": node_id})``; stopped afterwards."""
    cluster = LoopbackCluster()
    try:
        cluster.start_head(num_cpus=2, resources={"node_head": 100})
        cluster.add_node(num_cpus=2, resources={"node_worker": 100})
        nodes = cluster.wait_for_nodes(2)
        ids = {k: n["node_id"] for n in nodes for k in ("node_head", "node_worker") if k in n["resources"]}
        assert set(ids) == {"node_head", "node_worker"} and ids["node_head"] != ids["node_worker"], nodes
        yield cluster, ids
    finally:
        cluster.stop()
        leftover = [p.pid for p in cluster.processes()]
        cluster.cleanup()
        assert not leftover, f"Ray processes outlived the cluster: {leftover}"


def run_cli(cluster: LoopbackCluster, args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlflow.main", "+recipe=grpo", f"cluster.address={cluster.address}", *args],
        env=cluster.env, cwd=cwd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )


def role_nodes(output: str) -> dict[str, list[str]]:
    """``{role: [node id prefix of each worker]}`` from the trainer's ``[rlflow] role`` lines."""
    roles = {}
    for line in output.splitlines():
        match = ROLE_LINE.search(line)
        if match:
            roles[match.group(1)] = NODE_ID.findall(match.group(3))
            assert len(roles[match.group(1)]) == int(match.group(2)), line
    return roles


def test_roles_run_on_the_nodes_their_custom_resources_pin(two_nodes, tmp_path):
    cluster, ids = two_nodes
    out = tmp_path / "run"
    proc = run_cli(cluster, [
        "trainer.total_steps=3", "trainer.progress_bar=false", f"trainer.output_dir={out}",
        "actor.num_workers=2", "actor.torch_threads=1", "actor.custom_resources={node_head:1}",
        "ref.in_actor=false", "ref.custom_resources={node_head:1}",
        "rollout.custom_resources={node_worker:1}", "reward.num_workers=1", "reward.custom_resources={node_worker:1}",
    ], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    roles = role_nodes(proc.stdout + proc.stderr)
    head, worker = ids["node_head"][:8], ids["node_worker"][:8]
    assert roles == {"actor": [head, head], "ref": [head], "rollout": [worker], "reward": [worker]}

    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_pinning_to_a_resource_no_node_offers_fails_fast(two_nodes, tmp_path):
    cluster, _ = two_nodes
    proc = run_cli(cluster, [
        "trainer.total_steps=1", "trainer.progress_bar=false", f"trainer.output_dir={tmp_path / 'run'}",
        "rollout.custom_resources={node_tpu:1}",
    ], cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rlflow: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "rollout" in errors[0] and "node_tpu" in errors[0]
