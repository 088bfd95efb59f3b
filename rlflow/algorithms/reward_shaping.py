"""Reward-side pieces of DAPO (Yu et al., 2025): overlong reward shaping and the group filter
of dynamic sampling.

* Overlong shaping: a response that runs into the last ``buffer_len`` tokens before the
  length limit is penalised linearly, ``-penalty_factor * (length - (max_len - buffer_len)) /
  buffer_len``, reaching ``-penalty_factor`` at ``max_len``; shorter responses get 0. The
  penalty is a sequence reward, added at the last valid token like the score itself.
* Dynamic sampling: a prompt group whose responses all got the same reward has zero
  group-relative advantage, so it only dilutes the batch. ``varied_group_indices`` keeps the
  rows of the groups whose rewards differ.

Lengths count valid response tokens, the EOS token included (the response mask's sum).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

__all__ = [
    "overlong_penalty",
    "add_sequence_reward",
    "varied_group_indices",
]


def overlong_penalty(
    response_lengths: torch.Tensor,
    max_response_length: int,
    buffer_len: int,
    penalty_factor: float,
) -> torch.Tensor:
    """Per-sequence soft overlong penalty (``<= 0``), shape ``(B,)`` float.

    ``penalty = min(0, -(length - (max_response_length - buffer_len)) / buffer_len *
    penalty_factor)``.
    """
    if not 0 < buffer_len <= max_response_length:
        raise ValueError(
            f"reward.overlong_buffer.len={buffer_len} must be in [1, data.max_response_length="
            f"{max_response_length}]"
        )
    if penalty_factor < 0:
        raise ValueError(f"reward.overlong_buffer.penalty_factor={penalty_factor} must be >= 0")
    expected = max_response_length - buffer_len
    exceed = response_lengths.float() - expected
    return torch.clamp(-exceed / buffer_len * penalty_factor, max=0.0)


def add_sequence_reward(
    token_level_scores: torch.Tensor, response_mask: torch.Tensor, sequence_reward: torch.Tensor
) -> torch.Tensor:
    """Add ``sequence_reward[i]`` at the last valid token of row ``i`` (rows with no valid
    token are left unchanged). Returns a new ``(B, T)`` float tensor."""
    if token_level_scores.shape != response_mask.shape:
        raise ValueError(
            f"add_sequence_reward: token_level_scores shape {tuple(token_level_scores.shape)} != "
            f"response_mask shape {tuple(response_mask.shape)}"
        )
    if sequence_reward.shape != token_level_scores.shape[:1]:
        raise ValueError(
            f"add_sequence_reward: sequence_reward must have shape ({token_level_scores.shape[0]},), "
            f"got {tuple(sequence_reward.shape)}"
        )
    out = token_level_scores.float().clone()
    valid = response_mask != 0
    has_tokens = valid.any(dim=-1)
    # Index of the last valid position: the argmax of position * valid.
    positions = torch.arange(out.shape[1], device=out.device).expand_as(out)
    last = torch.where(valid, positions, torch.full_like(positions, -1)).max(dim=-1).values
    rows = torch.nonzero(has_tokens, as_tuple=True)[0]
    out[rows, last[rows]] += sequence_reward.float()[rows]
    return out


def varied_group_indices(
    group_index: Sequence[Hashable], metric: torch.Tensor | Sequence[float]
) -> list[int]:
    """Row indices (ascending) of the groups whose ``metric`` values are not all equal.

    A group of one row is kept (verl's rule: there is no spread to judge). Rows keep their
    order, so a kept group's rows stay adjacent when they were.
    """
    values = metric.tolist() if isinstance(metric, torch.Tensor) else list(metric)
    labels = list(group_index)
    if len(values) != len(labels):
        raise ValueError(
            f"varied_group_indices: {len(labels)} group ids but {len(values)} metric values"
        )
    members: dict[Hashable, list[int]] = {}
    for row, label in enumerate(labels):
        members.setdefault(label, []).append(row)
    kept = [
        row
        for rows in members.values()
        if len(rows) == 1 or len({float(values[r]) for r in rows}) > 1
        for row in rows
    ]
    return sorted(kept)
