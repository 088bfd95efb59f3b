"""Loss functions: loss aggregation, PPO/GSPO policy losses, KL penalties, value loss, DPO.

Normalisation contract (shared by every loss that takes ``loss_agg_mode``): the returned
value is this micro-batch's *share* of the loss over the whole global batch. Summing the
returned values over all micro-batches and all data-parallel ranks gives the global loss,
so gradients accumulated with ``loss.backward()`` (no further division) do not depend on
micro-batch or data-parallel size. The caller passes the global counts; see
``count_tokens_and_seqs``. Without them the micro-batch's own counts are used, which is
the plain per-micro-batch mean.

Off-policy corrections (``rlflow.algorithms.off_policy``) keep this contract: their weights
multiply the per-token policy loss before aggregation, and the tokens they reject are removed
from the mask, so they count in no denominator (the counts come from the corrected mask).

All per-token tensors are ``(B, T)``; masks are 0/1 and masked positions may hold garbage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlflow.utils.torch_functional import masked_mean, masked_sum

__all__ = [
    "AGG_MODES",
    "KL_KINDS",
    "DPO_LOSS_TYPES",
    "count_tokens_and_seqs",
    "aggregate_loss",
    "policy_loss_clipped",
    "policy_loss_gspo",
    "kl_penalty",
    "value_loss_clipped",
    "dpo_loss",
]

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# verl's names are accepted too: kl = k1, mse = k2, low_var_kl = k3. A trailing "+" (verl's
# straight-through variant) keeps the estimator's value but takes the gradient of k2, the one
# estimator whose gradient is unbiased.
_KL_BASE_KINDS = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")
KL_KINDS = _KL_BASE_KINDS + tuple(f"{kind}+" for kind in _KL_BASE_KINDS)
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")

# exp() of a log-ratio beyond this overflows float32 gradients long before it means anything.
_LOG_RATIO_CLAMP = 20.0
_K3_CLAMP = 10.0

Count = int | float | torch.Tensor | None


def _check_same_shape(fn: str, **tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        listed = ", ".join(f"{n}={s}" for n, s in shapes.items())
        raise ValueError(f"{fn}: tensors must share one (B, T) shape, got {listed}")


def _weights_arg(token_weights: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {} if token_weights is None else {"token_weights": token_weights}


def count_tokens_and_seqs(mask: torch.Tensor) -> tuple[int, int]:
    """(valid tokens, sequences with at least one valid token) in a ``(B, T)`` mask.

    Sum these over every micro-batch and data-parallel rank of a global batch to get the
    ``global_num_tokens`` / ``global_num_seqs`` that ``aggregate_loss`` expects.
    """
    valid = mask != 0
    return int(valid.sum().item()), int(valid.any(dim=-1).sum().item())


def _denominator(value: Count, local: torch.Tensor, name: str) -> torch.Tensor:
    if value is None:
        return local
    denom = torch.as_tensor(value, dtype=local.dtype, device=local.device)
    if denom.numel() != 1 or bool(denom < 0):
        raise ValueError(f"aggregate_loss: {name} must be a non-negative scalar, got {value!r}")
    return denom.reshape(())


def _safe_div(num: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    # An empty global batch has loss 0, not nan.
    return torch.where(denom > 0, num / denom.clamp_min(1e-12), num * 0.0)


def aggregate_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    global_num_tokens: Count = None,
    global_num_seqs: Count = None,
    norm_length: Count = None,
) -> torch.Tensor:
    """Reduce a ``(B, T)`` per-token loss to a scalar (see module doc for normalisation).

    * ``token-mean``: ``sum(loss * mask) / global_num_tokens``.
    * ``seq-mean-token-sum``: ``sum_seqs(sum_t loss * mask) / global_num_seqs``.
    * ``seq-mean-token-mean``: ``sum_seqs(mean over the seq's valid tokens) / global_num_seqs``.
    * ``seq-mean-token-sum-norm`` (Dr.GRPO): ``sum(loss * mask) / (global_num_seqs *
      norm_length)``; ``norm_length`` should be a constant such as the maximum response
      length (it defaults to ``T``, which changes with padding).

    Defaults: ``global_num_tokens`` = valid tokens here, ``global_num_seqs`` = rows here
    with at least one valid token (rows with none contribute 0 to every mode).
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; use one of {list(AGG_MODES)}")
    _check_same_shape("aggregate_loss", loss_mat=loss_mat, mask=mask)
    if loss_mat.dim() != 2:
        raise ValueError(f"aggregate_loss: loss_mat must be 2-D (B, T), got {loss_mat.dim()}-D")
    loss_mat = loss_mat if loss_mat.is_floating_point() else loss_mat.float()
    valid = mask != 0
    local_tokens = valid.sum().to(loss_mat.dtype)
    local_seqs = valid.any(dim=-1).sum().to(loss_mat.dtype)

    if mode == "token-mean":
        return _safe_div(
            masked_sum(loss_mat, mask),
            _denominator(global_num_tokens, local_tokens, "global_num_tokens"),
        )

    seqs = _denominator(global_num_seqs, local_seqs, "global_num_seqs")
    if mode == "seq-mean-token-sum":
        return _safe_div(masked_sum(loss_mat, mask), seqs)
    if mode == "seq-mean-token-mean":
        per_seq = masked_mean(loss_mat, mask, dim=-1)  # 0 for rows without valid tokens
        return _safe_div(per_seq.sum(), seqs)
    length = _denominator(
        norm_length,
        torch.tensor(float(loss_mat.shape[-1]), dtype=loss_mat.dtype, device=loss_mat.device),
        "norm_length",
    )
    return _safe_div(masked_sum(loss_mat, mask), seqs * length)


def _log_ratio(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    # Masked positions may hold -inf/nan log-probs; zero them so exp() and gradients stay finite.
    diff = torch.where(mask != 0, log_prob - old_log_prob, torch.zeros_like(log_prob))
    return torch.clamp(diff, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)


def policy_loss_clipped(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float | None = None,
    loss_agg_mode: str = "token-mean",
    global_num_tokens: Count = None,
    global_num_seqs: Count = None,
    norm_length: Count = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate (with optional dual clip), aggregated by ``loss_agg_mode``.

    ``ratio = exp(clamp(logp - old, -20, 20))``;
    ``loss_t = max(-A * ratio, -A * clip(ratio, 1 - low, 1 + high))``; with ``clip_ratio_c``
    (> 1) the loss of tokens with ``A < 0`` is further capped at ``-A * c``.

    ``token_weights`` (``(B, T)``, optional): constants that multiply ``loss_t`` before
    aggregation, the off-policy corrections of ``rlflow.algorithms.off_policy``. They are
    detached here, so each token's gradient is its weight times the plain gradient. Tokens a
    correction removes must be left out of ``response_mask`` (and of the global counts), not
    merely weighted 0. ``None`` leaves the loss exactly as without it.

    Metrics (local micro-batch token means, floats): ``pg_clipfrac`` (share of tokens where
    the clipped term is active), ``pg_clipfrac_lower`` (share where the dual clip is
    active), ``ppo_kl`` (mean of ``old - logp``).
    """
    _check_same_shape(
        "policy_loss_clipped",
        log_prob=log_prob,
        old_log_prob=old_log_prob,
        advantages=advantages,
        response_mask=response_mask,
        **_weights_arg(token_weights),
    )
    if clip_ratio_low < 0 or clip_ratio_high < 0:
        raise ValueError(
            "policy_loss_clipped: clip_ratio_low/high must be >= 0, "
            f"got {clip_ratio_low}, {clip_ratio_high}"
        )
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise ValueError(
            "policy_loss_clipped: clip_ratio_c must be > 1 (or None to disable), "
            f"got {clip_ratio_c}"
        )

    log_ratio = _log_ratio(log_prob, old_log_prob, response_mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    loss_mat = torch.maximum(unclipped, clipped)
    clip_active = (clipped > unclipped).float()

    if clip_ratio_c is not None:
        cap = -advantages * clip_ratio_c
        dual_active = ((advantages < 0) & (loss_mat > cap)).float()
        loss_mat = torch.where(advantages < 0, torch.minimum(loss_mat, cap), loss_mat)
    else:
        dual_active = torch.zeros_like(loss_mat)
    if token_weights is not None:
        loss_mat = loss_mat * token_weights.detach()

    loss = aggregate_loss(
        loss_mat, response_mask, loss_agg_mode, global_num_tokens, global_num_seqs, norm_length
    )
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": masked_mean(clip_active, response_mask).item(),
            "pg_clipfrac_lower": masked_mean(dual_active, response_mask).item(),
            "ppo_kl": masked_mean(-log_ratio, response_mask).item(),
        }
    return loss, metrics


def policy_loss_gspo(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_ratio_low: float = 3e-4,
    clip_ratio_high: float = 4e-4,
    loss_agg_mode: str = "seq-mean-token-mean",
    global_num_tokens: Count = None,
    global_num_seqs: Count = None,
    norm_length: Count = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO: clipped surrogate on the sequence-level, length-normalised ratio.

    ``s_i = exp(mean over valid tokens of (logp - old))``. Per token the ratio is
    ``sg[s_i] * exp(logp_t - sg[logp_t])``: its value is ``s_i`` and its gradient flows
    through each token's log-prob, so with the paper's ``seq-mean-token-mean``
    aggregation the gradient equals that of the sequence objective (and per-token
    advantages are allowed). Clipping uses ``[1 - low, 1 + high]`` (the paper's ranges are
    ~1e-4, hence the small defaults). ``token_weights``: as in ``policy_loss_clipped``.

    Metrics: ``pg_clipfrac``, ``pg_clipfrac_lower`` (always 0, no dual clip), ``ppo_kl``.
    """
    _check_same_shape(
        "policy_loss_gspo",
        log_prob=log_prob,
        old_log_prob=old_log_prob,
        advantages=advantages,
        response_mask=response_mask,
        **_weights_arg(token_weights),
    )
    if clip_ratio_low < 0 or clip_ratio_high < 0:
        raise ValueError(
            "policy_loss_gspo: clip_ratio_low/high must be >= 0, "
            f"got {clip_ratio_low}, {clip_ratio_high}"
        )
    token_log_ratio = _log_ratio(log_prob, old_log_prob, response_mask)
    seq_log_ratio = masked_mean(token_log_ratio, response_mask, dim=-1)
    safe_logp = torch.where(response_mask != 0, log_prob, torch.zeros_like(log_prob))
    combined = seq_log_ratio.detach().unsqueeze(-1) + safe_logp - safe_logp.detach()
    ratio = torch.exp(torch.clamp(combined, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    loss_mat = torch.maximum(unclipped, clipped)
    if token_weights is not None:
        loss_mat = loss_mat * token_weights.detach()

    loss = aggregate_loss(
        loss_mat, response_mask, loss_agg_mode, global_num_tokens, global_num_seqs, norm_length
    )
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": masked_mean((clipped > unclipped).float(), response_mask).item(),
            "pg_clipfrac_lower": 0.0,
            "ppo_kl": masked_mean(-token_log_ratio, response_mask).item(),
        }
    return loss, metrics


def kl_penalty(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of ``KL(policy || ref)`` from sampled-token log-probs.

    * ``k1`` / ``kl``: ``logp - ref`` (unbiased, high variance, can be negative).
    * ``abs``: ``|logp - ref|``.
    * ``k2`` / ``mse``: ``0.5 * (logp - ref)^2``.
    * ``k3`` / ``low_var_kl``: with ``d = clamp(ref - logp, -20, 20)``,
      ``exp(d) - d - 1`` clamped to ``[-10, 10]`` (non-negative, low variance).
    * any of these with a trailing ``+`` (e.g. ``k3+``): the same value, with the gradient
      of ``k2`` (straight-through), as in verl.

    Returns a tensor of the inputs' shape; aggregate it with ``aggregate_loss``.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL kind {kind!r}; use one of {list(KL_KINDS)}")
    if log_prob.shape != ref_log_prob.shape:
        raise ValueError(
            f"kl_penalty: log_prob shape {tuple(log_prob.shape)} != ref_log_prob shape "
            f"{tuple(ref_log_prob.shape)}; they must match"
        )
    base = kind.rstrip("+")
    diff = log_prob - ref_log_prob
    if base in ("k1", "kl"):
        value = diff
    elif base == "abs":
        value = diff.abs()
    elif base in ("k2", "mse"):
        value = 0.5 * diff.square()
    else:
        d = torch.clamp(-diff, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        value = torch.clamp(torch.exp(d) - d - 1.0, -_K3_CLAMP, _K3_CLAMP)
    if base == kind or base in ("k2", "mse"):
        return value
    k2 = 0.5 * diff.square()
    return k2 - k2.detach() + value.detach()


def value_loss_clipped(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float,
    loss_agg_mode: str = "token-mean",
    global_num_tokens: Count = None,
    global_num_seqs: Count = None,
    norm_length: Count = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss ``0.5 * max((v - R)^2, (clip(v, old - c, old + c) - R)^2)``.

    Metrics: ``vf_clipfrac``, the local share of valid tokens where the clipped term is
    strictly larger.
    """
    _check_same_shape(
        "value_loss_clipped",
        values=values,
        old_values=old_values,
        returns=returns,
        response_mask=response_mask,
    )
    if cliprange_value < 0:
        raise ValueError(f"value_loss_clipped: cliprange_value must be >= 0, got {cliprange_value}")
    # clamp() returns a value inside the range unchanged, so a token counts as clipped only
    # when the value itself left [old - c, old + c] (old + clamp(v - old) can differ from v by
    # rounding alone).
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_loss = (values - returns).square()
    clipped_loss = (clipped_values - returns).square()
    loss_mat = 0.5 * torch.maximum(unclipped_loss, clipped_loss)
    loss = aggregate_loss(
        loss_mat, response_mask, loss_agg_mode, global_num_tokens, global_num_seqs, norm_length
    )
    with torch.no_grad():
        metrics = {
            "vf_clipfrac": masked_mean(
                (clipped_loss > unclipped_loss).float(), response_mask
            ).item()
        }
    return loss, metrics


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses from summed sequence log-probs (all inputs ``(B,)``).

    With ``h = (pi_c - pi_r) - (ref_c - ref_r)`` and label smoothing ``eps``:

    * ``sigmoid``: ``-(1 - eps) * logsigmoid(beta h) - eps * logsigmoid(-beta h)``
      (``eps > 0`` is conservative DPO).
    * ``ipo``: ``(h - 1 / (2 beta))^2``.
    * ``hinge``: ``relu(1 - beta h)``.
    * ``robust``: ``(-(1 - eps) * logsigmoid(beta h) + eps * logsigmoid(-beta h)) / (1 - 2 eps)``
      (unbiased under label-flip rate ``eps``; needs ``eps < 0.5``).

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``; rewards are
    ``beta * (policy - ref)`` and detached (they are metrics). Reduce ``losses`` with
    ``.mean()`` or a global ``sum / num_pairs``.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; use one of {list(DPO_LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    _check_same_shape(
        "dpo_loss",
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * logits) - eps * F.logsigmoid(-beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1.0 / (2.0 * beta)).square()
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * logits)
    else:  # robust
        losses = (-(1 - eps) * F.logsigmoid(beta * logits) + eps * F.logsigmoid(-beta * logits)) / (
            1 - 2 * eps
        )
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards
