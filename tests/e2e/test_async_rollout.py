"""rollout.mode=async: continuous generation, a staleness bound, exactly-once prompts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import rlflow
from tests.e2e.test_one_step_off import assert_epoch_consumed_once, ledger
from tests.e2e.test_resume_and_recovery import finish, kill_run_after, kill_worker_after, launch, rows

pytestmark = pytest.mark.ray

BOUND = 2
ASYNC = ("rollout.mode=async", f"rollout.max_weight_staleness={BOUND}")
# One epoch of 96 prompts in 6 steps; checkpoints at steps 2 and 4.
EPOCH_OF_SIX = (
    "data.max_samples=96", "data.train_batch_size=16", "actor.ppo_mini_batch_size=16",
    "trainer.total_steps=6", "trainer.save_freq=2", *ASYNC,
)


def assert_lag_within_bound(history: list[dict]) -> None:
    for row in history:
        assert row["rollout/weight_lag_max"] <= BOUND, row
        histogram = {k: v for k, v in row.items() if k.startswith("rollout/lag_")}
        assert abs(sum(histogram.values()) - 1.0) < 1e-9
        assert all(int(k.rsplit("_", 1)[1]) <= BOUND for k, v in histogram.items() if v > 0)


def test_async_never_trains_on_samples_older_than_the_bound(ray_cluster, tmp_path):
    out = tmp_path / "run"
    # Two rollout workers, each fed its own calls.
    two_workers = ("rollout.num_workers=2", "rollout.cpus_per_worker=0.25")
    cfg = rlflow.compose_config(
        "grpo", overrides=[f"trainer.output_dir={out}", "trainer.progress_bar=false", *EPOCH_OF_SIX, *two_workers]
    )
    trainer = rlflow.build_trainer(cfg)
    try:
        history = trainer.fit()
        # The run drew exactly the prompts its steps needed: nothing left over.
        assert trainer.async_rollout.pending() == []
    finally:
        trainer.close()

    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6]
    assert [r["weight_version"] for r in history] == [1, 2, 3, 4, 5, 6]
    assert_lag_within_bound(history)
    # Generation ran ahead of training: later batches were sampled with older weights.
    assert history[0]["rollout/weight_lag"] == 0.0
    assert max(r["rollout/weight_lag_max"] for r in history) > 0
    for row in history:
        assert row["rollout/logprob_diff_mean"] is not None  # the actor rescored the batch
        assert row["rollout/stale_dropped"] >= 0
    assert_epoch_consumed_once(out)


def test_partial_rollouts_continue_responses_across_weight_syncs(ray_cluster, tmp_path):
    out = tmp_path / "partial"
    # One token per call, one prompt per call, longer answers: generation is slower than
    # training, so groups are still being generated when the weights change.
    partial = (
        "rollout.partial_rollout=true", "rollout.partial_segment_tokens=1", "rollout.async_prompts_per_call=1",
        "data.max_response_length=12",
    )
    # The PPO ratio is taken against each token's sampling weights: no old log-prob pass.
    partial += ("actor.recompute_old_log_prob=rollout",)
    cfg = rlflow.compose_config(
        "grpo", overrides=[f"trainer.output_dir={out}", "trainer.progress_bar=false", *EPOCH_OF_SIX, *partial]
    )
    trainer = rlflow.build_trainer(cfg)
    try:
        history = trainer.fit()
        assert trainer.async_rollout.pending() == [] and trainer.async_rollout.open == []
    finally:
        trainer.close()

    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6]
    assert_lag_within_bound(history)
    assert_epoch_consumed_once(out)
    # One token per call: responses in flight at a sync were finished with the new weights.
    assert max(r["rollout/multi_version_frac"] for r in history) > 0
    for row in history:
        # A token is never older than its response's oldest token.
        assert 0 <= row["rollout/token_lag"] <= row["rollout/weight_lag_max"] <= BOUND
        assert "timing/old_log_prob_s" not in row and "rollout/logprob_diff_mean" not in row
    # Old log-probs are the rollout's: the first update's ratio starts at 1 (same weights), later
    # ones do not (tokens from older weights).
    assert abs(history[0]["actor/ppo_kl"]) < 1e-4
    assert max(abs(r["actor/ppo_kl"]) for r in history[1:]) > 1e-4


def resumed_checkpoint(output: str) -> Path:
    match = re.search(r"resumed from (\S+global_step_\d+)", output)
    assert match, output[-2000:]
    return Path(match.group(1))


@pytest.mark.long
def test_async_sigkill_and_resume_trains_each_prompt_of_the_epoch_exactly_once(tmp_path):
    out = tmp_path / "run"
    kill_run_after(out, launch(out, *EPOCH_OF_SIX), steps=3)

    output = finish(launch(out, *EPOCH_OF_SIX, "trainer.resume_mode=auto"))
    state = json.loads((resumed_checkpoint(output) / "trainer_state.json").read_text())
    # Generation runs ahead, so prompts were buffered or in flight at the save: they were
    # saved as pending (not consumed), and the resumed run generated them again.
    assert len(state["prompts_pending"]) > 0
    trained_before = {i for s in ledger(out) if s["step"] <= state["global_step"] for i in s["indices"]}
    assert not trained_before & {index for _, index in state["prompts_pending"]}
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5, 6]
    assert_epoch_consumed_once(out)
    assert_lag_within_bound(rows(out))


@pytest.mark.long
def test_async_rollout_worker_killed_mid_run_is_replaced_without_losing_prompts(tmp_path):
    out = tmp_path / "recover"
    proc = launch(out, *EPOCH_OF_SIX, "trainer.max_restarts=1")
    # Generation for later steps is in flight.
    output = kill_worker_after(out, proc, "rollout", rank=0, steps=3)
    # Only the dead worker was replaced: no rollback to a checkpoint, no step repeated.
    assert "a rollout worker died" in output and "restart 1 of 1" in output, output[-3000:]
    assert "rlflow/rollout/0" in output and "resumed from" not in output
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5, 6]
    assert rows(out)[-1]["trainer/restarts"] == 1.0
    assert_epoch_consumed_once(out)
    assert_lag_within_bound(rows(out))
