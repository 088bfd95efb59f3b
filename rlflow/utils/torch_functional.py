"""Tensor helpers shared by data loading, workers and losses.

Conventions used throughout:

* Token tensors are batch-first: ``(B, L)`` for ids / masks, ``(B, T, V)`` for logits.
* Masks are 0/1 tensors (any dtype); a position counts as valid when ``mask != 0``.
* Masked reductions ignore whatever is stored at invalid positions, even ``nan``/``inf``,
  because padded positions of log-probs or values are routinely garbage.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "TRUNCATION_MODES",
    "postprocess_data",
    "compute_position_ids",
    "logprobs_from_logits",
    "entropy_from_logits",
    "logprobs_and_entropy_from_hidden",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "get_response_mask",
    "pad_2d_list_to_tensor",
]

TRUNCATION_MODES = ("left", "right", "middle", "error")

# Rows of logits processed at once when a low-precision input has to be upcast to float32;
# bounds the temporary float32 copy to roughly this many rows x vocab.
_LOGIT_CHUNK_ROWS = 1024


# --------------------------------------------------------------------------------------
# Padding and truncation
# --------------------------------------------------------------------------------------


def postprocess_data(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_length: int,
    pad_token_id: int,
    left_pad: bool = True,
    truncation: str = "error",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad or truncate token rows to exactly ``max_length`` columns.

    Args:
        input_ids: ``(B, L)`` or ``(L,)`` integer tensor.
        attention_mask: same shape as ``input_ids``.
        max_length: target number of columns (> 0).
        pad_token_id: id written into padded positions (their mask is 0).
        left_pad: pad on the left (prompts, so generation continues at the right edge)
            or on the right.
        truncation: what to do when ``L > max_length``: ``"left"`` keeps the last
            ``max_length`` tokens, ``"right"`` keeps the first ``max_length``,
            ``"middle"`` keeps the first ``floor(max_length / 2)`` and the last
            ``ceil(max_length / 2)`` (as verl does), ``"error"`` raises ``ValueError``.

    Returns:
        ``(input_ids, attention_mask)`` with ``L == max_length`` and the input rank.
    """
    if truncation not in TRUNCATION_MODES:
        raise ValueError(
            f"truncation={truncation!r} is not supported; use one of {list(TRUNCATION_MODES)}"
        )
    if not isinstance(input_ids, torch.Tensor) or not isinstance(attention_mask, torch.Tensor):
        raise TypeError("postprocess_data: input_ids and attention_mask must be torch.Tensor")
    if input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"postprocess_data: input_ids shape {tuple(input_ids.shape)} != attention_mask "
            f"shape {tuple(attention_mask.shape)}; they must match"
        )
    if input_ids.dim() not in (1, 2):
        raise ValueError(
            f"postprocess_data: input_ids must be 1-D (L,) or 2-D (B, L), got {input_ids.dim()}-D"
        )
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 0:
        raise ValueError(f"postprocess_data: max_length must be a positive int, got {max_length!r}")

    squeeze = input_ids.dim() == 1
    if squeeze:
        input_ids = input_ids.unsqueeze(0)
        attention_mask = attention_mask.unsqueeze(0)

    length = input_ids.shape[-1]
    if length < max_length:
        pad = max_length - length
        id_pad = input_ids.new_full((input_ids.shape[0], pad), pad_token_id)
        mask_pad = attention_mask.new_zeros((attention_mask.shape[0], pad))
        if left_pad:
            input_ids = torch.cat([id_pad, input_ids], dim=-1)
            attention_mask = torch.cat([mask_pad, attention_mask], dim=-1)
        else:
            input_ids = torch.cat([input_ids, id_pad], dim=-1)
            attention_mask = torch.cat([attention_mask, mask_pad], dim=-1)
    elif length > max_length:
        if truncation == "error":
            raise ValueError(
                f"sequence length {length} exceeds max_length {max_length}; raise "
                f"data.max_prompt_length or set data.truncation to left, right or middle"
            )
        if truncation == "left":
            input_ids = input_ids[:, -max_length:]
            attention_mask = attention_mask[:, -max_length:]
        elif truncation == "right":
            input_ids = input_ids[:, :max_length]
            attention_mask = attention_mask[:, :max_length]
        else:  # middle
            head = max_length // 2
            tail = max_length - head
            keep = torch.cat([torch.arange(head), torch.arange(length - tail, length)]).to(
                input_ids.device
            )
            input_ids = input_ids.index_select(-1, keep)
            attention_mask = attention_mask.index_select(-1, keep)

    if squeeze:
        return input_ids.squeeze(0), attention_mask.squeeze(0)
    return input_ids, attention_mask


def compute_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``cumsum(mask) - 1`` clipped at 0 along the last dim.

    Left padding therefore gets position 0 and the first real token also gets 0; the
    result has ``attention_mask``'s shape and dtype ``long``.
    """
    return torch.clamp(torch.cumsum(attention_mask.long(), dim=-1) - 1, min=0)


def response_batch(
    prompts: torch.Tensor,
    prompt_mask: torch.Tensor,
    responses: torch.Tensor,
    response_mask: torch.Tensor,
    tail_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors every rollout returns for left-padded ``prompts`` and right-padded
    ``responses``: ``prompts``, ``responses``, ``response_mask`` (long), ``input_ids``,
    ``attention_mask`` and ``position_ids``. The model attends to the prompt and to
    ``tail_mask`` after it (default: the response mask; a multi-turn trajectory also attends
    to its observations, which the response mask leaves out)."""
    tail = response_mask if tail_mask is None else tail_mask
    attention_mask = torch.cat([prompt_mask, tail.to(prompt_mask.dtype)], dim=1)
    return {
        "prompts": prompts,
        "responses": responses,
        "response_mask": response_mask.to(torch.long),
        "input_ids": torch.cat([prompts, responses], dim=1),
        "attention_mask": attention_mask,
        "position_ids": compute_position_ids(attention_mask),
    }


def pad_2d_list_to_tensor(
    rows: Sequence[Sequence[int] | torch.Tensor],
    pad_value: int | float,
    left_pad: bool = False,
    max_length: int | None = None,
    dtype: torch.dtype = torch.long,
) -> torch.Tensor:
    """Stack ragged rows into a ``(len(rows), width)`` tensor filled with ``pad_value``.

    ``width`` is ``max_length`` when given (a longer row raises ``ValueError``), otherwise
    the longest row. Rows are aligned right when ``left_pad`` (padding on the left).
    """
    lengths = [len(r) for r in rows]
    longest = max(lengths, default=0)
    if max_length is None:
        width = longest
    else:
        if longest > max_length:
            raise ValueError(
                f"pad_2d_list_to_tensor: a row has length {longest} > max_length {max_length}; "
                f"truncate the rows first or raise max_length"
            )
        width = max_length
    out = torch.full((len(rows), width), pad_value, dtype=dtype)
    for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        if n == 0:
            continue
        values = torch.as_tensor(row, dtype=dtype)
        if left_pad:
            out[i, width - n :] = values
        else:
            out[i, :n] = values
    return out


def get_response_mask(
    response_ids: torch.Tensor,
    eos_token_id: int | Sequence[int],
    pad_token_id: int | None = None,
    dtype: torch.dtype = torch.long,
) -> torch.Tensor:
    """Mask of generated tokens: 1 up to and including the first EOS, 0 after it.

    Rows without any EOS (truncated generations) keep every token, except a trailing
    run of ``pad_token_id`` (when given and not itself an EOS id), which is padding.

    Args:
        response_ids: ``(B, T)`` integer tensor.
        eos_token_id: one id or a list of ids that end a response.
    Returns:
        ``(B, T)`` tensor of ``dtype``.
    """
    if response_ids.dim() != 2:
        raise ValueError(
            f"get_response_mask: response_ids must be 2-D (B, T), got {response_ids.dim()}-D"
        )
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not eos_ids:
        raise ValueError("get_response_mask: eos_token_id must name at least one token id")
    eos_tensor = torch.as_tensor(eos_ids, device=response_ids.device)
    is_eos = torch.isin(response_ids, eos_tensor).long()
    # Number of EOS tokens strictly before each position; 0 means "still inside".
    eos_before = torch.cumsum(is_eos, dim=-1) - is_eos
    mask = eos_before == 0
    if pad_token_id is not None and pad_token_id not in eos_ids:
        is_pad = (response_ids == pad_token_id).long()
        # A position is trailing padding iff it and everything to its right is pad.
        trailing_pad = torch.flip(torch.cumprod(torch.flip(is_pad, [-1]), dim=-1), [-1]).bool()
        mask = mask & ~trailing_pad
    return mask.to(dtype)


# --------------------------------------------------------------------------------------
# Log-probs and entropy
# --------------------------------------------------------------------------------------


def _chunk_rows(flat: torch.Tensor) -> int:
    """Rows per chunk: all at once for float32/64, bounded for upcast low precision."""
    if flat.dtype in (torch.float32, torch.float64):
        return max(flat.shape[0], 1)
    return _LOGIT_CHUNK_ROWS


def _upcast(chunk: torch.Tensor) -> torch.Tensor:
    return chunk if chunk.dtype == torch.float64 else chunk.float()


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of ``labels`` under ``softmax(logits)``.

    Computed as ``logits[label] - logsumexp(logits)`` in float32 (float64 stays float64),
    so no full ``(B, T, V)`` log-softmax copy is materialised; low-precision logits are
    upcast a chunk of rows at a time.

    Args:
        logits: ``(..., V)`` floating tensor, e.g. ``(B, T, V)``.
        labels: ``(...)`` integer tensor, e.g. ``(B, T)``.
    Returns:
        ``(...)`` float32 (or float64) tensor.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logprobs_from_logits: logits shape {tuple(logits.shape)} does not match labels "
            f"shape {tuple(labels.shape)}; expected logits == labels.shape + (vocab,)"
        )
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1, 1).long()
    step = _chunk_rows(flat_logits)
    out = []
    for chunk, lab in zip(
        torch.split(flat_logits, step), torch.split(flat_labels, step), strict=True
    ):
        work = _upcast(chunk)
        picked = torch.gather(work, -1, lab).squeeze(-1)
        out.append(picked - torch.logsumexp(work, dim=-1))
    return torch.cat(out).reshape(labels.shape)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last dim, in float32 (float64 stays).

    Uses ``H = logsumexp(z) - sum(softmax(z) * z)``. Shape ``(..., V) -> (...)``.
    """
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    out = []
    for chunk in torch.split(flat, _chunk_rows(flat)):
        work = _upcast(chunk)
        probs = torch.softmax(work, dim=-1)
        out.append(torch.logsumexp(work, dim=-1) - (probs * work).sum(dim=-1))
    return torch.cat(out).reshape(logits.shape[:-1])


# float32 logits computed at once by ``logprobs_and_entropy_from_hidden``: 2**23 elements
# (32 MiB), i.e. 170 tokens of a 49k vocabulary, the whole batch for a tiny one.
_HEAD_CHUNK_ELEMENTS = 1 << 23


def _chunk_logits(hidden, weight, bias, temperature) -> torch.Tensor:
    # the LM head in the model's dtype, then float32: the same numbers as the model's logits
    return _upcast(torch.nn.functional.linear(hidden, weight, bias)).div_(temperature)


class _ChunkedHeadScores(torch.autograd.Function):
    """Log-probs and entropy through the LM head, ``rows`` tokens of logits at a time.

    Backward recomputes each chunk's logits instead of keeping them, so neither pass holds
    more than two ``[rows, V]`` float32 blocks at a time.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, with_entropy, rows):
        num = hidden.shape[0]
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        log_probs = hidden.new_empty(num, dtype=dtype)
        lse = hidden.new_empty(num, dtype=dtype)
        mean_logit = hidden.new_zeros(num, dtype=dtype)  # E_p[z], for the entropy
        for s in range(0, num, rows):
            z = _chunk_logits(hidden[s : s + rows], weight, bias, temperature)
            lse[s : s + rows] = torch.logsumexp(z, dim=-1)
            picked = z.gather(-1, targets[s : s + rows, None]).squeeze(-1)
            log_probs[s : s + rows] = picked - lse[s : s + rows]
            if with_entropy:
                mean_logit[s : s + rows] = torch.linalg.vecdot(torch.softmax(z, dim=-1), z)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, mean_logit)
        ctx.temperature, ctx.rows = temperature, rows
        ctx.set_materialize_grads(False)  # None for an output nothing used: skip its term
        entropy = lse - mean_logit if with_entropy else None
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        hidden, weight, bias, targets, lse, mean_logit = ctx.saved_tensors
        temperature, rows = ctx.temperature, ctx.rows
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b and bias is not None else None
        if grad_log_probs is None and grad_entropy is None:
            return grad_h, grad_w, grad_b, None, None, None, None
        for s in range(0, hidden.shape[0], rows):
            h = hidden[s : s + rows]
            z = _chunk_logits(h, weight, bias, temperature)
            probs = (z - lse[s : s + rows, None]).exp_()
            # d(g_lp * log p(y) + g_ent * H) / dz = g_lp * onehot(y) + p * (-g_lp - g_ent * (z - E_p[z])),
            # built in place in z and probs: two [rows, V] blocks at a time
            coef = z
            if grad_entropy is not None:
                coef.sub_(mean_logit[s : s + rows, None]).mul_(-grad_entropy[s : s + rows, None])
            else:
                coef.zero_()
            if grad_log_probs is not None:
                coef.sub_(grad_log_probs[s : s + rows, None])
            grad_z = probs.mul_(coef)
            del z, coef
            if grad_log_probs is not None:
                grad_z.scatter_add_(-1, targets[s : s + rows, None], grad_log_probs[s : s + rows, None].to(grad_z.dtype))
            grad_z = grad_z.div_(temperature).to(weight.dtype)
            if need_h:
                grad_h[s : s + rows] = grad_z @ weight
            if need_w and grad_w.dtype == h.dtype:
                grad_w.addmm_(grad_z.t(), h)  # in place: no [V, H] temporary per chunk
            elif need_w:
                grad_w += (grad_z.t() @ h).to(acc)
            if grad_b is not None:
                grad_b += grad_z.to(acc).sum(0)
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return grad_h, cast(grad_w, weight), cast(grad_b, bias), None, None, None, None


def logprobs_and_entropy_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = True,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``targets`` and entropy under ``softmax(linear(hidden, weight, bias) / T)``.

    The same numbers and gradients (for ``hidden``, ``weight`` and ``bias``) as projecting all
    of ``hidden`` ``[K, H]`` to ``[K, V]`` float32 logits and calling ``logprobs_from_logits``
    / ``entropy_from_logits``, without ever holding those logits: ``chunk_rows`` tokens at a
    time (default: ``_HEAD_CHUNK_ELEMENTS // V``), recomputed in backward. Chunking over the
    vocabulary as well would only pay off when one token's logits no longer fit, which no
    current vocabulary approaches. Returns float32 ``[K]`` tensors (float64 for float64 inputs);
    entropy None unless asked.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be [K, H] and targets [K], got {tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    rows = chunk_rows or max(1, _HEAD_CHUNK_ELEMENTS // max(int(weight.shape[0]), 1))
    return _ChunkedHeadScores.apply(
        hidden, weight, bias, targets.long(), float(temperature), bool(with_entropy), int(rows)
    )


# --------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------


def _check_mask(x: torch.Tensor, mask: torch.Tensor, fn: str) -> None:
    if x.shape != mask.shape:
        raise ValueError(
            f"{fn}: x shape {tuple(x.shape)} != mask shape {tuple(mask.shape)}; they must match"
        )


def _zero_invalid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x * mask`` where invalid positions become exactly 0 even if ``x`` is nan/inf."""
    return torch.where(
        mask != 0, x * mask.to(x.dtype), torch.zeros((), dtype=x.dtype, device=x.device)
    )


def masked_sum(
    x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Sum of ``x * mask`` over ``dim`` (all dims when ``None``)."""
    _check_mask(x, mask, "masked_sum")
    weighted = _zero_invalid(x, mask)
    return weighted.sum() if dim is None else weighted.sum(dim=dim)


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Mean of ``x`` over valid positions: ``sum(x * mask) / sum(mask)``.

    A reduction with no valid positions gives 0 rather than ``nan``.
    """
    _check_mask(x, mask, "masked_mean")
    x = x if x.is_floating_point() else x.float()
    total = masked_sum(x, mask, dim)
    count = mask.to(total.dtype).sum() if dim is None else mask.to(total.dtype).sum(dim=dim)
    return torch.where(count > 0, total / count.clamp_min(torch.finfo(total.dtype).tiny), 0.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all valid positions (a scalar).

    ``unbiased`` applies Bessel's correction ``n / (n - 1)`` with ``n = sum(mask)``; with
    fewer than two valid positions the variance is 0 (there is no spread to measure).
    """
    _check_mask(x, mask, "masked_var")
    x = x if x.is_floating_point() else x.float()
    mean = masked_mean(x, mask)
    centered = torch.where(mask != 0, x - mean, torch.zeros((), dtype=x.dtype, device=x.device))
    var = masked_mean(centered.pow(2), mask)
    if unbiased:
        n = mask.to(var.dtype).sum()
        var = torch.where(n > 1, var * n / (n - 1).clamp_min(1.0), torch.zeros_like(var))
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise ``x`` to unit variance using statistics of the valid positions only.

    Returns ``(x - mean) / sqrt(var + eps)`` (``var`` unbiased), with the mean added back
    when ``shift_mean`` is False. Invalid positions are set to 0.
    """
    _check_mask(x, mask, "masked_whiten")
    x = x if x.is_floating_point() else x.float()
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask != 0, whitened, torch.zeros((), dtype=x.dtype, device=x.device))
