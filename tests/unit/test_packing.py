"""Packed and unpadded forward passes score response tokens exactly like padded rows."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from rlflow.models import packing
from rlflow.models.packing import (
    LAYOUTS,
    MASK_KINDS,
    block_causal_mask,
    build_model_inputs,
    enable_varlen_sdpa,
    mask_kind_for,
    score_responses,
    sliding_window_layout,
)
from rlflow.utils.torch_functional import compute_position_ids
from rlflow.workers.policy import _split_to_count

TOL = 1e-5


def ragged_rows(vocab: int, prompt_lens: list[int], resp_lens: list[int], width_p: int, width_r: int):
    """Rollout layout: prompts left-padded to width_p, responses right-padded to width_r."""
    batch = len(prompt_lens)
    ids = torch.randint(0, vocab, (batch, width_p + width_r))
    mask = torch.zeros(batch, width_p + width_r, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
        mask[b, width_p - p : width_p] = 1
        mask[b, width_p : width_p + r] = 1
    return ids, mask, compute_position_ids(mask), ids[:, width_p:]


def naive_scores(model, ids, mask, prompt_lens, resp_lens, width_p, width_r):
    """Each row alone, with no padding at all: log p(token) and entropy per response token."""
    lp = torch.zeros(len(prompt_lens), width_r)
    ent = torch.zeros(len(prompt_lens), width_r)
    for b, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
        seq = ids[b][mask[b].bool()]
        with torch.no_grad():
            logp = model(input_ids=seq[None]).logits[0].float().log_softmax(-1)
        for t in range(r):
            row = logp[p + t - 1]
            lp[b, t] = row[seq[p + t]]
            ent[b, t] = -(row.exp() * row).sum()
    return lp, ent


def score(model, ids, mask, pos, resp, layout, mask_kind=None, round_to=1):
    inputs = build_model_inputs(
        ids, mask, pos, resp, layout, round_to=round_to,
        mask_kind=mask_kind or mask_kind_for(model),
    )
    with torch.no_grad():
        return score_responses(model, inputs, temperature=1.0, with_entropy=True)


def random_llama(attn: str) -> torch.nn.Module:
    """``attn``: sdpa, eager, or varlen (sdpa switched to rlflow's per-sequence attention)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=101, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
    )
    impl = "sdpa" if attn == "varlen" else attn
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()
    if attn == "varlen":
        assert enable_varlen_sdpa(model)
    return model


@pytest.fixture(scope="module")
def demo_model_path(tmp_path_factory) -> str:
    from rlflow.demo.assets import ensure_demo_model

    mp = pytest.MonkeyPatch()
    mp.setenv("RLFLOW_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        return ensure_demo_model()
    finally:
        mp.undo()


PROMPTS = [7, 3, 5, 1, 6, 2]
RESPONSES = [6, 2, 0, 4, 6, 1]  # one row has no response tokens at all


@pytest.mark.parametrize("attn", ["sdpa", "eager", "varlen"])
def test_demo_model_all_layouts_match_padded_and_naive(demo_model_path, attn):
    torch.manual_seed(1)
    impl = "sdpa" if attn == "varlen" else attn
    model = AutoModelForCausalLM.from_pretrained(demo_model_path, attn_implementation=impl).eval()
    if attn == "varlen":
        assert enable_varlen_sdpa(model) and mask_kind_for(model) == "varlen"
    ids, mask, pos, resp = ragged_rows(model.config.vocab_size, PROMPTS, RESPONSES, 8, 6)
    ref_lp, ref_ent = naive_scores(model, ids, mask, PROMPTS, RESPONSES, 8, 6)
    valid = mask[:, 8:].bool()
    for layout in LAYOUTS:
        lp, ent = score(model, ids, mask, pos, resp, layout, round_to=8)
        assert lp.shape == resp.shape
        assert torch.allclose(lp[valid], ref_lp[valid], atol=TOL, rtol=0), layout
        assert torch.allclose(ent[valid], ref_ent[valid], atol=TOL, rtol=0), layout
        assert torch.all(lp[~valid] == 0) and torch.all(ent[~valid] == 0)


@pytest.mark.parametrize("attn", ["sdpa", "eager", "varlen"])
def test_bigger_random_llama_packed_matches_padded(attn):
    model = random_llama(attn)
    torch.manual_seed(2)
    prompts = [1, 12, 5, 9, 16, 3, 7, 2]
    responses = [20, 3, 17, 1, 9, 24, 0, 11]
    ids, mask, pos, resp = ragged_rows(101, prompts, responses, 16, 24)
    padded_lp, padded_ent = score(model, ids, mask, pos, resp, "padded")
    ref_lp, _ = naive_scores(model, ids, mask, prompts, responses, 16, 24)
    valid = mask[:, 16:].bool()
    assert torch.allclose(padded_lp[valid], ref_lp[valid], atol=TOL, rtol=0)
    kinds = [k for k in MASK_KINDS if not (attn == "eager" and k == "bool")]
    for kind in kinds:
        lp, ent = score(model, ids, mask, pos, resp, "packed", mask_kind=kind)
        assert (lp - padded_lp).abs().max() <= TOL, kind
        assert (ent - padded_ent).abs().max() <= TOL, kind
    lp, _ = score(model, ids, mask, pos, resp, "unpadded", round_to=8)
    assert (lp - padded_lp).abs().max() <= TOL


def test_varlen_sdpa_runs_attention_per_sequence(monkeypatch):
    model = random_llama("varlen")
    plain = random_llama("sdpa")
    torch.manual_seed(5)
    prompts, responses = [3, 6, 2], [5, 1, 7]
    ids, mask, pos, resp = ragged_rows(101, prompts, responses, 6, 7)
    # unpacked layouts go through transformers' sdpa unchanged: identical numbers
    for layout in ("padded", "unpadded"):
        switched = score(model, ids, mask, pos, resp, layout)[0]
        assert torch.equal(switched, score(plain, ids, mask, pos, resp, layout)[0])
    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        seen.append((query.shape[2], kwargs.get("is_causal")))
        return real_sdpa(query, *args, **kwargs)

    monkeypatch.setattr(packing.F, "scaled_dot_product_attention", spy)
    lp, _ = score(model, ids, mask, pos, resp, "packed")
    lengths = [p + r for p, r in zip(prompts, responses)]
    # one causal call per sequence and layer, never one over the whole packed row
    assert seen == [(n, True) for n in lengths] * model.config.num_hidden_layers
    monkeypatch.undo()
    padded, _ = score(plain, ids, mask, pos, resp, "padded")
    assert (lp - padded).abs().max() <= TOL


def test_packed_row_without_document_mask_differs():
    # Guards the test above against passing vacuously: plain causal attention over the packed
    # row lets later sequences read earlier ones, which must change their log-probs.
    model = random_llama("sdpa")
    torch.manual_seed(3)
    ids, mask, pos, resp = ragged_rows(101, [4, 6], [5, 5], 6, 5)
    inputs = build_model_inputs(ids, mask, pos, resp, "packed", mask_kind="bool")
    n = inputs.input_ids.shape[1]
    inputs.attention_mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        leaky, _ = score_responses(model, inputs)
    right, _ = score(model, ids, mask, pos, resp, "packed")
    assert torch.allclose(leaky[0], right[0], atol=TOL)  # the first sequence sees nothing else
    assert (leaky[1] - right[1]).abs().max() > 1e-3


def test_packed_gradients_match_padded():
    model = random_llama("sdpa").train()
    torch.manual_seed(4)
    ids, mask, pos, resp = ragged_rows(101, [3, 9, 5], [7, 2, 5], 9, 7)
    grads = {}
    for layout in ("padded", "packed"):
        model.zero_grad()
        inputs = build_model_inputs(ids, mask, pos, resp, layout, mask_kind="bool")
        lp, ent = score_responses(model, inputs, temperature=0.7, with_entropy=True)
        (lp.sum() + 0.1 * ent.sum()).backward()
        grads[layout] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads["padded"].items():
        diff = (grads["packed"][name] - g).abs().max() / g.abs().max().clamp_min(1e-12)
        assert diff <= TOL, name


def test_packed_inputs_layout_by_hand():
    # rows: [pad a b | c pad] and [d e f | g h]  (prompt width 3, response width 2)
    ids = torch.tensor([[0, 11, 12, 13, 0], [14, 15, 16, 17, 18]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    pos = compute_position_ids(mask)
    packed = build_model_inputs(ids, mask, pos, ids[:, 3:], "packed", mask_kind="bool")
    assert packed.input_ids.tolist() == [[11, 12, 13, 14, 15, 16, 17, 18]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    # response token 13 is scored from 12 (slot 1); 17 from 16 (slot 5); 18 from 17 (slot 6)
    assert packed.keep.nonzero()[:, 1].tolist() == [1, 5, 6]
    assert packed.targets.tolist() == [13, 17, 18]
    assert packed.scatter.tolist() == [[True, False], [True, True]]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:3, :3] = torch.ones(3, 3, dtype=torch.bool).tril()
    expected[3:, 3:] = torch.ones(5, 5, dtype=torch.bool).tril()
    assert torch.equal(packed.attention_mask[0, 0], expected)

    unpadded = build_model_inputs(ids, mask, pos, ids[:, 3:], "unpadded", round_to=4)
    assert unpadded.input_ids.tolist() == [[11, 12, 13, 0, 0, 0, 0, 0], [14, 15, 16, 17, 18, 0, 0, 0]]
    assert unpadded.attention_mask.tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    assert unpadded.keep.nonzero().tolist() == [[0, 1], [1, 2], [1, 3]]


def test_block_causal_mask_additive_values():
    mask = block_causal_mask(torch.tensor([0, 0, 1]), "additive", torch.float32)[0, 0]
    low = torch.finfo(torch.float32).min
    assert mask.tolist() == [[0.0, low, low], [0.0, 0.0, low], [low, low, 0.0]]


def test_bad_arguments_raise_clear_errors():
    ids, mask, pos, resp = ragged_rows(10, [2], [2], 3, 2)
    with pytest.raises(ValueError, match="layout"):
        build_model_inputs(ids, mask, pos, resp, "sorted")
    with pytest.raises(ValueError, match="mask_kind"):
        build_model_inputs(ids, mask, pos, resp, "packed", mask_kind="float")
    with pytest.raises(ValueError, match="round_to"):
        build_model_inputs(ids, mask, pos, resp, "unpadded", round_to=0)
    with pytest.raises(ValueError, match="attention_mask shape"):
        build_model_inputs(ids, mask[:, :-1], pos, resp, "padded")
    with pytest.raises(ValueError, match="responses"):
        build_model_inputs(ids, mask, pos, ids, "padded")


def test_split_to_count_keeps_cost_and_adds_empty_steps():
    lengths = [10, 4, 7, 3, 9]
    # packed cost = sum of lengths; halving never exceeds the parent's cost
    groups = _split_to_count([[0, 1, 2, 3, 4]], 3, lengths, "packed", 1)
    assert len(groups) == 3
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4]
    assert max(sum(lengths[i] for i in g) for g in groups) <= sum(lengths)
    # unpadded cost = rows x rounded longest; more steps than rows -> trailing empty steps
    groups = _split_to_count([[0, 1]], 4, lengths, "unpadded", 8)
    assert [len(g) for g in groups] == [1, 1, 0, 0]
    assert _split_to_count([[0], [1, 2]], 2, lengths, "padded", 1) == [[0], [1, 2]]


def test_varlen_attention_refuses_what_it_cannot_do():
    q = torch.randn(1, 2, 6, 4)
    bounds = torch.tensor([0, 2, 6], dtype=torch.int32)
    module = torch.nn.Module()
    full, _ = packing._varlen_sdpa_attention(module, q, q, q, None, cu_seq_lens_q=bounds)
    out, _ = packing._varlen_sdpa_attention(module, q, q, q, None, cu_seq_lens_q=bounds, sliding_window=4)
    assert torch.equal(out, full)  # a window as long as every sequence changes nothing
    banded, _ = packing._varlen_sdpa_attention(module, q, q, q, None, cu_seq_lens_q=bounds, sliding_window=3)
    # the last query of the 4-token sequence sees its 3 newest keys only
    keys = q[0, :, 3:6].transpose(0, 1)  # [3, heads, D]
    weights = torch.einsum("hd,khd->hk", q[0, :, 5], keys).div(2.0).softmax(-1)
    expected = torch.einsum("hk,khd->hd", weights, keys)
    assert torch.allclose(banded[0, 5], expected, atol=1e-6)
    assert torch.equal(banded[0, :5], full[0, :5])
    with pytest.raises(NotImplementedError, match="soft-cap"):
        packing._varlen_sdpa_attention(module, q, q, q, None, cu_seq_lens_q=bounds, softcap=30.0)
    with pytest.raises(ValueError, match="one packed row"):
        packing._varlen_sdpa_attention(module, q.expand(2, -1, -1, -1), q, q, None, cu_seq_lens_q=bounds)


def sliding_window_model(arch: str, attn: str) -> torch.nn.Module:
    """A tiny random model whose sliding window (4) is shorter than the test sequences:
    Mistral (every layer slides), Gemma2 (alternating sliding / full layers, soft-capped
    attention logits) or Qwen2 (sliding from the second layer on)."""
    from transformers import Gemma2Config, MistralConfig, Qwen2Config

    torch.manual_seed(0)
    common = dict(
        vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        sliding_window=4,
    )
    if arch == "mistral":
        config = MistralConfig(**common)
    elif arch == "gemma2":
        config = Gemma2Config(**common, head_dim=16, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    else:
        config = Qwen2Config(**common, use_sliding_window=True, max_window_layers=1)
    impl = "sdpa" if attn == "varlen" else attn
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()
    if attn == "varlen":
        assert enable_varlen_sdpa(model)
    return model


@pytest.mark.parametrize(
    "arch,attn",
    [("mistral", "eager"), ("mistral", "varlen"), ("gemma2", "eager"), ("qwen2", "eager"), ("qwen2", "varlen")],
)
def test_packed_sliding_window_matches_unpacked(arch, attn):
    model = sliding_window_model(arch, attn)
    window, per_layer_type = sliding_window_layout(model.config)
    assert window == 4 and per_layer_type == (arch != "mistral")
    torch.manual_seed(3)
    prompts, responses = [6, 2, 9, 4], [7, 5, 8, 1]  # most rows longer than the window
    ids, mask, pos, resp = ragged_rows(101, prompts, responses, 10, 8)
    ref_lp, _ = naive_scores(model, ids, mask, prompts, responses, 10, 8)
    valid = mask[:, 10:].bool()
    padded_lp, _ = score(model, ids, mask, pos, resp, "padded")
    assert torch.allclose(padded_lp[valid], ref_lp[valid], atol=TOL, rtol=0)
    inputs = build_model_inputs(
        ids, mask, pos, resp, "packed", mask_kind=mask_kind_for(model),
        sliding_window=window, per_layer_type=per_layer_type,
    )
    with torch.no_grad():
        packed_lp, _ = score_responses(model, inputs)
    assert (packed_lp - padded_lp).abs().max() <= TOL
    # the window matters here: a packed mask without it scores differently
    if attn == "eager":
        plain = build_model_inputs(ids, mask, pos, resp, "packed", mask_kind="additive")
        with torch.no_grad():
            assert (score_responses(model, plain)[0] - padded_lp).abs().max() > 1e-3
