"""The DPO data engine on the demo model: stage skipping, rerunning one stage, and resuming
after being killed during scoring."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from rlflow.config.compose import compose_config
from rlflow.data_engine.config import DataEngineRunConfig
from rlflow.data_engine.engine import DataEngine

SLOW_SCORER = """
import time
def score(data_source, solution_str, ground_truth, extra_info=None):
    time.sleep({delay})
    return 1.0 if solution_str.strip().startswith(str(ground_truth)) else float(len(solution_str) % 3) / 10
"""

BASE = ["engine.max_prompts=48", "engine.shard_size=12", "engine.num_samples=4", "engine.progress_bar=false",
        "engine.pairing.strategy=margin", "engine.pairing.max_pairs_per_prompt=2", "engine.test_fraction=0.25"]


def engine_cfg(work, *extra):
    return compose_config("arithmetic", [f"engine.work_dir={work}", *BASE, *extra],
                          schema=DataEngineRunConfig, recipe_subdir="data_engine")


def shard_stamps(work, stage):
    folder = os.path.join(work, stage)
    return {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in sorted(os.listdir(folder)) if n.endswith(".parquet")}


def read_pairs(work):
    rows = []
    for split in ("train", "test"):
        path = os.path.join(work, "output", f"{split}.parquet")
        if os.path.isfile(path):
            rows += pq.read_table(path).to_pylist()
    return sorted((r["extra_info"]["prompt_index"], r["chosen"], r["rejected"]) for r in rows)


@pytest.mark.ray
def test_stages_skip_when_finished_and_one_stage_reruns(ray_cluster, tmp_path):
    work = str(tmp_path / "work")
    summary = DataEngine(engine_cfg(work)).run()
    assert summary["prompts"] == 48 and summary["samples"] == 192
    assert summary["pairs"] == len(read_pairs(work)) > 0
    assert sum(summary["no_pair_reasons"].values()) + summary["prompts_with_pairs"] == 48
    samples_before = shard_stamps(work, "sample")
    scores_before = shard_stamps(work, "score")
    assert len(samples_before) == 4

    # Everything finished: a second run recomputes nothing.
    DataEngine(engine_cfg(work)).run()
    assert shard_stamps(work, "sample") == samples_before
    assert shard_stamps(work, "score") == scores_before

    # Changing the scorer without asking for a rerun is refused, naming the fix.
    scorer = tmp_path / "scorer.py"
    scorer.write_text(SLOW_SCORER.format(delay=0))
    custom = [f"reward.custom_fn.path={scorer}", "reward.custom_fn.name=score"]
    with pytest.raises(ValueError, match=r"engine.rerun=\[score\]"):
        DataEngine(engine_cfg(work, *custom)).run()

    # Rerunning only scoring keeps the samples and recomputes scores, pairs and output.
    DataEngine(engine_cfg(work, *custom, "engine.rerun=[score]")).run()
    assert shard_stamps(work, "sample") == samples_before
    assert set(shard_stamps(work, "score")) == set(scores_before)
    assert all(shard_stamps(work, "score")[n] != scores_before[n] for n in scores_before)


def run_engine_cli(work, scorer, tmp_path, **popen):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HOME=str(tmp_path))
    env.pop("RAY_ADDRESS", None)
    args = [sys.executable, "-m", "rlflow.data_engine", "+recipe=arithmetic", f"engine.work_dir={work}", *BASE,
            f"reward.custom_fn.path={scorer}", "reward.custom_fn.name=score", "cluster.num_cpus=2"]
    return subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **popen)


@pytest.mark.long
def test_killed_during_scoring_resumes_without_recomputing(tmp_path):
    scorer = tmp_path / "slow_scorer.py"
    # 48 samples per shard x 0.05 s: each scoring shard takes a few seconds.
    scorer.write_text(SLOW_SCORER.format(delay=0.05))
    work = str(tmp_path / "killed")
    proc = run_engine_cli(work, scorer, tmp_path)
    score_dir = os.path.join(work, "score")
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if os.path.isdir(score_dir) and 1 <= len([n for n in os.listdir(score_dir) if n.endswith(".parquet")]) < 4:
                break
            assert proc.poll() is None, f"engine ended before it could be killed: {proc.stderr.read()}"
            time.sleep(0.1)
        else:
            pytest.fail("scoring never started")
    finally:
        # The whole process group: the driver and the Ray processes it started.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finished = shard_stamps(work, "score")
    assert 1 <= len(finished) < 4
    assert not os.path.exists(os.path.join(work, "score", "_DONE.json"))

    resumed = run_engine_cli(work, scorer, tmp_path)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    after = shard_stamps(work, "score")
    assert len(after) == 4
    assert all(after[name] == stamp for name, stamp in finished.items()), "finished shards were recomputed"

    fresh = str(tmp_path / "uninterrupted")
    clean = run_engine_cli(fresh, scorer, tmp_path)
    _, err = clean.communicate(timeout=300)
    assert clean.returncode == 0, err
    assert read_pairs(work) == read_pairs(fresh) != []
