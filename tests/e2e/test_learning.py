"""Learning tests: each recipe must actually learn the offline demo task through Ray.

The demo policy is a randomly initialised character-level model, so at the start it answers
"a+b=" correctly by chance only (reward about 0.05). RL recipes must lift the mean reward of the
last 10 steps to >= 0.5 from <= 0.15 over the first 10; DPO must lift held-out preference
accuracy from about chance to >= 0.9 and make the correct answers more likely. Each run takes
one to two minutes on 2 CPU cores. The first tests only check that every recipe composes.
"""

from __future__ import annotations

import json
from statistics import mean

import pytest

import rlflow
from rlflow.config.compose import available_recipes
from rlflow.trainer.config_checks import check_config

RECIPES = ["grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "ppo", "dpo", "grpo_lora"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_passes_the_checks(recipe):
    assert recipe in available_recipes()
    cfg = rlflow.compose_config(recipe)
    check_config(cfg)
    assert cfg.trainer.algorithm == ("dpo" if recipe == "dpo" else "rl")


@pytest.mark.parametrize(
    "recipe, key, value",
    [
        ("dr_grpo", "algorithm.norm_adv_by_std_in_grpo", False),
        ("dr_grpo", "actor.loss_agg_mode", "seq-mean-token-sum-norm"),
        ("dapo", "algorithm.filter_groups.enable", True),
        ("dapo", "reward.overlong_buffer.enable", True),
        ("dapo", "actor.loss_agg_mode", "token-mean"),
        ("dapo", "actor.clip_ratio_high", 0.28),
        ("rloo", "algorithm.adv_estimator", "rloo"),
        ("reinforce_pp", "algorithm.adv_estimator", "reinforce_plus_plus"),
        ("reinforce_pp", "algorithm.use_kl_in_reward", True),
        ("ppo", "algorithm.adv_estimator", "gae"),
        ("ppo", "algorithm.kl_ctrl.type", "adaptive"),
        ("dpo", "dpo.loss_type", "sigmoid"),
    ],
)
def test_recipes_set_their_algorithm(recipe, key, value):
    node = rlflow.compose_config(recipe)
    for part in key.split("."):
        node = node[part]
    assert node == value


def run_recipe(recipe: str, tmp_path, overrides: list[str]):
    """Train ``recipe`` to the end; returns (role -> worker count, per-step metrics)."""
    cfg = rlflow.compose_config(
        recipe, overrides=[f"trainer.output_dir={tmp_path}", "trainer.progress_bar=false", *overrides]
    )
    trainer = rlflow.build_trainer(cfg)
    try:
        roles = {role: wg.world_size for role, wg in trainer.groups.items()}
        history = trainer.fit()
    finally:
        trainer.close()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == history
    return roles, history


def assert_reward_rises(history: list[dict]) -> None:
    rewards = [row["reward/mean"] for row in history]
    first, last = mean(rewards[:10]), mean(rewards[-10:])
    assert first <= 0.15, f"the untrained policy should be near chance, got {first:.3f}"
    assert last >= 0.5, f"reward only rose from {first:.3f} to {last:.3f}: {[round(r, 2) for r in rewards]}"


@pytest.mark.ray
@pytest.mark.long
def test_grpo_demo_learns(ray_cluster, tmp_path):
    """``make run``: the recipe as shipped, its one actor worker sampling with its own model."""
    roles, history = run_recipe("grpo", tmp_path, ["trainer.total_steps=160"])
    assert roles == {"actor": 1}, "the actor samples and holds the reference: no other workers"
    assert_reward_rises(history)
    assert [row["weight_version"] for row in history] == list(range(1, 161))
    assert history[-1]["actor/kl"] > 0


@pytest.mark.ray
@pytest.mark.long
def test_ppo_with_critic_learns(ray_cluster, tmp_path):
    roles, history = run_recipe("ppo", tmp_path, ["trainer.total_steps=100"])
    assert roles == {"actor": 1, "critic": 1}
    assert_reward_rises(history)
    # The critic tracks the rising reward: its values start at 0 (zero head) and end close
    # to the mean return.
    assert history[0]["values/mean"] == 0.0
    assert abs(history[-1]["values/mean"] - history[-1]["returns/mean"]) < 0.15
    assert all(row["critic/num_updates"] == 2.0 and row["actor/num_updates"] == 4.0 for row in history)
    # KL in the reward with the adaptive controller: the coefficient moved away from its
    # initial value once the policy drifted from the reference.
    assert history[0]["actor/reward_kl_penalty_coeff"] == pytest.approx(0.001)
    assert history[-1]["actor/reward_kl_penalty"] > 0
    assert history[-1]["actor/reward_kl_penalty_coeff"] != pytest.approx(0.001, rel=1e-3)


@pytest.mark.ray
@pytest.mark.long
def test_grpo_lora_learns(ray_cluster, tmp_path):
    roles, history = run_recipe("grpo_lora", tmp_path, [])
    assert roles == {"actor": 2, "rollout": 1}, "LoRA: the base in the actor is the reference"
    assert_reward_rises(history)
    assert history[-1]["actor/kl"] > 0, "the KL to the base (adapters off) is measured"


@pytest.mark.ray
@pytest.mark.long
def test_rloo_learns(ray_cluster, tmp_path):
    roles, history = run_recipe("rloo", tmp_path, ["trainer.total_steps=120"])
    assert roles == {"actor": 1}, "no KL term, so no reference policy"
    assert_reward_rises(history)


@pytest.mark.ray
@pytest.mark.long
def test_dapo_learns_with_dynamic_sampling(ray_cluster, tmp_path):
    roles, history = run_recipe("dapo", tmp_path, ["trainer.total_steps=100"])
    assert roles == {"actor": 1}
    assert_reward_rises(history)
    # Early on most groups are all wrong, so more than one generation round is needed; the
    # training batch is always whole groups, at most data.train_batch_size of them.
    assert history[0]["filter_groups/num_gen_batches"] > 1
    for row in history:
        assert row["train/num_responses"] == 8 * row["filter_groups/num_train_groups"]
        assert 0 < row["filter_groups/num_train_groups"] <= 32
    # Overlong shaping is on: answers that run into the last 2 tokens lose up to 0.1.
    assert all(-0.1 <= row["reward/overlong_penalty"] <= 0 for row in history)
    assert history[0]["reward/overlong_penalty"] < 0, "the untrained policy rambles to the limit"


@pytest.mark.ray
@pytest.mark.long
def test_dpo_learns_preferences(ray_cluster, tmp_path):
    roles, history = run_recipe("dpo", tmp_path, [])
    assert roles == {"actor": 2}
    start, end = history[0], history[-1]
    assert start["step"] == 0 and end["step"] == 150
    assert 0.3 <= start["val/preference_accuracy"] <= 0.7, "an untrained model prefers at random"
    assert start["val/dpo/accuracy"] == 0.0, "policy == reference: no implicit reward margin yet"
    assert end["val/preference_accuracy"] >= 0.9
    assert end["val/dpo/accuracy"] >= 0.9
    # The correct answers become much more likely in absolute terms, not only relative to the
    # rejected ones.
    assert end["val/chosen_prob"] > 10 * start["val/chosen_prob"]
    assert end["val/chosen_prob"] > 5 * end["val/rejected_prob"]
    train_rows = [row for row in history if row["step"] > 0]
    assert mean(r["dpo/accuracy"] for r in train_rows[-10:]) >= 0.9
