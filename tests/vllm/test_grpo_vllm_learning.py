"""End to end: the GRPO demo learns with rollout.backend=vllm as it does with the HF backend.

The demo recipe and data as they are, on the demo-sized model with 2 attention heads of 32
(vLLM's CPU attention has no kernel for the demo model's head size 16). Takes a few minutes.
"""

from __future__ import annotations

import json

import pytest

import rlflow

pytestmark = [pytest.mark.ray, pytest.mark.long]

STEPS = 160


def test_grpo_demo_learns_with_vllm_rollouts(ray_cluster, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cfg = rlflow.compose_config("grpo", overrides=[
        f"model.path={tiny_model_dir}",
        "rollout.backend=vllm",
        f"trainer.total_steps={STEPS}",
        f"trainer.output_dir={out}",
        "trainer.progress_bar=false",
        # Score every batch with the actor too, so the engine / actor log-prob gap is logged.
        "actor.recompute_old_log_prob=always",
    ])
    trainer = rlflow.build_trainer(cfg)
    try:
        history = trainer.fit()
        # The rollouts came from the vLLM engine, which took every weight sync.
        assert trainer.groups["rollout"].call_all("engine_weight_version") == [str(STEPS)]
    finally:
        trainer.close()

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert history == rows
    first = sum(r["reward/mean"] for r in rows[:10]) / 10
    last = sum(r["reward/mean"] for r in rows[-10:]) / 10
    assert first <= 0.15, f"reward/mean over the first 10 steps is {first:.3f}: the task is too easy to show learning"
    assert last >= 0.5, f"reward/mean over the last 10 steps is {last:.3f}: no learning (first 10: {first:.3f})"
    # Every step synced the weights, and every rollout ran on the weights of the step before.
    assert [r["weight_version"] for r in rows] == list(range(1, STEPS + 1))
