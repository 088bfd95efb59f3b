"""Multi-turn demos learn through Ray: a tool-use task and an environment with feedback.

``grpo_calculator``: two-digit additions the tiny model cannot do alone, with a calculator
tool. The warm-started model calls the tool in about half its episodes (0.50 success, measured
by benchmarks/tool_model_check.py); RL must make it call the tool nearly always.

``grpo_guess_number``: find a secret in 0..7 with "+"/"-" replies. The random-init model
rarely even ends a turn with one guess (success about 0.06); RL must learn the turn protocol
and guess over several turns.
"""

from __future__ import annotations

import json
from statistics import mean

import pytest
from test_learning import run_recipe


def first_and_last(history: list[dict], key: str) -> tuple[float, float]:
    values = [row[key] for row in history]
    return mean(values[:10]), mean(values[-10:])


@pytest.mark.ray
@pytest.mark.long
def test_calculator_tool_use_learns(ray_cluster, tmp_path):
    roles, history = run_recipe("grpo_calculator", tmp_path, ["trainer.total_steps=40"])
    assert roles == {"actor": 2, "rollout": 1}, "environments score in the rollout workers"
    first, last = first_and_last(history, "agent/success")
    assert first <= 0.85, f"the warm-started model succeeds only when it calls the tool, got {first:.3f}"
    assert last >= 0.9, f"success only rose from {first:.3f} to {last:.3f}"
    calls_first, calls_last = first_and_last(history, "agent/tool_calls")
    assert calls_last >= 0.95 > calls_first
    assert mean(row["agent/turns"] for row in history[-10:]) >= 1.95  # call, then answer
    assert all(row["agent/env_errors"] == 0 for row in history)
    assert [row["reward/mean"] for row in history] == [row["agent/success"] for row in history]


@pytest.mark.ray
@pytest.mark.long
def test_guess_the_number_learns(ray_cluster, tmp_path):
    roles, history = run_recipe(
        "grpo_guess_number", tmp_path, ["trainer.test_freq=150", "trainer.val_before_train=false"]
    )
    assert roles == {"actor": 2, "rollout": 1}
    first, last = first_and_last(history, "agent/success")
    assert first <= 0.15, f"the untrained model should rarely find the number, got {first:.3f}"
    assert last >= 0.25, f"success only rose from {first:.3f} to {last:.3f}"
    turns_first, turns_last = first_and_last(history, "agent/turns")
    assert turns_first < 1.5 and turns_last >= 2.0, "it learns to keep guessing after a reply"
    assert "val/reward/mean" in history[-1]


@pytest.mark.ray
def test_episodes_run_in_the_async_rollout_mode(ray_cluster, tmp_path):
    """Multi-turn episodes with rollout.mode=async: each rollout call plays its own prompt
    groups' episodes, there is no barrier across calls, and every prompt is trained once."""
    roles, history = run_recipe("grpo_calculator", tmp_path, [
        "trainer.total_steps=6", "rollout.mode=async", "rollout.max_weight_staleness=2",
    ])
    assert max(row["rollout/weight_lag_max"] for row in history) <= 2
    assert any(row["rollout/weight_lag"] > 0 for row in history)
    assert all(row["agent/tool_calls"] > 0.3 and row["agent/turns"] > 1.3 for row in history)
    ledger = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    trained = [i for row in ledger for i in row["indices"]]
    assert len(trained) == 6 * 32 == len(set(trained))
