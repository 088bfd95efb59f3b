"""The multi-turn episode loop, token in / token out.

A trajectory's ids are the prompt's ids, then each turn's ids exactly as the engine sampled
them, then each observation's ids, appended as ids: nothing is decoded and re-tokenized, so
the trainer scores the very tokens the engine produced (a re-tokenized history can split or
merge tokens differently, or drop the separator a chat template puts after the end token).
Observation ids are the chat template's rendering of the observation messages after an
assistant turn (``observation_ids``), so the context matches what the template would give.

All live episodes advance one turn together: one batched ``generate_turns`` call per turn. The
result is laid out as the single-turn rollout's: ``responses`` holds everything after the
prompt (right-padded to ``data.max_response_length``), ``response_mask`` is 1 on the model's
own tokens only, ``rollout_log_probs`` holds their behaviour log-probs, and each turn's reward
sits on that turn's last token in ``token_level_scores``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from rlflow.agents.environment import Environment, Message, StepResult
from rlflow.data.batched_data_dict import BatchedDataDict
from rlflow.errors import DataError
from rlflow.rewards.guarded import ScoreTimeout, call_with_timeout
from rlflow.utils.torch_functional import response_batch

logger = logging.getLogger(__name__)

# (per-sample prompt ids, per-sample token budget) -> per-sample (generated ids, log-probs)
GenerateTurns = Callable[[list[list[int]], list[int]], list[tuple[list[int], list[float]]]]
INFO_KEYS = ("turns", "tool_calls", "tool_errors", "env_errors", "success")
_SENTINEL = "\u2063rlflow\u2063"


def observation_ids(tokenizer: Any, messages: list[Message], tools: Optional[list] = None,
                    ended_with: Optional[int] = None) -> list[int]:
    """The ids that follow a finished assistant turn when ``messages`` come next, up to and
    including the next generation prompt.

    Rendered in context, on a stand-in conversation whose assistant turn is followed by the
    messages: the template's text after the assistant's content (its end token, then any
    separator such as ChatML's newline), less the end token the model already produced
    (``ended_with``), then the messages and the generation prompt. Templates that render the
    last assistant turn differently from earlier ones (Qwen3 adds an empty think block to the
    last) are handled, since the stand-in turn is never the last message.
    """
    history = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}]
    text = tokenizer.apply_chat_template(
        history + list(messages), tools=tools or None, tokenize=False, add_generation_prompt=True
    )
    if text.count(_SENTINEL) != 1:
        raise DataError("the chat template does not render an assistant message's content as given")
    tail = text[text.index(_SENTINEL) + len(_SENTINEL):]
    if ended_with is not None:
        end_text = tokenizer.decode([ended_with])
        if end_text and tail.startswith(end_text):
            tail = tail[len(end_text):]
    return tokenizer(tail, add_special_tokens=False)["input_ids"]


@dataclass
class Episode:
    """One sample's trajectory as it grows."""

    prompt: list[int]
    env: Environment
    budget: int
    ids: list[int] = field(default_factory=list)
    model_mask: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    rewards: dict[int, float] = field(default_factory=dict)  # position in ids -> reward
    info: dict[str, float] = field(default_factory=dict)
    done: bool = False

    @property
    def remaining(self) -> int:
        return self.budget - len(self.ids)

    def add(self, ids: Sequence[int], from_model: bool, log_probs: Sequence[float] = ()) -> None:
        self.ids.extend(ids)
        self.model_mask.extend([int(from_model)] * len(ids))
        self.log_probs.extend(log_probs if from_model else [0.0] * len(ids))

    def count(self, info: dict[str, float]) -> None:
        for key, value in info.items():
            self.info[key] = self.info.get(key, 0.0) + float(value)


def run_episodes(
    rows: list[dict[str, Any]],
    make_env: Callable[[], Environment],
    generate_turns: GenerateTurns,
    tokenizer: Any,
    cfg: Any,
    stop_token_ids: Sequence[int],
) -> BatchedDataDict:
    """Play one episode per row; ``cfg`` is the run's typed config (``agent``, ``data``)."""
    acfg, dcfg = cfg.agent, cfg.data
    per_turn = acfg.max_tokens_per_turn or dcfg.max_response_length
    stops = set(int(i) for i in stop_token_ids)
    episodes = [_start(row, make_env(), tokenizer, dcfg) for row in rows]
    for turn in range(acfg.max_turns):
        live = [e for e in episodes if not e.done]
        if not live:
            break
        outputs = generate_turns([e.prompt + e.ids for e in live], [min(per_turn, e.remaining) for e in live])
        for episode, (ids, log_probs) in zip(live, outputs):
            episode.add(ids, True, log_probs)
            episode.count({"turns": 1})
            stopped = bool(ids) and ids[-1] in stops
            text = tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=False)
            result = _step(episode.env, text, acfg)
            episode.count(result.info)
            if result.reward and ids:
                episode.rewards[len(episode.ids) - 1] = episode.rewards.get(len(episode.ids) - 1, 0.0) + result.reward
            if result.done or not stopped or turn == acfg.max_turns - 1 or not result.observation:
                episode.done = True
                continue
            obs = observation_ids(tokenizer, result.observation, episode.env.tools or None, ids[-1])
            if len(obs) >= episode.remaining:  # no room left for the model to answer
                episode.done = True
                continue
            episode.add(obs, False)
    return _to_batch(episodes, tokenizer, dcfg)


def _start(row: dict[str, Any], env: Environment, tokenizer: Any, dcfg: Any) -> Episode:
    messages = env.reset(row)
    if messages is None and not env.tools:
        prompt = list(row["raw_prompt_ids"])
    else:
        messages = messages if messages is not None else row["raw_prompt"]
        text = tokenizer.apply_chat_template(
            list(messages), tools=env.tools or None, tokenize=False, add_generation_prompt=True
        )
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(prompt) > dcfg.max_prompt_length:
        raise DataError(
            f"data row {row.get('index')}: the episode's first prompt is {len(prompt)} tokens (tool "
            f"schemas included) > data.max_prompt_length={dcfg.max_prompt_length}; raise it"
        )
    return Episode(prompt, env, dcfg.max_response_length)


def _step(env: Environment, text: str, acfg: Any) -> StepResult:
    """``env.step`` isolated like a reward function: an error or a hang ends the episode with
    ``agent.error_reward`` and counts in ``env_errors``."""
    try:
        result = call_with_timeout(env.step, {"text": text}, acfg.step_timeout_s)
        if not isinstance(result, StepResult):
            raise TypeError(f"step() returned {type(result).__name__}, expected StepResult")
        return result
    except (ScoreTimeout, Exception) as exc:  # noqa: BLE001 - one bad episode must not stop the step
        logger.warning("environment %s failed on a turn: %s: %s", type(env).__name__, type(exc).__name__, exc)
        return StepResult(reward=acfg.error_reward, done=True, info={"env_errors": 1.0})


def _to_batch(episodes: list[Episode], tokenizer: Any, dcfg: Any) -> BatchedDataDict:
    pad = tokenizer.pad_token_id
    size, width = len(episodes), dcfg.max_response_length
    prompt_width = dcfg.max_prompt_length  # every shard the same width (checked in _start)
    prompts = torch.full((size, prompt_width), pad, dtype=torch.long)
    prompt_mask = torch.zeros(size, prompt_width, dtype=torch.long)
    responses = torch.full((size, width), pad, dtype=torch.long)
    tail_mask = torch.zeros(size, width, dtype=torch.long)
    response_mask = torch.zeros(size, width, dtype=torch.long)
    log_probs = torch.zeros(size, width)
    scores = torch.zeros(size, width)
    for i, e in enumerate(episodes):
        prompts[i, prompt_width - len(e.prompt):] = torch.tensor(e.prompt)
        prompt_mask[i, prompt_width - len(e.prompt):] = 1
        n = len(e.ids)
        if n:
            responses[i, :n] = torch.tensor(e.ids)
            tail_mask[i, :n] = 1
            response_mask[i, :n] = torch.tensor(e.model_mask)
            log_probs[i, :n] = torch.tensor(e.log_probs)
        for position, reward in e.rewards.items():
            scores[i, position] += reward
    batch = BatchedDataDict(response_batch(prompts, prompt_mask, responses, response_mask, tail_mask))
    batch["rollout_log_probs"] = log_probs * response_mask
    batch["token_level_scores"] = scores
    batch["scores"] = scores.sum(-1)
    for key in INFO_KEYS:
        batch[f"agent/{key}"] = torch.tensor([e.info.get(key, 0.0) for e in episodes])
    return batch
