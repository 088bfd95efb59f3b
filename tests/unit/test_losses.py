import math

import pytest
import torch

from rlflow.algorithms.losses import (
    AGG_MODES,
    aggregate_loss,
    count_tokens_and_seqs,
    dpo_loss,
    kl_penalty,
    policy_loss_clipped,
    policy_loss_gspo,
    value_loss_clipped,
)

# ---------------------------------------------------------------- aggregation

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])


def test_token_mean():
    assert aggregate_loss(LOSS, MASK, "token-mean").item() == pytest.approx(
        (1 + 2 + 4 + 7 + 8 + 9) / 6
    )


def test_seq_mean_token_sum():
    assert aggregate_loss(LOSS, MASK, "seq-mean-token-sum").item() == pytest.approx(
        (3 + 4 + 24) / 3
    )


def test_seq_mean_token_mean():
    assert aggregate_loss(LOSS, MASK, "seq-mean-token-mean").item() == pytest.approx(
        (1.5 + 4 + 8) / 3
    )


def test_seq_mean_token_sum_norm():
    assert aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm").item() == pytest.approx(
        31 / (3 * 3)
    )
    got = aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm", norm_length=10)
    assert got.item() == pytest.approx(31 / (3 * 10))


def test_empty_rows_contribute_zero_and_no_nan():
    loss = torch.tensor([[1.0, float("nan")], [2.0, 3.0]])
    mask = torch.tensor([[0, 0], [1, 1]])
    for mode in AGG_MODES:
        out = aggregate_loss(loss, mask, mode)
        assert torch.isfinite(out)
    # the all-masked row is not counted as a sequence
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx(2.5)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx(5.0)
    for mode in AGG_MODES:
        assert aggregate_loss(loss, torch.zeros_like(mask), mode).item() == 0.0


@pytest.mark.parametrize("mode", AGG_MODES)
def test_global_normalisation_contract(mode):
    """Micro-batches (and 'ranks') summed with global counts equal the whole-batch value."""
    torch.manual_seed(0)
    loss = torch.randn(8, 5)
    mask = (torch.rand(8, 5) > 0.3).long()
    mask[3] = 0  # an empty row
    mask[:, 0] = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1])
    whole = aggregate_loss(loss, mask, mode, norm_length=7)
    tokens, seqs = count_tokens_and_seqs(mask)
    # two ranks x two micro-batches of uneven sizes
    pieces = [(0, 3), (3, 4), (4, 7), (7, 8)]
    total = sum(
        aggregate_loss(
            loss[a:b],
            mask[a:b],
            mode,
            global_num_tokens=tokens,
            global_num_seqs=seqs,
            norm_length=7,
        )
        for a, b in pieces
    )
    torch.testing.assert_close(total, whole)


def test_global_counts_as_tensors_and_gradient_scaling():
    loss = torch.tensor([[2.0, 4.0]], requires_grad=True)
    mask = torch.ones(1, 2)
    out = aggregate_loss(loss, mask, "token-mean", global_num_tokens=torch.tensor(8))
    assert out.item() == pytest.approx(6 / 8)
    out.backward()
    torch.testing.assert_close(loss.grad, torch.full((1, 2), 1 / 8))


def test_count_tokens_and_seqs():
    assert count_tokens_and_seqs(MASK) == (6, 3)
    assert count_tokens_and_seqs(torch.tensor([[0, 0], [0, 1]])) == (1, 1)


def test_aggregate_errors():
    with pytest.raises(ValueError, match="token-mean"):
        aggregate_loss(LOSS, MASK, "mean")
    with pytest.raises(ValueError, match="shape"):
        aggregate_loss(LOSS, MASK[:, :2], "token-mean")
    with pytest.raises(ValueError, match="global_num_tokens"):
        aggregate_loss(LOSS, MASK, "token-mean", global_num_tokens=-1)


# ---------------------------------------------------------------- clipped policy loss


def _naive_ppo_token(logp, old, adv, low, high, c=None):
    ratio = math.exp(logp - old)
    loss = max(-adv * ratio, -adv * min(max(ratio, 1 - low), 1 + high))
    if c is not None and adv < 0:
        loss = min(loss, -adv * c)
    return loss


def _ppo_case(logps, olds, advs, **kw):
    logp = torch.tensor([logps])
    old = torch.tensor([olds])
    adv = torch.tensor([advs])
    mask = torch.ones_like(logp)
    return policy_loss_clipped(logp, old, adv, mask, **kw)


def test_clipped_loss_high_side_active():
    # A > 0 and ratio = e^0.5 ~ 1.65 > 1.2: the loss uses the clipped ratio 1.2
    loss, m = _ppo_case([0.5], [0.0], [2.0], clip_ratio_low=0.2, clip_ratio_high=0.2)
    assert loss.item() == pytest.approx(-2.0 * 1.2)
    assert m["pg_clipfrac"] == 1.0 and m["pg_clipfrac_lower"] == 0.0
    assert m["ppo_kl"] == pytest.approx(-0.5)


def test_clipped_loss_low_side_active():
    # A < 0 and ratio = e^-0.5 ~ 0.61 < 0.8: max picks -A * 0.8
    loss, m = _ppo_case([-0.5], [0.0], [-1.0], clip_ratio_low=0.2, clip_ratio_high=0.28)
    assert loss.item() == pytest.approx(0.8)
    assert m["pg_clipfrac"] == 1.0


def test_clipped_loss_inside_range_and_asymmetric_high():
    logps, olds, advs = [0.1, 0.25, -0.1], [0.0, 0.0, 0.0], [1.0, 1.0, -1.0]
    loss, m = _ppo_case(logps, olds, advs, clip_ratio_low=0.2, clip_ratio_high=0.28)
    want = [
        _naive_ppo_token(lp, o, a, 0.2, 0.28) for lp, o, a in zip(logps, olds, advs, strict=True)
    ]
    # e^0.25 = 1.284 > 1.28 so the second token is clipped, the others are not
    assert want[1] == pytest.approx(-1.28)
    assert loss.item() == pytest.approx(sum(want) / 3)
    assert m["pg_clipfrac"] == pytest.approx(1 / 3)


def test_dual_clip_active_and_inactive():
    # ratio = e^2 ~ 7.39 with A = -1: plain PPO loss 7.39, dual clip caps it at c = 3
    loss, m = _ppo_case([2.0], [0.0], [-1.0], clip_ratio_c=3.0)
    assert loss.item() == pytest.approx(3.0)
    assert m["pg_clipfrac_lower"] == 1.0
    loss_no, m_no = _ppo_case([2.0], [0.0], [-1.0])
    assert loss_no.item() == pytest.approx(math.exp(2.0), rel=1e-6)
    assert m_no["pg_clipfrac_lower"] == 0.0
    # ratio 1.5 < c: dual clip inactive even though it is configured
    loss_in, m_in = _ppo_case([math.log(1.5)], [0.0], [-1.0], clip_ratio_c=3.0)
    assert loss_in.item() == pytest.approx(1.5)
    assert m_in["pg_clipfrac_lower"] == 0.0
    # positive advantages are never dual-clipped
    loss_pos, _ = _ppo_case([2.0], [0.0], [1.0], clip_ratio_c=3.0)
    assert loss_pos.item() == pytest.approx(-1.2)


def test_clipped_loss_random_vs_naive_with_mask_and_gradient():
    torch.manual_seed(0)
    logp = (torch.randn(3, 4) * 0.3).requires_grad_(True)
    old = torch.randn(3, 4) * 0.3
    adv = torch.randn(3, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    old_masked = old.clone()
    old_masked[0, 3] = float("-inf")  # padding garbage must not leak
    loss, _ = policy_loss_clipped(
        logp, old_masked, adv, mask, clip_ratio_c=3.0, loss_agg_mode="seq-mean-token-mean"
    )
    rows = []
    for b in range(3):
        vals = [
            _naive_ppo_token(logp[b, t].item(), old[b, t].item(), adv[b, t].item(), 0.2, 0.2, 3.0)
            for t in range(4)
            if mask[b, t]
        ]
        rows.append(sum(vals) / len(vals))
    assert loss.item() == pytest.approx(sum(rows) / 3, abs=1e-6)
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[0, 3].item() == 0.0


def test_clipped_loss_extreme_ratio_is_finite():
    loss, _ = _ppo_case([80.0], [0.0], [-1.0])
    assert loss.item() == pytest.approx(math.exp(20.0), rel=1e-5)


def test_clipped_loss_bad_args():
    with pytest.raises(ValueError, match="clip_ratio_c"):
        _ppo_case([0.0], [0.0], [1.0], clip_ratio_c=0.5)
    with pytest.raises(ValueError, match="shape"):
        policy_loss_clipped(
            torch.zeros(1, 2), torch.zeros(1, 3), torch.zeros(1, 2), torch.ones(1, 2)
        )


# ---------------------------------------------------------------- GSPO


def test_gspo_value_and_gradient():
    logp = torch.tensor([[0.1, -0.3, 0.5], [0.2, 0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.0, -0.1, 0.3], [0.1, 0.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    low, high = 0.05, 0.1
    loss, m = policy_loss_gspo(logp, old, adv, mask, clip_ratio_low=low, clip_ratio_high=high)
    # seq 0: mean log-ratio (0.1 - 0.2 + 0.2)/3 = 1/30 -> s = e^(1/30) ~ 1.034, unclipped
    # seq 1: log-ratio 0.1 -> s = 1.105 > 1.1, A < 0:
    #        max(2 * 1.105, 2 * 1.1) = 2 * 1.105 (unclipped)
    s0, s1 = math.exp(1 / 30), math.exp(0.1)
    want = (-1.0 * s0 + 2.0 * s1) / 2
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert m["pg_clipfrac"] == 0.0
    loss.backward()
    # d/dlogp_t of the sequence objective -A * s / 2 with s = exp(mean_t(logp - old))
    g0 = -1.0 * s0 / 3 / 2
    g1 = 2.0 * s1 / 1 / 2
    torch.testing.assert_close(logp.grad, torch.tensor([[g0, g0, g0], [g1, 0.0, 0.0]]))


def test_gspo_clipped_sequence_has_no_gradient():
    logp = torch.tensor([[0.5, 0.5]], requires_grad=True)
    old = torch.zeros(1, 2)
    adv = torch.ones(1, 2)
    loss, m = policy_loss_gspo(
        logp, old, adv, torch.ones(1, 2), clip_ratio_low=0.2, clip_ratio_high=0.2
    )
    assert loss.item() == pytest.approx(-1.2)
    assert m["pg_clipfrac"] == 1.0
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(1, 2))


# ---------------------------------------------------------------- KL


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    d = [lp - r for lp, r in zip(logp.tolist(), ref.tolist(), strict=True)]  # [0.5, -1, 0]
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor(d))
    torch.testing.assert_close(kl_penalty(logp, ref, "abs"), torch.tensor([abs(x) for x in d]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([0.5 * x * x for x in d]))
    torch.testing.assert_close(kl_penalty(logp, ref, "mse"), kl_penalty(logp, ref, "k2"))
    k3 = [math.exp(-x) + x - 1 for x in d]
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor(k3))
    torch.testing.assert_close(kl_penalty(logp, ref, "low_var_kl"), torch.tensor(k3))
    assert k3[2] == 0.0 and min(k3) >= 0


def test_k3_clamp():
    # ref - logp = 5: exp(5) - 5 - 1 = 142.4 -> clamped to 10
    logp = torch.tensor([0.0, 0.0, -100.0])
    ref = torch.tensor([5.0, -1.0, 0.0])
    out = kl_penalty(logp, ref, "k3")
    assert out[0].item() == 10.0
    assert out[1].item() == pytest.approx(math.exp(-1) + 1 - 1)
    assert out[2].item() == 10.0  # log-ratio 100 clamped to 20 first: no inf/nan
    # ref - logp = -3: exp(-3) + 3 - 1 = 2.0498 (inside the clamp), -30: 19 + e^-20 -> 10
    out = kl_penalty(torch.tensor([3.0, 30.0]), torch.tensor([0.0, 0.0]), "k3")
    assert out[0].item() == pytest.approx(math.exp(-3) + 2)
    assert out[1].item() == 10.0


def test_verl_kl_names_and_straight_through_variants():
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    ref = torch.tensor([-1.5, -1.0, -0.5])
    d = [0.5, -1.0, 0.0]
    torch.testing.assert_close(kl_penalty(logp, ref, "kl"), torch.tensor(d))  # verl's default
    for kind, value in (("kl+", d), ("k3+", [math.exp(-x) + x - 1 for x in d]), ("abs+", [abs(x) for x in d])):
        out = kl_penalty(logp, ref, kind)
        torch.testing.assert_close(out.detach(), torch.tensor(value))
        (grad,) = torch.autograd.grad(out.sum(), logp)
        # the gradient of k2 = 0.5 * d^2 with respect to logp is d
        torch.testing.assert_close(grad, torch.tensor(d))
    (grad,) = torch.autograd.grad(kl_penalty(logp, ref, "mse+").sum(), logp)
    torch.testing.assert_close(grad, torch.tensor(d))


def test_kl_unknown_kind():
    with pytest.raises(ValueError, match="k1.*k3"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")


# ---------------------------------------------------------------- value loss


def test_value_loss_clip():
    values = torch.tensor([[1.0, 0.0, 2.0, 9.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 1.9, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, m = value_loss_clipped(values, old, returns, mask, cliprange_value=0.5)
    # token 0: v=1 -> clipped 0.5; (1-2)^2=1, (0.5-2)^2=2.25 -> 2.25 (clip active)
    # token 1: v=old=0; both 1 -> 1
    # token 2: v=2, clipped stays 2 (|2-1.9|<0.5); 4 -> 4
    want = 0.5 * (2.25 + 1.0 + 4.0) / 3
    assert loss.item() == pytest.approx(want)
    assert m["vf_clipfrac"] == pytest.approx(1 / 3)
    loss.backward()
    # clipped branch for token 0 has no gradient wrt values
    torch.testing.assert_close(
        values.grad, torch.tensor([[0.0, 0.5 * 2 * (0 - 1) / 3, 0.5 * 2 * 2 / 3, 0.0]])
    )


def test_value_clip_fraction_ignores_rounding_of_in_range_values():
    # In float32, old + (v - old) is not v here; v is far inside the clip range, so no token is
    # clipped, although the rounded value's loss is a little larger.
    values = torch.tensor([[-3.457080602645874, 0.25]])
    old = torch.tensor([[1.9837732315063477, 0.0]])
    assert (old + (values - old))[0, 0] != values[0, 0]
    returns = torch.zeros(1, 2)
    loss, m = value_loss_clipped(values, old, returns, torch.ones(1, 2), cliprange_value=100.0)
    assert m["vf_clipfrac"] == 0.0
    assert loss.item() == pytest.approx(0.5 * (3.457080602645874**2 + 0.25**2) / 2, rel=1e-6)


# ---------------------------------------------------------------- DPO


def _dpo_inputs():
    pc = torch.tensor([-10.0, -4.0])
    pr = torch.tensor([-12.0, -3.0])
    rc = torch.tensor([-11.0, -4.5])
    rr = torch.tensor([-11.5, -3.0])
    return pc, pr, rc, rr


def _h():
    # h = (pc - pr) - (rc - rr) = (2 - 0.5, -1 + 1.5) = (1.5, 0.5)
    return [1.5, 0.5]


def _logsig(x):
    return -math.log1p(math.exp(-x))


def test_dpo_sigmoid_and_rewards():
    beta = 0.1
    losses, cr, rr_ = dpo_loss(*_dpo_inputs(), beta=beta)
    torch.testing.assert_close(losses, torch.tensor([-_logsig(beta * h) for h in _h()]))
    torch.testing.assert_close(cr, torch.tensor([0.1 * 1.0, 0.1 * 0.5]))
    torch.testing.assert_close(rr_, torch.tensor([0.1 * -0.5, 0.0]))


def test_dpo_sigmoid_label_smoothing():
    beta, eps = 0.5, 0.1
    losses, _, _ = dpo_loss(*_dpo_inputs(), beta=beta, label_smoothing=eps)
    want = [-(1 - eps) * _logsig(beta * h) - eps * _logsig(-beta * h) for h in _h()]
    torch.testing.assert_close(losses, torch.tensor(want))


def test_dpo_ipo():
    beta = 0.25
    losses, _, _ = dpo_loss(*_dpo_inputs(), beta=beta, loss_type="ipo")
    torch.testing.assert_close(losses, torch.tensor([(h - 2.0) ** 2 for h in _h()]))


def test_dpo_hinge():
    beta = 1.0
    losses, _, _ = dpo_loss(*_dpo_inputs(), beta=beta, loss_type="hinge")
    torch.testing.assert_close(losses, torch.tensor([0.0, 0.5]))


def test_dpo_robust():
    beta, eps = 0.5, 0.2
    losses, _, _ = dpo_loss(*_dpo_inputs(), beta=beta, loss_type="robust", label_smoothing=eps)
    want = [
        (-(1 - eps) * _logsig(beta * h) + eps * _logsig(-beta * h)) / (1 - 2 * eps) for h in _h()
    ]
    torch.testing.assert_close(losses, torch.tensor(want))
    plain, _, _ = dpo_loss(*_dpo_inputs(), beta=beta, loss_type="robust")
    sig, _, _ = dpo_loss(*_dpo_inputs(), beta=beta)
    torch.testing.assert_close(plain, sig)


def test_dpo_gradient_flows_to_policy_only():
    pc, pr, rc, rr = _dpo_inputs()
    pc.requires_grad_(True)
    losses, cr, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    losses.sum().backward()
    # d/dpc of -logsigmoid(beta h) = -beta * sigmoid(-beta h)
    want = torch.tensor([-0.1 / (1 + math.exp(0.1 * h)) for h in _h()])
    torch.testing.assert_close(pc.grad, want)
    assert not cr.requires_grad


def test_dpo_bad_args():
    with pytest.raises(ValueError, match="sigmoid.*ipo.*hinge.*robust"):
        dpo_loss(*_dpo_inputs(), beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*_dpo_inputs(), beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*_dpo_inputs(), beta=0.1, label_smoothing=0.5)
