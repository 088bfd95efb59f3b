import math

import pytest
import torch

from rlflow.algorithms.advantages import ADVANTAGE_ESTIMATORS, compute_advantages


def _rewards_at_end(scores, mask):
    """Token rewards with each score on the row's last valid token."""
    mask = torch.as_tensor(mask)
    rewards = torch.zeros(mask.shape, dtype=torch.float32)
    for i, s in enumerate(scores):
        last = int(mask[i].nonzero().max())
        rewards[i, last] = s
    return rewards


def _naive_whiten(vals_by_pos, mask):
    vals = [vals_by_pos[b][t] for b in range(len(mask)) for t in range(len(mask[0])) if mask[b][t]]
    n = len(vals)
    mean = sum(vals) / n
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)
    return [
        [
            ((vals_by_pos[b][t] - mean) / math.sqrt(var + 1e-8)) if mask[b][t] else 0.0
            for t in range(len(mask[0]))
        ]
        for b in range(len(mask))
    ]


# ---------------------------------------------------------------- GRPO


def test_grpo_one_correct_of_four():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    rewards = _rewards_at_end([1.0, 0.0, 0.0, 0.0], mask)
    adv, ret = compute_advantages(
        "grpo", token_level_rewards=rewards, response_mask=mask, group_index=["a"] * 4, epsilon=1e-6
    )
    expected = [1.5, -0.5, -0.5, -0.5]
    for i in range(4):
        for t in range(3):
            want = expected[i] if mask[i, t] else 0.0
            assert adv[i, t].item() == pytest.approx(want, abs=1e-5)
    torch.testing.assert_close(ret, adv)


def test_grpo_two_groups_and_singleton():
    mask = torch.ones(6, 2, dtype=torch.long)
    rewards = _rewards_at_end([1.0, 1.0, 0.0, 0.3, 5.0, 2.0], mask)
    adv, _ = compute_advantages(
        "grpo",
        token_level_rewards=rewards,
        response_mask=mask,
        group_index=["p0", "p1", "p0", "solo", "p1", "p0"],
        epsilon=1e-6,
    )
    # group p0: [1, 0, 2]; group p1: [1, 5]; group solo: [0.3]
    p0 = [1.0, 0.0, 2.0]
    m0 = sum(p0) / 3
    s0 = math.sqrt(sum((v - m0) ** 2 for v in p0) / 2)
    p1 = [1.0, 5.0]
    m1 = 3.0
    s1 = math.sqrt(sum((v - m1) ** 2 for v in p1) / 1)
    want = [
        (1 - m0) / (s0 + 1e-6),
        (1 - m1) / (s1 + 1e-6),
        (0 - m0) / (s0 + 1e-6),
        0.0,
        (5 - m1) / (s1 + 1e-6),
        (2 - m0) / (s0 + 1e-6),
    ]
    torch.testing.assert_close(adv[:, 0], torch.tensor(want))
    torch.testing.assert_close(adv[:, 1], torch.tensor(want))


def test_grpo_spec_example_with_padding():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    rewards = _rewards_at_end([1.0, 1.0, 0.0], mask)
    adv, _ = compute_advantages(
        "grpo", token_level_rewards=rewards, response_mask=mask, group_index=[7, 7, 7], epsilon=1e-6
    )
    want = torch.tensor(
        [
            [0.57735, 0.57735, 0.57735, 0.0],
            [0.57735, 0.0, 0.0, 0.0],
            [-1.1547, -1.1547, -1.1547, -1.1547],
        ]
    )
    torch.testing.assert_close(adv, want, atol=1e-4, rtol=0)


def test_grpo_all_equal_group_gives_zero_not_nan():
    mask = torch.ones(3, 2)
    rewards = _rewards_at_end([1.0, 1.0, 1.0], mask)
    adv, _ = compute_advantages(
        "grpo", token_level_rewards=rewards, response_mask=mask, group_index=[0, 0, 0]
    )
    assert torch.equal(adv, torch.zeros(3, 2))


def test_dr_grpo_no_std():
    mask = torch.ones(4, 1)
    rewards = _rewards_at_end([1.0, 0.0, 0.0, 0.0], mask)
    adv, _ = compute_advantages(
        "grpo",
        token_level_rewards=rewards,
        response_mask=mask,
        group_index=torch.tensor([3, 3, 3, 3]),
        norm_by_std=False,
    )
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.75, -0.25, -0.25, -0.25]))


# ---------------------------------------------------------------- RLOO


def test_rloo_leave_one_out():
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1], [1, 1]])
    scores = [1.0, 0.0, 3.0, 2.0, 4.0]
    rewards = _rewards_at_end(scores, mask)
    groups = ["a", "a", "a", "b", "c"]
    adv, _ = compute_advantages(
        "rloo", token_level_rewards=rewards, response_mask=mask, group_index=groups
    )
    want = []
    for i, s in enumerate(scores):
        others = [scores[j] for j in range(5) if j != i and groups[j] == groups[i]]
        want.append(s - sum(others) / len(others) if others else 0.0)
    # a: 1-(0+3)/2=-0.5, 0-(1+3)/2=-2, 3-(1+0)/2=2.5; b and c singleton -> 0
    assert want[:3] == [-0.5, -2.0, 2.5]
    expected = torch.tensor(want)[:, None] * mask
    torch.testing.assert_close(adv, expected)


# ---------------------------------------------------------------- REINFORCE++


def test_reinforce_plus_plus_returns_match_loop():
    torch.manual_seed(0)
    gamma = 0.9
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 1, 0]])
    rewards = torch.randn(3, 4) * mask
    adv, ret = compute_advantages(
        "reinforce_plus_plus", token_level_rewards=rewards, response_mask=mask, gamma=gamma
    )
    want = [[0.0] * 4 for _ in range(3)]
    for b in range(3):
        valid = [t for t in range(4) if mask[b, t]]
        g = 0.0
        for t in reversed(valid):
            g = rewards[b, t].item() + gamma * g
            want[b][t] = g
    torch.testing.assert_close(ret, torch.tensor(want))
    torch.testing.assert_close(adv, torch.tensor(_naive_whiten(want, mask.tolist())))


def test_reinforce_plus_plus_baseline():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    scores = [1.0, 0.0, 4.0, 2.0]
    rewards = _rewards_at_end(scores, mask)
    adv, _ = compute_advantages(
        "reinforce_plus_plus_baseline",
        token_level_rewards=rewards,
        response_mask=mask,
        group_index=["x", "x", "y", "y"],
    )
    centered = [0.5, -0.5, 1.0, -1.0]  # group means 0.5 and 3.0
    by_pos = [[centered[b] * mask[b, t].item() for t in range(3)] for b in range(4)]
    torch.testing.assert_close(adv, torch.tensor(_naive_whiten(by_pos, mask.tolist())))


# ---------------------------------------------------------------- GAE


def _naive_gae(rewards, values, mask, gamma, lam):
    """Direct recursion over each row's valid positions only (padding removed)."""
    B, T = len(mask), len(mask[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        pos = [t for t in range(T) if mask[b][t]]
        r = [rewards[b][t] for t in pos]
        v = [values[b][t] for t in pos]
        a_next = 0.0
        for k in reversed(range(len(pos))):
            v_next = v[k + 1] if k + 1 < len(pos) else 0.0
            delta = r[k] + gamma * v_next - v[k]
            a_next = delta + gamma * lam * a_next
            adv[b][pos[k]] = a_next
    return adv


def test_gae_matches_recursion_with_masked_positions():
    torch.manual_seed(1)
    gamma, lam = 0.95, 0.8
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 1, 1, 0], [1, 1, 0, 0, 0]])
    rewards = torch.randn(3, 5)  # garbage at masked positions must be ignored
    values = torch.randn(3, 5)
    adv, ret = compute_advantages(
        "gae", token_level_rewards=rewards, response_mask=mask, values=values, gamma=gamma, lam=lam
    )
    raw = _naive_gae(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    want_ret = [
        [raw[b][t] + values[b, t].item() if mask[b, t] else 0.0 for t in range(5)] for b in range(3)
    ]
    torch.testing.assert_close(ret, torch.tensor(want_ret))
    torch.testing.assert_close(adv, torch.tensor(_naive_whiten(raw, mask.tolist())))


def test_gae_hand_example():
    # one row, gamma=lam=1, rewards [0, 1], values [0.5, 0.25]
    # delta_1 = 1 - 0.25 = 0.75; delta_0 = 0 + 0.25 - 0.5 = -0.25; A_0 = -0.25 + 0.75 = 0.5
    rewards = torch.tensor([[0.0, 1.0]])
    values = torch.tensor([[0.5, 0.25]])
    mask = torch.ones(1, 2)
    _, ret = compute_advantages(
        "gae", token_level_rewards=rewards, response_mask=mask, values=values
    )
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0]]))


# ---------------------------------------------------------------- registry and errors


def test_registry_names():
    assert set(ADVANTAGE_ESTIMATORS) == {
        "grpo",
        "rloo",
        "reinforce_plus_plus",
        "reinforce_plus_plus_baseline",
        "gae",
    }


def test_unknown_estimator_lists_names():
    with pytest.raises(ValueError, match="grpo.*rloo"):
        compute_advantages(
            "ppo2", token_level_rewards=torch.zeros(1, 1), response_mask=torch.ones(1, 1)
        )


def test_missing_inputs_raise():
    r, m = torch.zeros(2, 2), torch.ones(2, 2)
    with pytest.raises(ValueError, match="group_index"):
        compute_advantages("grpo", token_level_rewards=r, response_mask=m)
    with pytest.raises(ValueError, match="group_index"):
        compute_advantages("rloo", token_level_rewards=r, response_mask=m, group_index=[0])
    with pytest.raises(ValueError, match="values"):
        compute_advantages("gae", token_level_rewards=r, response_mask=m)
    with pytest.raises(ValueError, match="response_mask"):
        compute_advantages(
            "grpo", token_level_rewards=r, response_mask=torch.ones(2, 3), group_index=[0, 0]
        )
