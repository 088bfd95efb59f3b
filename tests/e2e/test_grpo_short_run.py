"""A short GRPO run through real Ray actor groups, and the README's Python snippet."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import rlflow

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]


def test_grpo_three_steps_through_ray(ray_cluster, tmp_path):
    out = tmp_path / "run"
    cfg = rlflow.compose_config(
        "grpo",
        overrides=[f"trainer.output_dir={out}", "trainer.total_steps=3", "trainer.progress_bar=false"],
    )
    trainer = rlflow.build_trainer(cfg)
    try:
        roles = {role: len(wg.workers_info()) for role, wg in trainer.groups.items()}
        # the reference policy is a frozen copy inside the actor's workers (ref.in_actor)
        assert roles == {"actor": 2, "rollout": 1}
        actor_pids = {w["pid"] for w in trainer.groups["actor"].workers_info()}
        assert len(actor_pids) == 2, "the two actor ranks must be separate processes"
        first = trainer.step()
        assert first["step"] == 1 and first["weight_version"] == 1
        history = trainer.fit()
    finally:
        trainer.close()

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert history == rows
    required = [
        "reward/mean", "actor/pg_loss", "actor/entropy", "actor/kl", "response_length/mean",
        "throughput/tokens_per_s", "timing/gen_s", "timing/reward_s", "timing/ref_s",
        "timing/adv_s", "timing/update_actor_s", "timing/sync_weights_s", "timing/step_s",
    ]
    for row in rows:
        for key in required:
            assert key in row and row[key] is not None, key
        assert 0.0 <= row["reward/mean"] <= 1.0
        assert 1.0 <= row["response_length/mean"] <= cfg.data.max_response_length
        # 32 prompts x 8 samples = 256 responses per step, every one scored.
        assert row["actor/entropy"] > 0
    assert (out / "config.yaml").is_file()


def test_readme_python_snippet_runs(ray_cluster, tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text()
    section = readme.split("## The same run from Python", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert len(namespace["history"]) == 3
    assert Path(trainer.output_dir, "metrics.jsonl").is_file()
    assert str(tmp_path) in trainer.output_dir
