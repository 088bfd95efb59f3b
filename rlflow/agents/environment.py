"""The environment interface of multi-turn rollouts.

An episode starts from one data row. ``reset(row)`` returns what the model sees first (the
row's prompt is used when it returns None); then each model turn goes to ``step(text)``, which
answers with the next observation, a reward for the turn, and whether the episode is over.
Observations are chat messages (``{"role": ..., "content": ...}``); the episode loop renders
them with the tokenizer's chat template and appends their ids after the model's own ids, so
the trajectory is never re-tokenized from text.

One environment object serves one episode: the loop builds a fresh one per sample with
``factory(config)``, where ``factory`` is the configured class (``agent.environment``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

Message = dict[str, Any]


@dataclass
class StepResult:
    """What ``Environment.step`` returns for one model turn.

    ``observation``: messages to show the model next (empty when ``done``). ``reward``: this
    turn's reward; the episode's return is the sum over turns. ``info``: numbers to count
    (``tool_calls``, ``tool_errors`` and any of the environment's own), summed per episode
    and logged as ``agent/<name>``.
    """

    observation: list[Message] = field(default_factory=list)
    reward: float = 0.0
    done: bool = False
    info: dict[str, float] = field(default_factory=dict)


class Environment:
    """Base class of an environment; subclasses override ``step`` and usually ``reset``.

    ``config`` is the run's typed config (``agent.env_kwargs`` holds the environment's own
    settings). ``tools`` lists the JSON schemas passed to the chat template's ``tools``
    argument, so the model is told which tools exist.
    """

    tools: list[dict[str, Any]] = []

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def reset(self, row: dict[str, Any]) -> Optional[list[Message]]:
        """Start an episode for ``row`` (a data row: ``prompt``, ``reward_model``,
        ``extra_info``, ``data_source``). Return the first messages, or None to use
        ``row["prompt"]``."""
        return None

    def step(self, text: str) -> StepResult:
        """React to one model turn (its decoded text, stop token excluded)."""
        raise NotImplementedError(f"{type(self).__name__} must implement step(text)")
