"""rollout.mode=one_step_off: the next batch is generated while the actor trains on this one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import rlflow
from tests.e2e.test_resume_and_recovery import finish, kill_run_after, kill_worker_after, launch, rows

pytestmark = pytest.mark.ray

ONE_STEP_OFF = ("rollout.mode=one_step_off", "rollout.max_weight_staleness=1")
# One epoch of 96 prompts in 6 steps; checkpoints at steps 2 and 4.
EPOCH_OF_SIX = (
    "data.max_samples=96", "data.train_batch_size=16", "actor.ppo_mini_batch_size=16",
    "trainer.total_steps=6", "trainer.save_freq=2", *ONE_STEP_OFF,
)


def ledger(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines() if line.strip()]


def assert_epoch_consumed_once(out: Path) -> None:
    steps = ledger(out)
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    consumed = [i for s in steps for i in s["indices"]]
    assert sorted(consumed) == list(range(96)), "every prompt of the epoch trained on exactly once"


def test_one_step_off_trains_on_batches_exactly_one_sync_old(ray_cluster, tmp_path):
    out = tmp_path / "run"
    cfg = rlflow.compose_config(
        "grpo",
        overrides=[f"trainer.output_dir={out}", "trainer.total_steps=4", "trainer.progress_bar=false", *ONE_STEP_OFF],
    )
    trainer = rlflow.build_trainer(cfg)
    try:
        history = trainer.fit()
        assert trainer.in_flight is None, "the last step starts no generation"
    finally:
        trainer.close()

    assert [r["step"] for r in history] == [1, 2, 3, 4]
    assert [r["weight_version"] for r in history] == [1, 2, 3, 4]
    # The first batch is sampled with the initial weights; every later one a sync behind (and
    # the rollout workers refuse to lag more than rollout.max_weight_staleness=1).
    assert [r["rollout/weight_lag"] for r in history] == [0.0, 1.0, 1.0, 1.0]
    for row in history:
        # The actor rescored every batch, so the engine-vs-trainer gap is reported.
        assert row["rollout/logprob_diff_mean"] is not None and row["timing/old_log_prob_s"] > 0
        assert 0.0 <= row["reward/mean"] <= 1.0
    # On-policy, the two score the same weights; one sync later the policy has moved.
    first, later = history[0]["rollout/logprob_diff_mean"], [r["rollout/logprob_diff_mean"] for r in history[1:]]
    assert first < 1e-4 and min(later) > first
    # Each step trained on its own 32 prompts.
    steps = ledger(out)
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert all(len(s["indices"]) == 32 for s in steps)


@pytest.mark.long
def test_sigkill_and_resume_trains_each_prompt_of_the_epoch_exactly_once(tmp_path):
    common = EPOCH_OF_SIX
    out = tmp_path / "run"
    # Step 3 is logged: step 4 trains while batch 5 is generated. Kill everything.
    kill_run_after(out, launch(out, *common), steps=3)
    saved = out / "checkpoints" / "global_step_2" / "trainer_state.json"
    assert not (out / "checkpoints" / "global_step_4").exists()
    # Batch 3 was in flight when step 2 saved: the checkpoint does not count it as consumed.
    assert json.loads(saved.read_text())["batches"] == {"epoch": 0, "batch_in_epoch": 2}

    output = finish(launch(out, *common, "trainer.resume_mode=auto"))
    assert "resumed from" in output and "global_step_2" in output
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5, 6]
    assert_epoch_consumed_once(out)
    # The resumed run regenerates batch 3 with the restored weights, then runs a sync behind.
    assert [r["rollout/weight_lag"] for r in rows(out)] == [0.0, 1.0, 0.0, 1.0, 1.0, 1.0]


@pytest.mark.long
def test_dead_actor_worker_mid_run_is_recovered_without_losing_the_batch_in_flight(tmp_path):
    out = tmp_path / "recover"
    # Two FSDP ranks: rank 0 learns of rank 1's death inside a collective.
    proc = launch(out, *EPOCH_OF_SIX, "trainer.max_restarts=1", "actor.num_workers=2", "actor.torch_threads=1")
    # Step 4 trains while batch 5 is in flight.
    output = kill_worker_after(out, proc, "actor", rank=1, steps=3)
    assert "restart 1 of 1" in output
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5, 6]
    assert_epoch_consumed_once(out)
