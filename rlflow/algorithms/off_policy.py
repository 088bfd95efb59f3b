"""Off-policy corrections: per-token weights for tokens another policy sampled.

The rollout engine samples each response under its own numbers, the behaviour policy ``mu``:
other kernels, another precision, or weights a few syncs behind the actor. Before the update
the actor scores the same tokens itself (``old_log_probs``, ``pi_old``) and the PPO ratio is
taken against ``pi_old``, so the distribution the tokens really came from never enters the
loss. Where ``mu`` and ``pi_old`` differ the gradient is biased, and a few tokens that one of
them finds far likelier than the other can dominate an update. With the per-token ratio

    r_t = pi_old(y_t) / mu(y_t) = exp(old_log_probs_t - rollout_log_probs_t)

each correction gives every token a detached weight and decides which tokens stay in the loss:

* ``tis``, truncated importance sampling: weight ``min(r, cap)``; every token stays.
* ``mis_token``, masked importance sampling (IcePop-style): tokens with ``r`` outside
  ``[low, high]`` leave the loss; the others keep weight 1.
* ``mis_seq``: the same test on each sequence's geometric-mean ratio ``exp(mean_t log r_t)``
  (length-normalised, so long answers are not rejected for their length alone); a sequence
  outside ``[low, high]`` leaves the loss whole, the others keep weight 1.
* ``decoupled``, decoupled PPO as in AReaL: the PPO ratio is taken against the proximal policy
  (``old_log_probs``, recomputed by the actor just before the update, which is what the
  clipped loss already uses) and each token is reweighted by ``r = pi_prox / mu``; tokens with
  ``r > cap`` leave the loss, as AReaL's ``behav_imp_weight_cap`` does, where ``tis`` would
  truncate them to the cap.

Masked importance sampling keeps weight 1 on purpose: the mask already confines ``r`` to
``[low, high]``, so the kept tokens are close to on-policy and reweighting them would buy
little bias for extra variance. ``decoupled`` is the variant that both reweights and masks.

A token that leaves the loss leaves it entirely, as in verl's rejection sampling. Every
function returns ``(weights, kept_mask)``: ``kept_mask`` is the response mask without the
rejected tokens, and the actor uses it instead of the response mask for the policy loss, the
entropy bonus, the KL loss and the global token / sequence counts that normalise them
(``rlflow.algorithms.losses``). The loss is then the mean over the accepted sample, so an
update does not shrink with the number of rejected tokens, and a rejected sequence does not
count as a sequence of zero loss. ``weights`` is 0 outside ``kept_mask``.

Everything here depends on the batch alone (no model), so it is computed once per batch,
outside the autograd graph: the weights are constants of the loss and its gradient is the
weight times the plain per-token gradient.
"""

from __future__ import annotations

import torch

from rlflow.utils.torch_functional import masked_mean

__all__ = [
    "CORRECTIONS",
    "behaviour_log_ratio",
    "truncated_is",
    "token_mis",
    "seq_mis",
    "decoupled_is",
    "correction_weights",
    "correction_metrics",
]

CORRECTIONS = ("none", "tis", "mis_token", "mis_seq", "decoupled")

# Same bound as the PPO ratio in losses.py: exp() beyond it overflows long before it means anything.
_LOG_RATIO_CLAMP = 20.0


def _check_inputs(fn: str, old: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor) -> None:
    if not old.shape == rollout.shape == mask.shape or old.dim() != 2:
        raise ValueError(
            f"{fn}: old_log_probs, rollout_log_probs and mask must share one (B, T) shape, got "
            f"{tuple(old.shape)}, {tuple(rollout.shape)}, {tuple(mask.shape)}"
        )


def _check_cap(fn: str, cap: float) -> None:
    if not cap > 0:
        raise ValueError(f"{fn}: cap must be > 0, got {cap}")


def _check_bounds(fn: str, low: float, high: float) -> None:
    if not 0.0 <= low < 1.0 < high:
        raise ValueError(f"{fn}: bounds must satisfy 0 <= low < 1 < high, got low={low}, high={high}")


def _kept(mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``mask`` with the positions where ``keep`` is false set to 0 (dtype kept)."""
    return torch.where(keep, mask, torch.zeros_like(mask))


def behaviour_log_ratio(
    old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``log r = old_log_probs - rollout_log_probs`` per token, detached, clamped to
    ``[-20, 20]`` and 0 outside ``mask`` (masked positions may hold garbage).

    Computed in at least float32, whatever the inputs' precision.
    """
    _check_inputs("behaviour_log_ratio", old_log_probs, rollout_log_probs, mask)
    dtype = torch.promote_types(torch.promote_types(old_log_probs.dtype, rollout_log_probs.dtype), torch.float32)
    diff = old_log_probs.detach().to(dtype) - rollout_log_probs.detach().to(dtype)
    diff = torch.where(mask != 0, diff, torch.zeros_like(diff))
    return diff.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)


def truncated_is(
    old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, mask: torch.Tensor, cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """TIS: weight ``min(r, cap)`` on every valid token; the mask is returned unchanged."""
    _check_cap("truncated_is", cap)
    ratio = torch.exp(behaviour_log_ratio(old_log_probs, rollout_log_probs, mask))
    weights = torch.where(mask != 0, ratio.clamp(max=cap), torch.zeros_like(ratio))
    return weights, mask


def token_mis(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    mask: torch.Tensor,
    low: float,
    high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level MIS: a token stays (weight 1) when ``low <= r <= high``, else it leaves."""
    _check_bounds("token_mis", low, high)
    ratio = torch.exp(behaviour_log_ratio(old_log_probs, rollout_log_probs, mask))
    keep = (mask != 0) & (ratio >= low) & (ratio <= high)
    return keep.to(ratio.dtype), _kept(mask, keep)


def seq_mis(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    mask: torch.Tensor,
    low: float,
    high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence-level MIS: a sequence stays (weight 1 on its tokens) when its geometric-mean
    ratio ``exp(mean over its valid tokens of log r)`` is in ``[low, high]``, else it leaves whole."""
    _check_bounds("seq_mis", low, high)
    log_ratio = behaviour_log_ratio(old_log_probs, rollout_log_probs, mask)
    seq_ratio = torch.exp(masked_mean(log_ratio, mask, dim=-1))
    keep = (mask != 0) & ((seq_ratio >= low) & (seq_ratio <= high)).unsqueeze(-1)
    return keep.to(log_ratio.dtype), _kept(mask, keep)


def decoupled_is(
    old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, mask: torch.Tensor, cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled PPO's behaviour weight ``r = pi_prox / mu`` with ``old_log_probs`` as the
    proximal policy; tokens with ``r > cap`` leave the loss (AReaL's cap)."""
    _check_cap("decoupled_is", cap)
    ratio = torch.exp(behaviour_log_ratio(old_log_probs, rollout_log_probs, mask))
    keep = (mask != 0) & (ratio <= cap)
    return torch.where(keep, ratio, torch.zeros_like(ratio)), _kept(mask, keep)


def correction_weights(
    correction: str,
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    mask: torch.Tensor,
    *,
    is_cap: float = 2.0,
    mis_low: float = 0.5,
    mis_high: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights, kept_mask)`` of the correction named ``correction`` (one of ``CORRECTIONS``).

    ``none`` gives weight 1 on every valid token and the mask unchanged; the actor does not
    call it at all then, so its loss stays exactly the uncorrected one.
    """
    if correction == "none":
        _check_inputs("correction_weights", old_log_probs, rollout_log_probs, mask)
        return (mask != 0).to(torch.float32), mask
    if correction == "tis":
        return truncated_is(old_log_probs, rollout_log_probs, mask, is_cap)
    if correction == "mis_token":
        return token_mis(old_log_probs, rollout_log_probs, mask, mis_low, mis_high)
    if correction == "mis_seq":
        return seq_mis(old_log_probs, rollout_log_probs, mask, mis_low, mis_high)
    if correction == "decoupled":
        return decoupled_is(old_log_probs, rollout_log_probs, mask, is_cap)
    raise ValueError(f"unknown off-policy correction {correction!r}; use one of {list(CORRECTIONS)}")


@torch.no_grad()
def correction_metrics(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    mask: torch.Tensor,
    kept_mask: torch.Tensor,
) -> dict[str, float]:
    """How off-policy the batch is and what a correction removed, over ``mask``'s valid tokens.

    * ``is_ratio_mean`` / ``is_ratio_max``: mean and max of the token ratio ``r`` (before any
      truncation or masking; ``log r`` clamped to ``[-20, 20]``). Near 1 when rollout and
      trainer agree.
    * ``token_masked_frac``: share of valid tokens that ``kept_mask`` removed.
    * ``seq_masked_frac``: share of sequences (with at least one valid token) that lost every
      token, i.e. left the loss entirely.
    * ``logprob_gap_mean``: mean ``|old_log_probs - rollout_log_probs|``.

    All are 0.0 when the mask is empty.
    """
    _check_inputs("correction_metrics", old_log_probs, rollout_log_probs, mask)
    if kept_mask.shape != mask.shape:
        raise ValueError(
            f"correction_metrics: kept_mask shape {tuple(kept_mask.shape)} != mask shape {tuple(mask.shape)}"
        )
    valid = mask != 0
    if not bool(valid.any()):
        names = ("is_ratio_mean", "is_ratio_max", "token_masked_frac", "seq_masked_frac", "logprob_gap_mean")
        return dict.fromkeys(names, 0.0)
    log_ratio = behaviour_log_ratio(old_log_probs, rollout_log_probs, mask)
    ratio = torch.exp(log_ratio)
    dropped = valid & (kept_mask == 0)
    seqs = valid.any(dim=-1)
    seqs_dropped = seqs & ~(valid & (kept_mask != 0)).any(dim=-1)
    gap = (old_log_probs.to(log_ratio.dtype) - rollout_log_probs.to(log_ratio.dtype)).abs()
    return {
        "is_ratio_mean": masked_mean(ratio, mask).item(),
        "is_ratio_max": ratio[valid].max().item(),
        "token_masked_frac": masked_mean(dropped.float(), mask).item(),
        "seq_masked_frac": (seqs_dropped.sum() / seqs.sum()).item(),
        "logprob_gap_mean": masked_mean(gap, mask).item(),
    }
