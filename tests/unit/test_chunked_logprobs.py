"""Chunked LM-head log-probs and entropy equal the direct computation, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

from rlflow.models.packing import build_model_inputs, enable_varlen_sdpa, mask_kind_for, score_responses
from rlflow.utils.torch_functional import compute_position_ids, logprobs_and_entropy_from_hidden


def direct(hidden, weight, bias, targets, temperature):
    """Full [K, V] float32 logits, then log_softmax: the reference the chunked path must equal."""
    logits = F.linear(hidden, weight, bias)
    logits = (logits if logits.dtype == torch.float64 else logits.float()) / temperature
    logp = logits.log_softmax(-1)
    return logp.gather(-1, targets[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def leaves(dtype, with_bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(23, 16, generator=gen, dtype=dtype).requires_grad_()
    weight = (torch.randn(50, 16, generator=gen, dtype=dtype) * 0.5).requires_grad_()
    bias = (torch.randn(50, generator=gen, dtype=dtype) * 0.1).requires_grad_() if with_bias else None
    targets = torch.randint(0, 50, (23,), generator=gen)
    return hidden, weight, bias, targets


@pytest.mark.parametrize("chunk_rows", [1, 5, 23, 100])
@pytest.mark.parametrize("with_bias", [False, True])
def test_values_and_gradients_equal_direct_float64(chunk_rows, with_bias):
    hidden, weight, bias, targets = leaves(torch.float64, with_bias)
    a = torch.randn(23, dtype=torch.float64)
    b = torch.randn(23, dtype=torch.float64)

    def grads(fn):
        lp, ent = fn()
        ((lp * a).sum() + (ent * b).sum()).backward()
        out = [lp.detach(), ent.detach()] + [t.grad.clone() for t in (hidden, weight, bias) if t is not None]
        for t in (hidden, weight, bias):
            if t is not None:
                t.grad = None
        return out

    want = grads(lambda: direct(hidden, weight, bias, targets, 0.7))
    got = grads(lambda: logprobs_and_entropy_from_hidden(
        hidden, weight, targets, bias, temperature=0.7, chunk_rows=chunk_rows))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_float32_and_unused_entropy():
    hidden, weight, bias, targets = leaves(torch.float32, True, seed=1)
    lp, ent = direct(hidden, weight, bias, targets, 1.0)
    lp.sum().backward()
    want = [lp.detach(), ent.detach(), hidden.grad.clone(), weight.grad.clone(), bias.grad.clone()]
    hidden.grad = weight.grad = bias.grad = None
    # entropy computed but not in the loss: its backward term is skipped, gradients unchanged
    lp, ent = logprobs_and_entropy_from_hidden(hidden, weight, targets, bias, chunk_rows=4)
    lp.sum().backward()
    got = [lp.detach(), ent.detach(), hidden.grad, weight.grad, bias.grad]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    none_lp, none_ent = logprobs_and_entropy_from_hidden(hidden, weight, targets, bias, with_entropy=False)
    assert none_ent is None
    torch.testing.assert_close(none_lp, want[0], rtol=1e-5, atol=1e-6)


def test_bfloat16_head_matches_model_logits():
    # The chunks run the head in the parameters' dtype and upcast, as the model's logits are.
    hidden, weight, _, targets = leaves(torch.bfloat16, False, seed=2)
    lp_d, ent_d = direct(hidden, weight, None, targets, 1.0)
    lp_c, ent_c = logprobs_and_entropy_from_hidden(hidden, weight, targets, chunk_rows=7)
    torch.testing.assert_close(lp_c, lp_d, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent_c, ent_d, rtol=0, atol=1e-5)


def tiny_llama(tie: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    enable_varlen_sdpa(model)
    return model


@pytest.mark.parametrize("layout", ["padded", "unpadded", "packed"])
@pytest.mark.parametrize("tie", [True, False])
def test_score_responses_chunked_equals_direct(layout, tie, monkeypatch):
    import rlflow.utils.torch_functional as tf

    # 300-token vocabulary, 300 * 7 elements per chunk: several chunks per micro-batch
    monkeypatch.setattr(tf, "_HEAD_CHUNK_ELEMENTS", 300 * 7)
    model = tiny_llama(tie).train()
    torch.manual_seed(5)
    p_w, r_w = 9, 8
    mask = torch.zeros(3, p_w + r_w, dtype=torch.long)
    for b, (p, r) in enumerate([(3, 8), (9, 2), (5, 6)]):
        mask[b, p_w - p : p_w] = 1
        mask[b, p_w : p_w + r] = 1
    ids = torch.randint(0, 300, mask.shape)
    inputs = build_model_inputs(
        ids, mask, compute_position_ids(mask), ids[:, p_w:], layout, mask_kind=mask_kind_for(model)
    )
    results = {}
    for chunked in (False, True):
        model.zero_grad()
        lp, ent = score_responses(model, inputs, temperature=0.8, with_entropy=True, chunked=chunked)
        (lp.sum() + 0.3 * ent.sum()).backward()
        results[chunked] = (lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (lp_d, ent_d, g_d), (lp_c, ent_c, g_c) = results[False], results[True]
    assert lp_d.abs().sum() > 0 and ent_d.abs().sum() > 0
    torch.testing.assert_close(lp_c, lp_d, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_c, ent_d, rtol=1e-5, atol=1e-5)
    assert g_c.keys() == g_d.keys()
    for name, grad in g_d.items():
        scale = grad.abs().max().clamp_min(1e-12)
        assert ((g_c[name] - grad).abs().max() / scale) <= 1e-4, name
    # the head was restored: a plain forward returns vocabulary logits again
    assert model(input_ids=ids[:1]).logits.shape[-1] == 300
