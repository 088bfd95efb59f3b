"""How far the rollout policy may be, and is, from the actor.

Two checks every rollout backend shares:

* ``check_weight_version``: before generating, a worker compares the weight version it holds
  with the version the trainer expects. On-policy training (``max_staleness=0``) demands
  equality; off-policy rollout allows the worker to lag by up to ``max_staleness`` syncs.
* ``rollout_logprob_gap``: after the actor has scored the same responses, the per-token
  difference between the engine's log-probs and the actor's shows whether the two really run
  the same policy (kernels, dtype, or a missed sync show up here first).
"""

from __future__ import annotations

from typing import Optional

import torch


class StaleWeightsError(RuntimeError):
    """A rollout worker holds weights older (or newer) than the trainer allows."""


def check_weight_version(held: int, expected: Optional[int], max_staleness: int = 0, rank: int = 0) -> None:
    """Raise ``StaleWeightsError`` unless ``expected - max_staleness <= held <= expected``.

    ``expected`` None skips the check (a caller that does not track versions).
    """
    if expected is None:
        return
    if isinstance(max_staleness, bool) or not isinstance(max_staleness, int) or max_staleness < 0:
        raise ValueError(f"rollout.max_weight_staleness must be an int >= 0, got {max_staleness!r}")
    held, expected = int(held), int(expected)
    if held > expected:
        raise StaleWeightsError(
            f"rollout worker {rank} holds weights version {held}, newer than the trainer's "
            f"version {expected}: the trainer's version counter is out of step"
        )
    if expected - held > max_staleness:
        allowed = "exactly on-policy" if max_staleness == 0 else f"at most {max_staleness} version(s) behind"
        raise StaleWeightsError(
            f"rollout worker {rank} holds weights version {held} but the trainer expects version "
            f"{expected} ({allowed}): a weight sync was missed; to allow off-policy rollouts set "
            f"rollout.max_weight_staleness>={expected - held}"
        )


def rollout_logprob_gap(
    rollout_log_probs: torch.Tensor, actor_log_probs: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """Mean and max of ``|rollout_log_probs - actor_log_probs|`` over the response tokens.

    Args:
        rollout_log_probs: ``[B, T]`` log-probs the engine reported for the sampled tokens.
        actor_log_probs: ``[B, T]`` log-probs of the same tokens under the actor's weights.
        mask: ``[B, T]``, non-zero on response tokens; only those count.
    Returns:
        ``{"rollout/logprob_diff_mean": ..., "rollout/logprob_diff_max": ...}``; both 0.0
        when the mask is empty. The mean is per token over the whole batch (token-mean).
    """
    if rollout_log_probs.shape != actor_log_probs.shape or rollout_log_probs.shape != mask.shape:
        raise ValueError(
            "rollout_logprob_gap: rollout_log_probs, actor_log_probs and mask must have one shape, "
            f"got {tuple(rollout_log_probs.shape)}, {tuple(actor_log_probs.shape)}, {tuple(mask.shape)}"
        )
    valid = mask.bool()
    if not bool(valid.any()):
        return {"rollout/logprob_diff_mean": 0.0, "rollout/logprob_diff_max": 0.0}
    diff = (rollout_log_probs.double() - actor_log_probs.double()).abs()[valid]
    return {"rollout/logprob_diff_mean": diff.mean().item(), "rollout/logprob_diff_max": diff.max().item()}
