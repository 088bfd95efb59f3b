"""Multi-turn tool use on the vLLM backend: the calculator demo learns, and the actor scores
the episodes' tokens as the engine sampled them (token in, token out).

A trajectory re-tokenized from text would hand the actor different tokens than the engine
sampled, and the engine / actor log-prob gap on the model's tokens would be large; here it
stays at the HF-vs-vLLM numerical level.
"""

from __future__ import annotations

from statistics import mean

import pytest

import rlflow

pytestmark = [pytest.mark.ray, pytest.mark.long]

STEPS = 30


def test_calculator_tool_use_learns_with_vllm_rollouts(ray_cluster, tmp_path):
    cfg = rlflow.compose_config("grpo_calculator", overrides=[
        "rollout.backend=vllm",
        f"trainer.total_steps={STEPS}",
        f"trainer.output_dir={tmp_path}",
        "trainer.progress_bar=false",
        "actor.recompute_old_log_prob=always",
    ])
    trainer = rlflow.build_trainer(cfg)
    try:
        history = trainer.fit()
    finally:
        trainer.close()
    success = [row["agent/success"] for row in history]
    calls = [row["agent/tool_calls"] for row in history]
    assert mean(success[:5]) <= 0.8 and mean(success[-10:]) >= 0.9, success
    assert mean(calls[-10:]) >= 0.95 > mean(calls[:5]), calls
    # Two-turn episodes (call, then answer) carry observation tokens between the turns; the
    # actor's log-probs of the model's tokens match the engine's.
    assert mean(row["agent/turns"] for row in history[-10:]) >= 1.9
    assert max(row["rollout/logprob_diff_mean"] for row in history) < 0.02
