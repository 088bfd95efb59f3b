"""Partial rollouts on the HF rollout worker (demo model, one process, no Ray).

A response generated segment by segment must be the response one call would give (greedy),
and when the weights change between segments, each token's recorded log-prob must be its
log-prob under the weights that sampled it, computed here by a plain forward pass.
"""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

import rlflow
from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.trainer.partial_rollout import PartialGroup, token_version_metrics
from rlflow.workers.rollout.hf_rollout import HFRolloutWorker

MAX_TOKENS = 6
N = 4


def worker(greedy: bool) -> HFRolloutWorker:
    cfg = rlflow.compose_config("grpo", overrides=[
        f"data.max_response_length={MAX_TOKENS}", f"rollout.do_sample={str(not greedy).lower()}",
    ])
    return HFRolloutWorker(OmegaConf.to_container(cfg, resolve=True))


def prompts(tokenizer, texts: list[str]) -> BatchedDataDict:
    """Left-padded prompts, each repeated N times, as the driver builds them."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(r) for r in rows) + 2  # some padding on every row
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return BatchedDataDict({"input_ids": ids, "attention_mask": mask}).repeat_interleave(N)


def run_segments(rollout: HFRolloutWorker, group: PartialGroup, segment_tokens: int, between=None) -> None:
    """Drive the group's responses to the end as the async driver does, calling ``between()``
    after every segment call."""
    seed = 0
    while not group.finished():
        todo = [r for r in group.responses if not r.done]
        inputs = [r.next_input(segment_tokens, MAX_TOKENS) for r in todo]
        seed += 1
        out = rollout.generate_segments([ids for ids, _ in inputs], [b for _, b in inputs], seed=seed)
        for r, (_, budget), tokens, lps, stopped in zip(todo, inputs, out["tokens"], out["log_probs"], out["stopped"]):
            r.extend(tokens, lps, stopped, out["weight_version"], budget, MAX_TOKENS)
        if between is not None:
            between()


@pytest.mark.parametrize("segment_tokens", [1, 4])
def test_greedy_segments_give_the_one_call_response(segment_tokens):
    rollout = worker(greedy=True)
    batch = prompts(rollout.tokenizer, ["1+2=", "3+4+1="])
    whole = rollout.generate(batch, seed=0)
    for g in range(2):
        rows = batch.select_indices(list(range(g * N, (g + 1) * N)))
        group = PartialGroup((0, g), rows)
        run_segments(rollout, group, segment_tokens)
        got = group.batch(MAX_TOKENS, rollout.tokenizer.pad_token_id)
        sl = slice(g * N, (g + 1) * N)
        for key in ("prompts", "responses", "response_mask", "input_ids", "attention_mask", "position_ids"):
            assert torch.equal(got[key], whole[key][sl]), key
        torch.testing.assert_close(got["rollout_log_probs"], whole["rollout_log_probs"][sl], atol=1e-5, rtol=0)
        assert got["weight_version"] == [0] * N
        assert torch.equal(got["rollout_token_version"], torch.zeros(N, MAX_TOKENS, dtype=torch.long))


def test_tokens_after_a_weight_change_are_sampled_and_scored_with_the_new_weights():
    rollout = worker(greedy=False)
    versions = [copy.deepcopy(rollout.model)]

    def sync():  # what update_weights does: new weights, next version
        torch.manual_seed(len(versions))
        with torch.no_grad():
            for p in rollout.model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        rollout.weight_version += 1
        versions.append(copy.deepcopy(rollout.model))

    batch = prompts(rollout.tokenizer, ["2+2="])
    group = PartialGroup((0, 0), batch)
    run_segments(rollout, group, segment_tokens=2, between=sync)
    out = group.batch(MAX_TOKENS, rollout.tokenizer.pad_token_id)

    mask = out["response_mask"].bool()
    token_versions = out["rollout_token_version"]
    spans = []
    for i in range(N):
        n = int(mask[i].sum())
        seen = token_versions[i, :n].tolist()
        # Segments of 2 tokens, a new version after each: token t was sampled by version t // 2.
        assert seen == [t // 2 for t in range(n)], seen
        spans.append(len(set(seen)) > 1)
        assert out["weight_version"][i] == 0  # the oldest token's version
        ids = out["input_ids"][i : i + 1, : out["prompts"].shape[1] + n]
        keep = out["attention_mask"][i : i + 1, : ids.shape[1]]
        for t in range(n):
            model = versions[seen[t]]
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=keep, position_ids=out["position_ids"][i : i + 1, : ids.shape[1]]).logits
            position = out["prompts"].shape[1] + t - 1  # the logits that predict token t
            expected = torch.log_softmax(logits[0, position].float(), dim=-1)[ids[0, position + 1]]
            assert abs(out["rollout_log_probs"][i, t].item() - expected.item()) < 1e-4, (i, t)

    current = rollout.weight_version
    metrics = token_version_metrics(current, token_versions, out["response_mask"])
    lags = (current - token_versions)[mask].double()
    assert metrics["rollout/token_lag"] == pytest.approx(lags.mean().item())
    assert metrics["rollout/multi_version_frac"] == pytest.approx(sum(spans) / N)
    assert any(spans), "some response continued across a weight change"
