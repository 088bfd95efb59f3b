"""Advantage estimators, looked up by name.

Every estimator has the same keyword-only signature so the trainer can call any of them
the same way (arguments an estimator does not use are ignored):

    estimator(*, token_level_rewards, response_mask, group_index=None, values=None,
              gamma=1.0, lam=1.0, norm_by_std=True, epsilon=1e-6)
        -> (advantages, returns)

* ``token_level_rewards``: ``(B, T)`` float, the sequence reward sits at the last valid
  response token and zeros elsewhere (a per-token reward shaping term may add more).
* ``response_mask``: ``(B, T)`` 0/1, valid response tokens.
* ``group_index``: length-``B`` sequence of hashables; rows with equal ids were sampled
  from the same prompt (required by the group-based estimators).
* ``values``: ``(B, T)`` critic values (required by ``gae``).

Both outputs are ``(B, T)`` float tensors with zeros at masked positions. For the
critic-free estimators ``returns`` equals ``advantages`` (nothing regresses on it).
Outputs carry no gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

from rlflow.utils.torch_functional import masked_whiten

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "compute_advantages",
    "grpo_advantages",
    "rloo_advantages",
    "reinforce_plus_plus_advantages",
    "reinforce_plus_plus_baseline_advantages",
    "gae_advantages",
]

AdvantageFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------


def _check_inputs(
    name: str, token_level_rewards: torch.Tensor, response_mask: torch.Tensor
) -> None:
    if token_level_rewards.dim() != 2:
        raise ValueError(
            f"{name}: token_level_rewards must be 2-D (B, T), got shape "
            f"{tuple(token_level_rewards.shape)}"
        )
    if response_mask.shape != token_level_rewards.shape:
        raise ValueError(
            f"{name}: response_mask shape {tuple(response_mask.shape)} != token_level_rewards "
            f"shape {tuple(token_level_rewards.shape)}; they must match"
        )


def _group_ids(
    name: str, group_index: Sequence[Hashable] | torch.Tensor | None, batch: int
) -> torch.Tensor:
    """Map arbitrary hashable group labels to dense ``long`` ids ``0..G-1``."""
    if group_index is None:
        raise ValueError(
            f"{name}: group_index is required (one id per row; rows of the same prompt share it)"
        )
    labels = group_index.tolist() if hasattr(group_index, "tolist") else list(group_index)
    if len(labels) != batch:
        raise ValueError(
            f"{name}: group_index has {len(labels)} entries but the batch has {batch} rows"
        )
    dense: dict[Hashable, int] = {}
    ids = [dense.setdefault(label, len(dense)) for label in labels]
    return torch.tensor(ids, dtype=torch.long)


def _group_sums(scores: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (sum of the row's group, size of the row's group)."""
    num_groups = int(ids.max().item()) + 1 if ids.numel() else 0
    sums = torch.zeros(num_groups, dtype=scores.dtype, device=scores.device)
    sums.index_add_(0, ids, scores)
    counts = torch.bincount(ids, minlength=num_groups).to(scores.dtype)
    return sums[ids], counts[ids]


def _broadcast(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Place a per-sequence scalar on every valid token of its row."""
    return scores.unsqueeze(-1) * response_mask.to(scores.dtype)


def _sequence_scores(token_level_rewards: torch.Tensor) -> torch.Tensor:
    rewards = (
        token_level_rewards
        if token_level_rewards.is_floating_point()
        else token_level_rewards.float()
    )
    return rewards.sum(dim=-1)


# --------------------------------------------------------------------------------------
# Estimators
# --------------------------------------------------------------------------------------


@torch.no_grad()
def grpo_advantages(
    *,
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_index: Sequence[Hashable] | torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    norm_by_std: bool = True,
    epsilon: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: group-relative score, one value per sequence broadcast over its tokens.

    ``score_i = sum_t r_it``; ``adv_i = (score_i - mean_g) / (std_g + epsilon)`` with the
    unbiased (n-1) std of the group, or ``score_i - mean_g`` when ``norm_by_std`` is False
    (Dr.GRPO). A group of one sample has no baseline and gets advantage 0.
    """
    _check_inputs("grpo", token_level_rewards, response_mask)
    scores = _sequence_scores(token_level_rewards)
    ids = _group_ids("grpo", group_index, scores.shape[0]).to(scores.device)
    sums, counts = _group_sums(scores, ids)
    mean = sums / counts
    sq_sums, _ = _group_sums((scores - mean) ** 2, ids)
    singleton = counts < 2
    std = torch.sqrt(sq_sums / torch.clamp(counts - 1, min=1))
    adv = scores - mean
    if norm_by_std:
        adv = adv / (std + epsilon)
    adv = torch.where(singleton, torch.zeros_like(adv), adv)
    adv = _broadcast(adv, response_mask)
    return adv, adv.clone()


@torch.no_grad()
def rloo_advantages(
    *,
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_index: Sequence[Hashable] | torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    norm_by_std: bool = True,
    epsilon: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO: leave-one-out baseline, ``adv_i = s_i - mean_{j != i} s_j`` within the group.

    A group of one sample gets advantage 0. No std normalisation.
    """
    _check_inputs("rloo", token_level_rewards, response_mask)
    scores = _sequence_scores(token_level_rewards)
    ids = _group_ids("rloo", group_index, scores.shape[0]).to(scores.device)
    sums, counts = _group_sums(scores, ids)
    others_mean = (sums - scores) / torch.clamp(counts - 1, min=1)
    adv = torch.where(counts < 2, torch.zeros_like(scores), scores - others_mean)
    adv = _broadcast(adv, response_mask)
    return adv, adv.clone()


def _discounted_returns(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Returns-to-go over valid tokens: ``G_t = r_t + gamma * G_next`` where ``next`` is
    the next valid position of the row; masked positions are skipped and get 0."""
    rewards = (
        token_level_rewards
        if token_level_rewards.is_floating_point()
        else token_level_rewards.float()
    )
    valid = response_mask != 0
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        candidate = rewards[:, t] + gamma * running
        running = torch.where(valid[:, t], candidate, running)
        returns[:, t] = torch.where(valid[:, t], candidate, torch.zeros_like(candidate))
    return returns


@torch.no_grad()
def reinforce_plus_plus_advantages(
    *,
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_index: Sequence[Hashable] | torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    norm_by_std: bool = True,
    epsilon: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: discounted token returns-to-go, whitened over all valid tokens of the
    batch. ``returns`` are the raw (unwhitened) returns-to-go."""
    _check_inputs("reinforce_plus_plus", token_level_rewards, response_mask)
    returns = _discounted_returns(token_level_rewards, response_mask, gamma)
    adv = masked_whiten(returns, response_mask)
    return adv, returns


@torch.no_grad()
def reinforce_plus_plus_baseline_advantages(
    *,
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_index: Sequence[Hashable] | torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    norm_by_std: bool = True,
    epsilon: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ with baseline: subtract the group-mean score, broadcast over valid
    tokens, then whiten over all valid tokens of the batch."""
    _check_inputs("reinforce_plus_plus_baseline", token_level_rewards, response_mask)
    scores = _sequence_scores(token_level_rewards)
    ids = _group_ids("reinforce_plus_plus_baseline", group_index, scores.shape[0]).to(scores.device)
    sums, counts = _group_sums(scores, ids)
    centered = _broadcast(scores - sums / counts, response_mask)
    adv = masked_whiten(centered, response_mask)
    return adv, adv.clone()


@torch.no_grad()
def gae_advantages(
    *,
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_index: Sequence[Hashable] | torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    norm_by_std: bool = True,
    epsilon: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the valid tokens of each row.

    ``delta_t = r_t + gamma * V_next - V_t``; ``A_t = delta_t + gamma * lam * A_next``,
    where ``next`` is the next *valid* position (0 past the last one), so masked
    positions inside a row are skipped rather than treated as terminal.
    ``returns = A + V`` is taken before whitening; the advantages are then whitened over
    all valid tokens of the batch.
    """
    _check_inputs("gae", token_level_rewards, response_mask)
    if values is None:
        raise ValueError("gae: values (B, T) from the critic are required")
    if values.shape != token_level_rewards.shape:
        raise ValueError(
            f"gae: values shape {tuple(values.shape)} != token_level_rewards shape "
            f"{tuple(token_level_rewards.shape)}; they must match"
        )
    rewards = (
        token_level_rewards
        if token_level_rewards.is_floating_point()
        else token_level_rewards.float()
    )
    values = values.to(rewards.dtype)
    valid = response_mask != 0
    zeros = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    next_value, next_adv = zeros, zeros
    adv = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        candidate = delta + gamma * lam * next_adv
        keep = valid[:, t]
        adv[:, t] = torch.where(keep, candidate, zeros)
        next_value = torch.where(keep, values[:, t], next_value)
        next_adv = torch.where(keep, candidate, next_adv)
    returns = torch.where(valid, adv + values, torch.zeros_like(adv))
    return masked_whiten(adv, response_mask), returns


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {
    "grpo": grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_plus_plus": reinforce_plus_plus_advantages,
    "reinforce_plus_plus_baseline": reinforce_plus_plus_baseline_advantages,
    "gae": gae_advantages,
}


def compute_advantages(name: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the estimator registered under ``name`` with keyword arguments (see module doc)."""
    try:
        estimator = ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}; set algorithm.adv_estimator to one of "
            f"{sorted(ADVANTAGE_ESTIMATORS)}"
        ) from None
    return estimator(**kwargs)
