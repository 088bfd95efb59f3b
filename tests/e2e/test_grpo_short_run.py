"""A short GRPO run through real Ray actor groups, and the README's Python snippet."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import rlflow

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("overrides, roles, placement", [
    # the recipe: one actor worker samples with the model it trains and holds the frozen
    # reference (ref.in_actor)
    ([], {"actor": 1}, "in_actor"),
    # two FSDP ranks cannot sample in the actor: placement auto gives a rollout worker
    (["actor.num_workers=2", "actor.torch_threads=1"], {"actor": 2, "rollout": 1}, "split"),
])
def test_grpo_three_steps_through_ray(ray_cluster, tmp_path, overrides, roles, placement):
    out = tmp_path / "run"
    cfg = rlflow.compose_config(
        "grpo",
        overrides=[f"trainer.output_dir={out}", "trainer.total_steps=3", "trainer.progress_bar=false", *overrides],
    )
    trainer = rlflow.build_trainer(cfg)
    try:
        assert {role: len(wg.workers_info()) for role, wg in trainer.groups.items()} == roles
        actor_pids = {w["pid"] for w in trainer.groups["actor"].workers_info()}
        assert len(actor_pids) == roles["actor"], "each actor rank is its own process"
        first = trainer.step()
        assert first["step"] == 1 and first["weight_version"] == 1
        history = trainer.fit()
    finally:
        trainer.close()
    assert cfg.rollout.placement == "auto", "the caller's config keeps what it asked for"
    assert f"placement: {placement}" in (out / "config.yaml").read_text()

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
