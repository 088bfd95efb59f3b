"""KL controllers and the KL penalty inside the reward, against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from rlflow.algorithms.kl_control import (
    AdaptiveKLController,
    FixedKLController,
    apply_kl_in_reward,
    build_kl_controller,
)
from rlflow.errors import ConfigError


def test_fixed_controller_never_moves():
    ctrl = FixedKLController(0.05)
    for kl in (0.0, 1.0, 100.0):
        ctrl.update(current_kl=kl, n_steps=1000)
    assert ctrl.value == 0.05


def test_adaptive_controller_follows_ziegler_update():
    ctrl = AdaptiveKLController(init_kl_coef=0.2, target_kl=0.1, horizon=1000)
    # kl / target - 1 = 0.5, clipped to 0.2: value * (1 + 0.2 * 100 / 1000) = 0.2 * 1.02
    ctrl.update(current_kl=0.15, n_steps=100)
    assert ctrl.value == pytest.approx(0.204)
    # kl / target - 1 = -0.1 (inside the clip): 0.204 * (1 - 0.1 * 50 / 1000)
    ctrl.update(current_kl=0.09, n_steps=50)
    assert ctrl.value == pytest.approx(0.204 * 0.995)
    # Far below target: clipped at -0.2.
    ctrl.update(current_kl=0.0, n_steps=1000)
    assert ctrl.value == pytest.approx(0.204 * 0.995 * 0.8)


def test_adaptive_controller_on_target_stays_put():
    ctrl = AdaptiveKLController(init_kl_coef=0.3, target_kl=0.5, horizon=10)
    ctrl.update(current_kl=0.5, n_steps=7)
    assert ctrl.value == pytest.approx(0.3)


def test_adaptive_controller_converges_kl_towards_target():
    # A toy system whose KL is inversely proportional to the coefficient: the controller must
    # settle where kl == target, i.e. at value = 0.02 / 0.1 = 0.2.
    ctrl = AdaptiveKLController(init_kl_coef=0.05, target_kl=0.1, horizon=100)
    for _ in range(400):
        ctrl.update(current_kl=0.02 / ctrl.value, n_steps=10)
    assert ctrl.value == pytest.approx(0.2, rel=1e-3)


def test_controller_state_round_trip():
    ctrl = AdaptiveKLController(0.1, 0.05, 100)
    ctrl.update(1.0, 10)
    other = AdaptiveKLController(0.1, 0.05, 100)
    other.load_state_dict(ctrl.state_dict())
    assert other.value == ctrl.value


def test_build_from_config_and_errors():
    fixed = build_kl_controller(OmegaConf.create({"type": "fixed", "kl_coef": 0.3, "target_kl": 1, "horizon": 1}))
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.3
    adaptive = build_kl_controller(OmegaConf.create({"type": "adaptive", "kl_coef": 0.3, "target_kl": 6.0, "horizon": 10000}))
    assert isinstance(adaptive, AdaptiveKLController) and adaptive.target == 6.0
    with pytest.raises(ConfigError, match="algorithm.kl_ctrl.type"):
        build_kl_controller(OmegaConf.create({"type": "pid", "kl_coef": 0.3, "target_kl": 1, "horizon": 1}))
    with pytest.raises(ConfigError, match="target_kl"):
        AdaptiveKLController(0.1, 0.0, 10)
    with pytest.raises(ConfigError, match="horizon"):
        AdaptiveKLController(0.1, 0.1, 0)
    with pytest.raises(ConfigError, match="kl_coef"):
        FixedKLController(-1.0)


def _naive_kl(logp: float, ref: float, kind: str) -> float:
    d = logp - ref
    if kind == "k1":
        return d
    if kind == "abs":
        return abs(d)
    if kind == "k2":
        return 0.5 * d * d
    return math.exp(-d) + d - 1.0  # k3: exp(ref - logp) - (ref - logp) - 1


@pytest.mark.parametrize("kind", ["k1", "abs", "k2", "k3"])
def test_apply_kl_in_reward_matches_naive_loop(kind):
    torch.manual_seed(0)
    scores = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    logp = -torch.rand(3, 4) * 2
    ref = -torch.rand(3, 4) * 2
    ctrl = FixedKLController(0.1)
    rewards, metrics = apply_kl_in_reward(scores, logp, ref, mask, ctrl, kind)

    per_seq = []
    for i in range(3):
        kls = []
        for t in range(4):
            kl = _naive_kl(logp[i, t].item(), ref[i, t].item(), kind) if mask[i, t] else 0.0
            assert rewards[i, t].item() == pytest.approx(scores[i, t].item() - 0.1 * kl, abs=1e-6)
            if mask[i, t]:
                kls.append(kl)
        per_seq.append(sum(kls) / len(kls) if kls else 0.0)
    assert metrics["actor/reward_kl_penalty"] == pytest.approx(sum(per_seq) / 3, abs=1e-6)
    assert metrics["actor/reward_kl_penalty_coeff"] == 0.1


def test_apply_kl_in_reward_uses_coefficient_before_update():
    scores = torch.zeros(2, 2)
    mask = torch.ones(2, 2)
    logp = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])
    ref = torch.tensor([[-2.0, -2.0], [-2.0, -2.0]])  # k1 = 1 everywhere
    ctrl = AdaptiveKLController(init_kl_coef=0.5, target_kl=0.5, horizon=4)
    rewards, metrics = apply_kl_in_reward(scores, logp, ref, mask, ctrl, "k1")
    assert torch.allclose(rewards, torch.full((2, 2), -0.5))
    assert metrics["actor/reward_kl_penalty_coeff"] == 0.5
    # kl = 1 = 2 x target: error clipped to 0.2; n_steps = 2 rows: 0.5 * (1 + 0.2 * 2 / 4)
    assert ctrl.value == pytest.approx(0.55)


def test_masked_positions_ignore_garbage_log_probs():
    scores = torch.tensor([[0.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    logp = torch.tensor([[-1.0, -1.0, float("-inf")]])
    ref = torch.tensor([[-1.0, -1.0, float("nan")]])
    rewards, metrics = apply_kl_in_reward(scores, logp, ref, mask, FixedKLController(1.0), "k1")
    assert torch.equal(rewards, torch.tensor([[0.0, 1.0, 0.0]]))
    assert metrics["actor/reward_kl_penalty"] == 0.0


# ------------------------------------------------------------------ config checks


def _check(overrides: list[str]) -> None:
    import rlflow
    from rlflow.trainer.config_checks import check_config

    check_config(rlflow.compose_config("ppo", overrides=overrides))


def test_ppo_recipe_passes_the_checks():
    _check([])


@pytest.mark.parametrize(
    "override, key",
    [
        ("algorithm.kl_penalty=k4", "algorithm.kl_penalty"),
        ("algorithm.kl_ctrl.type=pid", "algorithm.kl_ctrl.type"),
        ("algorithm.kl_ctrl.target_kl=0", "algorithm.kl_ctrl.target_kl"),
        ("algorithm.kl_ctrl.horizon=0", "algorithm.kl_ctrl.horizon"),
        ("algorithm.kl_ctrl.kl_coef=-0.1", "algorithm.kl_ctrl.kl_coef"),
        ("actor.recompute_old_log_prob=never", "actor.recompute_old_log_prob"),
    ],
)
def test_bad_kl_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _check([override])
