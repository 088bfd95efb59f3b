"""Built-in environments and the factory that makes one environment per episode.

``tools`` (the default): the model may call the configured tools; a turn with no tool call is
its final answer, scored by the run's reward functions (``reward.*``) exactly as a single-turn
response would be. ``guess_number``: the multi-turn demo with feedback. Any other environment
is a class loaded from ``agent.environment_path``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

from rlflow.agents.environment import Environment, Message, StepResult
from rlflow.agents.tools import Tool, resolve_parser, resolve_tools, run_call
from rlflow.errors import ConfigError


class ToolEnvironment(Environment):
    def __init__(self, config: Any, tools: dict[str, Tool], parser: Callable, score_fn: Callable) -> None:
        super().__init__(config)
        self.available = tools
        self.tools = [tool.schema for tool in tools.values()]
        self.parser = parser
        self.score_fn = score_fn
        self.row: dict[str, Any] = {}

    def reset(self, row: dict[str, Any]) -> Optional[list[Message]]:
        self.row = row
        return None

    def step(self, text: str) -> StepResult:
        calls = self.parser(text, self.available)
        if not calls:
            score = self.score_fn(
                data_source=self.row.get("data_source"), solution_str=text,
                ground_truth=(self.row.get("reward_model") or {}).get("ground_truth"),
                extra_info=self.row.get("extra_info"),
            )
            score = float(score["score"] if isinstance(score, dict) else score)
            return StepResult(reward=score, done=True, info={"success": float(score > 0)})
        observation, errors = [], 0
        for call in calls:
            content, failed = run_call(call, self.available, self.config.agent.tool_timeout_s)
            errors += failed
            observation.append({"role": "tool", "name": call.name, "content": content})
        return StepResult(observation, info={"tool_calls": len(calls), "tool_errors": errors})


class GuessNumber(Environment):
    """Find a secret integer; after each wrong guess the reply is ``+`` (higher) or ``-``
    (lower). The secret and its range come from the row (``reward_model.ground_truth``); the
    reward is 1 for finding it within ``agent.max_turns`` guesses."""

    _FIRST_INTEGER = re.compile(r"-?\d+")

    def reset(self, row: dict[str, Any]) -> Optional[list[Message]]:
        self.secret = int(row["reward_model"]["ground_truth"])
        return None

    def step(self, text: str) -> StepResult:
        match = self._FIRST_INTEGER.search(text)
        guess = int(match.group()) if match else None
        if guess == self.secret:
            return StepResult(reward=1.0, done=True, info={"success": 1.0})
        reply = "." if guess is None else ("+" if self.secret > guess else "-")
        return StepResult([{"role": "user", "content": reply}], info={"success": 0.0})


def environment_factory(cfg: Any, score_fn: Callable) -> Callable[[], Environment]:
    """A function that makes one environment per episode for the run's ``agent`` settings."""
    acfg = cfg.agent
    if acfg.environment_path:
        from rlflow.data.custom_loading import load_object

        env_cls = load_object(acfg.environment_path, acfg.environment)
        return lambda: env_cls(cfg)
    if acfg.environment == "tools":
        tools = resolve_tools(list(acfg.tools))
        parser = resolve_parser(acfg.tool_parser)
        return lambda: ToolEnvironment(cfg, tools, parser, score_fn)
    if acfg.environment == "guess_number":
        return lambda: GuessNumber(cfg)
    raise ConfigError(
        f"agent.environment={acfg.environment!r} is not built in (tools, guess_number); set "
        "agent.environment_path to the .py file that defines it"
    )
