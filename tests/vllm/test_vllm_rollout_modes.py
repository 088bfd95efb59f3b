"""The overlapping rollout modes with rollout.backend=vllm: one_step_off, async, and async with
partial rollouts, each through one epoch of 96 prompts in 6 steps on the engine."""

from __future__ import annotations

import pytest

import rlflow
from tests.e2e.test_async_rollout import assert_lag_within_bound
from tests.e2e.test_one_step_off import assert_epoch_consumed_once

pytestmark = pytest.mark.ray

EPOCH_OF_SIX = (
    "data.max_samples=96", "data.train_batch_size=16", "actor.ppo_mini_batch_size=16",
    "trainer.total_steps=6", "trainer.save_freq=0", "actor.off_policy.correction=tis",
)
MODES = {
    "one_step_off": ("rollout.mode=one_step_off", "rollout.max_weight_staleness=1"),
    "async": ("rollout.mode=async", "rollout.max_weight_staleness=2"),
    "async-partial": (
        "rollout.mode=async", "rollout.max_weight_staleness=2", "rollout.partial_rollout=true",
        "rollout.partial_segment_tokens=1", "rollout.async_prompts_per_call=1", "data.max_response_length=8",
    ),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_overlapping_modes_run_on_the_engine(ray_cluster, tiny_model_dir, tmp_path, mode):
    out = tmp_path / mode
    cfg = rlflow.compose_config("grpo", overrides=[
        f"model.path={tiny_model_dir}", "rollout.backend=vllm", f"trainer.output_dir={out}",
        "trainer.progress_bar=false", *EPOCH_OF_SIX, *MODES[mode],
    ])
    trainer = rlflow.build_trainer(cfg)
    try:
        history = trainer.fit()
    finally:
        trainer.close()

    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6]
    assert_lag_within_bound(history)
    assert_epoch_consumed_once(out)
    assert max(r["rollout/weight_lag_max"] for r in history) >= 1, "generation overlapped training"
    for row in history:
        # TIS compared the engine's log-probs with the actor's for the same tokens.
        assert row["actor/off_policy/is_ratio_mean"] > 0
    if mode == "async-partial":
        assert all(0 <= r["rollout/token_lag"] <= 2 for r in history)
        assert max(r["rollout/multi_version_frac"] for r in history) > 0
