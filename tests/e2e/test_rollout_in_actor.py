"""``rollout.placement=in_actor``: the actor's worker samples with the model it trains. No
rollout process starts, and a weight sync moves no tensors, yet the run is the same run:
with one actor worker and one thread everywhere, three steps give the same numbers as the
split placement (a rollout worker of its own, weights synced through the object store)."""

from __future__ import annotations

import math

import pytest

from tests.e2e.test_learning import run_recipe

pytestmark = pytest.mark.ray

SAME = ["actor.num_workers=1", "actor.torch_threads=1", "rollout.torch_threads=1", "trainer.total_steps=3",
        "trainer.test_freq=3"]
COMPARED = ["reward/mean", "response_length/mean", "actor/pg_loss", "actor/kl", "actor/entropy",
            "actor/grad_norm", "advantages/mean", "weight_version"]


def test_in_actor_rollout_runs_the_split_placements_numbers(ray_cluster, tmp_path):
    in_actor_roles, in_actor = run_recipe("grpo", tmp_path / "in_actor", [*SAME, "rollout.placement=in_actor"])
    split_roles, split = run_recipe("grpo", tmp_path / "split", [*SAME, "rollout.placement=split"])

    assert in_actor_roles == {"actor": 1}, "no rollout process starts"
    assert split_roles == {"actor": 1, "rollout": 1}
    # Validation (greedy answers to the val prompts) before step 1 and after step 3.
    assert [row["step"] for row in in_actor] == [0, 1, 2, 3]
    assert [row["weight_version"] for row in in_actor[1:]] == [1, 2, 3]
    for mine, theirs in zip(in_actor, split, strict=True):
        assert mine["step"] == theirs["step"]
        keys = [key for key in mine if key.startswith("val/")] + (COMPARED if mine["step"] else [])
        assert keys and all(key in theirs for key in keys)
        for key in keys:
            assert math.isclose(mine[key], theirs[key], rel_tol=1e-5, abs_tol=1e-7), (mine["step"], key, mine[key], theirs[key])
    assert "val/reward/mean" in in_actor[0] and "val/reward/mean" in in_actor[3]
    # The policy moved between steps, so step 3's samples came from trained weights.
    assert in_actor[3]["actor/kl"] > 0
