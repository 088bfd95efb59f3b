"""``rollout.placement=in_actor``: the actor's worker samples with the model it trains. No
rollout process starts, and a weight sync moves no tensors, yet the run is the same run:
with one actor worker and one thread everywhere, three steps give the same numbers as the
split placement (a rollout worker of its own, weights synced through the object store)."""

from __future__ import annotations

import math

import pytest

import rlflow

pytestmark = pytest.mark.ray

SAME = ["actor.num_workers=1", "actor.torch_threads=1", "rollout.torch_threads=1", "trainer.total_steps=3",
        "trainer.progress_bar=false", "trainer.test_freq=3"]
COMPARED = ["reward/mean", "response_length/mean", "actor/pg_loss", "actor/kl", "actor/entropy",
            "actor/grad_norm", "advantages/mean", "weight_version"]


def _run(tmp_path, name: str, *overrides: str) -> tuple[dict[str, int], list[dict]]:
    cfg = rlflow.compose_config("grpo", overrides=[*SAME, f"trainer.output_dir={tmp_path / name}", *overrides])
    trainer = rlflow.build_trainer(cfg)
    try:
        roles = {role: wg.world_size for role, wg in trainer.groups.items()}
        history = trainer.fit()
    finally:
        trainer.close()
    return roles, history


def test_in_actor_rollout_runs_the_split_placements_numbers(ray_cluster, tmp_path):
    in_actor_roles, in_actor = _run(tmp_path, "in_actor", "rollout.placement=in_actor")
    split_roles, split = _run(tmp_path, "split")

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
