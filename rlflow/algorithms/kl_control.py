"""KL penalty inside the reward, and the controllers that set its coefficient.

Classic RLHF PPO (Ziegler et al., 2019; InstructGPT) does not add a KL term to the loss; it
subtracts ``beta * KL(policy || ref)`` from every response token's reward, so the critic and
the advantages see the penalty like any other reward. ``beta`` comes from a controller:

* ``FixedKLController``: ``beta`` never changes.
* ``AdaptiveKLController``: a proportional controller that steers the measured KL toward
  ``target_kl``. After a step that measured ``kl`` over ``n`` responses,
  ``beta <- beta * (1 + clip(kl / target_kl - 1, -0.2, 0.2) * n / horizon)``.
  The clip bounds one step's correction to 20 % of ``n / horizon``, so ``horizon`` (counted
  in responses) is roughly how many samples it takes to correct a large error.

The KL used for the controller is the batch mean of the per-sequence token-mean KL, the
quantity verl reports as ``actor/reward_kl_penalty``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from rlflow.algorithms.losses import kl_penalty
from rlflow.errors import ConfigError
from rlflow.utils.torch_functional import masked_mean

__all__ = [
    "KL_CONTROLLER_TYPES",
    "KLController",
    "FixedKLController",
    "AdaptiveKLController",
    "build_kl_controller",
    "apply_kl_in_reward",
]

KL_CONTROLLER_TYPES = ("fixed", "adaptive")
# Largest relative correction per unit of n / horizon (Ziegler et al.'s choice).
_ADAPTIVE_CLIP = 0.2


class KLController(Protocol):
    value: float

    def update(self, current_kl: float, n_steps: int) -> None: ...

    def state_dict(self) -> dict[str, float]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class FixedKLController:
    """``value`` stays at ``kl_coef``; ``update`` is a no-op."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ConfigError(f"algorithm.kl_ctrl.kl_coef={kl_coef} must be >= 0")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller on ``beta`` (see the module docstring for the update rule)."""

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int) -> None:
        if init_kl_coef < 0:
            raise ConfigError(f"algorithm.kl_ctrl.kl_coef={init_kl_coef} must be >= 0")
        if target_kl <= 0:
            raise ConfigError(
                f"algorithm.kl_ctrl.target_kl={target_kl} must be > 0 for the adaptive controller"
            )
        if horizon <= 0:
            raise ConfigError(
                f"algorithm.kl_ctrl.horizon={horizon} must be > 0 (responses over which to correct)"
            )
        self.value = float(init_kl_coef)
        self.target = float(target_kl)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Scale ``value`` after a step that measured ``current_kl`` over ``n_steps`` responses."""
        error = min(max(current_kl / self.target - 1.0, -_ADAPTIVE_CLIP), _ADAPTIVE_CLIP)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


def build_kl_controller(kl_ctrl_cfg: Any) -> FixedKLController | AdaptiveKLController:
    """The controller described by ``algorithm.kl_ctrl`` (``type``, ``kl_coef``, ``target_kl``,
    ``horizon``)."""
    kind = kl_ctrl_cfg.type
    if kind == "fixed":
        return FixedKLController(float(kl_ctrl_cfg.kl_coef))
    if kind == "adaptive":
        return AdaptiveKLController(
            float(kl_ctrl_cfg.kl_coef), float(kl_ctrl_cfg.target_kl), int(kl_ctrl_cfg.horizon)
        )
    raise ConfigError(
        f"algorithm.kl_ctrl.type='{kind}' is not valid: use one of {', '.join(KL_CONTROLLER_TYPES)}"
    )


@torch.no_grad()
def apply_kl_in_reward(
    token_level_scores: torch.Tensor,
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    controller: KLController,
    kind: str = "k1",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Subtract the KL penalty from every valid token's reward, then update the controller.

    Args (all ``(B, T)``): ``token_level_scores`` (the reward model / rule scores),
    ``log_probs`` (the sampling policy's log-probs of the response tokens), ``ref_log_probs``
    (the reference policy's), ``response_mask`` (0/1). ``kind`` is a ``kl_penalty`` estimator.

    Returns ``(token_level_rewards, metrics)`` where
    ``token_level_rewards = scores - beta * kl * mask`` with ``beta`` the controller's value
    *before* this update, and metrics ``actor/reward_kl_penalty`` (batch mean of per-sequence
    token-mean KL; sequences without valid tokens count as 0) and
    ``actor/reward_kl_penalty_coeff`` (the ``beta`` used). The controller then moves with
    ``n_steps = B``.
    """
    kl = kl_penalty(log_probs.float(), ref_log_probs.float(), kind)
    mask = response_mask.to(kl.dtype)
    kl = torch.where(response_mask != 0, kl * mask, torch.zeros_like(kl))
    beta = controller.value
    rewards = token_level_scores.float() - beta * kl
    current_kl = masked_mean(kl, response_mask, dim=-1).mean().item()
    controller.update(current_kl=current_kl, n_steps=int(token_level_scores.shape[0]))
    return rewards, {"actor/reward_kl_penalty": current_kl, "actor/reward_kl_penalty_coeff": beta}
