"""Off-policy corrections: weights and kept masks against hand-computed values, their effect on
the policy loss and its gradient, the metrics, the config checks and the driver's wiring."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rlflow.algorithms.losses import policy_loss_clipped, policy_loss_gspo
from rlflow.algorithms.off_policy import (
    CORRECTIONS,
    correction_metrics,
    correction_weights,
    decoupled_is,
    seq_mis,
    token_mis,
    truncated_is,
)
from rlflow.errors import ConfigError

e = math.exp
NAN = float("nan")

# Three responses. Per valid token, log r = old - rollout:
#   row 0: 0.5, -1.0, 0.0           (col 3 padding: garbage rollout value)
#   row 1: 1.2, 0.0                 (col 2 padding: nan old value, col 3 padding)
#   row 2: 0.9, 0.9, 0.9, 0.9
OLD = torch.tensor([
    [-1.0, -2.0, -0.5, 0.0],
    [-0.3, -0.2, NAN, 0.0],
    [-0.1, -0.1, -0.1, -0.1],
])
ROLLOUT = torch.tensor([
    [-1.5, -1.0, -0.5, 7.0],
    [-1.5, -0.2, 0.0, 0.0],
    [-1.0, -1.0, -1.0, -1.0],
])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])


def close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- weights and kept masks


def test_tis_truncates_the_ratio_and_keeps_every_token():
    weights, kept = truncated_is(OLD, ROLLOUT, MASK, cap=2.0)
    close(weights, [
        [e(0.5), e(-1.0), 1.0, 0.0],
        [2.0, 1.0, 0.0, 0.0],          # e^1.2 = 3.32 truncated to 2
        [2.0, 2.0, 2.0, 2.0],          # e^0.9 = 2.46 truncated to 2
    ])
    assert torch.equal(kept, MASK)


def test_token_mis_drops_tokens_outside_the_bounds():
    weights, kept = token_mis(OLD, ROLLOUT, MASK, low=0.5, high=2.0)
    # e^0.5 = 1.65 and 1 stay; e^-1 = 0.37, e^1.2 = 3.32 and e^0.9 = 2.46 leave
    expected = [[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    close(weights, expected)
    assert torch.equal(kept, torch.tensor(expected))
    assert kept.dtype == MASK.dtype


def test_seq_mis_tests_the_geometric_mean_and_drops_whole_sequences():
    weights, kept = seq_mis(OLD, ROLLOUT, MASK, low=0.5, high=2.0)
    # row 0: exp((0.5 - 1 + 0) / 3) = 0.85 stays, although one token (0.37) is outside;
    # row 1: exp((1.2 + 0) / 2) = 1.82 stays, although one token (3.32) is outside;
    # row 2: exp(0.9) = 2.46 leaves whole. Padding never counts in the mean.
    assert 0.5 <= e(-0.5 / 3) <= 2.0 and 0.5 <= e(0.6) <= 2.0 and e(0.9) > 2.0
    expected = [[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    close(weights, expected)
    assert torch.equal(kept, torch.tensor(expected))


def test_decoupled_reweights_by_the_ratio_and_drops_tokens_over_the_cap():
    weights, kept = decoupled_is(OLD, ROLLOUT, MASK, cap=2.0)
    close(weights, [
        [e(0.5), e(-1.0), 1.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],          # e^1.2 > 2 leaves the loss (tis would give it 2)
        [0.0, 0.0, 0.0, 0.0],
    ])
    assert torch.equal(kept, torch.tensor([[1, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]]))


def test_correction_weights_dispatches_by_name():
    assert torch.equal(correction_weights("tis", OLD, ROLLOUT, MASK, is_cap=2.0)[0], truncated_is(OLD, ROLLOUT, MASK, 2.0)[0])
    assert torch.equal(correction_weights("mis_token", OLD, ROLLOUT, MASK, mis_low=0.5, mis_high=2.0)[1],
                       token_mis(OLD, ROLLOUT, MASK, 0.5, 2.0)[1])
    assert torch.equal(correction_weights("mis_seq", OLD, ROLLOUT, MASK, mis_low=0.1, mis_high=3.0)[1], MASK)
    assert torch.equal(correction_weights("decoupled", OLD, ROLLOUT, MASK, is_cap=4.0)[1], MASK)
    weights, kept = correction_weights("none", OLD, ROLLOUT, MASK)
    assert kept is MASK
    assert torch.equal(weights, MASK.float())
    with pytest.raises(ValueError, match="off-policy correction"):
        correction_weights("icepop", OLD, ROLLOUT, MASK)


def test_weights_are_constants_even_when_the_inputs_carry_gradients():
    old = OLD.clone().requires_grad_(True)
    for name in CORRECTIONS:
        weights, _ = correction_weights(name, old, ROLLOUT, MASK)
        assert not weights.requires_grad, name
        assert torch.isfinite(weights).all(), name


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="cap"):
        truncated_is(OLD, ROLLOUT, MASK, cap=0.0)
    with pytest.raises(ValueError, match="cap"):
        decoupled_is(OLD, ROLLOUT, MASK, cap=-1.0)
    with pytest.raises(ValueError, match="low"):
        token_mis(OLD, ROLLOUT, MASK, low=1.0, high=2.0)
    with pytest.raises(ValueError, match="high"):
        seq_mis(OLD, ROLLOUT, MASK, low=0.5, high=1.0)
    with pytest.raises(ValueError, match="shape"):
        truncated_is(OLD, ROLLOUT[:, :3], MASK, cap=2.0)


# ---------------------------------------------------------------- metrics


def test_metrics_by_hand():
    _, kept = token_mis(OLD, ROLLOUT, MASK, low=0.5, high=2.0)
    m = correction_metrics(OLD, ROLLOUT, MASK, kept)
    ratios = [e(0.5), e(-1.0), 1.0, e(1.2), 1.0] + [e(0.9)] * 4
    assert m["is_ratio_mean"] == pytest.approx(sum(ratios) / 9, rel=1e-6)
    assert m["is_ratio_max"] == pytest.approx(e(1.2), rel=1e-6)
    assert m["token_masked_frac"] == pytest.approx(6 / 9)   # 1 + 1 + 4 of 9 valid tokens
    assert m["seq_masked_frac"] == pytest.approx(1 / 3)     # only row 2 lost every token
    assert m["logprob_gap_mean"] == pytest.approx((0.5 + 1.0 + 0.0 + 1.2 + 0.0 + 4 * 0.9) / 9, rel=1e-6)


def test_metrics_with_nothing_masked_and_with_an_empty_mask():
    m = correction_metrics(OLD, ROLLOUT, MASK, MASK)
    assert m["token_masked_frac"] == 0.0 and m["seq_masked_frac"] == 0.0
    empty = torch.zeros_like(MASK)
    assert set(correction_metrics(OLD, ROLLOUT, empty, empty).values()) == {0.0}


# ---------------------------------------------------------------- effect on the policy loss

# One response of three tokens; current log-prob minus old: 0, log 1.1, log 0.5.
LOGP_DELTA = [0.0, math.log(1.1), math.log(0.5)]
ADV = torch.tensor([[1.0, 1.0, -1.0]])


def _logp(old: torch.Tensor) -> torch.Tensor:
    return (old + torch.tensor([LOGP_DELTA])).detach().requires_grad_(True)


def test_weighted_clipped_loss_by_hand():
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    mask = torch.ones(1, 3)
    weights = torch.tensor([[2.0, 0.5, 1.5]])
    loss, _ = policy_loss_clipped(_logp(old), old, ADV, mask, token_weights=weights)
    # per token max(-A r, -A clip(r, 0.8, 1.2)): -1; -1.1; max(0.5, 0.8) = 0.8
    expected = (2.0 * -1.0 + 0.5 * -1.1 + 1.5 * 0.8) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("loss_fn", [policy_loss_clipped, policy_loss_gspo])
def test_gradient_is_the_weight_times_the_plain_gradient(mode, loss_fn):
    torch.manual_seed(0)
    old = -1.0 - torch.rand(4, 6)
    logp = (old + 0.3 * torch.randn(4, 6)).requires_grad_(True)
    adv = torch.randn(4, 6)
    mask = (torch.rand(4, 6) > 0.2).long()
    weights = (0.1 + 2.0 * torch.rand(4, 6)).requires_grad_(True)
    kwargs = dict(loss_agg_mode=mode, clip_ratio_low=0.2, clip_ratio_high=0.2)
    plain, _ = loss_fn(logp, old, adv, mask, **kwargs)
    (plain_grad,) = torch.autograd.grad(plain, logp)
    weighted, _ = loss_fn(logp, old, adv, mask, token_weights=weights, **kwargs)
    weighted.backward()
    # GSPO too: its sequence ratio enters each token's loss detached, so a token's loss
    # depends on its own log-prob only and each gradient scales by that token's weight.
    torch.testing.assert_close(logp.grad, weights.detach() * plain_grad)
    assert weights.grad is None  # the weights are constants of the loss


def test_decoupled_loss_by_hand():
    # pi_prox = old (the actor's recomputed log-probs), mu = rollout; ratio against pi_prox,
    # weight pi_prox / mu, tokens with weight > cap out of the loss and of the token count.
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    rollout = torch.tensor([[-1.2, -2.5, -0.7]])   # pi_prox / mu = e^0.2, e^1.5 (> 2), e^-0.3
    mask = torch.ones(1, 3, dtype=torch.long)
    weights, kept = correction_weights("decoupled", old, rollout, mask, is_cap=2.0)
    logp = _logp(old)
    loss, _ = policy_loss_clipped(logp, old, ADV, kept, token_weights=weights)
    expected = (e(0.2) * -1.0 + e(-0.3) * 0.8) / 2   # token 1 dropped: 2 tokens remain
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # token 0 unclipped: d(-A r)/dlogp = -A r = -1, weighted and over 2 tokens; token 1 left
    # the loss; token 2 is clipped (no gradient).
    close(logp.grad, [[e(0.2) * -1.0 / 2, 0.0, 0.0]])


def test_masked_tokens_get_zero_gradient_and_leave_the_denominator():
    old = OLD.nan_to_num(0.0)
    weights, kept = correction_weights("mis_token", old, ROLLOUT, MASK)
    logp = (old + 0.1).requires_grad_(True)   # ratio e^0.1 = 1.105 everywhere: never clipped
    adv = torch.ones(3, 4)
    loss, _ = policy_loss_clipped(logp, old, adv, kept, token_weights=weights)
    # 3 kept tokens, each -A r = -e^0.1, token-mean over the kept tokens only
    assert loss.item() == pytest.approx(-e(0.1), rel=1e-6)
    loss.backward()
    assert torch.equal(logp.grad != 0, kept != 0)
    close(logp.grad, (kept * -e(0.1) / 3).tolist())


def test_none_leaves_the_loss_bit_identical():
    torch.manual_seed(1)
    old = -1.0 - torch.rand(3, 5)
    logp = (old + 0.3 * torch.randn(3, 5)).requires_grad_(True)
    adv, mask = torch.randn(3, 5), (torch.rand(3, 5) > 0.3).long()
    weights, kept = correction_weights("none", old, old - 0.7, mask)
    for loss_fn, extra in ((policy_loss_clipped, {"clip_ratio_c": 3.0}), (policy_loss_gspo, {})):
        base, base_stats = loss_fn(logp, old, adv, mask, **extra)
        (base_grad,) = torch.autograd.grad(base, logp)
        for kwargs in ({"token_weights": None}, {"token_weights": weights}):
            out, stats = loss_fn(logp, old, adv, kept, **extra, **kwargs)
            (grad,) = torch.autograd.grad(out, logp)
            assert torch.equal(out, base) and torch.equal(grad, base_grad) and stats == base_stats


def test_token_weights_must_match_the_shape():
    with pytest.raises(ValueError, match="token_weights"):
        policy_loss_clipped(torch.zeros(1, 3), torch.zeros(1, 3), ADV, torch.ones(1, 3),
                            token_weights=torch.ones(1, 2))


# ---------------------------------------------------------------- config and driver wiring


def _config(overrides: list[str]):
    import rlflow

    return rlflow.compose_config("grpo", overrides=overrides)


def _check(overrides: list[str]) -> None:
    from rlflow.trainer.config_checks import check_config

    check_config(_config(overrides))


@pytest.mark.parametrize("correction", CORRECTIONS)
def test_every_correction_passes_the_checks(correction):
    _check([f"actor.off_policy.correction={correction}"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("actor.off_policy.correction=icepop", "actor.off_policy.correction='icepop' is not valid: use one of none, tis"),
        ("actor.off_policy.is_cap=0.5", "actor.off_policy.is_cap=0.5 must be >= 1"),
        ("actor.off_policy.mis_low=-0.1", "actor.off_policy.mis_low=-0.1 must be in [0, 1)"),
        ("actor.off_policy.mis_low=1.0", "actor.off_policy.mis_low=1.0 must be in [0, 1)"),
        ("actor.off_policy.mis_high=1.0", "actor.off_policy.mis_high=1.0 must be > 1"),
    ],
)
def test_bad_off_policy_settings_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        _check([override])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_a_correction_needs_old_log_probs():
    _check(["actor.off_policy.correction=none", "actor.recompute_old_log_prob=never"])
    with pytest.raises(ConfigError, match=r"set actor\.recompute_old_log_prob=auto"):
        _check(["actor.off_policy.correction=tis", "actor.recompute_old_log_prob=never"])


def test_a_correction_makes_the_driver_recompute_old_log_probs():
    from rlflow.trainer.rl_trainer import RLTrainer

    # grpo's defaults are exactly on-policy (one mini-batch, one epoch): old log-probs skipped
    def needs(overrides: list[str]) -> bool:
        trainer = SimpleNamespace(cfg=_config(overrides), use_kl_in_reward=False)
        return RLTrainer._needs_old_log_probs(trainer)

    on_policy = ["data.train_batch_size=8", "actor.ppo_mini_batch_size=8", "actor.ppo_epochs=1"]
    assert not needs(on_policy)
    for correction in CORRECTIONS[1:]:
        assert needs(on_policy + [f"actor.off_policy.correction={correction}"])


def test_the_update_receives_rollout_log_probs():
    from rlflow.data.batched_data_dict import BatchedDataDict
    from rlflow.trainer.rl_trainer import call_view

    batch = BatchedDataDict(response_mask=MASK, rollout_log_probs=ROLLOUT, old_log_probs=OLD, scores=torch.ones(3))
    view = call_view("update_policy", batch)
    assert set(view.keys()) == {"response_mask", "rollout_log_probs", "old_log_probs"}


def test_driver_metrics_are_prefixed_and_need_rollout_log_probs():
    from rlflow.data.batched_data_dict import BatchedDataDict
    from rlflow.trainer.rl_trainer import off_policy_metrics

    cfg = _config(["actor.off_policy.correction=mis_seq"]).actor.off_policy
    batch = BatchedDataDict(response_mask=MASK, rollout_log_probs=ROLLOUT, old_log_probs=OLD)
    m = off_policy_metrics(cfg, batch)
    assert set(m) == {f"actor/off_policy/{k}" for k in (
        "is_ratio_mean", "is_ratio_max", "token_masked_frac", "seq_masked_frac", "logprob_gap_mean")}
    assert m["actor/off_policy/seq_masked_frac"] == pytest.approx(1 / 3)   # row 2, as above
    assert m["actor/off_policy/token_masked_frac"] == pytest.approx(4 / 9)
    del batch["rollout_log_probs"]
    with pytest.raises(ValueError, match="rollout_log_probs"):
        off_policy_metrics(cfg, batch)
