"""Tools an agent can call: Python functions described by a JSON schema, parsed calls, and
guarded execution.

A tool is a plain function with type hints and a Google-style docstring; its schema (what the
chat template's ``tools`` argument renders into the prompt) comes from
``transformers.utils.get_json_schema``. Calls are parsed from the model's text by a parser:

* ``hermes`` (default): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, the
  format of Qwen and Hermes chat templates; several calls per turn are allowed.
* ``plain``: ``<tool_call>ARGUMENT</tool_call>``, the text itself is the first parameter of
  the only tool; for small models that cannot write JSON (the calculator demo).
* ``file.py:function``: your own parser, ``function(text, tools) -> list[ToolCall]``.

A malformed call never raises out of ``run_calls``: bad JSON, an unknown tool, wrong
arguments, a tool that raises or runs past its time limit each become an error observation
for the model and count in ``tool_errors``.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from rlflow.errors import ConfigError
from rlflow.rewards.guarded import ScoreTimeout, call_with_timeout

_CALL_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


@dataclass
class ToolCall:
    """One parsed call; ``error`` set means the model's text could not be made into a call."""

    name: str
    arguments: dict[str, Any]
    error: Optional[str] = None


class Tool:
    """A Python function the model may call, with its JSON schema."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        from transformers.utils import get_json_schema

        self.fn = fn
        try:
            self.schema = get_json_schema(fn)
        except Exception as exc:  # noqa: BLE001 - the library's message says what is missing
            raise ConfigError(
                f"tool {getattr(fn, '__name__', fn)!r} has no usable schema ({exc}); give it type "
                "hints and a docstring with an Args: section"
            ) from exc
        self.name = self.schema["function"]["name"]
        self.parameters = list(self.schema["function"]["parameters"].get("properties", {}))


def parse_hermes(text: str, tools: dict[str, Tool]) -> list[ToolCall]:
    """Calls written as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``."""
    calls = []
    for block in _CALL_BLOCK.findall(text):
        try:
            data = json.loads(block.strip())
        except json.JSONDecodeError as exc:
            calls.append(ToolCall("", {}, f"tool call is not valid JSON ({exc.msg})"))
            continue
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            calls.append(ToolCall("", {}, 'tool call must be {"name": ..., "arguments": {...}}'))
            continue
        arguments = data.get("arguments", {})
        if isinstance(arguments, str):  # some models double-encode the arguments
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        if not isinstance(arguments, dict):
            calls.append(ToolCall(data["name"], {}, "tool call arguments must be a JSON object"))
            continue
        calls.append(ToolCall(data["name"], arguments))
    return calls


def parse_plain(text: str, tools: dict[str, Tool]) -> list[ToolCall]:
    """Calls written as ``<tool_call>ARGUMENT</tool_call>`` to the only tool."""
    if len(tools) != 1:
        raise ConfigError(f"agent.tool_parser=plain needs exactly one tool, got {sorted(tools)}")
    tool = next(iter(tools.values()))
    if not tool.parameters:
        return [ToolCall(tool.name, {}) for _ in _CALL_BLOCK.findall(text)]
    return [ToolCall(tool.name, {tool.parameters[0]: block.strip()}) for block in _CALL_BLOCK.findall(text)]


PARSERS: dict[str, Callable[[str, dict[str, Tool]], list[ToolCall]]] = {
    "hermes": parse_hermes,
    "plain": parse_plain,
}


def resolve_parser(spec: str) -> Callable[[str, dict[str, Tool]], list[ToolCall]]:
    """A parser by name (``hermes``, ``plain``) or ``file.py:function``."""
    if spec in PARSERS:
        return PARSERS[spec]
    return _load_by_path(spec, "agent.tool_parser", f"one of {sorted(PARSERS)} or file.py:function")


def _load_by_path(spec: str, key: str, expected: str) -> Any:
    from rlflow.data.custom_loading import load_object

    path, sep, name = str(spec).rpartition(":")
    if not sep or not path.endswith(".py"):
        raise ConfigError(f"{key}={spec!r} is not {expected}")
    return load_object(path, name)


def resolve_tools(specs: list[str]) -> dict[str, Tool]:
    """Tools by built-in name (``calculator``, ``python``) or ``file.py:function``."""
    from rlflow.agents import builtin_tools

    tools: dict[str, Tool] = {}
    for spec in specs:
        fn = builtin_tools.BUILTIN.get(spec) or _load_by_path(
            spec, "agent.tools", f"a built-in tool ({sorted(builtin_tools.BUILTIN)}) or file.py:function"
        )
        tool = Tool(fn)
        if tool.name in tools:
            raise ConfigError(f"agent.tools names the tool {tool.name!r} twice")
        tools[tool.name] = tool
    return tools


def run_call(call: ToolCall, tools: dict[str, Tool], timeout_s: Optional[float]) -> tuple[str, bool]:
    """``(observation text, failed)`` for one call; nothing here raises."""
    if call.error is not None:
        return f"error: {call.error}", True
    tool = tools.get(call.name)
    if tool is None:
        return f"error: unknown tool {call.name!r}; available: {sorted(tools)}", True
    try:
        inspect.signature(tool.fn).bind(**call.arguments)
    except TypeError as exc:
        return f"error: wrong arguments for {call.name}: {exc}", True
    try:
        result = call_with_timeout(tool.fn, call.arguments, timeout_s)
    except ScoreTimeout:
        return f"error: {call.name} did not finish within {timeout_s}s", True
    except Exception as exc:  # noqa: BLE001 - the model sees the failure, the worker goes on
        return f"error: {call.name} raised {type(exc).__name__}: {exc}", True
    return result if isinstance(result, str) else json.dumps(result), False
