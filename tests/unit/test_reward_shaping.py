"""DAPO's overlong reward shaping and the dynamic-sampling group filter."""

from __future__ import annotations

import pytest
import torch

from rlflow.algorithms.reward_shaping import add_sequence_reward, overlong_penalty, varied_group_indices


def test_overlong_penalty_by_hand():
    # max 10, buffer 4: no penalty up to length 6, then -factor * (len - 6) / 4.
    lengths = torch.tensor([1, 6, 7, 8, 10])
    got = overlong_penalty(lengths, max_response_length=10, buffer_len=4, penalty_factor=2.0)
    assert torch.allclose(got, torch.tensor([0.0, 0.0, -0.5, -1.0, -2.0]))


def test_overlong_penalty_matches_naive_formula():
    torch.manual_seed(0)
    lengths = torch.randint(0, 33, (50,))
    got = overlong_penalty(lengths, max_response_length=32, buffer_len=8, penalty_factor=1.0)
    for n, p in zip(lengths.tolist(), got.tolist()):
        expected = min(-(n - (32 - 8)) / 8 * 1.0, 0.0)
        assert p == pytest.approx(expected)


@pytest.mark.parametrize("buffer_len", [0, -1, 11])
def test_overlong_penalty_rejects_bad_buffer(buffer_len):
    with pytest.raises(ValueError, match="reward.overlong_buffer.len"):
        overlong_penalty(torch.tensor([3]), max_response_length=10, buffer_len=buffer_len, penalty_factor=1.0)


def test_overlong_penalty_rejects_negative_factor():
    with pytest.raises(ValueError, match="penalty_factor"):
        overlong_penalty(torch.tensor([3]), max_response_length=10, buffer_len=2, penalty_factor=-1.0)


def test_add_sequence_reward_lands_on_last_valid_token():
    scores = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    extra = torch.tensor([-0.5, -1.0, 0.25, 7.0])
    out = add_sequence_reward(scores, mask, extra)
    expected = torch.tensor(
        [[0.0, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, -1.0], [0.25, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    )
    assert torch.equal(out, expected)
    assert scores[0, 2] == 1.0, "the input must not be modified"


def test_add_sequence_reward_shape_errors():
    with pytest.raises(ValueError, match="response_mask"):
        add_sequence_reward(torch.zeros(2, 3), torch.ones(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="sequence_reward"):
        add_sequence_reward(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(3))


def test_varied_group_indices_keeps_groups_with_spread():
    uids = ["a", "a", "a", "b", "b", "b", "c", "c", "c", "d"]
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    # a varies; b all wrong; c all right; d is a singleton (kept: nothing to compare).
    assert varied_group_indices(uids, scores) == [0, 1, 2, 9]


def test_varied_group_indices_non_adjacent_groups_and_lists():
    uids = [1, 2, 1, 2]
    assert varied_group_indices(uids, [0.5, 0.2, 0.5, 0.3]) == [1, 3]
    assert varied_group_indices(uids, [0.5, 0.2, 0.25, 0.2]) == [0, 2]


def test_varied_group_indices_matches_std_rule():
    torch.manual_seed(1)
    uids = [i // 4 for i in range(64)]
    scores = (torch.rand(64) < 0.2).float()
    expected = [
        row
        for g in range(16)
        if scores[4 * g : 4 * g + 4].std() > 0
        for row in range(4 * g, 4 * g + 4)
    ]
    assert varied_group_indices(uids, scores) == expected


def test_varied_group_indices_length_mismatch():
    with pytest.raises(ValueError, match="group ids"):
        varied_group_indices(["a", "b"], [1.0])


# ------------------------------------------------------------------ config checks


def _check(recipe: str, overrides: list[str]) -> None:
    import rlflow
    from rlflow.trainer.config_checks import check_config

    check_config(rlflow.compose_config(recipe, overrides=overrides))


def test_dapo_recipe_passes_the_checks():
    _check("dapo", [])


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["reward.overlong_buffer.len=0"], "reward.overlong_buffer.len"),
        (["reward.overlong_buffer.len=5"], "reward.overlong_buffer.len"),  # > max_response_length 4
        (["reward.overlong_buffer.penalty_factor=-1"], "reward.overlong_buffer.penalty_factor"),
        (["algorithm.filter_groups.metric=acc"], "algorithm.filter_groups.metric"),
        (["algorithm.filter_groups.max_num_gen_batches=0"], "algorithm.filter_groups.max_num_gen_batches"),
        (["rollout.n=1", "actor.num_workers=1"], "rollout.n"),
    ],
)
def test_bad_dapo_settings_name_the_key(overrides, key):
    from rlflow.errors import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _check("dapo", overrides)
