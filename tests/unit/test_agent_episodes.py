"""Multi-turn episodes: token-in/token-out over several chat templates, loss masks, tool-call
parsing and the isolation of malformed calls and failing environments.

The engine here is a seeded sampler over the tokenizer's vocabulary that records every prompt
it is given; the episode loop, the chat templates and the tokenizers are the real ones.
"""

from __future__ import annotations

import random
import time
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlflow.agents.builtin_tools import calculator
from rlflow.agents.environment import Environment, StepResult
from rlflow.agents.environments import GuessNumber, ToolEnvironment
from rlflow.agents.episodes import observation_ids, run_episodes
from rlflow.agents.tools import Tool, parse_hermes, parse_plain, run_call
from rlflow.demo.assets import build_demo_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Qwen3's shape: tool results go in a user turn, and the LAST assistant message gets an empty
# think block that earlier ones do not.
QWEN3_STYLE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response><|im_end|>\n"
    "{% elif m['role'] == 'assistant' and loop.last %}<|im_start|>assistant\n<think>\n\n</think>\n\n{{ m['content'] }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]


def bpe_tokenizer(template: str, eos: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here (merges make token boundaries depend on the
    neighbouring text, which is what re-tokenizing a history gets wrong)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["user assistant tool reply ok the answer is 12 + 34 = 46", "hello\n\nworld 7 8 9"] * 50
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token=eos,
                                  additional_special_tokens=SPECIALS[1:])
    tok.chat_template = template
    return tok


def demo_tokenizer():
    return build_demo_tokenizer()


TOKENIZERS = {
    "demo": (demo_tokenizer, "user"),
    "chatml": (lambda: bpe_tokenizer(CHATML, "<|im_end|>"), "tool"),
    "llama3": (lambda: bpe_tokenizer(LLAMA3, "<|eot_id|>"), "tool"),
    "qwen3-style": (lambda: bpe_tokenizer(QWEN3_STYLE, "<|im_end|>"), "tool"),
}


class Replier(Environment):
    """Replies to every turn; the episode ends after ``turns`` turns."""

    def __init__(self, role: str, turns: int = 3) -> None:
        super().__init__()
        self.role, self.turns, self.seen = role, turns, []

    def step(self, text: str) -> StepResult:
        self.seen.append(text)
        if len(self.seen) == self.turns:
            return StepResult(reward=1.0, done=True)
        return StepResult([{"role": self.role, "content": "7" * len(self.seen)}], reward=0.25)


class RecordingEngine:
    """Samples 1..4 ordinary tokens then the stop token; remembers each prompt it gets."""

    def __init__(self, tokenizer, stop: int, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.vocab = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
        self.stop, self.calls = stop, []

    def __call__(self, prompts, budgets):
        self.calls.append([list(p) for p in prompts])
        out = []
        for budget in budgets:
            ids = [self.rng.choice(self.vocab) for _ in range(self.rng.randint(1, 4))] + [self.stop]
            ids = ids[:budget]
            out.append((ids, [-0.5 - 0.01 * j for j in range(len(ids))]))
        return out


def agent_cfg(**agent):
    defaults = dict(max_turns=3, max_tokens_per_turn=None, step_timeout_s=5.0, error_reward=-1.0,
                    tool_timeout_s=1.0)
    defaults.update(agent)
    return SimpleNamespace(agent=SimpleNamespace(**defaults),
                           data=SimpleNamespace(max_prompt_length=48, max_response_length=160))


def rows_for(tokenizer, count):
    messages = [{"role": "user", "content": "1+2="}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [{"raw_prompt": messages, "raw_prompt_ids": ids, "index": i, "reward_model": {}} for i in range(count)]


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_trajectory_ids_are_the_engines_ids_and_the_mask_covers_only_model_tokens(name):
    build, role = TOKENIZERS[name]
    tokenizer = build()
    stop = tokenizer.eos_token_id
    engine = RecordingEngine(tokenizer, stop)
    envs = []

    def make_env():
        envs.append(Replier(role))
        return envs[-1]

    batch = run_episodes(rows_for(tokenizer, 4), make_env, engine, tokenizer, agent_cfg(), [stop])
    prompt = rows_for(tokenizer, 1)[0]["raw_prompt_ids"]
    assert len(engine.calls) == 3
    for i, env in enumerate(envs):
        n = int(batch["attention_mask"][i, -160:].sum())
        ids = batch["responses"][i, :n].tolist()
        mask = batch["response_mask"][i, :n].tolist()
        # Every turn's engine input is the prompt plus the trajectory so far, id for id.
        offsets = [j for j in range(n) if mask[j] and (j == 0 or not mask[j - 1])]
        assert len(offsets) == 3
        for turn, start in enumerate(offsets):
            assert engine.calls[turn][i] == prompt + ids[:start]
        # Masked-in tokens are exactly the engine's: each turn ends at its stop token.
        turn_ends = [j for j in range(n) if mask[j] and ids[j] == stop]
        assert len(turn_ends) == 3 and all(mask[j] == 0 for j in range(n) if j not in
                                            {k for s, e in zip(offsets, turn_ends) for k in range(s, e + 1)})
        # The observations are the template's rendering: the decoded trajectory is a prefix of
        # the template applied to the whole conversation (model turns as generated; a last
        # user message keeps every assistant turn rendered as history).
        turns = [tokenizer.decode(ids[s:e]) for s, e in zip(offsets, turn_ends)]
        conversation = [{"role": "user", "content": "1+2="}]
        for t, text in enumerate(turns):
            conversation.append({"role": "assistant", "content": text})
            if t < 2:
                conversation.append({"role": role, "content": "7" * (t + 1)})
        expected = tokenizer.apply_chat_template(conversation + [{"role": "user", "content": "end"}], tokenize=False)
        got = tokenizer.decode(prompt + ids)
        assert expected.startswith(got)
        assert env.seen == turns
        # Behaviour log-probs sit on model tokens only; rewards on each turn's last token.
        lps = batch["rollout_log_probs"][i, :n]
        assert torch.all((lps != 0) == torch.tensor(mask, dtype=torch.bool))
        scores = batch["token_level_scores"][i]
        assert scores[turn_ends[0]].item() == pytest.approx(0.25)
        assert scores[turn_ends[2]].item() == pytest.approx(1.0)
        assert batch["scores"][i].item() == pytest.approx(1.5)
        assert batch["agent/turns"][i].item() == 3


def test_observation_ids_keep_the_separator_after_the_end_token():
    tokenizer = bpe_tokenizer(CHATML, "<|im_end|>")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = observation_ids(tokenizer, [{"role": "tool", "content": "46"}], ended_with=end)
    assert tokenizer.decode(ids) == "\n<|im_start|>tool\n46<|im_end|>\n<|im_start|>assistant\n"


def test_a_turn_cut_by_its_budget_ends_the_episode_and_budgets_bound_the_total():
    tokenizer = demo_tokenizer()
    stop = tokenizer.eos_token_id
    engine = RecordingEngine(tokenizer, stop=tokenizer.convert_tokens_to_ids("7"))  # never stops
    batch = run_episodes(rows_for(tokenizer, 2), lambda: Replier("user"), engine, tokenizer,
                         agent_cfg(max_tokens_per_turn=2), [stop])
    assert len(engine.calls) == 1
    assert batch["agent/turns"].tolist() == [1.0, 1.0]
    assert (batch["response_mask"].sum(-1) <= 2).all()


class Exploding(Environment):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode

    def step(self, text):
        if self.mode == "raise":
            raise RuntimeError("boom")
        if self.mode == "hang":
            time.sleep(30)
        return StepResult([{"role": "user", "content": "1"}])


def test_an_environment_that_raises_or_hangs_ends_only_its_episode():
    tokenizer = demo_tokenizer()
    stop = tokenizer.eos_token_id
    modes = iter(["raise", "hang", "fine"])
    start = time.monotonic()
    batch = run_episodes(rows_for(tokenizer, 3), lambda: Exploding(next(modes)), RecordingEngine(tokenizer, stop),
                         tokenizer, agent_cfg(step_timeout_s=0.5), [stop])
    assert time.monotonic() - start < 10
    assert batch["agent/env_errors"].tolist() == [1.0, 1.0, 0.0]
    assert batch["scores"].tolist()[:2] == [-1.0, -1.0]
    assert batch["agent/turns"].tolist() == [1.0, 1.0, 3.0]


TOOLS = {"calculator": Tool(calculator)}


def test_hermes_calls_and_malformed_calls_become_error_observations():
    def slow(seconds: int) -> str:
        """Sleep.

        Args:
            seconds: how long.
        """
        time.sleep(seconds)
        return "done"

    def broken(x: int) -> str:
        """Fail.

        Args:
            x: anything.
        """
        raise ValueError("no")

    tools = {**TOOLS, "slow": Tool(slow), "broken": Tool(broken)}
    text = ('<tool_call>{"name": "calculator", "arguments": {"expression": "12+34"}}</tool_call>'
            '<tool_call>{"name": "calculator", "arguments": {oops}</tool_call>'
            '<tool_call>{"name": "search", "arguments": {}}</tool_call>'
            '<tool_call>{"name": "calculator", "arguments": {"expr": "1"}}</tool_call>'
            '<tool_call>{"name": "broken", "arguments": {"x": 1}}</tool_call>'
            '<tool_call>{"name": "slow", "arguments": {"seconds": 5}}</tool_call>')
    calls = parse_hermes(text, tools)
    results = [run_call(c, tools, timeout_s=0.5) for c in calls]
    assert results[0] == ("46", False)
    assert [failed for _, failed in results[1:]] == [True] * 5
    assert "not valid JSON" in results[1][0]
    assert "unknown tool 'search'" in results[2][0]
    assert "wrong arguments" in results[3][0]
    assert "ValueError: no" in results[4][0]
    assert "did not finish within 0.5s" in results[5][0]


def test_plain_parser_and_calculator():
    assert [(c.name, c.arguments) for c in parse_plain("<tool_call>12+34</tool_call>", TOOLS)] == [
        ("calculator", {"expression": "12+34"})]
    assert parse_plain("46", TOOLS) == []
    assert calculator("(2+3)*4-1") == "19"
    with pytest.raises(ValueError):
        calculator("__import__('os')")


def test_tool_environment_counts_calls_and_scores_the_final_answer():
    cfg = SimpleNamespace(agent=SimpleNamespace(tool_timeout_s=1.0))
    scored = []

    def score(data_source, solution_str, ground_truth, extra_info=None):
        scored.append((data_source, solution_str, ground_truth))
        return {"score": float(solution_str.strip() == ground_truth)}

    env = ToolEnvironment(cfg, TOOLS, parse_plain, score)
    env.reset({"data_source": "arithmetic", "reward_model": {"ground_truth": "46"}, "extra_info": {}})
    first = env.step("<tool_call>12+34</tool_call>")
    assert first.observation == [{"role": "tool", "name": "calculator", "content": "46"}]
    assert first.info == {"tool_calls": 1, "tool_errors": 0} and not first.done
    bad = env.step("<tool_call>12+</tool_call>")
    assert bad.info["tool_errors"] == 1 and bad.observation[0]["content"].startswith("error:")
    final = env.step("46")
    assert final.done and final.reward == 1.0 and scored == [("arithmetic", "46", "46")]


def test_guess_number_replies_higher_lower_and_rewards_the_find():
    env = GuessNumber()
    env.reset({"reward_model": {"ground_truth": "5"}})
    assert env.step("2").observation == [{"role": "user", "content": "+"}]
    assert env.step("7").observation == [{"role": "user", "content": "-"}]
    assert env.step("x").observation == [{"role": "user", "content": "."}]
    found = env.step("5")
    assert found.done and found.reward == 1.0
