"""``ray job submit`` and ``rlflow.jobs`` against a real Ray head with the Jobs API.

A job's driver starts in a temporary folder Ray creates for the job and deletes with the
session (``<ray temp>/session_*/runtime_resources/working_dir_files/...``). These tests check
that the run succeeds and that its outputs land in a durable folder: ``trainer.output_dir``
when given, ``$RLFLOW_OUTPUT_ROOT/<experiment>/<timestamp>`` otherwise, never Ray's folder.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
from pathlib import Path

import pytest

from loopback_ray import RAY_BIN, LoopbackCluster
from rlflow import jobs

# Each test here starts Ray clusters of its own (a head for job submission, or two nodes),
# which is what makes them long.
pytestmark = [pytest.mark.ray, pytest.mark.long]

JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def head():
    """A one-node cluster (2 CPUs, what the demo needs) with the dashboard on loopback."""
    cluster = LoopbackCluster(prefix="rlfjob-")
    try:
        cluster.start_head(num_cpus=2, resources={}, dashboard=True)
        cluster.wait_for_nodes(1)
        cluster.wait_for_dashboard()
        yield cluster
    finally:
        cluster.stop()
        leftover = [p.pid for p in cluster.processes()]
        cluster.cleanup()
        assert not leftover, f"Ray processes outlived the cluster: {leftover}"


@pytest.fixture
def working_dir(tmp_path) -> Path:
    folder = tmp_path / "job_src"
    folder.mkdir()
    (folder / "README.txt").write_text("uploaded with the job; becomes the driver's working directory\n")
    return folder


def metrics_steps(folder: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def files_in_ray_job_dirs(cluster: LoopbackCluster, name: str) -> list[Path]:
    return [p for p in cluster.temp_dir.glob(f"session_*/runtime_resources/**/{name}")]


def test_ray_job_submit_cli_writes_to_the_given_output_dir(head, working_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    out = tmp_path / "durable" / "cli-run"
    proc = subprocess.run(
        [RAY_BIN, "job", "submit", "--address", head.dashboard_url, "--working-dir", str(working_dir), "--",
         "python", "-m", "rlflow.main", "+recipe=grpo", "trainer.total_steps=2",
         "trainer.progress_bar=false", f"trainer.output_dir={out}"],
        env=head.env, cwd=tmp_path, capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    job_id = re.search(r"Job '(raysubmit_\w+)' submitted", log).group(1)
    assert jobs.job_status(head.dashboard_url, job_id) == "SUCCEEDED"
    assert "step 2" in log  # the driver's per-step line, streamed back by the CLI

    assert metrics_steps(out) == [1, 2]
    assert (out / "config.yaml").is_file()
    # The job did run inside Ray's temporary working dir, and left no outputs there.
    assert files_in_ray_job_dirs(head, "README.txt")
    assert not files_in_ray_job_dirs(head, "metrics.jsonl")


def test_submit_run_without_output_dir_lands_under_rlflow_output_root(
    head, working_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    root = tmp_path / "output_root"
    job_id = jobs.submit_run(
        head.dashboard_url, "grpo", ["trainer.total_steps=2", "trainer.experiment_name=job-default-dir"],
        working_dir=str(working_dir),
        runtime_env={"env_vars": {"RLFLOW_OUTPUT_ROOT": str(root)}},
    )
    assert job_id.startswith("raysubmit_")
    log = io.StringIO()
    status = jobs.follow_logs(head.dashboard_url, job_id, out=log)
    assert status == "SUCCEEDED", log.getvalue()[-4000:]
    assert "+recipe=grpo" in log.getvalue() and "step 2" in log.getvalue()

    runs = list((root / "job-default-dir").iterdir())
    assert len(runs) == 1 and re.fullmatch(r"\d{8}-\d{6}", runs[0].name), runs
    assert metrics_steps(runs[0]) == [1, 2]
    assert not files_in_ray_job_dirs(head, "metrics.jsonl")


def test_follow_logs_of_unknown_job_names_it(head, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(ValueError, match="raysubmit_doesnotexist"):
        jobs.follow_logs(head.dashboard_url, "raysubmit_doesnotexist")
