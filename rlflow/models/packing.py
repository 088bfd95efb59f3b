"""Score response tokens from three layouts of the same rows: padded, unpadded and packed.

Input rows follow the rollout layout ``[prompt (left-padded) | response (right-padded)]``:
``input_ids``, ``attention_mask`` and ``position_ids`` are ``[B, L]`` and ``responses`` is
``[B, T]`` (the last ``T`` columns). A response token is *scored* when its attention-mask
entry is 1 and at least one valid token precedes it; its log-prob comes from the logits of
the valid token just before it.

Layouts (``build_model_inputs``):

* ``padded``: the rows as given (``[B, L]``), with their 2-D attention mask.
* ``unpadded``: each row's valid tokens moved to the front, width = longest row rounded up
  to ``round_to`` (``[B, W]``, right padding). Dynamic batching uses it, so a micro-batch
  of short rows costs short rows.
* ``packed``: all valid tokens of all rows in ONE row (``[1, N]``), position ids restarting
  at every sequence, and attention that never crosses a sequence boundary. No padding tokens
  are computed at all.

How a packed row keeps sequences apart depends on the attention kernel (``mask_kind``):
a 4-D block-diagonal causal mask (``bool`` for sdpa, ``additive`` for eager), which costs
attention over all ``N x N`` pairs; ``varlen``, rlflow's sdpa variant that runs causal
attention per sequence from ``cu_seqlens`` (``enable_varlen_sdpa``), which costs only the
pairs inside each sequence; or ``position_ids`` (no mask: transformers derives the
sequences from restarting position ids, as its flash-attention path expects).

Sliding-window attention (Mistral, Gemma2, Qwen2 with ``use_sliding_window`` ...): a 4-D
mask would replace the window transformers builds, so the packed masks carry the window
band themselves (``sliding_window_layout``); for models that mix full and sliding layers
(Gemma2) the mask is a dict per layer type, as the model's forward accepts. ``varlen``
applies the window each attention call passes. Logit soft-capping (Gemma2) lives in the
eager attention function, which a packed mask does not touch.

``score_responses`` runs the model on any layout and returns per-token log-probs (and
entropy) back in the ``[B, T]`` response layout, 0 where a token is not scored. The three
layouts give the same numbers up to floating-point summation order.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from rlflow.data.batch_sizes import round_up
from rlflow.utils.torch_functional import (
    entropy_from_logits,
    logprobs_and_entropy_from_hidden,
    logprobs_from_logits,
)

__all__ = [
    "LAYOUTS",
    "MASK_KINDS",
    "ModelInputs",
    "build_model_inputs",
    "VARLEN_SDPA",
    "block_causal_mask",
    "enable_varlen_sdpa",
    "mask_kind_for",
    "score_responses",
    "sliding_window_layout",
]

LAYOUTS = ("padded", "unpadded", "packed")
# How a packed row's sequences are kept apart (see the module docstring).
MASK_KINDS = ("bool", "additive", "varlen", "position_ids")
# Name under which the per-sequence sdpa attention is registered with transformers.
VARLEN_SDPA = "rlflow_sdpa_varlen"


@dataclass
class ModelInputs:
    """What one forward pass needs, plus where its scores go.

    ``keep`` marks the positions whose logits score a response token; ``targets`` are those
    tokens and ``scatter`` marks their ``[B, T]`` response positions. ``keep`` and ``scatter``
    list the same tokens in the same (row-major) order.
    """

    input_ids: torch.Tensor  # [R, W]
    position_ids: torch.Tensor  # [R, W]
    # [R, W] 0/1, [1, 1, W, W] 4-D, {layer type: 4-D} (packed, mixed sliding layers), or None
    attention_mask: Optional[torch.Tensor | dict[str, torch.Tensor]]
    keep: torch.Tensor  # [R, W] bool
    targets: torch.Tensor  # [K] token ids
    scatter: torch.Tensor  # [B, T] bool, K entries True
    # packed + varlen only: sequence boundaries [0, len_0, len_0 + len_1, ..., N], int32
    cu_seqlens: Optional[torch.Tensor] = None


def _check_rows(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    responses: torch.Tensor,
) -> None:
    if input_ids.dim() != 2 or responses.dim() != 2:
        raise ValueError(
            f"input_ids and responses must be 2-D [B, L] / [B, T], got {input_ids.dim()}-D "
            f"and {responses.dim()}-D"
        )
    for name, t in (("attention_mask", attention_mask), ("position_ids", position_ids)):
        if t.shape != input_ids.shape:
            raise ValueError(
                f"{name} shape {tuple(t.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
            )
    if responses.shape[0] != input_ids.shape[0] or responses.shape[1] >= input_ids.shape[1]:
        raise ValueError(
            f"responses {tuple(responses.shape)} must be the last T < L columns of input_ids "
            f"{tuple(input_ids.shape)} (same batch size)"
        )


def causal_band(n: int, window: Optional[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """``[n, n]`` bool: key ``j`` visible to query ``i`` iff ``j <= i`` and, with a sliding
    ``window``, ``i - j < window`` (transformers' convention: the query and the
    ``window - 1`` tokens before it)."""
    index = torch.arange(n, device=device)
    distance = index[:, None] - index[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    return allowed


def block_causal_mask(
    doc_ids: torch.Tensor, kind: str, dtype: torch.dtype, sliding_window: Optional[int] = None
) -> torch.Tensor:
    """``[1, 1, N, N]`` mask: query ``i`` sees key ``j`` iff ``j <= i``, same document and,
    with ``sliding_window``, ``i - j < sliding_window``.

    ``doc_ids`` is ``[N]``. ``kind`` ``"bool"`` gives True where attention is allowed;
    ``"additive"`` gives 0 there and the most negative ``dtype`` value elsewhere (a finite
    value, so a row can never turn into nan).
    """
    if kind not in ("bool", "additive"):
        raise ValueError(f"block_causal_mask: kind must be 'bool' or 'additive', got {kind!r}")
    n = doc_ids.shape[0]
    causal = causal_band(n, sliding_window, doc_ids.device)
    allowed = causal & (doc_ids[:, None] == doc_ids[None, :])
    if kind == "bool":
        return allowed[None, None]
    additive = torch.zeros(n, n, dtype=dtype, device=doc_ids.device)
    additive.masked_fill_(~allowed, torch.finfo(dtype).min)
    return additive[None, None]


def _varlen_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function for transformers' ``AttentionInterface``.

    With ``cu_seq_lens_q`` (a packed row, batch 1): causal sdpa on each sequence's slice, so
    the cost is the sum of squared sequence lengths and the fused causal kernel is used; a
    sequence longer than the layer's ``sliding_window`` gets the banded mask instead.
    Without it: transformers' own sdpa attention, unchanged. Inputs are ``[B, heads, N, D]``;
    the output is ``[B, N, heads, D]`` as transformers expects.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask,
            dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs,
        )
    if query.shape[0] != 1:
        raise ValueError(f"varlen packed attention needs one packed row, got batch {query.shape[0]}")
    if kwargs.get("softcap") is not None:
        # sdpa cannot soft-cap attention logits; silently skipping it would change the model
        raise NotImplementedError(
            "varlen packed attention cannot soft-cap attention logits: set "
            "model.attn_implementation=eager, or turn sequence packing off"
        )
    edges = bounds.tolist()
    window = kwargs.get("sliding_window")
    gqa = query.shape[1] != key.shape[1]
    dropout_p = dropout if module.training else 0.0
    parts = []
    for a, b in zip(edges[:-1], edges[1:]):
        if b <= a:
            continue
        # A sequence longer than the sliding window needs the band; shorter ones run the
        # fused causal kernel.
        band = causal_band(b - a, window, query.device) if window is not None and b - a > window else None
        parts.append(F.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], attn_mask=band,
            dropout_p=dropout_p, is_causal=band is None, scale=scaling, enable_gqa=gqa,
        ))
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def enable_varlen_sdpa(model: torch.nn.Module) -> bool:
    """Switch an sdpa model to ``VARLEN_SDPA``; True when the model now uses it.

    Unpacked inputs keep transformers' sdpa path bit for bit (same function, same masks);
    packed rows built with ``mask_kind="varlen"`` get per-sequence attention. Models with
    another attention implementation, or that cannot switch, are left alone.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(VARLEN_SDPA, _varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)
    model.set_attn_implementation(VARLEN_SDPA)
    return config._attn_implementation == VARLEN_SDPA


def sliding_window_layout(config: object) -> tuple[Optional[int], bool]:
    """``(window, per_layer_type)`` of a transformers config: the sliding window its attention
    applies (None: full attention everywhere), and whether only some layers slide
    (``layer_types`` mixing ``full_attention`` and ``sliding_attention``), so that packed masks
    must be given per layer type."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None, False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:  # Mistral, Phi-3 ...: every layer slides
        return int(window), False
    kinds = set(layer_types)
    if "sliding_attention" not in kinds:
        return None, False
    return int(window), kinds != {"sliding_attention"}


def mask_kind_for(model: torch.nn.Module) -> str:
    """The packed-mask kind the model's attention implementation accepts."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager"
    if impl == VARLEN_SDPA:
        return "varlen"
    if impl == "sdpa":
        return "bool"
    if impl == "eager":
        return "additive"
    return "position_ids"


def build_model_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    responses: torch.Tensor,
    layout: str,
    round_to: int = 1,
    mask_kind: str = "bool",
    mask_dtype: torch.dtype = torch.float32,
    sliding_window: Optional[int] = None,
    per_layer_type: bool = False,
) -> ModelInputs:
    """Arrange rows in ``layout`` (see the module docstring).

    ``round_to`` rounds the width of ``unpadded`` rows up to a multiple (kernel-friendly
    shapes); ``mask_kind`` (one of ``MASK_KINDS``) and ``mask_dtype`` apply to ``packed``, and
    so do ``sliding_window`` and ``per_layer_type`` (from ``sliding_window_layout``) for the
    ``bool`` and ``additive`` masks.
    Position ids of valid tokens are taken from ``position_ids``, so a packed sequence keeps
    the positions it had in its own row (0, 1, ... for left-padded prompts).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"mask_kind must be one of {list(MASK_KINDS)}, got {mask_kind!r}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive int, got {round_to!r}")
    _check_rows(input_ids, attention_mask, position_ids, responses)
    batch, width = input_ids.shape
    resp_len = responses.shape[1]
    prompt_len = width - resp_len
    device = input_ids.device

    valid = attention_mask != 0
    compact = valid.long().cumsum(-1) - 1  # index of each valid token among its row's valid tokens
    scatter = valid[:, prompt_len:] & (compact[:, prompt_len:] >= 1)
    # index (in the compact row) of the token whose logits score each response token
    source = compact[:, prompt_len:] - 1
    targets = responses[scatter]

    if layout == "padded":
        keep = torch.zeros(batch, width, dtype=torch.bool, device=device)
        keep[:, prompt_len - 1 : width - 1] = scatter
        return ModelInputs(input_ids, position_ids, attention_mask, keep, targets, scatter)

    lengths = valid.sum(-1)
    rows = torch.arange(batch, device=device)[:, None].expand(batch, width)
    resp_rows = rows[:, prompt_len:]
    if layout == "unpadded":
        out_width = round_up(max(int(lengths.max()), 1), round_to)
        ids = input_ids.new_zeros(batch, out_width)
        pos = position_ids.new_zeros(batch, out_width)
        ids[rows[valid], compact[valid]] = input_ids[valid]
        pos[rows[valid], compact[valid]] = position_ids[valid]
        mask = (torch.arange(out_width, device=device)[None, :] < lengths[:, None]).to(
            attention_mask.dtype
        )
        keep = torch.zeros(batch, out_width, dtype=torch.bool, device=device)
        keep[resp_rows[scatter], source[scatter]] = True
        return ModelInputs(ids, pos, mask, keep, targets, scatter)

    # packed: sequence b occupies [offset_b, offset_b + length_b) of one row
    offsets = lengths.cumsum(0) - lengths
    total = max(int(lengths.sum()), 1)
    slot = offsets[:, None] + compact
    ids = input_ids.new_zeros(1, total)
    pos = position_ids.new_zeros(1, total)
    doc = torch.full((total,), batch, dtype=torch.long, device=device)
    ids[0, slot[valid]] = input_ids[valid]
    pos[0, slot[valid]] = position_ids[valid]
    doc[slot[valid]] = rows[valid]
    keep = torch.zeros(1, total, dtype=torch.bool, device=device)
    keep[0, (offsets[:, None] + source)[scatter]] = True
    if mask_kind in ("bool", "additive"):
        mask = block_causal_mask(doc, mask_kind, mask_dtype, sliding_window)
        if per_layer_type:
            mask = {"sliding_attention": mask, "full_attention": block_causal_mask(doc, mask_kind, mask_dtype)}
        return ModelInputs(ids, pos, mask, keep, targets, scatter)
    cu_seqlens = None
    if mask_kind == "varlen":
        cu_seqlens = torch.cat([offsets, lengths.sum().reshape(1)]).to(torch.int32)
        if cu_seqlens[-1] < total:  # all rows empty: the placeholder token is its own sequence
            cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_tensor([total])])
    return ModelInputs(ids, pos, None, keep, targets, scatter, cu_seqlens)


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _plain_lm_head(model: torch.nn.Module) -> Optional[torch.nn.Linear]:
    """The model's LM head when its logits are exactly ``linear(hidden)``, else None.

    Models that rescale or soft-cap the logits after the head (Gemma's final softcapping,
    Cohere's logit_scale) are scored the direct way, so no number changes for them.
    """
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) is not None or hasattr(config, "logit_scale"):
        return None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return head if type(head) is torch.nn.Linear else None


def score_responses(
    model: torch.nn.Module,
    inputs: ModelInputs,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunked: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token log-probs (and entropy) of the scored response tokens, ``[B, T]`` float32.

    Logits are divided by ``temperature`` (the sampling temperature, so log-probs match the
    distribution the rollout sampled from). Positions that are not scored hold 0. Only the
    kept positions go through the LM head when the model supports ``logits_to_keep``.

    ``chunked`` (default): the LM head projects and log-softmaxes a block of tokens at a time
    (``logprobs_and_entropy_from_hidden``), so the float32 ``[tokens, vocab]`` logits of the
    micro-batch never exist, in forward or backward; same numbers and gradients as
    ``chunked=False``, which computes all the logits first.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    kwargs = dict(
        input_ids=inputs.input_ids,
        position_ids=inputs.position_ids,
        attention_mask=inputs.attention_mask,
        use_cache=False,
    )
    if inputs.cu_seqlens is not None:
        # read by the VARLEN_SDPA attention function (names as in transformers' flash path)
        longest = int((inputs.cu_seqlens[1:] - inputs.cu_seqlens[:-1]).max())
        kwargs.update(
            cu_seq_lens_q=inputs.cu_seqlens, cu_seq_lens_k=inputs.cu_seqlens,
            max_length_q=longest, max_length_k=longest,
        )
    keep = inputs.keep
    if _accepts_logits_to_keep(model):
        # A 1-D tensor of sequence positions (every transformers release that has the argument
        # takes this form) runs only the columns holding a scored position through the LM head.
        columns = keep.any(dim=0).nonzero().squeeze(-1)
        kwargs["logits_to_keep"] = columns
        keep = keep[:, columns]
    num_scored = int(inputs.targets.shape[0])
    shape = inputs.scatter.shape
    head = _plain_lm_head(model) if chunked else None
    if head is not None:
        scores = _run_with_chunked_head(model, head, kwargs, keep, inputs, temperature, with_entropy)
        log_probs = scores.new_zeros(shape)
        log_probs[inputs.scatter] = scores[:, 0]
        entropy = None
        if with_entropy:
            entropy = scores.new_zeros(shape)
            entropy[inputs.scatter] = scores[:, 1]
        return log_probs, entropy
    logits = model(**kwargs).logits
    if logits.shape[1] != keep.shape[1]:  # the model ignored logits_to_keep
        keep = inputs.keep
    logits = logits[keep]
    logits = logits.float() / temperature
    if logits.shape[0] != num_scored:
        raise RuntimeError(
            f"model returned logits for {logits.shape[0]} positions, expected {num_scored}"
        )
    log_probs = logits.new_zeros(shape)
    log_probs[inputs.scatter] = logprobs_from_logits(logits, inputs.targets)
    entropy = None
    if with_entropy:
        entropy = logits.new_zeros(shape)
        entropy[inputs.scatter] = entropy_from_logits(logits)
    return log_probs, entropy


def _run_with_chunked_head(
    model: torch.nn.Module,
    head: torch.nn.Linear,
    kwargs: dict,
    keep: torch.Tensor,
    inputs: ModelInputs,
    temperature: float,
    with_entropy: bool,
) -> torch.Tensor:
    """Run ``model`` with its LM head swapped for the chunked scorer; ``[K, 1 or 2]`` scores.

    The scores leave the model as its ``logits`` output, so the model's own hooks (FSDP2's
    all-gather / reduce-scatter of the head and embedding) see the gradient pass through them
    exactly as they see ordinary logits.
    """

    def scored_head(hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden[keep] if hidden.shape[:2] == keep.shape else hidden[inputs.keep]
        if rows.shape[0] != inputs.targets.shape[0]:
            raise RuntimeError(
                f"model returned hidden states for {rows.shape[0]} positions, expected "
                f"{inputs.targets.shape[0]}"
            )
        log_probs, entropy = logprobs_and_entropy_from_hidden(
            rows, head.weight, inputs.targets, head.bias, temperature, with_entropy
        )
        return torch.stack([log_probs, entropy], -1) if with_entropy else log_probs[:, None]

    head.forward = scored_head  # this instance only, for this call
    try:
        return model(**kwargs).logits
    finally:
        del head.forward
