"""Pure helpers of the RL driver: batch sizes that the worker groups can split."""

from __future__ import annotations

import pytest

from rlflow.data.batch_sizes import largest_divisor_at_most, splittable_group_count


def naive_splittable(responses: int, workers: int, mini: int, micro: int) -> bool:
    """Simulate the split: shards per rank, mini-batches of `mini`, each in micro-batches of
    min(micro, its size) that must tile it exactly."""
    if responses % workers:
        return False
    per_rank = responses // workers
    for start in range(0, per_rank, mini):
        size = min(mini, per_rank - start)
        if size % min(micro, size):
            return False
    return True


@pytest.mark.parametrize("group_size", [1, 3, 8])
@pytest.mark.parametrize("roles", [[(2, 64, 128)], [(2, 12, 5)], [(2, 64, 128), (1, 128, 48)], [(3, 8, 8)]])
def test_splittable_group_count_matches_a_simulated_split(group_size, roles):
    for available in range(0, 40):
        expected = next(
            (k for k in range(available, 0, -1) if all(naive_splittable(k * group_size, *r) for r in roles)),
            0,
        )
        assert splittable_group_count(available, group_size, roles) == expected, (available, roles)


def test_splittable_group_count_by_hand():
    # 3 responses per group over 2 ranks: only an even number of groups splits.
    assert splittable_group_count(7, 3, [(2, 100, 100)]) == 6
    # 8 per group, 2 ranks, mini 64 / micro 48 per rank: 12 groups = 48 per rank (one short
    # mini-batch of 48 = one micro); 13 groups = 52 per rank (52 > 48, 52 % 48 != 0) does not split.
    assert splittable_group_count(13, 8, [(2, 64, 48)]) == 12
    assert splittable_group_count(5, 1, [(4, 8, 8)]) == 4
    assert splittable_group_count(3, 1, [(4, 8, 8)]) == 0


@pytest.mark.parametrize("n, cap, expected", [(12, 5, 4), (12, 12, 12), (13, 5, 1), (160, 128, 80), (7, 100, 7)])
def test_largest_divisor_at_most(n, cap, expected):
    assert largest_divisor_at_most(n, cap) == expected
